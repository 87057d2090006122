"""Table-driven diffusers -> original (LDM) single-file key conversion for UNet, VAE, text encoders.

The tables follow the reference's layout (§12.2) but are generated from the model config, so the
same code serves full-size SD and the tiny test models (any number of blocks / layers per block).
Loading the other way round is diffusers' own `from_single_file` conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: HF CLIP names, with `text_model.`
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP names

Renames = tuple[tuple[str, str], ...]
UNET_RESNET: Renames = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
VAE_RESNET: Renames = (("conv_shortcut.", "nin_shortcut."),)
VAE_ATTENTION: Renames = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
NONE: Renames = ()


class KeyTable:
    """Module-prefix table: diffusers prefix -> (LDM prefix, renames of the remaining key)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, Renames]] = {}

    def add(self, diffusers: str, ldm: str, renames: Renames = NONE) -> None:
        self.rows[diffusers] = (ldm, renames)

    def ldm_name(self, key: str) -> str:
        """The LDM name of diffusers `key`; KeyError for keys the table does not know."""
        parts = key.split(".")
        for depth in range(min(len(parts) - 1, 6), 0, -1):
            prefix = ".".join(parts[:depth])
            if prefix in self.rows:
                ldm, renames = self.rows[prefix]
                rest = ".".join(parts[depth:])
                for old, new in renames:
                    if rest.startswith(old):
                        rest = new + rest[len(old) :]
                        break
                return f"{ldm}.{rest}"
        raise KeyError(key)


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type or "Attn" in block_type


def unet_table(config: Mapping[str, Any]) -> KeyTable:
    """Diffusers UNet2DConditionModel -> LDM `model.diffusion_model.*` (without the prefix)."""
    table = KeyTable()
    per = int(config["layers_per_block"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    table.add("time_embedding.linear_1", "time_embed.0")
    table.add("time_embedding.linear_2", "time_embed.2")
    table.add("conv_in", "input_blocks.0.0")
    table.add("conv_norm_out", "out.0")
    table.add("conv_out", "out.2")
    for i in range(len(down)):
        for j in range(per):
            index = (per + 1) * i + j + 1
            table.add(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", UNET_RESNET)
            table.add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1")
        table.add(
            f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(per + 1) * (i + 1)}.0.op"
        )
    table.add("mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    table.add("mid_block.attentions.0", "middle_block.1")
    table.add("mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    for i, block_type in enumerate(up):
        for j in range(per + 1):
            index = (per + 1) * i + j
            table.add(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", UNET_RESNET)
            table.add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1")
        slot = 2 if _has_attention(block_type) else 1
        table.add(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{(per + 1) * i + per}.{slot}")
    return table


def vae_table(config: Mapping[str, Any]) -> KeyTable:
    """Diffusers AutoencoderKL -> LDM `first_stage_model.*` (without the prefix)."""
    table = KeyTable()
    blocks = len(config["block_out_channels"])
    per = int(config["layers_per_block"])
    for side in ("encoder", "decoder"):
        table.add(f"{side}.conv_in", f"{side}.conv_in")
        table.add(f"{side}.conv_out", f"{side}.conv_out")
        table.add(f"{side}.conv_norm_out", f"{side}.norm_out")
        for k in range(2):
            table.add(f"{side}.mid_block.resnets.{k}", f"{side}.mid.block_{k + 1}", VAE_RESNET)
        table.add(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION)
    for i in range(blocks):
        for j in range(per):
            table.add(
                f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET
            )
        table.add(
            f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"
        )
        ldm_i = blocks - 1 - i
        for j in range(per + 1):
            table.add(
                f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}", VAE_RESNET
            )
        table.add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv")
    table.add("quant_conv", "quant_conv")
    table.add("post_quant_conv", "post_quant_conv")
    return table


def _convert(
    state: Mapping[str, torch.Tensor], table: KeyTable, what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        try:
            out[table.ldm_name(key)] = tensor
        except KeyError:
            raise KeyError(
                f"{what} weight {key!r} has no original-layout name (merge or remove adapters "
                "before saving a full checkpoint)"
            ) from None
    return out


def unet_to_ldm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict -> LDM keys with `model.diffusion_model.`.

    Attention internals keep their names; SD2's linear proj_in/proj_out stay 2-D (as in the
    original files) and SD1's conv projections stay 4-D, because the shapes follow the config.
    """
    converted = _convert(state, unet_table(config), "UNet")
    return {UNET_PREFIX + key: value for key, value in converted.items()}


def vae_to_ldm(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict -> LDM keys with `first_stage_model.`.

    The mid-block attention q/k/v/proj_out weights become 1x1 convolutions (4-D), as stored by
    the original code.
    """
    converted = _convert(state, vae_table(config), "VAE")
    out = {}
    for key, value in converted.items():
        is_attention = ".mid.attn_1." in key and key.endswith(
            ("q.weight", "k.weight", "v.weight", "proj_out.weight")
        )
        if is_attention and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + key] = value
    return out


def _strip_text_model(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 CLIPTextModel keys lack `text_model.`; older ones have it. Normalise."""
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1 text encoder -> `cond_stage_model.transformer.text_model.*` (HF CLIP names).

    transformers >= 5.6 drops the `text_model.` prefix from CLIPTextModel keys; original files and
    every other tool expect it, so it is added back here. position_ids buffers are not written.
    """
    return {
        f"{CLIP_PREFIX}text_model.{key}": value
        for key, value in _strip_text_model(state).items()
        if not key.endswith("position_ids")
    }


OPENCLIP_LAYER: Renames = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
OPENCLIP_EXTRAS = ("text_projection", "logit_scale")


def openclip_to_ldm(
    state: Mapping[str, torch.Tensor], carry: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """SD2 text encoder (HF CLIP, N layers) -> OpenCLIP `cond_stage_model.model.*` names.

    q/k/v projections are fused into `attn.in_proj_weight/bias`. A real OpenCLIP ViT-H has one
    layer more than the diffusers model (which stops at the penultimate layer), plus
    `text_projection` and `logit_scale`. These are taken from `carry` (the source single file's
    own tensors, keys with the `cond_stage_model.model.` prefix) when given and shape-compatible;
    otherwise they are filled like the reference: resblock N = copy of N-1, text_projection =
    ones (width x width), logit_scale = 1. Every loader (ours, the reference's, diffusers')
    ignores them.
    """
    plain = _strip_text_model(state)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    layers = 0
    for key, value in plain.items():
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".", 1)[1]] = value
        elif key.startswith("encoder.layers."):
            _, _, index, rest = key.split(".", 3)
            layers = max(layers, int(index) + 1)
            base = f"transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                _, proj, kind = rest.split(".")
                fused.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
                continue
            for old, new in OPENCLIP_LAYER:
                if rest.startswith(old):
                    out[base + new + rest[len(old) :]] = value
                    break
            else:
                raise KeyError(f"text encoder weight {key!r} has no OpenCLIP name")
        else:
            raise KeyError(
                f"text encoder weight {key!r} has no OpenCLIP name (merge or remove adapters "
                "before saving a full checkpoint)"
            )
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    out = {OPENCLIP_PREFIX + key: value for key, value in out.items()}
    out.update(_openclip_extras(out, layers, carry or {}))
    return out


def _openclip_extras(
    converted: Mapping[str, torch.Tensor], layers: int, carry: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    last = f"{OPENCLIP_PREFIX}transformer.resblocks.{layers - 1}."
    extra = f"{OPENCLIP_PREFIX}transformer.resblocks.{layers}."
    like = converted[OPENCLIP_PREFIX + "token_embedding.weight"]
    width = like.shape[1]
    copies = {extra + key[len(last) :]: key for key in converted if key.startswith(last)}
    shapes = {new: tuple(converted[old].shape) for new, old in copies.items()}
    shapes[OPENCLIP_PREFIX + "text_projection"] = (width, width)
    shapes[OPENCLIP_PREFIX + "logit_scale"] = ()
    if all(key in carry and tuple(carry[key].shape) == shape for key, shape in shapes.items()):
        return {key: carry[key] for key in shapes}
    # copies, not views: safetensors refuses tensors that share memory
    synth = {new: converted[old].clone() for new, old in copies.items()}
    synth[OPENCLIP_PREFIX + "text_projection"] = torch.ones(
        width, width, dtype=like.dtype, device=like.device
    )
    synth[OPENCLIP_PREFIX + "logit_scale"] = torch.ones([], dtype=like.dtype, device=like.device)
    return synth


def text_to_ldm(
    family: str, state: Mapping[str, torch.Tensor], carry: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Text encoder -> LDM keys for `family` (sd1: CLIP layout, sd2: OpenCLIP layout)."""
    if family == "sd1":
        return clip_to_ldm(state)
    return openclip_to_ldm(state, carry)


def openclip_extra_keys(keys: list[str] | set[str], layers: int) -> set[str]:
    """The SD2 keys a diffusers text encoder does not use (extra layer, projection, logit scale)."""
    extra = f"{OPENCLIP_PREFIX}transformer.resblocks.{layers}."
    found = {key for key in keys if key.startswith(extra)}
    return found | {OPENCLIP_PREFIX + name for name in OPENCLIP_EXTRAS}


def components_to_ldm(
    family: str,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    carry: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One original-layout state dict for the three models (tensors are shared, not copied)."""
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    out.update(text_to_ldm(family, text_encoder.state_dict(), carry))
    return out
