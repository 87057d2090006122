"""The value-resolution chain: subset > dataset > [general] > run config/flags > built-in default.

Each effective value is the first one set along the chain (the reference's first-non-None rule), and
remembers its Origin so `sdtrain dataset plan` can say where it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtrain.config.blueprint import (
    DATASET_DEFAULTS,
    DATASET_KEYS,
    SUBSET_DEFAULTS,
    SUBSET_MODELS,
    Kind,
)
from sdtrain.config.sections import DatasetSection
from sdtrain.config.tables import DEFAULT, Blueprint, Origin, TableRef
from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    from sdtrain.config.loader import LoadedConfig

# DatasetSection keys that are not dataset/subset values of the chain
_SOURCE_KEYS = frozenset(
    {
        "dataset_config",
        "train_data_dir",
        "reg_data_dir",
        "in_json",
        "dataset_repeats",
        "skip_invalid_images",
    }
)


@dataclass
class RunLevel:
    """Run-level values for the chain (the reference's command-line namespace), with origins."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)


def run_level(
    section: DatasetSection,
    batch_size: int | None = None,
    origin_of: Callable[[str, str], Origin] | None = None,
) -> RunLevel:
    """Build the run level from [dataset] (and training.train_batch_size, when set explicitly).

    `origin_of(table, key)` tells where a run-config value was written; `dataset_repeats` is the
    reference's alias of `num_repeats` at this level.
    """
    locate = origin_of or (lambda _t, _k: Origin("run config"))
    level = RunLevel()
    for key in DatasetSection.model_fields:
        value = getattr(section, key)
        if key in _SOURCE_KEYS or value is None:
            continue
        level.values[key] = list(value) if isinstance(value, list) else value
        level.origins[key] = locate("dataset", key)
    if "num_repeats" not in level.values and section.dataset_repeats is not None:
        level.values["num_repeats"] = section.dataset_repeats
        level.origins["num_repeats"] = locate("dataset", "dataset_repeats")
    if batch_size is not None:
        level.values["batch_size"] = batch_size
        level.origins["batch_size"] = locate("training", "train_batch_size")
    return level


def run_origins(loaded: LoadedConfig) -> Callable[[str, str], Origin]:
    """`origin_of(table, key)` for a loaded run config: command line, run file line, or default."""
    from sdtrain.config.flags import CLI

    def origin_of(table: str, key: str) -> Origin:
        if f"{table}.{key}" in loaded.cli_keys:
            return Origin(CLI)
        doc = loaded.source
        if doc is not None and key in (doc.data.get(table) or {}):
            return Origin("run config", str(doc.path), doc.lines.get((table, key)))
        return DEFAULT

    return origin_of


def run_level_for(loaded: LoadedConfig) -> RunLevel:
    """The run level of a loaded run config ([dataset] keys + an explicit train_batch_size)."""
    origin_of = run_origins(loaded)
    explicit = origin_of("training", "train_batch_size") is not DEFAULT
    batch = loaded.config.training.train_batch_size if explicit else None
    return run_level(loaded.config.dataset, batch, origin_of)


@dataclass
class ResolvedSubset:
    """A subset's effective values (every key of its kind) and their origins."""

    index: int
    label: str
    values: dict[str, Any]
    origins: dict[str, Origin]


@dataclass
class ResolvedDataset:
    """A dataset's effective values, its kind and its resolved subsets."""

    index: int
    kind: Kind
    label: str
    values: dict[str, Any]
    origins: dict[str, Origin]
    subsets: list[ResolvedSubset]


def _first(
    key: str, tables: list[TableRef], run: RunLevel, defaults: dict[str, Any]
) -> tuple[Any, Origin]:
    for table in tables:
        if key in table.values:
            return table.values[key], table.origins[key]
    if key in run.values:
        return run.values[key], run.origins[key]
    return defaults.get(key), DEFAULT


def resolve_blueprint(blueprint: Blueprint, run: RunLevel) -> list[ResolvedDataset]:
    """Apply the chain to every dataset and subset. Raises ConfigError for datasets without a
    resolution (required, as in the reference) or with bucket steps not divisible by 64."""
    out: list[ResolvedDataset] = []
    problems: list[Problem] = []
    for ds in blueprint.datasets:
        upper = [ds.table, blueprint.general]
        values: dict[str, Any] = {}
        origins: dict[str, Origin] = {}
        for key in DATASET_KEYS:
            values[key], origins[key] = _first(key, upper, run, DATASET_DEFAULTS)
        problems.extend(_dataset_problems(ds.table, values, origins))
        resolution = values["resolution"]
        if isinstance(resolution, int):
            values["resolution"] = (resolution, resolution)
        elif isinstance(resolution, list):
            values["resolution"] = (resolution[0], resolution[1])
        subsets = []
        model = SUBSET_MODELS[ds.kind]
        for index, sub in enumerate(ds.subsets):
            chain = [sub, *upper]
            sv: dict[str, Any] = {}
            so: dict[str, Origin] = {}
            for key in model.model_fields:
                if key in ("image_dir", "metadata_file", "is_reg"):
                    sv[key], so[key] = (
                        sub.values.get(key, SUBSET_DEFAULTS[key]),
                        sub.origins.get(key, DEFAULT),
                    )
                else:
                    sv[key], so[key] = _first(key, chain, run, SUBSET_DEFAULTS)
            ext = sv.get("caption_extension")
            if isinstance(ext, str) and ext and not ext.startswith("."):
                sv["caption_extension"] = "." + ext  # reference: DreamBooth adds the dot
            subsets.append(ResolvedSubset(index=index, label=sub.label, values=sv, origins=so))
        out.append(
            ResolvedDataset(
                index=ds.index,
                kind=ds.kind,
                label=ds.table.label,
                values=values,
                origins=origins,
                subsets=subsets,
            )
        )
    if problems:
        raise ConfigError(
            problems,
            hint="set the missing dataset keys in the blueprint "
            "([general] or [[datasets]]) or on the command line",
        )
    return out


def _dataset_problems(
    table: TableRef, values: dict[str, Any], origins: dict[str, Origin]
) -> list[Problem]:
    problems = []
    label = table.label
    if values["resolution"] is None:
        problems.append(
            Problem(
                key=f"{label}.resolution",
                message="no training resolution set",
                file=table.origin.file,
                line=table.origin.line,
                hint="write resolution = 512 (or [W, H]) in [general] or the "
                "dataset, or pass --resolution 512",
            )
        )
    steps = values["bucket_reso_steps"]
    if values["enable_bucket"] and steps % 64:
        where = origins["bucket_reso_steps"]
        problems.append(
            Problem(
                key=f"{label}.bucket_reso_steps",
                file=where.file,
                line=where.line,
                value=steps,
                has_value=True,
                message="must be a multiple of 64 for SD1/SD2 models",
                hint="use 64 (the default) or 128",
            )
        )
    return problems
