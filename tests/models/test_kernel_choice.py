"""A kernel choice by CPU capability, forced on or off by its variable."""

from __future__ import annotations

import torch

from sdtrain.models.kernel_choice import chosen

VARIABLE = "SDTRAIN_TEST_KERNEL_CHOICE"
FAST_ON = frozenset({"AVX2"})


def test_the_capability_decides_unless_the_variable_forces_it(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    assert chosen(VARIABLE, "stock", "path", FAST_ON, "AVX2")
    assert not chosen(VARIABLE, "stock", "path", FAST_ON, "AVX512")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert chosen(VARIABLE, "stock", "path", FAST_ON, None)  # this machine's by default
    monkeypatch.setenv(VARIABLE, " PATH ")
    assert chosen(VARIABLE, "stock", "path", FAST_ON, "AVX512")
    monkeypatch.setenv(VARIABLE, "stock")
    assert not chosen(VARIABLE, "stock", "path", FAST_ON, "AVX2")
    monkeypatch.setenv(VARIABLE, "anything else")  # neither value: the capability decides
    assert chosen(VARIABLE, "stock", "path", FAST_ON, "AVX2")
    assert not chosen(VARIABLE, "stock", "path", FAST_ON, "DEFAULT")


def test_frozen_fp32_is_float32_with_no_gradient_to_compute():
    from sdtrain.models.kernel_choice import frozen_fp32

    weight = torch.zeros(2, 2)
    assert frozen_fp32(None) and frozen_fp32(weight)
    assert not frozen_fp32(weight.to(torch.bfloat16))
    weight.requires_grad_(True)
    assert not frozen_fp32(weight)
    with torch.no_grad():  # gradients not recorded: nothing to compute
        assert frozen_fp32(weight)
