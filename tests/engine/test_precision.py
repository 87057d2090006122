"""Precision policy: bf16 frozen weights with fp32 adapters, and peft's redundant input cast."""

from __future__ import annotations

import pytest
import torch

from sdtrain.config.sections import TrainingSection
from sdtrain.engine.precision import (
    apply_precision,
    input_casts_off,
    precision_for,
    redundant_input_casts,
)


def _adapted(seed: int = 0) -> torch.nn.Module:
    """Two Linear layers with peft LoRA (rank 4) on both; the base frozen, LoRA trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    model.requires_grad_(False)
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False), model
    )
    return model


def _bf16():
    return precision_for(TrainingSection(mixed_precision="bf16"), False, "cpu")


def test_bf16_policy_casts_frozen_weights_and_keeps_adapters_fp32():
    model = _adapted()
    apply_precision([model], _bf16())
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


def test_redundant_casts_only_under_autocast_with_fp32_adapters():
    model = _adapted()
    assert len(redundant_input_casts([model], _bf16())) == 2
    fp32 = precision_for(TrainingSection(mixed_precision="no"), False, "cpu")
    assert redundant_input_casts([model], fp32) == []
    full = precision_for(TrainingSection(mixed_precision="bf16", full_bf16=True), False, "cpu")
    assert redundant_input_casts([model], full) == []


def _loss_and_grads(model: torch.nn.Module, casts_off: bool):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    layers = redundant_input_casts([model], _bf16()) if casts_off else []
    with torch.autocast("cpu", dtype=torch.bfloat16), input_casts_off(layers):
        out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_switching_the_cast_off_is_bit_identical():
    model = _adapted()
    apply_precision([model], _bf16())
    loss_on, grads_on = _loss_and_grads(model, casts_off=False)
    loss_off, grads_off = _loss_and_grads(model, casts_off=True)
    assert torch.equal(loss_on, loss_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off, strict=True))


def test_casts_are_restored_after_the_block():
    model = _adapted()
    layers = redundant_input_casts([model], _bf16())
    with input_casts_off(layers):
        assert all(layer.cast_input_dtype_enabled is False for layer in layers)
    assert all(layer.cast_input_dtype_enabled for layer in layers)
    with pytest.raises(RuntimeError), input_casts_off(layers):
        raise RuntimeError("boom")
    assert all(layer.cast_input_dtype_enabled for layer in layers)
