"""Regularization balancing: reg images get repeats so reg samples match train samples (§4.7)."""

from __future__ import annotations


def balance_regularization(num_train: int, reg_repeats: list[int]) -> list[int]:
    """Repeats of each regularization image after balancing, in the given order (0 = unused).

    `num_train` is the number of training samples (sum of repeats x images of the train subsets);
    `reg_repeats` holds each reg image's own repeats, in subset order then sorted path order.
    Same result as the reference's loop: the first pass takes images (with their own repeats)
    until the reg total reaches `num_train`, so with too many reg images only a deterministic
    prefix is used and the total may overshoot by less than one image's repeats; later passes add
    one repeat per image round-robin until the totals are exactly equal. No train samples, or no
    reg samples: all zeros.
    Computed in closed form (the reference loops once per missing sample).
    """
    if num_train < 0 or any(r < 0 for r in reg_repeats):
        raise ValueError("sample counts and repeats cannot be negative")
    result = [0] * len(reg_repeats)
    if num_train == 0 or sum(reg_repeats) == 0:
        return result
    total = 0
    for i, repeats in enumerate(reg_repeats):
        result[i] = repeats
        total += repeats
        if total >= num_train:
            return result
    missing = num_train - total
    rounds, extra = divmod(missing, len(reg_repeats))
    return [r + rounds + (1 if i < extra else 0) for i, r in enumerate(result)]
