"""Frozen weights stored in half precision, computed in fp32: up-cast per layer, per call.

A float16 (or bf16) model file trained in fp32 normally becomes an fp32 copy at load: twice the
memory for the frozen base (SD1.5 UNet + text encoder: 3.7 GiB instead of 1.8). Inside
`upcast_half_weights()` the frozen half weights stay as they are and every layer that meets
one (linear, convolution, group/layer norm, embedding) with an fp32 input computes with
`weight.float()`, made for that call only. Up-casting float16/bf16 to fp32 is exact, and the
kernels see the same fp32 values as with weights up-cast at load, so results are bit-identical.

Autograd would keep each up-cast alive until backward (linear and convolution save their
weight), which would bring the fp32 copy back at the memory peak; a saved-tensor hook stores the
half tensor instead and up-casts it again when backward needs it.
The U-Net's GEMM-routed convolutions (models/conv_path.py, `thnn_conv2d`) are weighted ops
too, so they keep their kernel with half weights.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from sdtrain.models.frozen_half import is_frozen_half

_WEIGHTED = {
    torch.nn.functional.linear,
    torch.nn.functional.conv1d,
    torch.nn.functional.conv2d,
    torch.nn.functional.conv_transpose2d,
    torch.nn.functional.group_norm,
    torch.nn.functional.layer_norm,
    torch.conv2d,
    torch._C._nn.thnn_conv2d,  # models/conv_path.py's GEMM convolutions
    torch.group_norm,
    torch.layer_norm,
}
_EMBEDDING = {torch.nn.functional.embedding, torch.embedding}


class _UpcastMode(TorchFunctionMode):
    """Up-casts frozen half parameters in weighted ops whose other inputs are fp32."""

    def __init__(self) -> None:
        super().__init__()
        # storage address of a live up-cast -> its half source (entries die with the up-cast)
        self.sources: dict[int, torch.Tensor] = {}

    def _upcast(self, weight: torch.Tensor) -> torch.Tensor:
        up = weight.detach().float()
        key = up.untyped_storage().data_ptr()
        self.sources[key] = weight
        weakref.finalize(up, self.sources.pop, key, None)
        return up

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WEIGHTED:
            values = list(args) + list(kwargs.values())
            if any(is_frozen_half(v) for v in values) and any(
                isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in values
            ):
                args = tuple(self._upcast(a) if is_frozen_half(a) else a for a in args)
                kwargs = {k: self._upcast(v) if is_frozen_half(v) else v for k, v in kwargs.items()}
        elif func in _EMBEDDING:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if is_frozen_half(weight):
                return func(*args, **kwargs).float()  # gather then cast == cast then gather
        return func(*args, **kwargs)

    def pack(self, tensor: torch.Tensor) -> Any:
        source = self.sources.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if source is None:
            return tensor
        return (source, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        source, shape, stride, offset = packed
        return source.detach().float().as_strided(shape, stride, offset)


@contextlib.contextmanager
def upcast_half_weights(enabled: bool = True) -> Iterator[None]:
    """Compute with frozen half weights in fp32 inside the block (forward; backward later)."""
    if not enabled:
        yield
        return
    mode = _UpcastMode()
    with torch.autograd.graph.saved_tensors_hooks(mode.pack, mode.unpack), mode:
        yield


def has_frozen_half(modules: list[torch.nn.Module]) -> bool:
    """True when any frozen parameter of `modules` is float16 / bf16."""
    return any(is_frozen_half(p) for m in modules for p in m.parameters())
