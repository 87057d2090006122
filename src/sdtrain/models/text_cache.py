"""Caption-keyed cache of frozen text-encoder outputs, so static captions are encoded once.

When the text encoder is not trained (network_train_unet_only, or any method that freezes it)
its output for a caption never changes, yet every step would run it again: 0.17 s of a 3.9 s
full-size SD1.5 step on CPU (design/PERFORMANCE.md: -10% with the outputs cached).

Each caption is encoded on its own (batch 1) and stored under its final text, so a cached row is
bit-identical to a recomputed one: results never depend on what happened to be cached (a resumed
run, or one whose cache filled up, trains exactly like a straight one). Keying by the processed
caption keeps the cache correct even with caption shuffling or dropout; it only stops paying off
there (every variant is new), so use it when captions are static, as the reference does.

The memory cap is a fill-then-keep policy, not LRU: training revisits every caption once per
epoch in a shuffled order, and for that pattern LRU keeps far fewer useful entries than keeping
the first ones (with a cache half the size of the caption set, LRU hits ~1/8 of lookups,
fill-then-keep 1/2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # ~2,200 SD1 captions in fp32 (77 x 768), twice in bf16


class TextConditionCache:
    """Text conditioning per caption: `cache(captions)` -> (B, L, D), encoding only misses.

    `encode(captions)` must return the conditioning (len(captions), L, D) of a frozen text encoder
    for those captions (the method's own encode, with its clip skip / token length / weights); it
    is called with one caption at a time, without gradients. Entries are kept until they would
    exceed `max_bytes`; later new captions are encoded every time they come.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], torch.Tensor],
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.encode = encode
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._rows: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, caption: str) -> bool:
        return caption in self._rows

    def _row(self, caption: str) -> torch.Tensor:
        import torch

        row = self._rows.get(caption)
        if row is not None:
            self.hits += 1
            return row
        self.misses += 1
        with torch.no_grad():
            out = self.encode([caption])
        if out.dim() != 3 or out.shape[0] != 1:
            raise ValueError(f"encode() returned shape {tuple(out.shape)}, expected (1, L, D)")
        row = out[0].detach()
        size = row.numel() * row.element_size()
        if self.bytes + size <= self.max_bytes:
            self._rows[caption] = row
            self.bytes += size
        return row

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, L, D) conditioning of `captions`, a new tensor without an autograd graph."""
        import torch

        rows = [self._row(caption) for caption in captions]
        shapes = {tuple(row.shape) for row in rows}
        if len(shapes) > 1:
            raise ValueError(
                f"captions encode to different shapes {sorted(shapes)}; a batch needs one length "
                "(set max_token_length so every caption pads to the same number of chunks)"
            )
        return torch.stack(rows)

    def clear(self) -> None:
        """Forget every entry (e.g. after the text encoder's weights changed)."""
        self._rows.clear()
        self.bytes = 0
