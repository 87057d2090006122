"""When the host reads what a training step computed on the device.

Every step ends with questions only the device's numbers answer: was the loss finite, were the
gradients, did the fp16 scaler overflow, what was the loss. Read as the step ends (`every_step`),
each answer is a host sync: the CPU waits for the GPU to finish the step before it can queue the
next, and the GPU then waits for the CPU. `deferred` keeps them on the device:

- every micro-batch goes through backward, and a window whose loss or gradients were not
  finite has its update skipped on the device: torch's fused optimizers take a `found_inf` flag
  (as the fp16 scaler uses them); with the scaler, its own flag gets the loss's added, and its
  scale and growth count are put back where every_step would not have stepped at all;
- the step's values go to the host in one non-blocking copy, read just before the next step's
  update (the next step's forward and backward are queued by then), or earlier where a save,
  validation, sampling or a stop needs the counters settled.

Both modes skip the same updates and write the same records and states (tests compare them on
the CPU, one and two processes). Deferred learns of a run of bad steps one step later, before that
step's update. With several processes a stop (Ctrl-C) is agreed with the step's values, so all
processes stop one step later than every_step (one asked for in the last step's window lets the
run finish).
SGD with momentum is refused: torch's fused SGD stores its uninitialised momentum buffers even
when its first step is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    import torch

KEY = "training.host_sync"


def deferred_obstacle(optimizer: Any, fused: Any, zero: Any, method: Any) -> str | None:
    """Why this run cannot defer its host reads (None: it can)."""
    if zero is not None:
        return "under DeepSpeed its engine decides the skip"
    if fused is not None:
        return "fused_backward_pass updates each weight during backward, before any check"
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return (
            f"{type(optimizer).__name__} cannot skip an update on the device "
            "(torch's fused AdamW, Adam, SGD and Adagrad can)"
        )
    import torch

    if isinstance(optimizer, torch.optim.SGD) and any(
        group.get("momentum", 0) for group in optimizer.param_groups
    ):  # a skipped first step would still store torch's uninitialised momentum buffers
        return "SGD with momentum creates its buffers in its first step, even a skipped one"
    if not getattr(method, "after_step_any_outcome", False):
        return "the method's after-step work must know whether the step was applied"
    return None


def use_deferred(requested: str, device_type: str, obstacle: str | None) -> bool:
    """The mode of this run: `deferred` where asked for (refused by name where impossible),
    and under `auto` on CUDA where possible."""
    if requested == "deferred" and obstacle is not None:
        raise ConfigError(
            [
                Problem(
                    key=KEY,
                    message=f"host_sync = 'deferred' is not possible here: {obstacle}",
                    hint="use host_sync = 'every_step' (or 'auto')",
                )
            ]
        )
    if requested == "deferred":
        return True
    return requested == "auto" and device_type == "cuda" and obstacle is None


class Readback:
    """A 1-d float64 device tensor on its way to the host: on CUDA a non-blocking copy into
    pinned memory and an event; `values()` waits for that event only (not for work queued
    after it)."""

    def __init__(self, values: torch.Tensor) -> None:
        import torch

        values = values.detach().to(torch.float64)
        self._event = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values.cpu()

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return [float(v) for v in self._host.tolist()]
