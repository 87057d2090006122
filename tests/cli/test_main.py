"""The CLI root: version, help without heavy imports, exit codes and the error renderer."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "onnxruntime")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdtrain", *args], capture_output=True, text=True, timeout=120
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("sdtrain ")


def test_help_imports_no_heavy_library():
    code = (
        "import sys, json\nsys.argv=['sdtrain','--help']\nfrom sdtrain.cli.main import run\n"
        "try:\n    run()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    assert "Usage" in result.stdout


def test_unknown_command_is_usage_error():
    result = run_cli("no-such-command")
    assert result.returncode == 2
