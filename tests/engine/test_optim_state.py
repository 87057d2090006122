"""Optimizer state created before the first step equals the libraries' own lazy state."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sdtrain.engine.optim_state import prime_state, settle_state, state_snapshot


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),  # 4-d: Adafactor factors it over the last two axes
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 5),
        torch.nn.Linear(5, 2),
    )
    model[3].requires_grad_(False)  # frozen: never gets state
    return model


def _optimizers():
    from transformers.optimization import Adafactor

    plain = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    found = {}
    if importlib.util.find_spec("bitsandbytes") is not None:  # optional extra: sdtrain[bnb]
        import bitsandbytes as bnb

        small = {"min_8bit_size": 16}  # 8-bit state for the test's small weights too
        found = {
            "adamw8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-2, **small),
            "lion8bit": lambda p: bnb.optim.Lion8bit(p, lr=1e-2, **small),
            "adamw8bit_32bit_state": lambda p: bnb.optim.AdamW8bit(p, lr=1e-2),
        }
    return {
        **found,
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True, amsgrad=True),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adafactor": lambda p: Adafactor(p, lr=1e-2, **plain),
        "adafactor_beta1": lambda p: Adafactor(p, lr=1e-2, beta1=0.9, **plain),
        "adafactor_relative": lambda p: Adafactor(p, lr=None),
    }


def _train(make, prime: bool, steps: int = 3, settle: bool = False):
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make(params)
    if prime:
        assert prime_state(optimizer)
        assert len(optimizer.state) == len(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=generator)
        model(x).square().mean().backward()
        before = state_snapshot(optimizer)
        optimizer.step()
        if settle:
            settle_state(optimizer, before)
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("name", list(_optimizers()))
def test_primed_state_trains_bit_identically(name):
    make = _optimizers()[name]
    lazy_model, lazy = _train(make, prime=False)
    primed_model, primed = _train(make, prime=True)
    _same(lazy.state_dict(), primed.state_dict())
    for a, b in zip(lazy_model.parameters(), primed_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(_optimizers()))
def test_primed_state_is_the_first_step_state(name):
    """Before any step: the same keys, dtypes, shapes and devices the first step creates (the
    values are compared through training above: a step changes them)."""
    make = _optimizers()[name]
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    primed = make(params)
    prime_state(primed)
    lazy = make(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in params]
    # the lazy optimizer's init, without its update: run its step with nothing to change
    for group in lazy.param_groups:
        group["lr"] = 0.0 if group["lr"] is not None else None
        group["weight_decay"] = 0.0
    lazy.step()
    for p, value in zip(params, before, strict=True):
        p.data.copy_(value)
    for p in params:
        lazy_state, primed_state = lazy.state[p], primed.state[p]
        assert lazy_state.keys() == primed_state.keys()
        for key, value in primed_state.items():
            if key == "RMS":
                continue  # Adafactor's init writes 0; every step replaces it with a tensor
            if key.startswith("qmap"):  # bitsandbytes' quantisation maps (shared, not zero)
                assert torch.equal(value, lazy_state[key])
                continue
            other = lazy_state[key]
            assert type(value) is type(other)
            if isinstance(value, torch.Tensor):
                assert (value.dtype, value.shape, value.device) == (
                    other.dtype,
                    other.shape,
                    other.device,
                )
                assert not value.any()


def test_other_optimizers_stay_lazy():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert not prime_state(optimizer)
    assert len(optimizer.state) == 0


def test_primed_twice_keeps_state():
    model = _model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    prime_state(optimizer)
    first = {id(p): state["exp_avg"] for p, state in optimizer.state.items()}
    prime_state(optimizer)
    assert {id(p): state["exp_avg"] for p, state in optimizer.state.items()} == first


@pytest.mark.parametrize("name", list(_optimizers()))
def test_settled_state_trains_bit_identically_in_the_same_tensors(name):
    make = _optimizers()[name]
    lazy_model, lazy = _train(make, prime=False)
    model, optimizer = _train(make, prime=True, steps=1, settle=True)
    homes = {
        (id(p), key): id(value)
        for p, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    # two more steps on the same model and optimizer: the tensors stay the same objects
    generator = torch.Generator().manual_seed(1)
    torch.randn(4, 3, 6, 6, generator=generator)  # the first step's batch
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, generator=generator)
        model(x).square().mean().backward()
        before = state_snapshot(optimizer)
        optimizer.step()
        settle_state(optimizer, before)
        optimizer.zero_grad(set_to_none=True)
    now = {
        (id(p), key): id(value)
        for p, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    assert now == homes
    _same(lazy.state_dict(), optimizer.state_dict())
    for a, b in zip(lazy_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
