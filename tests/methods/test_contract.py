"""The method-contract battery (tests/methods/contract.py) for every registered method.

A method joins with one MethodCase in CASES; every registered method must have one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import contract
import pytest
import torch
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


def _reload_full_model(files: list[Path], bundle: Any) -> Any:
    """A full-model export is the whole model: load the saved single file on its own."""
    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle

    (model,) = [p for p in files if "-ema" not in p.name]
    return load_bundle(ModelSection(pretrained_model_name_or_path=str(model)))


def _finetune_tables(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The battery's images as a fine-tune (metadata) dataset: meta.json beside them."""
    import json

    folder = Path(tables["dataset"]["train_data_dir"]) / "1_cat"
    meta = {
        image.name: {"caption": image.with_suffix(".caption").read_text(), "tags": "cat"}
        for image in sorted(folder.glob("*.png"))
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    tables["dataset"] = {
        "train_data_dir": str(folder),
        "in_json": str(folder / "meta.json"),
        "resolution": 64,
    }
    return tables


def _unet_or_text_encoder(key: str, tensor: Any) -> bool:
    return key.startswith(("unet.", "text_encoder.")) and not key.endswith("position_ids")


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
    # full U-Net + text encoder with its own LR; the text encoder stops after step 3, so the
    # resume check (state at step 2) crosses the stop
    MethodCase(
        name="dreambooth",
        tables={
            "dreambooth": {
                "learning_rate_te": 1e-3,
                "stop_text_encoder_training": 3,
                "save_model_as": "safetensors",
            },
            "optimizer": {"learning_rate": 1e-3},
        },
        trainable=_unet_or_text_encoder,
        reload=_reload_full_model,
    ),
    # full U-Net only (text encoder frozen: it must not change), EMA deliverable, .ckpt file
    MethodCase(
        name="finetune",
        tables={
            "finetune": {"save_model_as": "ckpt", "ema_decay": 0.5, "ema_save": "deliverable"},
            "optimizer": {"learning_rate": 1e-3},
        },
        trainable=lambda key, tensor: key.startswith("unet."),
        reload=_reload_full_model,
        config=_finetune_tables,
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


def test_training_routes_the_unet_convolutions(trained):
    """Every method trains with the base U-Net's convolutions routed (models/conv_path.py;
    adapter layers added after loading keep torch's choice)."""
    _, captured, _ = trained
    unet = captured.trainer.bundle.unet
    convs = [
        m
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Conv2d) and "lora_" not in name
    ]
    assert convs and all("_conv_forward" in vars(m) for m in convs)


def test_training_routes_the_unet_linears(trained):
    """... and its and the text encoders' Linear layers (models/linear_path.py), adapters' own
    excepted."""
    _, captured, _ = trained
    bundle = captured.trainer.bundle
    for model in (bundle.unet, *bundle.family.text_encoders(bundle)):
        linears = [
            m
            for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and "lora_" not in name
        ]
        assert linears and all("forward" in vars(m) for m in linears)


def test_export_reloads_to_the_same_outputs(trained):
    case, captured, _ = trained
    contract.check_export_reload(case, captured)


def test_a_compiled_run_is_the_eager_run(trained, cli, monkeypatch, tmp_path):
    case, captured, _ = trained
    contract.check_compiled_is_eager(cli, monkeypatch, case, captured, tmp_path)


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
