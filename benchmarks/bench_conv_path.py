"""Which CPU convolution kernel wins per U-Net shape: the GEMM path of models/conv_path.py
(im2col + GEMM, torch's `thnn_conv2d`) or oneDNN (torch's default).

Every Conv2d of the SD1.5 U-Net at the given resolution (shapes and counts from a forward on the
meta device) runs forward + input gradient (frozen weights, as in LoRA training) both ways,
interleaved, best of --repeat. `routed` sums the shapes conv_path.py sends to the GEMM path (at
most MAX_POSITIONS output positions), each times its count: if oneDNN's sum is lower on a CPU, the
routing rule is wrong there. `gemm_rows` times the frozen small maps' one-GEMM input gradient (at
most MAX_ROWS_POSITIONS positions; conv_path.py's form on AVX-512 CPUs), and its `routed` sum is
the GEMM path with that form where it applies. fp32 only. Prints one JSON object (also to --out).
--cold times each call on a weight copy not in the cache, as in a training step, where every
weight arrives cold from memory (without it: one warm weight, as until 2026-12-08; --cold took 11
minutes on a 2-vCPU Xeon, the small weights being cycled through many copies).
Usage: python benchmarks/bench_conv_path.py [--resolution 256] [--repeat 5] [--cold] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

POOL_MIB = 160  # over a typical L3 cache; more where the CPU reports a larger one (pool_mib)
L3_SIZE = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")


def pool_mib() -> int:
    """MiB of weight copies to cycle through: POOL_MIB, or 1.25x the L3 cache the CPU reports
    where that is more (a 2-vCPU Xeon VM reported 480 MiB), so that each copy is cold
    (also bench_linear_path.py's)."""
    try:
        text = L3_SIZE.read_text(encoding="ascii").strip().upper()
        l3_mib = int(text.rstrip("K")) // 1024 if text.endswith("K") else int(text) // 2**20
    except (OSError, ValueError):
        return POOL_MIB
    return max(POOL_MIB, l3_mib * 5 // 4)


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


def time_shape(
    cin: int, cout: int, k: int, stride: int, side: int, repeat: int, cold: bool = False
) -> dict:
    """Best ms per call of forward + input gradient for each kernel; `cold`: per weight copy,
    cycling through copies that together exceed the L3 cache (pool_mib())."""
    import torch

    from sdtrain.models.conv_path import MAX_ROWS_POSITIONS, _FrozenConv

    copies = max(3, pool_mib() * 2**20 // (cout * cin * k * k * 4)) if cold else 1
    weights = [torch.randn(cout, cin, k, k) * 0.01 for _ in range(copies)]
    bias = torch.randn(cout)
    x = torch.randn(1, cin, side, side, requires_grad=True)
    pad = k // 2

    def gemm(weight: torch.Tensor) -> None:
        y = torch._C._nn.thnn_conv2d(x, weight, (k, k), bias, (stride, stride), (pad, pad))
        y.backward(torch.ones_like(y))

    def onednn(weight: torch.Tensor) -> None:
        y = torch.nn.functional.conv2d(x, weight, bias, stride, pad)
        y.backward(torch.ones_like(y))

    def gemm_rows(weight: torch.Tensor) -> None:  # the frozen small maps' one-GEMM input gradient
        y = _FrozenConv.apply(x, weight, bias, (k, k), (stride, stride), (pad, pad))
        y.backward(torch.ones_like(y))

    kernels = [("gemm", gemm), ("onednn", onednn)]
    if ((side + 2 * pad - k) // stride + 1) ** 2 <= MAX_ROWS_POSITIONS:
        kernels.append(("gemm_rows", gemm_rows))
    best = {name: float("inf") for name, _ in kernels}
    for _, fn in kernels:
        fn(weights[0])
    for _ in range(repeat):
        for name, fn in kernels:
            started = time.perf_counter()
            for weight in weights:
                fn(weight)
            best[name] = min(best[name], (time.perf_counter() - started) / copies)
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

    args = arguments(__doc__, repeat=5, flags=("--cold",))
    report: dict = {
        "machine": machine(),
        "resolution": args.resolution,
        "max_positions": MAX_POSITIONS,
        "cold_weights_mib": pool_mib() if args.cold else None,
        "shapes": [],
    }
    routed = {"gemm": 0.0, "onednn": 0.0, "gemm_rows": 0.0}  # gemm_rows: as conv_path.py runs
    for (cin, cout, k, stride, side, positions), count in sorted(
        unet_conv_shapes(args.resolution).items()
    ):
        ms = time_shape(cin, cout, k, stride, side, args.repeat, args.cold)
        row = {"in": cin, "out": cout, "kernel": k, "stride": stride, "side": side}
        row |= {"positions": positions, "count": count, "ms": ms}
        report["shapes"].append(row)
        if positions <= MAX_POSITIONS:
            for name in routed:
                routed[name] += ms.get(name, ms["gemm"]) * count
        print(json.dumps(row), flush=True)
    report["routed_ms"] = {name: round(total, 1) for name, total in routed.items()}
    emit(report, args.out)


if __name__ == "__main__":
    main()
