"""Loading a full-size SD1.5-architecture single file: time and peak memory (not a test).

Writes a random-weight original-layout `.safetensors` with the real SD1.5 key names and shapes
(about 2.1 GB in fp16, 4.3 GB in float; generated in a temp folder, never committed), then loads
it through `load_bundle` in a fresh process and reports wall time and peak RSS as JSON.
Goal: peak RSS above the bare-import baseline < 1.5x the file size.
Usage: python benchmarks/bench_model_load.py [--dtype fp16|float] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = {"fp16": "float16", "float": "float32", "bf16": "bfloat16"}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_random_sd15(path: Path, dtype_name: str) -> dict:
    """A random-weight file with exactly the SD1.5 original layout (1,130 tensors)."""
    import torch
    from safetensors.torch import save_file

    from sdtrain.models.families import config_dir
    from sdtrain.models.single_file import expected_layout

    dtype = getattr(torch, DTYPES[dtype_name])
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    state = {
        key: (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        for key, shape in expected_layout(str(config_dir("sd1")), "sd1").items()
    }
    save_file(state, str(path), metadata={"modelspec.architecture": "stable-diffusion-v1"})
    return {"tensors": len(state), "write_s": round(time.perf_counter() - start, 2)}


def child(path: str, dtype_name: str) -> None:
    """Measured side: bare imports first (baseline), then load_bundle."""
    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle

    baseline = _current_rss_mb()
    start = time.perf_counter()
    bundle = load_bundle(
        ModelSection(pretrained_model_name_or_path=path),
        dtype=getattr(torch, DTYPES[dtype_name]),
    )
    seconds = time.perf_counter() - start
    params = sum(
        p.numel() for m in (bundle.unet, bundle.vae, bundle.text_encoder) for p in m.parameters()
    )
    print(
        json.dumps(
            {
                "load_s": round(seconds, 2),
                "baseline_rss_mb": round(baseline, 1),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "final_rss_mb": round(_current_rss_mb(), 1),
                "parameters": params,
                "unet_dtype": str(bundle.unet.dtype),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the file")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(tempfile.mkdtemp(prefix="sdtrain-bench-", dir=args.dir))
    path = folder / f"random-sd15-{args.dtype}.safetensors"
    try:
        written = write_random_sd15(path, args.dtype)
        size_mb = path.stat().st_size / 2**20
        run = subprocess.run(
            [sys.executable, __file__, "--child", str(path), "--dtype", args.dtype],
            check=True,
            capture_output=True,
            text=True,
        )
        measured = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            folder.rmdir()
    above = measured["peak_rss_mb"] - measured["baseline_rss_mb"]
    result = {
        "benchmark": "model_load",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "dtype": args.dtype,
        "file_mb": round(size_mb, 1),
        **written,
        **measured,
        "peak_above_baseline_mb": round(above, 1),
        "ratio_peak_above_baseline_to_file": round(above / size_mb, 2),
        "goal_ratio": 1.5,
        "kept": str(path) if args.keep else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
