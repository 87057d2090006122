"""Crash safety: Ctrl-C writes a state and exits 130, a second Ctrl-C aborts cleanly, SIGKILL in
the middle of any save never leaves an unloadable file under a final name, and `resume = "auto"`
then continues from the newest complete state to a bit-identical end."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch
from train_runs import (
    assert_no_unloadable_final_names,
    assert_same_training,
    inject,
    read_log,
    start_cli,
    train,
    wait_until,
    write_config,
    writing,
)

from sdtrain.engine.state import (
    Counters,
    StateParts,
    find_latest_state,
    load_counters,
    save_state,
    tidy_output_dir,
    verify_state,
)
from sdtrain.errors import Interrupted


def parts(step: int) -> StateParts:
    return StateParts(
        counters=Counters(global_step=step, seed=7),
        trainable={"w": torch.full((2, 2), float(step))},
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": step},
        scaler=None,
        config={},
    )


def test_an_interrupted_state_replace_keeps_the_old_copy(tmp_path, monkeypatch):
    folder = save_state(tmp_path / "t-state", parts(1))
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(tuple("0123456789")) and ".tmp-" in str(src):
            raise KeyboardInterrupt  # a signal between moving the old copy aside and renaming
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_state(folder, parts(2))
    monkeypatch.undo()
    assert load_counters(folder).global_step == 1 and verify_state(folder) is None
    assert [p.name for p in tmp_path.iterdir()] == ["t-state"]


def test_tidy_puts_back_orphaned_states_and_clears_leftovers(tmp_path):
    replaced = save_state(tmp_path / "a-step00000002-state", parts(2))
    orphan = save_state(tmp_path / "a-step00000004-state", parts(4))
    orphan.rename(tmp_path / ".a-step00000004-state.old-12-34")  # killed between the renames
    shutil.copytree(replaced, tmp_path / ".a-step00000002-state.old-12-35")
    half = save_state(tmp_path / "a-step00000006-state", parts(6))
    (half / "manifest.json").unlink()
    half.rename(tmp_path / ".a-step00000006-state.tmp-12-36")
    shutil.copytree(replaced, tmp_path / ".a-step00000001-state.del-12-37")
    (tmp_path / ".a.safetensors.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / ".hidden-user-file").write_text("kept")
    tidy_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".hidden-user-file",
        "a-step00000002-state",
        "a-step00000004-state",
    ]
    assert load_counters(tmp_path / "a-step00000004-state").global_step == 4
    assert find_latest_state(tmp_path) == tmp_path / "a-step00000004-state"


def test_auto_resume_ignores_and_tidies_killed_writes(cli, tmp_path, run_data, straight):
    """What a kill during the step-6 save leaves (a hidden temp LoRA file, a half-written state
    folder, a torn metrics line) is skipped by "auto" and tidied; the end is bit-identical."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(straight / "t-step00000004-state", out / "t-step00000004-state")
    half = out / ".t-step00000006-state.tmp-999-1"
    shutil.copytree(straight / "t-step00000006-state", half)
    (half / "manifest.json").unlink()
    (out / ".t-step00000006.safetensors.abcd.tmp").write_bytes(b"\0" * 10)
    lines = (straight / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:6]) + lines[6][:20])
    config = write_config(tmp_path / "run.toml", run_data, out, saving={"resume": "auto"})
    train(cli, config)
    assert_same_training(straight, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_sigterm_stops_like_ctrl_c_and_a_second_signal_aborts(cli, tmp_path, monkeypatch, run_data):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out)
    handler = signal.getsignal(signal.SIGTERM)

    def terminate(times: int):
        def action(index: int, loss):
            if index == 2:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)

        return action

    inject(monkeypatch, terminate(1))
    with pytest.raises(Interrupted) as info:
        cli(["train", "lora", str(config)])
    assert info.value.exit_code == 130
    assert info.value.message.startswith("SIGTERM: stopped after step 2; state written to")
    assert load_counters(out / "t-step00000002-state").global_step == 2

    shutil.rmtree(out)
    monkeypatch.undo()
    inject(monkeypatch, terminate(2))
    with pytest.raises(Interrupted) as info:
        cli(["train", "lora", str(config)])
    assert info.value.exit_code == 130
    assert info.value.message.startswith("second SIGTERM: aborted at once")
    assert "--resume auto" in info.value.hint
    assert find_latest_state(out) is None  # the abort came before any state
    assert signal.getsignal(signal.SIGTERM) is handler  # put back after the run


@pytest.mark.slow
def test_sigint_to_the_process_group_exits_130_with_a_resumable_state(
    cli, tmp_path, run_data, straight
):
    """Ctrl-C as a terminal sends it: to the whole group, data-loader workers included."""
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml", run_data, out, training={"max_data_loader_n_workers": 2}
    )
    proc = start_cli(config, tmp_path / "log.txt", slow_write=0.2)
    metrics = out / "metrics.jsonl"
    wait_until(proc, lambda: metrics.exists() and metrics.stat().st_size > 0)  # after step 1
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    log = read_log(tmp_path / "log.txt")
    assert log.count("SIGINT received") == 1  # the workers leave it to the main process
    state = find_latest_state(out)
    assert state is not None and load_counters(state).global_step < 7
    assert f"state written to {state}" in log
    assert f"resume with: sdtrain train lora {config} --resume {state}" in log
    assert_no_unloadable_final_names(out)
    train(cli, config, "--resume", str(state))
    assert_same_training(straight, out)


@pytest.mark.slow
def test_a_second_sigint_aborts_at_once_and_leaves_no_damage(cli, tmp_path, run_data, straight):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out)
    proc = start_cli(config, tmp_path / "log.txt", slow_write=0.3)
    wait_until(proc, writing(out, ".t-step00000004-state.tmp-*/.optimizer.safetensors.*.tmp"))
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    log = read_log(tmp_path / "log.txt")
    assert "second SIGINT: aborted at once" in log and "--resume auto" in log
    assert_no_unloadable_final_names(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the abort cleaned up
    assert find_latest_state(out) == out / "t-step00000002-state"
    train(cli, config, "--resume", "auto")
    assert_same_training(straight, out)


@pytest.mark.slow
def test_sigkill_during_saves_then_auto_resume(cli, tmp_path, run_data, straight):
    """Killed while writing a LoRA file, a state file and a state manifest, in turn; each time
    "auto" continues from the newest complete state."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, saving={"resume": "auto"})
    kill_points = [
        # (what is being written when the kill lands, the state "auto" must pick next)
        (".t-step00000004.safetensors.*.tmp", "t-step00000002-state"),
        (".t-step00000006-state.tmp-*/.optimizer.safetensors.*.tmp", "t-step00000004-state"),
        (".t-state.tmp-*/.manifest.json.*.tmp", "t-step00000006-state"),
    ]
    for n, (pattern, expected) in enumerate(kill_points):
        proc = start_cli(config, tmp_path / f"log{n}.txt", slow_write=0.25)
        wait_until(proc, writing(out, pattern))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert_no_unloadable_final_names(out)
        assert any(p.name.startswith(".") for p in out.iterdir())  # the kill left temp files
        assert find_latest_state(out) == out / expected
    train(cli, config)
    assert_same_training(straight, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
