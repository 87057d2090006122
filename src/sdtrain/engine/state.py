"""Resumable training states: folder layout, manifest with checksums, atomic replace, discovery.

A state folder holds the trainable weights, optimizer, LR scheduler, grad scaler, counters, RNG
states and the resolved config; `manifest.json` (sizes + SHA-256 of every file) is written last,
so a state without a verifying manifest is incomplete and never resumed from. Everything is
safetensors or JSON (engine/state_codec.py): no pickle is written, and the `.pt` files of format-1
states are read back with weights-only loading only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.atomic import (
    _fsync_dir,
    atomic_path,
    no_space_as_error,
    save_safetensors,
    write_text,
)
from sdtrain.engine.state_codec import (
    StateCodecError,
    component_file,
    read_component,
    write_component,
)
from sdtrain.errors import TrainingError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COUNTERS = "train_state.json"
CONFIG = "config.json"
STATE_FORMAT = 2  # 1: optimizer/scheduler/scaler/rng as torch.save pickles (read-only now)
# Hidden siblings of a state folder `X`: `.X.tmp-*` (being written), `.X.old-*` (the copy being
# replaced), `.X.del-*` (being deleted). A kill can leave any of them; tidy_output_dir sorts them.
WRITING = ".tmp-"
REPLACED = ".old-"
DELETING = ".del-"


@dataclass
class Counters:
    """Where training stands: the next batch to run is (epoch, position)."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 1  # 1-based epoch in progress
    position: int = 0  # next batch position inside the epoch's batch order
    seed: int = 0
    nonfinite_skipped: int = 0  # total skipped steps so far (reported in metrics)
    # processes the run trained on (each takes a slice of every global batch); states from
    # before this field was recorded were all written by one process
    num_processes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StateParts:
    """Everything a state stores, as live objects' state dicts."""

    counters: Counters
    trainable: dict[str, Any]  # name -> tensor
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    config: dict[str, Any]  # resolved config (JSON-able)


def _rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype("int64")),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate((states["python_version"], tuple(states["python"]), states["python_gauss"]))
    n = states["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_state(folder: Path, parts: StateParts) -> Path:
    """Write a complete state to `folder`, replacing any previous one there atomically (a full
    disk is a DiskFullError, with the previous state intact)."""
    with no_space_as_error(Path(folder)):
        return _write_state(Path(folder), parts)


def _write_state(folder: Path, parts: StateParts) -> Path:
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{folder.name}{WRITING}{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_safetensors(tmp / "trainable.safetensors", parts.trainable)
        write_component(tmp, "optimizer", parts.optimizer)
        write_component(tmp, "scheduler", parts.scheduler)
        if parts.scaler is not None:
            write_component(tmp, "scaler", parts.scaler)
        write_component(tmp, "rng", _rng_states())
        write_text(tmp / COUNTERS, json.dumps(asdict(parts.counters), indent=2))
        write_text(tmp / CONFIG, json.dumps(parts.config, indent=2, default=str))
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {
            "format": STATE_FORMAT,
            "global_step": parts.counters.global_step,
            "epoch": parts.counters.epoch,
            "position": parts.counters.position,
            "created": time.time(),
            "files": files,
        }
        with atomic_path(tmp / MANIFEST) as path:
            path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _fsync_dir(tmp)
        old = None
        if folder.exists():
            # a folder cannot be renamed over a non-empty one: move the old copy aside first
            old = parent / f".{folder.name}{REPLACED}{os.getpid()}-{time.monotonic_ns()}"
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old is not None and not folder.exists():
                os.replace(old, folder)  # interrupted between the two renames: keep the old one
            raise
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def verify_state(folder: Path) -> str | None:
    """None when the state's manifest verifies, else the reason it cannot be used."""
    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest ({exc})"
    for name, info in manifest.get("files", {}).items():
        path = Path(folder) / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != info["size"]:
            return f"{name} has the wrong size (truncated?)"
        if _sha256(path) != info["sha256"]:
            return f"{name} fails its checksum"
    return None


def tidy_output_dir(output_dir: Path) -> None:
    """Clear what killed saves left behind: temp files and half-written or half-deleted state
    folders are removed; a replaced state whose new copy never arrived is put back."""
    from sdtrain.atomic import is_temp_name

    folder = Path(output_dir)
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        name = path.name
        if not name.startswith("."):
            continue
        if path.is_dir() and REPLACED in name:
            original = folder / name[1:].rsplit(REPLACED, 1)[0]
            if not original.exists() and verify_state(path) is None:
                os.replace(path, original)
                logger.info("restored state %s (its replacement was never completed)", original)
                continue
        if path.is_dir() and (WRITING in name or REPLACED in name or DELETING in name):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s left by an interrupted save", path.name)
        elif path.is_file() and is_temp_name(path):
            path.unlink(missing_ok=True)
            logger.info("removed %s left by an interrupted save", path.name)


def find_latest_state(output_dir: Path) -> Path | None:
    """The most recently written state folder under `output_dir` whose manifest verifies (bad
    ones are named in warnings).

    Newest by write time, not by step: after resuming from an earlier state (e.g. the one a
    non-finite stop names), a higher-step state of the abandoned attempt must not win.
    """
    best: tuple[float, int, Path] | None = None
    for folder in sorted(Path(output_dir).glob("*-state")):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        problem = verify_state(folder)
        if problem:
            logger.warning("skipping state %s: %s", folder, problem)
            continue
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        rank = (float(manifest["created"]), int(manifest["global_step"]), folder)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return best[2] if best else None


@dataclass
class LoadedState:
    """A verified state read back from disk."""

    folder: Path
    counters: Counters
    trainable: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    config: dict[str, Any]
    rng: dict[str, Any]

    def restore_global_rng(self) -> None:
        """Put Python/NumPy/torch global RNGs back where they were at save time."""
        _restore_rng(self.rng)


def _damaged(folder: Path, name: str, reason: str) -> TrainingError:
    return TrainingError(
        f"cannot resume from {folder}: {name} is damaged or was not written by sdtrain ({reason})",
        hint='resume from another state (resume = "auto" picks the newest complete one)',
    )


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(Path(folder), name, str(exc)) from None


def load_state_config(folder: Path) -> dict[str, Any]:
    """The resolved config (and data fingerprint) a state was written with, without tensors."""
    config = _read_json(folder, CONFIG)
    if not isinstance(config, dict):
        raise _damaged(Path(folder), CONFIG, "not a JSON object")
    return config


def load_counters(folder: Path) -> Counters:
    """Just the counters (seed, step, epoch) of a state folder, without loading tensors."""
    raw = _read_json(folder, COUNTERS)
    try:
        return Counters(**raw)
    except TypeError as exc:
        raise _damaged(Path(folder), COUNTERS, str(exc)) from None


def _load_component(folder: Path, name: str, required: bool = True) -> Any:
    """A state component: NAME.safetensors / NAME.json, or a format-1 NAME.pt (weights only)."""
    path = component_file(folder, name)
    if path is not None:
        try:
            return read_component(path)
        except StateCodecError as exc:
            raise _damaged(folder, path.name, str(exc)) from None
    legacy = folder / f"{name}.pt"
    if legacy.is_file():
        return _load_legacy(folder, legacy)
    if required:
        raise _damaged(folder, name, "the file is missing")
    return None


def _load_legacy(folder: Path, path: Path) -> Any:
    """A format-1 `.pt` component, read only through torch's weights-only unpickler."""
    import torch

    from sdtrain.models.torch_file import reason

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refusals and damage both get one clear message
        raise _damaged(folder, path.name, reason(exc)) from None


def load_state(folder: Path) -> LoadedState:
    """Read a state folder after verifying its manifest (TrainingError if it does not verify,
    or if any file in it is damaged or foreign: never a raw parser traceback)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(
            f"resume state not found: {folder}",
            hint='check the path, or use resume = "auto" to pick the newest state',
        )
    problem = verify_state(folder)
    if problem:
        raise TrainingError(
            f"cannot resume from {folder}: {problem}",
            hint='use resume = "auto" to pick the newest complete state',
        )
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise _damaged(folder, "trainable.safetensors", str(exc).splitlines()[0]) from None
    return LoadedState(
        folder=folder,
        counters=load_counters(folder),
        trainable=trainable,
        optimizer=_load_component(folder, "optimizer"),
        scheduler=_load_component(folder, "scheduler"),
        scaler=_load_component(folder, "scaler", required=False),
        config=load_state_config(folder),
        rng=_load_component(folder, "rng"),
    )
