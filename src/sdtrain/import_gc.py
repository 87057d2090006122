"""Heavy imports with the cyclic garbage collector paused, then frozen.

Why: importing torch, diffusers, transformers, peft and accelerate creates about 730,000 objects
the collector tracks (functions, classes, module dicts), and they live as long as the process.
CPython runs a full collection each time enough objects have reached its oldest generation, and a
full collection walks every tracked object. An SD1.5 LoRA run spent about 1.25 s in 7 full
collections while importing, and they found almost nothing to free (2-vCPU AVX2 EPYC, Python
3.11, 2026-12-07; the model stack's imports alone took 7.3 s in this block against 9.6 s
without it, medians of 4 fresh interpreters each: benchmarks/bench_startup.py).

How: `quiet_gc()` waits for the block's first import of a module that is not loaded yet (a
finder at the front of `sys.meta_path` that finds nothing itself). Only then does it run a full
collection, so nothing unreachable from before the block survives it, and turn the collector off
for the rest of the block. After a block that imported new modules, `gc.freeze()` moves every
object that exists into the permanent generation, which later collections skip, and the
collector is turned back on. The blocks wrap imports, not loading: a CLI run builds its models
after them. What freezing keeps alive for good is what was alive at that point anyway
(module-level objects, the run's config and plan) plus the cyclic leftovers of running the new
modules' bodies (about 10,000 objects). The entry collection is cheap after the first block of a
CLI run, because frozen objects are skipped. A block whose modules are all loaded already (a
second run in the same process, such as a test worker's or a notebook's) leaves the collector
alone: a full collection there would walk the whole heap for nothing (about 1 s a block with 3.5
million tracked objects). Nested blocks, and a process that turned the collector off itself,
leave it as they find it. SDTRAIN_IMPORT_GC=plain leaves the collector alone (A/B).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

OPT_OUT = "SDTRAIN_IMPORT_GC"


class _FirstImport:
    """A meta path finder that finds nothing: the first time the import system asks it for a
    module (it asks only for modules not in sys.modules), it collects and pauses the collector."""

    def __init__(self) -> None:
        self.paused = False

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if not self.paused:
            self.paused = True  # first: a finalizer the collection runs may import too
            gc.collect()  # garbage from before the block must not be frozen with it
            gc.disable()


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Run the block's imports without cyclic collections; when it imported anything, freeze
    what exists after it. A block that imports nothing new leaves the collector alone."""
    opted_out = os.environ.get(OPT_OUT, "").strip().lower() == "plain"
    outer = any(isinstance(finder, _FirstImport) for finder in sys.meta_path)
    if opted_out or outer or not gc.isenabled():  # an outer block (or the process) owns it
        yield
        return
    modules = len(sys.modules)
    first = _FirstImport()
    sys.meta_path.insert(0, first)  # type: ignore[arg-type]
    try:
        yield
    finally:
        if first in sys.meta_path:
            sys.meta_path.remove(first)  # type: ignore[arg-type]
        if first.paused:
            if len(sys.modules) > modules:
                gc.freeze()
            gc.enable()
