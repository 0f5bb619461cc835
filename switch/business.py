"""Business date: the date a transaction belongs to, advanced daily at the cut-over time.

The date is a pure function of the instant, the time zone and the cut-over time, so every node
of a pair computes the same date without asking anyone: before the cut-over the business date is
today's local date, from the cut-over on it is tomorrow's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


class BusinessCalendar:
    def __init__(self, tz: ZoneInfo, cutover: time) -> None:
        self.tz = tz
        self.cutover = cutover

    def date_at(self, at: datetime) -> date:
        local = at.astimezone(self.tz)
        if local.time() >= self.cutover:
            return local.date() + timedelta(days=1)
        return local.date()

    def today(self) -> date:
        return self.date_at(datetime.now(UTC))

    def settlement_mmdd(self, d: date) -> str:
        return f"{d.month:02d}{d.day:02d}"  # strftime builds a struct_time: slower, same text

    def date_from_mmdd(self, mmdd: str, ref: date | None = None) -> date:
        """The date (in the year nearest `ref`) of a settlement date given as MMDD."""
        ref = ref or self.today()
        month, day = int(mmdd[:2]), int(mmdd[2:])
        candidates = []
        for year in (ref.year - 1, ref.year, ref.year + 1):
            try:
                candidates.append(date(year, month, day))
            except ValueError:
                continue
        if not candidates:
            raise ValueError(f"no such date {mmdd}")
        return min(candidates, key=lambda d: abs((d - ref).days))


def filing_dates(business_dates: Iterable[date]) -> list[date]:
    """The dates under which the billing system may hold the postings of `business_dates`:
    each and the days either side. It files a posting under the date of its `occurred_at`,
    while our business date advances at the cut-over: from then to midnight they differ by a
    day (and a time zone of its own could move them the other way)."""
    return sorted({d + timedelta(days=k) for d in business_dates for k in (-1, 0, 1)})


def next_cutover(cal: BusinessCalendar, at: datetime) -> datetime:
    local = at.astimezone(cal.tz)
    cut = datetime.combine(local.date(), cal.cutover, tzinfo=cal.tz)
    if local >= cut:
        cut += timedelta(days=1)
    return cut.astimezone(UTC)


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def iso_date(text: str) -> date:
    """A date written YYYY-MM-DD, and only so (`date.fromisoformat` also takes 20261127 and
    2026-W48-5); ValueError otherwise."""
    if not _ISO_DATE.fullmatch(text):
        raise ValueError(f"not a YYYY-MM-DD date: {text!r}")
    return date.fromisoformat(text)
