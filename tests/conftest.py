"""Test-wide setup: never touch the network, keep threads predictable."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture
def cli():
    """Invoke the real Typer app in-process: cli(["dataset", "plan", ...]) -> click Result."""
    from typer.testing import CliRunner

    from sdtrain.cli.main import _register_groups, app

    _register_groups()
    runner = CliRunner()

    def invoke(args: list[str], **kwargs):
        return runner.invoke(app, args, catch_exceptions=False, **kwargs)

    return invoke


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when CUDA is not available."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)
