"""Issue 15's bad-input battery: each row is a hostile or broken input run through the CLI
in-process, with the exit code it must get, a fragment of the message it must print, and no
traceback. (The first-hour battery, tests/run/test_bad_input_first_hour.py or similar, covers
issue 14's rows.)"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from train_runs import make_dataset, write_config

from sdtrain.errors import SdtrainError
from sdtrain.run.lock import hold_run_folder


def run_cli(args: list[str]) -> tuple[int, str]:
    """The CLI as a terminal runs it (cli/main.run's error boundary), captured in-process."""
    from typer.testing import CliRunner

    from sdtrain.cli.main import _register_groups, app
    from sdtrain.cli.render import render_error
    from sdtrain.log import console

    _register_groups()
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    except SdtrainError as error:
        with console.capture() as captured:
            render_error(error)
        return error.exit_code, captured.get()
    return result.exit_code, result.output


class _Payload:
    """A pickle that would create `marker` if it were ever unpickled with code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def corrupt_png(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    """A PNG whose chunks and CRCs are valid but whose compressed pixel stream is broken."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], bytearray(data[pos + 8 : pos + 8 + length])
        if kind == b"IDAT":
            for i in range(10, len(body) - 10, 7):
                body[i] ^= 0x5A
        out += struct.pack(">I", length) + kind + body
        out += struct.pack(">I", zlib.crc32(kind + bytes(body)) & 0xFFFFFFFF)
        pos += 12 + length
    path.write_bytes(bytes(out))


@dataclass
class Row:
    """One bad input: `setup(env)` builds its files and returns the CLI arguments."""

    name: str
    setup: Callable[[Env], list[str]]
    code: int
    fragment: str


@dataclass
class Env:
    """What a row's setup may use besides its folder."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    stack: contextlib.ExitStack
    request: pytest.FixtureRequest

    def data(self, images: int = 2) -> Path:
        return make_dataset(self.tmp, images=images)

    def config(self, data: Path | None = None, **tables) -> Path:
        """A 1-step run config (no periodic saves) over `data` (2 captioned 64 px images)."""
        saving = {"save_every_n_steps": None, "save_state": False, **tables.get("saving", {})}
        training = {"max_train_steps": 1, "gradient_accumulation_steps": 1}
        training.update(tables.get("training", {}))
        config = write_config(
            self.tmp / "run.toml",
            data if data is not None else self.data(),
            self.tmp / "out",
            training=training,
            saving=saving,
            dataset=tables.get("dataset"),
        )
        extra = {k: v for k, v in tables.items() if k not in ("saving", "training", "dataset")}
        if extra:
            text = config.read_text()
            for table, values in extra.items():
                lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
                text = text.replace(f"[{table}]\n", f"[{table}]\n" + "\n".join(lines) + "\n")
            config.write_text(text)
        return config

    def state(self) -> Path:
        """A copy of a real 1-step state (`out/t-state`); `resume_config()` matches it."""
        source = self.request.getfixturevalue("trained_state")
        target = self.tmp / "out" / "t-state"
        shutil.copytree(source, target)
        return target

    def resume_config(self, **tables) -> Path:
        """`config()` over the data the `state()` was trained on."""
        source = self.request.getfixturevalue("trained_state")
        return self.config(source.parent.parent / "data", **tables)

    def train(self, config: Path, *flags: str) -> list[str]:
        return ["train", "lora", str(config), *flags]


def _rewrite_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.iterdir())
        if p.name != "manifest.json"
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _hostile(path: Path, env: Env) -> None:
    torch.save({"w": torch.zeros(1), "x": _Payload(env.tmp / "pwned")}, path)


def _state_with(env: Env, name: str, write: Callable[[Path], None], manifest: bool = True) -> list:
    """Resume from a state whose file `name` was replaced by `write` (manifest kept consistent)."""
    state = env.state()
    for old in state.glob(name.split(".")[0] + ".*"):
        old.unlink()
    write(state / name)
    if manifest:
        _rewrite_manifest(state)
    return env.train(env.resume_config(), "--resume", str(state))


def no_manifest(env: Env) -> list[str]:
    state = env.state()
    (state / "manifest.json").unlink()
    return env.train(env.resume_config(), "--resume", str(state))


# ------------------------------------------------------------------ rows
def busy(dry: bool) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        config = env.config()
        env.stack.enter_context(hold_run_folder(env.tmp / "out"))
        return env.train(config, *(["--dry-run"] if dry else []))

    return setup


def busy_auto(env: Env) -> list[str]:
    env.state()
    config = env.resume_config(saving={"resume": "auto"})
    env.stack.enter_context(hold_run_folder(env.tmp / "out"))
    return env.train(config)


def dataset_with(kind: str, dry: bool = True, **tables) -> Callable[[Env], list[str]]:
    """A dataset with one bad image (or no images) beside a good one."""

    def setup(env: Env) -> list[str]:
        data = env.data()
        folder = data / "1_cat"
        if kind == "truncated":
            raw = (folder / "img0.png").read_bytes()
            (folder / "img0.png").write_bytes(raw[: len(raw) // 2])
        elif kind == "pixels":
            corrupt_png(folder / "img0.png")
        elif kind == "empty_dir":
            shutil.rmtree(folder)
            folder.mkdir()
        elif kind == "captions_only":
            for image in folder.glob("*.png"):
                image.unlink()
        elif kind == "missing_dir":
            shutil.rmtree(data)
        elif kind == "not_an_image":
            (folder / "img0.png").write_bytes(b"GIF89a not a png at all")
        elif kind == "zero_bytes":
            (folder / "img0.png").write_bytes(b"")
        elif kind == "bad_utf8_caption":
            (folder / "img0.caption").write_bytes(b"\xff\xfe\xfa caption")
        return env.train(env.config(data, **tables), *(["--dry-run"] if dry else []))

    return setup


def pixels_fail_mid_run(env: Env) -> list[str]:
    """A file that breaks after the plan decoded it (simulated: the check passes it)."""
    data = env.data()
    corrupt_png(data / "1_cat" / "img1.png")
    env.monkeypatch.setattr("sdtrain.data.collect.pixel_problem", lambda path: None)
    return env.train(env.config(data, training={"max_train_steps": 4}))


def network_weights(kind: str, partial: bool = False) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / ("lora.pt" if kind in ("hostile", "garbage") else "lora.safetensors")
        if kind == "hostile":
            _hostile(path, env)
        elif kind == "garbage":
            path.write_bytes(b"PK\x03\x04 definitely not a zip")
        else:  # SDXL-style keys: nothing matches an SD1 network
            save_file(
                {
                    "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
                    "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4),
                    "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
                },
                str(path),
            )
        network = {"network_weights": str(path), "network_weights_partial": partial}
        return env.train(env.config(network=network))

    return setup


def model_file(kind: str, key: str = "pretrained_model_name_or_path") -> Callable:
    def setup(env: Env) -> list[str]:
        path = env.tmp / "model.ckpt"
        if kind == "hostile":
            torch.save(
                {"state_dict": {"a": torch.zeros(1)}, "x": _Payload(env.tmp / "pwned")}, path
            )
        else:
            path.write_bytes(b"\x80\x02 garbage pickle")
        config = env.config()
        return env.train(config, f"--{key}", str(path))

    return setup


def no_space(kind: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        if kind == "check":
            env.monkeypatch.setattr("sdtrain.atomic.free_bytes", lambda folder: 4096)
        else:
            import safetensors.torch

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            env.monkeypatch.setattr(safetensors.torch, "save_file", full)
        return env.train(env.config())

    return setup


def tiny_image(env: Env) -> list[str]:
    data = env.data()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(data / "1_cat" / "img0.png")
    return env.train(env.config(data))


def empty_caption(env: Env) -> list[str]:
    data = env.data()
    (data / "1_cat" / "img0.caption").write_text("")
    return env.train(env.config(data))


def old_metrics(env: Env) -> list[str]:
    (env.tmp / "out").mkdir()
    (env.tmp / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return env.train(env.config())


def exploding_lr(env: Env) -> list[str]:
    config = env.config(training={"max_train_steps": 6, "max_nonfinite_steps": 2})
    return env.train(config, "--learning_rate", "1e6")


ROWS = [
    # one run per output folder
    Row("busy folder", busy(False), 2, "is in use by another sdtrain run (PID"),
    Row("busy folder, dry run", busy(True), 2, "is in use by another sdtrain run (PID"),
    Row("busy folder, resume auto", busy_auto, 2, "is in use by another sdtrain run"),
    # a dry run exits as the real run would
    Row("dry run: truncated image", dataset_with("truncated"), 1, "image(s) cannot be used"),
    Row("dry run: broken pixel data", dataset_with("pixels"), 1, "pixel data cannot be decoded"),
    Row("dry run: empty image folder", dataset_with("empty_dir"), 1, "No data found"),
    Row("dry run: captions, no images", dataset_with("captions_only"), 1, "No data found"),
    Row("dry run: missing data folder", dataset_with("missing_dir"), 1, "does not exist"),
    Row("dry run: not an image", dataset_with("not_an_image"), 1, "image(s) cannot be used"),
    Row("dry run: 0-byte image", dataset_with("zero_bytes"), 1, "empty file (0 bytes)"),
    Row("dry run: non-UTF-8 caption", dataset_with("bad_utf8_caption"), 1, "not valid UTF-8"),
    # broken pixel data behind a valid header
    Row("run: broken pixels", dataset_with("pixels", dry=False), 1, "pixel data cannot be decoded"),
    Row(
        "run: broken pixels, skipped, cached",
        dataset_with(
            "pixels",
            dry=False,
            dataset={"skip_invalid_images": True},
            training={"cache_latents": True},
        ),
        0,
        "1 image(s) cannot be used and are left out",
    ),
    Row(
        "run: broken pixels, skipped",
        dataset_with("pixels", dry=False, dataset={"skip_invalid_images": True}),
        0,
        "are left out (skip_invalid_images = true)",
    ),
    Row("run: pixels break mid-run", pixels_fail_mid_run, 1, "state written to"),
    # states: safetensors + JSON, hostile or damaged files named
    Row(
        "state: hostile optimizer.pt",
        lambda env: _state_with(env, "optimizer.pt", lambda p: _hostile(p, env)),
        1,
        "optimizer.pt is damaged or was not written by sdtrain (it holds pickled Python objects",
    ),
    Row(
        "state: garbage optimizer.safetensors",
        lambda env: _state_with(env, "optimizer.safetensors", lambda p: p.write_bytes(b"\x08" * 9)),
        1,
        "optimizer.safetensors is damaged or was not written by sdtrain",
    ),
    Row(
        "state: garbage rng",
        lambda env: _state_with(env, "rng.json", lambda p: p.write_text('{"__tensor__": "x"}')),
        1,
        "rng.json is damaged",
    ),
    Row(
        "state: garbage train_state.json",
        lambda env: _state_with(env, "train_state.json", lambda p: p.write_text("{nope")),
        1,
        "train_state.json is damaged",
    ),
    Row(
        "state: config.json not an object",
        lambda env: _state_with(env, "config.json", lambda p: p.write_text("[1, 2]")),
        1,
        "config.json is damaged",
    ),
    Row(
        "state: file swapped, manifest not",
        lambda env: _state_with(
            env, "scheduler.json", lambda p: p.write_text('{"x": 1}'), manifest=False
        ),
        1,
        "scheduler.json has the wrong size",
    ),
    Row("state: no manifest", no_manifest, 1, "no manifest (the save did not finish)"),
    Row(
        "state: path does not exist",
        lambda env: env.train(env.resume_config(), "--resume", str(env.tmp / "nope-state")),
        1,
        "not found",
    ),
    # .pt files only through the weights-only loader, with our message
    Row("network_weights: hostile .pt", network_weights("hostile"), 1, "sdtrain refuses"),
    Row("network_weights: garbage .pt", network_weights("garbage"), 2, "not a torch checkpoint"),
    Row("network_weights: SDXL LoRA", network_weights("foreign"), 2, "does not fit this network"),
    Row(
        "network_weights: SDXL LoRA, partial allowed",
        network_weights("foreign", partial=True),
        0,
        "LoRA modules loaded",
    ),
    Row("model: hostile .ckpt", model_file("hostile"), 1, "sdtrain refuses"),
    Row("model: garbage .ckpt", model_file("garbage"), 1, "truncated or damaged"),
    # a full disk
    Row("disk: not enough free space", no_space("check"), 1, "not enough free space"),
    Row("disk: ENOSPC while writing", no_space("write"), 1, "the disk is full"),
    # smaller ones
    Row("tiny image", tiny_image, 0, "upscaled more than 4x"),
    Row("empty caption file", empty_caption, 0, "1 caption file(s) are empty"),
    Row("old metrics.jsonl, fresh run", old_metrics, 0, "was moved to metrics.1.jsonl"),
    Row("learning_rate 1e6", exploding_lr, 1, "already exploding"),
]


@pytest.fixture(scope="module")
def trained_state(tmp_path_factory) -> Path:
    """`t-state` of a 1-step run with the battery's default config (made once per module)."""
    root = tmp_path_factory.mktemp("battery-state")
    env = Env(root, pytest.MonkeyPatch(), contextlib.ExitStack(), None)  # type: ignore[arg-type]
    config = env.config(saving={"save_state_on_train_end": True})
    code, output = run_cli(env.train(config))
    assert code == 0, output
    return root / "out" / "t-state"


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row: Row, tmp_path, monkeypatch, request):
    with contextlib.ExitStack() as stack:
        env = Env(tmp_path, monkeypatch, stack, request)
        args = row.setup(env)
        code, output = run_cli(args)
    flat = " ".join(output.replace("│", " ").split())
    assert "Traceback" not in output, output
    assert code == row.code, output
    assert row.fragment in flat, output
    assert not (tmp_path / "pwned").exists()  # no hostile payload ever ran


def test_the_battery_is_big_enough():
    assert len(ROWS) >= 30


def test_a_nonfinite_stop_suggests_a_lower_learning_rate_not_the_same_one(tmp_path, monkeypatch):
    env = Env(tmp_path, monkeypatch, contextlib.ExitStack(), None)  # type: ignore[arg-type]
    with pytest.raises(SdtrainError) as info:
        from typer.testing import CliRunner

        from sdtrain.cli.main import _register_groups, app

        _register_groups()
        CliRunner().invoke(app, exploding_lr(env), catch_exceptions=False)
    hint = info.value.hint or ""
    assert "already exploding" in info.value.message
    assert "--learning_rate 1e6" not in hint
    assert "--learning_rate 100000 --resume_allow_changes optimizer.learning_rate --resume" in hint
