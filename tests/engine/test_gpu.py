"""CUDA paths (`gpu`-marked, skipped without CUDA): fp16 through accelerate's loss scaler (an
overflow is scaler warm-up, not a bad step), bf16, SDPA attention, states saved and loaded on
CUDA. Written without a GPU at hand; the coordinator runs them on one."""

from __future__ import annotations

import pytest
import torch
from train_runs import STEPS, inject, lora_file, metrics, train, write_config

from sdtrain.engine.state import load_state

pytestmark = pytest.mark.gpu


def _records_ok(out) -> list[dict]:
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert not any("nonfinite" in r for r in records), records
    return records


def test_fp16_trains_with_the_loss_scaler_and_saves_it(cli, tmp_path, run_data):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml", run_data, out, training={"mixed_precision": "fp16"}
    )
    train(cli, config)
    _records_ok(out)
    state = load_state(out / "t-state")
    assert state.scaler is not None and state.scaler["scale"] > 0
    assert "cuda" in state.rng


def test_an_fp16_overflow_is_scaler_warm_up_not_a_non_finite_step(
    cli, tmp_path, monkeypatch, run_data
):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        out,
        training={"mixed_precision": "fp16", "max_nonfinite_steps": 1},
    )
    # step 1's window (accumulation 2): a finite loss x 1e6 overflows fp16 gradients once scaled
    inject(monkeypatch, lambda index, loss: loss * 1e6 if index in (0, 1) else None)
    train(cli, config)  # max_nonfinite_steps = 1 would stop the run on a "bad" step
    records = _records_ok(out)
    assert records[0].get("scaler_skip") is True
    assert all(not r.get("scaler_skip") for r in records[2:])


def test_bf16_resume_on_cuda_continues_the_run(cli, tmp_path, run_data):
    straight = tmp_path / "straight"
    config = write_config(
        tmp_path / "a.toml", run_data, straight, training={"mixed_precision": "bf16"}
    )
    train(cli, config)
    _records_ok(straight)
    state = straight / "t-step00000004-state"
    resumed = tmp_path / "resumed"
    config = write_config(
        tmp_path / "b.toml",
        run_data,
        resumed,
        training={"mixed_precision": "bf16"},
        saving={"resume": str(state)},
    )
    train(cli, config)
    assert [r["step"] for r in metrics(resumed)] == list(range(5, STEPS + 1))
    a, b = load_state(straight / "t-state"), load_state(resumed / "t-state")
    assert a.counters == b.counters
    # CUDA kernels may sum in another order from run to run: close, not necessarily bit-equal
    ta, tb = lora_file(straight / "t.safetensors")[0], lora_file(resumed / "t.safetensors")[0]
    for key in ta:
        torch.testing.assert_close(ta[key].float(), tb[key].float(), atol=2e-3, rtol=2e-2)


def test_sdpa_is_the_attention_on_cuda(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle

    bundle = load_bundle(
        ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1", attention="sdpa"),
        device="cuda",
        dtype=torch.float16,
    )
    processors = bundle.unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    sample = torch.randn(1, 4, 8, 8, device="cuda", dtype=torch.float16)
    context = torch.randn(
        1, 77, bundle.unet.config.cross_attention_dim, device="cuda", dtype=torch.float16
    )
    with torch.no_grad():
        out = bundle.unet(sample, torch.tensor([500], device="cuda"), context).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_a_deferred_step_never_waits_for_the_gpu(cli, tmp_path, monkeypatch, run_data, precision):
    """host_sync = deferred (the CUDA default): from a micro-batch's forward to its window's
    optimizer step nothing reads the device (torch's sync debug mode raises on any such read);
    the reads happen when the step is settled, one step later."""
    from sdtrain.engine.loop import Trainer
    from sdtrain.engine.loop_records import DeviceWindow

    def strict(name, owner=Trainer):
        real = getattr(owner, name)

        def wrapped(self, *args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        monkeypatch.setattr(owner, name, wrapped)

    for name in ("ctx_loss", "_agree_on_device", "_backward", "_deferred_step"):
        strict(name)
    for name in ("bad", "readback"):  # the read itself (the returned reader) runs later
        strict(name, DeviceWindow)
    out = tmp_path / "out"
    training = {"mixed_precision": precision, "host_sync": "deferred"}
    config = write_config(tmp_path / "run.toml", run_data, out, training=training)
    train(cli, config)
    _records_ok(out)


def test_deferred_and_every_step_skip_the_same_steps_on_cuda(cli, tmp_path, monkeypatch, run_data):
    """An fp16 overflow (scaler warm-up) in step 1 and a NaN loss in step 3: both modes record
    the same outcomes (values may differ in the last bits between CUDA runs)."""
    outcomes = {}
    for mode in ("every_step", "deferred"):
        out = tmp_path / mode
        training = {"mixed_precision": "fp16", "host_sync": mode, "max_nonfinite_steps": 2}
        config = write_config(tmp_path / f"{mode}.toml", run_data, out, training=training)
        inject(
            monkeypatch,
            lambda index, loss: (
                loss * 1e6 if index in (0, 1) else loss * float("nan") if index == 4 else None
            ),
        )
        train(cli, config)
        monkeypatch.undo()
        outcomes[mode] = [
            (r["step"], r.get("scaler_skip", False), r.get("nonfinite", False))
            for r in metrics(out)
        ]
    assert outcomes["every_step"] == outcomes["deferred"]
    assert outcomes["deferred"][0] == (1, True, False) and outcomes["deferred"][2][2] is True


def test_a_compiled_run_on_cuda_resumes_bit_identical(cli, tmp_path, monkeypatch, run_data):
    """torch_compile on CUDA with CUDA graphs (inductor, reduce-overhead: one graph per bucket
    shape, each micro-step a new cudagraph-tree generation), bf16 with host reads deferred:
    every step is finite and an interrupted run resumes to the straight run's bits."""
    from train_runs import assert_same_training, interrupt_at

    from sdtrain.errors import Interrupted

    training = {
        "torch_compile": True,
        "dynamo_mode": "reduce-overhead",
        "mixed_precision": "bf16",
        "host_sync": "deferred",
    }
    whole = tmp_path / "whole"
    result = train(cli, write_config(tmp_path / "whole.toml", run_data, whole, training=training))
    assert "torch.compile: inductor" in " ".join(result.output.split())
    _records_ok(whole)
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, training=training)
    inject(monkeypatch, interrupt_at(6))
    with pytest.raises(Interrupted):
        cli(["train", "lora", str(config)])
    monkeypatch.undo()
    train(cli, config, "--resume", "auto")
    assert_same_training(whole, out)
