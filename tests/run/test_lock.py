"""One run per output folder: a second run (or dry run) is refused with exit 2 naming the folder
and the holder's PID; the lock goes away with its process, even after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from train_runs import make_dataset, write_config

from sdtrain.errors import RunFolderBusy
from sdtrain.run.lock import LOCK_FILE, check_run_folder_free, hold_run_folder

HOLD = textwrap.dedent(
    """
    import sys, time
    from sdtrain.run.lock import hold_run_folder
    with hold_run_folder(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the holder, reap it and close its stdout pipe (no ResourceWarning later)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.stdout is not None
    proc.stdout.close()


def test_a_second_holder_in_the_same_process_is_refused(tmp_path):
    out = tmp_path / "out"
    with hold_run_folder(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(RunFolderBusy) as info, hold_run_folder(out):
            pass
        assert info.value.exit_code == 2
        assert str(out) in info.value.message and f"PID {os.getpid()}" in info.value.message
    assert not (out / LOCK_FILE).exists()  # a normal end leaves nothing behind
    with hold_run_folder(out):
        pass


def test_non_main_ranks_take_no_lock(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with hold_run_folder(out):
        monkeypatch.setenv("RANK", "1")
        check_run_folder_free(out)  # rank 1 of the same run: its main process holds the lock
        with hold_run_folder(out):
            pass


def test_sigkill_releases_the_lock(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        with pytest.raises(RunFolderBusy, match=f"PID {proc.pid}"), hold_run_folder(out):
            pass
    finally:
        _kill(proc)
    assert (out / LOCK_FILE).exists()  # the kill left the file, but not the lock
    with hold_run_folder(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_run_on_a_busy_folder_exits_2_and_names_folder_and_pid(cli, tmp_path, dry_run):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", make_dataset(tmp_path), out)
    proc = _holder(out)
    try:
        with pytest.raises(RunFolderBusy) as info:
            cli(["train", "lora", str(config), *(["--dry-run"] if dry_run else [])])
    finally:
        _kill(proc)
    assert info.value.exit_code == 2
    assert str(out) in info.value.message and f"PID {proc.pid}" in info.value.message
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing was written
