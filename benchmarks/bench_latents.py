"""`sdtrain latents cache` speed: images/s and the share of the encode pass spent outside the VAE.

A small generated dataset (noise JPEGs of a few sizes, so several buckets, flip_aug on) is cached
through the real run layer (run TOML -> plan -> VAE -> content-addressed store) three times:

* threaded: decoding on background threads (the default);
* serial: decoding on the main thread (workers = 0), for comparison;
* resume: a second pass over the filled cache (hashing + header checks only, nothing encoded).

`outside_vae_share` is 1 - (time inside the VAE, copies included) / (encode-pass wall time): the
part of the pass the VAE waited on decoding, writing and bookkeeping. With the tiny random VAE the
VAE is cheap, so this measures the pipeline's own overhead; pass --model for a real one (a GPU is
used when present). Prints one JSON object.
Usage: python benchmarks/bench_latents.py [--images 96] [--resolution 256] [--batch 8]
       [--workers N] [--model builtin:tiny-sd1] [--mixed-precision no|bf16|fp16]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image


def make_dataset(root: Path, images: int, resolution: int) -> None:
    folder = root / "imgs"
    folder.mkdir()
    shapes = [(1.0, 1.0), (0.75, 1.33), (1.33, 0.75), (1.5, 0.66)]
    for i in range(images):
        fw, fh = shapes[i % len(shapes)]
        size = (int(resolution * fw * 1.5), int(resolution * fh * 1.5))  # resized on load
        buffer = io.BytesIO()
        Image.effect_noise(size, 60 + i % 50).convert("RGB").save(buffer, "JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"img{i:05d}.txt").write_text(f"noise picture {i}")


def write_run(root: Path, args: argparse.Namespace, cache: str, workers: int) -> Path:
    run = root / f"run_{cache}.toml"
    run.write_text(
        f'[model]\npretrained_model_name_or_path = "{args.model}"\n'
        f'[training]\nlatent_cache_dir = "{cache}"\nvae_batch_size = {args.batch}\n'
        f'mixed_precision = "{args.mixed_precision}"\nmax_data_loader_n_workers = {workers}\n'
        f"[general]\nresolution = {args.resolution}\nenable_bucket = true\n"
        f"min_bucket_reso = {args.resolution // 2}\nmax_bucket_reso = {args.resolution * 2}\n"
        'caption_extension = ".txt"\n'
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n  flip_aug = true\n'
    )
    return run


def cache_pass(run: Path) -> dict[str, object]:
    from sdtrain.config.loader import load_run_config
    from sdtrain.config.run import PLAN_COMMAND
    from sdtrain.run.latents import cache_latents

    start = time.perf_counter()
    outcome = cache_latents(load_run_config([str(run)], PLAN_COMMAND))
    total = time.perf_counter() - start
    report = outcome.report
    return {
        "latents": report.total,
        "encoded": report.encoded,
        "reused": report.reused,
        "images_per_second": round(report.images_per_second, 2),
        "outside_vae_share": round(report.outside_vae_share, 3),
        "encode_seconds": round(report.seconds, 3),
        "vae_seconds": round(report.vae_seconds, 3),
        "command_seconds": round(total, 3),  # + plan, model load, hashing, checks
        "device": outcome.device,
        "dtype": outcome.dtype,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--model", default="builtin:tiny-sd1")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args()
    logging.getLogger("sdtrain").setLevel(logging.ERROR)
    import torch

    result: dict[str, object] = {
        "benchmark": "latents_cache",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "model": args.model,
        "images": args.images,
        "resolution": args.resolution,
        "batch": args.batch,
        "workers": args.workers,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, args.images, args.resolution)
        cache_pass(write_run(root, args, "warmup", args.workers))  # imports, model, kernels
        result["threaded"] = cache_pass(write_run(root, args, "threaded", args.workers))
        result["serial"] = cache_pass(write_run(root, args, "serial", 0))
        result["resume"] = cache_pass(write_run(root, args, "threaded", args.workers))
    threaded, serial = result["threaded"], result["serial"]
    assert isinstance(threaded, dict) and isinstance(serial, dict)
    result["images_per_second"] = threaded["images_per_second"]
    result["outside_vae_share"] = threaded["outside_vae_share"]
    if serial["images_per_second"]:
        speedup = threaded["images_per_second"] / serial["images_per_second"]  # type: ignore[operator]
        result["speedup_vs_serial_decode"] = round(speedup, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
