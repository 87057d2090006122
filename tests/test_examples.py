"""Every file in configs/examples validates: dataset blueprints and run configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtrain.config.blueprint import ANY_KIND
from sdtrain.config.blueprint_load import dataset_blueprint, read_blueprint_file
from sdtrain.config.chain import resolve_blueprint, run_level, run_level_for, run_origins
from sdtrain.config.loader import load_run_config
from sdtrain.config.sections import DatasetSection
from sdtrain.methods.registry import METHODS

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"

# Hook for run configs: file-name prefix -> the command whose schema validates it
# (`lora_*.toml` and `quickstart.toml` -> `sdtrain train lora`). Add one line per new kind of
# example; an example run config without an entry fails below instead of going unchecked.
RUN_CONFIG_COMMANDS: dict[str, str] = {
    "lora": "lora",
    "quickstart": "lora",
    "dreambooth": "dreambooth",
    "finetune": "finetune",
    "ti": "ti",
}

CONFIG_FILES = sorted(p for p in EXAMPLES.glob("*") if p.suffix in (".toml", ".json"))


def command_for(path: Path) -> str | None:
    """The command of an example run config, from its file-name prefix."""
    for prefix, command in RUN_CONFIG_COMMANDS.items():
        if path.stem == prefix or path.stem.startswith(prefix + "_"):
            return command
    return None


def test_the_three_dataset_examples_exist():
    names = {p.name for p in CONFIG_FILES}
    assert {"dataset_dreambooth.toml", "dataset_captions.toml", "dataset_finetune.toml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_example_validates(path: Path):
    if path.name.startswith("dataset_"):
        blueprint = read_blueprint_file(path, ANY_KIND)
        resolved = resolve_blueprint(blueprint, run_level(DatasetSection()))
        assert resolved and all(d.subsets for d in resolved)
        return
    command = command_for(path)
    assert command is not None, f"add {path.name}'s prefix to RUN_CONFIG_COMMANDS"
    if command not in METHODS:
        pytest.fail(f"{path.name}: command {command!r} has no run schema yet")
    loaded = load_run_config([str(path)], METHODS[command].command)
    config = loaded.config
    if config.dataset.dataset_config or config.datasets is not None:
        blueprint = dataset_blueprint(
            config.dataset,
            config.general,
            config.datasets,
            loaded.source,
            METHODS[command].command.support,
            run_origins(loaded),
        )
        resolve_blueprint(blueprint, run_level_for(loaded))
