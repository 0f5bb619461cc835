"""The daily reconciliation file of one institution and business date.

Plain text, UTF-8, one record per line, fields separated by `|` (documented in
docs/bank-interface.md):

    H|<institution>|<YYYYMMDD>|<payments>|<paid>|<reversals>|<reversed>|<generated at>
    D|<stan>|<MMDDhhmmss>|<rrn>|<account>|<amount>|<receipt>|<approval>|<status>|<approved at>
    ...
    T|<number of D lines>

Every payment approved that business date is a D line (status `approved`, or `reversed` when a
same-day reversal took it back); the header's figures are the ones the switch answers in 0510.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import asyncpg

from switch.links.service import institution_totals


async def export(pool: asyncpg.Pool, institution: str, day: date) -> str:
    n_pay, n_rev, a_pay, a_rev = await institution_totals(pool, institution, day)
    rows = await pool.fetch(
        "SELECT stan, transmitted, rrn, account_no, amount, receipt_no, approval_code,"
        "       reversed_at, created_at FROM payments"
        " WHERE institution_id = $1 AND business_date = $2 ORDER BY created_at, receipt_no",
        institution, day)
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [f"H|{institution}|{day:%Y%m%d}|{n_pay}|{a_pay}|{n_rev}|{a_rev}|{generated}"]
    for r in rows:
        status = "reversed" if r["reversed_at"] is not None else "approved"
        lines.append("|".join([
            "D", r["stan"] or "", r["transmitted"] or "", r["rrn"] or "",
            r["account_no"], str(r["amount"]), r["receipt_no"], r["approval_code"] or "",
            status, r["created_at"].isoformat(timespec="seconds")]))
    lines.append(f"T|{len(rows)}")
    return "\n".join(lines) + "\n"
