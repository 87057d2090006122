"""Run-level checks of `train dreambooth` / `train finetune` that need more than one table.

Each problem names the key and the file:line it was set at (exit 2), before any weights load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdtrain.config.flags import CLI
from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    from sdtrain.config.loader import LoadedConfig
    from sdtrain.data.plan import Plan

FULL_METHODS = ("dreambooth", "finetune")


def located(
    loaded: LoadedConfig, table: str, key: str, message: str, hint: str | None = None
) -> Problem:
    """A Problem at `table.key` with the file and line the key was set at."""
    value = getattr(getattr(loaded.config, table, None), key, None)
    file = line = None
    if f"{table}.{key}" in loaded.cli_keys:
        file = CLI
    elif loaded.source is not None:
        file = str(loaded.source.path)
        line = loaded.source.line_of((table, key))
    return Problem(
        key=f"{table}.{key}",
        message=message,
        file=file,
        line=line,
        value=value,
        has_value=True,
        hint=hint,
    )


def check_full_model_run(loaded: LoadedConfig, command: str, plan: Plan) -> None:
    """ConfigError listing every problem of a full-model run's settings (see module doc)."""
    if command not in FULL_METHODS:
        return
    cfg = loaded.config
    section = getattr(cfg, command)
    problems: list[Problem] = []
    for key in ("unet_lr", "text_encoder_lr"):
        if getattr(cfg.optimizer, key) is not None:
            problems.append(
                located(
                    loaded,
                    "optimizer",
                    key,
                    f"{key} is a LoRA setting; `sdtrain train {command}` uses "
                    f"optimizer.learning_rate and {command}.learning_rate_te",
                    hint=f"remove it; set [{command}] learning_rate_te for the text encoder",
                )
            )
    training = cfg.training
    if training.full_bf16 or training.full_fp16:
        key = "full_bf16" if training.full_bf16 else "full_fp16"
        if (cfg.optimizer.optimizer_type or "").lower() != "adafactor":
            problems.append(
                located(
                    loaded,
                    "training",
                    key,
                    f"{key} keeps no fp32 master weights: with {cfg.optimizer.optimizer_type} "
                    "an update smaller than 1/256 of a weight (any learning rate below ~1e-3) "
                    "is rounded away in 16-bit weights",
                    hint='use mixed_precision = "bf16" without full_bf16 (fp32 weights, bf16 '
                    'compute), or optimizer_type = "Adafactor" (relative steps of ~1% survive)',
                )
            )
    if command == "dreambooth":
        stop = section.stop_text_encoder_training
        total = plan.steps.total_steps if plan.steps is not None else None
        if stop is not None and stop > 0 and total is not None and stop > total:
            problems.append(
                located(
                    loaded,
                    "dreambooth",
                    "stop_text_encoder_training",
                    f"step {stop} is past the end of training ({total} optimizer steps): "
                    "the text encoder would never be frozen",
                    hint=f"use a step up to {total}, or remove the key to train it throughout",
                )
            )
        if stop is not None and stop >= 0 and not section.train_text_encoder:
            problems.append(
                located(
                    loaded,
                    "dreambooth",
                    "stop_text_encoder_training",
                    "the text encoder is not trained (train_text_encoder = false)",
                    hint="remove one of the two keys",
                )
            )
    if problems:
        raise ConfigError(problems)
