"""load_bundle: [model] section -> ModelBundle (single file, diffusers folder, hub id, builtin:)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdtrain.config.sections import ModelSection
from sdtrain.errors import ConfigError, ModelLoadError, Problem
from sdtrain.models.attention import apply_attention
from sdtrain.models.bundle import ModelBundle, ModelSource, VaeReady
from sdtrain.models.checkpoint_file import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES
from sdtrain.models.frozen_half import HALF
from sdtrain.models.pages import small_pages

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)


def source_kind(spec: str) -> str:
    """builtin / single_file / diffusers / hub for a pretrained_model_name_or_path value."""
    from sdtrain.models.builtin import is_builtin
    from sdtrain.models.hub import looks_like_hub_id

    if is_builtin(spec):
        return "builtin"
    path = Path(spec).expanduser()
    if path.is_file():
        return "single_file"
    if path.is_dir():
        return "diffusers"
    if looks_like_hub_id(spec):
        return "hub"
    suffix = path.suffix.lower()
    what = "model file" if suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES else "model"
    raise ModelLoadError(
        f"{what} {spec!r} not found",
        hint="pass an existing .safetensors/.ckpt file, a diffusers folder, a hub id (owner/name) "
        "or builtin:tiny-sd1",
    )


def _prediction_flag(v_parameterization: bool | None) -> str | None:
    if v_parameterization is None:
        return None
    return "v_prediction" if v_parameterization else "epsilon"


def _load_base(
    section: ModelSection, spec: str, dtypes: dict[str, torch.dtype], vae_ready: VaeReady
) -> ModelBundle:
    kind = source_kind(spec)
    source = ModelSource(spec=spec, kind=kind)  # type: ignore[arg-type]
    prediction = _prediction_flag(section.v_parameterization)
    if kind == "builtin":
        from sdtrain.models.builtin import get_builtin, load_builtin

        bundle = load_builtin(
            spec,
            tokenizer_cache_dir=section.tokenizer_cache_dir,
            prediction_type=prediction,
            vae_ready=vae_ready,
        )
        from sdtrain.models.diffusers_folder import check_v2_flag

        check_v2_flag(section.v2, get_builtin(spec).family, spec)
        return bundle
    if kind == "single_file":
        from sdtrain.models.single_file import load_single_file

        return load_single_file(
            Path(spec).expanduser().resolve(),
            source,
            v2=section.v2,
            v_parameterization=section.v_parameterization,
            tokenizer_cache_dir=section.tokenizer_cache_dir,
            dtypes=dtypes,
            vae_ready=vae_ready,
        )
    from sdtrain.models.diffusers_folder import load_diffusers_folder

    if kind == "hub":
        from sdtrain.models.hub import resolve_hub

        folder = resolve_hub(spec)
    else:
        folder = Path(spec).expanduser().resolve()
    return load_diffusers_folder(
        folder,
        source,
        tokenizer_cache_dir=section.tokenizer_cache_dir,
        prediction_type=prediction,  # type: ignore[arg-type]
        v2=section.v2,
        dtypes=dtypes,
        vae_ready=vae_ready,
    )


def import_model_stack() -> None:
    """Import what loading a model and training adapters on it import on the way: diffusers'
    U-Net and VAE classes, its hooks (which import peft, and peft transformers), transformers'
    CLIP text model and accelerate. A caller runs this inside `import_gc.quiet_gc()` so the
    imports happen in one block without cyclic collections; nothing is loaded."""
    import accelerate  # noqa: F401
    import diffusers
    import diffusers.hooks  # noqa: F401  (ModelMixin imports it while loading)
    import peft  # noqa: F401
    import transformers

    for owner, name in (
        (diffusers, "UNet2DConditionModel"),
        (diffusers, "AutoencoderKL"),
        (transformers, "CLIPTextModel"),
    ):
        getattr(owner, name)  # lazy modules: the attribute imports the class's module


def move_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast in place, skipping no-ops (plain nn.Module.to: diffusers' own `to` warns on
    every dtype cast about an empty fp32-module list)."""
    first = next(module.parameters(), None)
    if first is not None and first.device == device and first.dtype == dtype:
        return
    torch.nn.Module.to(module, device=device, dtype=dtype)


def load_bundle(
    section: ModelSection,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_half: bool = False,
    part_dtypes: dict[str, torch.dtype] | None = None,
    with_vae: Callable[[AutoencoderKL], None] | None = None,
) -> ModelBundle:
    """Load the base model of `section` onto `device` in `dtype`, offline.

    The VAE stays float32 with `no_half_vae`. `vae` replaces the model's VAE; `attention`
    selects SDPA (default), xformers (CUDA + the `xformers` extra) or memory-efficient SDPA.
    Models are returned in eval mode; freezing and training modes are the methods' business.
    keep_half: a UNet / text encoder whose file is float16 or bf16 stays in that dtype (marked
    `sdtrain_frozen_half`; engine/halfweights.py computes with it in fp32, bit-identically).
    part_dtypes: "unet" / "text_encoder" / "vae" loaded straight in this dtype instead (frozen
    parts the training casts to it anyway: no full-precision copy exists on the way).
    with_vae: called with the VAE, ready to encode (replaced, cast, moved, its attention set),
    before the UNet and text encoder are loaded: latent caching then peaks with the VAE alone
    in memory, and whatever it frees is reused by the larger parts.
    """
    spec = section.pretrained_model_name_or_path
    if not spec:
        raise ConfigError(
            [
                Problem(
                    key="model.pretrained_model_name_or_path",
                    message="no base model given",
                    hint="set [model] pretrained_model_name_or_path (e.g. builtin:tiny-sd1 to try)",
                )
            ]
        )
    device = torch.device(device)
    vae_dtype = torch.float32 if section.no_half_vae else dtype
    weights = None if keep_half else dtype  # None: the file's own dtype
    part_dtypes = part_dtypes or {}
    dtypes = {"unet": weights, "text_encoder": weights, "vae": vae_dtype, **part_dtypes}

    def vae_ready(vae: AutoencoderKL) -> AutoencoderKL:
        if section.vae:
            from sdtrain.models.vae import load_vae

            log.info("replacing the VAE with %s", section.vae)
            vae = load_vae(section.vae, vae)
        move_module(vae, device, dtypes["vae"])
        apply_attention([vae], section.attention, device)
        if with_vae is not None:
            with_vae(vae)
        return vae

    with small_pages():  # models/pages.py: the load would wait for huge-page compaction
        bundle = _load_base(section, spec, dtypes, vae_ready)
    if section.vae:
        bundle.source.vae_spec = section.vae
    for name, module in (("unet", bundle.unet), ("text_encoder", bundle.text_encoder)):
        first = next(module.parameters(), None)
        half = keep_half and first is not None and first.dtype in HALF and name not in part_dtypes
        move_module(module, device, first.dtype if half else dtypes[name] or dtype)
        module.sdtrain_frozen_half = half  # type: ignore[assignment]
    apply_attention([bundle.unet], section.attention, device)
    return bundle
