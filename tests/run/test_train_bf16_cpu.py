"""bf16 on a CPU that torch has no bf16 kernels for is refused at the key's line before the
model loads (engine/cpu_bf16.py); SDTRAIN_ALLOW_SLOW_BF16=1 lets it run. The CPU is simulated by
patching torch's answer, so the test means the same on every machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RUN = """\
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[training]
output_dir = "out"
max_train_steps = 1
max_data_loader_n_workers = 0
seed = 1
mixed_precision = "bf16"

[network]
network_dim = 4

[general]
resolution = 64
caption_extension = ".txt"

[[datasets]]
[[datasets.subsets]]
image_dir = "imgs"
"""


@pytest.fixture
def run(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("a picture")
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    return path


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdtrain.engine import cpu_bf16

    monkeypatch.setattr(cpu_bf16, "has_bf16_kernels", lambda: False)
    monkeypatch.delenv(cpu_bf16.ALLOW_SLOW, raising=False)


def _refusal(cli, args: list[str]):
    from sdtrain.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        cli(args)
    assert caught.value.exit_code == 2
    (problem,) = caught.value.problems
    assert "no fast kernels" in problem.message
    assert 'use "no" (fp32)' in (problem.hint or "")
    return problem


def test_train_is_refused_at_the_line_before_the_model_loads(cli, run, no_kernels, monkeypatch):
    from sdtrain.models import load

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(load, "load_bundle", no_load)
    problem = _refusal(cli, ["train", "lora", str(run)])
    assert problem.key == "training.mixed_precision"
    line = RUN.splitlines().index('mixed_precision = "bf16"') + 1
    assert (Path(problem.file or "").name, problem.line) == ("run.toml", line)
    assert not list((run.parent / "out").glob("*.safetensors"))


def test_latents_cache_is_refused(cli, run, no_kernels):
    problem = _refusal(cli, ["latents", "cache", str(run)])
    assert problem.key == "training.mixed_precision"
    assert not (run.parent / "latents").exists()


def test_generate_is_refused_before_the_model_loads(cli, tmp_path, no_kernels):
    missing = tmp_path / "no-such-model.safetensors"  # never opened: the refusal comes first
    args = ["generate", "--model", str(missing), "--prompt", "x", "--device", "cpu"]
    problem = _refusal(cli, [*args, "--mixed-precision", "bf16"])
    assert problem.key == "mixed_precision"
    assert problem.file == "<command line>"


def test_the_override_lets_bf16_run(cli, run, no_kernels, monkeypatch):
    from sdtrain.engine import cpu_bf16

    monkeypatch.setenv(cpu_bf16.ALLOW_SLOW, "1")
    result = cli(["train", "lora", str(run)])
    assert result.exit_code == 0, result.output
    assert list((run.parent / "out").glob("*.safetensors"))
