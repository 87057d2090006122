"""The method registry: every entry makes a CLI command, a schema, dataset rules and a builder."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sdtrain.config.methods import METHOD_TABLES
from sdtrain.config.schema_index import index_schema, table_names
from sdtrain.methods.registry import METHODS, command_schema


@pytest.mark.parametrize("name", sorted(METHODS))
def test_entry_makes_schema_command_and_builder(name):
    entry = METHODS[name]
    assert METHOD_TABLES[entry.table] == name
    schema = command_schema(name)
    assert schema.title == f"sdtrain train {name}"
    assert entry.table in table_names(schema.model)
    own = set(entry.section.model_fields)
    keys = index_schema(schema.model).items()
    assert own and {k for k, info in keys if info.table == entry.table} == own
    assert (schema.support.dreambooth, schema.support.finetune, schema.support.dropout) == (
        entry.dreambooth,
        entry.finetune,
        entry.dropout,
    )
    module, _, function = entry.builder.partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), function))

    from sdtrain.cli.main import _register_groups, app

    _register_groups()
    result = CliRunner().invoke(app, ["train", name, "--help-config"])
    assert result.exit_code == 0, result.output
    assert f"configuration keys ({name})" in result.output
    assert f"[{entry.table}]" in result.output
    helped = CliRunner().invoke(app, ["train", "--help"])
    assert name in helped.output


def test_other_method_tables_are_refused_by_name(tmp_path):
    from sdtrain.config.loader import load_run_config
    from sdtrain.errors import ConfigError

    path = tmp_path / "run.toml"
    path.write_text("[textual_inversion]\nx = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_run_config([str(path)], command_schema("lora"))
    assert "belongs to `sdtrain train ti`" in info.value.problems[0].message


def test_the_registry_imports_only_the_standard_library():
    code = (
        "import sys, sdtrain.methods.registry as r; "
        "print(sorted(m for m in ('torch', 'pydantic', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_dataset_plan_checks_the_kinds_of_the_run_files_method(tmp_path, cli, monkeypatch):
    from sdtrain.methods.registry import MethodEntry

    # a method that trains DreamBooth datasets only (as train_db does)
    entry = MethodEntry(
        name="dreambooth",
        summary="test",
        table="dreambooth",
        section_ref="sdtrain.config.methods:NetworkSection",
        builder="sdtrain.methods.lora:build",
        finetune=False,
    )
    monkeypatch.setitem(METHODS, "dreambooth", entry)
    (tmp_path / "img").mkdir()
    meta = tmp_path / "meta.json"
    meta.write_text("{}", encoding="utf-8")
    body = f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n"
    body += f"metadata_file = '{meta}'\n"
    run = tmp_path / "run.toml"
    run.write_text("[dreambooth]\n" + body, encoding="utf-8")
    from sdtrain.errors import ConfigError, SdtrainError

    with pytest.raises(ConfigError) as info:
        cli(["dataset", "plan", str(run)])
    assert "cannot train fine-tune subsets" in str(info.value.problems)
    run.write_text(body, encoding="utf-8")  # no method table: every kind
    try:
        cli(["dataset", "plan", str(run)])
    except SdtrainError as error:  # the empty metadata file may be refused, not the kind
        assert "cannot train fine-tune" not in str(error.problems)
