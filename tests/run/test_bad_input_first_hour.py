"""A new user's broken inputs: each one ends with exit code 2 (config/usage) or 1 (runtime), no
traceback, and names the key, file or line to fix. Every case is a `--dry-run`, so each is also
proof that the check happens before any weight loads (the model is never loaded here)."""

from __future__ import annotations

import importlib.util
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BASE = """\
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[training]
output_dir = "out"
max_train_steps = 4
max_data_loader_n_workers = 0
seed = 1

[network]
network_dim = 4

[general]
resolution = 64
caption_extension = ".txt"

[[datasets]]
[[datasets.subsets]]
image_dir = "imgs"
"""


@dataclass
class Case:
    """One broken input: how to break the run folder, the flags, what must be said."""

    name: str
    code: int
    says: list[str]
    flags: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] | None = None
    toml: str | None = None  # replaces BASE (may use {base} to extend it)


def _replace(old: str, new: str) -> str:
    return BASE.replace(old, new)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / name).write_bytes(data)

    return setup


def _safetensors(header: bytes, extra: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + extra


def _corrupt_image(root: Path) -> None:
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "imgs" / "broken.txt").write_text("broken")


def _no_images(root: Path) -> None:
    for path in (root / "imgs").iterdir():
        path.unlink()


def _bad_caption(root: Path) -> None:
    (root / "imgs" / "0.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3")


def _bad_prompts(root: Path) -> None:
    (root / "prompts.txt").write_text("a cat --w notanumber\n")


SAFE_TRUNCATED = _safetensors(
    b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}', b"\0" * 10
)

CASES = [
    # --- run TOML
    Case(
        "toml syntax",
        2,
        ["run.toml:6:19"],
        toml=_replace("max_train_steps = 4", "max_train_steps = = 4"),
    ),
    Case(
        "unknown key",
        2,
        ["run.toml:7", "max_data_loader_n_worker", "did you mean"],
        toml=_replace("max_data_loader_n_workers", "max_data_loader_n_worker"),
    ),
    Case(
        "string for a number",
        2,
        ["run.toml:6", "training.max_train_steps"],
        toml=_replace("max_train_steps = 4", 'max_train_steps = "4"'),
    ),
    Case("unknown table", 2, ["trainig", "did you mean"], toml=_replace("[training]", "[trainig]")),
    Case(
        "key outside a table",
        2,
        ["learning_rate", "must be inside a table", "[optimizer]"],
        toml="learning_rate = 1e-4\n" + BASE,
    ),
    Case(
        "no base model",
        2,
        ["model.pretrained_model_name_or_path", "no base model"],
        toml=_replace('pretrained_model_name_or_path = "builtin:tiny-sd1"', ""),
    ),
    Case("no output folder", 2, ["training.output_dir"], toml=_replace('output_dir = "out"', "")),
    Case(
        "adaptive noise without offset",
        2,
        ["adaptive_noise_scale", "noise_offset"],
        flags=["--adaptive_noise_scale", "0.1"],
    ),
    Case("full_fp16 without fp16", 2, ["full_fp16"], flags=["--full_fp16"]),
    Case(
        "cache_latents with color_aug",
        2,
        ["training.cache_latents", "color_aug", "imgs"],
        toml=BASE + "color_aug = true\n",
        flags=["--cache_latents"],
    ),
    Case(
        "cache_latents with random_crop",
        2,
        ["training.cache_latents", "random_crop"],
        toml=BASE + "random_crop = true\n",
        flags=["--cache_latents"],
    ),
    Case(
        "blueprint typo",
        2,
        ["run.toml:19", "image_dri", "did you mean `image_dir`"],
        toml=_replace('image_dir = "imgs"', 'image_dri = "imgs"'),
    ),
    Case(
        "custom_attributes",
        2,
        ["custom_attributes", "run.toml"],
        toml=BASE + "custom_attributes = { style = 1 }\n",
    ),
    Case(
        "bad prompt file",
        2,
        ["prompts.txt", "--w"],
        setup=_bad_prompts,
        flags=["--sample_prompts", "PROMPTS"],
    ),
    # --- flags
    Case(
        "unknown flag",
        2,
        ["--lerning_rate", "did you mean --learning_rate", "on the command line"],
        flags=["--lerning_rate", "1e-4"],
    ),
    Case("flag without value", 2, ["--max_train_steps needs a value"], flags=["--max_train_steps"]),
    Case(
        "bad boolean",
        2,
        ["training.cache_latents", "true or false"],
        flags=["--cache_latents=maybe"],
    ),
    Case("bad number", 2, ["optimizer.learning_rate", "abc"], flags=["--learning_rate", "abc"]),
    Case(
        "fp16 on CPU", 2, ["training.mixed_precision", "CUDA"], flags=["--mixed_precision", "fp16"]
    ),
    Case("xformers without CUDA", 2, ["model.xformers", "CUDA"], flags=["--xformers"]),
    Case(
        "unknown optimizer",
        2,
        ["optimizer.optimizer_type", "Adamm"],
        flags=["--optimizer_type", "Adamm"],
    ),
    Case(
        "unknown scheduler",
        2,
        ["optimizer.lr_scheduler", "cosinus"],
        flags=["--lr_scheduler", "cosinus"],
    ),
    Case(
        "warm-up ignored",
        2,
        ["optimizer.lr_warmup_steps", "constant_with_warmup"],
        flags=["--lr_scheduler", "constant", "--lr_warmup_steps", "10"],
    ),
    Case(
        "tensorboard without folder",
        2,
        ["logging.logging_dir"],
        flags=["--log_with", "tensorboard"],
    ),
    Case("resume from nowhere", 1, ["cannot resume", "nowhere"], flags=["--resume", "nowhere"]),
    Case(
        "reference-only flag",
        2,
        ["--debug_dataset", "dataset plan", "--preview"],
        flags=["--debug_dataset"],
    ),
    Case(
        "validation cadence without a split",
        2,
        ["training.validate_every_n_steps", "validation_split"],
        flags=["--validate_every_n_steps", "2"],
    ),
    Case(
        "validation_split out of range",
        2,
        ["dataset.validation_split", "1.5"],
        flags=["--validation_split", "1.5"],
    ),
    Case(
        "resume from a folder without states",
        1,
        ["holds no complete state", "none"],
        setup=lambda root: (root / "old").mkdir(),
        flags=["--resume", "old"],
    ),
    # --- model files
    Case(
        "model file missing",
        2,
        ["model.pretrained_model_name_or_path", "not found"],
        flags=["--pretrained_model_name_or_path", "missing.safetensors"],
    ),
    Case(
        "model not safetensors",
        2,
        ["model.pretrained_model_name_or_path", "header does not parse"],
        setup=_write("m.safetensors", b"\x0f\0\0\0\0\0\0\0this is no json"),
        flags=["--pretrained_model_name_or_path", "m.safetensors"],
    ),
    Case(
        "model truncated",
        2,
        ["truncated", "m.safetensors"],
        setup=_write("m.safetensors", SAFE_TRUNCATED),
        flags=["--pretrained_model_name_or_path", "m.safetensors"],
    ),
    Case(
        "ckpt that is text",
        2,
        ["not a torch checkpoint"],
        setup=_write("m.ckpt", b"hello world"),
        flags=["--pretrained_model_name_or_path", "m.ckpt"],
    ),
    Case(
        "unknown builtin",
        2,
        ["builtin:nope", "builtin:tiny-sd1"],
        flags=["--pretrained_model_name_or_path", "builtin:nope"],
    ),
    Case("VAE missing", 2, ["model.vae", "not found"], flags=["--vae", "vae.safetensors"]),
    Case(
        "network_weights garbage",
        2,
        ["network.network_weights", "lora.safetensors"],
        setup=_write("lora.safetensors", b"garbage"),
        flags=["--network_weights", "lora.safetensors"],
    ),
    # --- images and captions
    Case("corrupt image", 1, ["broken.png", "skip_invalid_images"], setup=_corrupt_image),
    Case("no images", 1, ["imgs"], setup=_no_images),
    Case("caption not UTF-8", 1, ["0.txt"], setup=_bad_caption),
]

if importlib.util.find_spec("wandb") is None:
    CASES.append(
        Case("tracker missing", 2, ["logging.log_with", "wandb"], flags=["--log_with", "wandb"])
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo {i}")
    return tmp_path


def outcome(args: list[str]) -> tuple[int, str]:
    """Run the CLI through its error boundary (as `sdtrain` does): exit code and all output."""
    from rich.console import Console
    from typer.testing import CliRunner

    import sdtrain.cli.render as render
    from sdtrain.cli.main import _register_groups, app
    from sdtrain.errors import SdtrainError

    _register_groups()
    result = CliRunner().invoke(app, args)
    error = result.exception
    if isinstance(error, SdtrainError):
        console = Console(width=200, record=True, file=io.StringIO())
        saved = render.console
        render.console = console
        try:
            render.render_error(error)
        finally:
            render.console = saved
        return error.exit_code, result.output + console.export_text()
    if error is not None and not isinstance(error, SystemExit):
        raise AssertionError(f"traceback: {error!r}") from error
    return result.exit_code, result.output


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, run_dir: Path, monkeypatch) -> None:
    import sdtrain.models.load as load

    def no_load(*args, **kwargs):
        raise AssertionError("a dry run loaded the model")

    monkeypatch.setattr(load, "load_bundle", no_load)
    monkeypatch.chdir(run_dir)
    if case.setup:
        case.setup(run_dir)
    config = run_dir / "run.toml"
    config.write_text(case.toml if case.toml is not None else BASE)
    flags = [str(run_dir / "prompts.txt") if f == "PROMPTS" else f for f in case.flags]
    code, text = outcome(["train", "lora", str(config), "--dry-run", *flags])
    said = " ".join(text.split())
    assert code == case.code, text
    assert "Traceback" not in text
    for piece in case.says:
        assert piece in said, f"{piece!r} not in:\n{text}"


def test_missing_argument_toml_is_named(run_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(run_dir)
    code, text = outcome(["train", "lora", "--config_file", "nope.toml", "--dry-run"])
    assert code == 2 and "config file not found: nope.toml" in " ".join(text.split())


def test_real_entry_point_exits_without_traceback(run_dir: Path) -> None:
    """The same refusals through `python -m sdtrain` (the console entry and its exit codes)."""
    import os
    import subprocess
    import sys

    (run_dir / "run.toml").write_text(BASE)
    (run_dir / "m.safetensors").write_bytes(SAFE_TRUNCATED)
    env = {**os.environ, "SDTRAIN_NO_REEXEC": "1", "COLUMNS": "80"}
    for flags, code in (
        (["--pretrained_model_name_or_path", "m.safetensors"], 2),
        (["--resume", "nowhere"], 1),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "sdtrain", "train", "lora", "run.toml", "--dry-run", *flags],
            cwd=run_dir,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
