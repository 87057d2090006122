"""The training loop's saves: exported weights, training states, samples, and the states
written when a run is interrupted or its loss stops being finite.

A mixin of engine.loop.Trainer, whose attributes it reads. Only the main process writes; the
others wait (and under DeepSpeed take part in gathering the optimizer state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sdtrain.engine import naming
from sdtrain.engine.saves import nonfinite_cause, nonfinite_hint
from sdtrain.engine.state import Counters, StateParts, save_state
from sdtrain.errors import Interrupted, TrainingError
from sdtrain.methods.base import SavePoint

logger = logging.getLogger("sdtrain.engine.loop")


class LoopSaving:
    """Saves, samples and the states written on a stop."""

    def _optimizer_state(self) -> dict:
        """The optimizer's state dict (under DeepSpeed gathered: every process calls it)."""
        if self.zero is not None:
            return self.zero.optimizer_state(self.optimizer)
        return self.optimizer.state_dict()

    def _state_parts(
        self,
        counters: Counters,
        scheduler_state: dict | None = None,
        optimizer_state: dict | None = None,
    ) -> StateParts:
        """What a state holds (under DeepSpeed a collective: every process calls it, unless
        `optimizer_state` was gathered already)."""
        optimizer = optimizer_state if optimizer_state is not None else self._optimizer_state()
        return StateParts(
            counters=counters,
            trainable=self.method.trainable_state(),
            optimizer=optimizer,
            scheduler=scheduler_state or self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            config=self.run_config,
        )

    def _save(self, stem: str, counters: Counters, with_state: bool, final: bool) -> None:
        # Epochs completed, as the reference's ss_epoch: step and epoch saves count finished
        # epochs only (epoch saves run after the counter moved on); the final save counts the
        # epoch it ends in. (Passing the in-progress counter made epoch saves say one too many.)
        self._settle_pending()  # a deferred step's record and counters first
        ended_mid_epoch = final and counters.position > 0
        epoch_done = counters.epoch if ended_mid_epoch else counters.epoch - 1
        # the optimizer part first: under DeepSpeed its gathering is collective, and the space
        # check needs its size (schedule-free optimizers, whose eval switch below moves the
        # weights, are refused under DeepSpeed)
        gathered = (
            self._optimizer_state()
            if with_state and (self.processes.is_main or self.zero is not None)
            else None
        )
        # every process switches to eval weights and back (schedule-free optimizers move the
        # parameters), so all keep identical parameters; only the main process writes
        with self._eval_mode():
            if self.processes.is_main:
                metadata = (
                    self.hooks.save_metadata(counters.global_step, epoch_done)
                    if self.hooks.save_metadata
                    else {}
                )
                point = SavePoint(
                    self.output_dir, stem, epoch_done, counters.global_step, final, metadata
                )
                self.saves.ensure_space(stem, self.params, gathered)
                self.outputs.extend(self.method.export(self.bundle, point))
        if gathered is not None and self.processes.is_main:
            # the weights after the eval round trip, which the run goes on with
            parts = self._state_parts(counters, optimizer_state=gathered)
            folder = save_state(self.output_dir / naming.state_dir_name(stem), parts)
            logger.info("state saved: %s", folder)
        self.processes.wait()

    def _sample(self, kind: str, epoch: int, step: int) -> None:
        """The sampling hook on the main process; the others wait for it."""
        if self.hooks.sample is None:
            return
        due = getattr(self.hooks.sample, "due", None)
        if due is None or due(kind, epoch, step):
            self._settle_pending()  # (a run that stops at this step draws nothing)
        if self.processes.is_main:
            with self._uncompiled():
                self.hooks.sample(kind, epoch, step)
        self.processes.wait()

    def _uncompiled(self):
        """Validation and sampling run the compiled modules eagerly (engine/compile.py)."""
        import contextlib

        compiled = self.compiled
        return compiled.eager() if compiled is not None else contextlib.nullcontext()

    def _eval_mode(self):
        import contextlib

        opt = self.optimizer
        if self.built.is_schedule_free and hasattr(opt, "eval"):

            @contextlib.contextmanager
            def switch():
                opt.eval()
                try:
                    yield
                finally:
                    opt.train()

            return switch()
        return contextlib.nullcontext()

    def _write_state(self, stem: str, parts: Callable[[], StateParts]) -> Path:
        """A state written by the main process (the others wait); its folder."""
        self._settle_pending()  # a deferred step's record and counters first
        folder = self.output_dir / naming.state_dir_name(stem)
        # the parts on the main process, which writes them, and under DeepSpeed on every process
        # (gathering the optimizer state is collective)
        if self.processes.is_main or self.zero is not None:
            here = parts()
            if self.processes.is_main:
                save_state(folder, here)
        self.processes.wait()
        return folder

    def _interrupt(self, counters: Counters, signal_name: str | None) -> None:
        stem = naming.step_stem(self.output_name, counters.global_step)
        folder = self._write_state(stem, lambda: self._state_parts(counters))
        raise Interrupted(
            f"{signal_name}: stopped after step {counters.global_step}; state written to {folder}",
            hint=f"resume with: {self.resume_hint} --resume {folder}".strip(),
        )

    def _stop_nonfinite(self, before: tuple[Counters, dict] | None, paths: list[str]) -> None:
        assert before is not None
        counters, scheduler_state = before
        stem = naming.step_stem(self.output_name, counters.global_step)
        folder = self._write_state(stem, lambda: self._state_parts(counters, scheduler_state))
        growth = self._weight_norm() / max(self._start_norm, 1e-12)
        kind, cause = nonfinite_cause(paths, self.precision.mixed_precision, growth)
        raise TrainingError(
            f"{len(paths)} consecutive steps had a non-finite loss or gradient; {cause}",
            hint=nonfinite_hint(
                kind, self.resume_hint, folder, self.sections.optimizer.learning_rate
            ),
        )

    def _weight_norm(self) -> float:
        """L2 norm of every trainable parameter together (for the explosion diagnosis)."""
        import torch

        norms = [p.detach().float().norm() for p in self.params]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
