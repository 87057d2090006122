"""Does this CPU compute bf16 natively? (mixed_precision = "bf16" on a CPU is only fast if so.)

x86 CPUs do bf16 matrix math in hardware with AVX512-BF16 (`avx512_bf16`, Cooper Lake, Zen 4
and later) or AMX (`amx_bf16`, Sapphire Rapids and later); Arm CPUs with the BF16 extension
(`bf16` in /proc/cpuinfo's Features, e.g. Neoverse V1/N2, Graviton 3). Without any of them
PyTorch/oneDNN emulate bf16 by converting to fp32 around every kernel: the reference toolkit's
bf16 LoRA run on an AVX2-only EPYC did not finish 12 steps in 8 minutes where fp32 took ~100 s
(design/PERFORMANCE.md). With them, bf16 frozen weights + fp32 LoRA halve the step.

The check reads the CPU flags (/proc/cpuinfo) and torch's vector capability
(`torch.backends.cpu.get_cpu_capability()`): a build or setting that keeps torch below AVX512
(ATEN_CPU_CAPABILITY=avx2, or a non-AVX512 build) does not use the bf16 instructions for its
own kernels even when the CPU has them. Without native support the run warns and names why.

bf16 is refused (`refuse_without_kernels`) only where this torch has no oneDNN bf16 kernels for
the CPU at all (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: x86 needs AVX-512 BW/VL/DQ, Arm
the BF16 extension). There every bf16 matmul and convolution falls back to ATen's generic
kernels. On a 2-vCPU AVX2-only EPYC (2026-12-07) the SD1.5 U-Net's forward at 256 px took 136 s
under bf16 autocast with bf16 weights against 3.2 s in fp32 (42x); benchmarks/mfu.py measured a
2048^3 matmul at 0.3 GFLOP/s in bf16 against 109 in fp32 and a 320-channel 3x3 convolution at
0.7 against 152.
`SDTRAIN_ALLOW_SLOW_BF16=1` lets it run anyway (the tests use it to check bf16 numerics on any
machine). AVX-512 CPUs without avx512_bf16 (Skylake-SP, Ice Lake) keep oneDNN's emulation and
get the warning only.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ALLOW_SLOW = "SDTRAIN_ALLOW_SLOW_BF16"
ARM_BF16_FLAGS = ("bf16",)
# torch capabilities whose vector kernels cannot use the x86 bf16 instructions
_BELOW_AVX512 = ("DEFAULT", "NO AVX", "AVX", "AVX2")


@dataclass(frozen=True)
class Bf16Support:
    """Whether bf16 is native here, and a sentence that says why (for logs and warnings)."""

    native: bool
    reason: str


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def bf16_support(flags: Iterable[str], capability: str | None = None) -> Bf16Support:
    """Decide native bf16 from CPU `flags` and torch's `capability` string (None: unknown)."""
    flags = set(flags)
    if not flags:
        return Bf16Support(False, "the CPU's feature flags could not be read")
    found = [f for f in X86_BF16_FLAGS if f in flags]
    if found:
        if capability is not None and capability.upper() in _BELOW_AVX512:
            return Bf16Support(
                False,
                f"the CPU has {', '.join(found)} but torch runs its CPU kernels at {capability} "
                "(check ATEN_CPU_CAPABILITY / the torch build)",
            )
        return Bf16Support(True, f"the CPU has {', '.join(found)}")
    if any(f in flags for f in ARM_BF16_FLAGS):
        return Bf16Support(True, "the CPU has the Arm BF16 extension (bf16)")
    best = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    what = f"it has {best} but " if best else ""
    return Bf16Support(
        False,
        f"{what}the CPU has no native bf16 instructions (no avx512_bf16 / amx_bf16 / bf16 flag), "
        "so bf16 is emulated",
    )


@functools.lru_cache(maxsize=1)
def this_cpu() -> Bf16Support:
    """bf16_support for the machine this process runs on (cached)."""
    import torch

    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return bf16_support(cpu_flags(text), torch.backends.cpu.get_cpu_capability())


def warn_if_emulated(support: Bf16Support | None = None) -> bool:
    """Warn (once per call) when bf16 on this CPU is emulated; returns whether it is native."""
    support = support or this_cpu()
    if support.native:
        log.info("bf16 on the CPU: native (%s)", support.reason)
    else:
        log.warning(
            'mixed_precision = "bf16" on this CPU will be slow: %s. Emulated bf16 has been '
            'several times slower than fp32; consider mixed_precision = "no" (fp32).',
            support.reason,
        )
    return support.native


def has_bf16_kernels() -> bool | None:
    """Whether this torch runs bf16 matmuls and convolutions through oneDNN on this CPU (None:
    this torch cannot say)."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:
        return None
    try:
        return bool(check())
    except RuntimeError:
        return None


def refuse_without_kernels(key: str, kernels: bool | None = None, file: str | None = None) -> None:
    """Raise ConfigError at `key` (of `file`) when bf16 on this CPU would run on ATen's generic
    fallback kernels (see the module docstring), unless SDTRAIN_ALLOW_SLOW_BF16=1."""
    kernels = has_bf16_kernels() if kernels is None else kernels
    if kernels is not False or os.environ.get(ALLOW_SLOW) == "1":
        return
    from sdtrain.errors import ConfigError, Problem

    reason = this_cpu().reason
    raise ConfigError(
        [
            Problem(
                key=key,
                file=file,
                value="bf16",
                has_value=True,
                message=(
                    "bf16 has no fast kernels on this CPU, so training would run dozens of "
                    f"times slower than fp32: {reason}, and this torch has no oneDNN bf16 "
                    "kernels for it (they need AVX-512 or Arm BF16)"
                ),
                hint=(
                    f'use "no" (fp32) on this machine; {ALLOW_SLOW}=1 runs bf16 anyway '
                    "(only to check numerics on a tiny model)"
                ),
            )
        ]
    )
