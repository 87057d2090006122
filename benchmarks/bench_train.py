"""Training speed and memory: sdtrain LoRA vs a bare diffusers + peft loop on the same work.

Every case runs in a fresh subprocess (peak RSS is per process):
* sdtrain: `sdtrain train lora RUN.toml` through the console entry (benchmarks/train_child.py adds
  step timestamps), on generated images and a generated run TOML; the allocator re-exec happens
  as for a user.
* sdtrain-noreexec: the same with SDTRAIN_NO_REEXEC=1 (the allocator lever off), for A/B.
* sdtrain-glibc: the same with glibc's malloc and sdtrain's tunables even where tcmalloc is there
  (the system's or the environment's own copy, see scripts/fetch_tcmalloc.sh), for A/B.
* sdtrain-half: the same with SDTRAIN_FROZEN_HALF=1 (a half model file's frozen weights kept
  half and up-cast per layer instead of up-cast to fp32 at load), for A/B.
* sdtrain-onednn: the same with SDTRAIN_CONV=onednn (every convolution through oneDNN, as torch
  chooses, instead of im2col + GEMM for the U-Net's small maps: models/conv_path.py), for A/B.
* sdtrain-stock-linear: the same with SDTRAIN_LINEAR=stock (every Linear through torch's
  `F.linear`, instead of the weight-first GEMM for frozen layers with few rows:
  models/linear_path.py), for A/B.
* sdtrain-stock-conv-grad: the same with SDTRAIN_CONV_GRAD=stock (torch's input gradient for the
  frozen small-map convolutions instead of the one-GEMM form conv_path.py uses on AVX-512 CPUs),
  for A/B; sdtrain-rows-conv-grad: that form on any CPU (SDTRAIN_CONV_GRAD=rows).
* sdtrain-linear-path: the same with SDTRAIN_LINEAR=path (frozen Linear layers through
  models/linear_path.py whatever the CPU; by default only AVX2 CPUs route them), for A/B.
* sdtrain-eager: the same with SDTRAIN_EAGER_DIFFUSERS=1 (diffusers' model-family packages
  imported whole instead of lazily: sdtrain/lazy_packages.py), for A/B.
* sdtrain-omp-active / sdtrain-omp-passive: the same with OMP_WAIT_POLICY=ACTIVE / PASSIVE
  (torch's OpenMP threads spin, or sleep at once, between parallel regions), for A/B.
* sdtrain-compile: the same with `[training] torch_compile = true` (inductor; the compile time
  falls in the warm-up steps and the whole-process time), for A/B.
* baseline: benchmarks/baseline_child.py, the reference-equivalent loop (default allocator; the
  models load through diffusers' and transformers' own from_pretrained, as the reference loads a
  diffusers folder; until 2026-12-06 it borrowed sdtrain's streaming loader).
* baseline-alloc: the baseline under the allocator environment sdtrain would choose.

Cases: models tiny (builtin:tiny-sd1, 256 px), small (~18M-param UNet, 128 px) and, with --full,
the full SD1.5 architecture with random weights (256 px; minutes per run; cached latents unless
--full-latents says otherwise) x precision fp32/bf16 x cached/uncached latents. LoRA dim 8 on
UNet + text encoder, AdamW, batch 1. Seconds per step are the median over the steps after the
warm-up; repeats alternate the variants (A B A B) and report the median of the repeat medians.
Each variant's `fixed_s` is its process time minus its steps at its median step time (start-up,
imports, load, latent caching, save, and the first steps' extra); `ratio_vs_baseline` gives, per
variant, `step_for_process_0.7`: the step-time ratio at which its whole process would be 0.7x the
baseline's, the fixed parts staying as measured.

Also: `sdtrain --help` start time (median of several runs) and the engine's own share of the step
time (everything but UNet/TE forward + backward, optimizer step and VAE encodes), measured with
torch.profiler on the small model with cached latents.

Prints one JSON object (and writes it to --out). The machine is shared: compare only numbers from
one sitting, and read `loadavg` before trusting a ratio.
Usage: python benchmarks/bench_train.py [--full] [--models tiny,small] [--repeat 2] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_work import PRESETS, make_images, model_spec, write_run_toml  # noqa: E402

IMAGES = 4  # images in the generated dataset; the baseline caches as many
DEFAULT_STEPS = {"tiny": (3, 10), "small": (3, 10), "full": (2, 5)}  # (warm-up, timed)


def _per_step(stamps: list[float], cpu: list[float], faults: list[int], warmup: int) -> dict:
    """Median wall and process-CPU seconds per step after `warmup` steps.

    CPU time counts every thread of the process; at one thread it barely moves when other
    processes load the machine, so use it for A/B comparisons on a busy machine.
    """
    skip = max(warmup - 1, 0)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][skip:]
    cpu_gaps = [b - a for a, b in zip(cpu, cpu[1:], strict=False)][skip:]
    fault_gaps = [b - a for a, b in zip(faults, faults[1:], strict=False)][skip:]
    if not gaps:
        return {"s_per_step": None, "timed_steps": 0}
    return {
        "s_per_step": statistics.median(gaps),
        "min_s": min(gaps),
        "max_s": max(gaps),
        "cpu_s_per_step": statistics.median(cpu_gaps) if cpu_gaps else None,
        "minor_faults_per_step": statistics.median(fault_gaps) if fault_gaps else None,
        "timed_steps": len(gaps),
    }


def _cpu_flags() -> dict:
    """The CPU model, its SIMD / bf16 flags and torch's capability, for the report."""
    import torch

    from sdtrain.engine.cpu_bf16 import this_cpu

    text = (
        Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").is_file() else ""
    )
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if "model name" in ln), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")
    support = this_cpu()
    return {
        "model": model,
        "flags": [f for f in wanted if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": support.native,
        "bf16_reason": support.reason,
    }


def _allocator_env() -> dict[str, str]:
    from sdtrain.cli.allocator import allocator_env

    return allocator_env(dict(os.environ)) or {}


def _pythonpath(env: dict[str, str]) -> str:
    """benchmarks/ first, then the caller's PYTHONPATH (a worktree's src/ must stay on it)."""
    return os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)


def _run_child(args: list[str], env: dict[str, str], timeout: float) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**env, "SDTRAIN_BENCH_RESULT": str(result), "PYTHONPATH": _pythonpath(env)}
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *args],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result.read_text()), wall


def _bf16_runs() -> bool:
    """False where sdtrain refuses bf16 on this CPU (engine/cpu_bf16.py) and no override is set."""
    from sdtrain.engine.cpu_bf16 import ALLOW_SLOW, has_bf16_kernels

    return has_bf16_kernels() is not False or os.environ.get(ALLOW_SLOW) == "1"


def run_variant(variant: str, case: dict, work: Path, spec: str, steps: int, warmup: int) -> dict:
    """One fresh process of `variant` on `case`; returns timing, RSS and what it reported."""
    env = dict(os.environ)
    env.pop("SDTRAIN_BENCH_PROFILE", None)
    load_before = os.getloadavg()[0]
    resolution = case["resolution"]
    if variant.startswith("sdtrain"):
        if variant == "sdtrain-noreexec":
            env["SDTRAIN_NO_REEXEC"] = "1"
        if variant == "sdtrain-glibc":
            from sdtrain.cli.allocator import GLIBC_MALLOC

            env["GLIBC_TUNABLES"] = GLIBC_MALLOC  # a user's own tunables: no tcmalloc re-exec
            env.pop("LD_PRELOAD", None)
        if variant == "sdtrain-half":
            env["SDTRAIN_FROZEN_HALF"] = "1"
        if variant == "sdtrain-onednn":
            env["SDTRAIN_CONV"] = "onednn"
        if variant == "sdtrain-stock-linear":
            env["SDTRAIN_LINEAR"] = "stock"
        if variant == "sdtrain-linear-path":
            env["SDTRAIN_LINEAR"] = "path"
        if variant in ("sdtrain-stock-conv-grad", "sdtrain-rows-conv-grad"):
            env["SDTRAIN_CONV_GRAD"] = variant.split("-")[1]
        if variant == "sdtrain-eager":
            env["SDTRAIN_EAGER_DIFFUSERS"] = "1"
        if variant in ("sdtrain-omp-active", "sdtrain-omp-passive"):
            env["OMP_WAIT_POLICY"] = variant.rsplit("-", 1)[1].upper()
        if case.get("profile"):
            env["SDTRAIN_BENCH_PROFILE"] = f"{warmup},{steps - warmup}"
        out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
        run = write_run_toml(
            out / "run.toml",
            model=spec,
            data_dir=work / f"data-{resolution}",
            output_dir=out,
            resolution=resolution,
            steps=steps,
            precision=case["precision"],
            cached=case["latents"] == "cached",
            training={"torch_compile": True} if variant == "sdtrain-compile" else None,
        )
        args = [str(HERE / "train_child.py"), "-q", "train", "lora", str(run)]
    else:
        if variant == "baseline-alloc":
            env.update(_allocator_env())
        out = work / f"baseline-{time.time_ns()}.json"
        args = [str(HERE / "baseline_child.py"), spec, str(resolution), case["precision"]]
        args += [case["latents"], str(steps), str(out), str(IMAGES)]
    if variant.startswith("sdtrain"):
        result, wall = _run_child(args, env, timeout=3600)
    else:
        result, wall = _run_baseline(args, env)
    record = {
        **_per_step(
            result.pop("stamps"), result.pop("cpu_stamps"), result.pop("fault_stamps"), warmup
        ),
        "peak_rss_mib": round(result.pop("peak_rss_mib"), 1),
        "wall_s": round(wall, 2),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    record.update(result)
    return record


def _run_baseline(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    out = Path(args[6])  # baseline_child.py SPEC RES PRECISION LATENTS STEPS OUT [IMAGES]
    env = {**env, "PYTHONPATH": _pythonpath(env)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"baseline failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    Path(str(out) + ".lora.safetensors").unlink(missing_ok=True)
    return result, wall


def cli_start(runs: int) -> dict:
    """Median wall time of `sdtrain --help` in fresh processes (first run discarded)."""
    exe = Path(sys.executable).parent / "sdtrain"
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "sdtrain"]
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        subprocess.run([*command, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times[1:]), "runs": times[1:], "target_s": 0.3}


def _summary(runs: list[dict], steps: int) -> dict:
    """Medians over the repeats. `fixed_s`: the process time that is not `steps` steps at the
    median step time (start-up, imports, model load, latent caching, save, and what the first
    steps take beyond the later ones)."""

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    step, wall = median("s_per_step"), median("wall_s")
    return {
        "s_per_step": step,
        "cpu_s_per_step": median("cpu_s_per_step"),
        "minor_faults_per_step": median("minor_faults_per_step"),
        "peak_rss_mib": median("peak_rss_mib"),
        "process_wall_s": wall,
        "fixed_s": round(wall - steps * step, 2) if step and wall else None,
        "repeats": len(runs),
    }


def _step_for_process(variant: dict, base: dict, steps: int, target: float = 0.7) -> float | None:
    """The step-time ratio against the baseline at which `variant`'s whole process would be
    `target` times the baseline's, its fixed part staying as measured: what the whole-process
    target asks of the step, given the start-up, load and caching both tools pay."""
    if not (variant["fixed_s"] is not None and base["process_wall_s"] and base["s_per_step"]):
        return None
    step = (target * base["process_wall_s"] - variant["fixed_s"]) / steps
    return round(step / base["s_per_step"], 3)


def _mfu(case: dict, summary: dict, peak: dict[str, float]) -> dict:
    """Achieved GFLOP/s per variant (step FLOPs / median s per step) against the machine peak."""
    from mfu import step_flops

    gflop = step_flops(case["model"], case["resolution"]) / 1e9
    kind = "bf16" if case["precision"] == "bf16" else "fp32"
    rates = [r for r in (peak[f"matmul_{kind}"], peak[f"conv_{kind}"]) if r is not None]
    ceiling = max(rates) if rates else None  # None: bf16 peak not measured (no bf16 kernels)
    out: dict = {"gflop_per_step": round(gflop, 1), "peak_gflops": ceiling, "variants": {}}
    for variant, s in summary.items():
        if s["s_per_step"] and ceiling:
            achieved = gflop / s["s_per_step"]
            out["variants"][variant] = {
                "achieved_gflops": round(achieved, 1),
                "mfu": round(achieved / ceiling, 3),
            }
    return out


def bench_case(
    case: dict,
    variants: list[str],
    work: Path,
    cache: Path,
    repeat: int,
    peak: dict[str, float] | None = None,
) -> dict:
    """All variants of one case, interleaved `repeat` times; summaries and sdtrain/baseline."""
    warmup, timed = case.pop("warmup"), case.pop("timed")
    spec = model_spec(case["model"], cache, case.pop("file_dtype", "fp32"))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeat):
        for variant in variants:
            print(f"# {case} {variant}", file=sys.stderr, flush=True)
            runs[variant].append(run_variant(variant, case, work, spec, warmup + timed, warmup))
    summary = {v: _summary(r, warmup + timed) for v, r in runs.items()}
    record = {**case, "warmup_steps": warmup, "runs": runs, "summary": summary}
    if peak:
        record["mfu"] = _mfu(case, summary, peak)
    base = summary.get("baseline")
    if base and base["s_per_step"]:
        record["ratio_vs_baseline"] = {
            v: {
                "time": round(s["s_per_step"] / base["s_per_step"], 3),
                "cpu_time": round(s["cpu_s_per_step"] / base["cpu_s_per_step"], 3),
                "rss": round(s["peak_rss_mib"] / base["peak_rss_mib"], 3),
                "process": round(s["process_wall_s"] / base["process_wall_s"], 3),
                "step_for_process_0.7": _step_for_process(s, base, warmup + timed),
            }
            for v, s in summary.items()
            if v != "baseline" and s["s_per_step"]
        }
    return record


def _print_summary(report: dict) -> None:
    """Medians and ratios per case, one line per variant (stderr; the JSON goes to stdout)."""
    for case in report["cases"]:
        head = f"{case['model']} {case['resolution']}px {case['precision']} {case['latents']}"
        print(f"== {head}", file=sys.stderr)
        if "skipped" in case:
            print(f"  skipped: {case['skipped']}", file=sys.stderr)
            continue
        ratios = case.get("ratio_vs_baseline", {})
        for variant, s in case["summary"].items():
            line = (
                f"  {variant:<17} {s['s_per_step'] or float('nan'):7.2f} s/step "
                f"(cpu {s['cpu_s_per_step'] or float('nan'):6.2f})  "
                f"peak {s['peak_rss_mib'] / 1024:5.2f} GiB  process {s['process_wall_s']:6.1f} s"
                f" (fixed {s['fixed_s'] if s['fixed_s'] is not None else float('nan'):5.1f} s)"
            )
            r = ratios.get(variant)
            if r:
                line += (
                    f"  | x baseline: time {r['time']} cpu {r['cpu_time']} rss {r['rss']} "
                    f"process {r['process']} (0.7x needs step {r['step_for_process_0.7']})"
                )
            mfu = case.get("mfu", {}).get("variants", {}).get(variant)
            if mfu:
                line += f"  | {mfu['achieved_gflops']} GFLOP/s, MFU {mfu['mfu']:.0%}"
            print(line, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma list of tiny,small,full")
    parser.add_argument("--full", action="store_true", help="add the full SD1.5 architecture")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--latents", default="cached,uncached")
    parser.add_argument("--full-latents", default="cached", help="latent modes for full")
    parser.add_argument("--variants", default="sdtrain,baseline")
    parser.add_argument(
        "--full-dtype", default="fp16", choices=["fp16", "fp32"], help="full model's file dtype"
    )
    parser.add_argument("--repeat", type=int, default=1, help="alternating repeats per case")
    parser.add_argument("--steps", type=int, help="timed steps (default: 10, full 5)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: 3, full 2)")
    parser.add_argument(
        "--threads", type=int, help="torch threads in every child (default: torch's, all cores)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the engine profile")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI start time")
    parser.add_argument("--no-mfu", action="store_true", help="skip FLOP counts and the peak")
    parser.add_argument("--model-cache", help="keep generated model folders here (reused)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    models = [m for m in args.models.split(",") if m]
    if args.full and "full" not in models:
        models.append("full")
    variants = [v for v in args.variants.split(",") if v]
    report: dict = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
            "allocator_env": _allocator_env(),
        },
        "cases": [],
    }
    import torch

    report["machine"]["torch"] = torch.__version__
    report["machine"]["torch_threads"] = torch.get_num_threads()
    report["machine"]["cpu_flags"] = _cpu_flags()
    peak = None
    if not args.no_mfu:
        from mfu import machine_peak

        peak = report["machine"]["peak_gflops_start"] = machine_peak()
    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-") as tmp:
        work = Path(tmp)
        cache = Path(args.model_cache) if args.model_cache else work / "models"
        cache.mkdir(parents=True, exist_ok=True)
        for preset in {PRESETS[m].resolution for m in models} | (
            {128} if not args.no_profile else set()
        ):
            make_images(work / f"data-{preset}", IMAGES, preset)
        if not args.no_cli:
            report["cli_help"] = cli_start(7)
        for model in models:
            latents = args.full_latents if model == "full" else args.latents
            warmup, timed = DEFAULT_STEPS[model]
            for precision in args.precisions.split(","):
                for mode in latents.split(","):
                    case = {
                        "model": model,
                        "resolution": PRESETS[model].resolution,
                        "precision": precision,
                        "latents": mode,
                        "warmup": args.warmup or warmup,
                        "timed": args.steps or timed,
                    }
                    if model == "full":
                        case["file_dtype"] = args.full_dtype
                    if precision == "bf16" and not _bf16_runs():
                        case["skipped"] = "sdtrain refuses bf16 here: torch has no bf16 kernels"
                        report["cases"].append(case)
                        continue
                    report["cases"].append(
                        bench_case(case, variants, work, cache, args.repeat, peak)
                    )
        if not args.no_profile:
            case = {
                "model": "small",
                "resolution": PRESETS["small"].resolution,
                "precision": "fp32",
                "latents": "cached",
                "profile": True,
            }
            spec = model_spec("small", cache)
            record = run_variant("sdtrain", case, work, spec, 3 + 8, 3)
            profile = record.get("profile", {})
            report["engine_overhead"] = {
                **profile,
                "config": "small, 128 px, fp32, cached latents",
                "target_share": 0.10,
            }
    report["machine"]["loadavg_end"] = os.getloadavg()
    if peak:
        from mfu import machine_peak

        report["machine"]["peak_gflops_end"] = machine_peak()
    _print_summary(report)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
