"""What the training's CPU kernel choices share: which CPUs take one by default (with an
environment variable to force it), and which tensors count as frozen fp32 ones.

A CPU kernel choice measured faster on some CPUs only (models/linear_path.py,
models/conv_path.py) is on where torch's CPU capability
(`torch.backends.cpu.get_cpu_capability()`: "AVX2", "AVX512", "DEFAULT", ...) is one it was
measured faster on; its variable turns it off (`off` value) or on for any CPU (`on` value), for
A/B runs and for the tests, which check the chosen kernels on every machine.
"""

from __future__ import annotations

import os

import torch


def chosen(
    variable: str, off: str, on: str, capabilities: frozenset[str], capability: str | None
) -> bool:
    """Whether the choice applies: `variable` set to `off` never, to `on` always, otherwise where
    `capability` (default: this machine's) is in `capabilities`."""
    value = os.environ.get(variable, "").strip().lower()
    if value in (off, on):
        return value == on
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    return capability in capabilities


def frozen_fp32(tensor: torch.Tensor | None) -> bool:
    """None, or float32 without a gradient to compute (frozen, or gradients not recorded)."""
    return tensor is None or (
        tensor.dtype == torch.float32 and not (tensor.requires_grad and torch.is_grad_enabled())
    )
