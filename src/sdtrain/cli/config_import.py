"""`sdtrain config import`: turn a reference argument TOML (kohya_ss GUI) into a run config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sdtrain.config.toml_source import SourceDoc

app = typer.Typer(no_args_is_help=True, help="Read configs users already have.")


@app.command("import")
def import_config(
    source: Path = typer.Argument(..., help="Argument TOML (what --config_file reads)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run TOML to write."),
    dataset_config: Path | None = typer.Option(
        None,
        "--dataset_config",
        "--dataset-config",
        help="Dataset blueprint the run should use ([dataset] dataset_config).",
    ),
    method: str = typer.Option("lora", "--method", help="Training method the run is for."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Write the native run TOML for SOURCE, listing every key not mapped and every value read
    in another form (e.g. resolution "512,768" -> [512, 768])."""
    import tomli_w

    from sdtrain.atomic import write_text
    from sdtrain.config.import_args import import_argument_toml
    from sdtrain.errors import ConfigError, Problem
    from sdtrain.log import console
    from sdtrain.methods.registry import command_schema

    schema = command_schema(method)
    if output.exists() and not overwrite:
        raise ConfigError(
            [Problem(key="output", file="<command line>", message=f"{output} exists")],
            hint="choose another -o file, or add --overwrite",
        )
    imported = import_argument_toml(source, schema.model)
    data = {table: dict(values) for table, values in imported.doc.data.items()}
    if dataset_config is not None:
        if not dataset_config.is_file():
            raise ConfigError(
                [
                    Problem(
                        key="dataset_config",
                        file="<command line>",
                        message=f"dataset blueprint {dataset_config} not found",
                    )
                ]
            )
        data.setdefault("dataset", {})["dataset_config"] = str(dataset_config.resolve())
    _validate(schema.model, data, imported.doc)
    text = (
        f"# imported by `sdtrain config import` from {source.name}\n"
        f"# train with: sdtrain train {method} {output.name}\n\n" + tomli_w.dumps(data)
    )
    write_text(output, text)
    for line in imported.report_lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    mapped = sum(len(v) for v in data.values())
    console.print(
        f"wrote {output}: {mapped} keys mapped, {len(imported.unmapped)} not used, "
        f"{len(imported.converted)} read in another form",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _validate(model: type, data: dict, doc: SourceDoc) -> None:
    """Refuse to write a run config that would not load (the problems name the source keys)."""
    from pydantic import ValidationError

    from sdtrain.config.problems import problems_from_validation
    from sdtrain.errors import ConfigError

    try:
        model.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_validation(exc, lambda loc: (str(doc.path), doc.line_of(loc)))
        raise ConfigError(problems, hint=f"fix these keys in {doc.path}") from exc
