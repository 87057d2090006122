"""Validation loss on the held-out split (reference §9.7) and the pointer to the best checkpoint.

The loss is the training recipe's loss on the held-out images at fixed timesteps (4 points:
`linspace(min_t, max_t, 6)[1:-1]`, i.e. 200/400/600/800 by default) with fixed noise: the
generator of (batch, timestep) is seeded from (validation seed, batch, timestep), so every
evaluation of a run sees the same inputs and values are comparable over time. Held-out images
are read without augmentation (no flips, crops, colour changes, caption shuffle or dropout).
Evaluation runs without gradients, with the method's eval switches (its `sampling` context:
adapter dropout off), and restores torch's global RNG afterwards, so training is unchanged by it.

`<output_dir>/best.json` names the best evaluation so far: loss, step, epoch, and the model and
state files saved at that same step or epoch (null when none was: save at the validation
cadence to get a file for every evaluation). A resumed run keeps the best of the steps it
continues from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.config.sections import TrainingSection
from sdtrain.data.items import DatasetPlan
from sdtrain.seeds import derive_seed

if TYPE_CHECKING:
    from sdtrain.data.dataset import TrainDataset
    from sdtrain.engine.step import StepContext

logger = logging.getLogger(__name__)

BEST_FILE = "best.json"
METRIC = "loss/validation"
# subset keys that make a sample random: off for validation (the inputs must not change)
_NO_AUGMENT: dict[str, Any] = {
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
    "face_crop_aug_range": None,
    "shuffle_caption": False,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "token_warmup_step": 0,
}


def fixed_timesteps(min_timestep: int, max_timestep: int) -> list[int]:
    """The 4 evaluation timesteps: linspace(min_t, max_t, 6) without its ends, rounded."""
    span = max_timestep - min_timestep
    return [int(round(min_timestep + span * k / 5)) for k in range(1, 5)]


def validation_plans(datasets: list[DatasetPlan]) -> list[DatasetPlan]:
    """Datasets made of the held-out images only (one sample each, augmentation off)."""
    plans = []
    for plan in datasets:
        if not plan.validation:
            continue
        subsets = [
            dataclasses.replace(s, params={**s.params, **_NO_AUGMENT}, num_repeats=1)
            for s in plan.validation
        ]
        plans.append(dataclasses.replace(plan, subsets=subsets, validation=[], buckets=[]))
    return plans


def validation_loss(
    ctx: StepContext,
    data: TrainDataset,
    seed: int,
    timesteps: list[int],
    max_batches: int | None = None,
) -> float:
    """Mean recipe loss over the held-out batches x `timesteps` (per sample), fixed noise."""
    import torch

    from sdtrain.engine.step import micro_step_loss
    from sdtrain.methods.base import StepInfo

    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    total, count = 0.0, 0
    try:
        with torch.no_grad(), ctx.method.sampling(ctx.bundle):
            for index, batch in enumerate(data.iterate(1, 0, lambda _position: 0)):
                if max_batches is not None and index >= max_batches:
                    break
                for t in timesteps:
                    generator = torch.Generator(device="cpu").manual_seed(
                        derive_seed(seed, "validation", index, t)
                    )
                    method_draws = torch.Generator(device="cpu").manual_seed(
                        derive_seed(seed, "validation-method", index, t)
                    )
                    info = StepInfo(global_step=0, epoch=1, generator=method_draws)
                    loss = micro_step_loss(ctx, batch, generator, info, timestep=t)
                    total += float(loss) * len(batch)
                    count += len(batch)
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    return total / max(count, 1)


class Validator:
    """Decides when to evaluate, computes the loss, keeps best.json. Call at step/epoch events."""

    def __init__(
        self,
        datasets: list[DatasetPlan],
        seed: int,
        training: TrainingSection,
        output_dir: Path,
        resumed_step: int | None = None,
        store: Any = None,
        latent_keys: dict[tuple[int, int, int, bool], str] | None = None,
    ) -> None:
        """store / latent_keys: the held-out images' cached latents, keyed as
        `validation_plans(datasets)` numbers them; without them the images are encoded at every
        evaluation."""
        from sdtrain.data.dataset import TrainDataset

        plans = validation_plans(datasets)
        self.data = TrainDataset(plans, seed, 1, store, latent_keys) if plans else None
        self.seed = next((p.validation_seed for p in datasets if p.validation), None) or seed
        self.every_steps = training.validate_every_n_steps
        self.every_epochs = training.validate_every_n_epochs or (None if self.every_steps else 1)
        self.max_batches = training.max_validation_steps
        self.min_t = training.min_timestep or 0
        self.max_t = training.max_timestep if training.max_timestep is not None else 1000
        self.path = Path(output_dir) / BEST_FILE
        self.best = self._read_best(resumed_step)

    @property
    def active(self) -> bool:
        return self.data is not None

    def _read_best(self, resumed_step: int | None) -> dict[str, Any] | None:
        if resumed_step is None or not self.path.is_file():
            return None
        try:
            best = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        # a best from past the state we continue from belongs to an abandoned attempt
        return best if int(best.get("step", 0)) <= resumed_step else None

    def due(self, kind: str, epoch: int, step: int) -> bool:
        """kind "step": after optimizer step `step`; "epoch": after epoch `epoch` ended."""
        if self.data is None:
            return False
        if kind == "step":
            return self.every_steps is not None and step % self.every_steps == 0
        return kind == "epoch" and self.every_epochs is not None and epoch % self.every_epochs == 0

    def __call__(
        self, ctx: StepContext, kind: str, epoch: int, step: int, saved: list[Path]
    ) -> dict[str, Any] | None:
        """The metrics record of an evaluation when one is due, else None.

        kind "final" (after the final save) evaluates nothing: when the best evaluation was at
        this last step, where no step file is written, best.json then names the final files.
        """
        if kind == "final":
            if self.best is not None and self.best["step"] == step and self.best["model"] is None:
                self._point_at(self.best, saved)
            return None
        if not self.due(kind, epoch, step):
            return None
        assert self.data is not None
        timesteps = fixed_timesteps(self.min_t, self.max_t)
        value = validation_loss(ctx, self.data, self.seed, timesteps, self.max_batches)
        where = f"epoch {epoch}" if kind == "epoch" else f"step {step}"
        logger.info("validation loss after %s: %.5f", where, value)
        self._update_best(value, kind, epoch, step, saved)
        return {"step": step, "epoch": epoch, METRIC: value, "validation_at": kind}

    def _update_best(
        self, value: float, kind: str, epoch: int, step: int, saved: list[Path]
    ) -> None:
        if self.best is not None and not value < float(self.best["value"]):
            return
        self.best = {"metric": METRIC, "value": value, "step": step, "epoch": epoch, "at": kind}
        self._point_at(self.best, saved)

    def _point_at(self, best: dict[str, Any], saved: list[Path]) -> None:
        """Record the model (and its state folder) saved with these weights; write best.json."""
        from sdtrain.atomic import write_text
        from sdtrain.engine.naming import state_dir_name

        model_path = next((p for p in saved if p.is_file()), None)
        best["model"] = model_path.name if model_path else None
        best["state"] = None
        if model_path is not None:
            folder = model_path.parent / state_dir_name(model_path.name.split(".")[0])
            best["state"] = folder.name if folder.is_dir() else None
        write_text(self.path, json.dumps(best, indent=2) + "\n")


ValidateHook = Callable[[Any, str, int, int, list[Path]], dict[str, Any] | None]
