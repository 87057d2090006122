"""SIGKILL at random points of a run that saves a LoRA and a state after every step, 20 times:
each time every file under a final name loads, `--resume auto` succeeds, and the end is
bit-identical to a straight run.

The runs are forked from this (already warmed-up) test process, so a trial costs a run's
training time, not an interpreter start; the kill delays are seeded, so failures reproduce. The
delays span the duration of a forked run of the same config, timed right before the trials: the
kind of run they kill, under the load the trials see. (Timed on the in-process run instead, one
CI run under the parallel suite put 19 of 20 kills before the first save.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from train_runs import (
    assert_no_unloadable_final_names,
    assert_same_training,
    train,
    write_config,
)

from sdtrain.engine.state import find_latest_state, load_state

TRIALS = 20
EVERY_STEP = {"max_train_steps": 3}
SAVES = {"save_every_n_steps": 1, "resume": "auto"}


def _fork_run(config) -> int:
    """Start `sdtrain train lora CONFIG` in a forked child (output discarded); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child is killed or exits without returning
        code = 1
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            from sdtrain.cli.main import app

            app(["train", "lora", str(config)], standalone_mode=False)
            code = 0
        finally:
            os._exit(code)
    return pid


def _forked_run_time(config) -> float:
    """Seconds a forked run of CONFIG takes to finish on its own (the kill delays' span)."""
    started = time.monotonic()
    _, status = os.waitpid(_fork_run(config), 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the timing run failed"
    return time.monotonic() - started


@pytest.fixture
def fast_dir(tmp_path):
    """A folder in memory where the system has one (/dev/shm): a state write fsyncs a dozen
    files, which on a busy disk costs far more than the tiny model's steps."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="sdtrain-kill-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_anywhere_then_auto_resume_is_exact(cli, tmp_path, fast_dir, run_data):
    straight_out = fast_dir / "straight"
    config = write_config(
        tmp_path / "straight.toml", run_data, straight_out, training=EVERY_STEP, saving=SAVES
    )
    train(cli, config)  # also warms up every import and cache the forked runs use
    timing = write_config(
        tmp_path / "timing.toml", run_data, fast_dir / "timing", training=EVERY_STEP, saving=SAVES
    )
    run_time = _forked_run_time(timing)
    out = fast_dir / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, training=EVERY_STEP, saving=SAVES)
    rng = random.Random(20)
    killed_with_state = 0
    for trial in range(TRIALS):
        shutil.rmtree(out, ignore_errors=True)
        pid = _fork_run(config)
        time.sleep(rng.uniform(0.02, run_time * 1.1))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status):
            assert os.WEXITSTATUS(status) == 0, f"trial {trial}: the run failed on its own"
        if out.exists():
            assert_no_unloadable_final_names(out)
            state = find_latest_state(out)
            if state is not None:
                load_state(state)  # loads, not just verifies
                killed_with_state += 1
        train(cli, config)  # resume = "auto" (or a fresh start when no state was complete)
        assert_same_training(straight_out, out)
    # the kills landed across the run, not all before the first save (// 5: the forked runs'
    # time varies under the parallel suite's load)
    assert killed_with_state >= TRIALS // 5
