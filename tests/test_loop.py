"""The process-wide runtime settings of switch/loop.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest


def test_tune_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    code = ("import gc; from switch.loop import tune_gc, GC_GEN0_THRESHOLD; "
            "before = gc.get_threshold(); tune_gc(); after = gc.get_threshold(); "
            "assert before[0] != GC_GEN0_THRESHOLD, before; "
            "assert after == (GC_GEN0_THRESHOLD, before[1], before[2]), after; "
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_loop_is_uvloop_without_io_uring() -> None:
    out = subprocess.run([sys.executable, "-c",
                          "import os, asyncio; from switch import loop; "
                          "print(os.environ['UV_USE_IO_URING'], "
                          "type(loop.new_event_loop()).__mro__[1].__module__)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["0", "uvloop"], out.stderr


async def test_watch_lag_sees_a_blocked_loop() -> None:
    import time

    from switch.loop import watch_lag

    seen: list[float] = []
    watcher = asyncio.create_task(watch_lag(seen.append, every_s=0.01))
    try:
        await asyncio.sleep(0.05)
        assert seen  # it measures all the time
        time.sleep(0.2)  # noqa: ASYNC251 - the point: the loop is blocked
        await asyncio.sleep(0.05)
        assert max(seen) >= 0.15
    finally:
        watcher.cancel()


async def test_all_or_cancel_stops_the_others_at_the_first_failure() -> None:
    from switch.loop import all_or_cancel

    done: list[str] = []
    cancelled: list[str] = []

    async def worker(name: str, delay: float, fail: bool = False) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        if fail:
            raise KeyError(name)
        done.append(name)

    with pytest.raises(KeyError):  # its own exception, not a group
        await all_or_cancel([worker("fast", 0), worker("bad", 0.01, fail=True),
                             worker("slow", 5)])
    assert done == ["fast"] and cancelled == ["slow"]  # and the slow one is gone already
    await all_or_cancel(worker(n, 0) for n in ("a", "b"))
    assert done == ["fast", "a", "b"]


async def test_cancel_and_wait_ends_the_task_before_returning() -> None:
    from switch.loop import cancel_and_wait

    ended: list[str] = []

    async def worker() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # its own clean-up takes a turn or two
            ended.append("cleaned up")

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and ended == ["cleaned up"]
    await cancel_and_wait(None)
    await cancel_and_wait(task)  # already ended: nothing more happens


async def test_cancel_and_wait_keeps_its_callers_own_cancellation() -> None:
    from switch.loop import cancel_and_wait

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)  # a clean-up that takes a while

    worker = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_and_wait(worker))
    await asyncio.sleep(0.05)
    stopping.cancel()  # a time limit on stopping runs out while it waits
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert stopping.cancelled()


async def test_cancel_and_wait_serves_a_clean_up_after_the_callers_own_cancellation() -> None:
    from switch.loop import cancel_and_wait

    log: list[str] = []

    async def serving() -> None:
        workers = [asyncio.create_task(asyncio.sleep(60)) for _ in range(2)]
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:  # shutting down: stop the workers, then re-raise
            for w in workers:
                await cancel_and_wait(w)
                log.append("worker stopped")
            raise

    task = asyncio.create_task(serving())
    await asyncio.sleep(0.01)
    task.cancel()  # one cancellation, before the clean-up's waits
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["worker stopped", "worker stopped"]

