"""The model bundle every method trains on; `bundle.family` (models/family.py) knows its parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sdtrain.models.family import ModelFamily, SDFamily

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdtrain.models.xti import XtiRows

# The SD1/SD2 family class under its former name (models/family.py holds the families).
FamilyInfo = SDFamily

# Called by a loader with the VAE, loaded first, before the UNet and text encoder exist; what it
# returns becomes the bundle's VAE (models/load.py: latents are cached while only the VAE is in
# memory).
VaeReady = Callable[["AutoencoderKL"], "AutoencoderKL"]


@dataclass
class ModelSource:
    """Where the bundle came from (used in metadata, hashes and saving next to the source)."""

    spec: str  # what the user wrote
    kind: Literal["single_file", "diffusers", "hub", "builtin"]
    path: str | None = None  # resolved local file/folder, if any
    vae_spec: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # embedded metadata of a single file


@dataclass
class EmbeddingTokens:
    """Textual-inversion tokens added to a bundle: each token's strings (T, T1, ...), so prompts
    can expand `T` to "T T1 ...", and the rows of the XTI token, if one was added."""

    names: dict[str, list[str]] = field(default_factory=dict)
    xti: XtiRows | None = None


@dataclass
class ModelBundle:
    """UNet, VAE, text encoder, tokenizer and training noise scheduler of one SD model.

    Code outside models/ reaches the text encoders and tokenizers through `family` (it names
    them: SDXL-shaped families add more)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    family: ModelFamily
    source: ModelSource
    embeddings: EmbeddingTokens = field(default_factory=EmbeddingTokens)
