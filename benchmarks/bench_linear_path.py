"""Which CPU GEMM wins per U-Net Linear shape with cold weights: torch's `F.linear` (`x @ W^T`,
input gradient `g @ W`) or models/linear_path.py's weight-first form (`(W @ x^T)^T`,
`(W^T @ g^T)^T`).

Every Linear of the SD1.5 U-Net at the given resolution, batch 1 (shapes and counts from a
forward on the meta device), runs its forward and its input gradient (a frozen weight, as in LoRA
training) both ways, interleaved, median of --repeat. In a training step every weight arrives
cold from memory, so each timing cycles through copies of the weight that together exceed the
L3 cache (POOL_MIB in all) and reports the time per copy. `routed_ms` sums the shapes linear_path.py
sends the weight-first way (MIN_ROWS..MAX_ROWS rows) times their counts: if `stock` is lower
there on a CPU, the routing rule is wrong on it. fp32 only. Prints one JSON object (also to --out).
Usage: python benchmarks/bench_linear_path.py [--resolution 256] [--repeat 5] [--out FILE]
"""

from __future__ import annotations

import json
import statistics
import time

from bench_conv_path import arguments, emit, machine, unet_layer_shapes  # benchmarks/ is here

POOL_MIB = 160  # over a typical L3 cache


def unet_linear_shapes(resolution: int) -> dict:
    """(rows, in, out, bias) -> how many Linear layers of the SD1.5 U-Net have it."""
    import torch

    def key(mod, inputs, output) -> tuple:
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        return (rows, mod.in_features, mod.out_features, mod.bias is not None)

    return unet_layer_shapes(resolution, torch.nn.Linear, key)


def time_shape(rows: int, cin: int, cout: int, bias: bool, repeat: int) -> dict:
    """Median ms per weight copy of the forward and the input gradient, stock and weight-first."""
    import torch
    import torch.nn.functional as F

    pool = max(3, POOL_MIB * 2**20 // (cin * cout * 4))
    weights = [torch.randn(cout, cin) * 0.01 for _ in range(pool)]
    b = torch.randn(cout) if bias else None
    x, grad = torch.randn(rows, cin), torch.randn(rows, cout)

    def forward_first(w: torch.Tensor) -> torch.Tensor:
        out = torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())
        return out.t().contiguous()

    cases = {
        "stock_forward": lambda w: F.linear(x, w, b),
        "weight_first_forward": forward_first,
        "stock_grad": lambda w: torch.mm(grad, w),
        "weight_first_grad": lambda w: torch.mm(w.t(), grad.t()).t().contiguous(),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(repeat + 1):
        for name, fn in cases.items() if i % 2 else reversed(cases.items()):
            started = time.perf_counter()
            for w in weights:
                fn(w)
            if i:  # the first round warms every case up
                times[name].append((time.perf_counter() - started) / pool)
    return {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}


def main() -> None:
    from sdtrain.models.linear_path import MAX_ROWS, MIN_ROWS

    args = arguments(__doc__, repeat=5)
    report: dict = {
        "machine": machine(),
        "resolution": args.resolution,
        "rows_routed": [MIN_ROWS, MAX_ROWS],
        "shapes": [],
    }
    routed = {"stock": 0.0, "weight_first": 0.0}
    for (rows, cin, cout, bias), count in sorted(unet_linear_shapes(args.resolution).items()):
        ms = time_shape(rows, cin, cout, bias, args.repeat)
        row = {"rows": rows, "in": cin, "out": cout, "bias": bias, "count": count, "ms": ms}
        report["shapes"].append(row)
        if MIN_ROWS <= rows <= MAX_ROWS:
            for name in routed:
                routed[name] += (ms[f"{name}_forward"] + ms[f"{name}_grad"]) * count
        print(json.dumps(row), flush=True)
    report["routed_ms"] = {name: round(total, 1) for name, total in routed.items()}
    emit(report, args.out)


if __name__ == "__main__":
    main()
