"""Model-family objects: the SD family's behaviour, and an SDXL-shaped family on tiny modules.

The SDXL family here lives in the test on purpose (SDXL is not a user-facing family yet): it
shows that a family with two text encoders, pooled embeddings and size/crop time ids builds its
Conditioning and UNet kwargs, and that the engine's micro-step trains it, with no change to
engine/ or data/.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from sdtrain.methods.base import Conditioning, StepInfo
from sdtrain.models.family import SDFamily


@dataclass(frozen=True)
class TinySDXLFamily:
    """SDXL's conditioning: penultimate states of both encoders side by side, the second
    encoder's pooled projection, and (original size, crop, target size) time ids."""

    name: str = "sdxl"
    prediction_type: str = "epsilon"
    resolution: int = 64
    latent_scale: float = 0.13025
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    tokenizer_names: tuple[str, ...] = ("tokenizer", "tokenizer_2")

    @property
    def is_v(self) -> bool:
        return False

    def text_encoders(self, bundle: Any) -> list[torch.nn.Module]:
        return [getattr(bundle, name) for name in self.text_encoder_names]

    def tokenizers(self, bundle: Any) -> list[Any]:
        return [getattr(bundle, name) for name in self.tokenizer_names]

    def encode_text(self, bundle: Any, captions: Sequence[str], **_: Any) -> Conditioning:
        from sdtrain.models.text import tokenize

        states, pooled = [], None
        for te_name, tok_name in zip(self.text_encoder_names, self.tokenizer_names, strict=True):
            ids = tokenize(getattr(bundle, tok_name), captions, None)[:, 0]
            out = getattr(bundle, te_name)(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", pooled)
        size = float(self.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * len(captions))
        return Conditioning(
            torch.cat(states, dim=-1), extra={"text_embeds": pooled, "time_ids": time_ids}
        )

    def unet_kwargs(self, unet: Any, cond: Conditioning) -> dict[str, Any]:
        return {
            "encoder_hidden_states": cond.hidden_states,
            "added_cond_kwargs": {
                "text_embeds": cond.extra["text_embeds"],
                "time_ids": cond.extra["time_ids"],
            },
        }

    def predict(self, unet: Any, noisy: Any, timesteps: Any, cond: Conditioning) -> Any:
        return unet(noisy, timesteps, **self.unet_kwargs(unet, cond)).sample


def sdxl_bundle(tokenizer: Any) -> SimpleNamespace:
    """Two tiny CLIP encoders (the second with a projection) and a text_time UNet."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)

    def config(**kw: Any) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            eos_token_id=tokenizer.eos_token_id,
            **kw,
        )

    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,  # 32 + 32: both encoders' states side by side
        attention_head_dim=8,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,  # time ids + pooled projection
    )
    return SimpleNamespace(
        unet=unet,
        vae=None,
        text_encoder=CLIPTextModel(config()),
        text_encoder_2=CLIPTextModelWithProjection(config(projection_dim=16)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        noise_scheduler=DDPMScheduler(),
        family=TinySDXLFamily(),
    )


def test_sdxl_family_builds_its_conditioning_and_unet_kwargs(tiny_sd1):
    bundle = sdxl_bundle(tiny_sd1.tokenizer)
    family = bundle.family
    with torch.no_grad():
        cond = family.encode_text(bundle, ["a cat", "a dog"])
        assert cond.hidden_states.shape == (2, 77, 64)
        assert cond.extra["text_embeds"].shape == (2, 16)
        assert cond.extra["time_ids"].shape == (2, 6)
        noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
        pred = family.predict(bundle.unet, noisy, t, cond)
        assert pred.shape == noisy.shape
        moved = Conditioning(
            cond.hidden_states, {**cond.extra, "time_ids": cond.extra["time_ids"] * 2}
        )
        assert not torch.equal(pred, family.predict(bundle.unet, noisy, t, moved))


def test_the_engine_micro_step_trains_an_sdxl_family_unchanged(tiny_sd1):
    from sdtrain.config.sections import TrainingSection
    from sdtrain.engine.loss import LossRecipe
    from sdtrain.engine.noise import NoiseRecipe
    from sdtrain.engine.precision import precision_for
    from sdtrain.engine.step import StepContext, micro_step_loss

    bundle = sdxl_bundle(tiny_sd1.tokenizer)

    class Method:
        def condition(self, bundle: Any, batch: Any, step: StepInfo) -> Conditioning:
            return bundle.family.encode_text(bundle, batch.captions)

        def loss_weights(self, batch: Any) -> None:
            return None

    training = TrainingSection()
    noise = NoiseRecipe(training, bundle.noise_scheduler, bundle.family.is_v)
    ctx = StepContext(
        Method(),  # type: ignore[arg-type]
        bundle,  # type: ignore[arg-type]
        noise,
        LossRecipe(training, noise),
        precision_for(training, False, "cpu"),
        torch.device("cpu"),
    )
    batch = SimpleNamespace(
        latents=torch.randn(2, 4, 8, 8), pixels=None, alpha_masks=None, captions=["a", "b"]
    )
    step = StepInfo(0, 1, torch.Generator().manual_seed(0))
    loss = micro_step_loss(ctx, batch, torch.Generator().manual_seed(1), step)  # type: ignore[arg-type]
    loss.backward()
    assert torch.isfinite(loss)
    assert bundle.unet.add_embedding.linear_1.weight.grad.abs().sum() > 0  # time ids + pooled


def test_sd_family_names_its_parts_and_encodes(tiny_sd1):
    family = tiny_sd1.family
    assert isinstance(family, SDFamily)
    assert family.text_encoders(tiny_sd1) == [tiny_sd1.text_encoder]
    assert family.tokenizers(tiny_sd1) == [tiny_sd1.tokenizer]
    assert family.adapter_roots(tiny_sd1) == {
        "unet": tiny_sd1.unet,
        "text_encoder": tiny_sd1.text_encoder,
    }
    from sdtrain.models.text import encode_captions

    cond = family.encode_text(tiny_sd1, ["a cat"])
    want = encode_captions(tiny_sd1.tokenizer, tiny_sd1.text_encoder, ["a cat"])
    assert torch.equal(cond.hidden_states, want) and cond.extra == {}
    assert cond.layer_states is None
    pair = family.encode_prompts(tiny_sd1, ["a cat", "(a dog:1.5)"])
    kwargs = family.pipeline_kwargs(pair, 3)
    assert kwargs["prompt_embeds"].shape[0] == 3
    assert torch.equal(kwargs["prompt_embeds"][0], want[0])


def test_methods_and_the_trained_forward_reach_text_encoders_through_the_family(tiny_sd1):
    """Full-model training unfreezes every text encoder the family names; the forward module
    accelerate wraps holds all of them (DDP syncs both); TI refuses two encoders by name."""
    import pytest

    from sdtrain.engine.forward import TrainForward
    from sdtrain.errors import ConfigError
    from sdtrain.methods.full_model import _text_encoders
    from sdtrain.methods.ti import _text_pair

    bundle = sdxl_bundle(tiny_sd1.tokenizer)
    encoders = _text_encoders(bundle)  # type: ignore[arg-type]
    assert list(encoders) == ["text_encoder", "text_encoder_2"]
    assert encoders["text_encoder_2"] is bundle.text_encoder_2
    forward = TrainForward(None, bundle)  # type: ignore[arg-type]
    held = {id(p) for p in forward.parameters()}
    assert {id(p) for p in bundle.text_encoder_2.parameters()} <= held
    with pytest.raises(ConfigError) as caught:
        _text_pair(bundle)  # type: ignore[arg-type]
    problem = caught.value.problems[0]
    assert problem.key == "model.pretrained_model_name_or_path"
    assert "text_encoder, text_encoder_2" in problem.message
    assert _text_pair(tiny_sd1) == (tiny_sd1.tokenizer, tiny_sd1.text_encoder)
