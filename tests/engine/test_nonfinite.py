"""Non-finite losses: a bad step is skipped (no update) and reported with its images; K bad steps
in a row stop the run with a TrainingError naming a state from before the first one, and resuming
from that state ends bit-identical to a run that never saw a bad loss."""

from __future__ import annotations

import math
import warnings

import pytest
from train_runs import (
    assert_same,
    assert_same_training,
    inject,
    lora_file,
    metrics,
    nan_at,
    train,
    write_config,
)

from sdtrain.engine.state import load_counters, verify_state
from sdtrain.errors import TrainingError

# calls (micro-batches) -> steps: epoch 1 = calls 0-4 -> steps 1 (0, 1), 2 (2, 3), 3 (4);
# epoch 2 = calls 5-9 -> steps 4 (5, 6), 5 (7, 8), 6 (9).


def test_a_nonfinite_step_is_skipped_and_reported(cli, tmp_path, monkeypatch, run_data):
    out = tmp_path / "out"
    saving = {"save_every_n_steps": 1, "save_state": False, "save_state_on_train_end": False}
    config = write_config(tmp_path / "run.toml", run_data, out, saving=saving)
    calls = inject(monkeypatch, nan_at([2]))  # first micro-batch of step 2 only
    result = train(cli, config)
    records = {r["step"]: r for r in metrics(out)}
    bad = records[2]
    assert bad["nonfinite"] is True and "loss" not in bad
    assert bad["images"] == calls[2] + calls[3]  # the whole accumulation window is named
    assert bad["epoch"] == 1 and "lr/unet" in bad
    good = [r for step, r in records.items() if step != 2]
    assert all("nonfinite" not in r and math.isfinite(r["loss"]) for r in good)
    assert "step 2: non-finite loss or gradient, update skipped" in " ".join(result.output.split())
    # the update was skipped: weights after step 2 are those after step 1; step 3 trains again
    after = {s: lora_file(out / f"t-step{s:08d}.safetensors")[0] for s in (1, 2, 3)}
    assert_same(after[1], after[2])
    assert any(not (after[2][k] == after[3][k]).all() for k in after[2])
    assert (out / "t.safetensors").exists()


# host_sync deferred (engine/host_sync.py) learns of step 5 during step 6's window, before its
# update: one forward and backward more, the same state and records
@pytest.mark.parametrize(("mode", "forwards"), [("every_step", 9), ("deferred", 10)])
def test_consecutive_nonfinite_steps_stop_with_a_state_to_resume(
    cli, tmp_path, monkeypatch, run_data, straight, mode, forwards
):
    out = tmp_path / "out"
    training = {"max_nonfinite_steps": 2, "host_sync": mode}
    config = write_config(tmp_path / "run.toml", run_data, out, training=training)
    # steps 4 and 5 go bad (one micro-batch each) -> stop after step 5
    calls = inject(monkeypatch, nan_at([5, 8]))
    with pytest.raises(TrainingError) as info:
        cli(["train", "lora", str(config)])
    assert len(calls) == forwards
    state = out / "t-step00000003-state"
    assert "2 consecutive steps had a non-finite loss" in info.value.message
    assert f"a state from before the first bad step is at {state}" in info.value.hint
    assert f"--resume {state}" in info.value.hint
    assert verify_state(state) is None
    counters = load_counters(state)
    assert (counters.global_step, counters.epoch, counters.position) == (3, 2, 0)
    assert counters.nonfinite_skipped == 0
    assert [(r["step"], r.get("nonfinite", False)) for r in metrics(out)] == [
        (1, False),
        (2, False),
        (3, False),
        (4, True),
        (5, True),
    ]
    # the periodic state of bad step 4 exists, but "auto" takes the newest write: the stop's
    monkeypatch.undo()
    train(cli, config, "--resume", "auto")
    assert_same_training(straight, out)


def test_the_same_image_in_every_bad_batch_is_named(cli, tmp_path, monkeypatch, run_data):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        out,
        training={"max_nonfinite_steps": 1, "gradient_accumulation_steps": 1},
        saving={"save_every_n_steps": None, "save_state_on_train_end": False},
    )
    inject(monkeypatch, lambda i, loss: loss * float("inf") if i == 0 else None)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TrainingError) as info:
        warnings.simplefilter("always")
        cli(["-v", "train", "lora", str(config)])  # -v: third-party warnings are not muted
    # the skipped first update advances the schedule on purpose: torch's order warning is not shown
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert "the same image is in every bad batch" in info.value.message
    assert str(run_data / "1_cat") in info.value.message
    counters = load_counters(out / "t-step00000000-state")
    assert (counters.global_step, counters.epoch, counters.position) == (0, 1, 0)
