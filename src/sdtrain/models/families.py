"""Family registry (sd1, sd2): static facts, bundled config folders and detection from weights."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from sdtrain.errors import ConfigError, Problem
from sdtrain.models.family import SDFamily

Prediction = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class FamilySpec:
    """What a family fixes at any size: tokenizer padding and single-file text-encoder layout."""

    name: Literal["sd1", "sd2"]
    pad_token: str  # "<|endoftext|>" (sd1) or "!" (sd2)
    te_prefix: str  # LDM single-file prefix of the text encoder
    te_hidden_act: str  # what the text encoder uses (also how diffusers folders are told apart)
    default_prediction: Prediction
    # bundled diffusers config folder per prediction type for the full-size architecture
    config_names: dict[str, str]


FAMILIES: dict[str, FamilySpec] = {
    "sd1": FamilySpec(
        name="sd1",
        pad_token="<|endoftext|>",
        te_prefix="cond_stage_model.transformer.",
        te_hidden_act="quick_gelu",
        default_prediction="epsilon",
        config_names={"epsilon": "sd1", "v_prediction": "sd1"},
    ),
    "sd2": FamilySpec(
        name="sd2",
        pad_token="!",
        te_prefix="cond_stage_model.model.",
        te_hidden_act="gelu",
        default_prediction="v_prediction",
        config_names={"epsilon": "sd2-512", "v_prediction": "sd2-768-v"},
    ),
}

# Prefixes of the three components in an original (LDM) single file.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def family_spec(name: str) -> FamilySpec:
    """The FamilySpec for `name`; unknown names raise ConfigError listing the valid ones."""
    if name not in FAMILIES:
        raise ConfigError(
            [
                Problem(
                    key="model.family",
                    message=f"unknown model family {name!r}; valid: {', '.join(sorted(FAMILIES))}",
                )
            ]
        )
    return FAMILIES[name]


def config_dir(name: str) -> Path:
    """Path of a bundled diffusers config folder (sd1, sd2-512, sd2-768-v, tiny-sd1, tiny-sd2)."""
    path = Path(str(resources.files("sdtrain.models") / "assets" / "configs" / name))
    if not (path / "model_index.json").is_file():
        raise ConfigError([Problem(key="model", message=f"no bundled model config named {name!r}")])
    return path


def bundled_config_names() -> list[str]:
    """Names of every bundled config folder."""
    root = Path(str(resources.files("sdtrain.models") / "assets" / "configs"))
    return sorted(p.name for p in root.iterdir() if (p / "model_index.json").is_file())


def make_family_info(
    name: str,
    prediction_type: Prediction,
    *,
    sample_size: int,
    vae_scale: int,
    latent_scale: float,
    text_width: int,
) -> SDFamily:
    """The family object from a loaded model's facts (resolution = sample size x VAE scale)."""
    family_spec(name)
    return SDFamily(
        name=name,  # type: ignore[arg-type]
        prediction_type=prediction_type,
        resolution=sample_size * vae_scale,
        latent_scale=latent_scale,
        text_width=text_width,
    )


def family_from_keys(keys: set[str] | list[str]) -> str | None:
    """sd1 / sd2 from the text-encoder layout of an original single file (None: no encoder)."""
    keyset = keys if isinstance(keys, set) else set(keys)
    for spec in FAMILIES.values():
        if any(k.startswith(spec.te_prefix) for k in keyset):
            return spec.name
    return None


def family_from_hidden_act(hidden_act: str) -> str | None:
    """sd1 / sd2 from a diffusers text-encoder config's activation (quick_gelu / gelu)."""
    for spec in FAMILIES.values():
        if spec.te_hidden_act == hidden_act:
            return spec.name
    return None


def prediction_from_metadata(metadata: dict[str, str]) -> Prediction | None:
    """v / epsilon from embedded modelspec (or sd-scripts ss_*) metadata; None if silent."""
    value = metadata.get("modelspec.prediction_type", "").strip().lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction"
    if arch.startswith(("stable-diffusion-v2-512", "stable-diffusion-v1")):
        return "epsilon"
    base = metadata.get("ss_base_model_version", "")
    if base in ("sd_v1", "sd_v2"):
        return "epsilon"
    if base in ("sd_v1_v", "sd_v2_v"):
        return "v_prediction"
    return None


def prediction_from_name(filename: str) -> Prediction | None:
    """The "768" heuristic for SD2 files: names such as v2-1_768-ema-pruned are 768-v models,
    v2-1_512 / *-base files are epsilon models. None when the name says neither."""
    lower = filename.lower()
    if "768" in lower:
        return "v_prediction"
    if "512" in lower or "base" in lower:
        return "epsilon"
    return None
