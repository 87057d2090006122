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
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrain.import_gc import OPT_OUT, quiet_gc


@pytest.fixture
def collector():
    """Leave the collector enabled and nothing frozen by the test (unfreeze thaws what was
    frozen before it too: later collections in this worker walk more, nothing leaks)."""
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
        assert gc.isenabled()  # until the block's first new import
        module = importlib.import_module(name)
        assert not gc.isenabled()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(module.TABLE)
    del sys.modules[name]


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_garbage_from_before_the_block_is_not_frozen(collector, tmp_path, monkeypatch):
    name = _new_module(tmp_path, monkeypatch)
    node = _Node()
    gone = weakref.ref(node)
    gc.collect()  # the node survives into the oldest generation
    del node  # unreachable now, in the oldest generation
    with quiet_gc():
        importlib.import_module(name)
    gc.collect()
    assert gone() is None
    del sys.modules[name]


def test_opted_out_it_leaves_the_collector_alone(collector, tmp_path, monkeypatch):
    name = _new_module(tmp_path, monkeypatch)
    monkeypatch.setenv(OPT_OUT, "plain")
    frozen = gc.get_freeze_count()
    with quiet_gc():
        assert gc.isenabled()
        importlib.import_module(name)
    assert gc.get_freeze_count() == frozen
    del sys.modules[name]


@pytest.fixture
def full_collections():
    """The number of full collections while the test runs, as a one-item list."""
    seen = [0]

    def count(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            seen[0] += 1

    gc.callbacks.append(count)
    yield seen
    gc.callbacks.remove(count)


def test_a_block_that_imports_nothing_new_leaves_the_collector_alone(collector, full_collections):
    """A second run in one process: no collection over the whole heap, nothing frozen."""
    frozen = gc.get_freeze_count()
    with quiet_gc():
        import sdtrain.import_gc  # noqa: F401  (already imported)

        assert gc.isenabled()
        made = [[] for _ in range(1000)]
    assert full_collections[0] == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    assert made


def test_the_finder_is_gone_after_the_block(collector, tmp_path, monkeypatch):
    name = _new_module(tmp_path, monkeypatch)
    finders = list(sys.meta_path)
    with quiet_gc():
        importlib.import_module(name)
    assert sys.meta_path == finders
    with pytest.raises(RuntimeError), quiet_gc():
        raise RuntimeError("boom")
    assert sys.meta_path == finders
    del sys.modules[name]


def test_an_error_in_the_block_still_turns_it_back_on(collector):
    with pytest.raises(ImportError), quiet_gc():
        import sdtrain_no_such_module  # noqa: F401
    assert gc.isenabled()


def test_an_inner_block_leaves_it_to_the_outer(collector, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = (
        _new_module(tmp_path / "a", monkeypatch),
        _new_module(tmp_path / "b", monkeypatch),
    )
    with quiet_gc():
        importlib.import_module(first)
        frozen = gc.get_freeze_count()
        with quiet_gc():
            pass
        assert not gc.isenabled()
        assert gc.get_freeze_count() == frozen
    assert gc.isenabled()
    with quiet_gc():  # the inner block imports first: the outer block still owns the collector
        with quiet_gc():
            importlib.import_module(second)
        assert not gc.isenabled()
    assert gc.isenabled()
    for name in (first, second):
        del sys.modules[name]


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


def _probe_run(folder: Path, plain: bool) -> dict:
    env = {**os.environ, "SDTRAIN_NO_REEXEC": "1", OPT_OUT: "plain" if plain else ""}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (folder / "out" / "last.safetensors").is_file()
    line = [x for x in done.stdout.splitlines() if x.startswith("GC ")][-1]
    return json.loads(line[3:])


def test_a_training_run_imports_without_full_collections(tmp_path: Path):
    """Python 3.11 here: 7 full collections over this run without the blocks, 4 with them (one
    at each block's first new import, over what is not frozen yet).
    Compared with the opted-out run, so another CPython's collector schedule cannot fail it."""
    runs = {}
    for plain in (False, True):
        folder = tmp_path / ("plain" if plain else "quiet")
        (folder / "imgs").mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "imgs" / f"{i}.png")
        (folder / "run.toml").write_text(RUN)
        runs[plain] = _probe_run(folder, plain)
    quiet, plain_run = runs[False], runs[True]
    assert quiet["enabled"] and plain_run["enabled"]
    assert quiet["frozen"] > 100_000  # torch, diffusers, transformers, peft, accelerate
    assert plain_run["frozen"] == 0
    if plain_run["full"]:
        assert quiet["full"] < plain_run["full"]
