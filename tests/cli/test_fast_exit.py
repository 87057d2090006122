"""cli/fast_exit.py: a command that loaded torch ends with os._exit after doing what a normal
exit does that matters (threads joined, atexit handlers run, stdout flushed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdtrain.cli.fast_exit import exit_code

# A child process standing in for a finished command: "torch" is marked as imported (a bare
# module object, so the test does not pay torch's import), a non-daemon thread is still
# writing, and an atexit handler and buffered stdout are pending. A normal exit raises
# SystemExit (and the interpreter's teardown follows); the fast one never returns.
CHILD = """
import atexit, sys, threading, time, types
from pathlib import Path
out = Path(sys.argv[1])
sys.modules.setdefault("torch", types.ModuleType("torch"))
if sys.argv[2] == "traced":
    sys.settrace(lambda *args: None)

atexit.register(lambda: (out / "atexit").write_text("ran"))

def late_writer():
    time.sleep(0.3)
    (out / "thread").write_text("ran")

threading.Thread(target=late_writer).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # never shut down: its idle worker must not block the exit
pool.submit(lambda: (time.sleep(0.2), (out / "pool").write_text("ran")))
sys.stdout.write("buffered output")
from sdtrain.cli.fast_exit import leave
try:
    leave(3)
except SystemExit:  # the normal exit: the interpreter's teardown follows
    (out / "sys-exit").write_text("ran")
    raise
"""


def _run_child(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fast_exit_keeps_threads_atexit_and_output_and_skips_teardown(tmp_path):
    done = _run_child(tmp_path, "plain")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered output"
    assert (tmp_path / "thread").read_text() == "ran"
    assert (tmp_path / "pool").read_text() == "ran"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "sys-exit").exists()  # os._exit: no SystemExit, no teardown


def test_tracer_keeps_the_normal_exit(tmp_path):
    """Under a tracer or profiler (coverage, cProfile, a debugger) the normal exit runs, so
    they can write their results in their own finalization."""
    done = _run_child(tmp_path, "traced")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered output"
    assert (tmp_path / "sys-exit").read_text() == "ran"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_normal_exit_without_torch():
    code = (
        "import sys\nfrom sdtrain.cli.fast_exit import leave\n"
        "try:\n    leave('bad thing')\n"
        "except SystemExit:\n    print('sys-exit', file=sys.stderr)\n    raise\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "sys-exit" in done.stderr  # the normal path: SystemExit was raised
    assert "bad thing" in done.stderr


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (2, 2), (1, 1)])
def test_exit_code_matches_sys_exit(code, status):
    assert exit_code(code) == status


def test_exit_code_prints_a_message(capsys):
    assert exit_code("went wrong") == 1
    assert "went wrong" in capsys.readouterr().err
