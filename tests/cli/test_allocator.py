"""The allocator re-exec of `sdtrain train`: when it happens, what it sets, how to opt out."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sdtrain.cli import allocator
from sdtrain.cli.allocator import allocator_env, describe, find_tcmalloc, wants_reexec

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux allocators")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "lora", "run.toml"], True),
        (["-v", "--debug", "train", "lora", "run.toml"], True),
        (["train", "lora", "run.toml", "--dry-run"], False),
        (["train", "lora", "--help"], False),
        (["train", "lora", "--help-config"], False),
        (["dataset", "plan", "data"], False),
        (["--version"], False),
        ([], False),
    ],
)
def test_only_training_commands_reexec(args, expected):
    assert wants_reexec(args) is expected


@pytest.fixture
def no_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator, "_is_glibc", lambda: True)
    monkeypatch.setattr(allocator.sys, "platform", "linux")


@pytest.mark.parametrize(
    "environ",
    [
        {"SDTRAIN_NO_REEXEC": "1"},
        {"SDTRAIN_REEXECED": "1"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
    ],
)
def test_leaves_opt_outs_and_user_allocators_alone(no_tcmalloc, environ):
    assert allocator_env(environ) is None


def test_glibc_tunables_merge_with_other_tunables(no_tcmalloc):
    env = allocator_env({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert env is not None
    parts = env["GLIBC_TUNABLES"].split(":")
    assert parts[0] == "glibc.cpu.hwcaps=-AVX512F"
    assert "glibc.malloc.mmap_max=0" in parts
    assert any(p.startswith("glibc.malloc.trim_threshold=") for p in parts)
    assert "glibc.malloc.arena_max=1" in parts


def test_tcmalloc_is_preferred_and_keeps_existing_preloads(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "_is_glibc", lambda: False)
    quiet = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    assert allocator_env({}) == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4", **quiet}
    env = allocator_env({"LD_PRELOAD": "/lib/libfoo.so"})
    assert env == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4:/lib/libfoo.so", **quiet}
    env = allocator_env({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1000"})
    assert env == {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}  # the user's own bar stays


def test_tcmalloc_carries_the_glibc_tunables_as_a_fallback(monkeypatch):
    """ld.so only warns when it cannot preload a library; malloc then still gets the tunables."""
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "_is_glibc", lambda: True)
    env = allocator_env({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4"
    assert env["GLIBC_TUNABLES"] == f"glibc.rtld.optional_static_tls=1:{allocator.GLIBC_MALLOC}"


def test_not_linux_means_no_change(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator_env({}) is None


def test_find_tcmalloc_reads_the_linker_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path / "env"))  # no private copy
    full = tmp_path / "libtcmalloc.so.4"
    minimal = tmp_path / "libtcmalloc_minimal.so.4"
    full.touch()
    minimal.touch()
    listing = (
        "3 libs found in cache `/etc/ld.so.cache'\n"
        f"\tlibtcmalloc.so.4 (libc6,x86-64) => {full}\n"
        f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {minimal}\n"
        "\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n"
    )
    monkeypatch.setattr(
        allocator.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=listing)
    )
    assert find_tcmalloc() == str(minimal)
    monkeypatch.setattr(allocator.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=""))
    assert find_tcmalloc() is None


def test_find_tcmalloc_falls_back_to_the_environments_own_copy(monkeypatch, tmp_path):
    """scripts/install.sh puts Debian's library in <prefix>/lib/sdtrain-malloc/ without root;
    the system's library, when the linker knows one, comes first."""
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(allocator.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=""))
    assert find_tcmalloc() is None
    private = tmp_path / "lib" / allocator.PRIVATE_DIR / "libtcmalloc_minimal.so.4"
    private.parent.mkdir(parents=True)
    private.touch()
    assert find_tcmalloc() == str(private)
    spaced = tmp_path / "my env"  # LD_PRELOAD cannot name a path with a space (or a colon)
    monkeypatch.setattr(allocator.sys, "prefix", str(spaced))
    (spaced / "lib" / allocator.PRIVATE_DIR).mkdir(parents=True)
    (spaced / "lib" / allocator.PRIVATE_DIR / "libtcmalloc_minimal.so.4").touch()
    assert find_tcmalloc() is None
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path))
    system = tmp_path / "libtcmalloc_minimal.so.4"
    system.touch()
    listing = f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {system}\n"
    monkeypatch.setattr(
        allocator.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=listing)
    )
    assert find_tcmalloc() == str(system)


_PROBE = (
    "import os; from sdtrain.cli.allocator import maybe_reexec; "
    "maybe_reexec(['train', 'lora', 'run.toml']); "
    "print(os.environ.get('SDTRAIN_REEXECED'), "
    "bool(os.environ.get('LD_PRELOAD') or os.environ.get('GLIBC_TUNABLES')))"
)


@linux_only
def test_reexecs_once_with_the_allocator_set():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env.pop("SDTRAIN_NO_REEXEC", None)
    env.pop("SDTRAIN_REEXECED", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1", "True"]
    env["SDTRAIN_NO_REEXEC"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["None", "False"]


def test_describe_names_what_the_reexecuted_process_allocates_with():
    assert describe({}) is None  # not re-executed: nothing to say
    lib = "/venv/lib/sdtrain-malloc/libtcmalloc_minimal.so.4"
    env = {"SDTRAIN_REEXECED": "1", "LD_PRELOAD": f"{lib}:/lib/libfoo.so"}
    assert describe(env) == f"memory allocator: {lib} (preloaded)"
    env = {"SDTRAIN_REEXECED": "1", "GLIBC_TUNABLES": allocator.GLIBC_MALLOC}
    assert "glibc malloc with sdtrain's tunables" in describe(env)
