"""Reference file names, retention windows, resume config comparison."""

from __future__ import annotations

import pytest

from sdtrain.config.sections import SavingSection
from sdtrain.data.steps import plan_steps
from sdtrain.engine import naming
from sdtrain.engine.resume import check_resume_config, config_changes, resolve_resume
from sdtrain.errors import TrainingError


def test_reference_names():
    assert naming.epoch_stem("name", 3) == "name-000003"
    assert naming.step_stem("name", 1000) == "name-step00001000"
    assert naming.final_stem("name") == "name"
    assert naming.epoch_stem(None, 1) == "epoch-000001"
    assert naming.step_stem(None, 5) == "at-step00000005"
    assert naming.final_stem(None) == "last"
    assert naming.state_dir_name("name-000003") == "name-000003-state"


def test_retention_windows():
    assert naming.epoch_to_delete(5, every=1, keep_last=2) == 3
    assert naming.epoch_to_delete(2, every=1, keep_last=2) is None
    assert naming.epoch_to_delete(6, every=2, keep_last=2) == 2
    # steps: keep saves from the last N steps (a window, not a count)
    assert naming.step_to_delete(300, every=100, keep_last_steps=150) == 100
    assert naming.step_to_delete(200, every=100, keep_last_steps=150) is None
    assert naming.step_to_delete(100, every=100, keep_last_steps=None) is None


def test_step_accounting_matches_reference():
    plan = plan_steps(
        batches_per_epoch=50,
        gradient_accumulation_steps=4,
        max_train_steps=100,
        max_train_epochs=None,
    )
    assert plan.steps_per_epoch == 13 and plan.num_epochs == 8 and plan.total_steps == 100
    by_epochs = plan_steps(50, 4, 100, max_train_epochs=3)
    assert by_epochs.total_steps == 39
    assert plan.step_ends_at(3) and not plan.step_ends_at(4) and plan.step_ends_at(49)
    assert plan.steps_before(2, 5) == 14


def test_resume_config_changes():
    saved = {"training": {"seed": 1, "output_dir": "a"}, "sample": {"sample_at_first": False}}
    current = {"training": {"seed": 2, "output_dir": "b"}, "sample": {"sample_at_first": True}}
    assert set(config_changes(saved, current)) == {
        "training.seed",
        "training.output_dir",
        "sample.sample_at_first",
    }
    with pytest.raises(TrainingError) as info:
        check_resume_config(saved, current, allowed=[])
    assert "training.seed" in info.value.message and "output_dir" not in info.value.message
    assert "--resume_allow_changes training.seed" in info.value.hint
    assert check_resume_config(saved, current, allowed=["training.seed"])


def test_resolve_resume_auto_without_states(tmp_path):
    assert resolve_resume(SavingSection(resume="auto"), tmp_path) is None
    assert resolve_resume(SavingSection(), tmp_path) is None
    assert resolve_resume(SavingSection(resume="x"), tmp_path).name == "x"
