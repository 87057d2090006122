"""Host tensors to the training device without a host sync.

On CUDA a plain `tensor.to("cuda")` from ordinary (pageable) memory waits until the copy is done,
and the copy waits for everything queued before it: inside a training step that stalls the CPU
until the GPU has caught up, every step, for each small tensor drawn on the host (noise, timesteps,
token ids, cached latents). Staged in pinned memory, the copy is queued like a kernel and the CPU
goes on; torch's pinned-memory cache keeps the staging buffer until the copy has run. Elsewhere
(CPU, or a tensor already on the device) it is a plain `.to()`, with the same values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def to_device(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`tensor.to(device, dtype)`, queued without waiting when a host tensor goes to CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device=device, dtype=dtype)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)
