"""Frozen parts loaded straight in the compute dtype (bf16 runs) train exactly what loading
them in fp32 and casting them gave: TI (U-Net + VAE) and LoRA (U-Net, text encoder, VAE;
its adapters are still created and initialised in fp32), from an fp16 file."""

from __future__ import annotations

import dataclasses

import contract
import pytest
import torch
from test_contract import BY_NAME

import sdtrain.run.train


@pytest.fixture(scope="module")
def half_file(tmp_path_factory):
    from sdtrain.models.builtin import load_builtin
    from sdtrain.models.save import save_single_file

    path = tmp_path_factory.mktemp("half") / "tiny-fp16.safetensors"
    return save_single_file(load_builtin("builtin:tiny-sd1"), path, precision="fp16")


@pytest.mark.parametrize("name", ["ti", "lora"])
def test_direct_dtype_load_trains_bit_identically(cli, monkeypatch, tmp_path, half_file, name):
    import torch

    extra = {"model": {"pretrained_model_name_or_path": str(half_file)}}
    extra["training"] = {"mixed_precision": "bf16"}
    case = dataclasses.replace(BY_NAME[name], tables={**BY_NAME[name].tables, **extra})
    data = contract.make_dataset(tmp_path, case)
    loads = []
    real = sdtrain.run.train._part_dtypes

    def recorded(method, precision):
        loads.append(real(method, precision))
        return loads[-1]

    monkeypatch.setattr(sdtrain.run.train, "_part_dtypes", recorded)
    direct = contract.write_config(case, tmp_path / "a.toml", data, tmp_path / "a")
    got = contract.train(cli, monkeypatch, case, direct)
    parts = {"ti": {"unet", "vae"}, "lora": {"unet", "text_encoder", "vae"}}[name]
    assert set(loads[-1]) == parts and set(loads[-1].values()) == {torch.bfloat16}
    monkeypatch.setattr(sdtrain.run.train, "_part_dtypes", lambda *_: {})
    wide = contract.write_config(case, tmp_path / "b.toml", data, tmp_path / "b")
    want = contract.train(cli, monkeypatch, case, wide)
    contract.assert_same(got.after_setup, want.after_setup, "bundle after setup")
    files_a, files_b = contract.final_files(got), contract.final_files(want)
    assert [p.name for p in files_a] == [p.name for p in files_b]
    for a, b in zip(files_a, files_b, strict=True):
        contract.assert_same(contract._tensors(a), contract._tensors(b), a.name)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_adapters_on_a_half_base_get_the_fp32_init_and_the_base_is_untouched(half):
    """peft creates adapters in the base layer's dtype; sdtrain injects with the targets held in
    fp32, so the kaiming init is the one an fp32 base gets, and the base comes back bit-exact."""
    from tiny_parts import tiny_text_encoder, tiny_unet

    from sdtrain.methods.adapters.lora import LoraNetwork
    from sdtrain.methods.adapters.spec import LoraSpec

    def build(dtype):
        torch.manual_seed(0)
        unet, text = tiny_unet(), tiny_text_encoder()
        for module in (unet, text):
            torch.nn.Module.to(module, dtype=torch.float16)  # the "file"
            torch.nn.Module.to(module, dtype=dtype)
            module.requires_grad_(False)
        before = {k: v.clone() for k, v in unet.state_dict().items()}
        torch.manual_seed(1)
        return LoraNetwork.create(unet, text, LoraSpec(dim=4, alpha=1.0)), unet, before

    wide, _, _ = build(torch.float32)
    narrow, unet, before = build(half)
    for a, b in zip(wide.modules, narrow.modules, strict=True):
        assert b.down.weight.dtype == torch.float32
        assert torch.equal(a.down.weight, b.down.weight), a.target.path
    base = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    for key, value in before.items():
        moved = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        now = base.get(key, base.get(moved))
        assert now is not None and now.dtype == half and torch.equal(now, value), key
