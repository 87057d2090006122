"""WD14 tagging throughput (images/s) with a tiny ONNX tagger: measures sdtrain's own pipeline.

The model only averages colours, so nearly all the time is ours: listing, decoding, the
tagger's preprocessing (pad, resize to 448, BGR), batching and atomic tag-file writes.
Prints one JSON object. Usage: python benchmarks/bench_tagging.py [--images 300] [--size 448]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_model(folder: Path, size: int, tags: int = 64) -> Path:
    """A WD14-layout ONNX graph: [N, size, size, 3] BGR 0..255 -> [N, tags] scores."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["output"]),
        ],
        "bench_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", tags])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 0.02, (3, tags)).astype(np.float32), "weights")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    categories = ["9"] * 4 + ["0"] * (tags - 8) + ["4"] * 4
    rows = ["tag_id,name,category,count"]
    rows += [f"{i},tag_{i},{c},0" for i, c in enumerate(categories)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def write_images(folder: Path, count: int) -> None:
    """`count` noisy JPEGs of typical training sizes (portrait, landscape, square)."""
    rng = np.random.default_rng(1)
    sizes = [(512, 768), (768, 512), (640, 640), (1024, 768)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    """Run each (workers, batch size) configuration once over the same images; print JSON."""
    from sdtrain.tools.caption.wd14 import Wd14Options, tag_folders

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=448, help="model input size")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.getLogger("sdtrain").setLevel(logging.WARNING)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_model(root / "model", args.size)
        images = root / "images"
        write_images(images, args.images)
        for workers in (0, 2, 4):
            options = Wd14Options(batch_size=args.batch_size, workers=workers, overwrite=True)
            start = time.perf_counter()
            result = tag_folders([images], str(model), options)
            seconds = time.perf_counter() - start
            assert len(result.summary.written) == args.images, result.summary.to_dict()
            results.append(
                {
                    "workers": workers,
                    "batch_size": args.batch_size,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(args.images / seconds, 1),
                }
            )
    print(
        json.dumps(
            {
                "benchmark": "wd14_tagging_pipeline",
                "images": args.images,
                "model_input": args.size,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "runs": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
