"""Ordered background map (bounded window, order kept, errors in order) and background writes."""

from __future__ import annotations

import threading
import time

import pytest

from sdtrain.engine.background import BackgroundWriter, ordered_map


def test_results_come_in_input_order_even_when_later_items_finish_first():
    def slow_first(i: int) -> int:
        time.sleep(0.02 if i % 3 == 0 else 0.0)
        return i * 10

    assert list(ordered_map(slow_first, range(20), workers=4, window=6)) == [
        i * 10 for i in range(20)
    ]


def test_work_runs_on_other_threads_and_never_more_than_window_ahead():
    started: list[int] = []
    lock = threading.Lock()
    threads: set[str] = set()

    def work(i: int) -> int:
        with lock:
            started.append(i)
            threads.add(threading.current_thread().name)
        return i

    consumed = 0
    for value in ordered_map(work, range(50), workers=3, window=5):
        time.sleep(0.001)  # let the pool run ahead as far as it may
        with lock:
            assert max(started) < consumed + 1 + 5
        assert value == consumed
        consumed += 1
    assert consumed == 50
    assert threading.current_thread().name not in threads


def test_an_error_surfaces_at_its_item_after_the_earlier_results():
    def work(i: int) -> int:
        if i == 3:
            raise ValueError("bad item 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in ordered_map(work, range(10), workers=2, window=4):
            got.append(value)
    assert got == [0, 1, 2]


def test_closing_early_cancels_what_has_not_started():
    calls: list[int] = []

    def work(i: int) -> int:
        calls.append(i)
        time.sleep(0.005)
        return i

    stream = ordered_map(work, range(1000), workers=1, window=3)
    assert next(stream) == 0
    stream.close()
    assert len(calls) < 10


def test_zero_workers_is_a_plain_serial_map_on_this_thread():
    names = []

    def work(i: int) -> int:
        names.append(threading.current_thread().name)
        return -i

    assert list(ordered_map(work, [1, 2, 3], workers=0, window=2)) == [-1, -2, -3]
    assert set(names) == {threading.current_thread().name}


def test_writer_runs_every_call_and_blocks_submit_at_the_limit():
    release = threading.Event()
    done: list[int] = []

    def write(i: int) -> None:
        release.wait(5)
        done.append(i)

    writer = BackgroundWriter(workers=1, limit=2)
    writer.submit(write, 0)
    writer.submit(write, 1)
    third = threading.Thread(target=writer.submit, args=(write, 2))
    third.start()
    third.join(0.05)
    assert third.is_alive()  # two calls pending: the third submit waits
    release.set()
    third.join(5)
    assert not third.is_alive()
    for i in range(3, 10):
        writer.submit(write, i)
    writer.close()
    assert sorted(done) == list(range(10))


def test_writer_close_reraises_a_failed_write():
    def write(i: int) -> None:
        if i == 2:
            raise OSError("disk full")

    writer = BackgroundWriter(workers=1, limit=8)
    for i in range(4):
        writer.submit(write, i)
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_a_failing_block_still_finishes_the_queued_writes():
    release = threading.Event()
    done: list[int] = []

    def write(i: int) -> None:
        release.wait(5)
        done.append(i)

    with pytest.raises(KeyboardInterrupt), BackgroundWriter(workers=1, limit=8) as writer:
        for i in range(4):
            writer.submit(write, i)
        threading.Timer(0.05, release.set).start()  # the writes finish after the failure
        raise KeyboardInterrupt
    assert sorted(done) == [0, 1, 2, 3]
