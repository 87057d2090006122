"""Stateless seed derivation: every random draw in training is keyed by (seed, stream, counters).

Because no RNG stream carries hidden state across steps, a run resumed at any step replays
exactly the draws a straight run would make (caption shuffles, flips, crops, noise, timesteps).
"""

from __future__ import annotations

import hashlib
import struct


def derive_seed(seed: int, stream: str, *counters: int) -> int:
    """A 63-bit seed for `stream` at `counters` (e.g. epoch, batch position, slot)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<q", seed))
    digest.update(stream.encode("utf-8"))
    for counter in counters:
        digest.update(struct.pack("<q", counter))
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)
