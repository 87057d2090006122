"""What users read at 80 columns: help, --help-config and the plan keep names whole, show
bracketed table names literally, never cut with "…", and put no `<bool>` on flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdtrain.config.schema_index import index_schema
from sdtrain.methods.registry import METHODS, command_schema

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "examples" / "quickstart.toml"


def sdtrain(*args: str) -> str:
    """Run the real entry point at COLUMNS=80; stdout + stderr."""
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80", "SDTRAIN_NO_REEXEC": "1"}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run(
        [sys.executable, "-m", "sdtrain", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("method", sorted(METHODS))
def test_help_config_keeps_every_key_and_table_whole_at_80_columns(method):
    text = sdtrain("train", method, "--help-config")
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in text
    for table in (
        "[model]",
        "[dataset]",
        "[training]",
        "[optimizer]",
        f"[{METHODS[method].table}]",
    ):
        assert table in lines, table
    for name, info in index_schema(command_schema(method).model).items():
        assert f"  {name}  [{info.table}]  " in text, name  # one greppable line per key


@pytest.mark.parametrize(
    ("args", "whole"),
    [
        (("train", "lora", "--help"), ["--dry-run, --dry_run", "--help-config, --help_config"]),
        (("dataset", "plan", "--help"), ["--preview", "--json"]),
        (
            ("caption", "wd14", "--help"),
            [
                "--caption_extension, --caption-extension, --caption_extention",
                "SmilingWolf/wd-v1-4-convnext-",
            ],
        ),
        (("model", "convert", "--help"), ["--v-parameterization, --v_parameterization"]),
        (("--help",), ["--verbose", "--quiet"]),
        (
            ("train", "--help"),
            [
                "Train a kohya-compatible LoRA\n",
                "dreambooth  Full DreamBooth (U-Net + text encoder)\n",
            ],
        ),
        (("train", "lora", "--help"), ["    --resume PATH|auto\n"]),  # the epilog's own layout
    ],
)
def test_help_is_whole_plain_and_has_no_bool_metavar(args, whole):
    text = sdtrain(*args)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text
    assert "<bool>" not in text
    for piece in whole:
        assert piece in text, piece


@pytest.mark.parametrize(
    "command",
    [
        ("caption", "blip"),
        ("caption", "wd14"),
        ("model", "convert"),
        ("model", "info"),
        ("metadata", "merge"),
        ("metadata", "clean"),
        ("latents", "cache"),
        ("generate",),
        ("config", "import"),
    ],
)
def test_every_tool_help_fits_80_columns(command):
    text = sdtrain(*command, "--help")
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long


def test_plan_at_80_columns_keeps_key_names_and_table_names():
    text = sdtrain("dataset", "plan", str(QUICKSTART))
    assert all(len(line) <= 80 for line in text.splitlines())
    for key in ("caption_extension", "bucket_no_upscale", "caption_dropout_rate", "num_repeats"):
        assert f"│ {key} " in text, key
    assert "[general]" in text  # origins name the blueprint table, not eaten as markup
    assert str(QUICKSTART.parent / "quickstart" / "images") in text  # folders printed whole
