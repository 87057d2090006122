"""The host's side of each optimizer step: its metrics record, the non-finite guard's
bookkeeping (skipped steps, a run of bad steps that stops training), the smoothed loss.

A step ends with a `StepEnd`, whose `read()` gives what the device computed. With
`host_sync = every_step` it is settled at once; deferred (engine/host_sync.py), it waits as
`_pending` until the next step's update, or until something needs the counters settled first:
a save or state, validation or sampling when due (they call `_settle_pending`), or the end of a
run that failed (`_settle_after_error`).

A mixin of engine.loop.Trainer, whose attributes it reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtrain.engine.state import Counters

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("sdtrain.engine.loop")


@dataclass
class Settled:
    """A step's outcome on the host."""

    losses: list[float]  # the finite micro-batch losses of its window
    outcome: str  # "ok" | "scaler_skip" (fp16 loss-scale warm-up) | "bad" (no update)
    after: dict[str, float] = field(default_factory=dict)  # the method's metrics (ok steps)
    stop: bool = False  # a stop every process agreed on (several processes, deferred)


@dataclass
class StepEnd:
    """A finished optimizer step, waiting to be settled."""

    step: int
    epoch: int
    before: tuple[Counters, dict]  # counters and schedule before it (a bad run's restart)
    paths: list[str]  # this process's images of the window
    lrs: dict[str, float]
    read: Callable[[], Settled]


def known(settled: Settled) -> Callable[[], Settled]:
    """The reader of a step settled on the host already (host_sync = every_step)."""
    return lambda: settled


class DeviceWindow:
    """An accumulation window's per-micro-batch (loss, finite, stop) rows, on the device."""

    def __init__(self, has_scaler: bool) -> None:
        self.rows: list[torch.Tensor] = []
        self.has_scaler = has_scaler

    def add(self, row: torch.Tensor) -> None:
        self.rows.append(row)

    def bad(self) -> torch.Tensor:
        """A 0-d bool: some micro-batch's loss was not finite (on some process)."""
        import torch

        return torch.stack([row[1] for row in self.rows]).min() == 0

    def readback(
        self, found: torch.Tensor, scale: torch.Tensor | None, after: dict[str, Any]
    ) -> Callable[[], Settled]:
        """Start the copy of this window's values to the host; the reader decodes them."""
        import torch

        from sdtrain.engine.host_sync import Readback

        device = self.rows[0].device
        keys = list(after)
        extra = [
            found.reshape(1).double(),
            (scale if scale is not None else torch.ones((), device=device)).reshape(1).double(),
            *(_as_row(after[k], device) for k in keys),
        ]
        pending = Readback(torch.cat([torch.cat(self.rows), *extra]))
        count, has_scaler = len(self.rows), self.has_scaler

        def read() -> Settled:
            values = pending.values()
            rows = [values[3 * i : 3 * i + 3] for i in range(count)]
            found_inf, scale_after = values[3 * count], values[3 * count + 1]
            if any(ok == 0 for _, ok, _ in rows):
                outcome = "bad"
            elif found_inf:  # at a scale below 1 the gradients overflow unscaled
                outcome = "scaler_skip" if has_scaler and scale_after >= 1.0 else "bad"
            else:
                outcome = "ok"
            metrics = dict(zip(keys, values[3 * count + 2 :], strict=True))
            return Settled(
                [loss for loss, ok, _ in rows if ok],
                outcome,
                metrics if outcome == "ok" else {},
                any(stop > 0 for _, _, stop in rows),
            )

        return read


def _as_row(value: Any, device: Any) -> torch.Tensor:
    """A metric as a 1-element float64 tensor (a Python float exactly, not via float32)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().reshape(1).double()
    return torch.tensor([float(value)], dtype=torch.float64, device=device)


class LoopRecords:
    """Settles finished steps: records, the bad-step guard, the smoothed loss."""

    def _begin_records(self, counters: Counters, metrics: Any) -> None:
        self._counters, self._metrics = counters, metrics
        self._pending: StepEnd | None = None
        self.last_loss: float | None = None
        self.smoothed: float | None = None
        self._bad_run: list[str] = []  # image paths of consecutive non-finite steps
        self._before_bad: tuple[Counters, dict] | None = None
        self._stop_agreed = False

    def _step_ended(self, end: StepEnd, deferred: bool) -> None:
        if deferred:
            self._pending = end
        else:
            self._settle(end)

    def _settle_pending(self) -> None:
        """Settle a deferred step now (before its state, record order or stop matter)."""
        end, self._pending = getattr(self, "_pending", None), None
        if end is not None:
            self._settle(end)

    def _settle_after_error(self) -> None:
        """On the way out of a failed run: the deferred step's record still written, as
        every_step would have (one process only: no collective, and no stop decision)."""
        end, self._pending = getattr(self, "_pending", None), None
        if end is None or self.processes.count > 1:
            return
        try:
            self._settle(end, stop_checks=False)
        except Exception:  # the run's own error is the one to report
            logger.debug("the last step's record could not be written", exc_info=True)

    def _settle(self, end: StepEnd, stop_checks: bool = True) -> None:
        settled = end.read()
        counters = self._counters
        record: dict[str, Any] = {"step": end.step, "epoch": end.epoch}
        if settled.outcome != "bad":
            self.last_loss = sum(settled.losses) / len(settled.losses)
            record["loss"] = self.last_loss
        if settled.outcome == "ok":
            self._bad_run, self._before_bad = [], None
            record.update(settled.after)
        elif settled.outcome == "scaler_skip":
            # fp16 loss-scale warm-up: no update at this scale, not a bad step
            record["scaler_skip"] = True
            logger.info(
                "step %d: fp16 gradients overflowed at this loss scale; the scaler lowered it "
                "and skipped the update",
                end.step,
            )
        else:
            counters.nonfinite_skipped += 1
            if self._before_bad is None:
                self._before_bad = end.before
            paths = self._all_paths(end.paths)
            self._bad_run.append(", ".join(paths))
            record["nonfinite"] = True
            record["images"] = paths
            logger.warning(
                "step %d: non-finite loss or gradient, update skipped (images: %s)",
                end.step,
                ", ".join(paths),
            )
        for name, lr in end.lrs.items():
            record[f"lr/{name}"] = lr
        if self._metrics is not None:
            self._metrics.write(record)
        self._stop_agreed = self._stop_agreed or settled.stop
        if stop_checks and len(self._bad_run) >= self.sections.training.max_nonfinite_steps:
            # after the record: the step that ends the run is reported too
            self._stop_nonfinite(self._before_bad, self._bad_run)
        if self.last_loss is not None:  # (a bad step repeats the last loss)
            loss = self.last_loss
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
