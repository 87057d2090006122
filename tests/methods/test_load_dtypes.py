"""Frozen parts loaded straight in the compute dtype (bf16 runs) train exactly what loading
them in fp32 and casting them gave: TI (U-Net + VAE) and LoRA (VAE), from an fp16 file."""

from __future__ import annotations

import dataclasses

import contract
import pytest
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
    parts = {"ti": {"unet", "vae"}, "lora": {"vae"}}[name]
    assert set(loads[-1]) == parts and set(loads[-1].values()) == {torch.bfloat16}
    monkeypatch.setattr(sdtrain.run.train, "_part_dtypes", lambda *_: {})
    wide = contract.write_config(case, tmp_path / "b.toml", data, tmp_path / "b")
    want = contract.train(cli, monkeypatch, case, wide)
    contract.assert_same(got.after_setup, want.after_setup, "bundle after setup")
    files_a, files_b = contract.final_files(got), contract.final_files(want)
    assert [p.name for p in files_a] == [p.name for p in files_b]
    for a, b in zip(files_a, files_b, strict=True):
        contract.assert_same(contract._tensors(a), contract._tensors(b), a.name)
