"""The compact pre-run summary: a few lines under 80 columns, silent with -q."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from sdtrain.cli.summary import print_summary, summary_lines
from sdtrain.config.loader import load_run_config
from sdtrain.data.plan import plan_for_run
from sdtrain.methods.registry import command_schema

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "examples" / "quickstart.toml"


def _plan():
    loaded = load_run_config(
        [str(QUICKSTART), "--validation_split", "0.25"], command_schema("lora")
    )
    return plan_for_run(loaded)


def test_summary_is_short_and_counts_what_trains():
    lines = summary_lines(_plan(), "runs/quickstart")
    assert len(lines) == 4 and all(len(line) <= 80 for line in lines), lines
    assert lines[0] == "data: 1 dataset, 6 images + 16 reg, 48 samples/epoch, 2 held out"
    assert lines[1].startswith("buckets (batches): 64x64 (")
    assert lines[2].endswith("= 300 optimizer steps")


def test_quiet_drops_the_summary():
    console = Console(record=True, width=80)
    logger = logging.getLogger("sdtrain")
    saved = logger.level
    try:
        logger.setLevel(logging.WARNING)
        print_summary(console, _plan(), "out")
        assert console.export_text() == ""
        logger.setLevel(logging.INFO)
        print_summary(console, _plan(), "out")
        assert "optimizer steps" in console.export_text()
    finally:
        logger.setLevel(saved)
