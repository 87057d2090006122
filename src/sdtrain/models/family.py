"""Model families as objects with behaviour: what differs between SD1, SD2 (and later SDXL).

The engine, the methods and the sampling code never reach for `bundle.text_encoder` or call the
UNet by hand: they ask `bundle.family` to name the text encoders and tokenizers, encode
captions (training) and prompts (sampling) into a `Conditioning`, build the UNet kwargs, give the
latent scale and default resolution, name the adapter roots, and build a sampling pipeline from
the live modules. A new family (SDXL: two text encoders, pooled embeddings and size/crop time ids
in `Conditioning.extra`) is one more class implementing `ModelFamily`, plus its loading code in
models/; engine/ and data/ stay as they are (tests/models/test_families.py shows an SDXL-shaped
one on tiny modules).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from sdtrain.methods.base import Conditioning


class ModelFamily(Protocol):
    """What code outside models/ may ask of a family."""

    name: str
    prediction_type: Literal["epsilon", "v_prediction"]
    resolution: int  # default (native) training resolution
    latent_scale: float  # VAE scaling factor
    text_encoder_names: tuple[str, ...]  # bundle attributes, in encoding order
    tokenizer_names: tuple[str, ...]

    @property
    def is_v(self) -> bool: ...

    @property
    def base_model_version(self) -> str: ...  # ss_base_model_version

    @property
    def modelspec_architecture(self) -> str: ...  # modelspec.architecture (without /lora...)

    def text_encoders(self, bundle: Any) -> list[torch.nn.Module]: ...

    def tokenizers(self, bundle: Any) -> list[Any]: ...

    def adapter_roots(self, bundle: Any) -> dict[str, torch.nn.Module]: ...

    def encode_text(
        self,
        bundle: Any,
        captions: Sequence[str],
        *,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        weighted: bool = False,
        grad: bool = False,
    ) -> Conditioning: ...

    def encode_prompts(
        self,
        bundle: Any,
        prompts: Sequence[str],
        clip_skip: int | None = None,
        max_token_length: int | None = None,
    ) -> Conditioning: ...

    def unet_kwargs(self, unet: Any, cond: Conditioning) -> dict[str, Any]: ...

    def predict(
        self, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor: ...

    def build_pipeline(self, bundle: Any) -> Any: ...

    def pipeline_kwargs(self, pair: Conditioning, count: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SDFamily:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, conditioning = its hidden states."""

    name: Literal["sd1", "sd2"]
    prediction_type: Literal["epsilon", "v_prediction"]
    resolution: int  # native training resolution (512, or 768 for 768-v)
    latent_scale: float  # VAE scaling factor (0.18215 for real SD)
    text_width: int  # text-encoder hidden size (768 SD1, 1024 SD2)

    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)

    @property
    def is_v(self) -> bool:
        return self.prediction_type == "v_prediction"

    @property
    def base_model_version(self) -> str:
        """ss_base_model_version value: sd_v1, sd_v2, sd_v2_v."""
        return {"sd1": "sd_v1", "sd2": "sd_v2"}[self.name] + ("_v" if self.is_v else "")

    @property
    def modelspec_architecture(self) -> str:
        if self.name == "sd1":
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.is_v else "stable-diffusion-v2-512"

    # ----------------------------------------------------------------- modules
    def text_encoders(self, bundle: Any) -> list[torch.nn.Module]:
        """The bundle's text encoders, in encoding order."""
        return [getattr(bundle, name) for name in self.text_encoder_names]

    def tokenizers(self, bundle: Any) -> list[Any]:
        """The bundle's tokenizers, paired with text_encoders() by position."""
        return [getattr(bundle, name) for name in self.tokenizer_names]

    def adapter_roots(self, bundle: Any) -> dict[str, torch.nn.Module]:
        """Modules adapters attach to, by the root name of their kohya key map
        ("unet" -> lora_unet_*, "text_encoder" -> lora_te_*)."""
        return {"unet": bundle.unet, "text_encoder": bundle.text_encoder}

    # ----------------------------------------------------------------- text
    def encode_text(
        self,
        bundle: Any,
        captions: Sequence[str],
        *,
        clip_skip: int | None = None,
        max_token_length: int | None = None,
        weighted: bool = False,
        grad: bool = False,
    ) -> Conditioning:
        """Training conditioning (B, 75n+2, D) of captions (§5.3-§5.6): A1111 weights applied
        position-wise without renormalisation when `weighted`; no graph unless `grad`."""
        import torch

        from sdtrain.methods.base import Conditioning
        from sdtrain.models.text import encode_tokens, tokenize

        weights = None
        if weighted:
            from sdtrain.data.prompt_weights import tokenize_weighted

            ids, weights = tokenize_weighted(bundle.tokenizer, list(captions), max_token_length)
        else:
            ids = tokenize(bundle.tokenizer, captions, max_token_length)
        with contextlib.nullcontext() if grad else torch.no_grad():
            states = encode_tokens(
                bundle.text_encoder,
                ids,
                clip_skip,
                weights,
                eos_token_id=bundle.tokenizer.eos_token_id,
            )
        return Conditioning(states)

    def encode_prompts(
        self,
        bundle: Any,
        prompts: Sequence[str],
        clip_skip: int | None = None,
        max_token_length: int | None = None,
    ) -> Conditioning:
        """Sampling conditioning: A1111 weights with the mean-preserving rescale.

        Prompts are encoded one by one, and an unweighted prompt skips the weighting: the
        rescale is then an exact no-op, and skipping it avoids 0/0 on a text encoder whose
        output mean is ~0 (a freshly initialised final LayerNorm, as in the tiny models).
        """
        import torch

        from sdtrain.data.prompt_weights import tokenize_weighted
        from sdtrain.methods.base import Conditioning
        from sdtrain.models.text import encode_tokens

        eos = bundle.tokenizer.eos_token_id
        rows = []
        for prompt in prompts:
            ids, weights = tokenize_weighted(bundle.tokenizer, [prompt], max_token_length)
            plain = bool((weights == 1.0).all())
            rows.append(
                encode_tokens(
                    bundle.text_encoder,
                    ids,
                    clip_skip,
                    None if plain else weights,
                    eos_token_id=eos,
                    renormalize=not plain,
                )
            )
        return Conditioning(torch.cat(rows))

    # ----------------------------------------------------------------- UNet
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

    # ----------------------------------------------------------------- sampling
    def build_pipeline(self, bundle: Any) -> Any:
        """A StableDiffusionPipeline around the bundle's live modules (no safety checker).

        The sampler is set per prompt afterwards via `pipe.scheduler = ...`, which (as in the
        reference) bypasses the constructor's scheduler "fix-ups" (clip_sample, steps_offset).
        """
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        from sdtrain.models.sampling import SCHEDULE

        pipe = StableDiffusionPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoder,
            tokenizer=bundle.tokenizer,
            unet=bundle.unet,
            scheduler=EulerDiscreteScheduler(**SCHEDULE, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_kwargs(self, pair: Conditioning, count: int) -> dict[str, Any]:
        """The embedding arguments of the pipeline call for `count` images of one prompt;
        `pair` is encode_prompts([prompt, negative prompt])."""
        hidden = pair.hidden_states
        return {
            "prompt_embeds": hidden[:1].expand(count, -1, -1),
            "negative_prompt_embeds": hidden[1:2].expand(count, -1, -1),
        }
