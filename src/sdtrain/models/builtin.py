"""Built-in models: `builtin:tiny-sd1` / `builtin:tiny-sd2` (random weights) and the shipped toys.

The tiny models are SD-shaped (4 latent channels, VAE downscale 8, 77 tokens, the real SD noise
schedule, sd1 / sd2 tokenizers) with tiny widths and seeded random weights: RANDOM WEIGHTS, FOR
SMOKE TESTS ONLY — they produce noise, not images. The toys are small diffusers folders pre-trained
on a toy task, shipped in `models/assets/<name>/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from sdtrain.errors import ConfigError, ModelLoadError, Problem
from sdtrain.models.bundle import ModelBundle, ModelSource, VaeReady
from sdtrain.models.families import config_dir

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_SEED = 0


@dataclass(frozen=True)
class Builtin:
    """One built-in model: a random tiny model from a bundled config, or a shipped toy folder."""

    name: str
    description: str
    family: str
    config: str | None = None  # bundled config folder (random tiny models)
    folder: str | None = None  # diffusers folder under models/assets (toys)


BUILTINS: dict[str, Builtin] = {
    "tiny-sd1": Builtin(
        "tiny-sd1",
        "SD1-shaped tiny model, random weights, smoke tests only",
        "sd1",
        config="tiny-sd1",
    ),
    "tiny-sd2": Builtin(
        "tiny-sd2",
        "SD2-shaped tiny v-prediction model (OpenCLIP-style text encoder), random weights, "
        "smoke tests only",
        "sd2",
        config="tiny-sd2",
    ),
    "toy-sd1": Builtin(
        "toy-sd1", "small SD1-shaped model pre-trained on a toy task", "sd1", folder="toy-sd1"
    ),
    "toy-sd2v": Builtin(
        "toy-sd2v",
        "small SD2-shaped v-prediction model pre-trained on a toy task",
        "sd2",
        folder="toy-sd2v",
    ),
}


def is_builtin(spec: str) -> bool:
    """True for `builtin:<name>` model specs."""
    return spec.startswith(BUILTIN_PREFIX)


def asset_folder(name: str) -> Path:
    """Path of a folder shipped in models/assets (it may not exist)."""
    return Path(str(resources.files("sdtrain.models") / "assets" / name))


def available_builtins() -> list[str]:
    """Names that can be loaded now (toys only when their folder is installed)."""
    names = []
    for item in BUILTINS.values():
        if item.folder is None or (asset_folder(item.folder) / "unet").is_dir():
            names.append(item.name)
    return names


def get_builtin(spec: str) -> Builtin:
    """The Builtin for `builtin:<name>` (or a bare name); unknown names raise ConfigError."""
    name = spec[len(BUILTIN_PREFIX) :] if is_builtin(spec) else spec
    if name not in BUILTINS:
        valid = ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
        raise ConfigError(
            [
                Problem(
                    key="model.pretrained_model_name_or_path",
                    message=f"unknown built-in model {spec!r}; valid: {valid}",
                )
            ]
        )
    return BUILTINS[name]


def build_random_components(
    config_name: str, seed: int = TINY_SEED
) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """UNet, VAE and CLIP text model from a bundled config folder, with seeded random weights.

    The global RNG is left untouched (the seed applies inside a forked RNG state).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = config_dir(config_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
        text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder


def load_builtin(
    spec: str,
    *,
    tokenizer_cache_dir: str | None = None,
    prediction_type: str | None = None,
    vae_ready: VaeReady | None = None,
) -> ModelBundle:
    """Build `builtin:<name>` on the CPU in float32 (load.py moves it and applies overrides).

    `vae_ready`: as for load_diffusers_folder (a random toy is built whole, then it is called)."""
    from sdtrain.models.assemble import assemble_bundle

    item = get_builtin(spec)
    if item.folder is not None:
        folder = asset_folder(item.folder)
        if not (folder / "unet").is_dir():
            raise ModelLoadError(
                f"the built-in model {BUILTIN_PREFIX}{item.name} is not installed "
                f"(no folder {folder})",
                hint=f"use {BUILTIN_PREFIX}tiny-{item.family} for smoke tests or reinstall sdtrain",
            )
        from sdtrain.models.diffusers_folder import load_diffusers_folder

        source = ModelSource(spec=spec, kind="builtin", path=str(folder))
        return load_diffusers_folder(
            folder,
            source,
            tokenizer_cache_dir=tokenizer_cache_dir,
            prediction_type=prediction_type,
            vae_ready=vae_ready,
        )
    assert item.config is not None
    log.info("building %s%s: %s", BUILTIN_PREFIX, item.name, item.description)
    unet, vae, text_encoder = build_random_components(item.config)
    if vae_ready is not None:
        vae = vae_ready(vae)
    folder = config_dir(item.config)
    from diffusers import DDPMScheduler

    scheduler_config = DDPMScheduler.load_config(folder / "scheduler")
    return assemble_bundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        family=item.family,
        prediction_type=prediction_type or scheduler_config["prediction_type"],
        source=ModelSource(spec=spec, kind="builtin", path=None),
        tokenizer_cache_dir=tokenizer_cache_dir,
    )
