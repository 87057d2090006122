"""Which CPU GEMM wins per U-Net Linear shape with cold weights: torch's `F.linear` (`x @ W^T`,
input gradient `g @ W`) or models/linear_path.py's weight-first form (`(W @ x^T)^T`,
`(W^T @ g^T)^T`), and, for wide layers, its forward in blocks (`blocked_forward`: weight first
over WEIGHT_ROWS_PER_GEMM weight rows for 16-64 rows, `x @ W^T` into COLUMNS_PER_GEMM output
columns for up to MAX_BLOCKED_ROWS rows). --text-encoder adds the SD1 text encoder's shapes.

Every Linear of the SD1.5 U-Net at the given resolution, batch 1 (shapes and counts from a forward
on the meta device), runs its forward and its input gradient (a frozen weight, as in LoRA training)
both ways, interleaved, median of --repeat. In a training step every weight arrives cold from
memory, so each timing cycles through copies of the weight that together exceed the L3 cache
(`pool_mib()` in all: 160 MiB, or 1.25x a larger L3) and reports the time per copy.
`weight_first_rows_ms` sums the shapes linear_path.py sends the weight-first way
(MIN_ROWS..MAX_ROWS rows) times their counts: if `stock` is lower there on a CPU, the routing rule
is wrong on it. `routed_ms.path` sums what linear_path.py runs for every shape (forward and input
gradient, the blocked forward where it applies) against `routed_ms.stock` (F.linear for all). fp32
only. Prints one JSON object (also to --out).
Usage: python benchmarks/bench_linear_path.py [--resolution 256] [--repeat 5] [--text-encoder]
       [--out FILE]
"""

from __future__ import annotations

import json
import statistics
import time

from bench_conv_path import (  # benchmarks/ is here
    arguments,
    emit,
    machine,
    pool_mib,
    unet_layer_shapes,
)


def unet_linear_shapes(resolution: int) -> dict:
    """(rows, in, out, bias) -> how many Linear layers of the SD1.5 U-Net have it."""
    import torch

    def key(mod, inputs, output) -> tuple:
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        return (rows, mod.in_features, mod.out_features, mod.bias is not None)

    return unet_layer_shapes(resolution, torch.nn.Linear, key)


TEXT_ENCODER_SHAPES = {  # SD1's CLIP text encoder at 77 tokens, batch 1: 12 layers
    (77, 768, 768, True): 48,
    (77, 768, 3072, True): 12,
    (77, 3072, 768, True): 12,
}


def time_shape(rows: int, cin: int, cout: int, bias: bool, repeat: int) -> dict:
    """Median ms per weight copy of the forward and the input gradient, stock and weight-first,
    and linear_path.py's own forward where it blocks this shape."""
    import torch
    import torch.nn.functional as F

    from sdtrain.models.linear_path import WIDE, _path, frozen_linear

    pool = max(3, pool_mib() * 2**20 // (cin * cout * 4))
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
    if _path(x, weights[0], b) is not None and cout >= WIDE:
        cases["blocked_forward"] = lambda w: frozen_linear(x, w, b)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(repeat + 1):
        for name, fn in cases.items() if i % 2 else reversed(cases.items()):
            started = time.perf_counter()
            for w in weights:
                fn(w)
            if i:  # the first round warms every case up
                times[name].append((time.perf_counter() - started) / pool)
    return {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}


def _path_ms(ms: dict, rows: int) -> float:
    """Forward + input gradient as linear_path.py runs the shape."""
    from sdtrain.models.linear_path import MAX_ROWS, MIN_ROWS

    first = MIN_ROWS <= rows <= MAX_ROWS
    forward = ms.get("blocked_forward", ms["weight_first_forward" if first else "stock_forward"])
    return forward + ms["weight_first_grad" if first else "stock_grad"]


def main() -> None:
    from sdtrain.models.linear_path import MAX_ROWS, MIN_ROWS, routes_here

    args = arguments(__doc__, repeat=5, flags=("--text-encoder",))
    report: dict = {
        "machine": machine(),
        "resolution": args.resolution,
        "rows_routed": [MIN_ROWS, MAX_ROWS],
        "training_routes_here": routes_here(),  # the default (or SDTRAIN_LINEAR) on this machine
        "shapes": [],
    }
    shapes = {("unet", *k): v for k, v in unet_linear_shapes(args.resolution).items()}
    if args.text_encoder:
        shapes.update({("text_encoder", *k): v for k, v in TEXT_ENCODER_SHAPES.items()})
    routed = {"stock": 0.0, "weight_first": 0.0}
    totals = {"stock": 0.0, "path": 0.0}
    for (model, rows, cin, cout, bias), count in sorted(shapes.items()):
        ms = time_shape(rows, cin, cout, bias, args.repeat)
        row = {"model": model, "rows": rows, "in": cin, "out": cout, "bias": bias}
        row.update(count=count, ms=ms)
        report["shapes"].append(row)
        if MIN_ROWS <= rows <= MAX_ROWS:
            for name in routed:
                routed[name] += (ms[f"{name}_forward"] + ms[f"{name}_grad"]) * count
        totals["stock"] += (ms["stock_forward"] + ms["stock_grad"]) * count
        totals["path"] += _path_ms(ms, rows) * count
        print(json.dumps(row), flush=True)
    report["weight_first_rows_ms"] = {name: round(total, 1) for name, total in routed.items()}
    report["routed_ms"] = {name: round(total, 1) for name, total in totals.items()}
    emit(report, args.out)


if __name__ == "__main__":
    main()
