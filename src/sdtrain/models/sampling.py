"""Sample images from a live model bundle: sampler table, prompt conditioning, diffusers pipeline.

Used by the training engine at save points and by `sdtrain generate`. The pipeline is assembled
around the bundle's own modules (no copies), so samples show the current trained weights.
Differences from the reference toolkit, on purpose:

* Sampling never touches the global RNGs: each image gets its own CPU `torch.Generator` seeded from
  its prompt's seed (a prompt without a seed gets a fresh random one, recorded in the PNG), and the
  torch / CUDA / python / numpy RNG states are restored afterwards anyway. The reference reseeded
  the global torch RNG per prompt (and called `torch.seed()` for unseeded prompts).
* Prompts are conditioned exactly like training captions: the same `max_token_length` windows and
  `clip_skip`, with A1111 weights and the sampling pipeline's mean-preserving renormalisation. The
  reference's long-prompt pipeline instead sized the windows to each prompt's actual length.
* An unknown sampler name is a ConfigError (the reference silently used DDIM).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import random
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    from PIL import Image

    from sdtrain.config.prompt_file import PromptSpec
    from sdtrain.models.bundle import ModelBundle
    from sdtrain.models.family import ModelFamily

logger = logging.getLogger(__name__)

# Every sampling scheduler uses the SD training schedule (behaviour spec §10.3).
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# sampler name -> (diffusers scheduler class, extra constructor kwargs)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers >= 0.27 refuses final_sigmas_type "zero" (its default) for plain dpmsolver
    "dpmsolver": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


class GeneratedImage(NamedTuple):
    """One sample: the image, the prompt it came from (seed as written) and the seed used."""

    image: Image.Image
    spec: PromptSpec
    seed: int


def make_scheduler(name: str, family: ModelFamily) -> Any:
    """A fresh diffusers scheduler for sampler `name` (case-insensitive), built as the reference.

    1000 train steps, betas 0.00085 -> 0.012 scaled_linear, v_prediction for v-models, and
    `clip_sample=True` wherever the scheduler has that option (the reference forces it on).
    """
    import diffusers

    key = name.strip().lower()
    if key not in SAMPLERS:
        raise ConfigError(
            [
                Problem(
                    key="sample.sample_sampler",
                    message=f"unknown sampler '{name}'; valid: {', '.join(SAMPLERS)}",
                )
            ],
            hint="pick one of the listed sampler names",
        )
    class_name, extra = SAMPLERS[key]
    scheduler_class = getattr(diffusers, class_name)
    kwargs = {**SCHEDULE, **extra}
    if family.is_v:
        kwargs["prediction_type"] = "v_prediction"
    if "clip_sample" in inspect.signature(scheduler_class.__init__).parameters:
        kwargs["clip_sample"] = True
    with warnings.catch_warnings():
        # plain "dpmsolver" is deprecated upstream; it is a reference sampler name, kept on purpose
        warnings.filterwarnings("ignore", message=".*dpmsolver.*deprecated.*")
        return scheduler_class(**kwargs)


def encode_prompts(
    bundle: ModelBundle,
    prompts: Sequence[str],
    clip_skip: int | None,
    max_token_length: int | None,
) -> torch.Tensor:
    """Conditioning (B, 75n+2, D) for sample prompts: A1111 weights, mean-preserving rescale
    (the family's encode_prompts; its hidden states)."""
    return bundle.family.encode_prompts(bundle, prompts, clip_skip, max_token_length).hidden_states


@contextlib.contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Restore the torch (CPU + every CUDA device), python and numpy RNG states on exit."""
    import numpy as np

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py = random.getstate()
    npy = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def eval_modes(*modules: torch.nn.Module) -> Iterator[None]:
    """Put modules in eval mode; restore every submodule's own train/eval flag on exit."""
    saved = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, mode in saved:
            sub.training = mode


@contextlib.contextmanager
def _vae_on(vae: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Move the VAE to the sampling device for the duration (it may live elsewhere in training)."""
    original = next(vae.parameters()).device
    if original != device:
        vae.to(device)
    try:
        yield
    finally:
        if original != device:
            vae.to(original)


def _settings_key(spec: PromptSpec) -> tuple:
    return (
        spec.prompt,
        spec.negative_prompt,
        spec.width,
        spec.height,
        spec.steps,
        spec.scale,
        spec.sampler,
    )


def _batches(
    specs: Sequence[PromptSpec], seeds: Sequence[int], batch_size: int
) -> Iterator[list[tuple[PromptSpec, int]]]:
    """Consecutive prompts that differ only in seed, in groups of at most `batch_size`."""
    group: list[tuple[PromptSpec, int]] = []
    for spec, seed in zip(specs, seeds, strict=True):
        if group and (
            len(group) >= batch_size or _settings_key(group[0][0]) != _settings_key(spec)
        ):
            yield group
            group = []
        group.append((spec, seed))
    if group:
        yield group


def build_pipeline(bundle: ModelBundle) -> Any:
    """A diffusers pipeline around the bundle's live modules, built by its family."""
    return bundle.family.build_pipeline(bundle)


def _run_batch(
    pipe: Any,
    bundle: ModelBundle,
    group: list[tuple[PromptSpec, int]],
    clip_skip: int | None,
    max_token_length: int | None,
) -> list[Image.Image]:
    spec = group[0][0]
    count = len(group)
    family = bundle.family
    if bundle.embeddings.xti is None:
        pair = family.encode_prompts(
            bundle, [spec.prompt, spec.negative_prompt], clip_skip, max_token_length
        )
        embeds = family.pipeline_kwargs(pair, count)
    else:
        cond, extra = _xti_conditioning(bundle, spec, count, clip_skip, max_token_length)
        embeds = {
            "prompt_embeds": cond[:1].expand(count, -1, -1),
            "negative_prompt_embeds": cond[1:].expand(count, -1, -1),
            **extra,
        }
    pipe.scheduler = make_scheduler(spec.sampler, bundle.family)
    generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in group]
    result = pipe(
        **embeds,
        height=spec.height,
        width=spec.width,
        num_inference_steps=spec.steps,
        guidance_scale=spec.scale,
        generator=generators,
        output_type="pil",
    )
    return list(result.images)


def _xti_conditioning(
    bundle: ModelBundle,
    spec: PromptSpec,
    count: int,
    clip_skip: int | None,
    max_token_length: int | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(prompt, negative) mid-block states for the pipeline, plus the per-site states as
    cross_attention_kwargs, in the pipeline's batch layout ([negative, positive] under CFG)."""
    from sdtrain.models.layer_states import install_layer_states
    from sdtrain.models.xti import encode_prompt_layers

    rows = bundle.embeddings.xti
    assert rows is not None
    install_layer_states(bundle.unet)
    positive, negative = (
        encode_prompt_layers(
            rows, bundle.tokenizer, bundle.text_encoder, text, clip_skip, max_token_length
        )
        for text in (spec.prompt, spec.negative_prompt)
    )
    guided = spec.scale > 1 and bundle.unet.config.time_cond_proj_dim is None
    states = [
        torch.cat([n.expand(count, -1, -1), p.expand(count, -1, -1)]) if guided else p
        for p, n in zip(positive, negative, strict=True)
    ]
    if not guided:
        states = [p.expand(count, -1, -1) for p in states]
    cond = torch.cat([positive[rows.mid], negative[rows.mid]])
    return cond, {"cross_attention_kwargs": {"layer_states": states}}


def generate_images(
    bundle: ModelBundle,
    specs: Sequence[PromptSpec],
    clip_skip: int | None = None,
    max_token_length: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[GeneratedImage], None] | None = None,
    batch_size: int = 1,
) -> list[GeneratedImage]:
    """Generate one image per spec with the bundle's current weights, in spec order.

    `device` defaults to the UNet's device; `dtype` other than float32 runs under autocast (mixed
    precision). Consecutive specs that differ only in seed are denoised together, up to
    `batch_size` per call; each image's noise comes from its own generator, so an image does not
    depend on the batch it was made in (up to float rounding). Runs under `torch.no_grad` in eval
    mode; module modes, the VAE's device and all global RNG states are restored afterwards.
    `progress` is called after every image.
    """
    device = torch.device(device) if device is not None else next(bundle.unet.parameters()).device
    seeds = [spec.seed if spec.seed is not None else secrets.randbits(32) for spec in specs]
    use_autocast = dtype is not None and dtype != torch.float32
    results: list[GeneratedImage] = []
    pipe = None
    try:
        with (
            preserved_rng_states(),
            eval_modes(bundle.unet, bundle.vae, *bundle.family.text_encoders(bundle)),
            _vae_on(bundle.vae, device),
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype, enabled=use_autocast),
        ):
            pipe = build_pipeline(bundle)
            for group in _batches(specs, seeds, max(1, batch_size)):
                images = _run_batch(pipe, bundle, group, clip_skip, max_token_length)
                for image, (spec, seed) in zip(images, group, strict=True):
                    item = GeneratedImage(image, spec, seed)
                    results.append(item)
                    if progress is not None:
                        progress(item)
    finally:
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
