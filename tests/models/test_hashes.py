"""File SHA-256, A1111 legacy hash and the safetensors data-section hash."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save, save_file

from sdtrain.models.hashes import file_sha256, legacy_hash, safetensors_model_hash

# 1.125 MiB of a fixed byte pattern; hashes computed once and written down.
DATA = bytes((i * 7 + 3) % 256 for i in range(0x120000))
DATA_SHA256 = "9cda7fe3149118d7b16ac3cc7e5f599176fde5e8e9e2f01b99e3fd8aa5adb258"
DATA_LEGACY = "510b126e"  # sha256 of bytes [1 MiB, 1 MiB + 64 KiB)
# sha256 of the little-endian float32 bytes of 0, 1, 2, 3
ARANGE4_SHA256 = "4c9c4f354e74153db012329d71c8562ec23e498148174b2c49de58f45d47cdbe"


def test_file_and_legacy_hash(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    assert file_sha256(path) == DATA_SHA256
    assert legacy_hash(path) == DATA_LEGACY
    assert legacy_hash(DATA) == DATA_LEGACY
    # the legacy hash only sees 64 KiB at 1 MiB
    changed = bytearray(DATA)
    changed[0] ^= 1
    changed[0x110000] ^= 1
    assert legacy_hash(bytes(changed)) == DATA_LEGACY
    changed[0x100000] ^= 1
    assert legacy_hash(bytes(changed)) != DATA_LEGACY


def test_model_hash_covers_only_tensor_data(tmp_path):
    tensors = {"w": torch.arange(4, dtype=torch.float32)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a), metadata={"title": "a"})
    save_file(tensors, str(b), metadata={"title": "a much longer title that moves the data"})
    assert file_sha256(a) != file_sha256(b)
    assert safetensors_model_hash(a) == safetensors_model_hash(b) == ARANGE4_SHA256
    assert safetensors_model_hash(save(tensors)) == ARANGE4_SHA256


def test_model_hash_rejects_non_safetensors():
    with pytest.raises(ValueError):
        safetensors_model_hash(b"abc")
