"""`sdtrain model info|convert`: inspect and convert SD 1.x/2.x model files."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Inspect and convert model files.")


class Target(str, Enum):
    ldm = "ldm"
    diffusers = "diffusers"


class Precision(str, Enum):
    float = "float"
    fp16 = "fp16"
    bf16 = "bf16"


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e5 else str(count)


@app.command("info")
def info(
    path: str = typer.Argument(
        ..., help="Single file, diffusers folder, hub id or builtin:<name>."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip hashing (faster on big files)."),
) -> None:
    """Family, prediction type, dtypes, parameter counts, hashes and metadata of a model."""
    from sdtrain.log import out
    from sdtrain.models.info import inspect_model

    found = inspect_model(path, hashes=not no_hash)
    if as_json:
        out.print_json(json.dumps(found.to_dict()))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(found.spec), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("kind", found.kind)
    table.add_row("family", found.family or "unknown")
    for key, value in found.describes.items():
        if key not in ("kind", "base family"):
            table.add_row(key, escape(str(value)))
    if found.prediction_type:
        table.add_row("prediction type", f"{found.prediction_type} ({found.prediction_source})")
    table.add_row("dtypes", ", ".join(f"{k}: {v}" for k, v in sorted(found.dtypes.items())))
    for name, count in found.parameters.items():
        table.add_row(f"parameters: {name}", _size(count))
    if found.other_tensors:
        table.add_row("other tensors", f"{found.other_tensors} (EMA copies, buffers; not loaded)")
    if found.file_size is not None:
        table.add_row("file size", f"{found.file_size:,} bytes")
    for label, value in (
        ("SHA-256", found.sha256),
        ("AutoV2 hash", found.autov2),
        ("legacy hash", found.legacy_hash),
        ("model hash", found.model_hash),
    ):
        if value:
            table.add_row(label, value)
    for key, value in sorted(found.metadata.items()):
        shown = value if len(value) <= 200 else value[:200] + f"... ({len(value)} chars)"
        table.add_row(f"metadata: {escape(key)}", escape(shown))
    table.add_row("loads", ("yes: " if found.loads else "no: ") + found.load_message)
    out.print(table)


@app.command("convert")
def convert(
    src: str = typer.Argument(..., help="Model to read: file, diffusers folder, hub id, builtin:."),
    dst: Path = typer.Argument(..., help="Output .safetensors/.ckpt file or diffusers folder."),
    to: Target | None = typer.Option(
        None, "--to", help="Output layout (default: ldm for file names, else diffusers)."
    ),
    precision: Precision | None = typer.Option(
        None, "--precision", help="Cast the written weights (default: keep their dtype)."
    ),
    v2: bool | None = typer.Option(
        None, "--v2/--no-v2", help="Assert SD 2.x / SD 1.x (detected from the weights if unset)."
    ),
    v_parameterization: bool | None = typer.Option(
        None,
        "--v-parameterization/--no-v-parameterization",
        "--v_parameterization",
        help="Model predicts v (default: from metadata, else the SD2 768 heuristic).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Convert between the original single-file layout and diffusers folders (offline)."""
    from sdtrain.log import out
    from sdtrain.models.info import convert_model

    written = convert_model(
        src,
        dst,
        to=to.value if to else None,
        precision=precision.value if precision else None,
        v2=v2,
        v_parameterization=v_parameterization,
        overwrite=overwrite,
    )
    out.print(f"wrote {written}", markup=False, highlight=False, soft_wrap=True)
