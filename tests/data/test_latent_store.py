"""Content-addressed latent store: keys, the cheap header-only validity check, disk-only mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdtrain.data.latent_store import LatentRecipe, LatentStore, latent_key

RECIPE = LatentRecipe(
    bucket=(64, 96),
    resized=(64, 100),
    crop_offsets=(0, 2),
    interpolation="None",
    flip=False,
    alpha_mask=False,
    exif_transpose=True,
)
KEY = latent_key("a" * 40, RECIPE, "vae1", "torch.float32")


def test_every_part_of_the_address_changes_the_key():
    others = [
        latent_key("b" * 40, RECIPE, "vae1", "torch.float32"),
        latent_key("a" * 40, dataclasses.replace(RECIPE, flip=True), "vae1", "torch.float32"),
        latent_key("a" * 40, dataclasses.replace(RECIPE, bucket=(96, 64)), "vae1", "torch.float32"),
        latent_key(
            "a" * 40, dataclasses.replace(RECIPE, crop_offsets=(0, 3)), "vae1", "torch.float32"
        ),
        latent_key("a" * 40, RECIPE, "vae2", "torch.float32"),
        latent_key("a" * 40, RECIPE, "vae1", "torch.bfloat16"),
    ]
    assert len({KEY, *others}) == len(others) + 1
    assert latent_key("a" * 40, RECIPE, "vae1", "torch.float32") == KEY


def test_disk_entry_round_trip_and_ok_status(tmp_path):
    store = LatentStore(tmp_path)
    latents = torch.randn(4, 12, 8)
    store.put(KEY, latents)
    assert store.path(KEY).is_file()
    fresh = LatentStore(tmp_path)
    assert fresh.status(KEY, (12, 8)) == ("ok", "")
    assert fresh.check(KEY, (12, 8))
    assert torch.equal(fresh.get(KEY)["latents"], latents)


def test_status_is_missing_without_a_file(tmp_path):
    assert LatentStore(tmp_path).status(KEY, (12, 8)) == ("missing", "")
    assert LatentStore(None).status(KEY, (12, 8)) == ("missing", "")


def test_wrong_shape_is_stale(tmp_path):
    LatentStore(tmp_path).put(KEY, torch.zeros(4, 8, 8))
    state, why = LatentStore(tmp_path).status(KEY, (12, 8))
    assert state == "stale" and "shape" in why


def test_truncated_file_is_stale_without_loading_it(tmp_path, monkeypatch):
    LatentStore(tmp_path).put(KEY, torch.zeros(4, 12, 8))
    path = LatentStore(tmp_path).path(KEY)
    path.write_bytes(path.read_bytes()[:-10])

    def no_load(*_a, **_k):
        raise AssertionError("the validity check must not load tensors")

    monkeypatch.setattr("safetensors.torch.load_file", no_load)
    state, why = LatentStore(tmp_path).status(KEY, (12, 8))
    assert state == "stale" and "truncated" in why


@pytest.mark.parametrize("content", [b"", b"garbage!", b"\x05\x00\x00\x00\x00\x00\x00\x00{}"])
def test_garbage_files_are_stale(tmp_path, content):
    store = LatentStore(tmp_path)
    store.path(KEY).parent.mkdir(parents=True)
    store.path(KEY).write_bytes(content)
    assert store.status(KEY, (12, 8))[0] == "stale"


def test_foreign_safetensors_file_is_stale(tmp_path):
    from safetensors.torch import save_file

    store = LatentStore(tmp_path)
    store.path(KEY).parent.mkdir(parents=True)
    save_file({"latents": torch.zeros(4, 12, 8)}, str(store.path(KEY)))
    state, why = store.status(KEY, (12, 8))
    assert state == "stale" and "sdtrain" in why


def test_alpha_mask_presence_and_shape_are_checked(tmp_path):
    store = LatentStore(tmp_path)
    store.put(KEY, torch.zeros(4, 12, 8), torch.ones(96, 64))
    assert store.status(KEY, (12, 8), (96, 64))[0] == "ok"
    assert store.status(KEY, (12, 8), None)[0] == "stale"
    assert store.status(KEY, (12, 8), (64, 96))[0] == "stale"
    other = latent_key("c" * 40, RECIPE, "vae1", "torch.float32")
    store.put(other, torch.zeros(4, 12, 8))
    assert store.status(other, (12, 8), (96, 64))[0] == "stale"


def test_disk_only_store_keeps_nothing_in_memory(tmp_path):
    store = LatentStore(tmp_path, keep_in_memory=False)
    store.put(KEY, torch.zeros(4, 12, 8))
    store.get(KEY)
    assert store._memory == {}
    assert KEY in store
    with pytest.raises(ValueError):
        LatentStore(None, keep_in_memory=False)


def test_discard_removes_the_file(tmp_path):
    store = LatentStore(tmp_path)
    store.put(KEY, torch.zeros(4, 12, 8))
    store.discard(KEY)
    assert KEY not in store
    assert not store.path(KEY).exists()
