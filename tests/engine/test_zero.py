"""DeepSpeed ZeRO-2 for full-model training (engine/zero.py), from an accelerate config.

Refusals need no DeepSpeed; the launched runs (`accelerate launch --config_file
configs/examples/accelerate-deepspeed-zero2.yaml --num_processes 2`: 2 CPU processes over gloo)
skip without it.

Measured tolerance (tiny-sd1 DreamBooth, UNet + text encoder, AdamW lr 1e-3, fp32, 4 steps, batch
1 x 2 processes x accumulation 2 against 1 process x batch 2 x accumulation 2): losses equal to
~2e-7 relative; weights within 3.1e-4 absolute (plain DDP: 2.5e-4; Adam's step normalises tiny
gradients, so their last-bit differences from the other summation order show up as ~lr / 3);
optimizer state within 1e-8. A ZeRO run resumed from its own state is bit-identical.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import assert_same, make_dataset, metrics

from launched import launcher_env
from sdtrain.config.sections import OptimizerSection, TrainingSection
from sdtrain.engine.zero import check_zero_plugin, check_zero_settings
from sdtrain.errors import ConfigError

HERE = Path(__file__).parent
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
)

DB = """\
[model]
pretrained_model_name_or_path = "builtin:tiny-sd1"

[dataset]
train_data_dir = "{data}"
resolution = 64

[training]
output_dir = "{out}"
output_name = "t"
max_train_steps = 4
train_batch_size = {batch}
gradient_accumulation_steps = 2
max_data_loader_n_workers = 0
seed = 7

[optimizer]
learning_rate = 1e-3

[saving]
save_state_on_train_end = true
{saving}
[dreambooth]
learning_rate_te = 1e-3
save_model_as = "safetensors"
ema_decay = 0.9
ema_save = "beside"
"""

EXAMPLE = HERE.parents[1] / "configs" / "examples" / "accelerate-deepspeed-zero2.yaml"


def _config(path: Path, data: Path, out: Path, batch: int = 1, saving: str = "") -> Path:
    path.write_text(DB.format(data=data, out=out, batch=batch, saving=saving))
    return path


def _accelerate() -> str:
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert found, "accelerate's console script sits beside the interpreter"
    return found


def _launch(
    root: Path, args: list[str], log: str, script: str | None = None, nproc: int = 2, **env: str
) -> str:
    """`accelerate launch` with the README's example ZeRO-2 config on `nproc` processes,
    `(-m sdtrain | script) ARGS`; its output."""
    entry = [script] if script else ["-m", "sdtrain"]
    launch = [_accelerate(), "launch", "--config_file", str(EXAMPLE), "--num_processes", str(nproc)]
    done = subprocess.run(
        [*launch, *entry, *args],
        env={**launcher_env(), **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    text = done.stdout + done.stderr
    (root / log).write_text(text)
    assert done.returncode == 0, text[-4000:]
    return text


def _sdtrain(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdtrain", *args],
        env={**launcher_env(), **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=cwd,
    )


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flat(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


# ---------------------------------------------------------------------- refusals (no DeepSpeed)
def _settings(**training):
    return TrainingSection(output_dir="out", **training)


@pytest.mark.parametrize(
    ("method", "optimizer", "training", "stop", "key"),
    [
        ("lora", {}, {}, None, "distributed_type"),
        ("ti", {}, {}, None, "distributed_type"),
        ("dreambooth", {"optimizer_type": "Adafactor"}, {}, None, "optimizer.optimizer_type"),
        ("finetune", {"optimizer_type": "AdamW8bit"}, {}, None, "optimizer.optimizer_type"),
        ("finetune", {"optimizer_type": "Prodigy"}, {}, None, "optimizer.optimizer_type"),
        ("dreambooth", {}, {"mixed_precision": "bf16"}, None, "training.mixed_precision"),
        ("dreambooth", {"fused_backward_pass": True}, {}, None, "optimizer.fused_backward_pass"),
        ("dreambooth", {}, {}, 2, "dreambooth.stop_text_encoder_training"),
        ("dreambooth", {}, {}, "clip2", "model.clip_skip"),
    ],
)
def test_settings_zero_cannot_train_are_refused_by_key(method, optimizer, training, stop, key):
    clip = 2 if stop == "clip2" else None
    stop = None if stop == "clip2" else stop
    with pytest.raises(ConfigError) as info:
        check_zero_settings(
            method, OptimizerSection(**optimizer), _settings(**training), stop, clip
        )
    assert [p.key for p in info.value.problems] == [key]


@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGDNesterov", "RAdam"])
def test_element_wise_optimizers_are_accepted(name):
    check_zero_settings("finetune", OptimizerSection(optimizer_type=name), _settings(), None)


@pytest.mark.parametrize(
    ("zero", "key"),
    [
        ({"stage": 3}, "deepspeed_config.zero_stage"),
        ({"stage": 0}, "deepspeed_config.zero_stage"),
        (
            {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "deepspeed_config.offload_optimizer",
        ),
        ({"stage": 2, "offload_param": {"device": "nvme"}}, "deepspeed_config.offload_param"),
        ({"stage": 2, "cpu_offload": True}, "deepspeed_config.offload_optimizer"),
        ({"stage": 2, "bf16": {"enabled": True}}, "deepspeed_config.bf16"),
        ({"stage": 2, "fp16": {"enabled": "true"}}, "deepspeed_config.fp16"),
        ({"stage": 2, "optimizer": {"type": "Adam"}}, "deepspeed_config.optimizer"),
        ({"stage": 2, "scheduler": {"type": "WarmupLR"}}, "deepspeed_config.scheduler"),
    ],
)
def test_deepspeed_configs_zero_cannot_train_are_refused(zero, key):
    top = {k: zero.pop(k) for k in ("bf16", "fp16", "optimizer", "scheduler") if k in zero}
    with pytest.raises(ConfigError) as info:
        check_zero_plugin({"zero_optimization": zero, **top})
    assert info.value.problems[0].key.startswith(key)
    check_zero_plugin({"zero_optimization": {"stage": 1}})
    check_zero_plugin({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})


def test_a_refusal_points_at_the_line_and_exits_2(tmp_path):
    """Under a DeepSpeed launch (the launcher's environment), `train dreambooth` with
    stop_text_encoder_training: exit 2, the key at its file and line, before any weight loads."""
    data = make_dataset(tmp_path, 3)
    text = DB.format(data=data, out=tmp_path / "out", batch=1, saving="")
    text = text.replace("[dreambooth]\n", "[dreambooth]\nstop_text_encoder_training = 2\n")
    (tmp_path / "run.toml").write_text(text)
    done = _sdtrain(
        ["train", "dreambooth", "run.toml", "--dry-run"], tmp_path, ACCELERATE_USE_DEEPSPEED="true"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    line = text.splitlines().index("stop_text_encoder_training = 2") + 1
    assert "dreambooth.stop_text_encoder_training" in done.stderr
    assert f"run.toml:{line}" in done.stderr, done.stderr
    stage3 = _sdtrain(
        ["train", "dreambooth", "run.toml", "--dry-run", "--stop_text_encoder_training", "-1"],
        tmp_path,
        ACCELERATE_USE_DEEPSPEED="true",
        ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
    )
    assert stage3.returncode == 2, stage3.stdout + stage3.stderr  # before any weight loads
    assert "deepspeed_config.zero_stage" in stage3.stderr and "stage 3" in stage3.stderr
    (tmp_path / "lora.toml").write_text(text.split("[dreambooth]")[0])
    lora = _sdtrain(
        ["train", "lora", "lora.toml", "--dry-run"], tmp_path, ACCELERATE_USE_DEEPSPEED="true"
    )
    assert lora.returncode == 2 and "full-model training" in lora.stderr, lora.stderr


# ---------------------------------------------------------------------- launched (DeepSpeed)
@needs_deepspeed
def test_zero2_trains_what_one_process_does_and_resumes_exactly(tmp_path):
    """2 processes under ZeRO-2 (batch 1 each) against 1 process with batch 2: same losses and
    weights within the measured tolerance, a state in the plain layout; resuming the ZeRO run
    from its step-2 state gives its final weights, state and log bit for bit."""
    data = make_dataset(tmp_path, 3)
    zero, resumed, one = tmp_path / "zero", tmp_path / "resumed", tmp_path / "one"
    saving = "save_every_n_steps = 2\nsave_state = true\n"
    text = _launch(
        tmp_path,
        ["train", "dreambooth", str(_config(tmp_path / "a.toml", data, zero, saving=saving))],
        "zero.log",
    )
    assert "DeepSpeed ZeRO stage 2: process 0 of 2 keeps the optimizer state of" in text
    assert "samples/step, DeepSpeed ZeRO: optimizer state split over them" in text
    state = zero / "t-step00000002-state"
    again = f'resume = "{state}"\n'
    _launch(
        tmp_path,
        ["train", "dreambooth", str(_config(tmp_path / "b.toml", data, resumed, saving=again))],
        "resumed.log",
    )
    done = _sdtrain(
        ["train", "dreambooth", str(_config(tmp_path / "c.toml", data, one, batch=2))], tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr

    # exact resume
    a, b = load_file(str(zero / "t.safetensors")), load_file(str(resumed / "t.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema, ema_resumed = (load_file(str(d / "t-ema.safetensors")) for d in (zero, resumed))
    assert all(torch.equal(ema[k], ema_resumed[k]) for k in ema)  # EMA weights, ZeRO-trained
    from sdtrain.engine.state import load_counters, load_state

    x, y = load_state(zero / "t-state"), load_state(resumed / "t-state")
    assert_same(x.optimizer, y.optimizer, "optimizer")
    assert_same(x.trainable, y.trainable, "trainable")
    assert [r["loss"] for r in metrics(zero)][2:] == [r["loss"] for r in metrics(resumed)]
    assert load_counters(zero / "t-state").num_processes == 2

    # the same training as one process with the global batch
    ones = metrics(one)
    for p, q in zip(metrics(zero), ones, strict=True):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-5)
    c = load_file(str(one / "t.safetensors"))
    assert max(float((a[k].float() - c[k].float()).abs().max()) for k in a) < 1e-3
    assert any(
        not torch.equal(a[k], load_file(str(zero / "t-step00000002.safetensors"))[k]) for k in a
    )

    # the optimizer state has the layout of a plain run's (so it reads like any other state)
    plain = dict(_flat(load_state(one / "t-state").optimizer))
    mine = dict(_flat(x.optimizer))
    assert mine.keys() == plain.keys()
    for key, value in plain.items():
        if torch.is_tensor(value):
            assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, key
            assert torch.allclose(mine[key], value, atol=1e-6), key
        else:
            assert mine[key] == value, key


@needs_deepspeed
def test_a_nonfinite_loss_on_one_process_skips_the_zero2_update(tmp_path):
    """NaN in the first micro-batch of step 2 on process 1 only: every process skips step 2
    (DeepSpeed's overflow check sees the NaN gradients), the step is logged as non-finite, the
    weights after it equal those after step 1, and training goes on."""
    data = make_dataset(tmp_path, 3)
    out = tmp_path / "out"
    saving = "save_every_n_steps = 1\n"
    config = _config(tmp_path / "run.toml", data, out, saving=saving)
    _launch(
        tmp_path,
        ["train", "dreambooth", str(config)],
        "nan.log",
        script=str(HERE / "zero_worker.py"),
        SDTRAIN_TEST_NAN_RANK="1",
        SDTRAIN_TEST_NAN_CALL="2",
    )
    records = {r["step"]: r for r in metrics(out)}
    assert records[2].get("nonfinite") is True and "loss" not in records[2]
    assert all("nonfinite" not in records[s] for s in (1, 3, 4))
    one, two, three = (load_file(str(out / f"t-step0000000{s}.safetensors")) for s in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(two[k], three[k]) for k in two)
    assert all(torch.isfinite(t).all() for t in three.values())
    assert json.loads((out / "t-state" / "train_state.json").read_text())["nonfinite_skipped"] == 1


@pytest.mark.gpu
@needs_deepspeed
def test_zero2_on_cuda_resumes_exactly(tmp_path):
    """One CUDA process under ZeRO-2 (NCCL collectives on one rank): the state gathered from the
    GPU and loaded back gives the straight run's final weights bit for bit."""
    data = make_dataset(tmp_path, 3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    saving = "save_every_n_steps = 2\nsave_state = true\n"
    config = _config(tmp_path / "a.toml", data, straight, saving=saving)
    text = _launch(tmp_path, ["train", "dreambooth", str(config)], "straight.log", nproc=1)
    assert "DeepSpeed ZeRO stage 2: process 0 of 1" in text
    again = f'resume = "{straight / "t-step00000002-state"}"\n'
    config = _config(tmp_path / "b.toml", data, resumed, saving=again)
    _launch(tmp_path, ["train", "dreambooth", str(config)], "resumed.log", nproc=1)
    a, b = (load_file(str(d / "t.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
