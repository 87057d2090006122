"""The training loop's backward and optimizer step: the fp16 scaler, clipping, the non-finite
check, and its two timings (engine/host_sync.py): decided on the host as the step ends, or on
the device, read one step later.

A mixin of engine.loop.Trainer, whose attributes it reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class LoopOptimizer:
    """Backward of a micro-batch and the step at a window's end."""

    def _backward(
        self, loss: Any, weight: float, accumulation: int, ends: bool, finite: bool
    ) -> None:
        """Backward of this process's share: loss x weight / accumulation (the fp16 scaler and
        DDP through accelerate; under DeepSpeed its engine, which also sees the non-finite
        micro-batches, so that it skips their window's update)."""
        if weight != 1.0:
            loss = loss * weight
        if self.zero is not None:
            self.zero.backward(loss / accumulation, ends, finite)
            return
        self.accelerator.backward(loss / accumulation)

    def _window_outcome(self, bad: bool) -> str:
        """The optimizer step at a window's end ("ok" / "scaler_skip" / "bad"); a window with a
        non-finite loss is "bad" without a step (DeepSpeed skips it itself)."""
        if self.zero is not None:
            applied = self.zero.step()
            return "ok" if applied and not bad else "bad"
        return "bad" if bad else self._optimizer_step()

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Clip to max_grad_norm (when > 0) after unscaling; the norm as a device tensor."""
        import torch

        max_norm = self.sections.training.max_grad_norm
        if max_norm > 0:
            return self.accelerator.clip_grad_norm_(params, max_norm)
        self.accelerator.unscale_gradients()
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
        )

    def _optimizer_step(self) -> str:
        """Clip, check gradients, step: "ok"; "scaler_skip" when fp16 gradients overflowed at
        the current loss scale (the scaler lowers it, no update: normal warm-up); "bad" (no
        update) when gradients are not finite otherwise."""
        import torch

        if self.fused is not None:  # every weight was updated during backward
            return "ok" if self.fused.take_finite() else "bad"
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return "ok"
        finite = bool(torch.isfinite(self._grad_norm(params)))
        if self.scaler is not None:
            self._step_settled()  # the scaler skips the update on overflow and lowers the scale
            if finite:
                return "ok"
            # at a scale below 1 the gradients overflow unscaled: really non-finite
            return "scaler_skip" if self.scaler.get_scale() >= 1.0 else "bad"
        if not finite:
            return "bad"
        self._step_settled()
        return "ok"

    def _deferred_step(self, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same step without a host read: (gradients not finite, scale after the step)
        as device tensors. The update is skipped on the device when either the window had a
        non-finite loss (`bad`) or its gradients are not finite; the fp16 scaler, which a bad
        window would not have stepped, keeps its scale and growth count then."""
        import torch

        params = [p for p in self.params if p.grad is not None]
        if not params:
            return torch.zeros((), device=bad.device), None
        found = ~torch.isfinite(self._grad_norm(params))
        skip = (found | bad).float()
        scaler = self.scaler
        if scaler is None:
            optimizer = self.optimizer
            optimizer.found_inf, optimizer.grad_scale = skip, None
            try:
                self._step_settled()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
            return found, None
        # unscale_ (in _grad_norm) left the scaler's overflow flags: the bad window's join them
        flags = scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
        if not flags:  # (a defaultdict: a wrong key would silently apply a bad window)
            raise RuntimeError("the fp16 scaler has no overflow flags for this optimizer")
        for flag in flags.values():
            flag.copy_(torch.maximum(flag, bad.to(flag)))
        scale, growth = scaler._scale.clone(), scaler._growth_tracker.clone()
        self._step_settled()  # the scaler's step and update
        scaler._scale.copy_(torch.where(bad, scale, scaler._scale))
        scaler._growth_tracker.copy_(torch.where(bad, growth, scaler._growth_tracker))
        return found, scaler._scale.clone()

    def _step_settled(self) -> None:
        """The optimizer step; state tensors it rebinds stay where they were (optim_state.py)."""
        from sdtrain.engine.optim_state import settle_state, state_snapshot

        before = state_snapshot(self.optimizer)
        self.stepper.step()
        settle_state(self.optimizer, before)
