"""Learning measurements on the toy model: fixed-noise denoising loss, generation, pixel tests.

Every method's learning check uses these so that numbers are comparable: the same fixed noise, the
same timesteps and the same plain DDIM sampler (no clip_sample: it would clip unit-variance toy
latents to [-1, 1]). Nothing here touches the global RNGs.

A learning check on the quickstart subject (sdtrain.data.toyworld): train on the shipped images
(`sample_subject(QUICKSTART_SEED, 8)`, captioned "shs pattern"), then compare on HELD-OUT subject
images (`sample_subject(<other seed>, n)`) `denoise_loss(..., "shs pattern")` before and after, and
check preservation with `denoise_loss` of ordinary world images (`sample_world`) under their own
captions. Measured on the shipped toy (tests/models/test_toy_model.py has the checks):

- before training, "shs pattern" is no better a caption than "pattern" (loss 0.239 vs 0.231 on 8
  held-out subject images, t 300-750) and generating "shs pattern" shows no pink or cyan;
- a peft UNet LoRA (rank 8, attention projections, batch 4, ~10 s per 400 steps) lowers that loss
  to 0.118 at lr 2e-4 / 400 steps (world loss 0.031 -> 0.040) and to 0.074 at lr 1e-3 / 800 steps
  (world 0.031 -> 0.093; generated "shs pattern" images then are 26% pink + cyan pixels);
- trained on "shs pattern" alone, "pattern" improves just as much (class drift): an identifier-vs-
  class gap needs prior preservation (DreamBooth) or a method that only changes the identifier (TI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from sdtrain.data.toyworld import ALL_COLOURS, colour_fractions, nearest_colour

if TYPE_CHECKING:
    from sdtrain.models.bundle import ModelBundle

TOY_MODEL = "builtin:toy-sd1"


def load_toy_bundle() -> ModelBundle:
    """The shipped toy SD1 model as sdtrain loads it (float32, CPU, eval mode)."""
    from sdtrain.models.builtin import load_builtin

    bundle = load_builtin(TOY_MODEL)
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        module.to(torch.float32).eval().requires_grad_(False)
    return bundle


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> PIL images."""
    arrays = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arrays]


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: Sequence[Image.Image]) -> torch.Tensor:
    """Scaled latents (B, 4, H/8, W/8): posterior mean x vae.config.scaling_factor."""
    pixels = images_to_tensor(images).to(next(vae.parameters()).dtype)
    return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents (B, 4, h, w) -> PIL images."""
    return tensor_to_images(vae.decode(latents / vae.config.scaling_factor).sample.float())


def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Text conditioning (B, 77, D): last hidden state of the padded prompts (SD1, no clip skip)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids).last_hidden_state


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the SD1 training schedule (scaled-linear 0.00085 -> 0.012, 1000 steps): (1000,)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def denoise_loss(
    unet,
    text_encoder,
    tokenizer,
    vae,
    images: Sequence[Image.Image],
    prompt: str,
    t_range: tuple[int, int] = (300, 750),
    seeds: Sequence[int] = (0, 1, 2, 3),
    n_timesteps: int = 4,
    layer_states: Callable[[str], list[torch.Tensor]] | None = None,
) -> float:
    """Mean epsilon-prediction MSE of `images` captioned `prompt`, with fixed noise and timesteps.

    For each seed, every image gets noise from a CPU generator seeded with that seed and is scored
    at `n_timesteps` evenly spaced timesteps in `t_range` (inclusive), so two calls with the same
    arguments see the same noise: differences come from the model or the prompt only.
    `layer_states(prompt)` (XTI): one (1, 77, D) conditioning per UNet cross-attention site,
    delivered through sdtrain.models.layer_states instead of the plain prompt encoding.
    """
    latents = encode_images(vae, images).float()
    ac = alphas_cumprod()
    timesteps = torch.linspace(t_range[0], t_range[1], n_timesteps).round().long()
    with torch.no_grad():
        cond = encode_prompts(text_encoder, tokenizer, [prompt]).float()
        kwargs = {}
        if layer_states is not None:
            from sdtrain.models.layer_states import install_layer_states

            install_layer_states(unet)
            states = [s.float().expand(len(latents), -1, -1) for s in layer_states(prompt)]
            kwargs["cross_attention_kwargs"] = {"layer_states": states}
        total, count = 0.0, 0
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            noise = torch.randn(
                (len(timesteps), *latents.shape), generator=generator, dtype=torch.float32
            )
            for k, t in enumerate(timesteps):
                a = ac[t].float()
                noisy = a.sqrt() * latents + (1 - a).sqrt() * noise[k]
                batch_t = t.repeat(len(latents))
                pred = unet(
                    noisy, batch_t, cond.expand(len(latents), -1, -1), **kwargs
                ).sample.float()
                total += torch.mean((pred - noise[k]) ** 2).item()
                count += 1
    return total / count


@torch.no_grad()
def generate(
    unet,
    text_encoder,
    tokenizer,
    vae,
    prompts: Sequence[str],
    seed: int,
    steps: int = 25,
    guidance: float = 4.0,
    size: int = 64,
) -> list[Image.Image]:
    """Images for `prompts` with a plain DDIM loop (eta 0) and classifier-free guidance.

    The initial noise comes from a CPU generator seeded with `seed` (one draw for the whole batch).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler.set_timesteps(steps)
    cond = encode_prompts(text_encoder, tokenizer, list(prompts))
    uncond = encode_prompts(text_encoder, tokenizer, [""] * len(prompts))
    both = torch.cat([uncond, cond])
    generator = torch.Generator().manual_seed(int(seed))
    shape = (len(prompts), unet.config.in_channels, size // 8, size // 8)
    latents = torch.randn(shape, generator=generator)
    for t in scheduler.timesteps:
        out = unet(torch.cat([latents, latents]), t, both).sample
        eps_uncond, eps_cond = out.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return decode_latents(vae, latents)


def dominant_colour_in_region(image: Image.Image, mask: np.ndarray | None = None) -> str:
    """Name of the most frequent nearest named colour among the (masked) pixels."""
    return next(iter(colour_fractions(image, mask)))


def foreground_mask(image: Image.Image, background: str) -> np.ndarray:
    """Pixels whose nearest named colour is not `background`: bool (H, W)."""
    names = tuple(ALL_COLOURS)
    labels = nearest_colour(np.asarray(image.convert("RGB")), names)
    return labels != names.index(background)


def main_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of `mask`, with its holes filled: bool (H, W)."""
    height, width = mask.shape
    component = np.zeros(mask.shape, dtype=np.int32)
    sizes = [0]
    for start in zip(*np.nonzero(mask), strict=True):
        if component[start]:
            continue
        label = len(sizes)
        component[start] = label
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not component[ny, nx]:
                    component[ny, nx] = label
                    stack.append((ny, nx))
        sizes.append(size)
    if len(sizes) == 1:
        return np.zeros(mask.shape, dtype=bool)
    blob = component == int(np.argmax(sizes))
    # holes: pixels outside the blob that the image border cannot reach
    outside = np.zeros(mask.shape, dtype=bool)
    stack = [(y, x) for y in range(height) for x in (0, width - 1)]
    stack += [(y, x) for x in range(width) for y in (0, height - 1)]
    while stack:
        y, x = stack.pop()
        if 0 <= y < height and 0 <= x < width and not blob[y, x] and not outside[y, x]:
            outside[y, x] = True
            stack += [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
    return ~outside


def fill_ratio(mask: np.ndarray) -> float:
    """Share of the mask's bounding box that the mask covers; 0 for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    box = (np.ptp(xs) + 1) * (np.ptp(ys) + 1)
    return float(mask.sum() / box)


def taper(mask: np.ndarray) -> float:
    """Mean width of the bottom third of the mask's box over that of the top third (0 if empty).

    About 1 for squares and circles, about 2 or more for the world's upward-pointing triangles
    and stars.
    """
    ys, _ = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0
    top, bottom = ys.min(), ys.max()
    third = max(1, (bottom - top + 1) // 3)
    upper = mask[top : top + third].sum(axis=1).mean()
    lower = mask[bottom - third + 1 : bottom + 1].sum(axis=1).mean()
    return float(lower / max(upper, 1e-6))


# The 8x8-latent toy draws stars as pointed blobs much like triangles, so generated shapes are
# judged in three classes. Thresholds measured on 64 generated images (guidance 4): fill ratio of
# the filled main blob, median square 0.88 / circle 0.80; taper median 0.97 for both, ~1.9-2.0 for
# triangles and stars.
SHAPE_CLASS: dict[str, str] = {
    "square": "square",
    "circle": "circle",
    "triangle": "pointed",
    "star": "pointed",
}
POINTED_TAPER = 1.35
SQUARE_FILL = 0.84


def shape_class(mask: np.ndarray) -> str:
    """ "pointed" (triangle/star), "square" or "circle" for a blob mask (see SHAPE_CLASS)."""
    if taper(mask) > POINTED_TAPER:
        return "pointed"
    return "square" if fill_ratio(mask) > SQUARE_FILL else "circle"


@dataclass
class ShapeScore:
    """Pixel verdict on an image generated for "a <colour> <shape> on a <background> background"."""

    background_ok: bool  # the background colour is the most frequent colour of the image
    colour_ok: bool  # the asked colour is the most frequent colour of the main non-background blob
    colour_share: float  # share of the image nearest to the asked colour
    shape_class: str  # shape_class() of the main non-background blob


def score_shape_image(image: Image.Image, colour: str, background: str) -> ShapeScore:
    """Pixel tests of a generated shape image (see ShapeScore)."""
    names = tuple(ALL_COLOURS)
    labels = nearest_colour(np.asarray(image.convert("RGB")), names)
    background_ok = dominant_colour_in_region(image) == background
    blob = main_blob(labels != names.index(background))
    colour_ok = bool(blob.any()) and dominant_colour_in_region(image, blob) == colour
    share = float((labels == names.index(colour)).mean())
    return ShapeScore(background_ok, colour_ok, share, shape_class(blob))
