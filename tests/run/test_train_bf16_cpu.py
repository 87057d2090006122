"""bf16 on a CPU that torch has no bf16 kernels for is refused at the key's line before the
model loads (engine/cpu_bf16.py); SDTRAIN_ALLOW_SLOW_BF16=1 lets it run. The CPU is simulated by
patching torch's answer, so the test means the same on every machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import make_dataset, write_config


@pytest.fixture
def run(tmp_path: Path) -> Path:
    data = make_dataset(tmp_path, images=1)
    bf16 = {"mixed_precision": "bf16", "max_train_steps": 1, "gradient_accumulation_steps": 1}
    return write_config(tmp_path / "run.toml", data, tmp_path / "out", training=bf16)


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


def _forbid(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    def called(*_args, **_kwargs):
        raise AssertionError(f"{name} was called before the refusal")

    monkeypatch.setattr(module, name, called)


def test_train_is_refused_at_the_line_before_the_model_loads(cli, run, no_kernels, monkeypatch):
    from sdtrain.models import load

    _forbid(monkeypatch, load, "load_bundle")
    problem = _refusal(cli, ["train", "lora", str(run)])
    assert problem.key == "training.mixed_precision"
    line = run.read_text().splitlines().index('mixed_precision = "bf16"') + 1
    assert (Path(problem.file or "").name, problem.line) == ("run.toml", line)
    assert not list((run.parent / "out").glob("*.safetensors"))


def test_latents_cache_is_refused_before_the_vae_loads(cli, run, no_kernels, monkeypatch):
    from sdtrain.run import latents

    _forbid(monkeypatch, latents, "load_vae")
    problem = _refusal(cli, ["latents", "cache", str(run)])
    assert problem.key == "training.mixed_precision"


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
    assert (run.parent / "out" / "t.safetensors").is_file()
