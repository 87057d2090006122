"""Shared by the resume / crash-safety / non-finite tests: a tiny captioned dataset, run configs
for `sdtrain train lora` on builtin:tiny-sd1, injection into the micro-step loss, and exact
comparisons of what two runs wrote (weights, optimizer, scheduler, metrics log)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

IMAGES = 5  # batch 1 + gradient_accumulation_steps 2: windows [0, 1] [2, 3] [4] per epoch
STEPS = 7  # 3 steps per epoch: the run ends after the first step of epoch 3


def make_dataset(root: Path, images: int = IMAGES) -> Path:
    """`root/data/1_cat/` with `images` random 64 px PNGs and multi-tag captions."""
    folder = root / "data" / "1_cat"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text(f"cat, red, blue, tall, small, tag{i}")
    return root / "data"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(
    path: Path,
    data: Path,
    output_dir: Path,
    *,
    training: dict[str, Any] | None = None,
    saving: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
) -> Path:
    """A run config: caption shuffling, caption dropout and flip_aug on, batch 1, accumulation 2,
    7 steps, saves + states every 2 steps and at the end. Tables are updated by the arguments."""
    tables: dict[str, dict[str, Any]] = {
        "model": {"pretrained_model_name_or_path": "builtin:tiny-sd1"},
        "dataset": {
            "train_data_dir": str(data),
            "resolution": 64,
            "shuffle_caption": True,
            "caption_dropout_rate": 0.3,
            "flip_aug": True,
            **(dataset or {}),
        },
        "training": {
            "output_dir": str(output_dir),
            "output_name": "t",
            "max_train_steps": STEPS,
            "train_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "max_data_loader_n_workers": 0,
            "seed": 7,
            **(training or {}),
        },
        "network": {"network_dim": 4, "network_dropout": 0.1, **(network or {})},
        "optimizer": {"learning_rate": 1e-3},
        "saving": {
            "save_every_n_steps": 2,
            "save_state": True,
            "save_state_on_train_end": True,
            **(saving or {}),
        },
    }
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train(cli: Callable, config: Path, *flags: str) -> Any:
    """`sdtrain train lora CONFIG FLAGS...` in-process; asserts exit code 0."""
    result = cli(["train", "lora", str(config), *flags])
    assert result.exit_code == 0, result.output
    return result


def inject(monkeypatch: Any, action: Callable[[int, Any], Any | None]) -> list[list[str]]:
    """Wrap the micro-step loss: `action(call_index, loss)` may return a replacement loss.

    Returns the list of image paths per call (0-based call index of this process's run).
    """
    import sdtrain.engine.step as step_module

    real = step_module.micro_step_loss
    calls: list[list[str]] = []

    def wrapped(ctx: Any, batch: Any, generator: Any, step: Any) -> Any:
        loss = real(ctx, batch, generator, step)
        calls.append(list(batch.paths))
        replaced = action(len(calls) - 1, loss)
        return loss if replaced is None else replaced

    monkeypatch.setattr(step_module, "micro_step_loss", wrapped)
    return calls


def interrupt_at(call: int) -> Callable[[int, Any], None]:
    """An `inject` action that sends this process SIGINT during micro-step number `call`."""

    def action(index: int, loss: Any) -> None:
        if index == call:
            os.kill(os.getpid(), signal.SIGINT)

    return action


def nan_at(calls: Iterable[int]) -> Callable[[int, Any], Any | None]:
    """An `inject` action that makes the loss of the given micro-steps NaN (graph kept)."""
    bad = set(calls)

    def action(index: int, loss: Any) -> Any | None:
        return loss * float("nan") if index in bad else None

    return action


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values (tensors bit-equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def state_contents(folder: Path) -> dict[str, Any]:
    """What a state folder holds that must match between a straight and a resumed run."""
    from sdtrain.engine.state import load_state, verify_state

    assert verify_state(folder) is None, folder
    state = load_state(folder)
    return {
        "trainable": state.trainable,
        "optimizer": state.optimizer,
        "scheduler": state.scheduler,
        "counters": json.loads((folder / "train_state.json").read_text()),
    }


def lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a written LoRA file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of `<output_dir>/metrics.jsonl`."""
    text = (output_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def assert_same_training(straight: Path, resumed: Path) -> None:
    """Final LoRA tensors, final state (weights, optimizer, scheduler, counters) and the metrics
    log of two output folders are bit-identical."""
    assert_same(state_contents(straight / "t-state"), state_contents(resumed / "t-state"))
    assert_same(lora_file(straight / "t.safetensors")[0], lora_file(resumed / "t.safetensors")[0])
    assert (straight / "metrics.jsonl").read_bytes() == (resumed / "metrics.jsonl").read_bytes()


def saved_counts(path: Path) -> tuple[str, str]:
    """(ss_steps, ss_epoch) of a LoRA file."""
    metadata = lora_file(path)[1]
    return metadata["ss_steps"], metadata["ss_epoch"]


def start_cli(
    config: Path, log: Path, *flags: str, slow_write: float | None = None
) -> subprocess.Popen:
    """`python -m sdtrain train lora CONFIG` in its own process group (as a terminal would run
    it), output to `log`; `slow_write` sets the atomic-write test hook (seconds per file)."""
    env = dict(os.environ, COLUMNS="400")
    env.pop("SDTRAIN_TEST_SLOW_WRITE", None)
    if slow_write:
        env["SDTRAIN_TEST_SLOW_WRITE"] = str(slow_write)
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "sdtrain", "train", "lora", str(config), *flags],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def read_log(log: Path) -> str:
    """A subprocess log with rich panel borders and line wrapping flattened to single spaces."""
    return " ".join(log.read_text(encoding="utf-8").replace("│", " ").split())


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300) -> None:
    """Poll `condition` every 10 ms while `proc` runs; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the point"
        assert time.monotonic() < deadline, "timed out waiting for the point"
        time.sleep(0.01)


def writing(output_dir: Path, pattern: str) -> Callable[[], bool]:
    """Condition: a file or folder matching `pattern` (glob, relative, may use a hidden state
    folder being written) exists under `output_dir`."""
    return lambda: any(True for _ in output_dir.glob(pattern))


def assert_no_unloadable_final_names(output_dir: Path) -> None:
    """Every file or state folder under a final (non-hidden) name loads or verifies."""
    import tomllib

    from sdtrain.engine.state import verify_state

    for path in output_dir.iterdir():
        if path.name.startswith("."):
            continue  # leftovers of a killed atomic write: ignored, tidied by the next run
        if path.is_dir():
            assert path.name.endswith("-state"), path
            assert verify_state(path) is None, path
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            assert path.name.startswith("metrics.") and path.suffix == ".jsonl", path
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line)
