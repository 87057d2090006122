"""Full-UNet DreamBooth on the SD1.5 architecture: peak VRAM per memory lever (not a test).

Runs the real `sdtrain train dreambooth` (benchmarks/train_child.py: the console entry plus step
timestamps and the CUDA peak) on a random-weight SD1.5-architecture folder at 512 px, batch 1,
a few steps, once per lever:
  base       mixed_precision bf16 (fp32 master weights, AdamW states fp32)
  gc         + gradient_checkpointing
  full_bf16  + full_bf16 (weights and optimizer states in bf16)
  gc_bf16    gradient_checkpointing + full_bf16
Skips cleanly (JSON says why) when this sdtrain has no `train dreambooth` command, and reports a
lever the config refuses as refused, with the message.

Usage: python benchmarks/gpu/bench_dreambooth.py --out result.json [--work DIR] [--steps 4]
       [--levers base,gc,full_bf16,gc_bf16] [--dry]   (--dry: tiny model, CPU, 64 px)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))

LEVERS = {
    "base": {},
    "gc": {"gradient_checkpointing": True},
    "full_bf16": {"full_bf16": True},
    "gc_bf16": {"gradient_checkpointing": True, "full_bf16": True},
}
# full_bf16 is refused with AdamW (bf16 optimizer states): those levers run Adafactor
ADAFACTOR = {
    "optimizer_type": "Adafactor",
    "learning_rate": 1e-6,
    "optimizer_args": ["scale_parameter=False", "relative_step=False", "warmup_init=False"],
}


def has_command(command: str) -> bool:
    """True when `sdtrain train <command> --help` works in this checkout."""
    proc = subprocess.run(
        [sys.executable, "-m", "sdtrain", "train", command, "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return proc.returncode == 0


def write_toml(
    path: Path,
    model: str,
    data: Path,
    out: Path,
    resolution: int,
    steps: int,
    lever: dict,
    dry: bool,
) -> None:
    values = {
        "model": {"pretrained_model_name_or_path": model},
        "dataset": {"train_data_dir": str(data), "resolution": resolution},
        "training": {
            "output_dir": str(out),
            "max_train_steps": steps,
            "train_batch_size": 1,
            "cache_latents": True,
            "seed": 1234,
            "mixed_precision": "no" if dry else "bf16",
            **({} if dry else lever),
        },
        "optimizer": ADAFACTOR
        if lever.get("full_bf16") and not dry
        else {"optimizer_type": "AdamW", "learning_rate": 1e-6},
    }
    lines = []
    for table, entries in values.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in entries.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_lever(name: str, model: str, data: Path, work: Path, args) -> dict:
    out = work / f"out-{name}"
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run.toml"
    write_toml(run, model, data, out, args.resolution, args.steps, LEVERS[name], args.dry)
    result = out / "result.json"
    env = {**os.environ, "SDTRAIN_BENCH_RESULT": str(result)}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(BENCH / "train_child.py"), "-q", "train", args.command, str(run)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=args.lever_timeout,
    )
    record: dict = {
        "lever": name,
        **LEVERS[name],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stdout + proc.stderr)[-1500:]
        record["refused" if proc.returncode == 2 else "error"] = tail
        return record
    data_out = json.loads(result.read_text())
    stamps = data_out.get("stamps", [])
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]
    record.update(
        {
            "peak_vram_gib": data_out.get("peak_vram_gib"),
            "peak_reserved_gib": data_out.get("peak_vram_reserved_gib"),
            "peak_rss_mib": data_out.get("peak_rss_mib"),
            "s_per_step": sorted(gaps)[len(gaps) // 2] if gaps else None,
            "steps": len(stamps),
        }
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", help="folder for the model and runs (default: a temp folder)")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--lever-timeout", type=int, default=120)
    parser.add_argument("--dry", action="store_true")
    parser.add_argument("--command", default="dreambooth", help="method (lora: test the script)")
    args = parser.parse_args()
    out = Path(args.out)
    report: dict = {"levers": []}
    if not has_command(args.command):
        report["skipped"] = f"this sdtrain has no `train {args.command}` command"
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(report))
        return
    from train_work import make_images, model_spec

    work = Path(args.work or tempfile.mkdtemp(prefix="sdtrain-db-"))
    if args.dry:
        args.resolution = 64
    started = time.perf_counter()
    model = model_spec("tiny" if args.dry else "full", work / "models")
    report["model_build_s"] = round(time.perf_counter() - started, 1)
    data = make_images(work / "data", 2, args.resolution)
    for name in [n for n in args.levers.split(",") if n]:
        try:
            record = run_lever(name, model, data, work, args)
        except subprocess.TimeoutExpired:
            record = {"lever": name, "error": f"timed out after {args.lever_timeout} s"}
        report["levers"].append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("error", "refused")}))
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
