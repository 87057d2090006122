"""Model file hashes for metadata and UIs: SHA-256, A1111 legacy hash, safetensors model hash."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path
from typing import BinaryIO

_BLOCK = 1 << 20
LEGACY_OFFSET = 0x100000  # 1 MiB
LEGACY_LENGTH = 0x10000  # 64 KiB


def _stream_sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_BLOCK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the whole file (`ss_new_sd_model_hash`; A1111 shows its first 10 hex)."""
    with open(path, "rb") as handle:
        return _stream_sha256(handle)


def legacy_hash(source: str | Path | bytes) -> str:
    """A1111's legacy short hash: first 8 hex of SHA-256 over 64 KiB at offset 1 MiB.

    Accepts a path or the file's bytes (e.g. an in-memory safetensors serialisation).
    """
    if isinstance(source, bytes):
        block = source[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]
    else:
        with open(source, "rb") as handle:
            handle.seek(LEGACY_OFFSET)
            block = handle.read(LEGACY_LENGTH)
    return hashlib.sha256(block).hexdigest()[:8]


def safetensors_model_hash(source: str | Path | bytes) -> str:
    """SHA-256 of a safetensors file's tensor-data section (after the 8-byte length + JSON header).

    This is sd-webui-additional-networks' "model hash" (`sshs_model_hash`): it does not change
    when only the metadata changes. Accepts a path or the file's bytes.
    """
    handle: BinaryIO
    handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    with handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        handle.seek(8 + header_len)
        return _stream_sha256(handle)
