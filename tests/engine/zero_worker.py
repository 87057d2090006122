"""A launched `sdtrain` worker whose loss goes NaN at one micro-step of one process.

`accelerate launch ... tests/engine/zero_worker.py train dreambooth run.toml` runs sdtrain's CLI
with micro-step SDTRAIN_TEST_NAN_CALL (0-based, counted per process) of the process with rank
SDTRAIN_TEST_NAN_RANK made NaN, graph kept (the non-finite test of test_zero.py).
"""

from __future__ import annotations

import os
import sys

import sdtrain.engine.step as step_module
from sdtrain.cli.main import run

_real = step_module.micro_step_loss
_calls: list[int] = []


def _loss(ctx, batch, generators, step, timestep=None):
    loss = _real(ctx, batch, generators, step, timestep)
    _calls.append(1)
    here = os.environ.get("RANK") == os.environ["SDTRAIN_TEST_NAN_RANK"]
    if here and len(_calls) - 1 == int(os.environ["SDTRAIN_TEST_NAN_CALL"]):
        return loss * float("nan")
    return loss


step_module.micro_step_loss = _loss
sys.argv = ["sdtrain", *sys.argv[1:]]
run()
