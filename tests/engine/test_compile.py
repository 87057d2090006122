"""torch_compile: the U-Net and trained text encoders compiled in place (engine/compile.py).

aot_eager runs torch's own kernels through the traced graphs, so its run must be the eager run
bit for bit (the wiring changes nothing else: files, states, records). Inductor's fused kernels
round differently from eager, but the same graphs always give the same bits: an interrupted
inductor run resumes bit-identical to a straight inductor run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from train_runs import (
    assert_same,
    assert_same_training,
    inject,
    interrupt_at,
    lora_file,
    metrics,
    state_contents,
    train,
    write_config,
)

from sdtrain.config.sections import TrainingSection
from sdtrain.engine import compile as compile_module
from sdtrain.engine.compile import check_backend
from sdtrain.errors import ConfigError, Interrupted


def test_reference_defaults_are_accepted_and_inert():
    """A config dumped by the reference carries its default backend with torch_compile off."""
    section = TrainingSection(torch_compile=False, dynamo_backend="inductor")
    assert section.compile_backend is None
    assert TrainingSection(dynamo_backend="no").compile_backend is None
    assert TrainingSection(torch_compile=True).compile_backend == "inductor"
    assert TrainingSection(torch_compile=True, dynamo_backend="eager").compile_backend == "eager"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"torch_compile": True, "dynamo_backend": "no"}, 'contradicts dynamo_backend = "no"'),
        ({"dynamo_backend": "aot_eager"}, "dynamo_backend applies only with torch_compile"),
        ({"dynamo_mode": "max-autotune"}, "dynamo_mode applies only with torch_compile"),
        (
            {"torch_compile": True, "dynamo_backend": "aot_eager", "dynamo_mode": "max-autotune"},
            "is an inductor mode",
        ),
        ({"torch_compile": True, "dynamo_backend": "tensort"}, "dynamo_backend"),
    ],
)
def test_contradictions_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        TrainingSection(**values)


def _refusal(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        check_backend(*args, **kwargs)
    (problem,) = info.value.problems
    return f"{problem.key}: {problem.message} / {problem.hint}"


def test_backends_that_cannot_run_here_are_refused_by_name(monkeypatch):
    assert "not registered" in _refusal("aot_ts_nvfuser", None, "cpu", False)
    assert "use one of" in _refusal("nvprims_nvfuser", None, "cpu", False)
    monkeypatch.setattr(compile_module.importlib.util, "find_spec", lambda name: None)
    assert "needs the `tvm` package" in _refusal("tvm", None, "cpu", False)
    monkeypatch.undo()
    text = _refusal("cudagraphs", None, "cpu", False)
    assert text.startswith("training.dynamo_backend") and "CUDA graphs" in text
    text = _refusal("inductor", "reduce-overhead", "cpu", False)
    assert text.startswith("training.dynamo_mode") and "this run is on cpu" in text
    assert "DeepSpeed" in _refusal("inductor", None, "cpu", True)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "`no-such-compiler-here` is not on PATH" in _refusal("inductor", None, "cpu", False)
    monkeypatch.delenv("CXX")
    check_backend("inductor", "max-autotune", "cpu", False)  # no CUDA graphs on a CPU
    check_backend("aot_eager", None, "cpu", False)


def test_a_refused_backend_exits_2_at_its_line_before_loading(cli, tmp_path, run_data):
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        tmp_path / "out",
        training={"torch_compile": True, "dynamo_backend": "cudagraphs"},
    )
    with pytest.raises(ConfigError) as info:
        cli(["train", "lora", str(config)])
    assert info.value.exit_code == 2
    (problem,) = info.value.problems
    assert problem.key == "training.dynamo_backend" and "CUDA graphs" in problem.message
    lines = config.read_text(encoding="utf-8").splitlines()
    assert problem.file == str(config) and lines[problem.line - 1].startswith("dynamo_backend")
    assert not (tmp_path / "out" / "t.safetensors").exists()


def _compiling(cli, config) -> int:
    """Runs `config`; the graphs dynamo compiled during the run."""
    from torch._dynamo.utils import counters

    before = int(counters["stats"]["unique_graphs"])
    result = train(cli, config)
    return int(counters["stats"]["unique_graphs"]) - before, result


COMPILED = {"torch_compile": True, "dynamo_backend": "aot_eager"}


def test_aot_eager_is_the_eager_run_bit_for_bit(cli, tmp_path, run_data, straight):
    out = tmp_path / "out"
    graphs, result = _compiling(
        cli, write_config(tmp_path / "run.toml", run_data, out, training=COMPILED)
    )
    assert "torch.compile: aot_eager, 2 module(s)" in " ".join(result.output.split())
    assert graphs > 0
    assert_same_training(straight, out)
    stem = "t-step00000004"
    assert_same(state_contents(straight / f"{stem}-state"), state_contents(out / f"{stem}-state"))
    assert_same(
        lora_file(straight / f"{stem}.safetensors")[0], lora_file(out / f"{stem}.safetensors")[0]
    )


def test_validation_and_samples_run_eagerly(cli, tmp_path, run_data):
    """With validation and sampling at every step the run compiles no more graphs than
    without them (their no-grad forwards at other shapes would each compile)."""
    split = {"validation_split": 0.4}
    base = write_config(
        tmp_path / "base.toml", run_data, tmp_path / "base", training=COMPILED, dataset=split
    )
    graphs, _ = _compiling(cli, base)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat --w 64 --h 64 --s 2\n", encoding="utf-8")
    more = write_config(
        tmp_path / "more.toml",
        run_data,
        tmp_path / "more",
        training={**COMPILED, "validate_every_n_steps": 1},
        dataset=split,
    )
    with more.open("a", encoding="utf-8") as handle:
        handle.write(f"[sample]\nsample_prompts = {str(prompts)!r}\nsample_every_n_steps = 1\n")
    more_graphs, _ = _compiling(cli, more)
    assert any((tmp_path / "more").rglob("*.png"))
    assert more_graphs == graphs > 0


def test_an_interrupted_inductor_run_resumes_bit_identical(
    cli, tmp_path, monkeypatch, run_data, straight
):
    """Inductor: the straight run follows eager to float rounding; the interrupted and resumed
    run equals the straight one bit for bit."""
    inductor = {"torch_compile": True, "dynamo_backend": "inductor"}
    whole = tmp_path / "whole"
    train(cli, write_config(tmp_path / "whole.toml", run_data, whole, training=inductor))
    # the same dropout masks and rounding-level differences: the first step's loss agrees to
    # float rounding; Adam then amplifies the differences of near-zero gradients a little
    compiled, eager = metrics(whole), metrics(straight)
    assert [r["step"] for r in compiled] == [r["step"] for r in eager]
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-6)
    for a, b in zip(compiled, eager, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, training=inductor)
    inject(monkeypatch, interrupt_at(6))  # in step 4's window
    with pytest.raises(Interrupted):
        cli(["train", "lora", str(config)])
    monkeypatch.undo()
    train(cli, config, "--resume", "auto")
    assert_same_training(whole, out)


def test_frozen_half_weights_are_refused():
    """The opt-in frozen-half mode wraps the forward in its own up-cast mode and hooks."""
    training = TrainingSection(torch_compile=True, dynamo_backend="eager")
    with pytest.raises(ConfigError) as info:
        compile_module.compile_modules(training, [], "cpu", 1, frozen_half=True)
    (problem,) = info.value.problems
    assert problem.key == "training.torch_compile" and "SDTRAIN_FROZEN_HALF" in problem.message
    assert compile_module.compile_modules(TrainingSection(), [], "cpu", 1) is None
