"""The one training loop shared by every method: steps, accumulation, guards, saves, resume.

Every random draw is derived from (seed, stream, counters) (sdtrain.seeds), and states are taken
only at optimizer-step boundaries, so a resumed run is bit-identical to a straight one on CPU.
"""

from __future__ import annotations

import logging
import math
import time
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
from sdtrain.engine.metrics import Trackers
from sdtrain.engine.saves import SavePolicy, nonfinite_cause, nonfinite_hint
from sdtrain.engine.state import (
    Counters,
    LoadedState,
    StateParts,
    save_state,
    tidy_output_dir,
)
from sdtrain.errors import Interrupted, TrainingError
from sdtrain.methods.base import Method, SavePoint, StepInfo
from sdtrain.models.bundle import ModelBundle
from sdtrain.seeds import derive_seed

logger = logging.getLogger(__name__)


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


class Trainer:
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
        self.outputs: list[Path] = []

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        import torch

        from sdtrain.engine.loss import LossRecipe
        from sdtrain.engine.noise import NoiseRecipe
        from sdtrain.engine.optim import build_optimizer
        from sdtrain.engine.precision import apply_precision, precision_for
        from sdtrain.engine.schedule import build_lr_scheduler
        from sdtrain.engine.step import StepContext

        training = self.sections.training
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = precision_for(training, self.no_half_vae, self.device.type)
        torch.manual_seed(derive_seed(self.seed, "init"))
        self.groups = self.method.prepare(self.bundle)
        bundle = self.bundle
        text_encoders = bundle.family.text_encoders(bundle)
        apply_precision([bundle.unet, *text_encoders], self.precision)
        # plain nn.Module.to: diffusers' own .to() warns about fp32-pinned modules we manage
        torch.nn.Module.to(bundle.vae, self.device, dtype=self.precision.vae)
        torch.nn.Module.to(bundle.unet, self.device)
        for text_encoder in text_encoders:
            torch.nn.Module.to(text_encoder, self.device)
        bundle.vae.requires_grad_(False)
        if training.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
            if self.method.train_text_encoder():
                for text_encoder in text_encoders:
                    text_encoder.gradient_checkpointing_enable()
        self.params = [p for g in self.groups for p in g.params]
        self.built = build_optimizer(self.groups, self.sections.optimizer)
        self.optimizer = self.built.optimizer
        self.fused = None
        if self.sections.optimizer.fused_backward_pass:
            from sdtrain.engine.fused_backward import FusedBackward

            self.fused = FusedBackward(self.optimizer, training.max_grad_norm)
        self.scheduler = build_lr_scheduler(
            self.optimizer, self.sections.optimizer, self.steps.total_steps
        )
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.precision.mixed_precision == "fp16" else None
        )
        noise = NoiseRecipe(training, bundle.noise_scheduler, bundle.family.is_v)
        self.ctx = StepContext(
            self.method, bundle, noise, LossRecipe(training, noise), self.precision, self.device
        )

    def _restore(self) -> Counters:
        if self.resume is None:
            return Counters(seed=self.seed)
        state = self.resume
        self.method.load_trainable_state(state.trainable)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        state.restore_global_rng()
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            state.folder,
            state.counters.global_step,
            state.counters.epoch,
            state.counters.position,
        )
        return state.counters

    # ----------------------------------------------------------------- saving
    def _state_parts(self, counters: Counters, scheduler_state: dict | None = None) -> StateParts:
        return StateParts(
            counters=counters,
            trainable=self.method.trainable_state(),
            optimizer=self.optimizer.state_dict(),
            scheduler=scheduler_state or self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            config=self.run_config,
        )

    def _save(self, stem: str, counters: Counters, with_state: bool, final: bool) -> None:
        # Epochs completed, as the reference's ss_epoch: step and epoch saves count finished
        # epochs only (epoch saves run after the counter moved on); the final save counts the
        # epoch it ends in. (Passing the in-progress counter made epoch saves say one too many.)
        ended_mid_epoch = final and counters.position > 0
        epoch_done = counters.epoch if ended_mid_epoch else counters.epoch - 1
        metadata = (
            self.hooks.save_metadata(counters.global_step, epoch_done)
            if self.hooks.save_metadata
            else {}
        )
        point = SavePoint(self.output_dir, stem, epoch_done, counters.global_step, final, metadata)
        self.saves.ensure_space(stem, self.params, self.optimizer if with_state else None)
        with self._eval_mode():
            self.outputs.extend(self.method.export(self.bundle, point))
        if with_state:
            folder = save_state(
                self.output_dir / naming.state_dir_name(stem), self._state_parts(counters)
            )
            logger.info("state saved: %s", folder)

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
        steps, training = self.steps, self.sections.training
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tidy_output_dir(self.output_dir)
        if self.resume is not None:
            truncate_metrics(self.output_dir / METRICS_FILE, counters.global_step)
        else:
            rotate_metrics(self.output_dir / METRICS_FILE)
        metrics = MetricsLog(self.output_dir, self.trackers)
        if self.hooks.sample and counters.global_step == 0 and self.resume is None:
            self.hooks.sample("first", 0, 0)
        last_loss: float | None = None
        bad_run: list[str] = []  # image paths of consecutive non-finite steps
        before_bad: tuple[Counters, dict] | None = None
        smoothed = None
        started = time.monotonic()
        first_step = counters.global_step
        try:
            with StopFlag() as stop, progress() as bar:
                task = bar.add_task(
                    "training", total=steps.total_steps, completed=counters.global_step, info=""
                )
                while (
                    counters.global_step < steps.total_steps and counters.epoch <= steps.num_epochs
                ):
                    window_losses: list[float] = []
                    window_paths: list[str] = []
                    window_bad = False
                    position = counters.position
                    for batch in self._stop_on_bad_image(
                        self.data.iterate(
                            counters.epoch, counters.position, self._step_of(counters.epoch)
                        ),
                        counters,
                    ):
                        micro = position % steps.gradient_accumulation_steps
                        generator = torch.Generator(device="cpu").manual_seed(
                            derive_seed(self.seed, "noise", counters.global_step, micro)
                        )
                        torch.manual_seed(
                            derive_seed(self.seed, "torch", counters.global_step, micro)
                        )
                        info = self._step_info(counters, micro)
                        loss = self.ctx_loss(batch, generator, info)
                        value = float(loss.detach())
                        window_paths.extend(batch.paths)
                        if math.isfinite(value):
                            self._backward(loss / steps.gradient_accumulation_steps)
                            window_losses.append(value)
                        else:
                            window_bad = True
                        position += 1
                        if not steps.step_ends_at(position - 1):
                            continue
                        sched_before = self.scheduler.state_dict()
                        counters_before = Counters(
                            **{**counters.__dict__, "position": counters.position}
                        )
                        finite = not window_bad and self._optimizer_step()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.scheduler.step()
                        counters.global_step += 1
                        counters.position = position
                        record: dict[str, Any] = {
                            "step": counters.global_step,
                            "epoch": counters.epoch,
                        }
                        if finite:
                            bad_run, before_bad = [], None
                            last_loss = sum(window_losses) / len(window_losses)
                            record["loss"] = last_loss
                            info = self._step_info(counters, steps.gradient_accumulation_steps)
                            record.update(self.method.after_step(self.bundle, info))
                        else:
                            counters.nonfinite_skipped += 1
                            if before_bad is None:
                                before_bad = (counters_before, sched_before)
                            bad_run.append(", ".join(window_paths))
                            record["nonfinite"] = True
                            record["images"] = window_paths
                            logger.warning(
                                "step %d: non-finite loss or gradient, update skipped (images: %s)",
                                counters.global_step,
                                ", ".join(window_paths),
                            )
                        for group, lr in zip(
                            self.groups, self.scheduler.get_last_lr(), strict=False
                        ):
                            record[f"lr/{group.name}"] = lr
                        metrics.write(record)
                        if len(bad_run) >= training.max_nonfinite_steps:
                            # after the record: the step that ends the run is reported too
                            self._stop_nonfinite(before_bad, bad_run)
                        if last_loss is not None:
                            smoothed = (
                                last_loss if smoothed is None else 0.9 * smoothed + 0.1 * last_loss
                            )
                        rate = (counters.global_step - first_step) / max(
                            time.monotonic() - started, 1e-9
                        )
                        bar.update(
                            task,
                            completed=counters.global_step,
                            info=(
                                f"epoch {counters.epoch}/{steps.num_epochs} "
                                f"loss {smoothed if smoothed is not None else float('nan'):.4f} "
                                f"lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.2f} it/s"
                            ),
                        )
                        window_losses, window_paths, window_bad = [], [], False
                        before = set(self.outputs)
                        self._after_step_events(counters)
                        self._validate(metrics, "step", counters, before)
                        if stop.requested:
                            self._interrupt(counters, stop.requested)
                        if counters.global_step >= steps.total_steps:
                            break
                    if (
                        counters.global_step >= steps.total_steps
                        and counters.position < steps.batches_per_epoch
                    ):
                        break
                    before = set(self.outputs)
                    self._end_epoch(counters)
                    self._validate(metrics, "epoch", counters, before)
                    if stop.requested:
                        self._interrupt(counters, stop.requested)
                final = naming.final_stem(self.output_name)
                before = set(self.outputs)
                self._save(final, counters, with_state=self.saves.final_state, final=True)
                self._validate(metrics, "final", counters, before)
                if self.hooks.sample:
                    self.hooks.sample("final", counters.epoch, counters.global_step)
        finally:
            metrics.close()
        return TrainResult(counters.global_step, counters.epoch, list(self.outputs), last_loss)

    def _validate(self, metrics: Any, kind: str, counters: Counters, before: set[Path]) -> None:
        """The validation hook after a step / epoch event (after its saves, so it can point
        at the files of the same weights)."""
        if self.hooks.validate is None:
            return
        epoch = counters.epoch - 1 if kind == "epoch" else counters.epoch
        saved = [p for p in self.outputs if p not in before]
        record = self.hooks.validate(self.ctx, kind, epoch, counters.global_step, saved)
        if record is not None:
            metrics.write(record)

    def _retire(self, kind: str, value: int) -> None:
        for path in self.saves.retire(kind, value):
            if path in self.outputs:
                self.outputs.remove(path)

    def _step_of(self, epoch: int) -> Callable[[int], int]:
        steps = self.steps
        return lambda position: steps.steps_before(epoch, position)

    def _step_info(self, counters: Counters, position: int) -> StepInfo:
        """Method hook context: its generator is seeded from (seed, "method", step, position);
        `position` is the micro-step (after_step uses the accumulation count)."""
        import torch

        seed = derive_seed(self.seed, "method", counters.global_step, position)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return StepInfo(counters.global_step, counters.epoch, generator)

    def ctx_loss(self, batch: Batch, generator: Any, step: StepInfo) -> Any:
        from sdtrain.engine.step import micro_step_loss

        return micro_step_loss(self.ctx, batch, generator, step)

    def _backward(self, loss: Any) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> bool:
        """Clip, check gradients, step. False (and no update) when gradients are not finite."""
        import torch

        if self.fused is not None:  # every weight was updated during backward
            return self.fused.take_finite()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.sections.training.max_grad_norm
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return True
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
            )
        if not torch.isfinite(norm):
            if self.scaler is not None:
                self.scaler.update()
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return True

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
        if self.hooks.sample:
            self.hooks.sample("step", counters.epoch, step)

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
        if self.hooks.sample:
            self.hooks.sample("epoch", epoch, counters.global_step)

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
                stem = naming.step_stem(self.output_name, counters.global_step)
                folder = save_state(
                    self.output_dir / naming.state_dir_name(stem), self._state_parts(counters)
                )
                lines = [line for line in error.message.splitlines() if line.strip()]
                reason = lines[-1] if "Traceback" in error.message else error.message
                raise DataError(
                    f"{reason}\ntraining stopped after step {counters.global_step}; "
                    f"state written to {folder}",
                    hint="fix or remove the image, then resume with: "
                    f"{self.resume_hint} --resume {folder}".strip(),
                ) from None
            yield batch

    def _interrupt(self, counters: Counters, signal_name: str) -> None:
        stem = naming.step_stem(self.output_name, counters.global_step)
        folder = save_state(
            self.output_dir / naming.state_dir_name(stem), self._state_parts(counters)
        )
        raise Interrupted(
            f"{signal_name}: stopped after step {counters.global_step}; state written to {folder}",
            hint=f"resume with: {self.resume_hint} --resume {folder}".strip(),
        )

    def _stop_nonfinite(self, before: tuple[Counters, dict] | None, paths: list[str]) -> None:
        assert before is not None
        counters, scheduler_state = before
        stem = naming.step_stem(self.output_name, counters.global_step)
        folder = save_state(
            self.output_dir / naming.state_dir_name(stem),
            self._state_parts(counters, scheduler_state),
        )
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
