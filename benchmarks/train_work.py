"""Training-benchmark inputs: the model presets, random-weight model folders, images and run TOML.

Shared by bench_train.py (sdtrain runs) and baseline_child.py (the bare diffusers + peft loop),
so both train on exactly the same model, resolution and data.

Presets (all random weights, for timing only):
  tiny  `builtin:tiny-sd1` (UNet (32, 64), CLIP width 32) at 256 px
  small UNet (64, 128, 256), 2 layers per block, cross-attention 256 (~18M params), CLIP width
        256 x 4 layers, the tiny VAE; 128 px; written as a diffusers folder
  full  the SD1.5 architecture from the bundled sd1 config (UNet 860M, CLIP-L text encoder,
        the SD VAE); 256 px; written as a diffusers folder (about 4 GiB in fp32)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

CAPTION = "a photo of sks cat, sitting on a red chair"


@dataclass(frozen=True)
class Preset:
    """One benchmark model: how sdtrain names it and the training resolution."""

    name: str
    resolution: int


PRESETS = {
    "tiny": Preset("tiny", 256),
    "small": Preset("small", 128),
    "full": Preset("full", 256),
}


def _config_root() -> Path:
    from sdtrain.models.families import config_dir

    return config_dir("sd1")


def _small_components():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrain.models.families import config_dir

    unet_cfg = dict(UNet2DConditionModel.load_config(_config_root() / "unet"))
    unet_cfg.update(
        block_out_channels=[64, 128, 256],
        layers_per_block=2,
        cross_attention_dim=256,
        attention_head_dim=8,
        sample_size=16,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )
    text_cfg = CLIPTextConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=256,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir("tiny-sd1") / "vae"))
    return unet, vae, CLIPTextModel(text_cfg)


def _full_components():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = _config_root()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
    return unet, vae, text


def model_spec(preset: str, cache: Path, file_dtype: str = "fp32") -> str:
    """The pretrained_model_name_or_path for `preset`; builds its folder in `cache` once.

    file_dtype fp16 writes the weights in float16 (as most shared SD1.5 files are): both
    sides load the same values; sdtrain may keep them half (engine/halfweights.py).
    """
    if preset == "tiny":
        return "builtin:tiny-sd1"
    folder = (
        cache / f"{preset}-sd1" if file_dtype == "fp32" else cache / f"{preset}-sd1-{file_dtype}"
    )
    if (folder / "done").is_file():
        return str(folder)
    if folder.exists():
        shutil.rmtree(folder)
    unet, vae, text = _small_components() if preset == "small" else _full_components()
    folder.mkdir(parents=True)
    if file_dtype == "fp16":
        import torch

        for module in (unet, vae, text):
            torch.nn.Module.to(module, dtype=torch.float16)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    shutil.copytree(_config_root() / "scheduler", folder / "scheduler")
    shutil.copy(_config_root() / "model_index.json", folder / "model_index.json")
    (folder / "done").write_text("ok\n")
    return str(folder)


def load_models(spec: str):
    """(unet, vae, text_encoder, tokenizer) of a benchmark model, fp32 on the CPU, eval mode.

    The convolutions keep torch's own kernel choice, as in the reference: sdtrain routes some
    through im2col + GEMM (models/conv_path.py) only in its training runs.
    """
    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle

    bundle = load_bundle(ModelSection(pretrained_model_name_or_path=spec))
    return bundle.unet, bundle.vae, bundle.text_encoder, bundle.tokenizer


def load_models_as_reference(spec: str):
    """(unet, vae, text_encoder, tokenizer) loaded the way the reference loads a diffusers folder.

    The reference (sd-scripts-behaviour.md §12.3) calls `StableDiffusionPipeline.from_pretrained`
    in fp32; here each component's own `from_pretrained` (fp32, local files only) does the same
    loading work without the pipeline's extra imports, so the baseline's load is if anything
    faster than the reference's. The tokenizer is the bundled offline one (the reference fetches
    its own from the hub or a cache). The built-in tiny model has no weight files: it loads
    through sdtrain, as in `load_models`.
    """
    if spec.startswith("builtin:"):
        return load_models(spec)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdtrain.models.tokenizer import load_tokenizer

    kwargs = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(
        spec, subfolder="unet", torch_dtype=torch.float32, **kwargs
    )
    vae = AutoencoderKL.from_pretrained(spec, subfolder="vae", torch_dtype=torch.float32, **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(
        spec, subfolder="text_encoder", dtype=torch.float32, **kwargs
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder, load_tokenizer("sd1")


def make_images(folder: Path, count: int, resolution: int) -> Path:
    """`count` noise images with a static caption in a DreamBooth-style `1_sks` folder."""
    from PIL import Image

    images = folder / "1_sks"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.effect_noise((resolution, resolution), 60 + i).convert("RGB").save(
            images / f"img{i}.png"
        )
        (images / f"img{i}.caption").write_text(CAPTION, encoding="utf-8")
    return folder


def write_run_toml(
    path: Path,
    *,
    model: str,
    data_dir: Path,
    output_dir: Path,
    resolution: int,
    steps: int,
    precision: str,
    cached: bool,
    training: dict | None = None,
) -> Path:
    """A LoRA run: dim 8 (alpha 1) on UNet + text encoder, AdamW, batch 1, no saves mid-run;
    `training` adds [training] keys."""
    values = {
        "model": {"pretrained_model_name_or_path": model},
        "dataset": {"train_data_dir": str(data_dir), "resolution": resolution},
        "training": {
            "output_dir": str(output_dir),
            "max_train_steps": steps,
            "train_batch_size": 1,
            "cache_latents": cached,
            "seed": 1234,
            "mixed_precision": "bf16" if precision == "bf16" else "no",
            **(training or {}),
        },
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 1e-4},
        "network": {"network_dim": 8, "network_alpha": 1.0},
    }
    lines = []
    for table, entries in values.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in entries.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
