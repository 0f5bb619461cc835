"""The IVR call store against the embedded Redis: the turn lock taken with the read, and the
compare-and-set save that gives the lock back in the same round trip."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from collections.abc import AsyncIterator

import pytest

from switch.ivr import store as store_module
from switch.ivr.dialog import Call
from switch.ivr.store import CallStore, LockNotAcquired, StoreConflict, StoredCall
from switch.redis_pipe import RedisPipe
from tests.nodekit import StallProxy


@pytest.fixture
async def store(clean_redis: str) -> AsyncIterator[CallStore]:
    pipe = RedisPipe(clean_redis)
    try:
        yield CallStore(pipe, idle_s=60, lock_ttl_ms=5000)
    finally:
        await pipe.aclose()


def _new(call_id: str) -> StoredCall:
    return StoredCall(call=Call(call_id=call_id, ani="13800000000", dnis="95598", lang="zh"),
                      turn={"step": "menu"}, start_hash="h")


async def test_hold_reads_under_the_lock_and_save_gives_it_back(store: CallStore) -> None:
    held = await store.hold("c1", wait_s=0.5)
    assert held.stored is None and not held.released
    with pytest.raises(LockNotAcquired):  # a second turn of the same call waits, then gives up
        await store.hold("c1", wait_s=0.1)
    saved = await store.save(_new("c1"), release=held)
    assert saved.version == 1 and held.released
    again = await store.hold("c1", wait_s=0.1)  # free again, and reads what was saved
    assert again.stored is not None and again.stored.version == 1
    assert again.stored.call == saved.call and again.stored.turn == {"step": "menu"}
    await store.release(again)
    assert await store.redis.execute("EXISTS", store.lock_key("c1")) == 0


async def test_a_stale_save_conflicts_and_still_releases_the_lock(store: CallStore) -> None:
    held = await store.hold("c2", wait_s=0.5)
    await store.save(_new("c2"), release=held)
    held = await store.hold("c2", wait_s=0.5)
    with pytest.raises(StoreConflict):
        await store.save(_new("c2"), release=held)  # written over version 0, but it is at 1
    assert held.released
    assert (await store.hold("c2", wait_s=0.1)).stored is not None


async def test_release_only_removes_its_own_lock(store: CallStore) -> None:
    held = await store.hold("c3", wait_s=0.5)
    await store.redis.execute("SET", store.lock_key("c3"), "someone-else")
    await store.release(held)
    assert await store.redis.execute("GET", store.lock_key("c3")) == b"someone-else"


async def test_concurrent_turns_of_one_call_lose_no_update(store: CallStore) -> None:
    held = await store.hold("c4", wait_s=0.5)
    await store.save(_new("c4"), release=held)

    async def one_turn() -> None:
        h = await store.hold("c4", wait_s=10)
        assert h.stored is not None
        call = dataclasses.replace(h.stored.call, turns=h.stored.call.turns + 1)
        await asyncio.sleep(0)  # let the others try meanwhile
        await store.save(dataclasses.replace(h.stored, call=call), release=h)

    await asyncio.gather(*(one_turn() for _ in range(20)))
    final = await store.load("c4")
    assert final is not None and final.call.turns == 20 and final.version == 21


def test_lock_tokens_are_random_128_bit_and_never_repeat() -> None:
    from switch.ivr.store import _token

    tokens = [_token() for _ in range(1000)]  # several refills of the batch
    assert all(len(t) == 32 and set(t) <= set("0123456789abcdef") for t in tokens)
    assert len(set(tokens)) == len(tokens)


async def test_a_turn_lock_left_by_a_stalled_redis_is_taken_back_by_the_next_turn(
        clean_redis: str) -> None:
    # Redis stalled (a stopped process still takes bytes): a turn's hold timed out here, but
    # Redis ran it once it was back and the call's lock was taken under a token no turn knew.
    # The caller's retries were told 409 turn_in_progress until the lock expired (15 s). The
    # store remembers the tokens of the turns that failed on Redis, and the next hold of the
    # call gives their lock back first.
    u = urllib.parse.urlsplit(clean_redis)
    proxy = StallProxy(u.hostname or "127.0.0.1", u.port or 6379)
    port = await proxy.start()
    pipe = RedisPipe(f"redis://127.0.0.1:{port}{u.path}", timeout_s=0.3,
                     connect_timeout_s=0.3, retry_after_s=0.2)
    store = CallStore(pipe, idle_s=60, lock_ttl_ms=15000)
    try:
        held = await store.hold("c9", wait_s=0.5)
        await store.save(_new("c9"), release=held)
        proxy.stall()
        with pytest.raises(Exception) as stalled:
            await store.hold("c9", wait_s=0.5)
        assert not isinstance(stalled.value, LockNotAcquired)
        proxy.resume()  # the stalled hold now runs, and takes the lock
        for _ in range(50):
            if await _lock_of(clean_redis, "c9") is not None:
                break
            await asyncio.sleep(0.05)
        assert await _lock_of(clean_redis, "c9") is not None
        await asyncio.sleep(0.3)  # past the pipe's retry time
        again = await store.hold("c9", wait_s=0.5)
        assert again.stored is not None and again.stored.version == 1
    finally:
        await pipe.aclose()
        await proxy.close()


async def _lock_of(url: str, call_id: str) -> bytes | None:
    pipe = RedisPipe(url)
    try:
        got: bytes | None = await pipe.execute("GET", CallStore.lock_key(call_id))
        return got
    finally:
        await pipe.aclose()


async def test_the_failed_turns_remembered_are_bounded_and_forgotten_once_expired(
        clean_redis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "STALE_CALLS_KEPT", 3)
    pipe = RedisPipe(clean_redis)
    store = CallStore(pipe, idle_s=60, lock_ttl_ms=200)
    try:
        for i in range(5):
            store._failed(f"c{i}", f"t{i}")
        store._failed("c2", "t2b")  # kept, and now the newest
        assert list(store._stale) == ["c3", "c4", "c2"]  # the two oldest gone
        assert store._stale_tokens("c2") == ["t2", "t2b"]
        await asyncio.sleep(0.25)  # past the locks' lifetime: nothing left to let go
        assert store._stale_tokens("c2") == [] and "c2" not in store._stale
        # a hold that finds the lock free forgets the call's failed turns
        store._failed("c4", "t4b")
        await store.hold("c4", wait_s=0.2)
        assert "c4" not in store._stale
    finally:
        await pipe.aclose()
