"""Training batches from a plan: the seeded epoch order, per-sample augmentation, loading.

Every sample's randomness (caption shuffle/dropout, flip, crop, colour) comes from a
`random.Random` seeded with (seed, epoch, position, slot), so batch k of epoch e is the same
whether it is reached straight or after any number of resumes, in any worker process.

With several processes the epoch is cut into *global* batches of batch_size x processes samples;
each process loads its contiguous slice of every global batch (data.batches.process_share), and
`slot` is the sample's position in the global batch. So one process with batch 2 and two
processes with batch 1 see the same batches and draw the same numbers.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdtrain.data.batches import (
    Share,
    batches_per_epoch,
    epoch_batches,
    interleave_datasets,
    process_share,
)
from sdtrain.data.captions import CaptionRecipe, process_caption, token_warmup_steps
from sdtrain.data.items import DatasetPlan, ImageEntry, SubsetPlan
from sdtrain.seeds import derive_seed

if TYPE_CHECKING:
    from sdtrain.data.batch import Batch
    from sdtrain.data.latent_store import LatentStore

_RECIPE_KEYS = {f.name for f in dataclasses.fields(CaptionRecipe)} - {"replacements"}


def caption_recipe(
    subset: SubsetPlan, max_train_steps: int, replacements: list[tuple[str, Any]] | None = None
) -> CaptionRecipe:
    """The caption pipeline settings of a subset, with token warm-up resolved to steps."""
    values = {k: v for k, v in subset.params.items() if k in _RECIPE_KEYS and v is not None}
    recipe = CaptionRecipe(**values, replacements=list(replacements or []))
    steps = token_warmup_steps(recipe, max_train_steps)
    return dataclasses.replace(recipe, token_warmup_step=steps)


@dataclass(frozen=True)
class SampleRef:
    """One sample slot of a dataset: which subset/image it shows."""

    subset: int
    image: int


def _flag(subset: SubsetPlan, key: str) -> bool:
    return bool(subset.params.get(key) or False)


class TrainDataset:
    """All datasets of a plan, as the epoch-ordered batches the training loop consumes.

    latent_keys: (dataset, subset, image, flipped) -> key in `store`, when latents are cached.
    """

    def __init__(
        self,
        datasets: list[DatasetPlan],
        seed: int,
        max_train_steps: int,
        store: LatentStore | None = None,
        latent_keys: dict[tuple[int, int, int, bool], str] | None = None,
        replacements: list[tuple[str, Any]] | None = None,
        workers: int = 0,
        persistent_workers: bool = False,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> None:
        self.datasets = datasets
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.store = store
        self.latent_keys = latent_keys or {}
        self.workers = workers
        self.persistent_workers = persistent_workers
        self.steps: Any = None  # sdtrain.data.steps.StepPlan; worker processes read it
        self._loader: Any = None
        self._sampler: _Positions | None = None
        self.samples: list[list[SampleRef]] = []
        self.buckets: list[list[list[int]]] = []
        self.recipes = [
            [caption_recipe(s, max_train_steps, replacements) for s in d.subsets] for d in datasets
        ]
        for plan in datasets:
            samples: list[SampleRef] = []
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for s_index, subset in enumerate(plan.subsets):
                for i_index, image in enumerate(subset.images):
                    for _ in range(image.num_repeats):
                        by_bucket.setdefault(image.bucket, []).append(len(samples))
                        samples.append(SampleRef(s_index, i_index))
            self.samples.append(samples)
            self.buckets.append([by_bucket[b] for b in sorted(by_bucket)])
        self.batches_per_epoch = sum(
            batches_per_epoch([len(b) for b in buckets], self.global_batch_size(plan))
            for plan, buckets in zip(datasets, self.buckets, strict=True)
        )

    def global_batch_size(self, plan: DatasetPlan) -> int:
        """Samples per global batch of a dataset: its batch_size x processes."""
        return int(plan.params["batch_size"]) * self.num_processes  # type: ignore[call-overload]

    def epoch_order(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(dataset index, sample ids) for every global batch of `epoch`, in training order."""
        per_dataset = [
            epoch_batches(buckets, self.global_batch_size(plan), self.seed, epoch)
            for plan, buckets in zip(self.datasets, self.buckets, strict=True)
        ]
        return interleave_datasets(per_dataset, self.seed, epoch)

    def share(self, ids: list[int]) -> tuple[list[int], Share]:
        """This process's sample ids of a global batch, and where they sit in it."""
        part = process_share(len(ids), self.num_processes, self.process_index)
        return [ids[slot] for slot in part.slots], part

    def image(self, dataset: int, ref: SampleRef) -> tuple[SubsetPlan, ImageEntry]:
        subset = self.datasets[dataset].subsets[ref.subset]
        return subset, subset.images[ref.image]

    def load(
        self,
        epoch: int,
        position: int,
        dataset: int,
        ids: list[int],
        step: int,
        share: Share | None = None,
    ) -> Batch:
        """Build batch `position` of `epoch` (deterministic for these arguments).

        `share` places `ids` in the global batch (None: `ids` is the whole global batch)."""
        import torch

        from sdtrain.data.batch import Batch

        captions, paths, flips, originals, crops, targets = [], [], [], [], [], []
        pixels, latents, masks, keys = [], [], [], []
        is_reg = []
        slots = list(share.slots) if share is not None else list(range(len(ids)))
        for slot, sample_id in zip(slots, ids, strict=True):
            ref = self.samples[dataset][sample_id]
            subset, entry = self.image(dataset, ref)
            rng = random.Random(derive_seed(self.seed, "sample", epoch, position, slot))
            flip = _flag(subset, "flip_aug") and rng.random() < 0.5
            caption = process_caption(
                entry.caption, self.recipes[dataset][ref.subset], rng, epoch, step
            )
            key = self.latent_keys.get((dataset, ref.subset, ref.image, flip))
            if key is not None and self.store is not None:
                cached = self.store.get(key)
                latents.append(cached["latents"])
                if "alpha_mask" in cached:
                    masks.append(cached["alpha_mask"])
                keys.append(key)
                crop = entry.crop_ltrb
            else:
                tensor, mask, crop = self._pixels(dataset, subset, entry, flip, rng)
                pixels.append(tensor)
                if mask is not None:
                    masks.append(torch.as_tensor(mask))
            captions.append(caption)
            paths.append(str(entry.path))
            flips.append(flip)
            originals.append(entry.original_size)
            crops.append(crop)
            targets.append(entry.bucket)
            is_reg.append(entry.is_reg)
        multiplier = self.datasets[dataset].params.get("network_multiplier") or 1.0
        return Batch(
            captions=captions,
            is_reg=torch.tensor(is_reg, dtype=torch.bool),
            paths=paths,
            original_sizes=originals,
            crop_ltrb=crops,
            target_sizes=targets,
            flipped=flips,
            pixels=torch.stack(pixels) if pixels else None,
            latents=torch.stack(latents) if latents else None,
            alpha_masks=torch.stack(masks) if masks else None,
            network_multiplier=float(multiplier),
            dataset_index=dataset,
            cache_keys=keys,
            slots=slots,
            global_size=share.size if share is not None else len(ids),
            loss_weight=share.weight if share is not None else 1.0,
        )

    def _pixels(
        self, dataset: int, subset: SubsetPlan, entry: ImageEntry, flip: bool, rng: random.Random
    ) -> tuple[Any, Any, tuple[int, int, int, int]]:
        from sdtrain.data.transforms import prepare_pixels

        bucketed = bool(self.datasets[dataset].params.get("enable_bucket"))
        return prepare_pixels(entry.path, transform_spec(subset, entry, flip, bucketed), rng)

    def iterate(self, epoch: int, start: int, step_of: Callable[[int], int]) -> Iterator[Batch]:
        """Batches of `epoch` from position `start`, loaded in worker processes if configured.

        `step_of(position)` gives the optimizer step a batch belongs to (for token warm-up); in
        workers the same value comes from `self.steps` (set by the caller), which pickles.
        """
        order = self.epoch_order(epoch)
        if self.workers <= 0 or len(order) - start <= 1:
            for pos in range(start, len(order)):
                dataset, ids = order[pos]
                mine, share = self.share(ids)
                yield self.load(epoch, pos, dataset, mine, step_of(pos), share)
            return
        if self._loader is None:
            import torch.utils.data as tud

            self._sampler = _Positions()
            self._loader = tud.DataLoader(
                _ByPosition(self),
                batch_size=None,
                sampler=self._sampler,
                num_workers=self.workers,
                collate_fn=_identity,
                persistent_workers=self.persistent_workers,
                worker_init_fn=_leave_interrupts_to_main,
            )
        assert self._sampler is not None
        self._sampler.items = [(epoch, pos) for pos in range(start, len(order))]
        yield from self._loader


def transform_spec(subset: SubsetPlan, entry: ImageEntry, flip: bool, bucketed: bool) -> Any:
    """The pixel pipeline settings of one image (bucket geometry from the plan).

    Face-crop augmentation applies only without bucketing, as in the reference (§4.5).
    """
    from sdtrain.data.transforms import TransformSpec

    params = subset.params
    return TransformSpec(
        bucket=entry.bucket,
        resized=entry.resized_size,
        interpolation=params.get("resize_interpolation"),
        random_crop=bool(params.get("random_crop")),
        flip=flip,
        color_aug=bool(params.get("color_aug")),
        alpha_mask=bool(params.get("alpha_mask")),
        face_crop_range=None if bucketed else params.get("face_crop_aug_range"),
    )


def _identity(item: Any) -> Any:
    return item


def _leave_interrupts_to_main(worker_id: int) -> None:
    """Workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the
    main process finishes the step (and needs its workers for that) before writing a state."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Positions:
    """Sampler over (epoch, position) pairs; the main process refills it every epoch."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class _ByPosition:
    """Map-style view keyed by (epoch, position) for torch DataLoader workers."""

    def __init__(self, dataset: TrainDataset) -> None:
        self.dataset = dataset
        self._orders: dict[int, list[tuple[int, list[int]]]] = {}

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        epoch, position = key
        if epoch not in self._orders:
            self._orders = {epoch: self.dataset.epoch_order(epoch)}
        dataset, ids = self._orders[epoch][position]
        steps = self.dataset.steps
        step = steps.steps_before(epoch, position) if steps is not None else 0
        mine, share = self.dataset.share(ids)
        return self.dataset.load(epoch, position, dataset, mine, step, share)
