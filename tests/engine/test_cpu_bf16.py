"""The bf16-on-CPU check: native only with avx512_bf16 / amx_bf16 (x86) or bf16 (Arm)."""

from __future__ import annotations

import logging

import pytest

from sdtrain.engine.cpu_bf16 import Bf16Support, bf16_support, cpu_flags, warn_if_emulated

ZEN4 = ["fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"]
ZEN2 = ["fpu", "sse2", "avx", "avx2", "fma", "f16c"]
SKYLAKE_SP = ["fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"]
SAPPHIRE = ["fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"]
AMX_ONLY = ["fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"]


@pytest.mark.parametrize(
    ("flags", "capability", "native"),
    [
        (ZEN4, "AVX512", True),
        (SAPPHIRE, "AVX512", True),
        (AMX_ONLY, "AVX512", True),
        (ZEN4, None, True),
        (ZEN2, "AVX2", False),
        (SKYLAKE_SP, "AVX512", False),
        (ZEN4, "AVX2", False),  # torch held below AVX512 (ATEN_CPU_CAPABILITY=avx2)
        (ZEN4, "DEFAULT", False),
        (["fp", "asimd", "bf16", "sve", "sve2"], "SVE256", True),
        (["fp", "asimd", "sve"], "SVE256", False),
        ([], "AVX512", False),
    ],
)
def test_native_bf16_from_flags(flags: list[str], capability: str | None, native: bool) -> None:
    support = bf16_support(flags, capability)
    assert support.native is native
    assert support.reason


def test_reasons_name_the_cause() -> None:
    assert "avx512_bf16" in bf16_support(ZEN4, "AVX512").reason
    assert "avx2" in bf16_support(ZEN2, "AVX2").reason
    assert "emulated" in bf16_support(ZEN2, "AVX2").reason
    assert "AVX2" in bf16_support(ZEN4, "AVX2").reason


def test_cpuinfo_flags_x86_and_arm() -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nflags : x\n"
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags("nothing here") == set()


def test_warning_suggests_fp32(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sdtrain.engine.cpu_bf16"):
        assert not warn_if_emulated(Bf16Support(False, "no bf16 here"))
        assert warn_if_emulated(Bf16Support(True, "the CPU has avx512_bf16"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no bf16 here" in warnings[0].getMessage()
    assert 'mixed_precision = "no"' in warnings[0].getMessage()


def test_refused_only_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdtrain.engine import cpu_bf16
    from sdtrain.errors import ConfigError

    monkeypatch.delenv(cpu_bf16.ALLOW_SLOW, raising=False)
    cpu_bf16.refuse_without_kernels("training.mixed_precision", kernels=True)
    with pytest.raises(ConfigError) as caught:
        cpu_bf16.refuse_without_kernels("training.mixed_precision", kernels=False)
    (problem,) = caught.value.problems
    assert problem.key == "training.mixed_precision"
    assert problem.value == "bf16"
    assert cpu_bf16.ALLOW_SLOW in (problem.hint or "")
    monkeypatch.setenv(cpu_bf16.ALLOW_SLOW, "1")
    cpu_bf16.refuse_without_kernels("training.mixed_precision", kernels=False)


def test_refused_when_torch_cannot_say_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdtrain.engine import cpu_bf16

    monkeypatch.delenv(cpu_bf16.ALLOW_SLOW, raising=False)
    monkeypatch.setattr(cpu_bf16, "has_bf16_kernels", lambda: None)
    cpu_bf16.refuse_without_kernels("training.mixed_precision")


def test_torch_kernels_follow_the_cpu_flags() -> None:
    """torch's oneDNN bf16 check on x86 is AVX-512 BW + VL + DQ (emulated or native bf16)."""
    import platform
    from pathlib import Path

    from sdtrain.engine.cpu_bf16 import has_bf16_kernels

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 only")
    flags = cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    expected = {"avx512bw", "avx512vl", "avx512dq"} <= flags
    assert has_bf16_kernels() is expected
