"""The text encoder's MLP keeping only fc1's output: bit-identical, the product not kept."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from sdtrain.models import clip_mlp, saved_recompute
from sdtrain.models.clip_mlp import use_recomputing_mlp


def _mlp(act: str):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPMLP

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=24, intermediate_size=40, hidden_act=act)
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["fc1", "fc2"])
    return inject_adapter_in_model(lora, CLIPMLP(config))


def _run(mlp, x, grad_out):
    xi = x.clone().requires_grad_(True)
    out = mlp(xi)
    out.backward(grad_out)
    return out, xi.grad, {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and a[2]
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])  # SD1's and SD2's text encoders
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_are_bit_identical_and_the_product_is_not_kept(
    monkeypatch, act, dtype
):
    stock = _mlp(act).to(dtype)
    lever = copy.deepcopy(stock)
    assert use_recomputing_mlp(lever) == 1
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad_out = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    products = []
    real = saved_recompute.Recomputed.apply

    def apply(h, fn):
        out = real(h, fn)
        products.append(weakref.ref(out))
        return out

    monkeypatch.setattr(saved_recompute.Recomputed, "apply", apply)
    xi = x.clone().requires_grad_(True)
    out = lever(xi)
    (product,) = products
    assert product() is None  # neither the activation nor fc2 keeps it
    out.backward(grad_out)
    b = (out, xi.grad, {n: p.grad for n, p in lever.named_parameters() if p.grad is not None})
    _assert_same(_run(stock, x, grad_out), b)


def test_without_gradients_under_checkpointing_and_opted_out_it_is_the_stock_module(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    stock = _mlp("quick_gelu")
    lever = copy.deepcopy(stock)
    use_recomputing_mlp(lever)
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(stock(x), lever(x))
    calls = []
    monkeypatch.setattr(saved_recompute.Recomputed, "apply", lambda *a: calls.append(1) or None)
    grad_out = torch.randn(3, 24)

    def checkpointed(mlp):
        xi = x.clone().requires_grad_(True)
        out = checkpoint(mlp, xi, use_reentrant=False)
        out.backward(grad_out)
        return out, xi.grad, {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}

    _assert_same(checkpointed(stock), checkpointed(lever))
    assert not calls
    monkeypatch.setenv(clip_mlp.OPT_OUT, "stock")
    fresh = _mlp("quick_gelu")
    assert use_recomputing_mlp(fresh) == 0
    assert "forward" not in vars(fresh)


def test_under_autocast_the_recomputation_gives_the_same_bits():
    """fp32 weights, the forward under CPU bf16 autocast, backward outside it (as training)."""
    stock = _mlp("quick_gelu")
    lever = copy.deepcopy(stock)
    use_recomputing_mlp(lever)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2))
    results = []
    for mlp in (stock, lever):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp(xi)
        assert out.dtype == torch.bfloat16
        out.backward(grad_out.to(out.dtype))
        grads = {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}
        results.append((out, xi.grad, grads))
    _assert_same(*results)
