"""The daily cut-over: when the business date advances, close the old date and reconcile it.

The business date itself needs no write (every node computes it from the clock), but closing a
date is recorded once, by the active node, fenced by its epoch; then the closed date is
reconciled with the marketing system and anything missing there is re-queued for forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from switch import db
from switch.business import BusinessCalendar, next_cutover
from switch.marketing_client import MarketingClient, MarketingError
from switch.payments.reconcile import ReconReport, reconcile

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.daily")


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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close_date(self, closed: date) -> ReconReport | None:
        """Record the cut-over of `closed` (once), then reconcile it with the marketing system."""
        async with self.node.pool.acquire() as con, con.transaction():
            await con.execute("SELECT gridpay_fence($1)", self.node.epoch)
            await con.execute(
                "INSERT INTO cutovers (business_date, node_id, epoch) VALUES ($1, $2, $3)"
                " ON CONFLICT (business_date) DO NOTHING",
                closed, self.node.settings.node.id, self.node.epoch)
        try:
            rep = await reconcile(self.node.pool, self.marketing, closed,
                                  epoch=self.node.epoch, calendar=self.calendar)
        except MarketingError as e:
            log.warning("reconciliation with the marketing system postponed",
                        extra={"business_date": closed.isoformat(), "error": str(e)})
            return None
        level = logging.INFO if rep.clean else logging.WARNING
        log.log(level, "business date reconciled", extra=rep.as_dict())
        if rep.requeued:
            self.node.components["forwarder"].wake()
        return rep

    async def _run(self) -> None:
        while True:
            now = datetime.now(UTC)
            cut = next_cutover(self.calendar, now)
            await asyncio.sleep(max(0.0, (cut - now).total_seconds()) + 1.0)
            closed = self.calendar.date_at(cut) - timedelta(days=1)
            try:
                await self.close_date(closed)
            except Exception as e:
                if db.is_fenced(e):
                    await self.node.fenced()
                    return
                log.exception("cut-over failed", extra={"business_date": closed.isoformat()})
