"""quiet_gc: imports without cyclic collections, the collector restored, a training run's
imports in the window."""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrain.import_gc import quiet_gc


@pytest.fixture
def collector():
    """Leave the collector as the test found it: enabled, nothing frozen by the test."""
    frozen = gc.get_freeze_count()
    yield
    gc.enable()
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()


def _new_module(folder: Path, monkeypatch) -> str:
    name = f"sdtrain_probe_{folder.name.replace('-', '_')}"
    (folder / f"{name}.py").write_text("TABLE = [[] for _ in range(1000)]\n")
    monkeypatch.syspath_prepend(str(folder))
    return name


def test_off_in_the_block_then_frozen_and_on(collector, tmp_path, monkeypatch):
    name = _new_module(tmp_path, monkeypatch)
    frozen = gc.get_freeze_count()
    with quiet_gc():
        assert not gc.isenabled()
        module = importlib.import_module(name)
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(module.TABLE)
    del sys.modules[name]


def test_a_block_that_imports_nothing_new_freezes_nothing(collector):
    frozen = gc.get_freeze_count()
    with quiet_gc():
        import sdtrain.import_gc  # noqa: F401  (already imported)

        made = [[] for _ in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    assert made


def test_an_error_in_the_block_still_turns_it_back_on(collector):
    with pytest.raises(ImportError), quiet_gc():
        import sdtrain_no_such_module  # noqa: F401
    assert gc.isenabled()


def test_an_inner_block_leaves_it_to_the_outer(collector):
    with quiet_gc():
        frozen = gc.get_freeze_count()
        with quiet_gc():
            pass
        assert not gc.isenabled()
        assert gc.get_freeze_count() == frozen
    assert gc.isenabled()


def test_a_collector_turned_off_stays_off(collector):
    gc.disable()
    frozen = gc.get_freeze_count()
    with quiet_gc():
        pass
    assert not gc.isenabled()
    assert gc.get_freeze_count() == frozen


RUN = """
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"
[training]
output_dir = "out"
max_train_steps = 2
train_batch_size = 1
seed = 1
cache_latents = true
max_data_loader_n_workers = 0
[network]
network_dim = 4
[general]
resolution = 64
[[datasets]]
[[datasets.subsets]]
image_dir = "imgs"
"""

# a training run in a fresh interpreter, counting the collector's full collections
PROBE = """
import atexit, gc, json, sys
full = [0]
def count(phase, info):
    if phase == "stop" and info["generation"] == 2:
        full[0] += 1
gc.callbacks.append(count)
atexit.register(lambda: print("GC " + json.dumps(
    {"full": full[0], "frozen": gc.get_freeze_count(), "enabled": gc.isenabled()})))
sys.argv = ["sdtrain", "train", "lora", "run.toml"]
from sdtrain.cli.main import run
run()
"""


def test_a_training_run_imports_without_full_collections(tmp_path: Path):
    """Without the windows the imports of this run made 7 full collections (the frozen count
    was 0); the limit leaves room for the collector's own schedule after them."""
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "run.toml").write_text(RUN)
    env = {**os.environ, "SDTRAIN_NO_REEXEC": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = [x for x in done.stdout.splitlines() if x.startswith("GC ")][-1]
    stats = json.loads(line[3:])
    assert stats["enabled"]
    assert stats["frozen"] > 100_000  # torch, diffusers, transformers, peft, accelerate
    assert stats["full"] <= 2
    assert (tmp_path / "out" / "last.safetensors").is_file()
