"""The spool's IO thread (store/io_thread.py): order, results, errors and stopping, on a real thread and loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from store.io_thread import IoThread


def test_work_runs_in_one_other_thread_in_the_order_given_and_each_future_gets_its_result() -> None:
    async def scenario() -> None:
        io = IoThread("test-io")
        io.start()
        seen: list[tuple[int, int]] = []

        def work(index: int) -> int:
            time.sleep(0.001 if index % 3 == 0 else 0)  # uneven work: order must not follow speed
            seen.append((index, threading.get_ident()))
            return index * 2

        results = await asyncio.gather(*(io.run(work, index) for index in range(50)))
        await io.stop()
        assert results == [index * 2 for index in range(50)]
        assert [index for index, _ in seen] == list(range(50))
        assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()

    asyncio.run(scenario())


def test_an_error_reaches_the_caller_and_the_next_work_still_runs() -> None:
    async def scenario() -> None:
        io = IoThread("test-io")
        io.start()

        def fail() -> None:
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            await io.run(fail)
        assert await io.run(len, "after") == 5
        await io.stop()

    asyncio.run(scenario())


def test_a_cancelled_caller_does_not_withdraw_its_work_and_stop_waits_for_what_was_handed_over() -> None:
    async def scenario() -> None:
        io = IoThread("test-io")
        io.start()
        done: list[str] = []

        def slow(name: str) -> None:
            time.sleep(0.05)
            done.append(name)

        first = io.run(slow, "cancelled")
        first.cancel()
        io.run(slow, "pending")
        await io.stop()  # returns once both ran: a write handed over is never dropped by its caller's time-out
        assert done == ["cancelled", "pending"]

    asyncio.run(scenario())
