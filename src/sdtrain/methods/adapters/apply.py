"""Use a kohya LoRA file on a model bundle: as a live peft adapter at a weight, or merged into W."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.errors import ModelLoadError
from sdtrain.methods.adapters.kohya import (
    ALPHA,
    DOWN,
    UP,
    LoadReport,
    file_ranks,
    fit,
    load_into,
    read,
)
from sdtrain.methods.adapters.lora import LoraNetwork, delta_weight
from sdtrain.methods.adapters.spec import LoraSpec
from sdtrain.methods.adapters.targets import name_map

if TYPE_CHECKING:
    import torch

    from sdtrain.models.bundle import ModelBundle

log = logging.getLogger(__name__)


def apply_lora_file(
    bundle: ModelBundle, path: str | Path, weight: float = 1.0, adapter_name: str = "lora"
) -> LoadReport:
    """Inject the file's modules (its own ranks/alphas, 3x3 convs included) as a frozen adapter.

    The live scale of each module is weight * alpha / rank. Every adapter already on the models
    stays active, so several files stack (call once per file with distinct adapter names).
    Raises ModelLoadError when nothing in the file matches the bundle.
    """
    tensors, _ = read(path)
    ranks = file_ranks(tensors)
    spec = LoraSpec(
        module_ranks=ranks,
        apply_unet=any(n.startswith("lora_unet_") for n in ranks),
        apply_text_encoder=any(n.startswith("lora_te_") for n in ranks),
    )
    roots = bundle.family.adapter_roots(bundle)
    network = LoraNetwork.create(roots["unet"], roots["text_encoder"], spec, adapter=adapter_name)
    if not network.modules:
        raise ModelLoadError(
            f"{path}: no LoRA module of this file matches the model",
            "is it an SD1/SD2 kohya LoRA for this model family?",
        )
    report = load_into(network, tensors, path, multiplier=weight)
    network.train(False)
    for param in network.parameters():
        param.requires_grad_(False)
    for model in roots.values():
        _activate_all(model)
    report.log(f"LoRA {Path(path).name} (weight {weight})")
    return report


def _activate_all(model: torch.nn.Module) -> None:
    """Make every adapter present in each peft layer active (diffusers' add_adapter keeps one)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            module.set_adapter(list(module.lora_A.keys()), inference_mode=True)


def merge_lora_into(bundle: ModelBundle, path: str | Path, weight: float = 1.0) -> LoadReport:
    """W <- W + weight * ΔW * alpha/rank for each module of the file (the merge tool's math, §7.8).

    Works on plain and on peft-wrapped layers (their base weight). Keys that match no layer are
    reported, not fatal, like the reference.
    """
    import torch

    tensors, _ = read(path)
    roots = bundle.family.adapter_roots(bundle)
    targets = name_map(roots["unet"], roots["text_encoder"])
    report = LoadReport()
    used: set[str] = set()
    with torch.no_grad():
        for name, (rank, alpha) in file_ranks(tensors).items():
            target = targets.get(name)
            if target is None or f"{name}.{UP}" not in tensors:
                continue
            model = roots[target.root]
            layer = model.get_submodule(target.path)
            if hasattr(layer, "get_base_layer"):
                layer = layer.get_base_layer()
            down = tensors[f"{name}.{DOWN}"].float()
            up = tensors[f"{name}.{UP}"].float()
            delta = fit(delta_weight(down, up), layer.weight, name, path)
            merged = layer.weight.float() + delta.to(layer.weight.device) * (weight * alpha / rank)
            layer.weight.copy_(merged.to(layer.weight.dtype))
            used.update(f"{name}.{s}" for s in (DOWN, UP, ALPHA))
            report.loaded.append(name)
    report.unexpected = [k for k in tensors if k not in used]
    if not report.loaded:
        raise ModelLoadError(
            f"{path}: no LoRA module of this file matches the model",
            "is it an SD1/SD2 kohya LoRA for this model family?",
        )
    report.log(f"merged {Path(path).name} (weight {weight})")
    return report
