"""GPU LoRA step on the SD1.5 architecture: s/step and peak VRAM per engine lever (not a test).

The step is the one `sdtrain train lora` runs, rebuilt from the same parts so each lever can be
switched on alone: frozen base in bf16, LoRA dim 8 (alpha 1) on UNet + text encoder through
sdtrain's LoraNetwork (fp32 adapters), autocast, cached latents (random, 4 x 64 x 64 at 512 px),
DDPM noise, MSE loss, grad clipping 1.0, AdamW. Random weights (timing only).

Variants (cumulative, in this order):
  eager       the engine with host_sync = every_step: loss and the grad norm read on the host
              every step (`float(loss)`, `isfinite(norm)`), foreach AdamW
  nosync      no host read inside the step (losses stay on the device, read once at the end)
  fused       + AdamW(fused=True) with a device-side non-finite skip (found_inf, as GradScaler):
              what the engine does on CUDA by default (host_sync = auto -> deferred, where the
              values are read one step later; engine/host_sync.py)
  compile     + torch.compile(unet) (default mode)
  cudagraphs  + torch.compile(unet, mode="reduce-overhead") (CUDA graphs; one graph per shape,
              cudagraph_mark_step_begin() per step)

Usage: python benchmarks/gpu/bench_lora.py --variants eager,nosync,fused --batches 1,4 \
           [--resolution 512] [--steps 15] [--warmup 3] [--dry] --out result.json
--dry runs the tiny SD-shaped model on the CPU (fp32 autocast off) to check the script itself.
Prints one JSON object and writes it to --out (partial results are written after every case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

VARIANTS = ("eager", "nosync", "fused", "compile", "cudagraphs")


def build(dry: bool, device, dtype):
    """(unet, text_encoder, network): SD1.5 (or tiny) architecture, frozen base, fp32 LoRA."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrain.methods.adapters.lora import LoraNetwork
    from sdtrain.methods.adapters.spec import LoraSpec
    from sdtrain.models.families import config_dir

    root = config_dir("tiny-sd1" if dry else "sd1")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
    for module in (unet, text):
        module.requires_grad_(False)
        torch.nn.Module.to(module, dtype=dtype)  # diffusers' own .to() warns on every cast
    network = LoraNetwork.create(unet, text, LoraSpec(dim=8, alpha=1.0))
    for m in network.modules:
        m.down.float()
        m.up.float()
    network.train(True)
    unet.train()
    text.train()
    for module in (unet, text):  # peft's fp32 input cast is redundant under autocast
        for sub in module.modules():
            if hasattr(sub, "cast_input_dtype_enabled"):
                sub.cast_input_dtype_enabled = False
    return unet, text, network


def run_case(variant: str, batch: int, args, device, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    from sdtrain.models.assemble import make_noise_scheduler

    cuda = device.type == "cuda"
    level = VARIANTS.index(variant)
    unet, text, network = build(args.dry, device, dtype)
    params = network.parameters()
    fused = level >= VARIANTS.index("fused")
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    if level >= VARIANTS.index("compile"):
        mode = "reduce-overhead" if variant == "cudagraphs" else None
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        unet = torch.compile(unet, mode=mode)
    scheduler = make_noise_scheduler("epsilon")
    alphas = scheduler.alphas_cumprod.to(device)
    size = args.resolution // 8
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(batch, 4, size, size, device=device, generator=generator) * 0.18215
    ids = torch.randint(0, text.config.vocab_size - 2, (batch, 77), device=device)
    autocast = dtype != torch.float32
    losses = torch.zeros(args.warmup + args.steps, device=device)
    stamps: list[float] = []
    nonfinite = 0

    def step(i: int) -> None:
        nonlocal nonfinite
        noise = torch.randn(latents.shape, device=device, generator=generator)
        t = torch.randint(0, 1000, (batch,), device=device, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        if variant == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            cond = text(ids).last_hidden_state
            pred = unet(noisy.to(dtype), t, cond).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if level == 0:  # today's engine: two host reads per step
            value = float(loss.detach())
            ok = bool(torch.isfinite(norm)) and value == value
            if ok:
                optimizer.step()
            else:
                nonfinite += 1
        elif fused:
            optimizer.found_inf = (~torch.isfinite(norm)).float()  # device-side skip
            optimizer.step()
        else:
            optimizer.step()
        losses[i] = loss.detach()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    compile_s = None
    started = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - started
    if level >= VARIANTS.index("compile"):
        compile_s = warm_s
    begin = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
        if args.per_step_sync and cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - begin
    gaps = [b - a for a, b in zip([begin, *stamps], stamps, strict=False)]
    values = losses.tolist()
    record = {
        "variant": variant,
        "batch": batch,
        "resolution": args.resolution,
        "s_per_step": total / args.steps,
        "median_gap_s": statistics.median(gaps) if args.per_step_sync else None,
        "warmup_s": round(warm_s, 2),
        "compile_s": None if compile_s is None else round(compile_s, 2),
        "finite_losses": all(v == v and abs(v) != float("inf") for v in values),
        "last_loss": values[-1],
        "skipped_steps": nonfinite,
        "lora_params": sum(p.numel() for p in params),
        "lora_tensors": len(params),
    }
    if cuda:
        record["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return record


def release(cuda: bool) -> None:
    """Free the previous case's models, graphs and cached blocks before the next one."""
    import gc

    import torch

    gc.collect()
    if cuda:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--per-step-sync", action="store_true", help="sync after every step")
    parser.add_argument("--dry", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    cuda = torch.cuda.is_available() and not args.dry
    device = torch.device("cuda" if cuda else "cpu")
    if args.dry:
        args.resolution = min(args.resolution, 64)
        args.precision = "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "precision": args.precision,
        "model": "tiny-sd1" if args.dry else "sd1.5 architecture, random weights",
        "anchor": {"simpletuner_h100_s_per_step": 0.181, "gib": 2.87, "goal_s": 0.09},
        "cases": [],
    }
    out = Path(args.out)
    for variant in [v for v in args.variants.split(",") if v]:
        for batch in (int(b) for b in args.batches.split(",")):
            started = time.perf_counter()
            try:
                record = run_case(variant, batch, args, device, dtype)
            except Exception as error:  # report and go on with the next lever
                record = {
                    "variant": variant,
                    "batch": batch,
                    "error": f"{type(error).__name__}: {error}"[:2000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            release(cuda)
            record["case_wall_s"] = round(time.perf_counter() - started, 1)
            report["cases"].append(record)
            print(json.dumps(record), flush=True)
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
