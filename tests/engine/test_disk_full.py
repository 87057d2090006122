"""A full disk: the free-space check before each save and a write failing for lack of space both
stop the run with a DiskFullError (exit 1) naming the sizes, and every earlier file stays
intact; after freeing space, `--resume auto` ends exactly like a straight run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from train_runs import (
    assert_no_unloadable_final_names,
    assert_same_training,
    inject,
    train,
    write_config,
)

from sdtrain.engine.state import find_latest_state, verify_state
from sdtrain.errors import DiskFullError


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (needs root and mount permission; skipped where the test cannot make one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {proc.stderr.strip() or proc}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int):
    """An `inject` action that fills `disk` to `leave` free bytes during micro-step 4 (after the
    step-2 save)."""

    def action(index: int, loss):
        if index == 4:
            import shutil

            free = shutil.disk_usage(disk).free
            with open(disk / "ballast", "wb") as handle:
                handle.write(b"\0" * max(free - leave, 0))

    return action


def _intact(out: Path) -> None:
    assert_no_unloadable_final_names(out)
    assert verify_state(out / "t-step00000002-state") is None
    assert (out / "t-step00000002.safetensors").is_file()
    assert not (out / "t-step00000004.safetensors").exists()
    assert find_latest_state(out) == out / "t-step00000002-state"


def test_the_free_space_check_stops_before_a_save_and_resume_completes(
    cli, tmp_path, monkeypatch, run_data, straight, small_disk
):
    out = small_disk / "out"
    config = write_config(tmp_path / "run.toml", run_data, out)
    inject(monkeypatch, _fill(small_disk, 64 * 1024))
    with pytest.raises(DiskFullError) as info:
        cli(["train", "lora", str(config)])
    assert info.value.exit_code == 1
    message = info.value.message
    assert "save t-step00000004" in message and "needed" in message and "free" in message
    _intact(out)
    monkeypatch.undo()
    (small_disk / "ballast").unlink()
    train(cli, config, "--resume", "auto")
    assert_same_training(straight, out)


def test_a_write_that_hits_enospc_is_a_clear_error(
    cli, tmp_path, monkeypatch, run_data, small_disk
):
    from sdtrain.engine.saves import SavePolicy

    out = small_disk / "out"
    config = write_config(tmp_path / "run.toml", run_data, out)
    monkeypatch.setattr(SavePolicy, "ensure_space", lambda *a, **k: None)  # let the write fail
    inject(monkeypatch, _fill(small_disk, 16 * 1024))
    with pytest.raises(DiskFullError) as info:
        cli(["train", "lora", str(config)])
    assert info.value.exit_code == 1 and "disk is full" in info.value.message
    assert str(out) in info.value.message
    _intact(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".sdtrain.lock"]


@pytest.mark.parametrize(
    "text",
    [
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })',
        "[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 4021",
    ],
)
def test_writer_specific_no_space_errors_are_recognised(cli, tmp_path, monkeypatch, run_data, text):
    """Where no small file system can be made: the writers' own texts for a full disk."""
    import safetensors.torch

    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out)
    real = safetensors.torch.save_file
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if "step00000004" in str(filename) or "step00000004" in str(Path(filename).parent):
            raise RuntimeError(text)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(DiskFullError) as info:
        cli(["train", "lora", str(config)])
    assert info.value.exit_code == 1 and "disk is full" in info.value.message
    _intact(out)
