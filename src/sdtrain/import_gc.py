"""Heavy imports with the cyclic garbage collector paused, then frozen.

Why: importing torch, diffusers, transformers, peft and accelerate creates about 730,000 objects
the collector tracks (functions, classes, module dicts), and they live as long as the process.
CPython runs a full collection each time enough objects have reached its oldest generation, and a
full collection walks every tracked object. An SD1.5 LoRA run spent about 1.25 s in 7 full
collections while importing, and they found almost nothing to free (2-vCPU AVX2 EPYC, Python
3.11, 2026-12-07; the model stack's imports alone took 7.3 s in this block against 9.6 s
without it, medians of 4 fresh interpreters each: benchmarks/bench_startup.py).

How: `quiet_gc()` first runs a full collection, so nothing unreachable from before the block
survives it, then turns the collector off for the block. When the block imported new modules,
`gc.freeze()` then moves every object that exists into the permanent generation, which later
collections skip; the collector is turned back on either way. The blocks wrap imports, not
loading: a CLI run builds its models after them. What freezing keeps alive for good is what was
alive at that point anyway (module-level objects, the run's config and plan) plus the cyclic
leftovers of running the new modules' bodies (about 10,000 objects). The entry collection is
cheap after the first block of a run, because frozen objects are skipped. A block that imports
nothing new freezes nothing (a second run in the same process, such as a test worker's).
Nested blocks, and a process that turned the collector off itself, leave it as they find it.
SDTRAIN_IMPORT_GC=plain leaves the collector alone (A/B).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

OPT_OUT = "SDTRAIN_IMPORT_GC"


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Run the block's imports without cyclic collections; when it imported anything, freeze
    what exists after it."""
    opted_out = os.environ.get(OPT_OUT, "").strip().lower() == "plain"
    if opted_out or not gc.isenabled():  # an outer block (or the process) owns the collector
        yield
        return
    gc.collect()  # garbage from before the block must not be frozen with it
    modules = len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > modules:
            gc.freeze()
        gc.enable()
