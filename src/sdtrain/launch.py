"""The process layout a launcher set up (torchrun, `accelerate launch`), read from the environment.

No torch import: `dataset plan` and config validation need the process count (the global batch
is train_batch_size x processes x accumulation) without loading torch. Training itself takes the
layout from accelerate's `Accelerator`, which reads the same variables.
"""

from __future__ import annotations

import os


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return default


def world_size() -> int:
    """Data-parallel processes of this run (WORLD_SIZE; 1 when started without a launcher)."""
    return max(1, _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1))


def process_rank() -> int:
    """This process's global rank (RANK; 0 without a launcher)."""
    return _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0)


def is_main_process() -> bool:
    """True in the process that writes files and prints (rank 0, or no launcher)."""
    return process_rank() == 0
