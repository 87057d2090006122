"""DeepSpeed ZeRO stage 1/2 for the full-model methods (DreamBooth, fine-tuning), from an
accelerate config (`distributed_type: DEEPSPEED`, `zero_stage: 2`).

Each process keeps the whole model and computes whole gradients, but holds the optimizer state
and the fp32 master copy of only its 1/N slice of every parameter group: for AdamW that is
8 bytes per weight divided among the processes, most of what full training needs beyond the
weights. DeepSpeed owns the reduction of gradients, the clipping and the update; sdtrain keeps the
rest of its engine:

- accumulation is sdtrain's ([training] gradient_accumulation_steps): DeepSpeed's own count and
  batch sizes are set from it, and the accumulation boundary is set at each window's last
  micro-batch;
- clipping: DeepSpeed's `gradient_clipping` is [training] max_grad_norm (a global norm over
  every process's slice, as on one process);
- the non-finite guard: a micro-batch whose loss is not finite is back-propagated times NaN, so
  DeepSpeed's own overflow check skips the update and clears its gradient buffers, and the engine
  counts the step as non-finite as always;
- states: the optimizer part is gathered into the per-weight layout a plain run writes (each
  process contributes the slices it owns; the main process writes), so a ZeRO state reads like any
  other and resume is exact: every process copies its slices back and rebuilds its fp32 master
  slice from the restored weights. Gathering adds bits (int32 sum, one owner per element), so
  values keep every bit, signs of zero included.

Refused by name (`check_zero_settings`, before any weight loads, and `check_zero_plugin`):
ZeRO stage 3 (parameters sharded: exports, samples and EMA read whole weights), optimizer or
parameter offload (not verified), mixed precision, full_bf16 and full_fp16 (DeepSpeed's bf16/fp16
modes keep the model itself in half precision, with the fp32 weights only inside its optimizer,
which exports and states do not read), optimizers whose update is not element by element
(Adafactor factors each matrix; the 8-bit optimizers quantize in blocks; D-Adaptation and Prodigy
estimate one step size from every gradient: ZeRO hands each process one flat slice of each group,
which would change their arithmetic), fused_backward_pass (DeepSpeed owns the update),
stop_text_encoder_training (ZeRO updates whole flattened groups, so a frozen text encoder would
keep moving with its momentum), clip_skip > 1 with the text encoder trained (its last layers get
zero gradients, and weight decay would move them), a DeepSpeed config's own optimizer/scheduler
sections, and the adapter methods (LoRA, TI: their optimizer state is small; train them
data-parallel).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from sdtrain.errors import ConfigError, Problem, TrainingError

if TYPE_CHECKING:
    import torch

    from sdtrain.config.sections import OptimizerSection, TrainingSection

logger = logging.getLogger(__name__)

# optimizer_type values whose update reads each element of a weight on its own (so one flat
# slice per process computes what per-weight tensors would)
ELEMENTWISE = (
    "AdamW",
    "Adam",
    "Lion",
    "SGDNesterov",
    "SGD",
    "RMSprop",
    "Adamax",
    "NAdam",
    "RAdam",
)
ZERO_METHODS = ("dreambooth", "finetune")
_HINT_DDP = (
    "or train data-parallel without DeepSpeed (`accelerate config` with MULTI_GPU, or torchrun)"
)


def zero_requested() -> bool:
    """True when the launcher asked for DeepSpeed (accelerate launch with a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_zero_settings(
    method: str,
    optimizer: OptimizerSection,
    training: TrainingSection,
    stop_text_encoder_training: int | None,
    clip_skip_unused: int | None = None,
) -> None:
    """ConfigError (exit 2), every problem by key, when these settings cannot train under
    DeepSpeed ZeRO (see the module). Call only when `zero_requested()`. `clip_skip_unused`: the
    clip_skip of a run that trains the text encoder (its last layers then get no gradient)."""
    problems: list[Problem] = []

    def refuse(key: str, message: str, hint: str) -> None:
        problems.append(Problem(key=key, message=message, hint=hint))

    if method not in ZERO_METHODS:
        refuse(
            "distributed_type",
            f"DeepSpeed ZeRO is for full-model training; `train {method}` trains an adapter or "
            "embedding whose optimizer state is small",
            f"train {method} data-parallel (torchrun, or `accelerate config` without DeepSpeed)",
        )
    name = optimizer.optimizer_type or "AdamW"
    if name.lower() not in {n.lower() for n in ELEMENTWISE}:
        refuse(
            "optimizer.optimizer_type",
            f"under DeepSpeed ZeRO each process updates one flat slice of every parameter group; "
            f"{name} does not update element by element, so its arithmetic would change",
            f"use {', '.join(ELEMENTWISE[:4])} (or another element-wise torch optimizer), "
            + _HINT_DDP,
        )
    if training.mixed_precision != "no" or training.full_bf16 or training.full_fp16:
        key = (
            "training.full_bf16"
            if training.full_bf16
            else "training.full_fp16"
            if training.full_fp16
            else "training.mixed_precision"
        )
        refuse(
            key,
            "DeepSpeed's bf16/fp16 modes keep the model in half precision and the fp32 weights "
            "only inside its optimizer, which sdtrain's exports and states do not read",
            'set mixed_precision = "no" (fp32) with DeepSpeed, ' + _HINT_DDP,
        )
    if optimizer.fused_backward_pass:
        refuse(
            "optimizer.fused_backward_pass",
            "DeepSpeed ZeRO reduces and applies the gradients itself after backward",
            "drop fused_backward_pass under DeepSpeed",
        )
    if stop_text_encoder_training is not None:
        refuse(
            f"{method}.stop_text_encoder_training",
            "ZeRO updates whole flattened parameter groups, so a frozen text encoder would keep "
            "moving with its optimizer momentum",
            "train the text encoder for the whole run or not at all, " + _HINT_DDP,
        )
    if clip_skip_unused is not None and clip_skip_unused > 1:
        refuse(
            "model.clip_skip",
            f"with clip_skip = {clip_skip_unused} the text encoder's last layers get no gradient; "
            "ZeRO gives them zero gradients instead and weight decay would still move them",
            "train the text encoder without clip_skip, freeze it, " + _HINT_DDP,
        )
    if problems:
        raise ConfigError(problems)


def plugin_config_from_env() -> dict[str, Any]:
    """The DeepSpeed config `accelerate launch` passes in its environment (the config file it
    names, or the accelerate config's zero_stage and offload devices), before any model loads."""
    import json
    from pathlib import Path

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        try:
            return dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise ConfigError(
                [Problem(key="deepspeed_config_file", message=f"cannot read {path}: {error}")]
            ) from None
    env = os.environ.get
    return {
        "zero_optimization": {
            "stage": int(env("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2),
            "offload_optimizer": {
                "device": env("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
            },
            "offload_param": {"device": env("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")},
        }
    }


def check_zero_plugin(config: dict[str, Any]) -> None:
    """ConfigError for DeepSpeed config values sdtrain does not support: the stage, offload,
    bf16/fp16 modes, and optimizer/scheduler sections of its own."""
    zero = config.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):  # the legacy `"zero_optimization": true` (stage 1)
        zero = {"stage": 1 if zero else 0}
    stage = int(zero.get("stage", 0) or 0)
    problems = []
    if zero.get("cpu_offload"):  # the deprecated spelling of offload_optimizer: cpu
        zero = {**zero, "offload_optimizer": {"device": "cpu"}}
    if stage not in (1, 2):
        problems.append(
            Problem(
                key="deepspeed_config.zero_stage",
                message=f"ZeRO stage {stage} is not supported: "
                + (
                    "stage 3 shards the parameters, and exports, samples and EMA read whole weights"
                    if stage == 3
                    else "stage 0 shards nothing"
                ),
                hint="set zero_stage to 2 (or 1) in the accelerate config",
            )
        )
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if str(device).lower() not in ("none", "null"):
            problems.append(
                Problem(
                    key=f"deepspeed_config.{part}_device",
                    message=f"{part} to {device} has not been verified with sdtrain",
                    hint=f"set {part}_device to none in the accelerate config",
                )
            )
    for precision in ("bf16", "fp16"):
        if str((config.get(precision) or {}).get("enabled", False)).lower() == "true":
            problems.append(
                Problem(
                    key=f"deepspeed_config.{precision}.enabled",
                    message=f"DeepSpeed's {precision} mode keeps the model itself in half "
                    "precision; sdtrain trains under DeepSpeed in fp32",
                    hint=f"set {precision}.enabled to false in the DeepSpeed config",
                )
            )
    for part in ("optimizer", "scheduler"):
        if part in config:
            problems.append(
                Problem(
                    key=f"deepspeed_config.{part}",
                    message=f"the DeepSpeed config's {part} section would replace the one "
                    "sdtrain builds from [optimizer]",
                    hint=f"remove the {part} section and set it in the run TOML's [optimizer]",
                )
            )
    if problems:
        raise ConfigError(problems)


def configure_zero(
    plugin: Any, micro_batch: int, accumulation: int, processes: int, max_grad_norm: float
) -> None:
    """Fill the DeepSpeed config from sdtrain's settings before accelerate builds the engine."""
    config = plugin.deepspeed_config
    check_zero_plugin(config)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * processes
    config["gradient_clipping"] = float(max_grad_norm)
    config["zero_allow_untested_optimizer"] = True  # element-wise torch optimizers (checked)


class ZeroTraining:
    """The DeepSpeed engine's backward, step and the optimizer state in sdtrain's layout."""

    def __init__(self, engine: Any) -> None:
        import torch.distributed as dist

        self.engine = engine
        self.zero = engine.optimizer  # DeepSpeedZeroOptimizer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if not getattr(self.zero, "compute_grad_norm", True):
            raise TrainingError(
                "DeepSpeed's compute_grad_norm is off, so non-finite gradients would be applied",
                hint="remove compute_grad_norm from the DeepSpeed config",
            )
        if getattr(self.zero, "cpu_offload", False):
            raise TrainingError(
                "DeepSpeed offloads the optimizer, which has not been verified with sdtrain",
                hint="remove the offload settings (cpu_offload, offload_optimizer) from the "
                "DeepSpeed config",
            )
        if getattr(self.zero, "round_robin_gradients", False):
            raise TrainingError(
                "DeepSpeed's round_robin_gradients reorders parameters inside a group",
                hint="remove round_robin_gradients from the DeepSpeed config",
            )
        owned = sum(part.numel() for part in self.zero.single_partition_of_fp32_groups)
        total = sum(p.numel() for group in self.zero.bit16_groups for p in group)
        logger.info(
            "DeepSpeed ZeRO stage %d: process %d of %d keeps the optimizer state of %.1f M of "
            "%.1f M weights",
            int(self.engine.zero_optimization_stage()),
            self.rank,
            self.world,
            owned / 1e6,
            total / 1e6,
        )

    # ----------------------------------------------------------------- steps
    def backward(self, loss: torch.Tensor, ends_window: bool, finite: bool) -> None:
        """Backward of one micro-batch (already divided by the accumulation count); off the
        window's end DeepSpeed only counts the micro-step."""
        if not finite:  # every gradient becomes NaN: DeepSpeed's overflow check skips the step
            loss = loss * float("nan")
        self.engine.set_gradient_accumulation_boundary(ends_window)
        self.engine.backward(loss, scale_wrt_gas=False)
        if not ends_window:
            self.engine.step()

    def step(self) -> bool:
        """The update at the window's end: False when DeepSpeed skipped it (non-finite)."""
        self.engine.step()
        return not bool(self.zero.overflow)

    # ----------------------------------------------------------------- state
    def _layout(self, group: int) -> tuple[Any, int, list[tuple[Any, int]]]:
        """(this process's fp32 slice, its first element in the group's flat order,
        [(parameter, its first element in the flat order)])."""
        flat = self.zero.bit16_groups_flat[group]
        part = self.zero.single_partition_of_fp32_groups[group]
        size = flat.element_size()
        params = [
            (p, (p.data_ptr() - flat.data_ptr()) // size) for p in self.zero.bit16_groups[group]
        ]
        return part, self.rank * part.numel(), params

    @staticmethod
    def _overlap(offset: int, numel: int, start: int, size: int) -> tuple[int, int] | None:
        lo, hi = max(offset, start), min(offset + numel, start + size)
        return (lo, hi) if lo < hi else None

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state dict in the layout of a plain run over the same parameters
        (collective: every process calls it; only the main process's result is complete)."""
        import torch
        import torch.distributed as dist

        state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for i, group in enumerate(optimizer.param_groups):
            part, start, params = self._layout(i)
            flat_state = optimizer.state.get(part, {})
            ids = []
            for p, offset in params:
                entry: dict[str, Any] = {}
                for key, value in flat_state.items():
                    if torch.is_tensor(value) and value.shape == part.shape:
                        full = torch.zeros(p.numel(), dtype=value.dtype, device=value.device)
                        span = self._overlap(offset, p.numel(), start, part.numel())
                        if span is not None:
                            lo, hi = span
                            full[lo - offset : hi - offset] = value[lo - start : hi - start]
                        bits = full.view(_int_of(full.dtype))
                        dist.reduce(bits, dst=0, op=dist.ReduceOp.SUM)
                        entry[key] = full.view(p.shape).cpu() if self.rank == 0 else None
                    elif torch.is_tensor(value) and value.dim() == 0:
                        entry[key] = value.detach().clone()
                    elif torch.is_tensor(value):
                        raise TrainingError(
                            f"optimizer state {key!r} has shape {tuple(value.shape)}, not the "
                            "flat slice's: sdtrain cannot map it back to weights",
                            hint="use AdamW under DeepSpeed",
                        )
                    else:
                        entry[key] = value
                if entry:
                    state[index] = entry
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, optimizer: Any, saved: dict[str, Any]) -> None:
        """Copy this process's slices of a plain-layout optimizer state into place, and rebuild
        the fp32 master slices from the (already restored) weights."""
        import torch

        if len(saved["param_groups"]) != len(optimizer.param_groups):
            raise TrainingError(
                f"the state has {len(saved['param_groups'])} optimizer groups, this run "
                f"{len(optimizer.param_groups)}",
                hint="resume with the settings the state was made with",
            )
        states = {int(k): v for k, v in saved["state"].items()}
        for i, group in enumerate(optimizer.param_groups):
            part, start, params = self._layout(i)
            ids = saved["param_groups"][i]["params"]
            if len(ids) != len(params):
                raise TrainingError(
                    f"optimizer group {i} has {len(ids)} weights in the state, {len(params)} here",
                    hint="resume with the settings the state was made with",
                )
            group.update({k: v for k, v in saved["param_groups"][i].items() if k != "params"})
            flat_state = optimizer.state[part]
            scalars: dict[str, Any] = {}
            for (p, offset), pid in zip(params, ids, strict=True):
                entry = states.get(int(pid), {})
                for key, value in entry.items():
                    if torch.is_tensor(value) and value.shape == p.shape and p.dim() > 0:
                        if key not in flat_state or flat_state[key].shape != part.shape:
                            flat_state[key] = torch.zeros_like(part)
                        span = self._overlap(offset, p.numel(), start, part.numel())
                        if span is not None:
                            lo, hi = span
                            target = flat_state[key][lo - start : hi - start]
                            target.copy_(value.reshape(-1)[lo - offset : hi - offset])
                    elif key in scalars and not _same(scalars[key], value):
                        raise TrainingError(
                            f"optimizer state {key!r} differs between the weights of group {i} "
                            f"({scalars[key]} and {value}); ZeRO keeps one value per group",
                            hint="resume this state without DeepSpeed",
                        )
                    else:
                        scalars[key] = value
                        is_tensor = torch.is_tensor(value)
                        flat_state[key] = value.detach().clone() if is_tensor else value
            with torch.no_grad():
                part.copy_(self.zero.parallel_partitioned_bit16_groups[i][self.rank])


def _int_of(dtype: Any) -> Any:
    """The integer dtype of `dtype`'s width (a bit-exact sum when one process owns each element)."""
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        torch.empty((), dtype=dtype).element_size()
    ]


def _same(a: Any, b: Any) -> bool:
    import torch

    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return bool(a == b)
