"""The event loop every gridpay process runs on: uvloop, with a bounded close.

Closing a uvloop loop runs libuv until its last handles and requests are gone; we have seen
that run never end (rarely, after a long test session with many child processes). A process
that is stopping must not hang there: everything it had to do is done by then, so a watchdog
ends the process if the close takes longer than `CLOSE_TIMEOUT_S`, with the exit status the
caller chose (`exit_status_on_hang`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from typing import Any, TypeVar, cast

# libuv (inside uvloop) may use io_uring; an io_uring instance was open in a process whose
# loop close hung, so it is switched off here, before any loop exists (libuv reads this once).
os.environ.setdefault("UV_USE_IO_URING", "0")

import uvloop  # noqa: E402 - after the environment above

T = TypeVar("T")

CLOSE_TIMEOUT_S = float(os.environ.get("GRIDPAY_LOOP_CLOSE_TIMEOUT_S", "15"))


def _exit_zero() -> int:
    return 0


#: what the process exits with when closing its loop hangs (tests install their own)
exit_status_on_hang: Callable[[], int] = _exit_zero


class Loop(uvloop.Loop):
    def close(self) -> None:
        closed = threading.Event()

        def watchdog() -> None:
            if not closed.wait(CLOSE_TIMEOUT_S):
                os.write(2, b"gridpay: the event loop did not close in time; exiting\n")
                os._exit(exit_status_on_hang())

        threading.Thread(target=watchdog, name="loop-close-watchdog", daemon=True).start()
        try:
            super().close()
        finally:
            closed.set()


def new_event_loop() -> asyncio.AbstractEventLoop:
    return Loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


#: young-generation threshold once a node is serving (CPython's default is 700)
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Garbage-collector settings for a process that is up and serving.

    Everything built while starting (modules, settings, pools, key rings) is frozen out of
    the collector's view, so full collections no longer walk it; and young collections run
    every 50,000 allocations instead of 700. A payment allocates a few hundred short-lived
    objects that reference counting frees at once, so the default threshold ran a collection
    every few payments for nothing, each pausing every link. Measured on the bank scenario:
    p99 at 70 % of the peak 120-139 ms -> 60-91 ms, worst case 152-174 ms -> 76-116 ms.
    Cycles are still collected.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


#: items a long loop over data handles between two turns it gives the event loop: a few
#: milliseconds of work, so that a node going through a day's postings or a million-card file
#: still answers its payments in between
SLICE = 2000


async def in_slices(items: Iterable[T]) -> AsyncIterator[T]:
    """`items`, with a turn for the event loop after every `SLICE` of them (read when called,
    so that a test can make slices small)."""
    every = SLICE
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0:
            await asyncio.sleep(0)


def run_through(steps: Generator[None, None, T]) -> T:
    """What a generator of steps (one that yields now and then, and returns its result) comes
    to, run through at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)


async def run_in_turns(steps: Generator[None, None, T]) -> T:
    """The same, with a turn for the event loop at each of its yields."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)
        await asyncio.sleep(0)


async def all_or_cancel(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run `coros` as tasks together until all are done; the first to fail cancels the others
    (waiting until they are gone), and its own exception is raised, not a group of them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def watch_lag(observe: Callable[[float], None], every_s: float = 0.05) -> None:
    """Measure how late the loop runs a timer due every `every_s`, and hand each delay to
    `observe` (in seconds). A busy or starved loop delays every request it holds by as much:
    this is the figure that says whether latency is spent in the process or outside it."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        observe(max(0.0, loop.time() - due))


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (None: nothing to do) and wait until it has ended. The task's own
    cancellation is swallowed; the caller's is not (a caller cancelled while it waits, by a
    timeout on its stopping say, is still cancelled)."""
    if task is None:
        return
    me = asyncio.current_task()
    before = me.cancelling() if me is not None else 0  # a clean-up after the caller's own
    task.cancel()                                      # cancellation may still wait here
    try:
        await task
    except asyncio.CancelledError:
        if me is not None and me.cancelling() > before:
            raise
