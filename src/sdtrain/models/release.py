"""Release a frozen module's weights once its outputs are cached (the VAE after latent caching).

The module object stays in the bundle (so code that moves, casts or freezes every part keeps
working: its tensors become empty), but calling it raises a clear error instead of computing
with missing weights. On SD1.5 the VAE is 0.33 GB in fp32: with all latents cached, training
and a LoRA's export never use it again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ReleasedWeightsError(RuntimeError):
    """A module whose weights were released was called."""


def release_weights(module: torch.nn.Module, what: str, why: str) -> int:
    """Replace every parameter and buffer of `module` with an empty tensor; returns bytes freed.

    Calls to the module (or to `encode` / `decode` on a VAE) raise ReleasedWeightsError naming
    `what` and `why`.
    """
    import torch

    freed = 0
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            freed += tensor.numel() * tensor.element_size()
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    def refuse(*_args, **_kwargs):
        raise ReleasedWeightsError(
            f"{what} was called after its weights were released ({why}); this is a bug"
        )

    module.register_forward_pre_hook(lambda _m, _a: refuse())
    for name in ("encode", "decode"):
        if hasattr(module, name):
            setattr(module, name, refuse)
    module.sdtrain_released = True  # type: ignore[attr-defined]
    log.info("released %s (%.0f MiB): %s", what, freed / 2**20, why)
    return freed
