"""EMA weights of full-model training: an fp32 shadow copy, optionally kept in CPU memory.

`shadow = decay * shadow + (1 - decay) * live` after every optimizer step (torch's foreach lerp),
with the reference warm-up used by diffusers' EMAModel when `warmup` is on: the effective decay
is `min(decay, (1 + n) / (10 + n))` at update n, so early weights are not dominated by the
untrained start. `swapped_in()` exchanges live and shadow tensors without copying (same device
and dtype) or by copying (otherwise), so saving and sampling with the EMA weights needs no
second model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class EmaWeights:
    """The EMA shadow of named parameters (see the module doc)."""

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        decay: float,
        *,
        offload: bool = True,
        warmup: bool = True,
    ) -> None:
        import torch

        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        device = torch.device("cpu") if offload else None
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
            for name, p in params.items()
        }

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def update(self) -> None:
        """shadow <- lerp(shadow, live, 1 - decay) for every parameter (no autograd)."""
        import torch

        weight = 1.0 - self.current_decay()
        names = list(self.params)
        with torch.no_grad():
            shadows = [self.shadow[n] for n in names]
            live = [
                self.params[n].detach().to(s.device, torch.float32)
                for n, s in zip(names, shadows, strict=True)
            ]
            torch._foreach_lerp_(shadows, live, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow tensors under `ema.<name>` plus the update count (for exact resume)."""
        import torch

        state = {f"ema.{name}": t for name, t in self.shadow.items()}
        state["ema_updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what state_dict() returned (strict)."""
        missing = [n for n in self.shadow if f"ema.{n}" not in state]
        if missing or "ema_updates" not in state:
            raise KeyError(f"EMA state lacks {missing[:3] or ['ema_updates']}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[f"ema.{name}"])
        self.updates = int(state["ema_updates"])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA weights; the live ones come back after."""
        import torch

        swapped: list[tuple[torch.nn.Parameter, torch.Tensor, bool]] = []
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    shadow = self.shadow[name]
                    if shadow.device == param.device and shadow.dtype == param.dtype:
                        swapped.append((param, param.data, True))
                        param.data = shadow  # no copy: the tensors change places
                    else:
                        swapped.append((param, param.detach().clone(), False))
                        param.copy_(shadow)
            yield
        finally:
            with torch.no_grad():
                for param, live, by_reference in swapped:
                    if by_reference:
                        param.data = live
                    else:
                        param.copy_(live)
