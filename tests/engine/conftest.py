"""Fixtures of the training-run tests: the tiny dataset and one uninterrupted reference run."""

from __future__ import annotations

import pytest
from train_runs import make_dataset, write_config


def _runner():
    from typer.testing import CliRunner

    from sdtrain.cli.main import _register_groups, app

    _register_groups()
    runner = CliRunner()
    return lambda args: runner.invoke(app, args, catch_exceptions=False)


@pytest.fixture(scope="session")
def run_data(tmp_path_factory):
    """The captioned 5-image dataset every training-run test uses."""
    return make_dataset(tmp_path_factory.mktemp("run-data"))


@pytest.fixture(scope="session")
def straight(tmp_path_factory, run_data):
    """Output folder of an uninterrupted run with the default test config (write_config)."""
    root = tmp_path_factory.mktemp("straight")
    config = write_config(root / "run.toml", run_data, root / "out")
    result = _runner()(["train", "lora", str(config)])
    assert result.exit_code == 0, result.output
    return root / "out"
