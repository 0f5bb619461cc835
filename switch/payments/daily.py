"""The daily cut-over: when the business date advances, close the old date and reconcile it.

The business date itself needs no write (every node computes it from the clock), but closing a
date is recorded once, by the active node, fenced by its epoch; then the closed date is
reconciled with the marketing system and anything missing there is re-queued for forwarding.
A reconciliation that fails (the marketing system down or slow) is tried again every
`RETRY_S` until it succeeds, and a date whose cut-over no node saw (every node down, or a
takeover across it) is closed when the active node next looks, back to the last closed date.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from switch import db
from switch.business import BusinessCalendar, next_cutover
from switch.loop import cancel_and_wait
from switch.marketing_client import MarketingClient, MarketingError
from switch.payments.reconcile import ReconReport, reconcile

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.daily")

#: how often the active node retries unreconciled dates and looks for dates it missed
RETRY_S = 600.0
#: how far back it looks (older dates are an operator's: `gridpay recon marketing`)
LOOK_BACK_DAYS = 7


class DailyCutover:
    def __init__(self, node: Node, calendar: BusinessCalendar,
                 marketing: MarketingClient) -> None:
        self.node = node
        self.calendar = calendar
        self.marketing = marketing
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cutover")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def close_date(self, closed: date) -> ReconReport | None:
        """Record the cut-over of `closed` (once), then reconcile it with the marketing system."""
        async with self.node.pool.acquire() as con, con.transaction():
            await db.fence(con, self.node.epoch)
            await con.execute(
                "INSERT INTO cutovers (business_date, node_id, epoch) VALUES ($1, $2, $3)"
                " ON CONFLICT (business_date) DO NOTHING",
                closed, self.node.settings.node.id, self.node.epoch)
            # a date compared before (postings were still queued then) is compared again
            again = await con.fetchval(
                "SELECT reconciled_at IS NOT NULL FROM cutovers WHERE business_date = $1",
                closed)
        try:
            rep = await reconcile(self.node.pool, self.marketing, closed,
                                  epoch=self.node.epoch, calendar=self.calendar,
                                  requeue_dead=not again)
        except MarketingError as e:
            log.warning("reconciliation with the marketing system postponed",
                        extra={"business_date": closed.isoformat(), "error": str(e)})
            return None
        async with self.node.pool.acquire() as con, con.transaction():
            await db.fence(con, self.node.epoch)
            await con.execute(
                "UPDATE cutovers SET reconciled_at = now(), reconciliation = $2::jsonb"
                " WHERE business_date = $1", closed, rep.as_dict())
        level = logging.INFO if rep.clean else logging.WARNING
        log.log(level, "business date reconciled" if rep.complete else
                "business date reconciled; postings still queued: compared again once they "
                "have gone", extra=rep.summary())
        if rep.requeued:
            self.node.components["forwarder"].wake()
        return rep

    async def pending_dates(self) -> list[date]:
        """Closed dates not yet reconciled, and dates after the last closed one that no node
        closed, up to yesterday (within `LOOK_BACK_DAYS`)."""
        today = self.calendar.today()
        since = today - timedelta(days=LOOK_BACK_DAYS)
        rows = await self.node.pool.fetch(
            "SELECT business_date, reconciled_at FROM cutovers WHERE business_date >= $1",
            since)
        out = {r["business_date"] for r in rows if r["reconciled_at"] is None}
        # compared while postings of the date were still queued, and none of them is now:
        # compared again (a posting stuck in the queue keeps its date's report as it is,
        # `queued` naming it, and is not looked at again and again)
        out.update(await self.node.pool.fetchval(
            "SELECT coalesce(array_agg(c.business_date), '{}') FROM cutovers c"
            " WHERE c.business_date >= $1 AND c.reconciliation->>'complete' = 'false'"
            "   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.state = 'pending' AND"
            "       o.posting_id IN (SELECT jsonb_array_elements_text("
            "                        c.reconciliation->'queued')))", since))
        # the last date closed, however long ago (a pair stopped for longer than the window
        # still catches up the window's dates); none at all: a new installation, whose
        # dates are owed from its first payment (within the window) if no node saw their
        # cut-over
        last = await self.node.pool.fetchval("SELECT max(business_date) FROM cutovers")
        first = last + timedelta(days=1) if last is not None else await self.node.pool.fetchval(
            "SELECT min(business_date) FROM payments WHERE business_date >= $1", since)
        if first is not None:
            first = max(first, since)
            out.update(first + timedelta(days=i) for i in range((today - first).days))
        return sorted(d for d in out if d < today)

    async def _catch_up(self) -> bool:
        """Close and reconcile what is pending; False when this node was fenced."""
        for day in await self.pending_dates():
            if not await self._close(day):
                return False
        return True

    async def _close(self, day: date) -> bool:
        """`close_date`, its failure logged; False when this node was fenced (it steps down)."""
        try:
            await self.close_date(day)
        except Exception as e:
            if db.is_fenced(e):
                await self.node.fenced()
                return False
            log.exception("cut-over failed", extra={"business_date": day.isoformat()})
        return True

    async def _run(self) -> None:
        catch_up = True
        while True:
            if catch_up:
                try:
                    if not await self._catch_up():
                        return
                except Exception:  # the database unreachable, say: look again later
                    log.exception("looking for dates to close failed")
            catch_up = True
            now = datetime.now(UTC)
            cut = next_cutover(self.calendar, now)
            to_cut = max(0.0, (cut - now).total_seconds()) + 1.0
            await asyncio.sleep(min(to_cut, RETRY_S))
            if datetime.now(UTC) < cut:
                continue  # a retry round, not a cut-over
            if not await self._close(self.calendar.date_at(cut) - timedelta(days=1)):
                return
            # the date just closed was reconciled, or the attempt failed: either way it is
            # not tried again straight away, but with the next round, `RETRY_S` on
            catch_up = False
