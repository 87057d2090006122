"""The one place sdtrain reads `.pt`/`.ckpt`/`.bin` files: torch's weights-only loader, with our
own messages.

A file that needs anything beyond tensors and plain values is refused as it is; torch's own text
(which suggests `weights_only=False`, i.e. running the file's code) is never shown.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from sdtrain.errors import ModelLoadError

REFUSED = (
    "it holds pickled Python objects beyond tensors and plain values, which could run code "
    "when loaded; sdtrain refuses to load such files"
)
REFUSED_HINT = "use a .safetensors version of the file, or convert it with a tool you trust"


def refused(error: BaseException) -> bool:
    """True when torch's weights-only unpickler refused the file's content (a pickle asking for
    code), as opposed to a file that is not a readable pickle at all."""
    text = str(error)
    return (
        isinstance(error, pickle.UnpicklingError)
        and "Weights only load failed" in text
        and "Unsupported operand" not in text  # a byte stream that is no pickle at all
    )


def reason(error: BaseException) -> str:
    """A one-line reason for a failed weights-only load, free of torch's unsafe advice."""
    if refused(error):
        return REFUSED
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "weights_only" in text or "pickle" in text.lower():
        return "it is not a readable PyTorch file (damaged, or not a weights file)"
    return text


def load_weights_only(path: Path, what: str, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; ModelLoadError naming `what` and the
    file for a refused or damaged file."""
    import torch

    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip/EOF/OS errors of a damaged file
        if refused(error):
            raise ModelLoadError(
                f"cannot read {what} {path}: {REFUSED}", hint=REFUSED_HINT
            ) from None
        raise ModelLoadError(
            f"cannot read {what} {path}: it looks truncated or damaged ({reason(error)})",
            hint="check that the file is complete (copy or download it again)",
        ) from None
