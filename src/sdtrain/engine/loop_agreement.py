"""How the processes of a run agree, once per micro-batch: the mean loss, whether it was finite
everywhere, whether a stop was asked for anywhere; and DDP's gradient exchange once per window.

A mixin of engine.loop.Trainer, whose attributes it reads. On one process each is a no-op.
"""

from __future__ import annotations

from typing import Any

from sdtrain.data.batch import Batch


class LoopAgreement:
    """The per-micro-batch agreement between processes."""

    def _sync(self, ends_window: bool) -> Any:
        """DDP's no_sync inside an accumulation window: gradients are exchanged once, with the
        window's last backward (nothing to do on one process)."""
        import contextlib

        if ends_window or self.processes.count == 1 or self.zero is not None:
            return contextlib.nullcontext()  # DeepSpeed: the accumulation boundary instead
        return self.accelerator.no_sync(self.forward)

    def _agree(self, loss: Any, batch: Batch, stop: Any) -> tuple[float, bool, bool]:
        """(mean loss of the global micro-batch, finite everywhere, stop requested anywhere):
        `_agree_on_device`'s vector, read on the host (one read per micro-batch)."""
        total, finite, stops = self._agree_on_device(loss, batch, stop).tolist()
        return total, finite == 1.0, stops > 0

    def _agree_on_device(self, loss: Any, batch: Batch, stop: Any) -> Any:
        """A float64 device tensor (mean loss of the global micro-batch, 1 if finite
        everywhere, 1 if a stop was asked for anywhere), without a host read: with several
        processes one all-reduced (loss share, non-finite flag, stop flag) vector, in which a
        padding share (weight 0) counts neither its loss nor its finiteness. host_sync =
        deferred reads it a step later (engine/loop_records.py), every_step at once."""
        import torch

        mine = loss.detach().double().reshape(())
        ok = torch.isfinite(mine)
        stopping = torch.full((), float(stop.requested is not None), device=mine.device)
        count = self.processes.count
        if count == 1:
            return torch.stack([mine, ok.double(), stopping.double()])
        zero = torch.zeros((), dtype=torch.float64, device=mine.device)
        if batch.loss_weight == 0.0:
            share, bad = zero, zero
        else:
            share = torch.where(ok, mine * (batch.loss_weight / count), zero)
            bad = (~ok).double()
        total, bad_count, stops = self.processes.agree_on_device(
            torch.stack([share, bad, stopping.double()])
        )
        return torch.stack([total, (bad_count == 0).double(), (stops > 0).double()])

    def _stopping(self, stop: Any, agreed: bool) -> bool:
        """Stop now? On one process: a signal arrived. With several: one arrived on some process
        by the last agreement (so every process stops at the same step)."""
        if self.processes.count == 1:
            return stop.requested is not None
        if agreed and stop.requested is None:
            stop.requested = "SIGINT (on another process)"
        return agreed

    def _all_paths(self, paths: list[str]) -> list[str]:
        """The image paths of a step over all processes (only asked for on bad steps)."""
        if self.processes.count == 1:
            return paths
        import torch.distributed as dist

        parts: list[Any] = [None] * self.processes.count
        dist.all_gather_object(parts, paths)
        return [p for part in parts for p in part]
