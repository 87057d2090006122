"""Child process of bench_train.py: runs the real `sdtrain` console entry with step timing.

Usage: python benchmarks/train_child.py <sdtrain arguments...>
Environment: SDTRAIN_BENCH_RESULT=<json path> (required); SDTRAIN_BENCH_PROFILE=<W>,<N> profiles
N optimizer steps after W warm-up steps with torch.profiler and reports the engine's own share;
SDTRAIN_BENCH_TOPOPS=<txt path> also writes the profiler's op table (top 40 by self CPU time).

It calls `sdtrain.cli.main.run()` exactly as the console script does. The allocator re-exec
happens first, before any heavy import, as in the console entry (the re-executed process runs
this file again with the same arguments); phase times count from the first process's start.
The only additions are a timestamp at the end of every optimizer step (a wrapper around
Trainer._after_step_events) and, when profiling, record_function labels around the model work.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
import time
from pathlib import Path

T0 = "SDTRAIN_BENCH_T0"  # wall-clock start of the first process (seconds since the epoch)
MODEL_WORK = ("unet.forward", "text_encoder.forward", "vae.encode", "backward", "optimizer.step")


def _label_module(module, name: str) -> None:
    """Open a profiler range in a forward pre-hook, close it in the forward hook."""
    import torch

    open_ranges = []

    def pre(_module, _args):
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        open_ranges.append(rf)

    def post(_module, _args, _out):
        open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def _labelled(fn, name: str):
    import torch

    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def _overhead(prof) -> dict:
    """Step time vs model work (ms, summed over the profiled steps) from the profiler events."""
    totals: dict[str, float] = {}
    steps = 0
    for event in prof.key_averages():
        key = event.key
        if key.startswith("ProfilerStep"):
            totals["steps"] = totals.get("steps", 0.0) + event.cpu_time_total / 1000
            steps += event.count
        elif key in MODEL_WORK or key.startswith("Optimizer.step#"):
            name = "optimizer.step" if key.startswith("Optimizer.step#") else key
            totals[name] = totals.get(name, 0.0) + event.cpu_time_total / 1000
    total = totals.pop("steps", 0.0)
    model = sum(totals.get(k, 0.0) for k in MODEL_WORK)
    return {
        "profiled_steps": steps,
        "step_ms": total / max(steps, 1),
        "model_work_ms": {k: round(totals.get(k, 0.0) / max(steps, 1), 3) for k in MODEL_WORK},
        "engine_ms": (total - model) / max(steps, 1),
        "engine_share": (total - model) / total if total else None,
    }


def _status_mib(field: str) -> float:
    """A /proc/self/status memory field in MiB (VmRSS now, VmHWM peak of this process image).

    VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a child forked from a large
    parent (or the allocator re-exec) would report the parent's size as its own peak.
    """
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def _mark(phases: list[dict], name: str, started: float) -> None:
    """Record the current and peak RSS (MiB) at the end of phase `name`."""
    phases.append(
        {
            "phase": name,
            "t_s": round(time.perf_counter() - started, 2),
            "rss_mib": round(_rss_mib(), 1),
            "peak_mib": round(_peak_mib(), 1),
        }
    )


def _phase_hooks(phases: list[dict], started: float) -> None:
    """Wrap load_bundle, latent caching, engine setup and export to mark the phase ends."""
    from sdtrain.engine import latents, loop
    from sdtrain.models import load

    def wrap(owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            _mark(phases, name, started)
            return out

        setattr(owner, attr, wrapper)

    wrap(load, "load_bundle", "load")
    wrap(latents, "fill_store", "cache_latents")
    wrap(loop.Trainer, "_save", "save")


def main() -> None:
    # phase times count from the first process's start, through the allocator re-exec
    os.environ.setdefault(T0, repr(time.time()))
    started = time.perf_counter() - (time.time() - float(os.environ[T0]))
    result_path = os.environ["SDTRAIN_BENCH_RESULT"]
    profile = os.environ.get("SDTRAIN_BENCH_PROFILE")
    # re-execute before the heavy imports below, as the console entry does: a user's process
    # never imports torch twice, so the measured process must not either
    from sdtrain.cli.allocator import maybe_reexec

    maybe_reexec(sys.argv[1:])
    from sdtrain.engine import loop

    stamps: list[float] = []
    cpu: list[float] = []  # process CPU time (all threads): robust to other load at 1 thread
    faults: list[int] = []  # minor page faults: what a poor allocator setting costs
    info: dict = {}
    state: dict = {}
    phases: list[dict] = []
    _mark(phases, "start", started)
    _phase_hooks(phases, started)

    original_events = loop.Trainer._after_step_events
    original_setup = loop.Trainer._setup

    def after_step(self, counters):
        stamps.append(time.perf_counter())
        if len(stamps) <= 2:
            _mark(phases, f"step{len(stamps)}", started)
        cpu.append(time.process_time())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        if "prof" in state:
            state["prof"].step()
        return original_events(self, counters)

    def setup(self):
        original_setup(self)
        _mark(phases, "setup", started)
        import torch

        info["fused_adamw"] = bool(self.optimizer.defaults.get("fused"))
        dtypes: dict[str, int] = {}
        for module in (self.bundle.unet, self.bundle.text_encoder):
            for p in module.parameters():
                kind = f"{'trainable' if p.requires_grad else 'frozen'}:{str(p.dtype)[6:]}"
                dtypes[kind] = dtypes.get(kind, 0) + p.numel()
        info["param_dtypes"] = dtypes
        info["threads"] = torch.get_num_threads()
        import sdtrain

        info["sdtrain"] = sdtrain.__file__
        if profile:
            warmup, active = (int(v) for v in profile.split(","))
            _label_module(self.bundle.unet, "unet.forward")
            _label_module(self.bundle.text_encoder, "text_encoder.forward")
            self.bundle.vae.encode = _labelled(self.bundle.vae.encode, "vae.encode")
            self._backward = _labelled(self._backward, "backward")
            schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=active, repeat=1)

            def ready(prof):
                info["profile"] = _overhead(prof)
                table = os.environ.get("SDTRAIN_BENCH_TOPOPS")  # optional: the op table too
                if table:
                    averages = prof.key_averages()
                    rows = averages.table(sort_by="self_cpu_time_total", row_limit=40)
                    Path(table).write_text(rows, encoding="utf-8")

            prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                schedule=schedule,
                on_trace_ready=ready,
            )
            prof.__enter__()
            state["prof"] = prof

    loop.Trainer._after_step_events = after_step
    loop.Trainer._setup = setup

    def write() -> None:
        if "prof" in state:
            state["prof"].__exit__(None, None, None)
        own = _peak_mib()
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        _mark(phases, "exit", started)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            info["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
            info["peak_vram_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result = {
            "phases": phases,
            "process_s": round(time.perf_counter() - started, 2),
            "stamps": stamps,
            "cpu_stamps": cpu,
            "fault_stamps": faults,
            "peak_rss_mib": own,
            "peak_rss_children_mib": children,
            "allocator_env": {
                k: os.environ.get(k)
                for k in ("LD_PRELOAD", "GLIBC_TUNABLES", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")
                if k in os.environ
            },
            **info,
        }
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle)

    atexit.register(write)
    sys.argv = ["sdtrain", *sys.argv[1:]]
    from sdtrain.cli.main import run

    run()


if __name__ == "__main__":
    main()
