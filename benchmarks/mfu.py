"""Model-FLOP utilisation for the training benchmark: FLOPs of one step and the machine's peak.

step_flops(): the FLOPs of one LoRA training step (text encoder + UNet forward, backward to the
LoRA weights, as autograd runs it) counted by torch.utils.flop_counter on the meta device, so
it costs no memory or time. Only matmuls, convolutions and attention count (what FlopCounterMode
knows); norms and element-wise work are left out, as in the usual MFU definition.

machine_peak(): achieved GFLOP/s of large fp32 and bf16 matmuls and of a 3x3 convolution of
UNet-like shape on this process's threads: the practical ceiling the step is compared to.
Usage: python benchmarks/mfu.py [--resolution 256] [--model full|small|tiny]  (prints JSON)
"""

from __future__ import annotations

import argparse
import json
import time


def _best_rate(fn, flops: float, seconds: float = 1.5) -> float:
    """Best GFLOP/s of `fn` over repeated calls for about `seconds` (after one warm-up)."""
    fn()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - started) / 1e9)
    return best


def machine_peak() -> dict[str, float | None]:
    """GFLOP/s of a 2048^3 matmul (fp32, bf16) and a 320-channel 3x3 conv (fp32, bf16).

    Where torch has no bf16 kernels for the CPU (sdtrain refuses bf16 there) the bf16 figures
    are None unless SDTRAIN_ALLOW_SLOW_BF16=1: ATen's fallback takes about a minute per bf16
    matmul on an AVX2-only CPU (0.3 GFLOP/s measured)."""
    import os

    import torch

    from sdtrain.engine.cpu_bf16 import ALLOW_SLOW, has_bf16_kernels

    bf16 = has_bf16_kernels() is not False or os.environ.get(ALLOW_SLOW) == "1"
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out: dict[str, float | None] = {"matmul_fp32": _best_rate(lambda: a @ b, 2 * n**3)}
    a16, b16 = a.bfloat16(), b.bfloat16()
    out["matmul_bf16"] = _best_rate(lambda: a16 @ b16, 2 * n**3) if bf16 else None
    x = torch.randn(1, 320, 32, 32)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    conv_flops = 2 * 320 * 320 * 9 * 32 * 32
    with torch.no_grad():
        out["conv_fp32"] = _best_rate(lambda: conv(x), conv_flops)
        conv16, x16 = conv.bfloat16(), x.bfloat16()
        out["conv_bf16"] = _best_rate(lambda: conv16(x16), conv_flops) if bf16 else None
    return {k: None if v is None else round(v, 1) for k, v in out.items()}


def step_flops(model: str = "full", resolution: int = 256, batch: int = 1) -> float:
    """FLOPs of one LoRA (dim 8, UNet + TE) training step on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrain.methods.adapters.lora import LoraNetwork
    from sdtrain.methods.adapters.spec import LoraSpec
    from sdtrain.models.families import config_dir

    if model == "small":
        from train_work import _small_components

        with torch.device("meta"):
            unet, _vae, text = _small_components()
    else:
        root = config_dir("sd1" if model == "full" else "tiny-sd1")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
    for module in (unet, text):
        module.requires_grad_(False)
    network = LoraNetwork.create(unet, text, LoraSpec(dim=8, alpha=1.0))
    for m in network.modules:
        m.down.weight.requires_grad_(True)
        m.up.weight.requires_grad_(True)
    size = resolution // 8
    with torch.device("meta"):
        latents = torch.randn(batch, 4, size, size)
        ids = torch.zeros(batch, 77, dtype=torch.long)
        t = torch.zeros(batch, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        cond = text(ids).last_hidden_state
        pred = unet(latents, t, cond).sample
        pred.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full")
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    flops = step_flops(args.model, args.resolution)
    print(json.dumps({"gflop_per_step": round(flops / 1e9, 1), "peak": machine_peak()}))


if __name__ == "__main__":
    main()
