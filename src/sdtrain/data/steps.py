"""Step/epoch accounting shared by `dataset plan` and the training loop (one formula, one place)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """How long a run is: batches per epoch, optimizer steps per epoch, epochs, total steps."""

    batches_per_epoch: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    num_epochs: int
    total_steps: int

    def step_ends_at(self, position: int) -> bool:
        """True when the batch at `position` closes an accumulation window (optimizer step)."""
        return (
            position + 1
        ) % self.gradient_accumulation_steps == 0 or position + 1 == self.batches_per_epoch

    def steps_before(self, epoch: int, position: int) -> int:
        """Optimizer steps completed before batch (epoch, position) runs."""
        return (epoch - 1) * self.steps_per_epoch + position // self.gradient_accumulation_steps


def plan_steps(
    batches_per_epoch: int,
    gradient_accumulation_steps: int,
    max_train_steps: int,
    max_train_epochs: int | None,
) -> StepPlan:
    """Epochs win over steps; steps/epoch = ceil(global batches / accumulation).

    `batches_per_epoch` counts *global* batches (batch_size x processes samples each; every
    process takes a slice of each), so the step count does not depend on the process count
    beyond that. (The reference deals whole per-process batches out to the processes and
    divides the batch count by them; here one process with batch 2 and two with batch 1 make
    the same steps.)
    """
    if batches_per_epoch <= 0:
        raise ValueError("the dataset has no batches")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    if max_train_epochs is not None:
        epochs = max_train_epochs
        total = epochs * steps_per_epoch
    else:
        total = max_train_steps
        epochs = math.ceil(total / steps_per_epoch)
    return StepPlan(batches_per_epoch, gradient_accumulation_steps, steps_per_epoch, epochs, total)
