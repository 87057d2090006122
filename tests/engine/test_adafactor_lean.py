"""The fused backward pass's Adafactor update: the library's numbers without its temporaries."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.optimization import Adafactor

from sdtrain.engine import adafactor_lean
from sdtrain.engine.adafactor_lean import lean_adafactor_step
from sdtrain.engine.optim_state import prime_state

SETTINGS = [
    {},  # the library's defaults: relative step, parameter scaling
    {
        "lr": 1e-3,
        "relative_step": False,
        "scale_parameter": False,
        "warmup_init": False,
        "weight_decay": 0.01,
        "clip_threshold": 0.5,
    },
    {"lr": None, "relative_step": True, "warmup_init": True},
]
# 4-D kernels (3x3, 1x1), an odd 3-D shape, dense and small 2-D weights
SHAPES = [(64, 48, 3, 3), (40, 30, 1, 1), (3, 5, 200, 7), (300, 37), (77, 96)]


def _pair(shape: tuple[int, ...], settings: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(shape, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = Adafactor([a], **settings), Adafactor([b], **settings)
    prime_state(opt_a)
    prime_state(opt_b)
    return a, b, opt_a, opt_b, g


def _same(a, b, opt_a, opt_b) -> bool:
    if not torch.equal(a.view(torch.int32), b.view(torch.int32)):
        return False
    sa, sb = opt_a.state[a], opt_b.state[b]
    return sa["step"] == sb["step"] and all(
        torch.equal(sa[k], sb[k]) for k in ("exp_avg_sq_row", "exp_avg_sq_col", "RMS")
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [1 << 20, 997])
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_identical_to_the_library_step(monkeypatch, shape, settings, chunk, threads):
    """Parameters and state equal bit for bit over steps, sliced (chunk 997, odd slices) or not."""
    monkeypatch.setattr(adafactor_lean, "CHUNK_ELEMENTS", chunk)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b, opt_a, opt_b, g = _pair(shape, settings)
        for step in range(3):
            grad = torch.randn(shape, generator=g) * 10.0 ** (step - 1)
            a.grad, b.grad = grad.clone(), grad.clone()
            opt_a.step()
            assert lean_adafactor_step(opt_b, b, opt_b.param_groups[0])
            assert _same(a, b, opt_a, opt_b), f"step {step}"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [[0, 5, 4095], [7], []])
def test_sparse_rows_gradient_squared_in_place_is_exact(monkeypatch, rows):
    """A token-embedding-like gradient (few rows set; one with -0.0 entries) takes the in-place
    path and still equals the library, including the signs of zeros."""
    monkeypatch.setattr(adafactor_lean, "CHUNK_ELEMENTS", 5000)
    shape = (4096, 24)
    a, b, opt_a, opt_b, g = _pair(shape, {})
    for step in range(3):
        grad = torch.zeros(shape)
        if rows:
            grad[rows] = torch.randn(len(rows), shape[1], generator=g)
            grad[rows[0], :5] = -0.0
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        assert lean_adafactor_step(opt_b, b, opt_b.param_groups[0])
        assert _same(a, b, opt_a, opt_b), f"step {step}"


class _LargestNewTensor(TorchDispatchMode):
    """The element count of the largest tensor any op allocates (views and in-place results,
    which share an input's storage, are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    ("shape", "largest_share"),
    [((256, 128, 3, 3), 1 / 3), ((8192, 32), 1 / 32)],  # 3x3 kernel; embedding, 9 rows set
)
def test_no_gradient_sized_temporary(monkeypatch, shape, largest_share):
    """The library's step allocates tensors the size of the weight; this path allocates at most
    one moment-sized one (a third of a 3x3 kernel, a row of an embedding) besides slices."""
    monkeypatch.setattr(adafactor_lean, "CHUNK_ELEMENTS", 4096)
    a, b, opt_a, opt_b, g = _pair(shape, {})
    grad = torch.randn(shape, generator=g)
    if len(shape) == 2:
        grad[9:] = 0.0
    a.grad, b.grad = grad.clone(), grad.clone()
    with _LargestNewTensor() as library:
        opt_a.step()
    with _LargestNewTensor() as lean:
        assert lean_adafactor_step(opt_b, b, opt_b.param_groups[0])
    numel = grad.numel()
    assert library.largest >= numel
    assert lean.largest <= max(4096, int(numel * largest_share) + 1)
    assert _same(a, b, opt_a, opt_b)


def test_left_to_the_library_where_not_covered():
    """A first moment (beta1), an unfactored 1-D weight, half precision and other optimizers
    return False and change nothing."""
    p = torch.nn.Parameter(torch.randn(16, 16))
    p.grad = torch.randn(16, 16)
    with_beta1 = Adafactor([p], beta1=0.9)
    prime_state(with_beta1)
    assert not lean_adafactor_step(with_beta1, p, with_beta1.param_groups[0])
    bias = torch.nn.Parameter(torch.randn(16))
    bias.grad = torch.randn(16)
    opt = Adafactor([bias])
    prime_state(opt)
    assert not lean_adafactor_step(opt, bias, opt.param_groups[0])
    half = torch.nn.Parameter(torch.randn(16, 16, dtype=torch.bfloat16))
    half.grad = torch.randn(16, 16, dtype=torch.bfloat16)
    opt = Adafactor([half])
    prime_state(opt)
    assert not lean_adafactor_step(opt, half, opt.param_groups[0])
    adamw = torch.optim.AdamW([p])
    kept = p.detach().clone()
    assert not lean_adafactor_step(adamw, p, adamw.param_groups[0])
    assert torch.equal(p, kept)
