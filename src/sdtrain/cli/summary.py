"""The few lines printed before a run starts: data counts, buckets, steps, where output goes.

The full plan (every subset, origin and bucket) stays with `sdtrain dataset plan` and
`--dry-run`; a run shows this summary instead, and `-q` drops it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from sdtrain.data.plan import Plan

_BUCKETS_SHOWN = 4


def summary_lines(plan: Plan, output: str) -> list[str]:
    """Counts, buckets, steps (and the global batch of a multi-process run) of `plan` in at
    most five short lines."""
    datasets = plan.datasets
    images = sum(len(s.images) for d in datasets for s in d.subsets if not s.is_reg)
    reg = sum(len(s.images) for d in datasets for s in d.subsets if s.is_reg)
    samples = sum(d.num_train_images + d.num_reg_images for d in datasets)
    held = sum(d.num_validation_images for d in datasets)
    noun = "dataset" if len(datasets) == 1 else "datasets"
    data = f"data: {len(datasets)} {noun}, {images} images"
    data += f" + {reg} reg" if reg else ""
    data += f", {samples} samples/epoch"
    data += f", {held} held out" if held else ""
    buckets: dict[tuple[int, int], int] = {}
    for dataset in datasets:
        for bucket in dataset.buckets:
            buckets[bucket.resolution] = buckets.get(bucket.resolution, 0) + bucket.batches
    shown = sorted(buckets.items(), key=lambda item: -item[1])[:_BUCKETS_SHOWN]
    text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in shown)
    more = f", +{len(buckets) - len(shown)} more" if len(buckets) > len(shown) else ""
    lines = [data, f"buckets (batches): {text}{more}"]
    steps = plan.steps
    if steps is not None:
        lines.append(
            f"steps: {steps.batches_per_epoch} batches/epoch, {steps.steps_per_epoch} steps/epoch"
            f" x {steps.num_epochs} epochs = {steps.total_steps} optimizer steps"
        )
    processes = plan.facts.num_processes
    if processes > 1:  # several processes: each trains a slice of every global batch
        accumulation = plan.facts.gradient_accumulation_steps
        sizes = sorted({d.batch_size for d in datasets}) or [1]
        per = "/".join(str(b) for b in sizes)
        total = "/".join(str(b * processes * accumulation) for b in sizes)
        from sdtrain.engine.zero import zero_requested

        zero = ", DeepSpeed ZeRO: optimizer state split over them" if zero_requested() else ""
        lines.append(
            f"global batch: {per} x {processes} processes x {accumulation} accumulation"
            f" = {total} samples/step{zero}"
        )
    lines.append(f"output: {output}  (full plan: sdtrain dataset plan, or --dry-run)")
    return lines


def print_summary(console: Console, plan: Plan, output: str) -> None:
    """Print the summary unless -q asked for warnings only."""
    if logging.getLogger("sdtrain").getEffectiveLevel() > logging.INFO:
        return
    for line in summary_lines(plan, output):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
