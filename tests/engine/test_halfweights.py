"""Frozen half weights up-cast per layer: bit-identical to up-casting at load, less memory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sdtrain.engine import halfweights
from sdtrain.engine.halfweights import has_frozen_half, upcast_half_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))

from tiny_parts import tiny_text_encoder, tiny_unet  # noqa: E402


def _models(half: bool):
    """Tiny UNet + CLIP whose 'file' is fp16: kept half, or up-cast at load; LoRA in fp32."""
    from sdtrain.methods.adapters.lora import LoraNetwork
    from sdtrain.methods.adapters.spec import LoraSpec

    unet, text = tiny_unet(), tiny_text_encoder()
    for module in (unet, text):
        torch.nn.Module.to(module, dtype=torch.float16)
        module.requires_grad_(False)
        if not half:
            torch.nn.Module.to(module, dtype=torch.float32)
    network = LoraNetwork.create(unet, text, LoraSpec(dim=4, alpha=1.0))
    torch.manual_seed(1)
    for module in network.modules:
        module.down.float()
        module.up.float()
        torch.nn.init.normal_(module.up.weight, std=0.1)
    network.train(True)
    return unet, text, network


def _step(unet, text, network, half: bool):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 77), generator=generator)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    with upcast_half_weights(half):
        cond = text(ids).last_hidden_state
        out = unet(sample, torch.tensor([10, 500]), cond).sample
    (out**2).mean().backward()
    return out.detach(), [p.grad.clone() for p in network.parameters()]


def test_bit_identical_to_upcast_at_load():
    full = _models(half=False)
    half = _models(half=True)
    assert has_frozen_half([half[0], half[1]]) and not has_frozen_half([full[0], full[1]])
    for a, b in zip(full[2].parameters(), half[2].parameters(), strict=True):
        b.data.copy_(a.data)
    out_full, grads_full = _step(*full, half=False)
    out_half, grads_half = _step(*half, half=True)
    assert out_half.dtype == torch.float32
    assert torch.equal(out_full, out_half)
    assert all(torch.equal(a, b) for a, b in zip(grads_full, grads_half, strict=True))
    assert all(p.dtype == torch.float16 for p in half[0].parameters() if not p.requires_grad)


def test_backward_keeps_half_weights_not_fp32_copies(monkeypatch):
    """Saved-for-backward up-casts are stored as their half source (the memory saving)."""
    packed = {"half": 0, "other": 0}
    original = halfweights._UpcastMode.pack

    def counting(self, tensor):
        result = original(self, tensor)
        packed["other" if isinstance(result, torch.Tensor) else "half"] += 1
        return result

    monkeypatch.setattr(halfweights._UpcastMode, "pack", counting)
    _step(*_models(half=True), half=True)
    assert packed["half"] > 20


def test_off_is_a_no_op():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with upcast_half_weights(False):
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def _slow_conv_calls(models, half: bool) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, grads = _step(*models, half=half)
    counts = {e.key: e.count for e in prof.key_averages()}
    return counts.get("aten::_slow_conv2d_forward", 0), out, grads


def test_gemm_convolutions_keep_their_path_with_half_weights():
    """models/conv_path.py's routed convolutions take the GEMM kernel with frozen half weights
    too (the mode up-casts the weight the kernel receives), bit-identical to fp32 weights."""
    from sdtrain.models.conv_path import use_gemm_convolutions

    full, half = _models(half=False), _models(half=True)
    assert use_gemm_convolutions(full[0]) == use_gemm_convolutions(half[0]) > 0
    for a, b in zip(full[2].parameters(), half[2].parameters(), strict=True):
        b.data.copy_(a.data)
    calls_full, out_full, grads_full = _slow_conv_calls(full, half=False)
    calls_half, out_half, grads_half = _slow_conv_calls(half, half=True)
    assert calls_full > 0 and calls_half == calls_full
    assert torch.equal(out_full, out_half)
    assert all(torch.equal(a, b) for a, b in zip(grads_full, grads_half, strict=True))
