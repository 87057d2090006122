"""bitsandbytes' 8-bit blockwise optimizer update on the CPU, one slice of a weight at a time.

Why: bitsandbytes' CPU kernel (`backends/cpu/ops.py`, 0.45+) dequantises both states of a weight
to float32, copies the gradient and builds more weight-sized temporaries before it quantises
back. For the text encoder's token embedding (38 M values) that is about 0.7 GiB at once: the
peak of a full-model 8-bit AdamW step (full SD1.5, 256 px: 10.09 GiB in use inside the step,
9.38 GiB before it).

Every operation of that update is elementwise or per quantisation block (256 values on the CPU),
and the step count, learning rate and gradient scale are numbers passed in. So the update of a
slice that starts on a block boundary is that part of the whole update: running it slice by
slice (SLICE_ELEMENTS values) gives the same bits (a test compares weights and states after
several steps) with temporaries the size of one slice.

Only CPU tensors that are contiguous, with one absmax per block of a block size this module can
recognise, are sliced; anything else (CUDA, AdEMAMix's two first moments, an unknown layout) goes
to the library's function as it is.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SLICE_ELEMENTS = 1 << 20  # values per slice: 4 MiB per float32 temporary; a multiple of any block
_BLOCK_SIZES = (256, 64, 128, 512, 1024, 2048, 4096)  # the CPU kernel's own first


def _block_size(numel: int, absmax: torch.Tensor) -> int | None:
    """The block size that gives `absmax` one value per block of `numel` values, if one does."""
    for size in _BLOCK_SIZES:
        if math.ceil(numel / size) == absmax.numel():
            return size
    return None


def _sliceable(tensors: list[torch.Tensor | None], absmax: list[torch.Tensor | None]) -> bool:
    present = [t for t in tensors if t is not None]
    return (
        all(t.device.type == "cpu" and t.is_contiguous() for t in present)
        and all(a is None or (a.dim() == 1 and a.is_contiguous()) for a in absmax)
        and len({t.numel() for t in present}) == 1
    )


_SLICED = ("g", "p", "state1", "state2")  # weight-shaped arguments
_PER_BLOCK = ("absmax1", "absmax2")  # one value per block


def sliced(original: Any) -> Any:
    """`bitsandbytes.functional.optimizer_update_8bit_blockwise`, slice by slice (module doc).

    Arguments are matched by name (g, p, state1, state2, absmax1, absmax2), so the wrapper
    follows the library's signature across versions."""
    import inspect

    signature = inspect.signature(original)

    def update(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        named = bound.arguments
        if not all(name in named for name in ("p", "absmax1")):
            return original(*args, **kwargs)
        numel = named["p"].numel()
        block = _block_size(numel, named["absmax1"])
        absmax2 = named.get("absmax2")
        whole = (
            numel <= SLICE_ELEMENTS
            or block is None
            or (absmax2 is not None and absmax2.numel() != named["absmax1"].numel())
            or not _sliceable(
                [named.get(name) for name in _SLICED], [named.get(name) for name in _PER_BLOCK]
            )
        )
        if whole:
            return original(*args, **kwargs)
        for start in range(0, numel, SLICE_ELEMENTS):
            count = min(SLICE_ELEMENTS, numel - start)
            first, blocks = start // block, math.ceil(count / block)
            part = signature.bind(*args, **kwargs)
            for name in _SLICED:
                if part.arguments.get(name) is not None:
                    part.arguments[name] = part.arguments[name].view(-1).narrow(0, start, count)
            for name in _PER_BLOCK:
                if part.arguments.get(name) is not None:
                    part.arguments[name] = part.arguments[name].narrow(0, first, blocks)
            original(*part.args, **part.kwargs)
        return None

    update.sdtrain_sliced = original  # type: ignore[attr-defined]
    return update


def install() -> None:
    """Route bitsandbytes' 8-bit blockwise update through `sliced` (once per process)."""
    import bitsandbytes.functional as functional

    current = functional.optimizer_update_8bit_blockwise
    if not hasattr(current, "sdtrain_sliced"):
        functional.optimizer_update_8bit_blockwise = sliced(current)
