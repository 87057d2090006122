"""`sdtrain model info|convert` through the real Typer app."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sdtrain.errors import ModelLoadError


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle
    from sdtrain.models.save import save_single_file

    bundle = load_bundle(ModelSection(pretrained_model_name_or_path="builtin:tiny-sd2"))
    return save_single_file(bundle, tmp_path_factory.mktemp("cli") / "tiny.safetensors")


def test_info_json(cli, tiny_file):
    result = cli(["model", "info", str(tiny_file), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "sd2"
    assert info["prediction_type"] == "v_prediction"
    assert info["prediction_source"] == "file metadata"
    assert info["dtypes"] == {"F32": 426}
    assert info["parameters"]["text_encoder"] > info["parameters"]["unet"] > 0
    assert len(info["sha256"]) == 64 and info["autov2"] == info["sha256"][:10]
    assert len(info["legacy_hash"]) == 8 and len(info["model_hash"]) == 64
    assert info["metadata"]["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert info["loads"] is True


def test_info_table_and_broken_file(cli, tiny_file, tmp_path):
    result = cli(["model", "info", str(tiny_file), "--no-hash"])
    assert result.exit_code == 0
    assert "sd2" in result.stdout and "loads" in result.stdout
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_file)
    state.pop("model.diffusion_model.out.2.bias")
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    info = json.loads(cli(["model", "info", str(broken), "--json", "--no-hash"]).stdout)
    assert info["loads"] is False and "model.diffusion_model.out.2.bias" in info["load_message"]


def test_info_builtin(cli):
    info = json.loads(cli(["model", "info", "builtin:tiny-sd1", "--json"]).stdout)
    assert info["family"] == "sd1" and info["loads"] is True and info["kind"] == "builtin"


def test_convert_both_ways(cli, tiny_file, tmp_path):
    folder = tmp_path / "diffusers"
    result = cli(["model", "convert", str(tiny_file), str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    back = tmp_path / "back.safetensors"
    result = cli(["model", "convert", str(folder), str(back), "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    with safe_open(str(back), "pt") as a, safe_open(str(tiny_file), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        key = "model.diffusion_model.input_blocks.0.0.weight"
        assert a.get_tensor(key).dtype == torch.bfloat16
        assert torch.equal(a.get_tensor(key), b.get_tensor(key).bfloat16())
        assert a.metadata()["modelspec.prediction_type"] == "v"


def test_convert_flags(cli, tiny_file, tmp_path):
    out = tmp_path / "eps.ckpt"
    result = cli(["model", "convert", str(tiny_file), str(out), "--v2", "--no-v-parameterization"])
    assert result.exit_code == 0, result.output
    assert "state_dict" in torch.load(out, weights_only=True)
    with pytest.raises(ModelLoadError, match="v2 = false"):
        cli(["model", "convert", str(tiny_file), str(tmp_path / "x.safetensors"), "--no-v2"])
    with pytest.raises(ModelLoadError, match="already exists"):
        cli(["model", "convert", str(tiny_file), str(out)])
    with pytest.raises(ModelLoadError, match="single-file extension"):
        cli(["model", "convert", str(tiny_file), str(tmp_path / "folder"), "--to", "ldm"])
    folder = tmp_path / "v"
    result = cli(["model", "convert", str(out), str(folder), "--v_parameterization"])
    assert result.exit_code == 0, result.output
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
