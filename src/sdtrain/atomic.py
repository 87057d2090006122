"""Atomic file writes: temp file beside the target, fsync, rename. No reader sees a torn file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed onto `target`.

    On any exception the temporary file is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
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
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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
