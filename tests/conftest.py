"""Test-wide setup: never touch the network, keep threads predictable."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# one intra-op thread per test process: `pytest -n 2` then uses both cores without oversubscription
os.environ.setdefault("OMP_NUM_THREADS", "1")
# bf16 runs check numerics on tiny models; on a CPU without oneDNN bf16 kernels sdtrain refuses
# bf16 as far too slow for real work (engine/cpu_bf16.py), which the refusal's own tests check
os.environ.setdefault("SDTRAIN_ALLOW_SLOW_BF16", "1")
# training routes frozen Linear layers through models/linear_path.py only on the CPUs it was
# measured faster on; the tests route them on every machine, so that the exactness, resume and
# interop tests check those kernels wherever they run (test_linear_path.py checks the choice)
os.environ.setdefault("SDTRAIN_LINEAR", "path")
# ... and the same for the small maps' one-GEMM convolution input gradient (models/conv_path.py;
# by default on AVX-512 CPUs only)
os.environ.setdefault("SDTRAIN_CONV_GRAD", "rows")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Latent caches of tests never land in the user's ~/.cache."""
    os.environ["SDTRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("sdtrain-cache"))


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
