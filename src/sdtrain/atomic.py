"""Atomic file writes: temp file beside the target, fsync, rename. No reader sees a torn file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdtrain.errors import DiskFullError

# A full disk as each writer reports it: OSError errno, safetensors' Rust I/O error text, torch's
# zip writer ("unexpected pos").
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left", "Disk quota exceeded", "unexpected pos", "StorageFull")

# Test hook: seconds to sleep between writing and renaming (kill-during-save tests set it).
_SLOW_ENV = "SDTRAIN_TEST_SLOW_WRITE"


def _current_umask() -> int:
    """The process umask (read by setting and restoring it; os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def human_size(count: float) -> str:
    """`1.5 MiB`-style size."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


_FULL_HINT = (
    "free some space (or choose another output_dir), then run again with --resume auto; "
    "the files written before are intact"
)


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """DiskFullError before writing `what` when `folder`'s file system has less than `needed`."""
    free = free_bytes(folder)
    if free < needed:
        raise DiskFullError(
            f"not enough free space to write {what} in {folder}: about {human_size(needed)} "
            f"needed, {human_size(free)} free",
            hint=_FULL_HINT,
        )


def is_no_space(error: BaseException) -> bool:
    """True when `error` is a write failing for lack of space, whichever writer raised it."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
        return True
    return any(text in str(error) for text in _NO_SPACE_TEXT)


@contextlib.contextmanager
def no_space_as_error(target: Path) -> Iterator[None]:
    """Turn a write that fails for lack of space into a DiskFullError naming `target`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_no_space(error):
            raise
        raise DiskFullError(
            f"the disk is full: writing {target} failed for lack of space "
            f"({human_size(free_bytes(Path(target).parent))} free)",
            hint=_FULL_HINT,
        ) from None


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed onto `target`.

    On any exception the temporary file is removed and `target` is untouched; a lack of space
    becomes a DiskFullError.
    """
    target = Path(target)
    with no_space_as_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with no_space_as_error(target):
            yield tmp
            _finish(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _finish(tmp: Path, target: Path) -> None:
    """fsync, give the umask's mode, rename over `target`, fsync the folder."""
    # mkstemp creates 0600; the file gets what the umask gives a normal one (0644 for 022)
    os.chmod(tmp, 0o666 & ~_current_umask())
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    slow = os.environ.get(_SLOW_ENV)
    if slow:
        import time

        time.sleep(float(slow))
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def write_bytes(target: Path, data: bytes) -> None:
    """Atomically write `data` to `target`."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    """Atomically write UTF-8 `text` to `target`."""
    write_bytes(target, text.encode("utf-8"))


def save_safetensors(
    target: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a safetensors file (tensors are made contiguous first)."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_torch(target: Path, obj: Any) -> None:
    """Atomically torch.save a plain (weights-only loadable) object."""
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def is_temp_name(path: Path) -> bool:
    """True for leftovers of an interrupted atomic write (safe to delete)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")
