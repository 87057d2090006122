"""Run `sdtrain` under torchrun (several CPU processes over gloo) from a test, as a user would.

`torchrun --standalone --nproc_per_node N -m sdtrain ARGS...`, through `python -m
torch.distributed.run` of the test's interpreter; each worker gets one intra-op thread (what
torchrun sets anyway), so runs compare across process counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launcher_command(args: list[str], nproc: int = 2) -> list[str]:
    """The command line of a torchrun launch of `python -m sdtrain ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "sdtrain",
        *args,
    ]


def launcher_env() -> dict[str, str]:
    """The environment of a launched run: no allocator re-exec, one thread per worker."""
    env = dict(os.environ, SDTRAIN_NO_REEXEC="1", OMP_NUM_THREADS="1", COLUMNS="400")
    env.pop("SDTRAIN_TEST_SLOW_WRITE", None)
    return env


def start(args: list[str], log: Path, nproc: int = 2) -> subprocess.Popen:
    """Start the launcher in its own process group (as a terminal would), output to `log`."""
    with open(log, "wb") as handle:
        return subprocess.Popen(
            launcher_command(args, nproc),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=launcher_env(),
            start_new_session=True,
        )


def run(args: list[str], log: Path, nproc: int = 2, timeout: float = 600) -> None:
    """Run the launcher to its end; fail with the log's tail unless it exits 0."""
    proc = start(args, log, nproc)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code == 0, f"exit {code}:\n{log.read_text(errors='replace')[-4000:]}"
