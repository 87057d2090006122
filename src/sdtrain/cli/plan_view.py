"""Rich view of a dataset plan: counts, captions, reg balance, buckets, origins, step totals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from sdtrain.data.items import DatasetPlan, SubsetPlan
    from sdtrain.data.plan import Plan

DATASET_KEYS = (
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
)
SUBSET_KEYS = (
    "num_repeats",
    "caption_extension",
    "class_tokens",
    "shuffle_caption",
    "keep_tokens",
    "caption_separator",
    "flip_aug",
    "color_aug",
    "random_crop",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "enable_wildcard",
    "alpha_mask",
)
_INVALID_SHOWN = 20


def _value(value: object) -> str:
    if isinstance(value, tuple | list) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return escape(repr(value) if isinstance(value, str) else str(value))


def _where(subset: SubsetPlan) -> str:
    return str(subset.image_dir or subset.metadata_file or "")


def _subset_table(plan: DatasetPlan) -> Table:
    """Counts per subset; folders are listed under the table (long paths fold badly in cells)."""
    table = Table(title="subsets", title_justify="left")
    for column in ("subset", "role", "images", "repeats", "samples", "captions", "missing"):
        table.add_column(column, no_wrap=column in ("subset", "role"))
    for subset in plan.subsets:
        images = len(subset.images)
        used = sum(1 for i in subset.images if i.num_repeats > 0)
        samples = f"{subset.num_samples}" + (f" ({images - used} unused)" if used < images else "")
        table.add_row(
            subset.label.split(".")[-1],
            "reg" if subset.is_reg else "train",
            str(images),
            str(subset.num_repeats),
            samples,
            str(images - subset.missing_captions),
            str(subset.missing_captions),
        )
    return table


def _subset_folders(console: Console, plan: DatasetPlan) -> None:
    for subset in plan.subsets:
        label = subset.label.split(".")[-1]
        console.print(f"  {label}: {_where(subset)}", markup=False, highlight=False, soft_wrap=True)


def _origins_table(plan: DatasetPlan, verbose: bool) -> Table:
    table = Table(title="effective values (value <- origin)", title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column(f"datasets[{plan.index}]", overflow="fold")
    for subset in plan.subsets:
        table.add_column(subset.label.split(".")[-1], overflow="fold")
    own = f"datasets[{plan.index}]"
    for key in DATASET_KEYS:
        origin = plan.origins[key].replace(own, "dataset")
        table.add_row(key, _cell(_value(plan.params[key]), origin), *["" for _ in plan.subsets])
    subset_keys = list(plan.subsets[0].params) if verbose and plan.subsets else SUBSET_KEYS
    for key in subset_keys:
        cells = [
            _cell(_value(s.params[key]), _short(s, key, own)) if key in s.params else ""
            for s in plan.subsets
        ]
        if any(cells):
            table.add_row(key, "", *cells)
    return table


def _cell(value: str, origin: str) -> str:
    """`value <- origin` on one line when short, else the origin on its own line (narrow
    terminals fold long cells mid-word)."""
    joiner = " " if len(value) + len(origin) <= 16 else "\n"
    return f"{value}{joiner}[dim]<- {escape(origin)}"


def _short(subset: SubsetPlan, key: str, dataset_label: str) -> str:
    """Origin with the subset's / dataset's own label shortened (the column says which)."""
    origin = subset.origins.get(key, "default")
    return origin.replace(subset.label, "subset").replace(dataset_label, "dataset")


def _bucket_table(plan: DatasetPlan) -> Table:
    table = Table(title="buckets", title_justify="left")
    for column in ("resolution", "samples", "batches"):
        table.add_column(column, justify="right")
    for bucket in plan.buckets:
        table.add_row(_value(bucket.resolution), str(bucket.samples), str(bucket.batches))
    table.add_row(
        "[bold]total", f"[bold]{sum(b.samples for b in plan.buckets)}", f"[bold]{plan.batches}"
    )
    return table


def _reg_line(plan: DatasetPlan) -> str | None:
    reg = [i for s in plan.subsets if s.is_reg for i in s.images]
    if not reg:
        return None
    used = sum(1 for i in reg if i.num_repeats > 0)
    return (
        f"reg balancing: {plan.num_reg_images_requested} reg samples requested, "
        f"{plan.num_reg_images} used to match {plan.num_train_images} train samples "
        f"({used} of {len(reg)} reg images used, {len(reg) - used} unused)"
    )


def render_dataset(console: Console, plan: DatasetPlan, verbose: bool) -> None:
    """One dataset: header, subsets, effective values, reg balance, buckets, problems."""
    params = plan.params
    mode = (
        "no_upscale buckets"
        if params["enable_bucket"] and params["bucket_no_upscale"]
        else f"{len(plan.bucket_resolutions)} predefined buckets"
        if params["enable_bucket"]
        else "no bucketing"
    )
    console.rule(
        f"[bold]datasets[{plan.index}][/] {plan.kind}  "
        f"{_value(params['resolution'])}, batch {plan.batch_size}, {mode}"
    )
    console.print(f"samples per epoch: {plan.num_train_images} train + {plan.num_reg_images} reg")
    if plan.subsets:
        console.print(_subset_table(plan))
        _subset_folders(console, plan)
        console.print(_origins_table(plan, verbose))
    line = _reg_line(plan)
    if line:
        console.print(line)
    if plan.validation:
        console.print(
            f"validation: {plan.num_validation_images} image(s) held out "
            f"(validation_split {plan.params.get('validation_split')}, seed "
            f"{plan.validation_seed}); they never train",
            markup=False,
        )
    if plan.buckets:
        console.print(_bucket_table(plan))
    for reason in plan.skipped:
        console.print(f"[yellow]skipped[/] {escape(reason)}")
    if plan.invalid:
        table = Table(title=f"[red]invalid images ({len(plan.invalid)})", title_justify="left")
        table.add_column("path", overflow="fold")
        table.add_column("reason", overflow="fold")
        shown = plan.invalid if verbose else plan.invalid[:_INVALID_SHOWN]
        for bad in shown:
            table.add_row(escape(str(bad.path)), escape(bad.reason))
        console.print(table)
        if len(shown) < len(plan.invalid):
            console.print(f"... and {len(plan.invalid) - len(shown)} more (-v lists all)")


def render_plan(console: Console, plan: Plan, verbose: bool = False) -> None:
    """The whole plan, then the epoch/step totals."""
    console.print(f"dataset source: {escape(plan.source)}")
    for dataset in plan.datasets:
        render_dataset(console, dataset, verbose)
    console.rule("[bold]totals")
    facts = plan.facts
    processes = facts.num_processes
    batches = "global batches" if processes > 1 else "batches"
    console.print(f"{batches} per epoch: [bold]{plan.batches_per_epoch}[/]")
    for dataset in plan.datasets:
        accumulation = facts.gradient_accumulation_steps
        console.print(
            f"global batch of datasets[{dataset.index}]: [bold]"
            f"{dataset.batch_size * processes * accumulation}[/] samples per optimizer step "
            f"(train_batch_size {dataset.batch_size} x {processes} "
            f"process{'es' if processes > 1 else ''} x gradient_accumulation_steps "
            f"{accumulation})"
        )
    if plan.steps is None:
        console.print("[red]no usable images: nothing to train on")
        return
    steps = plan.steps
    console.print(
        f"optimizer steps per epoch: [bold]{steps.steps_per_epoch}[/] "
        f"(gradient_accumulation_steps {facts.gradient_accumulation_steps}"
        + (f", {facts.num_processes} processes" if facts.num_processes > 1 else "")
        + ")"
    )
    rule = (
        f"max_train_epochs = {facts.max_train_epochs} wins over max_train_steps"
        if facts.max_train_epochs is not None
        else f"max_train_steps = {facts.max_train_steps}"
    )
    console.print(
        f"epochs: [bold]{steps.num_epochs}[/], total optimizer steps: "
        f"[bold]{steps.total_steps}[/] ({rule})"
    )
    for note in plan.notes:
        console.print(escape(note))
    invalid = plan.invalid_images()
    if invalid:
        fate = (
            "left out (skip_invalid_images = true)"
            if plan.skip_invalid_images
            else "training refuses to start until they are fixed or removed, or "
            "skip_invalid_images = true"
        )
        console.print(f"[red]{len(invalid)} invalid image(s)[/]: {fate}")
