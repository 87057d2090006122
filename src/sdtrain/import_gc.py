"""Heavy imports with the cyclic garbage collector paused, then frozen.

Why: importing torch, diffusers, transformers, peft and accelerate creates about 730,000 objects
the collector tracks (functions, classes, module dicts), and they live as long as the process.
CPython runs a full collection each time enough objects have reached its oldest generation, and a
full collection walks every tracked object. An SD1.5 LoRA run spent about 1.25 s in 7 full
collections while importing, and they found almost nothing to free (2-vCPU AVX2 EPYC, Python
3.11, 2026-12-07; the model stack's imports alone took 7.3 s in this block against 9.6 s
without it, medians of 4 fresh interpreters each: benchmarks/bench_startup.py).

How: `quiet_gc()` turns the collector off for a block of imports, then `gc.freeze()` moves every
object that exists at that point into the permanent generation, which later collections skip,
and turns the collector back on. It wraps import blocks only, never data or models: frozen
objects are never collected, which is what module-level objects need anyway; what it keeps is the
cyclic leftovers of running module bodies (about 10,000 objects) and of the small config
objects made before the block. A block that imported nothing new (a second run in the same
process, such as a test worker's) freezes nothing, so what earlier runs left for the collector
stays collectable. Nested blocks, and a process that turned the collector off itself, leave it as
they find it.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Run the block's imports without cyclic collections; when it imported anything, freeze
    what exists after it."""
    if not gc.isenabled():  # an outer block (or the process) owns the collector
        yield
        return
    gc.collect(1)  # the young generations only: garbage made just before would stay frozen
    modules = len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > modules:
            gc.freeze()
        gc.enable()
