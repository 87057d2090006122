"""State files without pickle: safetensors + JSON, exact round trips, format-1 states still load,
and a hostile or damaged file in a state folder gives one clear error."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from train_runs import assert_same

from sdtrain.engine.state import Counters, StateParts, load_state, save_state
from sdtrain.engine.state_codec import decode, encode, read_component, write_component
from sdtrain.errors import ModelLoadError, TrainingError


def _optimizer_state() -> dict:
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def _scheduler_state() -> dict:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    opt.step()
    sched.step()
    return sched.state_dict()


def parts(step: int) -> StateParts:
    return StateParts(
        counters=Counters(global_step=step, seed=7),
        trainable={"w": torch.full((2, 2), float(step))},
        optimizer=_optimizer_state(),
        scheduler=_scheduler_state(),
        scaler={"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
        config={"training": {"seed": 7}},
    )


def _same_types(a, b, where=""):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), where  # keys, their types and their order
        for key in a:
            _same_types(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_types(x, y, f"{where}[{i}]")


def test_codec_round_trips_exactly():
    value = {
        "state": _optimizer_state()["state"],  # int keys, 0-dim step tensors
        "groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 1], "name": None}],
        "odd": {1.5: "float key", "__x": True, "weird": [math.inf, -math.inf, 1e-310, 0.1]},
        "sched": _scheduler_state(),
        "bf16": torch.arange(4, dtype=torch.bfloat16),
    }
    tensors: dict = {}
    structure = json.loads(json.dumps(encode(value, tensors), allow_nan=False))
    back = decode(structure, tensors)
    assert_same(value, back)
    _same_types(value, back)
    nan = decode(encode({"v": math.nan}, {}), {})["v"]
    assert math.isnan(nan)


def test_a_state_folder_holds_no_pickle(tmp_path):
    folder = save_state(tmp_path / "s-state", parts(2))
    for path in folder.iterdir():
        assert path.suffix in (".safetensors", ".json"), path.name
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", path.name  # no pickle, no torch zip
    state = load_state(folder)
    expected = parts(2)
    assert_same(state.optimizer, expected.optimizer)
    assert_same(state.scheduler, expected.scheduler)
    assert_same(state.scaler, expected.scaler)
    _same_types(state.optimizer, expected.optimizer)


def _rewrite_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.iterdir())
        if p.name != "manifest.json"
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _to_format_1(folder: Path) -> None:
    """What today's format-1 writer left: optimizer/scheduler/scaler/rng as torch.save files."""
    for name in ("optimizer", "scheduler", "scaler", "rng"):
        path = next(folder.glob(f"{name}.*"))
        torch.save(read_component(path), folder / f"{name}.pt")
        path.unlink()
    _rewrite_manifest(folder)


def test_format_1_states_still_load(tmp_path):
    torch.manual_seed(5)
    folder = save_state(tmp_path / "s-state", parts(4))
    expected = torch.rand(3)
    new = load_state(folder)
    _to_format_1(folder)
    old = load_state(folder)
    assert_same(old.optimizer, new.optimizer)
    assert_same(old.scheduler, new.scheduler)
    assert_same(old.scaler, new.scaler)
    torch.manual_seed(0)
    old.restore_global_rng()
    assert torch.equal(torch.rand(3), expected)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("kind", ["hostile pickle", "garbage safetensors", "garbage json"])
def test_a_hostile_or_damaged_state_file_gives_one_clear_error(tmp_path, kind):
    folder = save_state(tmp_path / "s-state", parts(2))
    marker = tmp_path / "pwned"
    if kind == "hostile pickle":
        (folder / "optimizer.safetensors").unlink()
        torch.save({"state": {}, "x": _Payload(marker)}, folder / "optimizer.pt")
        name = "optimizer.pt"
    elif kind == "garbage safetensors":
        (folder / "optimizer.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nope")
        name = "optimizer.safetensors"
    else:
        (folder / "scheduler.json").write_text('{"__tuple__": 3}')
        name = "scheduler.json"
    _rewrite_manifest(folder)  # a consistent manifest: only the content is wrong
    with pytest.raises(TrainingError) as info:
        load_state(folder)
    assert str(folder) in info.value.message and name in info.value.message
    assert "weights_only" not in info.value.message + (info.value.hint or "")
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize("reader", ["lora", "embedding"])
def test_refused_pt_files_get_our_message_never_torchs(tmp_path, reader):
    from sdtrain.methods.adapters.kohya import read
    from sdtrain.models.embeddings import read_embedding

    path = tmp_path / "x.pt"
    marker = tmp_path / "pwned"
    torch.save({"emb_params": torch.zeros(1, 4), "x": _Payload(marker)}, path)
    with pytest.raises(ModelLoadError) as info:
        (read if reader == "lora" else read_embedding)(path)
    text = info.value.message + (info.value.hint or "")
    assert str(path) in text and "refuses" in text
    assert "weights_only" not in text and "Weights only" not in text
    assert not marker.exists()


def test_write_component_picks_json_without_tensors(tmp_path):
    assert write_component(tmp_path, "a", {"x": (1, 2)}).name == "a.json"
    assert write_component(tmp_path, "b", {"x": torch.zeros(1)}).name == "b.safetensors"
    assert read_component(tmp_path / "a.json") == {"x": (1, 2)}
