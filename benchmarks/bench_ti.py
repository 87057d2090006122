"""Textual Inversion memory and speed: `sdtrain train ti` (TI and XTI) in a fresh process each.

The target (issue 13): peak RSS of SD1.5-architecture TI at 256 px <= 4.8 GiB (the reference
toolkit uses 6.4 GiB on the same work). The full SD1.5 architecture with random weights is built
once into --cache (see train_work.py); runs use cached latents, batch 1, AdamW, one vector.
Wrap full-size runs in `flock /tmp/sdtrain-bigmem.lock` on a shared machine.

Prints one JSON object (and writes it to --out): per case peak RSS (MiB), median s/step after
the warm-up, wall time and the load average around the run.
Usage: python benchmarks/bench_ti.py [--models full] [--precision bf16,no] [--xti] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_train  # noqa: E402
from bench_train import _per_step, _run_child  # noqa: E402
from train_work import PRESETS, make_images, model_spec  # noqa: E402

TOKEN = "zqtok"
CHECKPOINTING = False  # --gradient_checkpointing


def write_ti_toml(
    path: Path, model: str, data: Path, out: Path, resolution: int, steps: int, precision: str,
    xti: bool,
) -> Path:  # fmt: skip
    """A TI run on `data` (captions name TOKEN): cached latents, batch 1, AdamW 5e-3."""
    values = {
        "model": {"pretrained_model_name_or_path": model},
        "dataset": {"train_data_dir": str(data), "resolution": resolution},
        "training": {
            "output_dir": str(out),
            "max_train_steps": steps,
            "train_batch_size": 1,
            "cache_latents": True,
            "seed": 1234,
            "mixed_precision": precision,
            "max_data_loader_n_workers": 0,
            "gradient_checkpointing": CHECKPOINTING,
        },
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 5e-3},
        "textual_inversion": {"token_string": TOKEN, "init_word": "cat", "xti": xti},
    }
    lines = []
    for table, entries in values.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in entries.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_case(work: Path, spec: str, model: str, precision: str, xti: bool, steps: int) -> dict:
    resolution = PRESETS[model].resolution
    data = work / f"data-{resolution}"
    if not data.exists():
        make_images(data, 4, resolution)
        for caption in data.rglob("*.caption"):
            caption.write_text(f"a photo of {TOKEN}", encoding="utf-8")
    out = Path(tempfile.mkdtemp(prefix="ti-", dir=work))
    run = write_ti_toml(out / "run.toml", spec, data, out, resolution, steps, precision, xti)
    load = os.getloadavg()[0]
    args = [str(HERE / "train_child.py"), "-q", "train", "ti", str(run)]
    # the child imports sdtrain from this checkout (bench_train's child env names only HERE)
    real_here = bench_train.HERE
    bench_train.HERE = f"{HERE}{os.pathsep}{HERE.parent / 'src'}"  # type: ignore[assignment]
    try:
        result, wall = _run_child(args, dict(os.environ), timeout=7200)
    finally:
        bench_train.HERE = real_here
    timing = _per_step(
        result.pop("stamps"), result.pop("cpu_stamps"), result.pop("fault_stamps"), 2
    )
    return {
        "model": model,
        "resolution": resolution,
        "precision": precision,
        "xti": xti,
        "gradient_checkpointing": CHECKPOINTING,
        "peak_rss_mib": round(result["peak_rss_mib"], 1),
        "peak_rss_gib": round(result["peak_rss_mib"] / 1024, 3),
        **timing,
        "wall_s": round(wall, 1),
        "loadavg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
        "param_dtypes": result.get("param_dtypes"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="full", help="comma list of tiny, small, full")
    parser.add_argument("--precision", default="bf16", help="comma list of no, bf16")
    parser.add_argument("--xti", action="store_true", help="also run XTI on each case")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sdtrain-bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    global CHECKPOINTING
    CHECKPOINTING = args.gradient_checkpointing
    args.cache.mkdir(parents=True, exist_ok=True)
    cases = []
    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-ti-") as tmp:
        for model in args.models.split(","):
            spec = model_spec(model, args.cache)
            for precision in args.precision.split(","):
                for xti in (False, True) if args.xti else (False,):
                    cases.append(run_case(Path(tmp), spec, model, precision, xti, args.steps))
    report = {
        "benchmark": "ti",
        "target": "full SD1.5 TI at 256 px: peak RSS <= 4.8 GiB",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "cases": cases,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
