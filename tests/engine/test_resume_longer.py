"""Resume conveniences: `--resume OUTPUT_DIR` finds the newest state (or lists what exists), and
raising max_train_steps continues a finished run with the LR schedule recomputed."""

from __future__ import annotations

import shutil

import pytest
from train_runs import STEPS, metrics, write_config

from sdtrain.engine.state import load_counters
from sdtrain.errors import TrainingError


def test_raising_max_train_steps_continues_a_finished_run(cli, tmp_path, run_data, straight):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    config = write_config(
        tmp_path / "run.toml", run_data, out, training={"max_train_steps": STEPS + 2}
    )
    result = cli(["train", "lora", str(config), "--resume", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps log lines
    assert "max_train_steps raised from 7 to 9" in said
    assert "LR schedule was recomputed" in said
    assert "continuing from its newest state t-state" in said
    assert [r["step"] for r in metrics(out)][-2:] == [STEPS + 1, STEPS + 2]
    assert load_counters(out / "t-state").global_step == STEPS + 2


def test_shorter_run_is_still_refused(cli, tmp_path, run_data, straight):
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        tmp_path / "out",
        training={"max_train_steps": 5},
        saving={"resume": str(straight / "t-step00000004-state")},
    )
    with pytest.raises(TrainingError) as info:
        cli(["train", "lora", str(config)])
    assert "training.max_train_steps: 7 -> 5" in info.value.message


def test_resume_from_a_folder_without_states_lists_them(cli, tmp_path, run_data):
    out = tmp_path / "out"
    (out / "t-step00000002-state").mkdir(parents=True)  # no manifest: incomplete
    config = write_config(tmp_path / "run.toml", run_data, out, saving={"resume": str(out)})
    with pytest.raises(TrainingError) as info:
        cli(["train", "lora", str(config), "--dry-run"])
    assert "holds no complete state" in info.value.message
    assert "t-step00000002-state" in info.value.message


def test_a_new_loss_recipe_continues_with_a_warning(cli, tmp_path, run_data, straight):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        out,
        saving={"resume": str(straight / "t-step00000004-state")},
    )
    result = cli(["train", "lora", str(config), "--min_snr_gamma", "5"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "training.min_snr_gamma changed from None to 5.0" in said
    assert "no longer identical to an uninterrupted run" in said
    assert [r["step"] for r in metrics(out)][-1] == STEPS

    with pytest.raises(TrainingError) as info:  # a new LR would be ignored by the states
        cli(["train", "lora", str(config), "--learning_rate", "5e-4"])
    assert "optimizer.learning_rate" in info.value.message
