"""Dataset-plan speed: a large fine-tune metadata file and many real image files, planned through
the real config path (run TOML -> blueprint -> resolution chain -> plan).

* metadata: N entries with `image_size` (sizes are trusted, files only listed, never opened);
  the image files exist but are empty, so any accidental read would show up as invalid images.
* files: M real small images (PNG/JPEG/WebP mix) in DreamBooth folders; sizes, EXIF and
  truncation come from header reads. Goal: 10,000 files in < 10 s on 2 cores.

Timings are with a warm page cache (the files were just written). Prints one JSON object.
Usage: python benchmarks/bench_plan.py [--entries 100000] [--files 10000]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _encoded(fmt: str, size: tuple[int, int], orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buffer, fmt, exif=exif.tobytes())
    return buffer.getvalue()


def make_metadata(root: Path, entries: int) -> Path:
    folder = root / "ft"
    folder.mkdir()
    meta = {}
    sizes = [(1024, 768), (768, 1024), (512, 512), (1920, 1080), (832, 1216)]
    for i in range(entries):
        name = f"img{i:06d}.jpg"
        (folder / name).touch()
        key = f"img{i:06d}" if i % 2 else name  # bare stems and relative keys, mixed
        meta[key] = {
            "caption": f"a photo number {i}",
            "tags": "tag_a, tag_b, tag_c",
            "image_size": list(sizes[i % len(sizes)]),
        }
    (folder / "meta.json").write_text(json.dumps(meta))
    run = root / "run_meta.toml"
    run.write_text(
        "[general]\nresolution = 512\nenable_bucket = true\n[[datasets]]\n"
        '  [[datasets.subsets]]\n  image_dir = "ft"\n  metadata_file = "ft/meta.json"\n'
    )
    return run


def make_files(root: Path, files: int) -> Path:
    blobs = [
        _encoded(fmt, size, orient)
        for fmt, size, orient in [
            ("PNG", (96, 64), 1),
            ("JPEG", (64, 96), 6),
            ("WEBP", (80, 80), 1),
        ]
    ]
    folders = 10
    for f in range(folders):
        (root / "train" / f"{f + 1}_subject{f}").mkdir(parents=True)
    for i in range(files):
        ext = (".png", ".jpg", ".webp")[i % 3]
        folder = root / "train" / f"{i % folders + 1}_subject{i % folders}"
        (folder / f"img{i:06d}{ext}").write_bytes(blobs[i % 3])
        if i % 4 == 0:
            (folder / f"img{i:06d}.caption").write_text("subject, smiling, outdoors")
    run = root / "run_files.toml"
    run.write_text('[dataset]\ntrain_data_dir = "train"\nresolution = 512\nenable_bucket = true\n')
    return run


def time_plan(run: Path) -> tuple[float, object]:
    from sdtrain.config.loader import load_run_config
    from sdtrain.config.run import PLAN_COMMAND
    from sdtrain.data.plan import plan_for_run

    start = time.perf_counter()
    plan = plan_for_run(load_run_config([str(run)], PLAN_COMMAND))
    return time.perf_counter() - start, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    logging.getLogger("sdtrain").setLevel(logging.ERROR)
    result: dict[str, object] = {
        "benchmark": "dataset_plan",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "page_cache": "warm",
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        meta_run = make_metadata(root, args.entries)
        files_run = make_files(root, args.files)
        result["setup_seconds"] = round(time.perf_counter() - start, 2)

        seconds, plan = time_plan(meta_run)
        result["metadata_entries"] = args.entries
        result["metadata_seconds"] = round(seconds, 3)
        result["metadata_images_planned"] = sum(len(s.images) for s in plan.datasets[0].subsets)
        result["metadata_invalid"] = len(plan.invalid_images())

        seconds, plan = time_plan(files_run)
        planned = sum(len(s.images) for s in plan.datasets[0].subsets)
        result["files"] = args.files
        result["files_seconds"] = round(seconds, 3)
        result["files_per_second"] = round(args.files / seconds) if seconds else None
        result["files_images_planned"] = planned
        result["files_invalid"] = len(plan.invalid_images())
        result["files_goal_met"] = seconds < 10 * args.files / 10_000
        result["seconds"] = round(result["metadata_seconds"] + seconds, 3)  # type: ignore[operator]
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
