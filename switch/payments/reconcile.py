"""Reconciliation with the marketing system: does it hold exactly our credits for a date?

For one business date, the switch's postings (payments, card recharges and reversals of that
date, from the outbox) are compared with the marketing system's postings around that date
(its own date is the calendar date of `occurred_at`, which can differ from the business date
after the cut-over, so the neighbouring days are read too). Missing postings are re-queued for
forwarding; differences and unknown extras are reported for a person to look at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import asyncpg

from switch import db
from switch.business import BusinessCalendar, filing_dates
from switch.loop import in_slices
from switch.marketing_client import OUR_POSTING_IDS, MarketingClient, Posting

#: the report's lists of posting ids
_LISTS = ("missing", "queued", "different", "extra", "held_but_dead")


@dataclass(slots=True)
class ReconReport:
    business_date: date
    ours: int = 0
    theirs: int = 0
    matched: int = 0
    missing: list[str] = field(default_factory=list)     # ours, not there
    # ours, not there, and still in the queue: not forwarded yet, so not missing (the billing
    # system was down, or the cut-over came before the relay caught up); the date is compared
    # again once they have gone
    queued: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)   # both, other content
    extra: list[str] = field(default_factory=list)       # there, not ours
    requeued: int = 0
    # held by the marketing system but given up here (dead letters): marked sent, so that
    # their reversals go on (when `requeue`), and listed
    held_but_dead: list[str] = field(default_factory=list)
    settled: int = 0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.different or self.extra)

    @property
    def complete(self) -> bool:
        """Whether every posting of the date has been forwarded (or given up)."""
        return not self.queued

    def summary(self, sample: int = 10) -> dict[str, object]:
        """For a log line: every count, and the first `sample` posting ids of each list with
        its length beside it. A bad date can name hundreds of thousands of postings (the
        billing system restored from an old backup, say), which as one log line would be
        megabytes; the whole report is kept with the date's cut-over."""
        out = self.as_dict()
        for name in _LISTS:
            ids = getattr(self, name)
            out[name], out[f"{name}_count"] = ids[:sample], len(ids)
        return out

    def as_dict(self) -> dict[str, object]:
        return {"business_date": self.business_date.isoformat(), "ours": self.ours,
                "theirs": self.theirs, "matched": self.matched, "missing": self.missing,
                "queued": self.queued, "complete": self.complete,
                "different": self.different, "extra": self.extra, "requeued": self.requeued,
                "held_but_dead": self.held_but_dead, "settled": self.settled,
                "clean": self.clean}


_OURS = """
SELECT o.posting_id, o.kind, o.account_no, o.amount, o.state, o.channel, o.occurred_at,
       o.original_posting_id
  FROM outbox o JOIN payments p ON p.id = o.payment_id
  LEFT JOIN reversals r ON r.payment_id = p.id
 WHERE (o.kind <> 'reversal' AND p.business_date = $1)
    OR (o.kind = 'reversal' AND r.business_date = $1)
"""


def _same(p: Posting, row: asyncpg.Record) -> bool:
    """Whether the marketing system holds our posting as we sent it: every field of the
    contract's body. `occurred_at` as an instant, to the second (a system of record may keep
    it at that precision, and in its own zone). A posting id held with other content is a
    collision (the relay's 409): reported, never settled as delivered."""
    return ((p.amount, p.kind, p.account_no, p.channel, p.original_posting_id)
            == (row["amount"], row["kind"], row["account_no"].strip(), row["channel"],
                row["original_posting_id"])
            and abs((p.occurred_at - row["occurred_at"]).total_seconds()) < 1.0)


async def reconcile(pool: asyncpg.Pool, client: MarketingClient, day: date, *,
                    calendar: BusinessCalendar, requeue: bool = True,
                    requeue_dead: bool = True, epoch: int | None = None) -> ReconReport:
    """Compare `day`; re-queue what is missing there (fenced by `epoch` when given: only the
    active node forwards). A stray posting (our id's shape, no outbox row) is reported on the
    business date its time falls in by `calendar`."""
    # A day's postings are hundreds of thousands on a busy date, and this runs on the active
    # node: every loop over them gives the event loop turns (`in_slices`), so that the
    # payments the node answers meanwhile wait milliseconds, not seconds.
    rep = ReconReport(day)
    ours = {r["posting_id"]: r async for r in in_slices(await pool.fetch(_OURS, day))}
    rep.ours = len(ours)
    theirs = {}
    for d in filing_dates([day]):
        async for rec in in_slices(await client.postings_for_date(d)):
            theirs[rec.posting.posting_id] = rec.posting
    async for pid, row in in_slices(ours.items()):
        p = theirs.get(pid)
        if p is None:
            (rep.queued if row["state"] == "pending" else rep.missing).append(pid)
        elif not _same(p, row):
            rep.different.append(pid)
        else:
            rep.matched += 1
            if row["state"] == "dead":
                rep.held_but_dead.append(pid)
    rep.theirs = len(ours.keys() & theirs.keys())
    # looks like ours, not of this date's outbox: is it in the outbox at all? A stray is
    # judged on the business date of its time (by the calendar date of the time, one posted in
    # the hours where the two differ would be looked at by no date's run)
    candidates = [pid async for pid, p in in_slices(theirs.items())
                  if pid not in ours and OUR_POSTING_IDS.fullmatch(pid)
                  and calendar.date_at(p.occurred_at) == day]
    known = {r["posting_id"] for r in await pool.fetch(
        "SELECT posting_id FROM outbox WHERE posting_id = ANY($1::text[])", candidates)}
    rep.extra = sorted(set(candidates) - known)
    if requeue and rep.missing:
        # a dead letter missing there is given one more try; a second look at the same date
        # (`requeue_dead` False) leaves it to a person, or a posting the billing system
        # refuses would be sent again at every look
        again = rep.missing if requeue_dead else [
            pid for pid in rep.missing if ours[pid]["state"] != "dead"]
        rep.requeued = await _mark(pool, _REQUEUE, again, epoch) if again else 0
    if requeue and rep.held_but_dead:
        # the marketing system holds them as we do: they were delivered, whatever answer
        # made the relay give up (a refusal read off a connection that had lost step, say)
        rep.settled = await _mark(pool, _SETTLE, rep.held_but_dead, epoch)
    return rep


# Changes to outbox rows named by posting id ($1), fenced by the epoch in $2 when given: only
# the active node forwards.
_REQUEUE = db.fenced(2, """
UPDATE outbox SET state = 'pending', next_attempt_at = now(), retried_at = now(),
                  first_failed_at = NULL
  FROM {fence}
 WHERE posting_id = ANY($1::text[]) AND state <> 'pending'""")
_SETTLE = db.fenced(2, """
UPDATE outbox SET state = 'sent', sent_at = now(),
                  last_error = 'held by the marketing system at reconciliation'
  FROM {fence}
 WHERE posting_id = ANY($1::text[]) AND state = 'dead'""")


async def _mark(pool: asyncpg.Pool, statement: str, posting_ids: list[str],
                epoch: int | None) -> int:
    """Run `statement` (`_REQUEUE`, `_SETTLE`) on `posting_ids`; how many rows changed."""
    status: str = await pool.execute(statement, posting_ids, epoch)
    return int(status.split()[-1])
