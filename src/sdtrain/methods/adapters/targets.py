"""Which layers of a U-Net / text encoder get a LoRA module, and their kohya names (§7.1, §7.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Root = Literal["unet", "text_encoder"]
Kind = Literal["linear", "conv1x1", "conv"]

# Parents are picked by class name, like the reference; every Linear/Conv2d below them is wrapped.
TEXT_ENCODER_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
UNET_PARENTS = ("Transformer2DModel",)
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # LoRA-C3Lier
PREFIXES: dict[Root, str] = {"unet": "lora_unet", "text_encoder": "lora_te"}


@dataclass(frozen=True)
class Target:
    """One wrapped layer: where it lives, its kohya name and its shape class.

    kind: "linear" (Linear), "conv1x1" (1x1 Conv2d; rank follows network_dim like Linear) or
    "conv" (any other kernel, e.g. 3x3; rank follows conv_dim).
    """

    root: Root
    path: str  # module path inside the root model, e.g. "down_blocks.0.attentions.0.proj_in"
    name: str  # kohya name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    kind: Kind
    in_features: int
    out_features: int


def text_model_prefix(text_encoder: torch.nn.Module) -> str:
    """ "text_model." when the CLIP model is flattened (transformers >= 5.6), else "".

    Kohya names always read `lora_te_text_model_encoder_...`, so the flattened layout gets the
    missing `text_model.` back in names (and loses it again when reading names).
    """
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def kohya_name(root: Root, path: str, text_prefix: str = "") -> str:
    """`lora_unet_<path>` / `lora_te_<text_prefix><path>` with every "." replaced by "_"."""
    full = (text_prefix + path) if root == "text_encoder" else path
    return f"{PREFIXES[root]}_{full.replace('.', '_')}"


def _classify(module: torch.nn.Module) -> tuple[Kind, int, int] | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        kind: Kind = "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
        return kind, module.in_channels, module.out_channels
    return None


def find_targets(model: torch.nn.Module, root: Root, with_conv: bool = False) -> list[Target]:
    """Every layer the reference would wrap, in module order (works on `meta` models too).

    with_conv adds the ResnetBlock2D / Downsample2D / Upsample2D parents of the U-Net (C3Lier:
    conv1, conv2, time_emb_proj, conv_shortcut, down/upsampler convs). Layers already wrapped by
    peft count as their base layer; peft's own lora_A/lora_B are never targets.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if root == "text_encoder":
        parents, prefix = TEXT_ENCODER_PARENTS, text_model_prefix(model)
    else:
        parents, prefix = UNET_PARENTS + (UNET_CONV_PARENTS if with_conv else ()), ""
    found: dict[str, Target] = {}
    for parent_name, parent in model.named_modules():
        if type(parent).__name__ not in parents:
            continue
        wrapped: list[str] = []
        for child_name, child in parent.named_modules():
            if not child_name or any(child_name.startswith(w + ".") for w in wrapped):
                continue
            layer = child
            if isinstance(child, BaseTunerLayer):
                wrapped.append(child_name)
                layer = child.get_base_layer()
            shape = _classify(layer)
            if shape is None:
                continue
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if path not in found:
                kind, n_in, n_out = shape
                found[path] = Target(root, path, kohya_name(root, path, prefix), kind, n_in, n_out)
    return list(found.values())


def name_map(
    unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None
) -> dict[str, Target]:
    """kohya name -> Target for every layer a LoRA file may address (3x3 parents included)."""
    targets: list[Target] = []
    if text_encoder is not None:
        targets += find_targets(text_encoder, "text_encoder")
    if unet is not None:
        targets += find_targets(unet, "unet", with_conv=True)
    return {t.name: t for t in targets}
