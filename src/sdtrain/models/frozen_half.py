"""What counts as a frozen half weight: one definition for the loader, the kernels and the engine.

An fp32 run may keep a float16/bf16 file's frozen weights half (models/load.py, `keep_half`);
engine/halfweights.py up-casts them per call, and models/conv_path.py hands them to its GEMM
kernel unchanged so that this up-cast happens there too.
"""

from __future__ import annotations

from typing import Any

import torch

HALF = (torch.float16, torch.bfloat16)


def is_frozen_half(value: Any) -> bool:
    """True for a float16/bf16 parameter that does not train."""
    return isinstance(value, torch.nn.Parameter) and value.dtype in HALF and not value.requires_grad
