"""The bank and post-office ISO 8583 links."""


def iso_dedup_key(institution: str, stan: str, transmitted: str) -> str:
    """The idempotency scope of a link payment: the institution, its STAN (field 11) and
    transmission time (field 7), which a retransmission repeats."""
    return f"iso:{institution}:{stan}:{transmitted}"
