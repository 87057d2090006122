"""Exact resume through the real CLI: interrupted twice or resumed from saved states, a run ends
bit-identical to an uninterrupted one (weights, optimizer, scheduler, metrics log); names and
ss_* counters carry on; config changes are named; retention spares the state being resumed."""

from __future__ import annotations

import shutil

import pytest
from train_runs import (
    STEPS,
    assert_same,
    assert_same_training,
    inject,
    interrupt_at,
    lora_file,
    metrics,
    saved_counts,
    state_contents,
    train,
    write_config,
)

from sdtrain.engine.state import load_counters
from sdtrain.errors import Interrupted, TrainingError

# Micro-step (call) numbers with batch 1 and accumulation 2 over 5 batches per epoch: epoch 1 is
# calls 0-4 -> steps 1 (0, 1), 2 (2, 3), 3 (4); epoch 2 is calls 5-9 -> steps 4, 5, 6; ...


def test_interrupted_twice_mid_accumulation_resumes_bit_identically(
    cli, tmp_path, monkeypatch, run_data, straight
):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, saving={"resume": "auto"})

    # 1st run: Ctrl-C during the first micro-batch of step 2 -> step 2 finishes, state at step 2
    inject(monkeypatch, interrupt_at(2))
    with pytest.raises(Interrupted) as info:
        cli(["train", "lora", str(config)])
    assert info.value.exit_code == 130
    first = out / "t-step00000002-state"
    assert str(first) in info.value.message
    assert info.value.hint == f"resume with: sdtrain train lora {config} --resume {first}"
    counters = load_counters(first)
    assert (counters.global_step, counters.epoch, counters.position) == (2, 1, 4)  # mid-epoch
    assert [r["step"] for r in metrics(out)] == [1, 2]

    # 2nd run (resume = "auto"): Ctrl-C in the first micro-batch of step 5 (epoch 2)
    monkeypatch.undo()
    calls = inject(monkeypatch, interrupt_at(3))
    with pytest.raises(Interrupted):
        cli(["train", "lora", str(config)])
    assert len(calls) == 5  # epoch 1's last batch (step 3), then epoch 2 batches 0-3
    second = out / "t-step00000005-state"
    counters = load_counters(second)
    assert (counters.global_step, counters.epoch, counters.position) == (5, 2, 4)

    # 3rd run: to the end
    monkeypatch.undo()
    train(cli, config)
    assert_same_training(straight, out)
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    assert_same(state_contents(straight / "t-step00000002-state"), state_contents(first))
    # step saves written after a resume carry the true global step in name and metadata
    for name in ("t-step00000004.safetensors", "t-step00000006.safetensors"):
        assert_same(lora_file(straight / name)[0], lora_file(out / name)[0], name)
        assert saved_counts(out / name) == saved_counts(straight / name)
    # ss_epoch = completed epochs (reference): step 4 and step 6 lie in epoch 2, the end in 3
    assert saved_counts(out / "t-step00000004.safetensors") == ("4", "1")
    assert saved_counts(out / "t-step00000006.safetensors") == ("6", "1")
    assert saved_counts(out / "t.safetensors") == (str(STEPS), "3")


def test_resume_from_a_periodic_state_into_a_new_folder(cli, tmp_path, run_data, straight):
    state = straight / "t-step00000004-state"  # epoch 2, batch 2: mid-epoch
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, saving={"resume": str(state)})
    train(cli, config)
    assert_same(state_contents(straight / "t-state"), state_contents(out / "t-state"))
    assert_same(lora_file(straight / "t.safetensors")[0], lora_file(out / "t.safetensors")[0])
    assert metrics(out) == [r for r in metrics(straight) if r["step"] > 4]
    assert sorted(p.name for p in out.glob("t-step*")) == [
        "t-step00000006-state",
        "t-step00000006.safetensors",
    ]
    assert saved_counts(out / "t-step00000006.safetensors") == ("6", "1")
    assert load_counters(state).global_step == 4  # the resumed state is left as it was


def test_epoch_states_resume_at_the_epoch_boundary(cli, tmp_path, run_data):
    epochs = {"max_train_epochs": 2}
    saving = {"save_every_n_steps": None, "save_every_n_epochs": 1}
    ref = tmp_path / "ref"
    train(cli, write_config(tmp_path / "ref.toml", run_data, ref, training=epochs, saving=saving))
    state = ref / "t-000001-state"
    counters = load_counters(state)
    assert (counters.global_step, counters.epoch, counters.position) == (3, 2, 0)
    assert saved_counts(ref / "t-000001.safetensors") == ("3", "1")
    assert saved_counts(ref / "t.safetensors") == ("6", "2")

    out = tmp_path / "out"
    shutil.copytree(state, out / state.name)
    shutil.copy(ref / "metrics.jsonl", out / "metrics.jsonl")
    resumed = {**saving, "resume": "auto"}
    train(cli, write_config(tmp_path / "run.toml", run_data, out, training=epochs, saving=resumed))
    assert_same_training(ref, out)
    assert not (out / "t-000001.safetensors").exists()  # epoch 1 was not redone
    assert saved_counts(out / "t.safetensors") == ("6", "2")


def test_breaking_config_changes_are_named_and_need_allowing(cli, tmp_path, run_data, straight):
    state = str(straight / "t-step00000004-state")
    out = tmp_path / "out"

    def resume(name: str, *flags: str, **tables):
        saving = {"resume": state, **tables.pop("saving", {})}
        config = write_config(tmp_path / f"{name}.toml", run_data, out, saving=saving, **tables)
        return cli(["train", "lora", str(config), *flags])

    with pytest.raises(TrainingError) as info:
        resume("seed", training={"seed": 8})
    assert "training.seed: 7 -> 8" in info.value.message
    assert info.value.hint.endswith("--resume_allow_changes training.seed")
    with pytest.raises(TrainingError) as info:
        resume("batch", training={"train_batch_size": 2})
    assert "training.train_batch_size: 1 -> 2" in info.value.message
    other = tmp_path / "other-data"
    shutil.copytree(run_data, other)
    with pytest.raises(TrainingError) as info:
        resume("data", dataset={"train_data_dir": str(other)})
    assert "dataset.train_data_dir" in info.value.message
    with pytest.raises(TrainingError) as info:
        resume("two", training={"seed": 8, "train_batch_size": 2})
    assert "training.seed" in info.value.message and "training.train_batch_size" in info.value.hint
    assert not out.exists()  # refused before anything was written

    # harmless changes (save cadence, logging, sampling) pass, are logged, keep exactness
    harmless = {"save_every_n_steps": 3, "save_state_on_train_end": True}
    result = resume("cadence", saving=harmless)
    assert result.exit_code == 0
    assert "saving.save_every_n_steps changed from 2 to 3" in result.output
    assert_same(state_contents(straight / "t-state"), state_contents(out / "t-state"))
    assert sorted(p.name for p in out.glob("t-step*")) == [
        "t-step00000006-state",
        "t-step00000006.safetensors",
    ]

    # an allowed breaking change trains on (and no longer matches)
    shutil.rmtree(out)
    allowed = resume("allowed", "--resume_allow_changes", "training.seed", training={"seed": 8})
    assert allowed.exit_code == 0
    assert [r["step"] for r in metrics(out)] == [5, 6, 7]


def test_retention_spans_resumes_and_retires_the_resumed_state(
    cli, tmp_path, monkeypatch, run_data
):
    """Epoch saves every epoch, keep the last 2 models and 1 state (reference windows)."""
    training = {"max_train_epochs": 4}  # 12 steps, 3 per epoch
    saving = {
        "save_every_n_steps": None,
        "save_every_n_epochs": 1,
        "save_last_n_epochs": 2,
        "save_last_n_epochs_state": 1,
    }
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, training=training, saving=saving)
    inject(monkeypatch, interrupt_at(5))  # epoch 2's first batch -> state at step 4
    with pytest.raises(Interrupted):
        cli(["train", "lora", str(config)])
    assert {p.name for p in out.glob("t-*")} == {
        "t-000001.safetensors",
        "t-000001-state",
        "t-step00000004-state",
    }
    monkeypatch.undo()
    # resume from the older epoch-1 state: its window deletes it after epoch 2 like any other
    # (issue 15: the states a run resumed from were never pruned); newer states exist by then
    train(cli, config, "--resume", str(out / "t-000001-state"))
    assert {p.name for p in out.glob("t*")} == {
        "t-000002.safetensors",  # epoch 1's model (written by the first process) fell out
        "t-000003.safetensors",
        "t-000003-state",  # epoch 1's (resumed) and epoch 2's states fell out of the window
        "t-step00000004-state",  # the interrupt's state is not part of the epoch window
        "t.safetensors",
        "t-state",
    }
    ref = tmp_path / "ref"
    train(cli, write_config(tmp_path / "ref.toml", run_data, ref, training=training, saving=saving))
    assert {p.name for p in ref.glob("t*")} == {
        "t-000002.safetensors",
        "t-000003.safetensors",
        "t-000003-state",
        "t.safetensors",
        "t-state",
    }
    assert_same_training(ref, out)


def test_step_retention_after_resume(cli, tmp_path, monkeypatch, run_data):
    """Step saves every step, keep 2 steps of models and 1 of states (r = s - keep - 1)."""
    saving = {"save_every_n_steps": 1, "save_last_n_steps": 2, "save_last_n_steps_state": 1}
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, saving=saving)
    inject(monkeypatch, interrupt_at(4))  # step 3 -> state at step 3 (end of epoch 1)
    with pytest.raises(Interrupted):
        cli(["train", "lora", str(config)])
    assert {p.name for p in out.glob("t-*")} == {
        "t-step00000001.safetensors",
        "t-step00000002.safetensors",
        "t-step00000003.safetensors",
        "t-step00000002-state",
        "t-step00000003-state",
    }
    monkeypatch.undo()
    train(cli, config, "--resume", "auto")
    assert {p.name for p in out.glob("t*")} == {
        "t-step00000004.safetensors",
        "t-step00000005.safetensors",
        "t-step00000006.safetensors",
        "t-step00000005-state",  # the resumed step-3 state fell out of the window at 5
        "t-step00000006-state",
        "t.safetensors",
        "t-state",
    }


def test_changed_images_or_captions_are_caught(cli, tmp_path, monkeypatch, run_data):
    """No config key changes when the folder's contents do: the state's [data] table does."""
    data = tmp_path / "data"
    shutil.copytree(run_data, data)
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", data, out, saving={"resume": "auto"})
    inject(monkeypatch, interrupt_at(2))
    with pytest.raises(Interrupted):
        cli(["train", "lora", str(config)])
    monkeypatch.undo()

    caption = data / "1_cat" / "img0.caption"
    caption.write_text("dog, green")
    with pytest.raises(TrainingError) as info:
        cli(["train", "lora", str(config)])
    assert "data.digest" in info.value.message and "data.images" not in info.value.message
    assert info.value.hint.endswith("--resume_allow_changes data.digest")

    shutil.copy(data / "1_cat" / "img1.png", data / "1_cat" / "img5.png")
    with pytest.raises(TrainingError) as info:
        cli(["train", "lora", str(config)])
    assert "data.images: 5 -> 6" in info.value.message
    assert "data.batches_per_epoch: 5 -> 6" in info.value.message
    (data / "1_cat" / "img5.png").unlink()

    train(cli, config, "--resume_allow_changes", "data.digest")
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))


def test_schedule_free_resume_is_exact(cli, tmp_path, run_data):
    """Saves switch a schedule-free optimizer to its eval weights and back, which is not a
    bit-exact round trip: the state must hold the weights the run goes on with."""
    pytest.importorskip("schedulefree")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flag = ("--optimizer_type", "AdamWScheduleFree")
    train(cli, write_config(tmp_path / "a.toml", run_data, straight), *flag)
    state = straight / "t-step00000004-state"
    config = write_config(tmp_path / "b.toml", run_data, resumed, saving={"resume": str(state)})
    train(cli, config, *flag)
    assert_same(lora_file(straight / "t.safetensors")[0], lora_file(resumed / "t.safetensors")[0])
    assert_same(state_contents(straight / "t-state"), state_contents(resumed / "t-state"))
