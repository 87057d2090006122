"""Metrics sinks: a JSON-lines file in the run folder (always) plus TensorBoard / wandb trackers.

Only the main process of a multi-process run creates them (run/train.py); `log_tracker_name`
names the run for every tracker: the wandb project, and the TensorBoard run folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sdtrain.atomic import no_space_as_error, write_text
from sdtrain.config.sections import LoggingSection
from sdtrain.errors import ConfigError, MissingExtraError, Problem

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past `last_step` (a resumed run rewrites what came after its state)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed process
        if record.get("step", 0) <= last_step:
            kept.append(line)
    write_text(path, "".join(f"{line}\n" for line in kept))


def rotate_metrics(path: Path) -> Path | None:
    """Move a previous run's log aside before a fresh (not resumed) run, so step numbers never
    repeat in one file: `metrics.jsonl` -> `metrics.N.jsonl` (N = the first free number, so a
    larger N is a later run). Returns the new name, None when there was nothing to move."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    n = 1
    while (rotated := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, rotated)
    logger.info("this run starts fresh: the previous %s was moved to %s", path.name, rotated.name)
    return rotated


def tensorboard_dir(section: LoggingSection, stamp: str) -> Path:
    """`<logging_dir>/<log_prefix><stamp>`, plus `/<log_tracker_name>` when that names the run
    (the reference's layout: accelerate's TensorBoard tracker writes under the project name)."""
    folder = Path(str(section.logging_dir)) / f"{section.log_prefix or ''}{stamp}"
    return folder / section.log_tracker_name if section.log_tracker_name else folder


class Trackers:
    """TensorBoard / wandb writers chosen by [logging]; absent libraries name their extra."""

    def __init__(self, section: LoggingSection, default_name: str, config: dict[str, Any]) -> None:
        self._tb = None
        self._wandb = None
        kinds = {"all": ("tensorboard", "wandb")}.get(section.log_with or "", (section.log_with,))
        if section.log_with is None and section.logging_dir:
            kinds = ("tensorboard",)
        stamp = time.strftime("%Y%m%d%H%M%S")
        if "tensorboard" in kinds:
            if not section.logging_dir:
                raise ConfigError(
                    [
                        Problem(
                            key="logging.logging_dir",
                            message="log_with = tensorboard needs logging_dir",
                        )
                    ]
                )
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise MissingExtraError(
                    "TensorBoard logging", "tensorboard", "tensorboard"
                ) from exc
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir(section, stamp)))
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError as exc:
                raise MissingExtraError("wandb logging", "wandb", "wandb") from exc
            self._wandb = wandb.init(
                project=section.log_tracker_name or default_name,
                name=section.wandb_run_name,
                config=config,
                dir=section.logging_dir,
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """images: name -> PIL image."""
        if self._tb is not None:
            import numpy as np

            for name, image in images.items():
                self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class MetricsLog:
    """Appends one JSON object per record to <output_dir>/metrics.jsonl and forwards to trackers."""

    def __init__(self, output_dir: Path, trackers: Trackers | None) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self.trackers = trackers

    def write(self, record: dict[str, Any]) -> None:
        with no_space_as_error(self.path):
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        if self.trackers is not None:
            numeric = {
                k: float(v)
                for k, v in record.items()
                if isinstance(v, (int, float)) and k not in ("step",)
            }
            self.trackers.log(int(record.get("step", 0)), numeric)

    def close(self) -> None:
        self._handle.close()
        if self.trackers is not None:
            self.trackers.close()
