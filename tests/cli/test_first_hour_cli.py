"""Pure command-line use (no TOML), the reference's argument TOML (`--config_file`, `sdtrain
config import`) and reference-only flags refused with a pointer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

from sdtrain.errors import ConfigError

ARGS_TOML = """\
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"
lowram = true

[folders]
train_data_dir = "train"
reg_data_dir = "reg"
output_dir = "out"

[basic]
resolution = "64,64"
enable_bucket = true
min_bucket_reso = 64
train_batch_size = 2
learning_rate = 0.0001
network_dim = 8
max_train_epochs = ""
wandb_api_key = ""
huber_scale = 1.0
"""


@pytest.fixture
def folders(tmp_path: Path, monkeypatch) -> Path:
    """Reference folder layout: train/4_sks dog (3 images), reg/1_dog (4 images)."""
    rng = np.random.default_rng(0)
    for sub, count in (("train/4_sks dog", 3), ("reg/1_dog", 4)):
        folder = tmp_path / sub
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


FLAGS = [
    "--train_data_dir", "train", "--reg_data_dir", "reg", "--resolution", "64",
    "--enable_bucket", "--min_bucket_reso", "64", "--train_batch_size", "2",
]  # fmt: skip


def test_dataset_plan_with_flags_alone(cli, folders):
    result = cli(["dataset", "plan", *FLAGS, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (dataset,) = doc["datasets"]
    assert (dataset["num_train_images"], dataset["num_reg_images"]) == (12, 12)
    assert dataset["batch_size"] == 2 and doc["batches_per_epoch"] == 12


def test_train_dry_run_with_flags_alone(cli, folders):
    flags = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--output_dir", "out"]
    result = cli(["train", "lora", *FLAGS, *flags, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run: configuration and data are valid" in result.output


def test_nothing_given_says_how_to_start(cli):
    with pytest.raises(ConfigError) as info:
        cli(["dataset", "plan"])
    assert "flags alone" in info.value.hint and "--config_file" in info.value.hint


def test_config_file_reads_the_argument_toml_and_names_unmapped_keys(cli, folders):
    (folders / "args.toml").write_text(ARGS_TOML)
    result = cli(["train", "lora", "--config_file", "args.toml", "--dry-run", "--seed", "1"])
    assert result.exit_code == 0, result.output
    # without any whitespace: rich folds long words (the temp path before "args.toml:3") at the
    # terminal width, so where a line breaks depends on the path's length
    said = "".join(result.output.split())

    def squash(text: str) -> str:
        return "".join(text.split())

    assert squash("args.toml:3 lowram: not used") in said
    assert squash("wandb_api_key: not used (secrets come from the environment") in said
    assert squash("resolution = '64,64' read as [64, 64]") in said
    assert squash("args.toml:19 huber_scale: mapped, but differs") in said
    assert f'output_dir = "{folders / "out"}"\n' in result.output  # relative to the file
    with pytest.raises(ConfigError) as info:  # a run TOML and --config_file together
        cli(["train", "lora", "run.toml", "--config_file", "args.toml", "--dry-run"])
    assert "not both" in info.value.problems[0].message


def test_config_import_writes_a_run_toml_that_trains(cli, folders):
    (folders / "args.toml").write_text(ARGS_TOML)
    (folders / "blueprint.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\n")
    result = cli(["config", "import", "args.toml", "-o", "run.toml"])
    assert result.exit_code == 0, result.output
    run = tomllib.loads((folders / "run.toml").read_text())
    assert run["dataset"]["resolution"] == [64, 64]
    assert run["network"]["network_dim"] == 8 and run["optimizer"]["learning_rate"] == 1e-4
    assert "lowram" not in json.dumps(run)
    assert "2 not used" in " ".join(result.output.split())
    dry = cli(["train", "lora", "run.toml", "--dry-run", "--seed", "1"])
    assert dry.exit_code == 0, dry.output
    with pytest.raises(ConfigError):  # never overwrites without asking
        cli(["config", "import", "args.toml", "-o", "run.toml"])
    no_folders = ARGS_TOML.replace('train_data_dir = "train"\nreg_data_dir = "reg"\n', "")
    (folders / "args2.toml").write_text(no_folders)
    args = ["args2.toml", "-o", "b.toml", "--dataset_config", "blueprint.toml"]
    assert cli(["config", "import", *args]).exit_code == 0
    written = tomllib.loads((folders / "b.toml").read_text())
    assert written["dataset"]["dataset_config"] == str(folders / "blueprint.toml")


def test_debug_dataset_points_at_the_plan_preview(cli, folders):
    with pytest.raises(ConfigError) as info:
        cli(["train", "lora", *FLAGS, "--debug_dataset"])
    (problem,) = info.value.problems
    assert problem.key == "debug_dataset" and "dataset plan" in problem.hint
    assert "--preview" in problem.hint
