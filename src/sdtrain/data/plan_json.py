"""The machine-readable form of a Plan (`sdtrain dataset plan --json`); paths are absolute."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdtrain.data.items import DatasetPlan, ImageEntry, SubsetPlan

if TYPE_CHECKING:
    from sdtrain.data.plan import Plan


def _plain(value: Any) -> Any:
    """Tuples -> lists, paths -> strings, recursively (JSON has no tuples or paths)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def image_document(image: ImageEntry) -> dict[str, Any]:
    """One image: the binding keys first, then sdtrain's extras."""
    return {
        "path": str(image.path),
        "is_reg": image.is_reg,
        "num_repeats": image.num_repeats,
        "original_size": list(image.original_size),
        "bucket": list(image.bucket),
        "resized_size": list(image.resized_size),
        "caption": image.caption,
        "crop_ltrb": list(image.crop_ltrb),
        "subset": image.subset_index,
        "has_caption_file": image.has_caption_file,
        "exif_transpose": image.exif_transpose,
    }


def subset_document(subset: SubsetPlan) -> dict[str, Any]:
    """A subset's summary with its effective keys and their origins (images are listed flat)."""
    return {
        "label": subset.label,
        "image_dir": str(subset.image_dir) if subset.image_dir else None,
        "metadata_file": str(subset.metadata_file) if subset.metadata_file else None,
        "is_reg": subset.is_reg,
        "num_repeats": subset.num_repeats,
        "num_images": len(subset.images),
        "num_samples": subset.num_samples,
        "missing_captions": subset.missing_captions,
        "params": _plain(subset.params),
        "origins": dict(subset.origins),
    }


def dataset_document(plan: DatasetPlan) -> dict[str, Any]:
    """One dataset in the binding shape (plus kind, origins, subsets, invalid images, ...)."""
    params = plan.params
    return {
        "resolution": _plain(params["resolution"]),
        "batch_size": plan.batch_size,
        "enable_bucket": bool(params["enable_bucket"]),
        "bucket_resolutions": _plain(plan.bucket_resolutions),
        "num_train_images": plan.num_train_images,
        "num_reg_images": plan.num_reg_images,
        "batches": plan.batches,
        "buckets": [
            {"resolution": list(b.resolution), "samples": b.samples, "batches": b.batches}
            for b in plan.buckets
        ],
        "images": [image_document(i) for s in plan.subsets for i in s.images],
        "index": plan.index,
        "kind": plan.kind,
        "num_reg_images_requested": plan.num_reg_images_requested,
        "params": _plain(params),
        "origins": dict(plan.origins),
        "subsets": [subset_document(s) for s in plan.subsets],
        "invalid_images": [{"path": str(b.path), "reason": b.reason} for b in plan.invalid],
        "validation_split": params.get("validation_split") or 0.0,
        "validation_seed": plan.validation_seed,
        "validation_images": [image_document(i) for s in plan.validation for i in s.images],
        "skipped_subsets": list(plan.skipped),
        "warnings": list(plan.warnings),
    }


def plan_document(plan: Plan) -> dict[str, Any]:
    """The whole plan: batches per epoch, datasets, and the step/epoch totals."""
    steps = plan.steps
    return {
        "batches_per_epoch": plan.batches_per_epoch,
        "datasets": [dataset_document(d) for d in plan.datasets],
        "steps_per_epoch": steps.steps_per_epoch if steps else 0,
        "num_epochs": steps.num_epochs if steps else 0,
        "total_steps": steps.total_steps if steps else 0,
        "gradient_accumulation_steps": plan.facts.gradient_accumulation_steps,
        "num_processes": plan.facts.num_processes,
        "max_train_steps": plan.facts.max_train_steps,
        "max_train_epochs": plan.facts.max_train_epochs,
        "skip_invalid_images": plan.skip_invalid_images,
        "source": plan.source,
        "warnings": list(plan.warnings),
        "tag_frequency": plan.tag_frequency(),
    }
