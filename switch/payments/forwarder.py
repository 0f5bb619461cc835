"""Store-and-forward: relays the outbox to the marketing system, exactly once in effect.

At least once on the wire, with the posting id as the marketing system's idempotency key, so
the credit happens once there. A failed posting is retried with exponential backoff; one still
failing after `dead_letter_after_s` becomes a dead letter (a metric, and an operator command to
retry). A reversal is never sent before its original has been accepted. Runs on the active node
only, and every state change is fenced by the lease epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any, Final

import asyncpg

from switch import db
from switch.config import ForwarderSettings
from switch.loop import cancel_and_wait
from switch.marketing_client import (
    MarketingClient,
    MarketingUnavailable,
    PostingResult,
    encode_posting,
)
from switch.metrics import Metrics

log = logging.getLogger("gridpay.forwarder")

#: how a refused posting's last_error begins (`_DUE_FROM` reads it as `refused_before`)
_REFUSED = "refused: "

# Due postings in the order they fell due. The order matches the partial index
# outbox_pending (next_attempt_at, id) WHERE state = 'pending', so a round reads its `LIMIT`
# rows off the index and stops: ordered by id alone, every round had to read and sort every
# pending row, and a backlog (the marketing system slow or down, or intake outrunning the
# relay) made each round cost more the longer the queue, the wrong way round. A new posting is
# due at its insert, so this is arrival order; a retried one goes by when it is due again.
# A reversal whose original is not sent yet is passed over (not taken) and walked again by the
# next round: those, not the backlog, are what a round reads beyond its batch.
_DUE_FROM = """
SELECT o.id, o.posting_id, o.kind, o.account_no, o.amount, o.original_posting_id, o.channel,
       o.occurred_at, o.attempts, o.next_attempt_at,
       coalesce(o.last_error LIKE '{refused}%', false) AS refused_before
  FROM outbox o
 WHERE o.state = 'pending' AND o.next_attempt_at <= now()
   AND (o.kind <> 'reversal' OR EXISTS (
        SELECT 1 FROM outbox x WHERE x.posting_id = o.original_posting_id AND x.state = 'sent'))
   {after}
 ORDER BY o.next_attempt_at, o.id
 LIMIT $1
"""
_DUE = _DUE_FROM.format(after="", refused=_REFUSED)
# the next batch of a round, read while the one before it is still on the wire (and not yet
# marked sent): it starts after that batch's last row in due order, which the same index
# serves as a range
_DUE_AFTER = _DUE_FROM.format(after="AND (o.next_attempt_at, o.id) > ($2, $3)",
                              refused=_REFUSED)
# The relay's connections are its own, with these settings. Without them, the planner may
# answer the due read with a bitmap scan of every due row and a sort, instead of reading
# `LIMIT` rows off the index in order: it picks that plan when its statistics make pending
# rows look rare (a table never analyzed, or analyzed while the queue was empty), which
# they are until the billing system is slow or down. Then every round reads and sorts the
# whole backlog, and the longer the backlog the slower the relay, the wrong way round.
# Seen in the bank bench (a round's read 5-10 ms with 10 000 pending, the relay falling
# behind at half the peak rate); tests/test_relay_queue.py reproduces it.
#
# And every statement of theirs is planned afresh (`force_custom_plan`): a prepared statement
# otherwise settles on a generic plan after five runs, made for the table as it was then. A
# relay started on a young outbox kept a plan that scanned the whole table to mark a batch
# (seen in the HTTP bench: a mark of ~80 postings cost 3.7 ms at 30 000 rows, 0.6 ms planned
# afresh), and the table only grows. Planning costs a few tens of microseconds a statement, a
# few statements a round.
RELAY_SERVER_SETTINGS: Final = {"enable_bitmapscan": "off",
                                "plan_cache_mode": "force_custom_plan"}
# A round ends after this many batches and the next starts from the head of the queue, so a
# posting passed over (a reversal whose original was not yet marked) waits one round at most
MAX_BATCHES_PER_ROUND = 8

# The marks below find their rows through the primary key, one look-up per posting named.
# Their pending check is written `o.state || '' = 'pending'` on purpose: an expression that
# neither the partial index `outbox_pending` nor the column's statistics can serve. Written
# plainly, the planner estimates the pending rows from statistics that are often wrong in the
# same way as for the due read (never analyzed, or analyzed with the queue empty), and then
# reads every pending row off `outbox_pending` (into a hash, or once per id named) to mark a
# handful: 2.5-4 ms for a mark of 4 postings with 10 000 pending, 11 ms for 256 (measured),
# growing with the backlog. This way the plan is the same in every statistics state (a
# nested loop over the named ids into `outbox_pkey`) and costs what the plain form costs
# when the statistics are right; tests/test_relay_queue.py checks the plan in the bad states.

# every posting of a round that the marketing system accepted, marked in one statement
# (one round trip, its own transaction), fenced by this node's epoch
_SENT = """
WITH fence AS (SELECT gridpay_fence($4::bigint))
UPDATE outbox o
   SET state = 'sent', sent_at = now(), attempts = o.attempts + 1, last_error = NULL,
       arrears_after = u.arrears, prepaid_after = u.prepaid
  FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(id, arrears, prepaid), fence
 WHERE o.id = u.id AND o.state || '' = 'pending'
"""

# postings that failed, each retried later with its own backoff or made a dead letter (a
# refusal at once, any failure after `dead_letter_after_s`); one statement, fenced like _SENT
_FAILED = """
WITH fence AS (SELECT gridpay_fence($6::bigint))
UPDATE outbox o
   SET attempts = o.attempts + 1, last_error = u.error,
       next_attempt_at = now() + make_interval(secs => u.backoff),
       first_failed_at = coalesce(o.first_failed_at, now()),
       state = CASE WHEN u.permanent OR coalesce(o.first_failed_at, now())
                                 < now() - make_interval(secs => $5)
                    THEN 'dead' ELSE 'pending' END
  FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[])
       AS u(id, error, backoff, permanent), fence
 WHERE o.id = u.id AND o.state || '' = 'pending'
"""


@dataclass(frozen=True, slots=True)
class ForwardStats:
    sent: int
    failed: int


class Forwarder:
    def __init__(self, pool: asyncpg.Pool, client: MarketingClient, settings: ForwarderSettings,
                 metrics: Metrics, epoch: Callable[[], int], *, timezone: tzinfo,
                 on_fenced: Callable[[], Awaitable[None]] | None = None) -> None:
        self.pool = pool
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.epoch = epoch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_fenced = on_fenced
        # occurred_at is sent in the business time zone: the marketing system dates a posting
        # by the date of its time as sent, which is then the local day, not the UTC one
        self.timezone = timezone

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="forwarder")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        idle = 0.5
        pause = 0.0  # after rounds that failed: growing, so that a failing round is no loop
        while True:
            try:
                stats = await self.forward_once()
                pause = 0.0
            except Exception as e:
                if db.is_fenced(e):
                    if self._on_fenced:
                        await self._on_fenced()
                    return
                pause = min(5.0, max(0.1, pause * 2))
                log.warning("forwarding round failed", extra={"error": type(e).__name__,
                                                              "retry_in_s": pause})
                await asyncio.sleep(pause)
                stats = ForwardStats(0, 1)
            if stats.sent == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), idle)

    async def forward_once(self) -> ForwardStats:
        """Forward every posting due now (one round); returns what happened.

        The round reads the queue a batch at a time in due order. While a batch is on the
        wire, the next one is read (after its last row) and the one before is marked sent,
        so the pipe to the marketing system does not stand empty while the database is asked.
        A round is at most `MAX_BATCHES_PER_ROUND` batches: a posting passed over meanwhile
        (a reversal whose original was not yet marked sent) waits for the next round, which
        starts from the head of the queue. A mark refused (this node was fenced) ends the
        round before the batch after next is sent."""
        batch = self.settings.batch
        rows = await self.pool.fetch(_DUE, batch)
        sent = failed = 0
        marks: list[asyncio.Task[None]] = []
        try:
            for n in range(1, MAX_BATCHES_PER_ROUND + 1):
                if not rows:
                    break
                # every mark but the latest must have gone through before another batch
                # goes out: a refused one (this node was fenced) stops the round, so a node
                # that lost the lease posts at most the batch after the one refused
                for mark in marks[:-1]:
                    await mark
                last = rows[-1]
                ahead = (asyncio.ensure_future(self.pool.fetch(
                    _DUE_AFTER, batch, last["next_attempt_at"], last["id"]))
                    if len(rows) == batch and n < MAX_BATCHES_PER_ROUND else None)
                try:
                    results = await self._send_all(rows)
                except BaseException:
                    if ahead is not None:
                        ahead.cancel()
                    raise
                accepted = [(row, res) for row, res in zip(rows, results, strict=True)
                            if res is not None]
                sent += len(accepted)
                failed += len(rows) - len(accepted)
                if accepted:
                    marks.append(asyncio.ensure_future(self._mark_sent(accepted)))
                rows = await ahead if ahead is not None else []
        finally:
            # every mark is waited for (a fenced one raises here), also when sending failed
            done = await asyncio.gather(*marks, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        return ForwardStats(sent, failed)

    async def _send_all(self, rows: list[Any]) -> list[PostingResult | None]:
        """Send a batch; each posting's result when accepted (the caller marks it sent), else
        None, its failure recorded. The postings go out together, `concurrency` in flight,
        with no task or `Posting` object per posting: a forwarded posting is on every
        payment's cost, in the same process."""
        tz = self.timezone
        outcomes = await self.client.post_many([
            (row["posting_id"], encode_posting(
                posting_id=row["posting_id"], account_no=row["account_no"],
                amount=row["amount"], kind=row["kind"], channel=row["channel"],
                occurred_at=row["occurred_at"].astimezone(tz),
                original_posting_id=row["original_posting_id"]))
            for row in rows])
        results: list[PostingResult | None] = []
        failed: list[tuple[Any, str, bool]] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, PostingResult):
                results.append(outcome)
                continue
            results.append(None)
            if isinstance(outcome, MarketingUnavailable):
                failed.append((row, f"unavailable: {outcome}", False))
            else:
                # A refusal names no posting, so one read off a pipelined connection that had
                # lost step (a server or middlebox that answered some request twice) cannot
                # be told from a real one, and a posting the billing system holds would be
                # given up, its reversal held behind it for good. So it is tried once more,
                # after the backoff; refused on two attempts in a row, it is a dead letter,
                # for a person to look at.
                again = bool(row["refused_before"])
                log.log(logging.ERROR if again else logging.WARNING,
                        "marketing system refused a posting again: dead letter" if again else
                        "marketing system refused a posting: tried once more before giving up",
                        extra={"posting_id": row["posting_id"], "error": str(outcome)})
                failed.append((row, f"{_REFUSED}{outcome}", again))
        if failed:
            await self._failed(failed)  # counted once recorded (a fenced node records none)
            dead = sum(permanent for _, _, permanent in failed)
            if dead:
                self.metrics.child(self.metrics.forwarded, "dead").inc(dead)
            if len(failed) > dead:
                self.metrics.child(self.metrics.forwarded, "retry").inc(len(failed) - dead)
        return results

    async def _mark_sent(self, accepted: list[tuple[Any, PostingResult]]) -> None:
        # One fenced transaction (one commit) for the whole batch. A crash before it commits
        # only means these postings are sent again: the marketing system answers a repeated
        # posting id with the stored result, so the credit still happens once.
        await self.pool.execute(_SENT, [row["id"] for row, _ in accepted],
                                [res.arrears_after for _, res in accepted],
                                [res.prepaid_balance_after for _, res in accepted],
                                self.epoch())
        self.metrics.child(self.metrics.forwarded, "sent").inc(len(accepted))

    def _backoff(self, attempts: int) -> float:
        base = self.settings.backoff_initial_s * (2 ** min(attempts, 20))
        return float(min(self.settings.backoff_max_s, base) * (0.5 + random.random() / 2))

    async def _failed(self, failed: list[tuple[Any, str, bool]]) -> None:
        """Record failed postings (row, error, permanent) in one fenced statement."""
        await self.pool.execute(
            _FAILED, [row["id"] for row, _, _ in failed], [e[:500] for _, e, _ in failed],
            [self._backoff(row["attempts"]) for row, _, _ in failed],
            [permanent for _, _, permanent in failed], self.settings.dead_letter_after_s,
            self.epoch())


async def retry_dead_letters(pool: asyncpg.Pool) -> int:
    """Operator command: put every dead letter back in the queue, due now."""
    status = await pool.execute(
        "UPDATE outbox SET state = 'pending', next_attempt_at = now(), attempts = 0,"
        " retried_at = now(), first_failed_at = NULL WHERE state = 'dead'")
    return int(status.split()[-1])


_QUEUE_COUNTS = ("SELECT (SELECT count(*) FROM outbox WHERE state = 'pending') AS pending,"
                 "       (SELECT count(*) FROM outbox WHERE state = 'dead') AS dead")


async def queue_counts(pool: asyncpg.Pool) -> tuple[int, int]:
    """(pending, dead): read off the two partial indexes, not the whole outbox, so that a
    metrics scrape costs the size of the queue, not of the history."""
    row = await pool.fetchrow(_QUEUE_COUNTS)
    assert row is not None
    return int(row["pending"]), int(row["dead"])


async def outbox_counts(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT state, count(*) AS n FROM outbox GROUP BY state")
    out = {"pending": 0, "sent": 0, "dead": 0}
    out.update({r["state"]: int(r["n"]) for r in rows})
    return out
