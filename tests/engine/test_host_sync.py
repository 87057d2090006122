"""host_sync = deferred: the step's loss and finite checks stay on the device and are read one
step later; the run skips the same updates and writes the same records, files and states as
host_sync = every_step, bit for bit (engine/host_sync.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from train_runs import (
    assert_same,
    assert_same_training,
    inject,
    interrupt_at,
    lora_file,
    metrics,
    nan_at,
    state_contents,
    train,
    write_config,
)

from sdtrain.engine.host_sync import Readback, deferred_obstacle, use_deferred
from sdtrain.engine.loop_optimizer import LoopOptimizer
from sdtrain.engine.loop_records import DeviceWindow
from sdtrain.engine.state import load_counters
from sdtrain.errors import ConfigError, Interrupted

DEFERRED = {"host_sync": "deferred"}


def test_a_deferred_run_is_the_every_step_run_bit_for_bit(cli, tmp_path, run_data, straight):
    out = tmp_path / "out"
    result = train(cli, write_config(tmp_path / "run.toml", run_data, out, training=DEFERRED))
    assert "host reads of each step deferred" in " ".join(result.output.split())
    assert_same_training(straight, out)
    for step in (2, 4, 6):  # the periodic files and states too
        stem = f"t-step{step:08d}"
        assert_same(
            state_contents(straight / f"{stem}-state"), state_contents(out / f"{stem}-state")
        )
        assert_same(
            lora_file(straight / f"{stem}.safetensors")[0],
            lora_file(out / f"{stem}.safetensors")[0],
        )


def _plus_inf(calls):
    """An `inject` action: the loss of these micro-steps + inf (gradients stay finite: only
    the loss check can skip the update)."""
    bad = set(calls)
    return lambda index, loss: loss + float("inf") if index in bad else None


@pytest.mark.parametrize(
    ("action", "saving", "bad_steps"),
    [
        (nan_at([2]), {"save_every_n_steps": 1}, 1),  # a window's first micro-batch
        (nan_at([3, 9]), {"save_every_n_steps": 1}, 2),  # a window's last; an epoch's last step
        (_plus_inf([2, 6]), {}, 2),  # finite gradients; states every 2 steps: step-end settles
    ],
    ids=["nan-first", "nan-last", "inf-loss-finite-grads"],
)
def test_bad_steps_are_skipped_and_reported_the_same(
    cli, tmp_path, monkeypatch, run_data, action, saving, bad_steps
):
    """The same skipped updates, records, images and periodic states in both modes."""
    outs = {}
    for mode in ("every_step", "deferred"):
        out = tmp_path / mode
        config = write_config(
            tmp_path / f"{mode}.toml", run_data, out, training={"host_sync": mode}, saving=saving
        )
        inject(monkeypatch, action)
        train(cli, config)
        monkeypatch.undo()
        outs[mode] = out
    a, b = outs["every_step"], outs["deferred"]
    assert sum(1 for r in metrics(b) if r.get("nonfinite")) == bad_steps
    assert_same_training(a, b)
    every = saving.get("save_every_n_steps", 2)
    for step in range(every, 7, every):  # (step 7 is the final save, t-state)
        stem = f"t-step{step:08d}"
        assert_same(state_contents(a / f"{stem}-state"), state_contents(b / f"{stem}-state"))


def test_validation_records_follow_their_step_in_both_modes(cli, tmp_path, run_data):
    """Validation due every 2 steps: a deferred step is settled before its evaluation, so
    the metrics log (records and their order) is the same bytes."""
    outs = {}
    for mode in ("every_step", "deferred"):
        out = tmp_path / mode
        training = {"host_sync": mode, "validate_every_n_steps": 2}
        config = write_config(
            tmp_path / f"{mode}.toml",
            run_data,
            out,
            training=training,
            dataset={"validation_split": 0.4, "validation_seed": 3},
        )
        train(cli, config)
        outs[mode] = out
    records = metrics(outs["deferred"])
    kinds = [("val" if any(k.startswith("val") for k in r) else "step", r["step"]) for r in records]
    assert ("val", 2) in kinds and kinds.index(("step", 2)) < kinds.index(("val", 2))
    assert_same_training(outs["every_step"], outs["deferred"])


def test_an_interrupted_deferred_run_resumes_bit_identical(
    cli, tmp_path, monkeypatch, run_data, straight
):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, training=DEFERRED)
    inject(monkeypatch, interrupt_at(6))  # in step 4's window
    with pytest.raises(Interrupted) as info:
        cli(["train", "lora", str(config)])
    assert "stopped after step 4" in info.value.message
    assert load_counters(out / "t-step00000004-state").global_step == 4
    assert_same(
        state_contents(straight / "t-step00000004-state"),
        state_contents(out / "t-step00000004-state"),
    )
    monkeypatch.undo()
    train(cli, config, "--resume", "auto")
    assert_same_training(straight, out)


@pytest.mark.parametrize(
    ("tables", "reason"),
    [
        ({"optimizer": {"optimizer_args": ["foreach=True"]}}, "AdamW cannot skip an update"),
        ({"network": {"scale_weight_norms": 1.0}}, "after-step work must know"),
    ],
)
def test_deferred_is_refused_by_name_where_it_cannot_work(cli, tmp_path, run_data, tables, reason):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        out,
        training=DEFERRED,
        network=tables.get("network"),
    )
    if "optimizer" in tables:
        text = config.read_text().replace(
            "[optimizer]\n", '[optimizer]\noptimizer_args = ["foreach=True"]\n'
        )
        config.write_text(text)
    with pytest.raises(ConfigError) as info:  # exit 2, rendered by the CLI's entry point
        cli(["train", "lora", str(config)])
    problem = info.value.problems[0]
    assert problem.key == "training.host_sync" and reason in problem.message
    assert not (out / "t.safetensors").exists()


def test_the_mode_of_a_run():
    assert use_deferred("auto", "cuda", None) is True
    assert use_deferred("auto", "cpu", None) is False
    assert use_deferred("auto", "cuda", "some reason") is False
    assert use_deferred("every_step", "cuda", None) is False
    assert use_deferred("deferred", "cpu", None) is True
    with pytest.raises(ConfigError) as info:
        use_deferred("deferred", "cuda", "the reason")
    assert info.value.problems[0].key == "training.host_sync"
    assert "the reason" in info.value.problems[0].message


def test_what_keeps_a_run_from_deferring():
    p = torch.nn.Parameter(torch.zeros(2))
    fused = torch.optim.AdamW([p], fused=True)
    plain = torch.optim.AdamW([p], foreach=True)
    ok = SimpleNamespace(after_step_any_outcome=True)
    assert deferred_obstacle(fused, None, None, ok) is None
    assert "DeepSpeed" in deferred_obstacle(fused, None, object(), ok)
    assert "fused_backward_pass" in deferred_obstacle(fused, object(), None, ok)
    assert "cannot skip an update" in deferred_obstacle(plain, None, None, ok)
    assert "after-step" in deferred_obstacle(fused, None, None, SimpleNamespace())
    momentum = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    assert "first step" in deferred_obstacle(momentum, None, None, ok)
    assert deferred_obstacle(torch.optim.SGD([p], lr=0.1, fused=True), None, None, ok) is None


def test_a_failed_run_still_records_its_last_finished_step(cli, tmp_path, monkeypatch, run_data):
    """An error in step 3's window: step 2, still pending when deferred, is recorded as
    every_step records it."""
    logs = {}
    for mode in ("every_step", "deferred"):
        out = tmp_path / mode
        config = write_config(  # no periodic save, which would settle step 2 itself
            tmp_path / f"{mode}.toml",
            run_data,
            out,
            training={"host_sync": mode},
            saving={"save_every_n_steps": None},
        )

        def fail(index, loss):
            if index == 4:
                raise RuntimeError("injected")

        inject(monkeypatch, fail)
        with pytest.raises(RuntimeError, match="injected"):
            cli(["train", "lora", str(config)])
        monkeypatch.undo()
        logs[mode] = (out / "metrics.jsonl").read_bytes()
    assert [r["step"] for r in metrics(tmp_path / "deferred")] == [1, 2]
    assert logs["every_step"] == logs["deferred"]


def test_a_readback_returns_the_values():
    values = torch.tensor([1.5, float("nan"), 3.0])
    read = Readback(values)
    values.zero_()  # a copy was taken
    got = read.values()
    assert got[0] == 1.5 and got[2] == 3.0 and got[1] != got[1]


class _ScaledSteps(LoopOptimizer):
    """LoopOptimizer over one parameter, a CPU GradScaler and accelerate's calls in miniature."""

    def __init__(self, max_grad_norm: float) -> None:
        torch.manual_seed(0)
        self.param = torch.nn.Parameter(torch.randn(16))
        self.params = [self.param]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.1, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2)
        self.scaler, self.fused, self.zero = scaler, None, None
        self.sections = SimpleNamespace(training=SimpleNamespace(max_grad_norm=max_grad_norm))
        opt = self.optimizer

        def clip(params, max_norm):
            scaler.unscale_(opt)
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        self.accelerator = SimpleNamespace(
            clip_grad_norm_=clip, unscale_gradients=lambda: scaler.unscale_(opt)
        )
        self.stepper = SimpleNamespace(step=lambda: (scaler.step(opt), scaler.update()))

    def backward(self, kind: str) -> None:
        loss = (self.param**2).sum()
        if kind == "overflow":
            loss = loss * float("inf")
        elif kind == "bad":  # deferred: a NaN loss backpropagates as 0
            loss = loss * 0.0
        self.scaler.scale(loss).backward()

    def snapshot(self) -> dict:
        return {
            "param": self.param.detach().clone(),
            "state": {k: v.clone() for k, v in self.optimizer.state[self.param].items()},
            "scale": self.scaler._scale.clone(),
            "growth": self.scaler._growth_tracker.clone(),
        }


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_the_device_side_skip_matches_the_host_side_one_with_the_fp16_scaler(max_grad_norm):
    """fp16 warm-up overflows, bad windows and good steps, scale growth included: the deferred
    step (flags on the device) leaves the weights, the optimizer state and the scaler exactly
    where the every-step one does, and its read-back gives the same outcome."""
    host, device = _ScaledSteps(max_grad_norm), _ScaledSteps(max_grad_norm)
    kinds = ["ok", "overflow", "ok", "bad", "ok", "ok", "bad", "overflow", "ok", "ok"]
    scales = []
    for i, kind in enumerate(kinds):
        if kind != "bad":  # every_step: a bad window has no backward and no step
            host.backward(kind)
            expected = host._optimizer_step()
        else:
            expected = "bad"
        host.optimizer.zero_grad(set_to_none=True)
        device.backward(kind)
        window = DeviceWindow(has_scaler=True)
        loss = torch.tensor(float("nan") if kind == "bad" else 1.0, dtype=torch.float64)
        window.add(
            torch.stack([loss, torch.isfinite(loss).double(), torch.zeros((), dtype=loss.dtype)])
        )
        found, scale = device._deferred_step(window.bad())
        device.optimizer.zero_grad(set_to_none=True)
        settled = window.readback(found, scale, {})()
        assert settled.outcome == expected, (i, kind)
        assert_same(host.snapshot(), device.snapshot(), f"after {i} ({kind})")
        scales.append(host.scaler.get_scale())
    assert scales == [4.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 2.0, 2.0, 4.0]  # down and up again


def _row(loss: float, stop: bool = False) -> torch.Tensor:
    value = torch.tensor(loss, dtype=torch.float64)
    return torch.stack([value, torch.isfinite(value).double(), torch.tensor(float(stop)).double()])


def test_a_window_reads_back_its_outcome_losses_metrics_and_stop():
    window = DeviceWindow(has_scaler=False)
    window.add(_row(0.25))
    window.add(_row(0.5, stop=True))
    metric = torch.tensor(1.5)
    settled = window.readback(torch.tensor(False), None, {"f": 0.1, "t": metric})()
    assert settled.outcome == "ok" and settled.losses == [0.25, 0.5] and settled.stop
    assert settled.after == {"f": 0.1, "t": 1.5}  # a Python float exactly, not via float32
    # gradients not finite without a scaler: bad, and no metrics recorded
    assert window.readback(torch.tensor(True), None, {"f": 0.1})().outcome == "bad"
    assert window.readback(torch.tensor(True), None, {"f": 0.1})().after == {}
    bad = DeviceWindow(has_scaler=False)
    bad.add(_row(0.25))
    bad.add(_row(float("nan")))
    settled = bad.readback(torch.tensor(False), None, {})()
    assert bad.bad().item() and settled.outcome == "bad" and settled.losses == [0.25]
    assert not settled.stop
