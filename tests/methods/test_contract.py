"""The method-contract battery (tests/methods/contract.py) for every registered method.

A method joins with one MethodCase in CASES; every registered method must have one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import contract
import pytest
from contract import MethodCase

from sdtrain.methods.registry import METHODS


def _reload_lora(files: list[Path], bundle: Any) -> Any:
    from sdtrain.methods.adapters.apply import apply_lora_file

    (kohya_file,) = [p for p in files if not p.name.endswith(".diffusers.safetensors")]
    apply_lora_file(bundle, kohya_file)
    return bundle


def _reload_ti(files: list[Path], bundle: Any) -> Any:
    from sdtrain.models.embeddings import add_embedding, read_embedding

    (path,) = files
    add_embedding(bundle, "zqtok", read_embedding(path))
    return bundle


CASES: list[MethodCase] = [
    MethodCase(
        name="lora",
        tables={"network": {"network_dim": 4, "network_alpha": 2.0}},
        trainable=lambda key, tensor: ".lora_A." in key or ".lora_B." in key,
        reload=_reload_lora,
        atol=0.0,
    ),
    MethodCase(
        name="ti",
        tables={"textual_inversion": {"token_string": "zqtok", "init_word": "cat"}},
        # only the new rows: they sit in NewTokenRows.rows; the base matrix must not change
        trainable=lambda key, tensor: key.endswith("token_embedding.rows"),
        reload=_reload_ti,
        captions=lambda i: f"a photo of zqtok, tag{i}",
        prompts=["a photo of zqtok", "zqtok tag1"],
        atol=0.0,
    ),
]
BY_NAME = {case.name: case for case in CASES}


def test_every_registered_method_has_a_case():
    assert set(METHODS) <= set(BY_NAME)


@pytest.fixture(scope="module", params=sorted(BY_NAME))
def trained(request, tmp_path_factory):
    """One straight run per case: (case, captured trainer, output folder)."""
    from typer.testing import CliRunner

    from sdtrain.cli.main import _register_groups, app

    _register_groups()
    runner = CliRunner()

    def cli(args: list[str]) -> Any:
        return runner.invoke(app, args, catch_exceptions=False)

    case = BY_NAME[request.param]
    root = tmp_path_factory.mktemp(f"contract-{case.name}")
    out = root / "out"
    config = contract.write_config(case, root / "run.toml", contract.make_dataset(root, case), out)
    with pytest.MonkeyPatch.context() as monkeypatch:
        captured = contract.train(cli, monkeypatch, case, config)
    return case, captured, out


def test_loss_is_finite(trained):
    contract.check_finite_loss(trained[2])


def test_only_declared_parameters_change(trained):
    case, captured, _ = trained
    contract.check_only_declared_change(case, captured)


def test_export_reloads_to_the_same_outputs(trained):
    case, captured, _ = trained
    contract.check_export_reload(case, captured)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_resume_is_exact(name, cli, monkeypatch, tmp_path):
    contract.check_exact_resume(cli, monkeypatch, BY_NAME[name], tmp_path)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_two_processes(name, tmp_path):
    if contract.two_process_run is None:
        pytest.skip("contract.two_process_run is not set yet (the accel branch's gloo runner)")
    case = BY_NAME[name]
    out = tmp_path / "out"
    config = contract.write_config(
        case, tmp_path / "run.toml", contract.make_dataset(tmp_path, case), out
    )
    contract.two_process_run(case, config, out)
    contract.check_finite_loss(out)
