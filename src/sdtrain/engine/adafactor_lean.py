"""transformers' Adafactor update of one weight, computed inside that weight's gradient.

The library's step holds three weight-sized tensors at once for a factored weight: the gradient,
`grad**2 + eps` (then the factored estimate that replaces it) and `-update`. Under the fused
backward pass this happens once per weight during backward, when the activations are still
alive. On full SD1.5 the largest convolution kernels (56-112 MiB) grew the heap by ~0.7 GiB that
way: the step's peak.

`lean_adafactor_step` computes the same numbers, bit for bit, with the gradient's own memory as
the update and slices of at most CHUNK_ELEMENTS elements for the rest:
- `grad**2 + eps` and its means over the last and the second-last axis, slice by slice along
  axis 0 for weights of 3 or more axes (neither mean reduces it, so each mean element is reduced
  from the same values in the same order); a 2-D gradient with few rows set (the token
  embedding's) is squared in place and its rows put back after; other 2-D weights keep one
  gradient-sized temporary here (see `_update_moments`);
- the factored estimate r x c, multiplied into the gradient slice by slice (one rounding per
  element, and multiplication commutes);
- the RMS clip, the learning rate, weight decay and the sign on whole tensors, as the library;
  `update.neg_()` then `p.add_(update)` is exactly the library's `p.add_(-update)`.
Only factored weights (2 or more axes) without a first moment (`beta1` unset), in float32 with a
float32 gradient and primed state, take this path. Everything else returns False and is left to
the library's own step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per temporary slice


def _is_transformers_adafactor(optimizer: Any) -> bool:
    kind = type(optimizer)
    return kind.__name__ == "Adafactor" and kind.__module__.startswith("transformers.")


def _suited(optimizer: Any, param: torch.Tensor, group: dict[str, Any]) -> bool:
    import torch

    grad = param.grad
    if grad is None or grad.is_sparse or not _is_transformers_adafactor(optimizer):
        return False
    if param.dtype != torch.float32 or grad.dtype != torch.float32 or param.dim() < 2:
        return False
    if group.get("beta1") is not None or not grad.is_contiguous():
        return False
    state = optimizer.state.get(param) or {}
    row, col = state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col")
    return all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device == grad.device
        for t in (row, col)
    )


def _slices(length: int, per_index: int) -> list[tuple[int, int]]:
    """(start, count) pieces of an axis of `length` whose slices hold <= CHUNK_ELEMENTS each."""
    step = max(1, CHUNK_ELEMENTS // max(per_index, 1))
    return [(start, min(step, length - start)) for start in range(0, length, step)]


def _update_moments(
    grad: torch.Tensor, eps: float, row: torch.Tensor, col: torch.Tensor, beta2t: float
) -> None:
    """The library's `row/col.mul_(beta2t).add_((grad**2 + eps).mean(-1 / -2), 1 - beta2t)`.

    For a tensor of 3 or more axes each mean is computed on its own (at most one mean-sized
    temporary at a time), slice by slice along axis 0, which neither mean reduces. A 2-D one is
    not sliced: its second-last axis is axis 0, and torch sums a column slice of a 2-D tensor in
    a different order than the whole (measured: last-bit differences); see `_means_of_2d`.
    The state updates themselves run on whole tensors, as in the library (a sliced `add_` with
    `alpha` may round its last elements differently).
    """
    import torch

    if grad.numel() <= CHUNK_ELEMENTS or grad.dim() == 2:
        small = grad.numel() <= CHUNK_ELEMENTS
        row_mean, col_mean = _whole_means(grad, eps) if small else _means_of_2d(grad, eps)
        row.mul_(beta2t).add_(row_mean, alpha=(1.0 - beta2t))
        col.mul_(beta2t).add_(col_mean, alpha=(1.0 - beta2t))
        return
    for moment, dim in ((row, -1), (col, -2)):
        mean = torch.empty_like(moment)
        for start, count in _slices(grad.shape[0], grad.numel() // grad.shape[0]):
            squares = (grad.narrow(0, start, count) ** 2) + eps
            torch.mean(squares, dim=dim, out=mean.narrow(0, start, count))
        moment.mul_(beta2t).add_(mean, alpha=(1.0 - beta2t))
        del mean


def _apply_factors(grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> None:
    """grad *= the library's factored estimate r x c (`_approx_sq_grad`), slice by slice along
    axis 0: every element is one division, square root or product (correctly rounded, so the
    same in any slice), and multiplication commutes."""
    import torch

    row_scale = row.mean(dim=-1, keepdim=True)
    flat = grad.dim() == 2  # row (R,), row_scale (1,), col (C,): col's factor is shared
    c_shared = col.unsqueeze(-2).rsqrt() if flat else None
    for start, count in _slices(grad.shape[0], grad.numel() // grad.shape[0]):
        scale = row_scale if flat else row_scale.narrow(0, start, count)
        r_piece = (row.narrow(0, start, count) / scale).rsqrt_().unsqueeze(-1)
        c_piece = c_shared if flat else col.narrow(0, start, count).unsqueeze(-2).rsqrt()
        grad.narrow(0, start, count).mul_(torch.mul(r_piece, c_piece))


def _whole_means(grad: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's own computation: one gradient-sized `grad**2 + eps`, both means of it."""
    squares = (grad**2) + eps
    return squares.mean(dim=-1), squares.mean(dim=-2)


def _set_rows(grad: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of a 2-D tensor with any bit set (not all +0.0), found slice by slice."""
    import torch

    found = []
    bits = grad.view(torch.int32)
    for start, count in _slices(grad.shape[0], grad.shape[1]):
        hit = (bits.narrow(0, start, count) != 0).any(dim=1)
        found.append(hit.nonzero().flatten() + start)
    return torch.cat(found)


def _means_of_2d(grad: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The means of `grad**2 + eps` over the last and the first axis of a large 2-D gradient.

    A gradient with few rows set (the token embedding's: only the rows of the tokens in the
    batch) is squared in place and rebuilt from a copy of those rows afterwards, bit for bit; a
    dense one gets the gradient-sized temporary.
    """
    rows = _set_rows(grad)
    if rows.numel() * 4 > grad.shape[0]:
        return _whole_means(grad, eps)
    kept = grad.index_select(0, rows)
    squares = grad.pow_(2).add_(eps)
    means = squares.mean(dim=-1), squares.mean(dim=-2)
    grad.zero_().index_copy_(0, rows, kept)
    return means


def lean_adafactor_step(optimizer: Any, param: torch.Tensor, group: dict[str, Any]) -> bool:
    """The library's update of `param` from `param.grad` (which it overwrites); False when this
    weight or optimizer is not one this path covers (see the module doc): nothing was done."""
    if not _suited(optimizer, param, group):
        return False
    import torch

    grad = param.grad
    state = optimizer.state[param]
    eps = group["eps"][0]
    with torch.no_grad():
        state["step"] += 1
        state["RMS"] = optimizer._rms(param)
        lr = optimizer._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        _update_moments(grad, eps, row, col, beta2t)
        _apply_factors(grad, row, col)
        update = grad  # from here on the gradient's memory holds the update
        update.div_((optimizer._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["weight_decay"] != 0:
            param.add_(param, alpha=(-group["weight_decay"] * lr))
        param.add_(update.neg_())
    return True
