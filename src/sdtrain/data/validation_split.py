"""Hold out a validation split (reference §9.7, with its overlap bug fixed): which images of a
dataset never train and are only used for the validation loss.

Deterministic and stable: each training subset's images are ordered by a hash of (seed, path
relative to the subset folder) and the first round(N * split) are held out (at least one when
the split is positive, never all of them). Adding an image to a folder does not reshuffle the
others. Regularization subsets stay whole in training and are never validated, as in the
reference. Unlike the reference, fine-tune datasets are split too (the reference validates on a
full copy of the training data), and the train and validation parts never overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

from sdtrain.data.items import DatasetPlan, ImageEntry, SubsetPlan


def _order_key(seed: int, subset: SubsetPlan, image: ImageEntry) -> str:
    base = subset.image_dir
    path = image.path
    name = path.relative_to(base) if base and path.is_relative_to(base) else path
    return hashlib.sha256(f"{seed}:{name.as_posix()}".encode()).hexdigest()


def held_out_count(count: int, split: float) -> int:
    """Images held out of `count`: round-half-up(count * split), at least 1, at most count - 1."""
    if split <= 0 or count < 2:
        return 0
    return min(count - 1, max(1, math.floor(count * split + 0.5)))


def split_validation(plan: DatasetPlan, default_seed: int | None) -> None:
    """Move the held-out images of `plan`'s training subsets into `plan.validation`.

    The dataset's `validation_split` (0 = none) and `validation_seed` (else `default_seed`, the
    run's seed, else 0) decide the split. Held-out images get num_repeats 1 in validation.
    """
    split = float(plan.params.get("validation_split") or 0.0)
    if split <= 0:
        return
    seed = plan.params.get("validation_seed")
    seed = int(seed if seed is not None else default_seed if default_seed is not None else 0)
    plan.validation_seed = seed
    for subset in plan.subsets:
        if subset.is_reg:
            continue
        count = held_out_count(len(subset.images), split)
        if count == 0:
            if subset.images:
                plan.warnings.append(
                    f"{subset.label}: {len(subset.images)} image(s) are too few to hold one out "
                    f"(validation_split = {split}); all of them train"
                )
            continue
        ordered = sorted(subset.images, key=lambda i: _order_key(seed, subset, i))
        held = {id(i) for i in ordered[:count]}
        kept = [i for i in subset.images if id(i) not in held]
        out = [dataclasses.replace(i, num_repeats=1) for i in subset.images if id(i) in held]
        subset.images = kept
        plan.validation.append(dataclasses.replace(subset, images=out))
