"""Card serials: issuer (4) + year (2) + sequence (9) + Luhn check digit (1) = 16 digits."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

from switch.cards.errors import InvalidInput
from switch.loop import SLICE, run_through

SERIAL_LEN = 16
SEQ_LEN = 9
MAX_SEQ = 10**SEQ_LEN - 1
MAX_RANGE = 1_000_000


#: a digit → its double with the digits of the double added (Luhn's doubling)
_DOUBLED = str.maketrans("0123456789", "0246813579")


def luhn_digit(body: str) -> str:
    """The Luhn check digit to append to the ASCII digit string `body`.

    From the right, every other digit of the body (starting with the rightmost, which sits
    next to the check digit) is doubled; the check digit makes the total a multiple of 10.
    The digits are summed as their ASCII codes, in C: half the time of a loop in Python, and
    a million-card reconciliation checks a million serials."""
    rev = body[::-1]
    total = (sum(rev[0::2].translate(_DOUBLED).encode()) + sum(rev[1::2].encode())
             - 48 * len(rev))
    return str(-total % 10)


def digits(text: str) -> bool:
    """Whether `text` is ASCII digits only: `str.isdigit` also takes "²", which int() and
    the serial arithmetic refuse."""
    return text.isascii() and text.isdigit()


def valid_serial(s: str) -> bool:
    """Whether `s` is 16 ASCII digits with a correct Luhn check digit."""
    return (isinstance(s, str) and len(s) == SERIAL_LEN and digits(s)
            and luhn_digit(s[:15]) == s[15])


def not_a_serial(which: str) -> InvalidInput:
    """The refusal of an invalid serial. It does not echo what was sent: refusals are kept in
    the operation log for good, and what was typed into a serial field may be a card's PIN."""
    return InvalidInput(f"{which} is not a valid card serial (16 digits, the last a Luhn "
                        "check digit)", code="invalid_serial")


def make_serial(prefix: str, seq: int) -> str:
    """The serial of sequence number `seq` under a 6-digit prefix (issuer + year)."""
    if len(prefix) != 6 or not digits(prefix):
        raise InvalidInput(f"serial prefix {prefix!r} must be 6 digits")
    if not 0 <= seq <= MAX_SEQ:
        raise InvalidInput(f"serial sequence {seq} is out of range")
    body = f"{prefix}{seq:09d}"
    return body + luhn_digit(body)


def serial_seq(serial: str) -> tuple[str, int]:
    """(prefix, sequence) of a valid serial."""
    return serial[:6], int(serial[6:15])


@dataclass(frozen=True, slots=True)
class SerialRange:
    """An inclusive range of serials with the same prefix."""

    first: str
    last: str

    def __post_init__(self) -> None:
        for s, which in ((self.first, "the range's first serial"),
                         (self.last, "the range's last serial")):
            if not valid_serial(s):
                raise not_a_serial(which)
        if self.first[:6] != self.last[:6]:
            raise InvalidInput(f"range {self.first}..{self.last} spans two prefixes",
                               code="invalid_range")
        if self.last < self.first:
            raise InvalidInput(f"range {self.first}..{self.last} is reversed",
                               code="invalid_range")

    def __len__(self) -> int:
        return serial_seq(self.last)[1] - serial_seq(self.first)[1] + 1

    def __iter__(self) -> Iterator[str]:
        prefix, a = serial_seq(self.first)
        _, b = serial_seq(self.last)
        for seq in range(a, b + 1):  # make_serial without its checks: the range's are done
            body = f"{prefix}{seq:09d}"
            yield body + luhn_digit(body)

    def as_dict(self) -> dict[str, object]:
        return {"first": self.first, "last": self.last, "count": len(self)}


def expand_steps(serials: Iterable[str], ranges: Iterable[SerialRange],
                 limit: int = MAX_RANGE) -> Generator[None, None, list[str]]:
    """Every serial named, singly or by range, without duplicates, in order of mention.

    A generator of steps (see `switch.loop.run_in_turns`): it yields after every `SLICE`
    serials, so that a node expanding a million-card range in a request still answers its
    payments meanwhile."""
    out: dict[str, None] = {}
    named = 0  # serials gone through, listed or in a range: the turns are counted on these
    for i, s in enumerate(serials, 1):
        if not valid_serial(s):
            raise not_a_serial(f"serial {i} of the list")
        out[s] = None
        named += 1
        if named % SLICE == 0:
            yield
    for r in ranges:
        if len(out) + len(r) > limit:
            raise InvalidInput(f"at most {limit} cards per call", code="too_many_cards")
        for s in r:
            out[s] = None
            named += 1
            if named % SLICE == 0:
                yield
    if len(out) > limit:
        raise InvalidInput(f"at most {limit} cards per call", code="too_many_cards")
    return list(out)


def expand(serials: Iterable[str], ranges: Iterable[SerialRange],
           limit: int = MAX_RANGE) -> list[str]:
    """`expand_steps` run through at once."""
    return run_through(expand_steps(serials, ranges, limit))


def compress(serials: Sequence[str]) -> list[SerialRange]:
    """Contiguous runs of a list of serials (sorted first): the shortest list of ranges."""
    out: list[SerialRange] = []
    run_first: str | None = None
    prev: tuple[str, int] | None = None
    prev_serial = ""
    for s in sorted(serials):
        cur = serial_seq(s)
        if prev is not None and cur[0] == prev[0] and cur[1] == prev[1] + 1:
            prev, prev_serial = cur, s
            continue
        if run_first is not None:
            out.append(SerialRange(run_first, prev_serial))
        run_first, prev, prev_serial = s, cur, s
    if run_first is not None:
        out.append(SerialRange(run_first, prev_serial))
    return out
