"""One training batch: pixels or cached latents, processed captions and per-sample facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdtrain.data.items import Box, Size

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """A batch from one bucket of one dataset. SDXL-ready: sizes and crops travel even for SD1.

    pixels: (B, 3, H, W) in [-1, 1], or None when latents come from the cache.
    latents: (B, 4, H/8, W/8) raw VAE samples (not yet multiplied by the scale factor), or None.
    alpha_masks: (B, H, W) in [0, 1] when alpha_mask is on, else None.
    is_reg: (B,) bool.
    slots: each sample's position in the global batch (all processes together); per-sample
    random draws are keyed by it. loss_weight: this process's share of the global batch's
    mean loss (1.0 on one process; 0.0 for a padding share, see data.batches.Share).
    """

    captions: list[str]
    is_reg: torch.Tensor
    paths: list[str]
    original_sizes: list[Size]
    crop_ltrb: list[Box]
    target_sizes: list[Size]
    flipped: list[bool]
    pixels: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    alpha_masks: torch.Tensor | None = None
    network_multiplier: float = 1.0
    dataset_index: int = 0
    cache_keys: list[str] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    global_size: int = 0  # samples in the global batch (0: this batch is the whole of it)
    loss_weight: float = 1.0

    def __len__(self) -> int:
        return len(self.captions)
