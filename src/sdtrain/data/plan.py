"""The dataset plan: every image with its caption, repeats, bucket and crop, the buckets, batches
and step totals. `sdtrain dataset plan` shows it and training consumes exactly this object.

Deterministic: images in sorted order per subset, buckets sorted, reg balancing a pure function of
the counts. No torch here (the plan must be instant to compute and import).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.config.chain import ResolvedDataset, ResolvedSubset
from sdtrain.data.balance import balance_regularization
from sdtrain.data.buckets import (
    BucketChoice,
    assign_bucket,
    assign_fixed,
    crop_ltrb,
    make_bucket_resolutions,
    normalize_bucket_limits,
)
from sdtrain.data.collect import Collected, SubsetSkipped, collect_dreambooth, collect_finetune
from sdtrain.data.items import BucketStat, DatasetPlan, InvalidImage, Size, SubsetPlan
from sdtrain.data.metadata import FolderIndex
from sdtrain.data.steps import StepPlan, plan_steps
from sdtrain.data.validation_split import split_validation
from sdtrain.errors import ConfigError, DataError, Problem

if TYPE_CHECKING:
    from sdtrain.config.blueprint import Support
    from sdtrain.config.loader import LoadedConfig
    from sdtrain.config.sections import DatasetSection, TrainingSection

log = logging.getLogger(__name__)

_LISTED = 5  # examples listed per warning / error


@dataclass(frozen=True)
class StepSettings:
    """The few training keys the plan needs for its step/epoch totals."""

    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    seed: int | None = None  # the run's seed: the validation split's default seed

    @classmethod
    def from_section(cls, training: TrainingSection, num_processes: int = 1) -> StepSettings:
        """Facts of a [training] table (num_processes: data-parallel processes, 1 on one GPU)."""
        return cls(
            training.max_train_steps,
            training.max_train_epochs,
            training.gradient_accumulation_steps,
            num_processes,
            training.seed,
        )


@dataclass
class Plan:
    """All datasets of a run, resolved to images, buckets and batches, plus the step totals."""

    datasets: list[DatasetPlan]
    facts: StepSettings
    steps: StepPlan | None  # None when there is nothing to train on
    source: str = ""
    skip_invalid_images: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # run facts shown with the totals

    @property
    def batches_per_epoch(self) -> int:
        """Sum over datasets and buckets of ceil(samples / batch_size)."""
        return sum(d.batches for d in self.datasets)

    def invalid_images(self) -> list[InvalidImage]:
        """Every unusable file found, over all datasets."""
        return [bad for d in self.datasets for bad in d.invalid]

    def require_valid(self) -> None:
        """Refuse to train on a broken plan: invalid images (unless skip_invalid_images) or no
        samples at all. Raises DataError naming the files and what to do."""
        invalid = self.invalid_images()
        if invalid and not self.skip_invalid_images:
            listed = "\n".join(f"  {bad.path}: {bad.reason}" for bad in invalid[:20])
            more = f"\n  ... and {len(invalid) - 20} more" if len(invalid) > 20 else ""
            raise DataError(
                f"{len(invalid)} image(s) cannot be used:\n{listed}{more}",
                hint="fix or remove them, or set skip_invalid_images = true in "
                "[dataset] to train without them (`sdtrain dataset plan` lists all)",
            )
        if self.steps is None:
            raise DataError(
                "No data found: the datasets contain no usable images",
                hint="check image_dir / train_data_dir and num_repeats; "
                "`sdtrain dataset plan RUN.toml` shows what was found",
            )

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """`ss_tag_frequency`: folder (or metadata file) name -> tag -> count, over all datasets."""
        merged: dict[str, dict[str, int]] = {}
        for dataset in self.datasets:
            for subset in dataset.subsets:
                counts = merged.setdefault(subset.tag_frequency_key, {})
                for tag, count in subset.tag_frequency.items():
                    counts[tag] = counts.get(tag, 0) + count
        return merged

    def mean_ar_error(self) -> float:
        """Mean |bucket aspect - image aspect| over the images (without repeats)."""
        errors = [abs(i.ar_error) for d in self.datasets for s in d.subsets for i in s.images]
        return sum(errors) / len(errors) if errors else 0.0

    def to_json(self) -> dict[str, Any]:
        """The `sdtrain dataset plan --json` document (see data/plan_json.py)."""
        from sdtrain.data.plan_json import plan_document

        return plan_document(self)


def _bucket_setup(ds: ResolvedDataset) -> tuple[list[Size], list[str]]:
    """Predefined bucket list of a dataset (§4.1, §2.5) and the warnings about its limits."""
    values, origins = ds.values, ds.origins
    resolution: Size = values["resolution"]
    if not values["enable_bucket"]:
        return [resolution], []
    warnings = []
    try:
        low, high, notes = normalize_bucket_limits(
            resolution,
            values["min_bucket_reso"],
            values["max_bucket_reso"],
            values["bucket_reso_steps"],
        )
    except ValueError as exc:
        key = "min_bucket_reso" if "min_bucket_reso" in str(exc) else "max_bucket_reso"
        where = origins[key]
        raise ConfigError(
            [
                Problem(
                    key=f"{ds.label}.{key}",
                    message=str(exc),
                    file=where.file,
                    line=where.line,
                    value=values[key],
                    has_value=True,
                )
            ],
            hint="the bucket limits must enclose the resolution",
        ) from exc
    warnings += [f"{ds.label}: {note}" for note in notes]
    if values["bucket_no_upscale"]:
        explicit = [
            k for k in ("min_bucket_reso", "max_bucket_reso") if str(origins[k]) != "default"
        ]
        if explicit:
            warnings.append(
                f"{ds.label}: {' and '.join(explicit)} are not used with "
                "bucket_no_upscale (buckets follow each image's size)"
            )
        return [], warnings
    return make_bucket_resolutions(resolution, low, high, values["bucket_reso_steps"]), warnings


def _subset_plan(sub: ResolvedSubset, values: dict[str, Any], got: Collected) -> SubsetPlan:
    image_dir = values.get("image_dir")
    metadata = values.get("metadata_file")
    for image in got.images:
        image.subset_index = sub.index
    return SubsetPlan(
        index=sub.index,
        label=sub.label,
        image_dir=Path(image_dir) if image_dir else None,
        metadata_file=Path(metadata) if metadata else None,
        is_reg=bool(values.get("is_reg")),
        num_repeats=int(values["num_repeats"]),
        params=values,
        origins={k: str(v) for k, v in sub.origins.items()},
        images=got.images,
        missing_captions=len(got.missing_captions),
        tag_frequency_key=got.tag_frequency_key,
        tag_frequency=got.tag_frequency,
    )


def _missing_caption_warning(sub: ResolvedSubset, values: dict[str, Any], got: Collected) -> str:
    count = len(got.missing_captions)
    names = ", ".join(p.name for p in got.missing_captions[:_LISTED])
    more = ", ..." if count > _LISTED else ""
    if values.get("metadata_file"):
        return f"{sub.label}: {count} metadata entries have no caption or tags ({names}{more})"
    tokens = values.get("class_tokens")
    then = f"using class_tokens {tokens!r}" if tokens else "they train with an empty caption"
    return (
        f"{sub.label}: {count} images have no caption file ({values['caption_extension']}); "
        f"{then} ({names}{more})"
    )


def _collect_subsets(
    ds: ResolvedDataset, plan: DatasetPlan, index: FolderIndex, write_caches: bool
) -> None:
    seen: dict[str, str] = {}
    for sub in ds.subsets:
        values = dict(sub.values)
        if values.get("face_crop_aug_range") is not None and ds.values["enable_bucket"]:
            plan.warnings.append(
                f"{sub.label}: face_crop_aug_range only works without "
                "bucketing (enable_bucket = false); it is not used"
            )
            values["face_crop_aug_range"] = None
        if values["num_repeats"] < 1:
            plan.skipped.append(f"{sub.label}: num_repeats = {values['num_repeats']} (< 1)")
            continue
        key = values["metadata_file"] if ds.kind == "finetune" else values["image_dir"]
        if key in seen:
            what = "metadata_file" if ds.kind == "finetune" else "image_dir"
            plan.skipped.append(f"{sub.label}: same {what} as {seen[key]} ({key})")
            continue
        seen[key] = sub.label
        try:
            if ds.kind == "finetune":
                got = collect_finetune(values, index)
            else:
                got = collect_dreambooth(values, write_cache=write_caches)
        except SubsetSkipped as exc:
            plan.skipped.append(f"{sub.label}: {exc}")
            continue
        plan.invalid.extend(got.invalid)
        if got.missing_captions:
            plan.warnings.append(_missing_caption_warning(sub, values, got))
        if got.empty_captions:
            count = len(got.empty_captions)
            names = ", ".join(p.name for p in got.empty_captions[:_LISTED])
            plan.warnings.append(
                f"{sub.label}: {count} caption file(s) are empty; those images train with an "
                f"empty caption ({names}{', ...' if count > _LISTED else ''})"
            )
        plan.subsets.append(_subset_plan(sub, values, got))


def _balance(plan: DatasetPlan) -> None:
    """Reference reg balancing (§4.7): reg samples are made to match the train samples."""
    reg = [image for s in plan.subsets if s.is_reg for image in s.images]
    plan.num_reg_images_requested = sum(image.num_repeats for image in reg)
    if not reg:
        return
    repeats = balance_regularization(plan.num_train_images, [i.num_repeats for i in reg])
    for image, count in zip(reg, repeats, strict=True):
        image.num_repeats = count
    unused = repeats.count(0)
    if plan.num_train_images == 0:
        plan.warnings.append(
            f"datasets[{plan.index}]: no training images, so no regularization images are used"
        )
    elif unused:
        plan.warnings.append(
            f"datasets[{plan.index}]: {unused} of {len(reg)} regularization "
            "images are not used (more reg samples than train samples)"
        )


def _assign_buckets(ds: ResolvedDataset, plan: DatasetPlan, num_processes: int = 1) -> None:
    resolution: Size = ds.values["resolution"]
    area = resolution[0] * resolution[1]
    step = ds.values["bucket_reso_steps"]
    no_upscale = bool(ds.values["enable_bucket"] and ds.values["bucket_no_upscale"])
    choices: dict[Size, BucketChoice] = {}
    samples: dict[Size, int] = {}
    held_out = {id(s) for s in plan.validation}
    tiny: list = []
    for subset in [*plan.subsets, *plan.validation]:
        kept = []
        for image in subset.images:
            size = image.original_size
            choice = choices.get(size)
            if choice is None:
                try:
                    choice = (
                        assign_bucket(size, plan.bucket_resolutions, area, step, no_upscale)
                        if ds.values["enable_bucket"]
                        else assign_fixed(size, resolution)
                    )
                except ValueError as exc:
                    plan.invalid.append(InvalidImage(image.path, str(exc)))
                    continue
                choices[size] = choice
            image.bucket, image.resized_size = choice.bucket, choice.resized
            if _upscale(size, choice.resized) > TINY_UPSCALE:
                tiny.append(image)
            image.ar_error = choice.ar_error
            image.crop_ltrb = crop_ltrb(size, choice.bucket)
            kept.append(image)
            if id(subset) in held_out:
                continue  # held out: bucketed for the validation loss, never a training sample
            samples[choice.bucket] = samples.get(choice.bucket, 0) + image.num_repeats
        subset.images = kept
    if tiny:
        smallest = min(tiny, key=lambda image: image.original_size[0] * image.original_size[1])
        w, h = smallest.original_size
        plan.warnings.append(
            f"datasets[{plan.index}]: {len(tiny)} image(s) are upscaled more than "
            f"{TINY_UPSCALE:g}x to fit their bucket and will train blurry (smallest: "
            f"{smallest.path.name}, {w}x{h}); use larger images, or bucket_no_upscale = true"
        )
    batch = plan.batch_size * num_processes  # global batch: every process takes a slice
    plan.buckets = [
        BucketStat(reso, count, math.ceil(count / batch))
        for reso, count in sorted(samples.items())
        if count > 0
    ]


TINY_UPSCALE = 4.0  # linear upscale factor above which an image is called too small


def _upscale(size: Size, resized: Size) -> float:
    return max(resized[0] / max(size[0], 1), resized[1] / max(size[1], 1))


def plan_dataset(
    ds: ResolvedDataset,
    index: FolderIndex | None = None,
    write_caches: bool = False,
    seed: int | None = None,
    num_processes: int = 1,
) -> DatasetPlan:
    """Resolve one dataset: collect subsets, hold out the validation split, balance reg images,
    assign buckets, count batches (global batches of batch_size x num_processes samples).
    `seed`: the validation split's seed when the dataset has no validation_seed."""
    values = dict(ds.values)
    plan = DatasetPlan(
        index=ds.index,
        kind=ds.kind,
        params=values,
        origins={k: str(v) for k, v in ds.origins.items()},
    )
    plan.bucket_resolutions, plan.warnings = _bucket_setup(ds)
    _collect_subsets(ds, plan, index or FolderIndex(), write_caches)
    split_validation(plan, seed)
    if ds.kind == "dreambooth":
        _balance(plan)
    _assign_buckets(ds, plan, num_processes)
    return plan


def build_plan(
    section: DatasetSection,
    datasets: list[ResolvedDataset],
    facts: StepSettings,
    source: str = "",
    write_caches: bool = False,
) -> Plan:
    """The plan of resolved datasets (config.chain.resolve_blueprint) for a run.

    Logs every warning (skipped subsets, missing captions, unused reg images, bucket limits) and
    keeps them in the plan. Invalid images are listed, never fatal here: `Plan.require_valid()`
    is the gate training passes through. `write_caches` writes `cache_info` size caches.
    """
    index = FolderIndex()
    plans = [
        plan_dataset(ds, index, write_caches, facts.seed, facts.num_processes) for ds in datasets
    ]
    warnings = []
    for plan in plans:
        warnings += [f"{entry}; subset skipped" for entry in plan.skipped] + plan.warnings
    if any(plan.invalid for plan in plans):
        count = sum(len(plan.invalid) for plan in plans)
        verb = "are left out" if section.skip_invalid_images else "stop training"
        warnings.append(
            f"{count} image(s) cannot be used and {verb} (skip_invalid_images = "
            f"{str(section.skip_invalid_images).lower()})"
        )
    for text in warnings:
        log.warning("%s", text)
    batches = sum(plan.batches for plan in plans)
    steps = None
    if batches:
        steps = plan_steps(
            batches,
            facts.gradient_accumulation_steps,
            facts.max_train_steps,
            facts.max_train_epochs,
        )
    return Plan(
        datasets=plans,
        facts=facts,
        steps=steps,
        source=source,
        skip_invalid_images=section.skip_invalid_images,
        warnings=warnings,
    )


def plan_for_run(
    loaded: LoadedConfig,
    num_processes: int | None = None,
    write_caches: bool = False,
    support: Support | None = None,
) -> Plan:
    """Blueprint (file, inline or legacy) -> resolution chain -> plan, for a loaded run config.

    `support` (the dataset kinds allowed) defaults to the command it was loaded for
    (`loaded.command.support`, from the method registry; every kind when built by hand).
    `num_processes` defaults to the launcher's WORLD_SIZE (1 without a launcher).
    """
    from sdtrain.config.blueprint import ANY_KIND
    from sdtrain.config.blueprint_load import dataset_blueprint
    from sdtrain.config.chain import resolve_blueprint, run_level_for, run_origins
    from sdtrain.launch import world_size

    config = loaded.config
    blueprint = dataset_blueprint(
        config.dataset,
        config.general,
        config.datasets,
        loaded.source,
        support or (loaded.command.support if loaded.command is not None else ANY_KIND),
        run_origins(loaded),
    )
    resolved = resolve_blueprint(blueprint, run_level_for(loaded))
    processes = world_size() if num_processes is None else num_processes
    facts = StepSettings.from_section(config.training, processes)
    return build_plan(config.dataset, resolved, facts, blueprint.source, write_caches)
