"""U-Net block mode of networks.lora: per-block ranks/alphas and LR weights (25 SD1/2 blocks)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from sdtrain.errors import Problem

log = logging.getLogger(__name__)

NUM_BLOCKS = 12  # down (and up) blocks of an SD1/2 U-Net in the reference's block numbering
NUM_MID_BLOCKS = 1
NUM_TOTAL_BLOCKS = 2 * NUM_BLOCKS + NUM_MID_BLOCKS  # 25; index 0 (conv_in) never has a module
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

# the reference's regex, applied to kohya module names (`lora_unet_down_blocks_1_attentions_0_...`)
_RE_UPDOWN = re.compile(
    r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_"
)


def block_index(kohya_name: str) -> int:
    """Reference block index of a U-Net LoRA name: down 1..11, mid 12, up 13..24, -1 if none.

    down: 1 + 3i + j (samplers count as j = 2); up: 13 + 3i + j.
    """
    match = _RE_UPDOWN.search(kohya_name)
    if match:
        side, i, kind, j = match.groups()
        idx = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
        return 1 + idx if side == "down" else NUM_BLOCKS + 1 + idx
    if "mid_block_" in kohya_name:
        return NUM_BLOCKS
    return -1


@dataclass(frozen=True)
class BlockPlan:
    """Per-block ranks/alphas (25 entries each) and optional per-block LR multipliers.

    A block whose LR weight is 0 gets rank 0 (no module), as in the reference.
    """

    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...] | None
    conv_alphas: tuple[float, ...] | None
    lr_weights: tuple[float, ...] | None


def _key(name: str) -> str:
    return f"network.network_args.{name}"


def _split(value: Any) -> list[Any]:
    """A comma string ("1,2,,3") or a TOML array -> list of raw items (empty strings kept)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",")]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _numbers(name: str, value: Any, kind: type, problems: list[Problem], empty: Any = None) -> list:
    out = []
    for item in _split(value):
        if item == "" and empty is not None:
            out.append(empty)
            continue
        try:
            if isinstance(item, bool):
                raise ValueError
            number = kind(item)
            if kind is int and isinstance(item, float) and item != number:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(
                Problem(
                    key=_key(name),
                    value=value,
                    has_value=True,
                    message=f"{item!r} is not a {kind.__name__}",
                    hint=f"write {NUM_TOTAL_BLOCKS} comma-separated numbers",
                )
            )
            return []
        out.append(number)
    return out


def _per_block(name: str, value: Any, kind: type, problems: list[Problem]) -> list | None:
    if value is None:
        return None
    values = _numbers(name, value, kind, problems)
    if values and len(values) != NUM_TOTAL_BLOCKS:
        problems.append(
            Problem(
                key=_key(name),
                value=value,
                has_value=True,
                message=f"needs {NUM_TOTAL_BLOCKS} values for SD1/2, got {len(values)}",
                hint="one value per block: 0 (conv_in), 1-11 down, 12 mid, 13-24 up",
            )
        )
        return None
    if any(v < 0 for v in values):
        problems.append(
            Problem(key=_key(name), value=value, has_value=True, message="values must be >= 0")
        )
        return None
    return values or None


def _preset(name: str, text: str, problems: list[Problem]) -> list[float] | None:
    """`sine`, `cosine+.5`, ... -> 12 weights, as the reference's get_block_lr_weight."""
    preset, _, offset_text = text.partition("+")
    try:
        offset = float(offset_text) if offset_text else 0.0
    except ValueError:
        offset = None
    if preset not in PRESETS or offset is None:
        problems.append(
            Problem(
                key=_key(name),
                value=text,
                has_value=True,
                message=f"unknown LR-weight preset {text!r}",
                hint=f"use one of {', '.join(PRESETS)} (optionally +offset, e.g. "
                "sine+.5) or comma-separated numbers",
            )
        )
        return None
    steps = range(NUM_BLOCKS)
    ramp = [k / (NUM_BLOCKS - 1) for k in steps]
    table = {
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * NUM_BLOCKS,
    }
    return [w + offset for w in table[preset]]


def _lr_weights(name: str, value: Any, length: int, problems: list[Problem]) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str) and "," not in value and name != "mid_lr_weight":
        weights = _preset(name, value.strip(), problems)
    else:
        weights = _numbers(name, value, float, problems, empty=0.0)
    if not weights:
        return None
    if len(weights) > length:
        log.warning("%s has %d values; only the first %d are used", name, len(weights), length)
        weights = weights[:length]
    elif len(weights) < length:
        log.warning(
            "%s has %d values; the missing %d are 1.0", name, len(weights), length - len(weights)
        )
        weights = weights + [1.0] * (length - len(weights))
    return weights


def block_lr_weights(args: dict[str, Any], problems: list[Problem]) -> list[float] | None:
    """25 LR multipliers from down/mid/up_lr_weight (+ block_lr_zero_threshold), or None.

    Weights <= block_lr_zero_threshold (default 0) become 0; the missing side defaults to 1.0.
    """
    raw = {k: args.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")}
    if all(v is None for v in raw.values()):
        return None
    threshold_raw = args.get("block_lr_zero_threshold", 0.0)
    threshold_list = _numbers("block_lr_zero_threshold", threshold_raw, float, problems)
    threshold = threshold_list[0] if len(threshold_list) == 1 else 0.0
    down = _lr_weights("down_lr_weight", raw["down_lr_weight"], NUM_BLOCKS, problems)
    mid = _lr_weights("mid_lr_weight", raw["mid_lr_weight"], NUM_MID_BLOCKS, problems)
    up = _lr_weights("up_lr_weight", raw["up_lr_weight"], NUM_BLOCKS, problems)
    parts = []
    for weights, length in ((down, NUM_BLOCKS), (mid, NUM_MID_BLOCKS), (up, NUM_BLOCKS)):
        weights = weights if weights is not None else [1.0] * length
        parts += [w if w > threshold else 0.0 for w in weights]
    return parts


def block_plan(
    args: dict[str, Any],
    dim: int,
    alpha: float,
    conv_dim: int | None,
    conv_alpha: float | None,
    problems: list[Problem],
) -> BlockPlan | None:
    """The block plan when block_dims or any LR weight is given (the reference's block mode)."""
    lr_weights = block_lr_weights(args, problems)
    dims = _per_block("block_dims", args.get("block_dims"), int, problems)
    if dims is None and lr_weights is None:
        for extra in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if args.get(extra) is not None:
                problems.append(
                    Problem(
                        key=_key(extra),
                        value=args[extra],
                        has_value=True,
                        message="only used in block mode",
                        hint="also give block_dims (or down/mid/up_lr_weight)",
                    )
                )
        return None
    alphas = _per_block("block_alphas", args.get("block_alphas"), float, problems)
    conv_dims = _per_block("conv_block_dims", args.get("conv_block_dims"), int, problems)
    conv_alphas = _per_block("conv_block_alphas", args.get("conv_block_alphas"), float, problems)
    if conv_alphas is not None and conv_dims is None:
        problems.append(
            Problem(
                key=_key("conv_block_alphas"),
                value=args["conv_block_alphas"],
                has_value=True,
                message="needs conv_block_dims",
            )
        )
    dims = dims or [dim] * NUM_TOTAL_BLOCKS
    alphas = alphas or [alpha] * NUM_TOTAL_BLOCKS
    if conv_dims is not None:
        conv_alphas = conv_alphas or [conv_alpha if conv_alpha is not None else 1.0] * len(
            conv_dims
        )
    elif conv_dim is not None:
        conv_dims = [conv_dim] * NUM_TOTAL_BLOCKS
        conv_alphas = [conv_alpha if conv_alpha is not None else 1.0] * NUM_TOTAL_BLOCKS
    if lr_weights is not None:  # blocks that do not learn get no modules
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights, strict=True)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights, strict=True)]
    return BlockPlan(
        dims=tuple(dims),
        alphas=tuple(alphas),
        conv_dims=tuple(conv_dims) if conv_dims is not None else None,
        conv_alphas=tuple(conv_alphas) if conv_alphas is not None else None,
        lr_weights=tuple(lr_weights) if lr_weights is not None else None,
    )
