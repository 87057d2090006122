"""Full-model (DreamBooth) training memory and speed on the full SD1.5 architecture at 256 px.

Every case is one fresh process (peak RSS is per process), run one after another:
* sdtrain cases: `sdtrain train dreambooth` (U-Net + text encoder trained, batch 1, cached
  latents, one 256 px image) through the real CLI; a wrapper around the trainer's end-of-step
  event stamps each optimizer step and reads the process's peak RSS (VmHWM) after the last timed
  step, then exits (the final 4 GB save is not part of the measurement).
  fp32 AdamW, the same with gradient checkpointing or the fused backward pass, bf16 autocast
  AdamW, 8-bit AdamW (bitsandbytes) with and without the fused backward pass, Adafactor with
  the fused backward pass, with and without checkpointing.
* baseline: the reference-equivalent bare diffusers loop in this file (`--child baseline`):
  U-Net + text encoder in fp32, torch AdamW (fused), MSE loss, grad clipping at 1.0, the same
  cached latents and caption.

The model is the bundled sd1 config with random weights, written once as a diffusers folder
(about 4 GiB) under --model-cache. Uses up to ~16 GiB: run it under
`flock /tmp/sdtrain-bigmem.lock`. Prints one JSON object (and writes it to --out). Seconds per
step: median over the steps after the warm-up; compare only numbers of one sitting.

Each sdtrain case also records RSS and peak RSS at the end of each phase (load + caching, engine
setup, every step); with BENCH_LIVE=1 the bytes of live CPU tensors too (RSS above them is
runtime plus allocator waste). The sdtrain cases run under the allocator a user's `sdtrain train`
gets (tcmalloc where there is one, see scripts/fetch_tcmalloc.sh; glibc tunables otherwise);
`--allocator glibc` forces glibc's malloc with sdtrain's tunables, for A/B. The baseline always
runs with the default allocator, as the reference does.

Usage: python benchmarks/bench_full.py [--cases fp32,adafactor_fused,...] [--steps 2,3]
       [--model-cache DIR] [--out result.json]
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

from train_work import CAPTION, make_images, model_spec  # noqa: E402

GIB = 1024**3
CASES: dict[str, dict] = {
    "fp32_adamw": {"optimizer": {"optimizer_type": "AdamW"}},
    "fp32_adamw_gc": {"optimizer": {"optimizer_type": "AdamW"}, "gc": True},
    "bf16_adamw": {"optimizer": {"optimizer_type": "AdamW"}, "bf16": True},
    "fp32_adamw_fused": {"optimizer": {"optimizer_type": "AdamW", "fused_backward_pass": True}},
    "adamw8bit": {"optimizer": {"optimizer_type": "AdamW8bit"}},
    "adamw8bit_fused": {"optimizer": {"optimizer_type": "AdamW8bit", "fused_backward_pass": True}},
    "adafactor_fused": {
        "optimizer": {
            "optimizer_type": "Adafactor",
            "fused_backward_pass": True,
            "optimizer_args": ["scale_parameter=False", "relative_step=False", "warmup_init=False"],
            "lr_scheduler": "constant_with_warmup",
        }
    },
    "adafactor_fused_gc": {
        "optimizer": {
            "optimizer_type": "Adafactor",
            "fused_backward_pass": True,
            "optimizer_args": ["scale_parameter=False", "relative_step=False", "warmup_init=False"],
            "lr_scheduler": "constant_with_warmup",
        },
        "gc": True,
    },
    "baseline": {},
}
TARGETS_GIB = {
    "fp32_adamw": 15.5,
    "adamw8bit": 10.0,
    "adamw8bit_fused": 10.0,
    "adafactor_fused": 6.5,
}


def _vm_field(field: str) -> int:
    """A /proc/self/status size field of this process (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _vm_hwm() -> int:
    """Peak resident set size of this process so far (bytes)."""
    return _vm_field("VmHWM")


def _phase(name: str) -> dict:
    """Where memory stands at the end of phase `name`: current and peak RSS (GiB)."""
    return {
        "phase": name,
        "rss_gib": round(_vm_field("VmRSS") / GIB, 2),
        "peak_gib": round(_vm_hwm() / GIB, 2),
    }


def _write_toml(path: Path, case: dict, model: str, data: Path, out: Path, steps: int) -> None:
    training = {
        "output_dir": str(out),
        "max_train_steps": steps,
        "train_batch_size": 1,
        "cache_latents": True,
        "seed": 1234,
        "max_data_loader_n_workers": 0,
        "gradient_checkpointing": bool(case.get("gc")),
        "mixed_precision": "bf16" if case.get("bf16") else "no",
    }
    values = {
        "model": {"pretrained_model_name_or_path": model},
        "dataset": {"train_data_dir": str(data), "resolution": 256},
        "training": training,
        "optimizer": {"learning_rate": 1e-6, **case["optimizer"]},
        "dreambooth": {"save_model_as": "safetensors"},
    }
    lines = []
    for table, entries in values.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in entries.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def child_sdtrain(result_path: str, total_steps: int, args: list[str]) -> None:
    """Run `sdtrain train dreambooth ARGS` in-process with step stamps; exit after the last."""
    from sdtrain.engine import loop

    stamps: list[float] = []
    phases: list[dict] = []
    info: dict = {"phases": phases}
    original_events = loop.Trainer._after_step_events
    original_setup = loop.Trainer._setup

    def setup(self):
        phases.append(_phase("load + caching"))
        original_setup(self)
        phases.append(_phase("engine setup"))
        import torch

        info["optimizer"] = self.built.description
        info["fused_backward"] = getattr(self, "fused", None) is not None
        info["trained_params"] = sum(p.numel() for g in self.groups for p in g.params)
        dtypes: dict[str, int] = {}
        for module in (self.bundle.unet, self.bundle.text_encoder):
            for p in module.parameters():
                kind = f"{'trainable' if p.requires_grad else 'frozen'}:{str(p.dtype)[6:]}"
                dtypes[kind] = dtypes.get(kind, 0) + p.numel()
        info["param_dtypes"] = dtypes
        info["threads"] = torch.get_num_threads()
        info["allocator_env"] = {
            k: os.environ[k]
            for k in ("LD_PRELOAD", "GLIBC_TUNABLES", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")
            if k in os.environ
        }

    def after_step(self, counters):
        stamps.append(time.perf_counter())
        phases.append(_phase(f"step {len(stamps)}"))
        if os.environ.get("BENCH_LIVE"):  # bytes of live CPU tensors (vs RSS: allocator waste)
            import gc

            import torch

            seen, live = set(), 0
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        live += storage.nbytes()
            phases[-1]["live_tensors_gib"] = round(live / GIB, 3)
        if len(stamps) >= total_steps:
            result = {"stamps": stamps, "peak_rss_bytes": _vm_hwm(), **info}
            Path(result_path).write_text(json.dumps(result), encoding="utf-8")
            os._exit(0)  # the measurement is done; skip the final save
        return original_events(self, counters)

    loop.Trainer._setup = setup
    loop.Trainer._after_step_events = after_step
    from sdtrain.cli.main import run

    sys.argv = ["sdtrain", "train", "dreambooth", *args]
    run()  # as the console script: the allocator re-exec happens as for a user


def child_baseline(result_path: str, model: str, steps: int) -> None:
    """The bare diffusers loop: U-Net + text encoder fp32, AdamW, cached latents (see doc)."""
    import torch
    from diffusers import DDPMScheduler
    from train_work import load_models

    from sdtrain.models.families import config_dir

    unet, vae, text_encoder, tokenizer = load_models(model)
    vae.requires_grad_(False)
    unet.requires_grad_(True).train()
    text_encoder.requires_grad_(True).train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    scheduler = DDPMScheduler.from_pretrained(
        str(config_dir("sd1")), subfolder="scheduler", local_files_only=True
    )
    ids = tokenizer(
        [CAPTION], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 256, 256, generator=generator) * 2 - 1
    with torch.no_grad():
        cached = vae.encode(pixels).latent_dist.sample(generator).float()
    stamps = []
    for _ in range(steps):
        latents = cached * 0.18215
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (1,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(noisy, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    result = {
        "stamps": stamps,
        "peak_rss_bytes": _vm_hwm(),
        "trained_params": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")


def _summary(raw: dict, warmup: int) -> dict:
    stamps = raw.pop("stamps")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][max(warmup - 1, 0) :]
    peak = raw.pop("peak_rss_bytes")
    return {
        "s_per_step": round(statistics.median(gaps), 2) if gaps else None,
        "step_times": [round(g, 2) for g in gaps],
        "peak_rss_gib": round(peak / GIB, 2),
        **raw,
    }


def run_case(
    name: str, model: str, work: Path, warmup: int, timed: int, allocator: str = "auto"
) -> dict:
    total = warmup + timed
    result = work / f"{name}.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if allocator == "glibc" and name != "baseline":
        from sdtrain.cli.allocator import GLIBC_MALLOC

        env["GLIBC_TUNABLES"] = GLIBC_MALLOC  # a user's own tunables: no tcmalloc re-exec
        env.pop("LD_PRELOAD", None)
    if name == "baseline":
        cmd = [sys.executable, __file__, "--child", "baseline", str(result), model, str(total)]
    else:
        data = make_images(work / "data", 1, 256)
        toml = work / f"{name}.toml"
        _write_toml(toml, CASES[name], model, data, work / f"out-{name}", total + 1)
        cmd = [sys.executable, __file__, "--child", "sdtrain", str(result), str(total), str(toml)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        return {"error": (proc.stdout + proc.stderr)[-3000:], "returncode": proc.returncode}
    summary = _summary(json.loads(result.read_text()), warmup)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    if name in TARGETS_GIB:
        summary["target_peak_rss_gib"] = TARGETS_GIB[name]
        summary["meets_target"] = summary["peak_rss_gib"] <= TARGETS_GIB[name]
    return summary


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        if sys.argv[2] == "baseline":
            child_baseline(sys.argv[3], sys.argv[4], int(sys.argv[5]))
        else:
            child_sdtrain(sys.argv[3], int(sys.argv[4]), sys.argv[5:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", default="2,3", help="warm-up,timed optimizer steps")
    parser.add_argument("--model-cache", help="keep the generated model folder here (reused)")
    parser.add_argument("--preset", default="full", help="full, or tiny to try the plumbing")
    parser.add_argument("--out")
    parser.add_argument(
        "--allocator", choices=("auto", "glibc"), default="auto", help="for the sdtrain cases"
    )
    args = parser.parse_args()
    warmup, timed = (int(v) for v in args.steps.split(","))
    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-full-") as tmp:
        work = Path(tmp)
        cache = Path(args.model_cache) if args.model_cache else work / "models"
        model = model_spec(args.preset, cache)
        results: dict = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
            },
            "work": "full SD1.5 architecture (random weights), U-Net + text encoder trained, "
            "256 px, batch 1, cached latents",
            "steps": {"warmup": warmup, "timed": timed},
            "allocator": args.allocator,
            "cases": {},
        }
        for name in args.cases.split(","):
            results["cases"][name] = run_case(name, model, work, warmup, timed, args.allocator)
            print(json.dumps({name: results["cases"][name]}), file=sys.stderr, flush=True)
        base = results["cases"].get("baseline", {}).get("s_per_step")
        ours = results["cases"].get("fp32_adamw", {}).get("s_per_step")
        if base and ours:
            results["fp32_adamw_vs_baseline"] = round(ours / base, 3)
            results["step_target"] = "sdtrain fp32 AdamW s/step <= 0.8 x baseline"
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
