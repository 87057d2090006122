"""Memory allocator for training processes: tcmalloc or glibc tunables, set by one re-exec.

Why: a training step allocates and frees the same large buffers every step. glibc serves blocks
above its mmap threshold with fresh mmaps and unmaps them on free, so the kernel faults in and
zeroes the same memory again every step: on the full SD1.5 UNet at 256 px about 0.3-0.6 million
page faults (1.3-2.4 GiB) per step, mostly buffers the size of the large convolution weights
(56-112 MiB, per-call weight copies of the convolution kernels). Raising
glibc.malloc.mmap_threshold does not help: glibc caps it at 32 MiB. An allocator setting only
takes effect if it is in the environment when the process starts, so `sdtrain train ...`
re-executes itself once, before any heavy import, with:

* tcmalloc preloaded (LD_PRELOAD) when `ldconfig -p` lists libtcmalloc_minimal.so.4 or
  libtcmalloc.so.4 (Debian/Ubuntu: `apt install libtcmalloc-minimal4`), or when the environment
  has its own copy in `<prefix>/lib/sdtrain-malloc/` (scripts/install.sh puts Debian's there,
  without root, where the system has none), with the glibc tunables below alongside (unused
  while tcmalloc is loaded; if ld.so refuses the library it only warns, and malloc gets them), else
* on glibc, GLIBC_TUNABLES `GLIBC_MALLOC`: no mmap for any block (mmap_max=0: everything comes
  from the heap and is reused), no heap trimming (the peak comes back every step anyway),
  transparent huge pages for the heap and one arena for all threads. Measured on the full SD1.5
  architecture (fp32, 256 px, one thread, process CPU time per step): glibc defaults 4.7-5.0 s
  with 0.33-0.47 million page faults; these tunables 4.12-4.16 s with ~0 faults at the same peak
  RSS; tcmalloc 4.12-4.13 s and 10% less peak RSS.
  Later measurements (2-vCPU AMD EPYC, 2026-12-07): with these tunables the heap still grows
  over the first steps as it fragments (full-UNet DreamBooth with Adafactor's fused pass: live
  heap at most 5.96 GiB, heap 6.18 GiB after the first step and 6.36 GiB after the fourth, peak
  RSS 6.65 GiB); tcmalloc keeps the peak where the first step left it (6.43 GiB) at the same
  step time, and the SD1.5 LoRA peak 4.59 GiB against 4.76-4.77 (10-step runs).

Nothing is changed when SDTRAIN_NO_REEXEC=1 (the opt-out), when the process is already the
re-executed one (SDTRAIN_REEXECED=1), when the user set their own allocator (LD_PRELOAD naming a
malloc library, or glibc.malloc.* tunables), off Linux, or for --help / --dry-run invocations.
Only the console entry (`sdtrain.cli.main.run`) calls this; in-process callers (tests,
CliRunner) never re-execute.
"""

from __future__ import annotations

import os
import subprocess
import sys

OPT_OUT = "SDTRAIN_NO_REEXEC"
GUARD = "SDTRAIN_REEXECED"
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_MALLOC_LIBRARIES = ("tcmalloc", "jemalloc", "mimalloc")
# gperftools prints a stack line for every allocation above this many bytes (default 1 GiB)
_LARGE_ALLOC_REPORT = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
PRIVATE_DIR = "sdtrain-malloc"  # <sys.prefix>/lib/PRIVATE_DIR: the environment's own copy
# mmap_max=0: no block is mmapped (a threshold could not cover the 56-112 MiB buffers: glibc caps
# it at 32 MiB); trim_threshold 64 GiB: never hand the heap top back during a run; hugetlb=1: heap
# growth asks for transparent huge pages (fewer faults and TLB misses; a no-op where THP is off,
# and glibc < 2.35 ignores the name); arena_max=1: every thread allocates from the one heap, so
# no thread arena keeps its own free (huge-page) memory (SD1.5 fp32 LoRA at 256 px, 6 alternating
# 10-step runs each, 2026-12-07: peak RSS 4871-4929 MiB, median 4902, against 4884-4986, median
# 4968, with the same step time; small blocks stay in each thread's tcache without the lock).
GLIBC_MALLOC = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1"
    ":glibc.malloc.arena_max=1"
)
_QUICK_FLAGS = {"--help", "-h", "--dry-run", "--dry_run", "--help-config", "--help_config"}


def find_tcmalloc() -> str | None:
    """Path of a tcmalloc library: the system's (`ldconfig -p`), else this environment's own
    copy (`<sys.prefix>/lib/sdtrain-malloc/`, from scripts/install.sh), else None."""
    return _system_tcmalloc() or _private_tcmalloc()


def _preloadable(path: str) -> bool:
    """ld.so splits LD_PRELOAD at spaces and colons, with no escape: such a path cannot be named."""
    return not any(c.isspace() or c == ":" for c in path)


def _private_tcmalloc() -> str | None:
    for soname in TCMALLOC_NAMES:
        path = os.path.join(sys.prefix, "lib", PRIVATE_DIR, soname)
        if os.path.isfile(path) and _preloadable(path):
            return path
    return None


def _system_tcmalloc() -> str | None:
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            listing = subprocess.run(
                [ldconfig, "-p"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found: dict[str, str] = {}
        for line in listing.splitlines():
            name, _, path = line.strip().partition(" => ")
            soname = name.split(" ", 1)[0]
            if (
                soname in TCMALLOC_NAMES
                and "x86-32" not in name
                and os.path.exists(path)
                and _preloadable(path)
            ):
                found.setdefault(soname, path)
        for soname in TCMALLOC_NAMES:
            if soname in found:
                return found[soname]
        return None
    return None


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


def allocator_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The variables to add to `environ` for a fast allocator, or None to leave it as it is."""
    if environ.get(OPT_OUT) == "1" or environ.get(GUARD) == "1":
        return None
    if not sys.platform.startswith("linux"):
        return None
    preload = environ.get("LD_PRELOAD", "")
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(lib in preload for lib in _MALLOC_LIBRARIES) or "glibc.malloc." in tunables:
        return None
    glibc = (
        {"GLIBC_TUNABLES": f"{tunables}:{GLIBC_MALLOC}" if tunables else GLIBC_MALLOC}
        if _is_glibc()
        else {}
    )
    library = find_tcmalloc()
    if library is not None:
        # the glibc tunables ride along: unused while tcmalloc is loaded, they are what malloc
        # runs with should ld.so refuse the library (it only warns)
        env = {"LD_PRELOAD": f"{library}:{preload}" if preload else library, **glibc}
        if _LARGE_ALLOC_REPORT not in environ:  # no "tcmalloc: large alloc" lines over the bar
            env[_LARGE_ALLOC_REPORT] = str(1 << 40)
        return env
    return glibc or None


def describe(environ: dict[str, str]) -> str | None:
    """What the re-executed process allocates with, for the debug log; None if not re-executed."""
    if environ.get(GUARD) != "1":
        return None
    preload = environ.get("LD_PRELOAD", "")
    for entry in preload.split(":"):
        if any(lib in entry for lib in _MALLOC_LIBRARIES):
            return f"memory allocator: {entry} (preloaded)"
    if GLIBC_MALLOC in environ.get("GLIBC_TUNABLES", ""):
        return "memory allocator: glibc malloc with sdtrain's tunables (no tcmalloc found)"
    return None


def wants_reexec(args: list[str]) -> bool:
    """True for a `train` command that will train (not --help / --dry-run / --help-config)."""
    positional = [a for a in args if not a.startswith("-")]
    return bool(positional) and positional[0] == "train" and not _QUICK_FLAGS & set(args)


def maybe_reexec(args: list[str]) -> None:
    """Re-execute this process once with the allocator environment when `args` train.

    Returns only when nothing needs to change; otherwise the process image is replaced (same
    interpreter, same interpreter options and arguments, SDTRAIN_REEXECED=1 added).
    """
    if not wants_reexec(args) or not hasattr(os, "execve"):
        return
    extra = allocator_env(dict(os.environ))
    if not extra:
        return
    env = {**os.environ, **extra, GUARD: "1"}
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # could not re-execute (unusual interpreter setup): train with what we have
