"""Validate a dataset blueprint (file or inline): pick each dataset's kind, locate problems."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sdtrain.config.blueprint import (
    DATASET_MODELS,
    DREAMBOOTH_ONLY,
    DROPOUT_KEYS,
    SUBSET_MODELS,
    SUBSET_ONLY,
    GeneralTable,
    Kind,
    Support,
)
from sdtrain.config.json_lines import locate_json_keys
from sdtrain.config.legacy import OriginOf, legacy_blueprint
from sdtrain.config.methods import train_command_exists
from sdtrain.config.problems import dotted, problems_from_validation
from sdtrain.config.schema_index import suggest
from sdtrain.config.sections import DatasetSection
from sdtrain.config.tables import Blueprint, DatasetTables, Origin, TableRef
from sdtrain.config.toml_source import KeyPath, SourceDoc, read_config_file
from sdtrain.errors import ConfigError, Problem

PATH_KEYS = ("image_dir", "metadata_file")
_TOP_TABLES = ("general", "datasets")


class _Checker:
    """Collects located problems while walking one blueprint document."""

    def __init__(self, doc: SourceDoc | None, support: Support) -> None:
        self.doc = doc
        self.support = support
        self.problems: list[Problem] = []

    @property
    def file(self) -> str | None:
        return str(self.doc.path) if self.doc else None

    def line(self, loc: KeyPath) -> int | None:
        return self.doc.line_of(loc) if self.doc else None

    def origin(self, loc: KeyPath, label: str) -> Origin:
        line = self.doc.lines.get(loc) if self.doc else None
        return Origin(label, self.file, line)

    def add(
        self,
        loc: KeyPath,
        message: str,
        hint: str | None = None,
        value: Any = None,
        has_value: bool = False,
    ) -> None:
        self.problems.append(
            Problem(
                key=dotted(loc),
                message=message,
                file=self.file,
                line=self.line(loc),
                value=value,
                has_value=has_value,
                hint=hint,
            )
        )

    def unsupported(self, loc: KeyPath, table: dict[str, Any], kind: Kind | None) -> None:
        """Keys the command cannot use (caption dropout for TI, DreamBooth keys for finetune)."""
        for key in list(table):
            if key in DROPOUT_KEYS and not self.support.dropout:
                self.add(
                    (*loc, key),
                    f"`{key}` is not supported by `{self.support.title}`",
                    hint="remove it (caption dropout does not apply to this method)",
                    value=table[key],
                    has_value=True,
                )
                del table[key]
            elif key in DREAMBOOTH_ONLY and not self.support.dreambooth and kind != "dreambooth":
                self.add(
                    (*loc, key),
                    f"`{key}` is a DreamBooth key, and `{self.support.title}` "
                    "trains fine-tune datasets only",
                    hint="remove it; captions come from the metadata file",
                    value=table[key],
                    has_value=True,
                )
                del table[key]

    def validate(self, model: type, raw: dict[str, Any], loc: KeyPath, kind: Kind | None) -> Any:
        """Validate one table; unknown keys get a did-you-mean or a "belongs elsewhere" hint."""
        try:
            return model.model_validate(raw)
        except ValidationError as exc:

            def level(path: tuple[str | int, ...]) -> type:
                in_subset = len(path) >= 2 and path[-2] == "subsets" and kind is not None
                return SUBSET_MODELS[kind] if in_subset else model  # type: ignore[index]

            found = problems_from_validation(
                exc,
                lambda p: (self.file, self.line(p)),
                prefix=loc,
                allowed_keys=lambda p: _allowed(level(p)),
            )
            for problem in found:
                err = undotted(problem.key)
                key = str(err[-1]) if err else ""
                if problem.message.startswith("unknown key"):
                    # a real key in the wrong place says so, rather than guessing a typo
                    problem.hint = _placement_hint(key, level(err[:-1]), kind) or problem.hint
                if problem.message == "this key is required":
                    problem.hint = _required_hint(key)
            self.problems.extend(found)
            return None


def undotted(text: str) -> KeyPath:
    """'datasets[0].subsets[1].image_dir' -> ('datasets', 0, 'subsets', 1, 'image_dir')."""
    parts: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", text):
        parts.append(int(index) if index else name)
    return tuple(parts)


def _allowed(model: type) -> list[str]:
    return [k for k in model.model_fields if k != "subsets"]


def _required_hint(key: str) -> str:
    if key == "image_dir":
        return 'add image_dir = "<folder with the images>" to this subset'
    if key == "metadata_file":
        return 'add metadata_file = "<metadata .json>" to this subset'
    return f"add `{key}`"


def _placement_hint(key: str, model: type, kind: Kind | None) -> str | None:
    """Explain why a real key is rejected here (wrong level or wrong dataset kind)."""
    subset_model = SUBSET_MODELS.get(kind or "dreambooth")
    if (
        key in SUBSET_ONLY
        and model is not subset_model
        and (
            key in SUBSET_MODELS["dreambooth"].model_fields
            or key in SUBSET_MODELS["finetune"].model_fields
        )
    ):
        return f"`{key}` can only be written in a [[datasets.subsets]] table"
    if key in DREAMBOOTH_ONLY and kind == "finetune":
        return (
            f"`{key}` only applies to DreamBooth subsets (subsets without metadata_file); "
            "fine-tune captions come from the metadata file"
        )
    if key == "metadata_file" and kind == "dreambooth":
        return "this command cannot train fine-tune subsets (with metadata_file)"
    from sdtrain.config.run import RunConfig
    from sdtrain.config.schema_index import index_schema

    info = index_schema(RunConfig).get(key)
    if info is not None:
        return f"`{key}` is a run option: set it in the run config's [{info.table}] table"
    return None


def _pick_kind(check: _Checker, subsets: list[dict[str, Any]], loc: KeyPath) -> Kind | None:
    """Reference kind selection per dataset; mixing DreamBooth and fine-tune subsets is an error."""
    with_meta = [i for i, s in enumerate(subsets) if "metadata_file" in s]
    without = [i for i, s in enumerate(subsets) if "metadata_file" not in s]
    support = check.support
    if support.dreambooth and support.finetune:
        if with_meta and without:
            check.add(
                loc,
                "DreamBooth subsets (no metadata_file: "
                + ", ".join(f"subsets[{i}]" for i in without)
                + ") and fine-tune subsets (with metadata_file: "
                + ", ".join(f"subsets[{i}]" for i in with_meta)
                + ") cannot be mixed in one dataset",
                hint="put them into two separate [[datasets]] tables",
            )
            return None
        return "finetune" if with_meta else "dreambooth"
    if support.dreambooth:
        for i in with_meta:
            check.add(
                (*loc, "subsets", i, "metadata_file"),
                f"`{support.title}` cannot train fine-tune subsets (with metadata_file)",
                hint="use image_dir with caption files"
                + (", or `sdtrain train finetune`" if train_command_exists("finetune") else ""),
                value=subsets[i]["metadata_file"],
                has_value=True,
            )
        return "dreambooth" if not with_meta else None
    return "finetune"


def _table_ref(
    check: _Checker, model_obj: Any, loc: KeyPath, label: str, base_dir: Path
) -> TableRef:
    values = model_obj.model_dump(exclude_none=True, exclude={"subsets"})
    for key in PATH_KEYS:
        if isinstance(values.get(key), str):
            path = Path(values[key]).expanduser()
            values[key] = str(path if path.is_absolute() else (base_dir / path).resolve())
    origins = {key: check.origin((*loc, key), label) for key in values}
    return TableRef(label=label, values=values, origins=origins, origin=check.origin(loc, label))


def validate_blueprint(
    data: dict[str, Any],
    doc: SourceDoc | None,
    support: Support,
    base_dir: Path,
    top_level: bool = True,
) -> Blueprint:
    """Check `{"general": ..., "datasets": [...]}` against the schema of each dataset's kind.

    Raises ConfigError with every problem (file:line, dotted key, value, expected, hint).
    `top_level` also rejects unknown top-level tables (for a separate blueprint file).
    """
    check = _Checker(doc, support)
    if top_level:
        for name in data:
            if name not in _TOP_TABLES:
                close = suggest(name, _TOP_TABLES)
                check.add(
                    (name,),
                    f"unknown table `{name}`",
                    hint=f"did you mean [{close}]?"
                    if close
                    else "a blueprint has only [general] and [[datasets]] tables",
                )
    general_raw = data.get("general") or {}
    datasets_raw = data.get("datasets") or []
    general = None
    if not isinstance(general_raw, dict):
        check.add(("general",), "expected a table", value=general_raw, has_value=True)
    else:
        general_raw = dict(general_raw)
        check.unsupported(("general",), general_raw, None)
        general = check.validate(GeneralTable, general_raw, ("general",), None)
    if not isinstance(datasets_raw, list):
        check.add(("datasets",), "expected an array of [[datasets]] tables")
        datasets_raw = []
    if not datasets_raw:
        check.add(
            ("datasets",),
            "the blueprint has no [[datasets]] table",
            hint="add [[datasets]] with at least one [[datasets.subsets]] (image_dir = ...)",
        )
    tables: list[DatasetTables] = []
    for index, raw in enumerate(datasets_raw):
        loc: KeyPath = ("datasets", index)
        built = _dataset(check, raw, loc, base_dir)
        if built is not None:
            tables.append(built)
    if check.problems:
        where = f" in {doc.path}" if doc else ""
        ordered = sorted(check.problems, key=lambda p: p.line or 0)  # in file order
        raise ConfigError(ordered, hint=f"fix the dataset blueprint{where}")
    assert general is not None
    source = f"blueprint {doc.path}" if doc else "blueprint"
    return Blueprint(
        general=_table_ref(check, general, ("general",), "[general]", base_dir),
        datasets=tables,
        source=source,
    )


def _dataset(check: _Checker, raw: Any, loc: KeyPath, base_dir: Path) -> DatasetTables | None:
    label = dotted(loc)
    if not isinstance(raw, dict):
        check.add(loc, "expected a [[datasets]] table", value=raw, has_value=True)
        return None
    raw = dict(raw)
    subsets = raw.get("subsets", [])
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        check.add((*loc, "subsets"), "expected [[datasets.subsets]] tables")
        return None
    if not subsets:
        # Reference quirk fixed: zero subsets used to classify the dataset as ControlNet.
        check.add(
            loc,
            "this dataset has no subsets",
            hint='add a [[datasets.subsets]] table with image_dir = "..." '
            '(or metadata_file = "..." for fine-tuning)',
        )
        return None
    kind = _pick_kind(check, subsets, loc)
    if kind is None:
        return None
    check.unsupported(loc, raw, kind)
    raw["subsets"] = [dict(s) for s in subsets]
    for i, sub in enumerate(raw["subsets"]):
        check.unsupported((*loc, "subsets", i), sub, kind)
    model = DATASET_MODELS[kind]
    obj = check.validate(model, raw, loc, kind)
    if obj is None:
        return None
    subs = [
        _table_ref(check, s, (*loc, "subsets", i), f"{label}.subsets[{i}]", base_dir)
        for i, s in enumerate(obj.subsets)
    ]
    return DatasetTables(
        index=loc[1], kind=kind, table=_table_ref(check, obj, loc, label, base_dir), subsets=subs
    )


def read_blueprint_file(path: Path, support: Support) -> Blueprint:
    """Read and validate a separate blueprint file (.toml or .json, by extension)."""
    doc = read_config_file(Path(path))
    if doc.path.suffix.lower() == ".json":
        doc.lines = locate_json_keys(doc.path.read_text(encoding="utf-8"))
    return validate_blueprint(doc.data, doc, support, doc.path.parent)


def dataset_blueprint(
    section: DatasetSection,
    general: dict[str, Any] | None,
    datasets: list[dict[str, Any]] | None,
    run_doc: SourceDoc | None,
    support: Support,
    origin_of: OriginOf | None = None,
) -> Blueprint:
    """The run's blueprint: dataset_config file, inline [general]/[[datasets]], or legacy folders.

    A blueprint together with train_data_dir / reg_data_dir / in_json is an error (the reference
    ignores those keys with a warning; here nothing given is silently dropped).
    """
    inline = general is not None or datasets is not None
    legacy = [k for k in ("train_data_dir", "reg_data_dir", "in_json") if getattr(section, k)]
    if (inline or section.dataset_config) and legacy:
        which = "dataset_config" if section.dataset_config else "the inline [[datasets]] tables"
        file = str(run_doc.path) if run_doc else None
        raise ConfigError(
            [
                Problem(
                    key=f"dataset.{k}",
                    file=file,
                    line=run_doc.lines.get(("dataset", k)) if run_doc else None,
                    message=f"not used together with {which}",
                    hint="describe every folder in the blueprint, or drop the "
                    "blueprint and use the legacy folder keys",
                )
                for k in legacy
            ]
        )
    if section.dataset_config:
        return read_blueprint_file(Path(section.dataset_config), support)
    if inline:
        base = run_doc.path.parent if run_doc else Path.cwd()
        data = {"general": general or {}, "datasets": datasets or []}
        found = validate_blueprint(data, run_doc, support, base, top_level=False)
        bare = run_doc is not None and set(run_doc.data) <= {"general", "datasets"}
        found.source = (
            f"{'blueprint' if bare else 'run config'} {run_doc.path}" if run_doc else "run config"
        )
        return found
    return legacy_blueprint(section, support, origin_of)
