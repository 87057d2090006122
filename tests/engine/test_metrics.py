"""Metrics sinks: tracker naming."""

from __future__ import annotations


def test_log_tracker_name_names_the_tensorboard_run(tmp_path):
    from sdtrain.config.sections import LoggingSection
    from sdtrain.engine.metrics import tensorboard_dir

    named = LoggingSection(logging_dir=str(tmp_path), log_prefix="p-", log_tracker_name="cats")
    assert tensorboard_dir(named, "20260101") == tmp_path / "p-20260101" / "cats"
    plain = LoggingSection(logging_dir=str(tmp_path))
    assert tensorboard_dir(plain, "20260101") == tmp_path / "20260101"
