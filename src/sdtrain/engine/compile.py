"""`torch_compile`: the U-Net (and any text encoder that trains) compiled with torch.compile.

The reference's `--torch_compile --dynamo_backend X` hands the backend to accelerate, which wraps
each prepared model in `torch.compile`. Here each module is compiled in place
(`nn.Module.compile`): its state dict, hooks and parameters stay those of the module, so saves,
states, adapters and the distributed wrappers see no difference. Shapes are static
(`dynamic=False`): one graph per bucket shape (and per batch size, an epoch's last batch of a
bucket may be smaller), with dynamo's recompile limit raised to cover every shape the plan has.
Validation and sampling run the same modules eagerly (`torch.compiler.set_stance`): they run
without gradients at other shapes, which would only add compilations.

Refused by name (exit 2, the key): a backend this torch has not registered or whose package is
missing, inductor without a C++ compiler (CPU) or triton (CUDA), CUDA graphs (`cudagraphs`,
`dynamo_mode = "reduce-overhead"`) without CUDA, DeepSpeed, and frozen weights kept half
(SDTRAIN_FROZEN_HALF=1, whose per-layer up-cast mode wraps the forward). On a CPU it is allowed
with a warning: on the SD1.5 LoRA benchmark (fp32, 256 px, 2-vCPU EPYC, 2026-12-07) inductor
compiled for about 130 s and then stepped in 3.63 s against eager's 2.95 s, with a peak RSS of
7.81 GiB against 4.83 (README, Speed).

Exactness: a compiled graph gives the same bits for the same inputs every time, so a resumed run
(which compiles the same graphs again) continues bit-identically; against eager, inductor's
fused kernels round differently (float rounding only): random ops (LoRA dropout) run torch's own
kernels (`fallback_random`), so a compiled run draws the eager run's masks. `eager` and
`aot_eager` run torch's own kernels throughout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from sdtrain.errors import ConfigError, Problem

if TYPE_CHECKING:
    import torch

    from sdtrain.config.sections import TrainingSection

logger = logging.getLogger("sdtrain.engine.compile")

KEY = "training.dynamo_backend"
# backends torch registers whose work needs another package
NEEDS_PACKAGE = {
    "tvm": "tvm",
    "onnxrt": "onnxruntime",
    "ipex": "intel_extension_for_pytorch",
    "tensorrt": "torch_tensorrt",
    "fx2trt": "torch_tensorrt",
    "openxla": "torch_xla",
}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# the run config's backend names that torch can register
KNOWN = frozenset({"eager", "aot_eager", "inductor", "cudagraphs", *NEEDS_PACKAGE})


def _refuse(key: str, message: str, hint: str) -> ConfigError:
    return ConfigError([Problem(key=key, message=message, hint=hint)])


def preflight(training: TrainingSection, device_type: str, deepspeed: bool) -> None:
    """Refuses (ConfigError) what cannot compile here; run before any model work."""
    if training.compile_backend is not None:
        check_backend(training.compile_backend, _mode(training), device_type, deepspeed)


def _mode(training: TrainingSection) -> str | None:
    return training.dynamo_mode if training.dynamo_mode not in (None, "default") else None


def check_backend(backend: str, mode: str | None, device_type: str, deepspeed: bool) -> None:
    """Refuses (ConfigError) what cannot compile here."""
    import torch._dynamo

    if deepspeed:
        raise _refuse(
            "training.torch_compile",
            "torch_compile with DeepSpeed is not supported",
            "drop torch_compile, or train without DeepSpeed",
        )
    registered = torch._dynamo.list_backends(exclude_tags=())
    if backend not in registered:
        raise _refuse(
            KEY,
            f"dynamo_backend '{backend}' is not registered in torch {torch.__version__}",
            "use one of "
            + ", ".join(
                name
                for name in sorted(set(registered) & KNOWN)
                if name not in NEEDS_PACKAGE or importlib.util.find_spec(NEEDS_PACKAGE[name])
            ),
        )
    package = NEEDS_PACKAGE.get(backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise _refuse(
            KEY,
            f"dynamo_backend '{backend}' needs the `{package}` package, which is not installed",
            "install it, or use dynamo_backend = 'inductor'",
        )
    cuda_graphs = backend == "cudagraphs" or mode == "reduce-overhead"
    if cuda_graphs and device_type != "cuda":
        if backend == "cudagraphs":
            key, what, hint = KEY, "dynamo_backend 'cudagraphs'", "dynamo_backend = 'inductor'"
        else:
            key, what, hint = "training.dynamo_mode", f"dynamo_mode '{mode}'", "the default mode"
        raise _refuse(
            key, f"{what} captures CUDA graphs; this run is on {device_type}", f"use {hint} here"
        )
    if backend == "inductor" and device_type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            raise _refuse(
                KEY,
                f"inductor on a CPU compiles C++ and `{compiler}` is not on PATH",
                "install g++ (or set CXX), or use dynamo_backend = 'aot_eager'",
            )
    if backend == "inductor" and device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise _refuse(
                KEY,
                "inductor on CUDA generates triton kernels and triton is not installed",
                "install triton (it comes with torch's CUDA wheels), or use 'aot_eager'",
            )


class Compiled:
    """The run's compiled modules: `eager()` runs them uncompiled for a while, `mark_step()`
    starts a CUDA-graph step (with cudagraph trees, each training step's replays are one
    generation; a no-op otherwise)."""

    def __init__(self, cuda_graphs: bool) -> None:
        self.cuda_graphs = cuda_graphs

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        import torch

        with torch.compiler.set_stance("force_eager"):
            yield

    def mark_step(self) -> None:
        if self.cuda_graphs:
            import torch

            torch.compiler.cudagraph_mark_step_begin()


def compile_modules(
    training: TrainingSection,
    modules: Sequence[torch.nn.Module],
    device_type: str,
    shapes: int,
    deepspeed: bool = False,
    frozen_half: bool = False,
) -> Compiled | None:
    """Compiles `modules` in place as the run asks (None: not compiled); `shapes` is how many
    distinct batch shapes the plan has (each compiles once); `frozen_half`: the forward up-casts
    half frozen weights per layer (engine/halfweights.py), refused."""
    backend = training.compile_backend
    if backend is None:
        return None
    mode = _mode(training)
    check_backend(backend, mode, device_type, deepspeed)
    if frozen_half:
        raise _refuse(
            "training.torch_compile",
            "torch_compile with frozen weights kept half (SDTRAIN_FROZEN_HALF=1) is not supported",
            "unset SDTRAIN_FROZEN_HALF, or drop torch_compile",
        )
    import torch._dynamo
    import torch._dynamo.config

    # a run starts from no compiled code, as a fresh process does (in-process runs, tests):
    # every module's graphs hang off the one shared `nn.Module._call_impl` frame
    torch._dynamo.reset()
    # every compiled module's graphs are entries of the one `_call_impl` frame: one per shape
    # for the U-Net and for a text encoder, and a few for guard changes (a text encoder frozen
    # mid-run); validation and sampling run eagerly and add none
    needed = 2 * max(shapes, 1) + 4
    if torch._dynamo.config.recompile_limit < needed:
        torch._dynamo.config.recompile_limit = needed
    if torch._dynamo.config.accumulated_recompile_limit < needed * 4:
        torch._dynamo.config.accumulated_recompile_limit = needed * 4
    if backend == "inductor":
        import torch._inductor.config

        # dropout and other random ops draw from torch's generators as in eager, so a compiled
        # run sees the eager run's masks (inductor's own random kernels draw other numbers)
        torch._inductor.config.fallback_random = True
    for module in modules:
        module.compile(backend=backend, mode=mode, dynamic=False)
    if device_type == "cpu":
        logger.warning(
            "torch_compile on a CPU: the first step of each batch shape compiles (minutes for "
            "SD-sized models), and on the SD1.5 LoRA benchmark the compiled step was slower "
            "than eager with more memory (README, Speed); set torch_compile = false to compare"
        )
    logger.info(
        "torch.compile: %s%s, %d module(s), static shapes (%d in the plan)",
        backend,
        f" ({mode})" if mode else "",
        len(modules),
        shapes,
    )
    return Compiled(device_type == "cuda" and (backend == "cudagraphs" or mode in CUDA_GRAPH_MODES))
