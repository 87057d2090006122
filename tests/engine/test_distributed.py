"""Several processes (torchrun, gloo, CPU): the same training as one process with the global
batch, exact resume, Ctrl-C agreed across processes, one writer, process counts in states.

Measured tolerance (tiny-sd1, fp32, 7 steps over 3 epochs, accumulation 2, Adam lr 1e-3, one
thread per process): 2 processes x batch 1 against 1 process x batch 2 give losses equal to
~1e-7 relative and LoRA tensors within 1.1e-5 absolute; not bit-identical, because the gradient
sum runs in another order (DDP averages two per-process gradients; one process sums inside the
batched matmuls). LoRA dropout is off there: peft draws its masks from the global RNG per
process batch, which is the one draw that does not follow the per-sample rule.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from train_runs import (
    STEPS,
    assert_same,
    assert_same_training,
    lora_file,
    metrics,
    read_log,
    state_contents,
    train,
    wait_until,
    write_config,
)

from launched import run, start
from sdtrain.data.batches import process_share
from sdtrain.engine.state import find_latest_state, load_counters
from sdtrain.errors import TrainingError

TOLERANCE = 1e-4  # LoRA tensors, absolute (measured 1.1e-5)
NO_DROPOUT = {"network_dropout": 0.0}


def two_process_args(config) -> list[str]:
    return ["train", "lora", str(config)]


@pytest.fixture(scope="module")
def two_straight(tmp_path_factory, run_data):
    """An uninterrupted 2-process run, batch 1 per process (global batch 2, accumulation 2)."""
    root = tmp_path_factory.mktemp("two-straight")
    config = write_config(root / "run.toml", run_data, root / "out", network=NO_DROPOUT)
    run(two_process_args(config), root / "log.txt")
    return root / "out"


def test_shares_split_every_global_batch():
    assert process_share(4, 2, 0).slots == (0, 1) and process_share(4, 2, 1).slots == (2, 3)
    assert process_share(3, 2, 0).slots == (0, 1) and process_share(3, 2, 1).slots == (2,)
    tail = process_share(1, 2, 1)  # a bucket's last global batch: fewer samples than processes
    assert tail.padding and tail.weight == 0.0 and tail.slots == (0,)
    # weights make the mean over processes the mean over the global batch's samples
    assert [process_share(3, 2, r).weight for r in (0, 1)] == [4 / 3, 2 / 3]
    assert process_share(2, 1, 0).weight == 1.0


def test_two_processes_train_what_one_process_does_with_the_global_batch(
    cli, tmp_path, run_data, two_straight
):
    one = tmp_path / "one"
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        one,
        training={"train_batch_size": 2},
        network=NO_DROPOUT,
    )
    train(cli, config)
    a, b = metrics(one), metrics(two_straight)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 1, 2, 2, 3, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    ta, tb = lora_file(one / "t.safetensors")[0], lora_file(two_straight / "t.safetensors")[0]
    assert set(ta) == set(tb)
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    assert worst < TOLERANCE
    # only the main process wrote: one metrics line per step, one of each file
    assert len(b) == STEPS
    assert (
        json.loads((two_straight / "t-state" / "train_state.json").read_text())["num_processes"]
        == 2
    )
    assert load_counters(two_straight / "t-state").num_processes == 2
    assert load_counters(one / "t-state").num_processes == 1


# deferred (engine/host_sync.py): the stop is agreed on the device with the step's values and
# read a step later, at the same step on every process
@pytest.mark.parametrize("mode", ["every_step", "deferred"])
def test_ctrl_c_in_a_two_process_run_writes_one_state_and_resume_is_exact(
    tmp_path, run_data, two_straight, mode
):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml", run_data, out, network=NO_DROPOUT, training={"host_sync": mode}
    )
    log = tmp_path / "log.txt"
    proc = start(two_process_args(config), log)
    records = out / "metrics.jsonl"
    wait_until(proc, lambda: records.exists() and records.stat().st_size > 0)  # after step 1
    # Ctrl-C in a terminal: the launcher and both workers get it; the launcher forwards it too
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) != 0
    text = read_log(log)
    state = find_latest_state(out)
    assert state is not None
    stopped = load_counters(state).global_step
    assert 1 <= stopped < STEPS
    assert f"stopped after step {stopped}; state written to {state}" in text
    assert text.count("stopped after step") == 1  # shown by the main process only
    assert "aborted at once" not in text  # the forwarded copy of the signal counted once
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped + 1))
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".sdtrain.lock"]

    run([*two_process_args(config), "--resume", "auto"], tmp_path / "log2.txt")
    assert_same_training(two_straight, out)


def test_a_deferred_two_process_run_is_the_every_step_one_bit_for_bit(
    tmp_path, run_data, two_straight
):
    """host_sync = deferred on two processes: the agreed loss, finite flag and stop flag are
    all-reduced on the device and read a step later; files, states and records are the same."""
    out = tmp_path / "out"
    training = {"host_sync": "deferred"}
    config = write_config(
        tmp_path / "run.toml", run_data, out, network=NO_DROPOUT, training=training
    )
    run(two_process_args(config), tmp_path / "log.txt")
    assert_same_training(two_straight, out)


def test_a_compiled_two_process_run_is_the_eager_one_bit_for_bit(tmp_path, run_data, two_straight):
    """torch_compile (aot_eager: torch's kernels through the traced graphs) inside DDP: the
    compiled modules sit under the DDP wrapper and its gradient exchange covers them."""
    out = tmp_path / "out"
    training = {"torch_compile": True, "dynamo_backend": "aot_eager"}
    config = write_config(
        tmp_path / "run.toml", run_data, out, network=NO_DROPOUT, training=training
    )
    run(two_process_args(config), tmp_path / "log.txt")
    assert "torch.compile: aot_eager" in " ".join(read_log(tmp_path / "log.txt").split())
    assert_same_training(two_straight, out)


# sitecustomize for launched workers: NaN loss on process $NAN_RANK at its micro-steps $NAN_CALLS
_NAN_HOOK = """
import os
if os.environ.get("RANK") == os.environ.get("NAN_RANK") and os.environ.get("NAN_CALLS"):
    import sdtrain.engine.step as step
    real, calls, bad = step.micro_step_loss, [], {
        int(c) for c in os.environ["NAN_CALLS"].split(",")
    }
    def micro_step_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) - 1 in bad else loss
    step.micro_step_loss = micro_step_loss
"""


# per process: epoch 1 = micro-steps 0, 1 (step 1) and 2 (step 2: process 0's last image,
# process 1's padding share); epoch 2 = 3, 4 (step 3) and 5 (step 4)
@pytest.mark.parametrize(("rank", "call", "bad_step"), [("1", 3, 3), ("0", 2, 2)])
def test_a_bad_step_on_one_process_is_skipped_the_same_way_deferred(
    tmp_path, run_data, rank, call, bad_step
):
    """A NaN loss on one process, in a full window and in the epoch's last, padded one: the
    agreed flag skips the update on both processes, the deferred settle gathers every process's
    images at the same point on each, and both modes end bit-identical. (With several processes
    every_step also runs the bad micro-batch's backward: after DDP's synchronising forward, a
    missing backward left DDP expecting one, and the next window's first backward was reduced
    early, which changed the last bits of later updates.)"""
    import subprocess

    from launched import launcher_command, launcher_env

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_NAN_HOOK)
    outs = {}
    for mode in ("every_step", "deferred"):
        out = tmp_path / mode
        config = write_config(
            tmp_path / f"{mode}.toml",
            run_data,
            out,
            network=NO_DROPOUT,
            training={"host_sync": mode},
        )
        env = launcher_env()
        env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
        env.update(NAN_RANK=rank, NAN_CALLS=str(call))
        log = tmp_path / f"{mode}.log"
        with open(log, "wb") as handle:
            code = subprocess.run(
                launcher_command(two_process_args(config)),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=600,
            ).returncode
        assert code == 0, log.read_text(errors="replace")[-4000:]
        outs[mode] = out
    a, b = outs["every_step"], outs["deferred"]
    bad = [r for r in metrics(b) if r.get("nonfinite")]
    assert [r["step"] for r in bad] == [bad_step]
    assert len(bad[0]["images"]) == (4 if bad_step == 3 else 2)  # both processes' (padding too)
    assert_same_training(a, b)
    for step in (2, 4, 6):  # the periodic states too
        stem = f"t-step{step:08d}"
        assert_same(state_contents(a / f"{stem}-state"), state_contents(b / f"{stem}-state"))


def test_a_state_resumes_only_on_its_process_count(cli, tmp_path, run_data, two_straight):
    state = two_straight / "t-step00000004-state"
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        tmp_path / "out",
        network=NO_DROPOUT,
        saving={"resume": str(state)},
    )
    with pytest.raises(TrainingError) as info:
        cli(["train", "lora", str(config)])
    assert "2 process(es); this run has 1" in info.value.message


def test_the_plan_counts_global_batches(cli, tmp_path, run_data, monkeypatch):
    config = write_config(tmp_path / "run.toml", run_data, tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli(["dataset", "plan", str(config)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # 5 images, global batch 1 x 2 processes: 3 global batches, 2 optimizer steps per epoch
    assert "global batches per epoch: 3" in text
    assert "4 samples per optimizer step (train_batch_size 1 x 2 processes x " in text
    assert "optimizer steps per epoch: 2" in text


def test_the_run_summary_states_the_global_batch(tmp_path, run_data, monkeypatch):
    from sdtrain.cli.summary import summary_lines
    from sdtrain.config.loader import load_run_config
    from sdtrain.data.plan import plan_for_run
    from sdtrain.methods.registry import command_schema

    config = write_config(tmp_path / "run.toml", run_data, tmp_path / "out")
    loaded = load_run_config([str(config)], command_schema("lora"), require_file=True)
    assert not any("global batch" in line for line in summary_lines(plan_for_run(loaded), "o"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    lines = summary_lines(plan_for_run(loaded), "o")
    assert "global batch: 1 x 2 processes x 2 accumulation = 4 samples/step" in lines


def test_close_destroys_the_process_group():
    """A run's process group is destroyed when it ends (left to interpreter exit, gloo's
    threads could abort a finished process), and close() is a no-op without one."""
    import torch.distributed as dist

    from sdtrain.engine.distributed import Processes

    processes = Processes(accelerator=None)
    processes.close()  # nothing initialised: nothing to do
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    processes.close()
    assert not dist.is_initialized()


def test_accelerate_launch_trains_what_torchrun_does(tmp_path, run_data, two_straight):
    """`accelerate launch --multi_gpu --num_processes 2 -m sdtrain ...` (the README's command;
    on a machine without GPUs accelerate's launcher starts CPU processes over gloo) gives the
    2-process torchrun run's LoRA bit for bit, and every process exits 0."""
    import shutil
    import subprocess
    import sys

    from launched import launcher_env

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's console script sits beside the interpreter"
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, network=NO_DROPOUT)
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdtrain"]
    done = subprocess.run(
        [*command, *two_process_args(config)],
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "terminate called" not in done.stderr
    ta, tb = lora_file(out / "t.safetensors")[0], lora_file(two_straight / "t.safetensors")[0]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert len(metrics(out)) == STEPS


def test_two_machines_train_what_one_machine_does(tmp_path, run_data, two_straight):
    """Multi-node through accelerate's own flags: two `accelerate launch --num_machines 2
    --machine_rank R --main_process_ip ...` launchers (one process each, both on this host) give
    the one-machine 2-process LoRA bit for bit; both exit 0 and only machine 0 writes."""
    import shutil
    import socket
    import subprocess
    import sys

    from launched import launcher_env

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.toml", run_data, out, network=NO_DROPOUT)
    launchers = []
    for rank in (0, 1):
        command = [accelerate, "launch", "--multi_gpu", "--num_machines", "2"]
        command += ["--num_processes", "2", "--machine_rank", str(rank)]
        command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdtrain"]
        log = open(tmp_path / f"machine{rank}.log", "wb")  # noqa: SIM115 (closed below)
        launchers.append(
            (
                subprocess.Popen(
                    [*command, *two_process_args(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=launcher_env(),
                ),
                log,
            )
        )
    codes = []
    for proc, log in launchers:
        codes.append(proc.wait(timeout=600))
        log.close()
    assert codes == [0, 0], read_log(tmp_path / "machine0.log") + read_log(
        tmp_path / "machine1.log"
    )
    ta, tb = lora_file(out / "t.safetensors")[0], lora_file(two_straight / "t.safetensors")[0]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert len(metrics(out)) == STEPS


def test_clip_skip_trains_on_two_processes(cli, tmp_path, run_data):
    """clip_skip = 2 leaves the text encoder's last layer (and its LoRA) without a gradient;
    DDP is told (find_unused_parameters), so 2 processes train what 1 process does with the
    global batch (it stopped at the second step before)."""
    two, one = tmp_path / "two", tmp_path / "one"
    model = {"training": {"max_train_steps": 3}, "network": NO_DROPOUT}
    config = write_config(tmp_path / "two.toml", run_data, two, **model)
    text = config.read_text().replace("[model]\n", "[model]\nclip_skip = 2\n")
    config.write_text(text)
    run(two_process_args(config), tmp_path / "log.txt")
    config = write_config(
        tmp_path / "one.toml",
        run_data,
        one,
        training={"max_train_steps": 3, "train_batch_size": 2},
        network=NO_DROPOUT,
    )
    config.write_text(config.read_text().replace("[model]\n", "[model]\nclip_skip = 2\n"))
    train(cli, config)
    ta, tb = lora_file(one / "t.safetensors")[0], lora_file(two / "t.safetensors")[0]
    assert set(ta) == set(tb)
    assert max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta) < TOLERANCE
    assert len(metrics(two)) == 3
