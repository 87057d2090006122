"""Background work for the latent-cache pipeline: ordered prefetch and bounded background writes.

Threads, not processes: PIL decoding/resizing, hashing and file writes release the GIL, and the
results (tensors) stay in one address space without pickling.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """`map(fn, items)` computed by `workers` threads, at most `window` items ahead of the consumer.

    Results come in input order; an exception raised by `fn` surfaces when its item's turn comes.
    Closing the iterator early cancels what has not started. workers <= 0: plain serial map.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    window = max(1, window)
    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtrain-prefetch")
    pending: deque[Future[R]] = deque()
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            for item in source:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class BackgroundWriter:
    """Fire-and-forget calls (file writes) on a few threads, with at most `limit` in flight.

    `submit` blocks only when `limit` calls are outstanding; `close` waits for all of them and
    re-raises the first error. As a context manager, queued calls also finish when the block
    fails (their own errors are then dropped in favour of the block's).
    """

    def __init__(self, workers: int = 2, limit: int = 16) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sdtrain-w")
        self._pending: deque[Future[Any]] = deque()
        self._limit = max(1, limit)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the background (waits for the oldest call if `limit` are pending)."""
        while len(self._pending) >= self._limit:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def close(self) -> None:
        """Wait for every pending call; raise the first error."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # already failing (an error, Ctrl-C): still finish the queued writes, which hold work
        # already done (encoded latents), so a rerun resumes after it; their own errors are
        # secondary to the one propagating
        self._pool.shutdown(wait=True)
        self._pending.clear()
