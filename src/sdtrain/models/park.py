"""Park a frozen module's weights in a file while training does not use them, and bring them
back for a save or samples.

Why: once every latent is cached, the VAE of a full-model run (DreamBooth, fine-tune) or of a
run that samples is used only at saves and sampling events. On SD1.5 it is 0.31 GiB of fp32
that would otherwise sit next to the weights, gradients and optimizer state through every step.

How: the tensors are written, byte for byte, to an anonymous temporary file in the run's output
folder (`tempfile.TemporaryFile`: the file has no name and disappears when the process ends,
even on SIGKILL), then replaced by empty tensors. `resident(module)` reads them back into place
for the length of a `with` block and empties them again after it. Reading back gives the same
bits (a test). Calling a parked module outside `resident` raises ParkedWeightsError (a bug, not a
silent zero output). If the file cannot be written (a full disk, say), the module stays in memory
and training goes on as before.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from sdtrain.models.release import ReleasedWeightsError

if TYPE_CHECKING:
    import torch

    from sdtrain.models.stream import Entry

log = logging.getLogger(__name__)


class ParkedWeightsError(ReleasedWeightsError):
    """A parked module was called outside `resident()`."""


class _Parking:
    """The file and tensor layout of one parked module."""

    def __init__(self, handle: IO[bytes], layout: list[tuple[torch.Tensor, Entry]]) -> None:
        self.handle = handle
        self.layout = layout
        self.depth = 0  # nested resident() blocks
        weakref.finalize(self, handle.close)  # closed (and gone) with its module

    def load(self) -> None:
        import torch

        from sdtrain.models.stream import read_into

        with torch.no_grad():
            for tensor, entry in self.layout:
                value = torch.empty(entry.shape, dtype=entry.dtype, device="cpu")
                read_into(self.handle, entry, value)
                # an empty tensor the engine moved or cast meanwhile keeps its new place
                tensor.data = value.to(device=tensor.device, dtype=tensor.dtype)

    def empty(self) -> None:
        import torch

        with torch.no_grad():
            for tensor, _ in self.layout:
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def _write(module: torch.nn.Module, folder: Path) -> _Parking:
    """Write every parameter and buffer of `module` to an anonymous file in `folder`."""
    import torch

    from sdtrain.models.stream import Entry

    handle = tempfile.TemporaryFile(dir=folder, prefix=".sdtrain-parked-")  # noqa: SIM115
    try:
        layout = []
        offset = 0
        for tensor in [*module.parameters(), *module.buffers()]:
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            nbytes = raw.numel()
            if nbytes:
                handle.write(memoryview(raw.numpy()))
            layout.append(
                (tensor, Entry(tensor.dtype, tuple(tensor.shape), offset, offset + nbytes))
            )
            offset += nbytes
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return _Parking(handle, layout)


def park_weights(module: torch.nn.Module, folder: Path, what: str) -> bool:
    """Move `module`'s weights to a temporary file in `folder`; False (kept) if it cannot."""
    if getattr(module, "sdtrain_parking", None) is not None:
        return True
    try:
        parking = _write(module, folder)
    except OSError as error:
        log.warning("could not park %s in %s (%s); it stays in memory", what, folder, error)
        return False
    parking.empty()
    module.sdtrain_parking = parking  # type: ignore[attr-defined]

    def check(*_args, **_kwargs) -> None:
        if parking.depth == 0:
            raise ParkedWeightsError(
                f"{what} was called while its weights were parked on disk; this is a bug"
            )

    module.register_forward_pre_hook(lambda _m, _a: check())
    for name in ("encode", "decode"):
        original = getattr(module, name, None)
        if original is not None:
            setattr(module, name, _checked(original, check))
    nbytes = sum(entry.end - entry.start for _, entry in parking.layout)
    log.info("parked %s (%.0f MiB) on disk until it is needed", what, nbytes / 2**20)
    return True


def _checked(method, check):
    def wrapper(*args, **kwargs):
        check()
        return method(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def resident(module: torch.nn.Module) -> Iterator[None]:
    """`module` with its weights in memory inside the block (a no-op unless it is parked)."""
    parking: _Parking | None = getattr(module, "sdtrain_parking", None)
    if parking is None:
        yield
        return
    if parking.depth == 0:
        parking.load()
    parking.depth += 1
    try:
        yield
    finally:
        parking.depth -= 1
        if parking.depth == 0:
            parking.empty()
