"""Which CPU convolution kernel wins per U-Net shape: the GEMM path of models/conv_path.py
(im2col + GEMM, torch's `thnn_conv2d`) or oneDNN (torch's default).

Every Conv2d of the SD1.5 U-Net at the given resolution (shapes and counts from a forward on the
meta device) runs forward + input gradient (frozen weights, as in LoRA training) both ways,
interleaved, best of --repeat. `routed` sums the shapes conv_path.py sends to the GEMM path
(at most MAX_POSITIONS output positions), each times its count: if oneDNN's sum is lower on a
CPU, the routing rule is wrong there. fp32 only. Prints one JSON object (also to --out).
Usage: python benchmarks/bench_conv_path.py [--resolution 256] [--repeat 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path


def unet_layer_shapes(resolution: int, kind: type, key) -> collections.Counter:
    """key(module, inputs, output) -> how many `kind` layers of the SD1.5 U-Net give it, from
    one batch-1 forward on the meta device at `resolution` (also bench_linear_path.py's)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdtrain.models.families import config_dir

    root = config_dir("sd1")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
    shapes: collections.Counter = collections.Counter()

    def record(mod, inputs, output) -> None:
        shapes[key(mod, inputs, output)] += 1

    for module in unet.modules():
        if isinstance(module, kind):
            module.register_forward_hook(record)
    side = resolution // 8
    with torch.device("meta"):
        unet(torch.zeros(1, 4, side, side), torch.tensor([10]), torch.zeros(1, 77, 768))
    return shapes


def unet_conv_shapes(resolution: int) -> collections.Counter:
    """(in, out, kernel, stride, input side, output positions) -> how many convs have it."""
    import torch

    def key(mod, inputs, output) -> tuple:
        return (
            mod.in_channels,
            mod.out_channels,
            mod.kernel_size[0],
            mod.stride[0],
            inputs[0].shape[-1],
            output.shape[-2] * output.shape[-1],
        )

    return unet_layer_shapes(resolution, torch.nn.Conv2d, key)


def time_shape(cin: int, cout: int, k: int, stride: int, side: int, repeat: int) -> dict:
    import torch

    weight = torch.randn(cout, cin, k, k) * 0.01
    bias = torch.randn(cout)
    x = torch.randn(1, cin, side, side, requires_grad=True)
    pad = k // 2

    def gemm() -> None:
        y = torch._C._nn.thnn_conv2d(x, weight, (k, k), bias, (stride, stride), (pad, pad))
        y.backward(torch.ones_like(y))

    def onednn() -> None:
        y = torch.nn.functional.conv2d(x, weight, bias, stride, pad)
        y.backward(torch.ones_like(y))

    best = {"gemm": float("inf"), "onednn": float("inf")}
    gemm()
    onednn()
    for _ in range(repeat):
        for name, fn in (("gemm", gemm), ("onednn", onednn)):
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: round(seconds * 1000, 2) for name, seconds in best.items()}


def machine() -> dict:
    """Where the figures come from: platform, Python, torch, its threads and CPU capability,
    and the CPU's SIMD flags (also used by bench_startup.py)."""
    import torch

    from sdtrain.engine.cpu_bf16 import cpu_flags

    flags = cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
    }


def arguments(doc: str, repeat: int, flags: tuple[str, ...] = ()) -> argparse.Namespace:
    """--resolution, --repeat and --out (also bench_startup.py's), and on/off `flags`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--out", type=Path)
    for flag in flags:
        parser.add_argument(flag, action="store_true")
    return parser.parse_args()


def emit(report: dict, out: Path | None) -> None:
    """Print the report as JSON, and write it to `out` when given."""
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
    print(text)


def main() -> None:
    from sdtrain.models.conv_path import MAX_POSITIONS

    args = arguments(__doc__, repeat=5)
    report: dict = {
        "machine": machine(),
        "resolution": args.resolution,
        "max_positions": MAX_POSITIONS,
        "shapes": [],
    }
    routed = {"gemm": 0.0, "onednn": 0.0}
    for (cin, cout, k, stride, side, positions), count in sorted(
        unet_conv_shapes(args.resolution).items()
    ):
        ms = time_shape(cin, cout, k, stride, side, args.repeat)
        row = {"in": cin, "out": cout, "kernel": k, "stride": stride, "side": side}
        row |= {"positions": positions, "count": count, "ms": ms}
        report["shapes"].append(row)
        if positions <= MAX_POSITIONS:
            for name in routed:
                routed[name] += ms[name] * count
        print(json.dumps(row), flush=True)
    report["routed_ms"] = {name: round(total, 1) for name, total in routed.items()}
    emit(report, args.out)


if __name__ == "__main__":
    main()
