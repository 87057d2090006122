"""The U-Net's GEGLU with gelu(gate) recomputed in backward: bit-identical, one activation less."""

from __future__ import annotations

import copy

import pytest
import torch

from sdtrain.models import geglu as geglu_module
from sdtrain.models.geglu import use_recomputing_geglu


def _geglu(dim: int = 24, inner: int = 40):
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    return GEGLU(dim, inner)


def _saved_bytes(run) -> tuple[torch.Tensor, int]:
    """(`run()`, bytes of the distinct storages autograd saves for backward while it builds its
    graph): views of one storage count once."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_are_bit_identical(dtype):
    stock = _geglu().to(dtype)
    recomputing = copy.deepcopy(stock)
    assert use_recomputing_geglu(recomputing) == 1
    x = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad_out = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for module in (stock, recomputing):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(grad_out)
        results.append((out, xi.grad, module.proj.weight.grad, module.proj.bias.grad))
    for a, b in zip(*results, strict=True):
        assert a.dtype == dtype
        assert torch.equal(a, b)


def test_it_saves_one_inner_width_less():
    stock = _geglu()
    recomputing = copy.deepcopy(stock)
    use_recomputing_geglu(recomputing)
    x = torch.randn(4, 32, 24, requires_grad=True)
    _, stock_bytes = _saved_bytes(lambda: stock(x))
    _, new_bytes = _saved_bytes(lambda: recomputing(x))
    assert stock_bytes - new_bytes == 4 * 32 * 40 * 4  # gelu(gate): (4, 32, 40) fp32


def test_unet_with_lora_trains_identically(tiny_sd1):
    """The tiny U-Net (its transformer blocks' GEGLUs), with peft LoRA adapters on every
    projection including GEGLU's and the feed-forward's output layer: the same prediction and
    the same LoRA and input gradients."""
    from diffusers.models.activations import GEGLU
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights=False, target_modules=["proj", "net.2"]
    )
    unets = []
    for recompute in (False, True):
        torch.manual_seed(0)  # the same adapter weights in both
        unet = copy.deepcopy(tiny_sd1.unet).requires_grad_(False)
        if recompute:
            assert use_recomputing_geglu(unet) == sum(isinstance(m, GEGLU) for m in unet.modules())
        unets.append(inject_adapter_in_model(config, unet))
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, tiny_sd1.unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 500])
    results = []
    for unet in unets:
        x = latents.clone().requires_grad_(True)
        out = unet(x, t, encoder_hidden_states=context).sample
        out.square().mean().backward()
        lora = {n: p.grad for n, p in unet.named_parameters() if "lora_" in n}
        assert lora and all(g is not None for g in lora.values())
        results.append((out, x.grad, lora))
    (out_a, x_a, lora_a), (out_b, x_b, lora_b) = results
    assert torch.equal(out_a, out_b)
    assert torch.equal(x_a, x_b)
    assert lora_a.keys() == lora_b.keys()
    assert all(torch.equal(lora_a[n], lora_b[n]) for n in lora_a)


def test_without_gradients_and_opted_out_it_is_the_stock_module(monkeypatch):
    stock = _geglu()
    recomputing = copy.deepcopy(stock)
    use_recomputing_geglu(recomputing)
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(stock(x), recomputing(x))
    monkeypatch.setenv(geglu_module.OPT_OUT, "stock")
    fresh = _geglu()
    assert use_recomputing_geglu(fresh) == 0
    assert "forward" not in vars(fresh)


def _feed_forward():
    from diffusers.models.attention import FeedForward
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    ff = FeedForward(24, activation_fn="geglu", inner_dim=40)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["net.2"])
    return inject_adapter_in_model(config, ff)


def _ff_run(ff, x, grad_out, wrap=None):
    xi = x.clone().requires_grad_(True)
    out = ff(xi) if wrap is None else wrap(ff, xi)
    out.backward(grad_out)
    grads = {n: p.grad for n, p in ff.named_parameters() if p.grad is not None}
    return out, xi.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_feed_forward_keeps_the_projection_instead_of_the_product(monkeypatch, dtype):
    """The output layer's saved input (its LoRA's) is the gated product: kept as the projection
    `_GatedGelu` keeps anyway and computed again in backward; every gradient is the same."""
    import weakref

    stock = _feed_forward().to(dtype)
    lever = copy.deepcopy(stock)
    use_recomputing_geglu(lever)
    assert "forward" in vars(lever)
    x = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad_out = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    products, recomputed = [], []
    real_apply, real_product = geglu_module._GatedGelu.apply, geglu_module._gated_product

    def apply(projected):
        out = real_apply(projected)
        products.append(weakref.ref(out))
        return out

    def product(projected):
        recomputed.append(1)
        return real_product(projected)

    monkeypatch.setattr(geglu_module._GatedGelu, "apply", apply)
    monkeypatch.setattr(geglu_module, "_gated_product", product)
    xi = x.clone().requires_grad_(True)
    out = lever(xi)
    (product_ref,) = products
    assert product_ref() is None  # the graph holds no reference to the product
    out.backward(grad_out)
    assert recomputed  # backward read the saved input through the recomputation
    a = _ff_run(stock, x, grad_out)
    b = (out, xi.grad, {n: p.grad for n, p in lever.named_parameters() if p.grad is not None})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_under_checkpointing_the_feed_forward_leaves_saving_to_it(monkeypatch):
    """Inside gradient checkpointing (its own saved-tensor hooks) the lever stands aside."""
    from torch.utils.checkpoint import checkpoint

    stock = _feed_forward()
    lever = copy.deepcopy(stock)
    use_recomputing_geglu(lever)
    called = []
    real = geglu_module._gated_product
    monkeypatch.setattr(geglu_module, "_gated_product", lambda p: called.append(1) or real(p))
    x = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(2))

    def wrap(ff, xi):
        return checkpoint(ff, xi, use_reentrant=False)

    a, b = _ff_run(stock, x, grad_out, wrap), _ff_run(lever, x, grad_out, wrap)
    assert not called
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_the_feed_forward_under_autocast_gives_the_same_bits():
    """fp32 weights, the forward under CPU bf16 autocast, backward outside it (as training)."""
    stock = _feed_forward()
    lever = copy.deepcopy(stock)
    use_recomputing_geglu(lever)
    x = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(2))

    def autocast(ff, xi):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ff(xi)

    a = _ff_run(stock, x, grad_out.to(torch.bfloat16), autocast)
    b = _ff_run(lever, x, grad_out.to(torch.bfloat16), autocast)
    assert a[0].dtype == torch.bfloat16
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2])
