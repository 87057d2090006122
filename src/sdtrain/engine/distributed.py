"""The processes a run trains on, through accelerate's `Accelerator` (one or many, GPU or CPU).

accelerate supplies the process group (torchrun / `accelerate launch` / a plain start), device
placement, DDP wrapping, autocast and the fp16 loss scaler. The engine keeps what accelerate
cannot know: the deterministic global-batch sharding (data.batches.process_share), per-sample
seeds, and the rule that decisions (non-finite guard, Ctrl-C stop, saves) are agreed across
processes and that only the main process writes files.

Supported: one process, several GPUs (DDP, one machine or several, from accelerate's config),
several CPU processes (gloo), and DeepSpeed ZeRO stage 1/2 for the full-model methods
(engine/zero.py). Refused by name: FSDP, Megatron-LM, XLA/TPU, accelerate's own dynamo
compilation (the run config's `torch_compile` compiles in place, engine/compile.py) and
accelerate-level gradient accumulation (sdtrain accumulates itself).

The process layout (count, rank) is read from torch.distributed once its group is up: under
DeepSpeed on CPUs, accelerate reports process 0 of 1 in every process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdtrain.errors import TrainingError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_SUPPORTED = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED")
_WHY = {
    "FSDP": "FSDP shards parameters; sdtrain's exports and states read whole parameters",
    "MEGATRON_LM": "Megatron-LM needs model-parallel model code",
    "XLA": "TPU/XLA is not supported",
}


def make_accelerator(mixed_precision: str, unused_parameters: bool = False) -> Any:
    """An `Accelerator` for this process, from the launcher's environment and accelerate's
    config; `mixed_precision` comes from [training] (it wins over the launcher's flag).
    `unused_parameters`: some trained parameters get no gradient in a step (the text encoder's
    last layers with clip_skip > 1), which DDP must be told, or it stops at the second step.

    Raises TrainingError for distributed modes sdtrain does not support, naming the mode.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != mixed_precision:
        logger.warning(
            "the launcher asked for mixed precision %s; [training] mixed_precision = %s wins",
            launcher,
            mixed_precision,
        )
    # several runs in one Python process (tests, notebooks) may differ in mixed precision;
    # the process group (PartialState) is kept
    AcceleratorState._reset_state()
    GradientState._reset_state()
    from sdtrain.engine.zero import zero_requested

    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        # accelerate ignores a DeepSpeed config when told cpu=True; its CPU engine is fine
        cpu=not torch.cuda.is_available() and not zero_requested(),
        gradient_accumulation_steps=1,
        # frozen buffers are identical everywhere: no broadcast before every forward
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                broadcast_buffers=False, find_unused_parameters=unused_parameters
            )
        ],
    )
    kind = accelerator.distributed_type.name
    if kind not in _SUPPORTED:
        raise TrainingError(
            f"accelerate distributed_type {kind} is not supported: {_WHY.get(kind, kind)}",
            hint="use data-parallel training (MULTI_GPU, `accelerate config` without FSDP, or "
            "torchrun), or DeepSpeed ZeRO-2 for full-model training",
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise TrainingError(
            "accelerate's gradient_accumulation_steps "
            f"({accelerator.gradient_accumulation_steps}) is not used by sdtrain",
            hint="set [training] gradient_accumulation_steps instead and leave accelerate's at 1",
        )
    dynamo = getattr(getattr(accelerator.state, "dynamo_plugin", None), "backend", None)
    if dynamo is not None and str(getattr(dynamo, "name", dynamo)).upper() not in ("NO", "NONE"):
        raise TrainingError(
            f"accelerate dynamo_backend {dynamo} is not supported: it would compile the whole "
            "prepared step",
            hint="set dynamo_backend to NO in the accelerate config and use [training] "
            "torch_compile = true with dynamo_backend in the run config",
        )
    return accelerator


def device_of(accelerator: Any) -> torch.device:
    """The accelerator's device, with the CPU spelled plainly ("cpu", not "cpu:0")."""
    import torch

    device = torch.device(accelerator.device)
    return torch.device("cpu") if device.type == "cpu" else device


@dataclass
class Processes:
    """This process's place among the run's processes, and the few collectives the loop uses."""

    accelerator: Any

    @property
    def count(self) -> int:
        group = _group()
        return group.get_world_size() if group else int(self.accelerator.num_processes)

    @property
    def index(self) -> int:
        group = _group()
        return group.get_rank() if group else int(self.accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def agree_on_device(self, values: torch.Tensor) -> torch.Tensor:
        """Sums of `values` (a 1-d float64 tensor) over all processes, left on the device (no
        host read; no collective on one process)."""
        group = _group()
        if group is not None and self.count > 1:
            values = values.clone()
            group.all_reduce(values, op=group.ReduceOp.SUM)
        return values

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on (no-op on one)."""
        group = _group()
        if group is not None and self.count > 1:
            group.barrier()

    def close(self) -> None:
        """Destroy the process group, if one is up: left to interpreter exit, gloo's threads
        can be torn down while running and abort a process that finished its work
        ("terminate called without an active exception", seen under `accelerate launch`)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[bool]:
        """The main process runs the block first (writing files); the others run it after, to
        read what it wrote. Yields whether this process is the main one."""
        if not self.is_main:
            self.wait()
        try:
            yield self.is_main
        finally:
            if self.is_main:
                self.wait()


def _group() -> Any:
    """torch.distributed when its process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def ignore_frozen(module: torch.nn.Module) -> None:
    """Tell DDP to leave frozen parameters and all buffers alone (they are loaded identically
    by every process): no broadcast of the whole base model when the wrapper is built."""
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, p in module.named_parameters() if not p.requires_grad]
    names += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
