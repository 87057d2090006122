"""Precision policy: frozen weights in the mixed-precision dtype, trainable parameters in fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdtrain.config.sections import TrainingSection

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    """Dtypes for one run. `weight` = frozen weights; `trainable` = what the optimizer updates."""

    mixed_precision: str  # "no" | "fp16" | "bf16"
    weight: torch.dtype
    trainable: torch.dtype
    vae: torch.dtype

    @property
    def autocast(self) -> bool:
        return self.mixed_precision != "no"


def precision_for(section: TrainingSection, no_half_vae: bool, device_type: str) -> Precision:
    """The precision policy of a run. Refused on a CPU: fp16 (CPUs have no fast fp16 path), and
    bf16 where torch has no bf16 kernels for the CPU (engine/cpu_bf16.py)."""
    import torch

    from sdtrain.errors import ConfigError, Problem

    mode = section.mixed_precision
    if mode == "fp16" and device_type == "cpu":
        raise ConfigError(
            [
                Problem(
                    key="training.mixed_precision",
                    value="fp16",
                    has_value=True,
                    message="fp16 training needs a GPU",
                    hint='use mixed_precision = "bf16" on a CPU, or "no"',
                )
            ]
        )
    if mode == "bf16" and device_type == "cpu":
        from sdtrain.engine.cpu_bf16 import refuse_without_kernels

        refuse_without_kernels("training.mixed_precision")
    weight = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    full = section.full_fp16 or section.full_bf16
    return Precision(
        mixed_precision=mode,
        weight=weight,
        trainable=weight if full else torch.float32,
        vae=torch.float32 if no_half_vae or mode == "no" else weight,
    )


def apply_precision(modules: list[torch.nn.Module], precision: Precision) -> None:
    """Cast frozen parameters to the weight dtype and trainable ones to the trainable dtype.

    Without autocast, frozen float16/bf16 parameters of a module loaded with `keep_half`
    (`sdtrain_frozen_half`) stay half: engine/halfweights.py up-casts them per layer. Buffers of
    submodules marked `sdtrain_fixed_dtype` (models/half_embedding.py) keep their dtype.
    """
    import torch

    for module in modules:
        keep = not precision.autocast and getattr(module, "sdtrain_frozen_half", False)
        for param in module.parameters():
            target = precision.trainable if param.requires_grad else precision.weight
            if keep and not param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                continue
            if param.dtype != target:
                param.data = param.data.to(target)
        fixed = {
            id(buf)
            for sub in module.modules()
            if getattr(sub, "sdtrain_fixed_dtype", False)
            for buf in sub.buffers(recurse=False)
        }
        for name, buf in module.named_buffers():
            if (
                buf.is_floating_point()
                and buf.dtype != precision.weight
                and "alpha" not in name
                and id(buf) not in fixed
            ):
                buf.data = buf.data.to(precision.weight)


def redundant_input_casts(
    modules: list[torch.nn.Module], precision: Precision
) -> list[torch.nn.Module]:
    """The adapter (peft) layers whose input cast is redundant in the autocast training forward.

    peft casts a LoRA layer's input to the adapter weight's dtype (fp32) before the adapter's
    matmul, and autocast casts it straight back to bf16/fp16 for that matmul: two copies of a
    full activation per adapted layer (and two more in backward) for bit-identical results.
    Measured: 4-7% of a bf16 step on the small benchmark model. Empty without autocast or when
    the adapters have the weights' dtype (full_bf16 / full_fp16).
    """
    if not precision.autocast or precision.trainable == precision.weight:
        return []
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def input_casts_off(layers: list[torch.nn.Module]) -> Iterator[None]:
    """Switch peft's input cast off in `layers` for the block (peft's own flag; restored after).

    Only for code running under autocast: outside it, fp32 adapters would get bf16 inputs.
    """
    saved = [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.cast_input_dtype_enabled = value
