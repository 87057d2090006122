"""One run per output folder: an exclusive OS file lock held for the whole run.

`fcntl.flock` on `<output_dir>/.sdtrain.lock`, taken by the main process only (in a multi-process
run the other ranks write nothing). The kernel drops the lock when the process ends in any way,
SIGKILL included, so a stale lock file never blocks the next run; a second run on the same folder
is refused (exit 2) with the folder and the PID that holds it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sdtrain.errors import RunFolderBusy

LOCK_FILE = ".sdtrain.lock"


def is_main_process() -> bool:
    """True unless a launcher (accelerate, torchrun) started this as a non-zero rank."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text(encoding="ascii").split()[0])
        return f"PID {pid}"
    return "an unknown process"


def _busy(output_dir: Path, path: Path) -> RunFolderBusy:
    return RunFolderBusy(
        f"output folder {output_dir} is in use by another sdtrain run ({_holder(path)}); "
        "two runs in one folder would overwrite each other's files and states",
        hint="wait for that run to finish, stop it, or give this run another --output_dir",
    )


def check_run_folder_free(output_dir: Path) -> None:
    """Raise RunFolderBusy if a live run holds `output_dir` (creates nothing). Other ranks of a
    multi-process run skip it: their own main process holds the lock."""
    if not is_main_process():
        return
    import fcntl

    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(output_dir), path) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_run_folder(output_dir: Path) -> Iterator[None]:
    """Create `output_dir` if needed and hold its lock for the `with` block (main process only).

    The lock file records the holder's PID and is removed when the block ends normally or by an
    exception; after a kill it stays behind unlocked and the next run takes it over.
    """
    output_dir = Path(output_dir)
    if not is_main_process():
        yield
        return
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(output_dir, path) from None
        # the holder before us may have unlinked the file while we waited to open it: the lock
        # only counts on the inode that is still at `path`
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked, so no one can lock the old inode in between
        os.close(fd)
