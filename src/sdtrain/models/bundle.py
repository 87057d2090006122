"""The model bundle every method trains on, and the facts of its family (sd1 / sd2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdtrain.methods.base import Conditioning
    from sdtrain.models.xti import XtiRows


@dataclass(frozen=True)
class FamilyInfo:
    """What differs between SD families. SDXL will be one more instance, not new code paths."""

    name: Literal["sd1", "sd2"]
    prediction_type: Literal["epsilon", "v_prediction"]
    resolution: int  # native training resolution (512, or 768 for 768-v)
    latent_scale: float  # VAE scaling factor (0.18215 for real SD)
    text_width: int  # text-encoder hidden size (768 SD1, 1024 SD2)

    @property
    def is_v(self) -> bool:
        return self.prediction_type == "v_prediction"

    def unet_kwargs(self, unet: Any, cond: Conditioning) -> dict[str, Any]:
        """Keyword arguments of the UNet call for `cond` (SD1/SD2: hidden states; XTI layer
        states go to the cross-attention processors through cross_attention_kwargs)."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond.hidden_states}
        if cond.layer_states is not None:
            from sdtrain.models.layer_states import install_layer_states

            sites = install_layer_states(unet)
            if len(cond.layer_states) != sites:
                raise ValueError(
                    f"{len(cond.layer_states)} layer states for {sites} cross-attention sites"
                )
            kwargs["cross_attention_kwargs"] = {"layer_states": list(cond.layer_states)}
        return kwargs

    def predict(
        self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The UNet's prediction (noise or v) for noisy latents at `timesteps` under `cond`."""
        return unet(noisy, timesteps, **self.unet_kwargs(unet, cond)).sample

    @property
    def base_model_version(self) -> str:
        """ss_base_model_version value: sd_v1, sd_v2, sd_v2_v."""
        return {"sd1": "sd_v1", "sd2": "sd_v2"}[self.name] + ("_v" if self.is_v else "")

    @property
    def modelspec_architecture(self) -> str:
        if self.name == "sd1":
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.is_v else "stable-diffusion-v2-512"


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
    """UNet, VAE, text encoder, tokenizer and training noise scheduler of one SD model."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    family: FamilyInfo
    source: ModelSource
    embeddings: EmbeddingTokens = field(default_factory=EmbeddingTokens)
