"""The reference's argument TOML (`--config_file`, what the kohya_ss GUI writes) as a run config.

That file is flat: every table is flattened into one namespace of argument names (§1.10), so
`[model] learning_rate = 1e-4` and a top-level `learning_rate = 1e-4` mean the same. Each key is
mapped to its sdtrain table by name, or reported as unmapped with the reason (never silently
dropped). Values written as text where sdtrain wants a number or list (`resolution = "512,768"`,
as the GUI writes) are converted like command-line flags; that is reported as a change of form.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.config.schema_index import KeyInfo, index_schema
from sdtrain.config.toml_source import SourceDoc, read_config_file
from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    from pydantic import BaseModel

logger = logging.getLogger(__name__)

FLAG = "config_file"

# Reference arguments with no sdtrain key, and why (everything else unmapped: "no equivalent").
NOT_MAPPED: dict[str, str] = {
    "config_file": "the file itself",
    "output_config": "use `sdtrain config import FILE.toml -o run.toml` to write a run config",
    "wandb_api_key": "secrets come from the environment (WANDB_API_KEY), never from a file",
    "huggingface_token": "secrets come from the environment (HF_TOKEN), never from a file",
    "lowram": "memory hint of the reference loader; sdtrain loads lazily already",
    "highvram": "memory hint of the reference; not needed",
    "debug_dataset": "use `sdtrain dataset plan RUN.toml --preview DIR` to look at the data",
    "console_log_level": "use -v / -q",
    "console_log_file": "redirect stderr, or read <output_dir>/metrics.jsonl",
    "console_log_simple": "use -q",
    "ddp_timeout": "multi-process settings are not read from this file",
    "ddp_gradient_as_bucket_view": "multi-process settings are not read from this file",
    "ddp_static_graph": "multi-process settings are not read from this file",
    "save_state_to_huggingface": "no hub uploads (sdtrain works offline)",
    "resume_from_huggingface": "no hub downloads (sdtrain works offline)",
    "async_upload": "no hub uploads (sdtrain works offline)",
}

# Mapped keys whose meaning differs from the reference on purpose (reported when present).
MEANING: dict[str, str] = {
    "huber_scale": "applies in every huber_schedule (the reference skips it for snr)",
    "cache_latents_to_disk": "content-addressed cache under latent_cache_dir, not .npz files "
    "beside the images",
    "resume": "needs an sdtrain state folder; reference *-state folders cannot be resumed",
    "save_state": "writes sdtrain state folders (exact resume), not accelerate's layout",
    "sample_sampler": "an unknown sampler name is an error (the reference falls back to DDIM)",
}

# Reference flags that only ever appear on a command line, with where to go instead.
REFERENCE_FLAG_HINTS: dict[str, str] = {
    "debug_dataset": "sdtrain shows the data without training: "
    "`sdtrain dataset plan RUN.toml --preview DIR` writes the exact crops as contact sheets",
    "output_config": "write a run config from an argument TOML with "
    "`sdtrain config import FILE.toml -o run.toml`",
    "lowram": "not needed: sdtrain loads model files lazily",
    "highvram": "not needed",
}


@dataclass
class Imported:
    """An argument TOML in run-config layout, with what was not mapped and what changed form."""

    doc: SourceDoc  # data: {table: {key: value}}; lines: (table, key) -> line in the source
    unmapped: list[tuple[str, int | None, str]] = field(default_factory=list)  # key, line, why
    converted: list[tuple[str, Any, Any]] = field(default_factory=list)  # key, written, now
    meaning: list[tuple[str, int | None, str]] = field(default_factory=list)  # key, line, note

    def report_lines(self) -> list[str]:
        """Human-readable lines: one per unmapped key and per converted value."""
        name = self.doc.path.name
        lines = [
            f"{name}:{line or '?'} {key}: not used ({why})" for key, line, why in self.unmapped
        ]
        lines += [f"{name}: {key} = {old!r} read as {new!r}" for key, old, new in self.converted]
        lines += [
            f"{name}:{line or '?'} {key}: mapped, but differs: {note}"
            for key, line, note in self.meaning
        ]
        return lines


def split_config_file(args: list[str]) -> tuple[list[str], str | None, list[Problem]]:
    """Take `--config_file PATH` (or `=PATH`, `--config-file`) out of `args`."""
    rest: list[str] = []
    found: str | None = None
    problems: list[Problem] = []
    i = 0
    while i < len(args):
        token = args[i]
        name, eq, value = token.partition("=")
        if name in ("--config_file", "--config-file"):
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    problems.append(
                        Problem(
                            key=FLAG, file="<command line>", message="--config_file needs a file"
                        )
                    )
                    i += 1
                    continue
                value = args[i + 1]
                i += 1
            found = value
        else:
            rest.append(token)
        i += 1
    return rest, found, problems


def _flatten(data: dict[str, Any], lines: dict[Any, int]) -> list[tuple[str, Any, int | None]]:
    """(key, value, line) of every argument: top-level scalars and one level of tables."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            for inner, item in value.items():
                out.append((inner, item, lines.get((key, inner))))
        else:
            out.append((key, value, lines.get((key,))))
    return out


def _value(info: KeyInfo, value: Any) -> Any:
    """The value in sdtrain's type: text converted like a flag when the schema wants more."""
    from pydantic import TypeAdapter, ValidationError

    from sdtrain.config.flags import _convert

    try:
        TypeAdapter(info.annotation).validate_python(value, strict=True)
        return value
    except ValidationError:
        pass
    if isinstance(value, str):
        try:
            return _convert(info, value.split())
        except ValidationError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and info.annotation is not int:
        return float(value) if "float" in str(info.annotation) else value
    return value


def import_argument_toml(path: Path, schema: type[BaseModel]) -> Imported:
    """Read an argument TOML and map every key onto `schema`'s tables."""
    source = read_config_file(Path(path))
    keys = index_schema(schema)
    data: dict[str, dict[str, Any]] = {}
    lines: dict[Any, int] = {}
    result = Imported(SourceDoc(source.path, data, lines))
    for key, value, line in _flatten(source.data, source.lines):
        info = keys.get(key)
        if info is None:
            why = NOT_MAPPED.get(key, "no sdtrain equivalent")
            result.unmapped.append((key, line, why))
            continue
        if value == "" and info.annotation is not str:
            result.converted.append((key, value, None))  # the GUI writes "" for "unset"
            continue
        if key in MEANING and value not in (False, None, ""):
            result.meaning.append((key, line, MEANING[key]))
        now = _value(info, value)
        if now is not value and now != value:
            result.converted.append((key, value, now))
        if info.is_path and isinstance(now, str) and now and not Path(now).is_absolute():
            now = str((source.path.parent / now).resolve())
        data.setdefault(info.table, {})[key] = now
        if line is not None:
            lines[(info.table, key)] = line
            lines.setdefault((info.table,), line)
    return result


def load_argument_toml(path: str, schema: type[BaseModel], positional: list[str]) -> SourceDoc:
    """The `--config_file` source for the loader; logs the report of unmapped keys."""
    if positional:
        raise ConfigError(
            [
                Problem(
                    key=FLAG,
                    file="<command line>",
                    message=f"give either a run TOML ({positional[0]}) or --config_file, not both",
                )
            ]
        )
    imported = import_argument_toml(Path(path), schema)
    for line in imported.report_lines():
        logger.warning("--config_file %s", line)
    return imported.doc
