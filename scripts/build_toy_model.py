"""Build the shipped toy SD1 model (`builtin:toy-sd1`): pre-train it on the toy world on the CPU.

    python scripts/build_toy_model.py [--out src/sdtrain/models/assets/toy-sd1] [--threads 1]

Stages, all seeded and run with plain torch loops:

1. VAE: a diffusers AutoencoderKL (4 latent channels, downscale 8) trained as a near-deterministic
   autoencoder (MSE + L1, tiny KL) on rendered toy scenes, many in random colours or as three-colour
   composites, so that colours outside the world's palette (the quickstart subject's) reconstruct.
2. Scaling factor: 1 / std of the posterior means over the UNet training images, so scaled latents
   have unit variance (a random or foreign VAE with 0.18215 would make the image invisible under
   the noise).
3. UNet + CLIP text encoder, trained jointly from scratch with the SD1 recipe (DDPM scaled-linear
   0.00085-0.012, 1000 steps, epsilon, uniform timesteps, MSE with min-SNR-5 weighting) on cached
   latents, with 10% empty captions so classifier-free guidance works.

Measured on the 2-core CPU this was written on (shared with other jobs, so times vary): 19-24 min
in all, one thread. BUILD.json in the output records the run's own times and losses.
4. Save fp16 weights in diffusers layout with scheduler/, model_index.json and BUILD.json (recipe,
   versions, wall times, final losses, measured latent std), swapping the folder in atomically.

The architecture of each component is one dict below (VAE_CONFIG, UNET_CONFIG, TEXT_CONFIG).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtrain.data.toyworld import (
    ALL_COLOURS,
    random_pattern,
    random_shape,
    render,
    sample_specs,
    sample_subject,
    sample_world,
    shape_mask,
)

log = logging.getLogger("build_toy_model")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src/sdtrain/models/assets/toy-sd1"

VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    # One group: GroupNorm over all channels keeps a flat image's absolute colour (with groups of
    # two channels a constant feature map normalises to +-1 and the colour is lost).
    "norm_num_groups": 1,
    "sample_size": 64,
}
UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
# The SD1 training schedule with SD 1.5's keys. The default sampler is DDIM rather than SD 1.5's
# PNDM: PNDM's multistep extrapolation gives wrong colours with this small model (measured: "a green
# triangle on a white background" came out 70% green), while DDIM and Euler follow the prompt.
SCHEDULER_CONFIG: dict = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}


@dataclass
class Recipe:
    """Training settings of the build (recorded in BUILD.json)."""

    seed: int = 0
    vae_images: int = 8000
    vae_steps: int = 7000
    vae_batch: int = 8
    vae_lr: float = 4e-3
    vae_kl_weight: float = 1e-6  # per latent element, relative to per-pixel MSE
    vae_recolour_share: float = 0.35  # share of VAE images drawn in random colours
    vae_composite_share: float = 0.25  # share of three-colour composites (shape over pattern)
    unet_images: int = 16000
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    eval_images: int = 256


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arrays = np.stack([np.asarray(image) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_colours(rng: np.random.Generator) -> dict[str, tuple[int, int, int]]:
    """A random RGB for every colour name."""
    return {name: tuple(int(v) for v in rng.integers(0, 256, 3)) for name in ALL_COLOURS}


def composite(rng: np.random.Generator) -> Image.Image:
    """A random-coloured shape over a random-coloured pattern: a three-colour scene for the VAE."""
    colours = random_colours(rng)
    base = np.asarray(render(random_pattern(rng), colours), dtype=np.float32)
    cover = shape_mask(random_shape(rng))[..., None]
    top = np.array(rng.integers(0, 256, 3), dtype=np.float32)
    return Image.fromarray(np.rint(cover * top + (1 - cover) * base).astype(np.uint8), "RGB")


def vae_pool(recipe: Recipe) -> torch.Tensor:
    """VAE training images (N, 3, 64, 64): world scenes, some in random colours, some composites.

    None of them is the quickstart subject (zigzags never occur); composites put three colours in
    one image, as the subject does.
    """
    rng = np.random.default_rng(recipe.seed + 100)
    images = []
    for spec in sample_specs(recipe.seed + 100, recipe.vae_images):
        draw = rng.uniform()
        if draw < recipe.vae_composite_share:
            images.append(composite(rng))
        elif draw < recipe.vae_composite_share + recipe.vae_recolour_share:
            images.append(render(spec, random_colours(rng)))
        else:
            images.append(render(spec))
    return to_tensor(images)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * progress))


def train_vae(recipe: Recipe):
    """Train the AutoencoderKL; returns (vae in eval mode, final loss average)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():  # start with a near-deterministic posterior (log-variance -8)
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"] :] = -8.0
    pool = vae_pool(recipe)
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    generator = torch.Generator().manual_seed(recipe.seed)
    latent_elements = VAE_CONFIG["latent_channels"] * (VAE_CONFIG["sample_size"] // 8) ** 2
    recent: list[float] = []
    vae.train()
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * lr_factor(step, recipe.vae_steps, 100)
        x = pool[torch.randint(len(pool), (recipe.vae_batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean() / latent_elements
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-200:]
        if step % 250 == 0 or step == recipe.vae_steps - 1:
            log.info("vae step %d/%d loss %.4f", step, recipe.vae_steps, np.mean(recent))
    return vae.eval().requires_grad_(False), float(np.mean(recent))


@torch.no_grad()
def vae_metrics(vae, images) -> dict[str, float]:
    """Mean absolute reconstruction error in 0-255 pixel units and the posterior-mean std."""
    x = to_tensor(images)
    means = vae.encode(x).latent_dist.mode()
    rec = vae.decode(means).sample.clamp(-1, 1)
    return {
        "mean_abs_px_error": float((rec - x).abs().mean() * 127.5),
        "latent_std": float(means.std()),
        "latent_mean": float(means.mean()),
    }


@torch.no_grad()
def encode_dataset(vae, images, batch: int = 64) -> torch.Tensor:
    """Posterior means (N, 4, 8, 8) of the images, unscaled."""
    return torch.cat(
        [
            vae.encode(to_tensor(images[i : i + batch])).latent_dist.mode()
            for i in range(0, len(images), batch)
        ]
    )


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the SD1 schedule, (1000,) float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def train_unet(recipe: Recipe, latents: torch.Tensor, captions: list[str]):
    """Train UNet + text encoder from scratch on scaled latents (N, 4, 8, 8) and their captions.

    Returns (unet, text_encoder, final unweighted loss averaged over the last 200 steps).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrain.models.tokenizer import load_tokenizer

    torch.manual_seed(recipe.seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    tokenizer = load_tokenizer("sd1")
    vocabulary = sorted(set(captions)) + [""]  # "" = the dropped caption (unconditional)
    index = {c: i for i, c in enumerate(vocabulary)}
    ids = tokenizer(vocabulary, padding="max_length", max_length=77, return_tensors="pt").input_ids
    caption_index = torch.tensor([index[c] for c in captions])
    empty = index[""]
    # The 49408-row token embedding gets sparse gradients and SparseAdam (only the ~30 rows of the
    # world's words change), which keeps the optimizer step cheap.
    embedding = text_encoder.get_input_embeddings()
    embedding.sparse = True
    dense = [p for p in text_encoder.parameters() if p is not embedding.weight]
    params = list(unet.parameters()) + dense
    optimizers = [
        torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0),
        torch.optim.SparseAdam([embedding.weight], lr=recipe.unet_lr),
    ]
    ac = alphas_cumprod()
    snr = ac / (1 - ac)
    # min-SNR weighting (epsilon form): less weight on the easy low-noise steps, so more of the
    # gradient goes where the prompt decides the picture
    weight = snr.clamp(max=recipe.min_snr_gamma) / snr
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    unet.train()
    text_encoder.train()
    recent: list[float] = []
    for step in range(recipe.unet_steps):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = recipe.unet_lr * lr_factor(
                    step, recipe.unet_steps, recipe.unet_warmup
                )
        pick = torch.randint(len(latents), (recipe.unet_batch,), generator=generator)
        x0 = latents[pick]
        cap = caption_index[pick]
        drop = torch.rand(recipe.unet_batch, generator=generator) < recipe.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, empty), cap)
        unique, inverse = torch.unique(cap, return_inverse=True)
        cond = text_encoder(ids[unique]).last_hidden_state[inverse]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (recipe.unet_batch,), generator=generator)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        per_sample = (unet(noisy, t, cond).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weight[t]).mean()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for optimizer in optimizers:
            optimizer.step()
        recent = (recent + [per_sample.mean().item()])[-200:]
        if step % 250 == 0 or step == recipe.unet_steps - 1:
            log.info("unet step %d/%d loss %.4f", step, recipe.unet_steps, np.mean(recent))
    embedding.sparse = False
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, float(np.mean(recent))


def model_index() -> dict:
    """model_index.json of an SD1 pipeline whose tokenizer is sdtrain's bundled one."""
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_folder(out: Path, unet, vae, text_encoder, build: dict) -> None:
    """Write the fp16 diffusers folder next to `out`, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        unet.to(torch.float16).save_pretrained(tmp / "unet", safe_serialization=True)
        vae.to(torch.float16).save_pretrained(tmp / "vae", safe_serialization=True)
        text_encoder.to(torch.float16).save_pretrained(tmp / "text_encoder")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2))
        (tmp / "BUILD.json").write_text(json.dumps(build, indent=2))
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp / atomic files are private (0700 / 0600)
            path.chmod(0o755 if path.is_dir() else 0o644)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    for key, value in asdict(Recipe()).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    wall: dict[str, float] = {}
    start = time.perf_counter()

    vae, vae_loss = train_vae(recipe)
    wall["vae"] = time.perf_counter() - start

    mark = time.perf_counter()
    world = sample_world(recipe.seed + 200, recipe.unet_images)
    raw = encode_dataset(vae, [image for image, _ in world])
    std = float(raw.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    latents = raw / std
    wall["encode"] = time.perf_counter() - mark
    log.info("latent std %.4f -> scaling_factor %.4f", std, 1.0 / std)

    mark = time.perf_counter()
    unet, text_encoder, unet_loss = train_unet(recipe, latents, [c for _, c in world])
    wall["unet"] = time.perf_counter() - mark

    fresh = [image for image, _ in sample_world(recipe.seed + 300, recipe.eval_images)]
    subject = [image for image, _ in sample_subject(recipe.seed + 300, 32)]
    build = {
        "recipe": asdict(recipe),
        "threads": args.threads,
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            **_library_versions(),
        },
        "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "final_loss": {"vae": round(vae_loss, 5), "unet": round(unet_loss, 5)},
        "latent_std_unscaled": round(std, 5),
        "scaling_factor": 1.0 / std,
        "vae_fresh_world": vae_metrics(vae, fresh),
        "vae_subject": vae_metrics(vae, subject),
    }
    build["wall_seconds"]["total"] = round(time.perf_counter() - start, 1)
    save_folder(args.out, unet, vae, text_encoder, build)
    log.info("wrote %s: %s", args.out, json.dumps(build["final_loss"]))
    return 0


def _library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
