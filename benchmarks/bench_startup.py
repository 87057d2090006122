"""Two fixed costs before the first step, A/B: the model stack's imports with and without
import_gc.quiet_gc, and the SD VAE's encode with a channels-last or an NCHW input
(models/vae_encode.py).

imports: fresh interpreters import what a training run imports (models.load.import_model_stack),
alternating with and without the quiet block, --repeat each; wall seconds and the full
collections made while importing. vae: one SD1.5-architecture VAE (random weights) encodes one
image at --resolution, the two layouts interleaved, 2 * --repeat each; medians. Prints one JSON
object (also to --out). Usage: python benchmarks/bench_startup.py [--repeat 4] [--out FILE]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

IMPORTS = """
import gc, json, time
full = [0]
gc.callbacks.append(lambda phase, info: full.__setitem__(0, full[0] + (
    phase == "stop" and info["generation"] == 2)))
start = time.perf_counter()
from contextlib import nullcontext
from sdtrain.import_gc import quiet_gc
with (quiet_gc() if {quiet} else nullcontext()):
    from sdtrain.models.load import import_model_stack
    import_model_stack()
print(json.dumps({{"s": time.perf_counter() - start, "full_collections": full[0]}}))
"""


def imports(repeat: int) -> dict:
    runs: dict[str, list[dict]] = {"quiet_gc": [], "plain": []}
    for i in range(repeat):
        for name in ("quiet_gc", "plain") if i % 2 == 0 else ("plain", "quiet_gc"):
            code = IMPORTS.format(quiet=name == "quiet_gc")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            out.check_returncode()
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        name: {
            "median_s": round(statistics.median(r["s"] for r in rows), 2),
            "s": [round(r["s"], 2) for r in rows],
            "full_collections": [r["full_collections"] for r in rows],
        }
        for name, rows in runs.items()
    }


def vae(resolution: int, repeat: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from sdtrain.models.families import config_dir
    from sdtrain.models.vae_encode import OPT_OUT, encode_posterior

    torch.manual_seed(0)
    model = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir("sd1") / "vae"))
    model = model.eval().requires_grad_(False)
    pixels = torch.rand(1, 3, resolution, resolution) * 2 - 1
    times: dict[str, list[float]] = {"channels_last": [], "nchw": []}
    with torch.inference_mode():
        for i in range(2 * repeat + 1):
            for name in ("channels_last", "nchw") if i % 2 else ("nchw", "channels_last"):
                os.environ[OPT_OUT] = "nchw" if name == "nchw" else ""
                start = time.perf_counter()
                encode_posterior(model, pixels)
                if i:  # the first round warms both up
                    times[name].append(time.perf_counter() - start)
    os.environ.pop(OPT_OUT, None)
    return {
        name: {"median_s": round(statistics.median(t), 3), "s": [round(x, 3) for x in t]}
        for name, t in times.items()
    }


def main() -> None:
    from bench_conv_path import arguments, emit, machine  # benchmarks/ is the script's folder

    args = arguments(__doc__, repeat=4)
    report = {
        "machine": machine(),
        "imports": imports(args.repeat),
        "vae_encode": {"resolution": args.resolution, **vae(args.resolution, args.repeat)},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
