"""Baseline for bench_train.py: a bare diffusers + peft LoRA loop doing the reference's work.

Usage: python benchmarks/baseline_child.py SPEC RESOLUTION fp32|bf16 cached|uncached STEPS OUT.json

The models load as the reference loads a diffusers folder: diffusers' and transformers' own
`from_pretrained` in fp32 (train_work.load_models_as_reference), not sdtrain's streaming loader.

What the reference toolkit (kohya train_network) does per step, nothing more: LoRA rank 8 on the
U-Net's transformer blocks (Linear and 1x1 Conv) and the text encoder's attention/MLP Linear
layers; frozen base weights in the mixed-precision dtype, LoRA weights fp32, forward under
autocast; latents from a cache (or a VAE encode per step); DDPM noise; MSE loss in fp32; backward;
grad clipping at 1.0; torch AdamW with its defaults; zero_grad. Runs with the process's default
allocator (no tunables) and torch's default thread count. peft's input upcast to the LoRA dtype
is switched off because the reference's own LoRA module does not do it (it would only slow the
baseline down and flatter sdtrain). Saves the LoRA weights (OUT.json.lora.safetensors, as
sdtrain saves its LoRA) and writes step timestamps and peak RSS to OUT.json.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _targets(model, kinds: tuple[str, ...]) -> list[str]:
    import torch

    names = []
    for parent_name, parent in model.named_modules():
        if type(parent).__name__ not in kinds:
            continue
        for child_name, child in parent.named_modules():
            linear = isinstance(child, torch.nn.Linear)
            pointwise = isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1)
            if linear or pointwise:
                names.append(f"{parent_name}.{child_name}")
    return sorted(set(names))


def main() -> None:
    spec, resolution, precision, latents_mode, steps, out = sys.argv[1:7]
    resolution, steps = int(resolution), int(steps)
    # as many images as sdtrain's dataset: the reference caches every image before training
    images = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model
    from train_work import CAPTION, load_models_as_reference

    unet, vae, text_encoder, tokenizer = load_models_as_reference(spec)
    weight = torch.bfloat16 if precision == "bf16" else torch.float32
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.to(weight)
    text_encoder.to(weight)
    vae.to(weight)
    unet_targets = _targets(unet, ("Transformer2DModel",))
    unet.add_adapter(LoraConfig(r=8, lora_alpha=1, target_modules=unet_targets))
    te_targets = _targets(text_encoder, ("CLIPAttention", "CLIPMLP"))
    text_encoder = inject_adapter_in_model(
        LoraConfig(r=8, lora_alpha=1, target_modules=te_targets), text_encoder
    )
    params = []
    for module in (unet, text_encoder):
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
        for sub in module.modules():
            if hasattr(sub, "cast_input_dtype_enabled"):
                sub.cast_input_dtype_enabled = False
    unet.train()
    text_encoder.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler.from_pretrained(
        str(_scheduler_dir()), subfolder="scheduler", local_files_only=True
    )
    ids = tokenizer(
        [CAPTION], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    generator = torch.Generator().manual_seed(0)
    all_pixels = [
        torch.rand(1, 3, resolution, resolution, generator=generator) * 2 - 1 for _ in range(images)
    ]
    cached = []
    if latents_mode == "cached":
        with torch.no_grad():
            for pixels in all_pixels:
                dist = vae.encode(pixels.to(weight)).latent_dist
                cached.append(dist.sample(generator).float())
    autocast = precision == "bf16"
    stamps, cpu, faults = [], [], []
    for step in range(steps):
        pixels = all_pixels[step % images]
        if latents_mode == "cached":
            latents = cached[step % images] * 0.18215
        else:
            with torch.no_grad():
                dist = vae.encode(pixels.to(weight)).latent_dist
                latents = dist.sample(generator).float() * 0.18215
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (1,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            cond = text_encoder(ids).last_hidden_state
            pred = unet(noisy.to(weight), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    lora = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    lora.update({f"te.{k}": v for k, v in get_peft_model_state_dict(text_encoder).items()})
    save_file({k: v.detach().contiguous() for k, v in lora.items()}, out + ".lora.safetensors")
    result = {
        "stamps": stamps,
        "cpu_stamps": cpu,
        "fault_stamps": faults,
        "peak_rss_mib": _peak_mib(),
        "lora_modules": {"unet": len(unet_targets), "te": len(te_targets)},
        "threads": torch.get_num_threads(),
    }
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def _peak_mib() -> float:
    """VmHWM (peak RSS of this process image; ru_maxrss would include the forking parent's)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _scheduler_dir():
    from sdtrain.models.families import config_dir

    return config_dir("sd1")


if __name__ == "__main__":
    main()
