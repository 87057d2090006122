"""Model weights load into ordinary 4 KiB pages, even where the heap asks for huge pages.

Why: `sdtrain train` runs with glibc's `hugetlb=1` tunable (cli/allocator.py), so heap growth
asks for transparent huge pages. When the page cache is full (the model file was just read),
the kernel must compact memory to find each 2 MiB page, and it does that at the page fault.
Measured on the full SD1.5 architecture, fp16 folder loaded as fp32, 2-vCPU EPYC: the load
alone took 5.3-10.2 s with huge pages against 3.3-3.6 s with 4 KiB pages, for the same peak RSS.
`small_pages()` switches transparent huge pages off for the process (Linux
`prctl(PR_SET_THP_DISABLE)`) for the length of the load, and back on after it, so the training
step's buffers still get them. Off Linux, or where the process already had them off, it does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42


def _prctl() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # prctl(int option, unsigned long arg2, ...): unused arguments must be 0 in all 64 bits
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    return prctl


def huge_pages_disabled() -> bool | None:
    """Whether transparent huge pages are off for this process (None: cannot tell)."""
    prctl = _prctl()
    if prctl is None:
        return None
    state = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)  # type: ignore[operator]
    return None if state < 0 else bool(state)


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """No transparent huge pages for memory first touched inside the block (see the module)."""
    prctl = _prctl()
    if prctl is None or huge_pages_disabled() is not False:
        yield
        return
    if prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:  # type: ignore[operator]
        yield
        return
    try:
        yield
    finally:
        prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)  # type: ignore[operator]
