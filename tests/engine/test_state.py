"""States: complete-or-absent writes, manifest verification, newest-valid discovery."""

from __future__ import annotations

import json

import torch

from sdtrain.engine.state import (
    Counters,
    StateParts,
    find_latest_state,
    load_state,
    save_state,
    verify_state,
)


def parts(step: int) -> StateParts:
    weight = torch.full((3, 2), float(step))
    opt = torch.optim.AdamW([torch.nn.Parameter(weight.clone())], lr=1e-3)
    return StateParts(
        counters=Counters(global_step=step, epoch=2, position=5, seed=7),
        trainable={"w": weight},
        optimizer=opt.state_dict(),
        scheduler={"last_epoch": step},
        scaler=None,
        config={"training": {"seed": 7}},
    )


def test_round_trip_restores_counters_weights_and_rng(tmp_path):
    torch.manual_seed(123)
    folder = save_state(tmp_path / "x-step00000004-state", parts(4))
    expected = torch.rand(3)
    torch.manual_seed(999)
    state = load_state(folder)
    assert state.counters.global_step == 4 and state.counters.position == 5
    assert torch.equal(state.trainable["w"], torch.full((3, 2), 4.0))
    state.restore_global_rng()
    assert torch.equal(torch.rand(3), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_replacing_a_state_keeps_one_complete_copy(tmp_path):
    target = tmp_path / "last-state"
    save_state(target, parts(1))
    save_state(target, parts(2))
    assert load_state(target).counters.global_step == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last-state"]


def test_corrupt_and_incomplete_states_are_skipped(tmp_path, caplog):
    good = save_state(tmp_path / "a-step00000002-state", parts(2))
    truncated = save_state(tmp_path / "a-step00000006-state", parts(6))
    data = (truncated / "rng.safetensors").read_bytes()
    (truncated / "rng.safetensors").write_bytes(data[: len(data) // 2])
    incomplete = save_state(tmp_path / "a-step00000008-state", parts(8))
    (incomplete / "manifest.json").unlink()
    flipped = save_state(tmp_path / "a-step00000009-state", parts(9))
    raw = bytearray((flipped / "trainable.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (flipped / "trainable.safetensors").write_bytes(bytes(raw))
    assert "wrong size" in verify_state(truncated)
    assert "no manifest" in verify_state(incomplete)
    assert "checksum" in verify_state(flipped)
    with caplog.at_level("WARNING"):
        assert find_latest_state(tmp_path) == good
    assert "a-step00000006-state" in caplog.text and "a-step00000009-state" in caplog.text


def test_manifest_records_every_file(tmp_path):
    folder = save_state(tmp_path / "s-state", parts(3))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert manifest["global_step"] == 3
