"""Graceful stop on Ctrl-C / SIGTERM: finish the current step, save a state, exit 130.

A second signal aborts immediately; atomic writes guarantee no existing file is damaged.
With several processes the loop agrees on the stop (an all-reduce of every process's flag), so
all stop after the same step; Ctrl-C in a terminal reaches every worker *and* the launcher,
which forwards it once more, so a second signal within `grace` seconds of the first counts as
the same request.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from types import FrameType

logger = logging.getLogger(__name__)


class StopFlag:
    """Installs SIGINT/SIGTERM handlers for the duration of a `with` block."""

    def __init__(self, grace: float = 0.0) -> None:
        self.requested: str | None = None
        self.grace = grace
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and time.monotonic() - self._first < self.grace:
            return  # the launcher forwarding the same Ctrl-C
        if self.requested is not None:
            from sdtrain.errors import Interrupted

            # Interrupted (exit 130), not KeyboardInterrupt: click would turn that into exit 1
            raise Interrupted(
                f"second {signal.Signals(signum).name}: aborted at once, no state written for "
                "the step in progress (files already written stay intact)",
                hint="run the same command with --resume auto to continue from the newest "
                "complete state",
            )
        self.requested = signal.Signals(signum).name
        self._first = time.monotonic()
        logger.warning(
            "%s received: finishing the current step and writing a state "
            "(press Ctrl-C again to abort at once)",
            self.requested,
        )

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (some test runners)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
