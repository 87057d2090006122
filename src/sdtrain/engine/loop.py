"""The one training loop shared by every method: steps, accumulation, guards, saves, resume.

Every random draw is derived from (seed, stream, counters) (sdtrain.seeds), and states are taken
only at optimizer-step boundaries, so a resumed run is bit-identical to a straight one on CPU.

The loop runs on accelerate's `Accelerator` (engine.distributed): one process or several. With
several, each process trains its slice of every global batch; per-sample draws are keyed by the
sample's position in the global batch; the non-finite guard and the Ctrl-C stop are agreed by an
all-reduce once per micro-batch; saves happen at the same steps everywhere and only the main
process writes files while the others wait.

The Trainer's setup (loop_setup), saves (loop_saving) and process agreement (loop_agreement)
live in mixins beside this file; the loop itself is here.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sdtrain.config.sections import (
    LoggingSection,
    OptimizerSection,
    SavingSection,
    TrainingSection,
)
from sdtrain.data.batch import Batch
from sdtrain.data.steps import StepPlan
from sdtrain.engine import naming
from sdtrain.engine.loop_agreement import LoopAgreement
from sdtrain.engine.loop_optimizer import LoopOptimizer
from sdtrain.engine.loop_records import DeviceWindow, LoopRecords, Settled, StepEnd, known
from sdtrain.engine.loop_saving import LoopSaving
from sdtrain.engine.loop_setup import LoopSetup
from sdtrain.engine.metrics import Trackers
from sdtrain.engine.saves import SavePolicy
from sdtrain.engine.state import (
    Counters,
    LoadedState,
    tidy_output_dir,
)
from sdtrain.methods.base import Method, StepInfo
from sdtrain.models.bundle import ModelBundle
from sdtrain.seeds import derive_seed

logger = logging.getLogger(__name__)
# torch warns when the schedule advances before any optimizer step: a skipped (non-finite) first
# update does that on purpose, since the schedule counts steps, applied or not
_SCHEDULER_ORDER = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class TrainData(Protocol):
    """What the loop needs from the dataset layer."""

    batches_per_epoch: int

    def iterate(self, epoch: int, start: int, step_of: Callable[[int], int]) -> Iterator[Batch]:
        """Batches of `epoch` (1-based) from position `start` on, in the seeded epoch order."""
        ...


@dataclass
class EngineSections:
    """The config sections the engine reads (never the whole run config)."""

    training: TrainingSection
    optimizer: OptimizerSection
    saving: SavingSection
    logging: LoggingSection


@dataclass
class Hooks:
    """Optional callbacks: sampling (kind, epoch, step) and extra save-point metadata."""

    sample: Callable[[str, int, int], None] | None = None
    save_metadata: Callable[[int, int], dict[str, str]] | None = None
    # (step context, "step"|"epoch", epoch, step, files saved at this event) -> metrics record
    validate: Callable[[Any, str, int, int, list[Path]], dict[str, Any] | None] | None = None


@dataclass
class TrainResult:
    """What a finished run produced."""

    global_step: int
    epoch: int
    outputs: list[Path] = field(default_factory=list)
    final_loss: float | None = None


class Trainer(LoopSetup, LoopSaving, LoopAgreement, LoopOptimizer, LoopRecords):
    """Drives a Method over TrainData with the recipe, optimizer, schedule and save policy."""

    def __init__(
        self,
        method: Method,
        bundle: ModelBundle,
        data: TrainData,
        steps: StepPlan,
        sections: EngineSections,
        output_dir: Path,
        output_name: str | None,
        seed: int,
        run_config: dict[str, Any],
        hooks: Hooks | None = None,
        resume: LoadedState | None = None,
        resume_hint: str = "",
        no_half_vae: bool = False,
        trackers: Trackers | None = None,
        accelerator: Any = None,
    ) -> None:
        self.method, self.bundle, self.data, self.steps = method, bundle, data, steps
        self.sections = sections
        self.output_dir = Path(output_dir)
        self.output_name = output_name
        self.seed = seed
        self.run_config = run_config
        self.hooks = hooks or Hooks()
        self.resume = resume
        self.resume_hint = resume_hint
        self.no_half_vae = no_half_vae
        self.trackers = trackers
        self.accelerator = accelerator
        self.outputs: list[Path] = []
        self.compiled: Any = None  # engine.compile.Compiled with torch_compile
        self._schedule_started = False

    # ----------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        """Train to the planned step count; returns what was written."""
        import torch

        from sdtrain.engine.metrics import (
            METRICS_FILE,
            MetricsLog,
            rotate_metrics,
            truncate_metrics,
        )
        from sdtrain.engine.step import sample_generators
        from sdtrain.engine.stop import StopFlag
        from sdtrain.log import progress

        self._setup()
        counters = self._restore()
        self._start_norm = self._weight_norm()
        self.saves = SavePolicy(
            self.sections.saving,
            self.output_dir,
            self.output_name,
            self.steps.num_epochs,
            self.steps.total_steps,
            self.resume.folder if self.resume is not None else None,
        )
        steps = self.steps
        procs = self.processes
        if procs.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tidy_output_dir(self.output_dir)
            if self.resume is not None:
                truncate_metrics(self.output_dir / METRICS_FILE, counters.global_step)
            else:
                rotate_metrics(self.output_dir / METRICS_FILE)
        procs.wait()
        metrics = MetricsLog(self.output_dir, self.trackers) if procs.is_main else None
        self._begin_records(counters, metrics)
        if counters.global_step == 0 and self.resume is None:
            self._sample("first", 0, 0)
        deferred = self.deferred
        started = time.monotonic()
        first_step = counters.global_step
        accumulation = steps.gradient_accumulation_steps
        # a launcher forwards Ctrl-C to its workers, which got it from the terminal already
        grace = 2.0 if procs.count > 1 else 0.0
        try:
            with StopFlag(grace) as stop, progress(disable=not procs.is_main) as bar:
                task = bar.add_task(
                    "training", total=steps.total_steps, completed=counters.global_step, info=""
                )
                while (
                    counters.global_step < steps.total_steps and counters.epoch <= steps.num_epochs
                ):
                    window_losses: list[float] = []
                    window_paths: list[str] = []
                    window_bad = False
                    window = DeviceWindow(self.scaler is not None)
                    window_offset = 0  # samples of the global step batch before this micro-batch
                    position = counters.position
                    for batch in self._stop_on_bad_image(
                        self.data.iterate(
                            counters.epoch, counters.position, self._step_of(counters.epoch)
                        ),
                        counters,
                    ):
                        ends = steps.step_ends_at(position)
                        slots = [window_offset + slot for slot in batch.slots or range(len(batch))]
                        window_offset += batch.global_size or len(batch)
                        with self._sync(ends):
                            generators = sample_generators(self.seed, counters.global_step, slots)
                            torch.manual_seed(
                                derive_seed(self.seed, "torch", counters.global_step, slots[0])
                            )
                            info = self._step_info(counters, slots[0])
                            loss = self.ctx_loss(batch, generators, info)
                            window_paths.extend(batch.paths)
                            if deferred:  # a non-finite loss makes its window skip later
                                window.add(self._agree_on_device(loss, batch, stop))
                                self._backward(loss, batch.loss_weight, accumulation, ends, True)
                            else:
                                value, finite, self._stop_agreed = self._agree(loss, batch, stop)
                                # several processes: every micro-batch goes through backward (DDP's
                                # synchronising forward expects one; without it the next window's
                                # first backward was reduced too); the bad window is skipped after
                                if finite or self.zero is not None or procs.count > 1:
                                    self._backward(
                                        loss, batch.loss_weight, accumulation, ends, finite
                                    )
                                if finite:
                                    window_losses.append(value)
                                else:
                                    window_bad = True
                        position += 1
                        if not ends:
                            continue
                        # the last step's values, copied while this one ran (deferred)
                        self._settle_pending()
                        before = (
                            Counters(**{**counters.__dict__, "position": counters.position}),
                            self.scheduler.state_dict(),
                        )
                        if deferred:
                            found, scale = self._deferred_step(window.bad())
                        else:
                            outcome = self._window_outcome(window_bad)
                        self.optimizer.zero_grad(set_to_none=True)
                        self._step_schedule()
                        counters.global_step += 1
                        counters.position = position
                        info = self._step_info(counters, steps.gradient_accumulation_steps)
                        if deferred:  # the method's work runs on skipped steps too (harmless)
                            after = self.method.after_step(self.bundle, info)
                            read = window.readback(found, scale, after)
                        else:
                            ok = outcome == "ok"
                            after = self.method.after_step(self.bundle, info) if ok else {}
                            after = {key: float(value) for key, value in after.items()}
                            read = known(Settled(list(window_losses), outcome, after))

                        lrs = self.scheduler.get_last_lr()
                        end = StepEnd(
                            counters.global_step,
                            counters.epoch,
                            before,
                            window_paths,
                            {g.name: lr for g, lr in zip(self.groups, lrs, strict=False)},
                            read,
                        )
                        self._step_ended(end, deferred)
                        rate = (counters.global_step - first_step) / max(
                            time.monotonic() - started, 1e-9
                        )
                        smoothed = self.smoothed if self.smoothed is not None else float("nan")
                        bar.update(
                            task,
                            completed=counters.global_step,
                            info=(
                                f"epoch {counters.epoch}/{steps.num_epochs} "
                                f"loss {smoothed:.4f} lr {lrs[0]:.2e} {rate:.2f} it/s"
                            ),
                        )
                        window_losses, window_paths, window_bad = [], [], False
                        window = DeviceWindow(self.scaler is not None)
                        window_offset = 0
                        outputs_before = set(self.outputs)
                        self._after_step_events(counters)
                        self._validate(metrics, "step", counters, outputs_before)
                        if self._stopping(stop, self._stop_agreed):
                            self._interrupt(counters, stop.requested)
                        if counters.global_step >= steps.total_steps:
                            break
                    if (
                        counters.global_step >= steps.total_steps
                        and counters.position < steps.batches_per_epoch
                    ):
                        break
                    outputs_before = set(self.outputs)
                    self._end_epoch(counters)
                    self._validate(metrics, "epoch", counters, outputs_before)
                    if self._stopping(stop, self._stop_agreed):
                        self._interrupt(counters, stop.requested)
                final = naming.final_stem(self.output_name)
                outputs_before = set(self.outputs)
                self._save(final, counters, with_state=self.saves.final_state, final=True)
                self._validate(metrics, "final", counters, outputs_before)
                self._sample("final", counters.epoch, counters.global_step)
        except BaseException:
            self._settle_after_error()
            raise
        finally:
            if metrics is not None:
                metrics.close()
        return TrainResult(counters.global_step, counters.epoch, list(self.outputs), self.last_loss)

    def _validate(self, metrics: Any, kind: str, counters: Counters, before: set[Path]) -> None:
        """The validation hook after a step / epoch event (after its saves, so it can point
        at the files of the same weights). Run by the main process; the others wait."""
        if self.hooks.validate is None:
            return
        epoch = counters.epoch - 1 if kind == "epoch" else counters.epoch
        due = getattr(self.hooks.validate, "due", None)
        if due is None or due(kind, epoch, counters.global_step):
            self._settle_pending()  # its record follows the step's
        if self.processes.is_main:  # evaluates the whole held-out split; the others wait
            saved = [p for p in self.outputs if p not in before]
            with self._uncompiled():
                record = self.hooks.validate(self.ctx, kind, epoch, counters.global_step, saved)
            if record is not None:
                metrics.write(record)
        self.processes.wait()

    def _retire(self, kind: str, value: int) -> None:
        if not self.processes.is_main:
            return
        for path in self.saves.retire(kind, value):
            if path in self.outputs:
                self.outputs.remove(path)

    def _step_schedule(self) -> None:
        """Advance the LR schedule; torch's order warning is filtered for this process's first
        advance only (the only one it checks; a filter on every step would reset the warning
        registry each time and show other once-only warnings again)."""
        if self._schedule_started:
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _SCHEDULER_ORDER, UserWarning)
            self.scheduler.step()
        self._schedule_started = True

    def _step_of(self, epoch: int) -> Callable[[int], int]:
        steps = self.steps
        return lambda position: steps.steps_before(epoch, position)

    def _step_info(self, counters: Counters, position: int) -> StepInfo:
        """Method hook context: its generator is seeded from (seed, "method", step, position);
        `position` is the global-batch position of this process's first sample of the
        micro-batch (the micro-step with batch 1 on one process; never the rank); after_step
        uses the accumulation count."""
        import torch

        seed = derive_seed(self.seed, "method", counters.global_step, position)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return StepInfo(counters.global_step, counters.epoch, generator)

    def ctx_loss(self, batch: Batch, generators: Any, step: StepInfo) -> Any:
        from sdtrain.engine.step import micro_step_loss

        return micro_step_loss(self.ctx, batch, generators, step)

    def _after_step_events(self, counters: Counters) -> None:
        step = counters.global_step
        if self.saves.step_due(step):
            self._save(
                naming.step_stem(self.output_name, step),
                counters,
                with_state=self.sections.saving.save_state,
                final=False,
            )
            self._retire("step", step)
        self._sample("step", counters.epoch, step)

    def _end_epoch(self, counters: Counters) -> None:
        epoch = counters.epoch
        counters.epoch += 1
        counters.position = 0
        if self.saves.epoch_due(epoch):
            self._save(
                naming.epoch_stem(self.output_name, epoch),
                counters,
                with_state=self.sections.saving.save_state,
                final=False,
            )
            self._retire("epoch", epoch)
        self._sample("epoch", epoch, counters.global_step)

    def _stop_on_bad_image(self, batches: Iterator[Batch], counters: Counters) -> Iterator[Batch]:
        """Pass batches through; an image that fails to load mid-run (changed on disk after the
        plan decoded it) writes a state at the last completed step before the DataError stops
        the run, so nothing since the last save is lost."""
        from sdtrain.errors import DataError

        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as error:
                lines = [line for line in error.message.splitlines() if line.strip()]
                reason = lines[-1] if "Traceback" in error.message else error.message
                if self.processes.count > 1:
                    # only this process met the image; the others are inside a collective, so
                    # no state can be written together (the launcher stops them all)
                    raise DataError(
                        f"{reason}\ntraining stopped after step {counters.global_step} on "
                        f"process {self.processes.index}; no state was written at this step",
                        hint="fix or remove the image, then resume from the newest saved state: "
                        f"{self.resume_hint} --resume auto".strip(),
                    ) from None
                stem = naming.step_stem(self.output_name, counters.global_step)
                folder = self._write_state(stem, lambda: self._state_parts(counters))
                raise DataError(
                    f"{reason}\ntraining stopped after step {counters.global_step}; "
                    f"state written to {folder}",
                    hint="fix or remove the image, then resume with: "
                    f"{self.resume_hint} --resume {folder}".strip(),
                ) from None
            yield batch
