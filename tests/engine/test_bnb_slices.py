"""bitsandbytes' CPU 8-bit update slice by slice: the same weights and states, bit for bit."""

from __future__ import annotations

import pytest

from sdtrain.engine import bnb_slices


def _run(make, sliced: bool, steps: int = 3):
    """Weights and optimizer states after `steps` steps on fixed gradients."""
    import bitsandbytes.functional as functional
    import torch

    original = getattr(
        functional.optimizer_update_8bit_blockwise,
        "sdtrain_sliced",
        functional.optimizer_update_8bit_blockwise,
    )
    generator = torch.Generator().manual_seed(0)
    # 5013 values: 4 slices of 1024, one of 917, and a last block of 149 (not a whole 256)
    params = [
        torch.nn.Parameter(torch.randn(3, 1671, generator=generator)),
        torch.nn.Parameter(torch.randn(40, 8, 3, 3, generator=generator)),
    ]
    optimizer = make(params)
    functional.optimizer_update_8bit_blockwise = bnb_slices.sliced(original) if sliced else original
    calls = []
    inner = functional.optimizer_update_8bit_blockwise
    functional.optimizer_update_8bit_blockwise = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
    finally:
        functional.optimizer_update_8bit_blockwise = original
    assert len(calls) == steps * len(params)  # every weight took the 8-bit blockwise update
    states = [
        {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
        for p in params
    ]
    return [p.detach().clone() for p in params], states


OPTIMIZERS = {
    "AdamW8bit": {"lr": 1e-2, "weight_decay": 0.1, "min_8bit_size": 16},
    "Lion8bit": {"lr": 1e-3, "min_8bit_size": 16},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sliced_update_is_the_whole_update(name, monkeypatch):
    """Runs where the optional extra is installed (`sdtrain[bnb]`)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    def make(params):
        return getattr(bnb.optim, name)(params, **OPTIMIZERS[name])

    monkeypatch.setattr(bnb_slices, "SLICE_ELEMENTS", 1024)
    whole_params, whole_states = _run(make, sliced=False)
    part_params, part_states = _run(make, sliced=True)
    for a, b in zip(whole_params, part_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(whole_states, part_states, strict=True):
        assert a.keys() == b.keys() and {"state1", "absmax1"} <= a.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_slices_are_block_aligned_and_cover_the_weight(monkeypatch):
    """What the library's function receives: consecutive block-aligned views of the weight."""
    import torch

    monkeypatch.setattr(bnb_slices, "SLICE_ELEMENTS", 512)
    seen = []

    def original(
        optimizer_name,
        g,
        p,
        state1,
        state2,
        beta1,
        beta2,
        beta3,
        alpha,
        eps,
        step,
        lr,
        qmap1,
        qmap2,
        absmax1,
        absmax2,
        weight_decay=0.0,
        gnorm_scale=1.0,
        skip_zeros=False,
    ):  # the library's parameter names
        seen.append((p.data_ptr(), p.numel(), absmax1.data_ptr(), absmax1.numel(), state2 is None))

    p = torch.zeros(1300)
    absmax = torch.zeros(6)  # ceil(1300 / 256)
    args = ("adam", p.clone(), p, p.to(torch.uint8), None, 0.9, 0.99, 0.0, 0.0, 1e-8, 1, 1e-3)
    bnb_slices.sliced(original)(*args, None, None, absmax, None)
    item, block = p.element_size(), 256
    assert [(n, k) for _, n, _, k, _ in seen] == [(512, 2), (512, 2), (276, 2)]
    assert [ptr - p.data_ptr() for ptr, *_ in seen] == [0, 512 * item, 1024 * item]
    assert [ptr - absmax.data_ptr() for _, _, ptr, *_ in seen] == [
        0,
        512 // block * absmax.element_size(),
        1024 // block * absmax.element_size(),
    ]
    assert all(none for *_, none in seen)
