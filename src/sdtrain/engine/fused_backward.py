"""Fused backward pass: each parameter is updated, and its gradient freed, during backward.

With `fused_backward_pass = true` the engine registers a post-accumulate-grad hook on every
trainable parameter. When autograd has written a parameter's gradient, the hook clips it (per
parameter, to `max_grad_norm`), runs the optimizer's update for that one parameter and frees the
gradient. So at most a few gradients exist at any time instead of one per parameter: for full
SD1.5 (0.98 B parameters, 3.66 GiB of fp32 gradients) AdamW's peak falls 15.6 -> 12.5 GiB.
transformers' Adafactor updates a factored weight inside its gradient (engine/adafactor_lean.py:
the same numbers without the library's two extra weight-sized temporaries).

Rules (checked before any weight loads, see `check_fused_backward`):
- only optimizers whose update of one weight reads nothing but that weight's gradient, its own state
  and its group's settings: Adafactor (the reference accepts only this one), AdamW, SGDNesterov,
  lion-pytorch's Lion, bitsandbytes' 8-bit/paged AdamW, Lion and SGD, and the per-weight torch.optim
  classes (`PER_WEIGHT_TORCH`). Each one's fused update is the update its own step() makes for that
  weight. D-Adaptation and Prodigy (one step size estimated from every gradient), the schedule-free
  optimizers (step counts kept per parameter group) and classes given by dotted path (unknown) are
  refused by name;
- gradient_accumulation_steps must be 1 (a fused step consumes each gradient at once);
- clipping is per parameter (the global norm is not known until backward has ended, when the
  updates are done); `max_grad_norm = 0` disables it, as usual;
- a non-finite gradient skips that parameter's update and marks the step non-finite, so the
  engine's guard still counts it (updates of parameters earlier in backward have happened).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sdtrain.engine.adafactor_lean import lean_adafactor_step
from sdtrain.engine.optim_state import settle_state, state_snapshot
from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    import torch

    from sdtrain.config.sections import OptimizerSection, TrainingSection


# torch.optim classes named without a module whose update of a weight reads only its own
# gradient and state (LBFGS, SparseAdam and the rest are refused)
PER_WEIGHT_TORCH = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
_SUITED = "AdamW, AdamW8bit, Lion, Lion8bit, SGDNesterov or Adafactor"


def not_per_weight(name: str) -> str | None:
    """Why optimizer `name` cannot update one weight at a time, or None when it can."""
    from sdtrain.engine.optim import OPTIMIZERS

    spec = OPTIMIZERS.get(name.lower())
    if spec is not None:
        if spec.kind == "adaptive":
            return f"{spec.name} estimates one step size from the gradients of every weight"
        if spec.kind == "schedulefree":
            return f"{spec.name} counts its steps per parameter group, not per weight"
        return None
    if name in PER_WEIGHT_TORCH:
        return None
    return f"sdtrain cannot tell whether {name} updates each weight from its own gradient alone"


def check_fused_backward(optimizer: OptimizerSection, training: TrainingSection) -> None:
    """ConfigError (exit 2, by key) when fused_backward_pass cannot work with these settings."""
    if not optimizer.fused_backward_pass:
        return
    problems = []
    why = not_per_weight(optimizer.optimizer_type or "AdamW")
    if why is not None:
        problems.append(
            Problem(
                key="optimizer.fused_backward_pass",
                message="fused_backward_pass updates each weight on its own during backward: "
                + why,
                hint=f"use {_SUITED}, or drop fused_backward_pass",
            )
        )
    if training.gradient_accumulation_steps > 1:
        problems.append(
            Problem(
                key="optimizer.fused_backward_pass",
                message="fused_backward_pass updates each weight as soon as its gradient exists, "
                "so gradients cannot be accumulated over "
                f"{training.gradient_accumulation_steps} batches",
                hint="set gradient_accumulation_steps = 1 (raise train_batch_size instead)",
            )
        )
    if training.mixed_precision == "fp16" and not training.full_fp16:
        problems.append(
            Problem(
                key="optimizer.fused_backward_pass",
                message="fused_backward_pass cannot use fp16 loss scaling (gradients would be "
                "applied before the scaler sees them)",
                hint='use mixed_precision = "bf16"',
            )
        )
    if problems:
        raise ConfigError(problems)


class FusedBackward:
    """Per-parameter optimizer steps from post-accumulate-grad hooks (see the module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.finite = True
        self.updates = 0
        self._handles: list[Any] = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                self._handles.append(
                    param.register_post_accumulate_grad_hook(self._hook_for(group))
                )

    def _hook_for(self, group: dict[str, Any]) -> Any:
        def hook(param: torch.Tensor) -> None:
            self.step_param(param, group)

        return hook

    def step_param(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """Clip, update and free the gradient of one parameter (called from autograd)."""
        import torch

        grad = param.grad
        if grad is None:
            return
        norm = torch.linalg.vector_norm(grad.float())
        if not math.isfinite(float(norm)):
            self.finite = False
            param.grad = None
            return
        if self.max_grad_norm > 0 and float(norm) > self.max_grad_norm:
            grad.mul_(self.max_grad_norm / (float(norm) + 1e-6))
        before = state_snapshot(self.optimizer, [param])
        if not lean_adafactor_step(self.optimizer, param, group):
            saved = self.optimizer.param_groups
            # the optimizer's own step over a one-parameter view of the group: the state (keyed
            # by the parameter) and the group's live hyper-parameters (LR from the scheduler)
            self.optimizer.param_groups = [{**group, "params": [param]}]
            try:
                self.optimizer.step()
            finally:
                self.optimizer.param_groups = saved
        settle_state(self.optimizer, before)
        param.grad = None
        self.updates += 1

    def take_finite(self) -> bool:
        """Whether every gradient of the step just ended was finite; resets for the next step."""
        finite, self.finite, self.updates = self.finite, True, 0
        return finite

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
