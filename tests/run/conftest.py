"""Run-level tests reuse the training-run helpers of tests/engine (tiny dataset, configs)."""

from __future__ import annotations

import sys
from pathlib import Path

_ENGINE_TESTS = str(Path(__file__).resolve().parents[1] / "engine")
if _ENGINE_TESTS not in sys.path:
    sys.path.insert(0, _ENGINE_TESTS)

from full_runs import captured, run_dir  # noqa: E402, F401 (fixtures of the full-model run tests)
