"""An epoch's batch order: bucket contents shuffled, cut into batches, batches shuffled (§4.6).

Every order is a pure function of (seed, epoch), drawn from a local `random.Random` seeded with
`sdtrain.seeds.derive_seed`. sdtrain differs from the reference, which reseeds Python's global RNG
with `seed + epoch` and shuffles the previous epoch's order again in place (§13.16): here each
epoch starts from the canonical bucket order, so any epoch can be rebuilt on resume without
replaying earlier ones, and no other random draw is disturbed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sdtrain.seeds import derive_seed


def batches_per_epoch(bucket_sizes: list[int], batch_size: int) -> int:
    """Batches in one epoch: sum over buckets of ceil(samples_with_repeats / batch_size)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return sum(math.ceil(size / batch_size) for size in bucket_sizes)


def epoch_batches(
    buckets: list[list[int]], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """The epoch's batches of one dataset, in training order.

    `buckets[b]` lists the sample indices of bucket b, each image repeated `num_repeats` times.
    Each bucket's contents are shuffled and cut into `ceil(len / batch_size)` batches (the last one
    may be short; batches never mix buckets), then the list of all batches is shuffled.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    rng = random.Random(derive_seed(seed, "epoch-batches", epoch))
    batches: list[list[int]] = []
    for bucket in buckets:
        contents = list(bucket)
        rng.shuffle(contents)
        batches.extend(contents[i : i + batch_size] for i in range(0, len(contents), batch_size))
    rng.shuffle(batches)
    return batches


def interleave_datasets(
    per_dataset_batches: list[list[list[int]]], seed: int, epoch: int
) -> list[tuple[int, list[int]]]:
    """All datasets' batches of an epoch as `(dataset_index, batch)`, shuffled together.

    Like the reference's shuffled ConcatDataset: batches of different datasets interleave at
    random, but a batch always comes from one dataset (which may have its own batch size).
    """
    tagged = [
        (index, batch) for index, batches in enumerate(per_dataset_batches) for batch in batches
    ]
    random.Random(derive_seed(seed, "epoch-datasets", epoch)).shuffle(tagged)
    return tagged


@dataclass(frozen=True)
class Share:
    """One process's part of a global batch.

    `slots` are the positions of this process's samples inside the global batch (per-sample
    random draws are keyed by them, never by the rank); `size` is the global batch's sample
    count. `padding` marks a process whose share is empty (a bucket's last global batch has
    fewer samples than processes): it runs the batch's last sample with loss weight 0, so that
    every process takes part in the gradient exchange.
    """

    slots: tuple[int, ...]
    size: int
    processes: int = 1
    padding: bool = False

    @property
    def weight(self) -> float:
        """Multiplier of this process's mean loss so that the mean over processes is the mean
        over the global batch's samples: real samples here x processes / global samples."""
        if self.padding:
            return 0.0
        return len(self.slots) * self.processes / self.size


def process_share(size: int, num_processes: int, rank: int) -> Share:
    """Rank `rank`'s contiguous slice of a global batch of `size` samples (sizes differ by at
    most one; one process and N processes see the same global batch)."""
    base, extra = divmod(size, num_processes)
    count = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    if count == 0:
        return Share((size - 1,), size, num_processes, padding=True)
    return Share(tuple(range(start, start + count)), size, num_processes)
