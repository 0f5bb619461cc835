"""The manufacturer files (formats in docs/card-files.md) and the reconciliation (pure code).

New-card file (switch → manufacturer), one record per line, fields separated by `|`:

    H|GRIDPAY-NEWCARD|1|<batch>|<face value>|<count>|<manufacturer>|<created>|<print KCV>|<expiry>
    D|<serial>|<face value>|<PIN block under the print key, 32 hex>
    T|<count>|<total face value>|<SHA-256 hex of every D line including its newline>

Card-back file (manufacturer → switch):

    H|GRIDPAY-CARDBACK|1|<batch>|<count>|<manufacturer>|<created>
    D|<serial>|<box no>|<pack no>|<OK or DAMAGED>|<face value as printed>
    T|<count>|<total printed face value>|<SHA-256 hex of every D line including its newline>
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from array import array
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, overload

from switch.cards.errors import InvalidInput
from switch.cards.serials import digits, luhn_digit, make_serial
from switch.loop import SLICE, run_through

NEW_CARD_MAGIC = "GRIDPAY-NEWCARD"
CARD_BACK_MAGIC = "GRIDPAY-CARDBACK"
FORMAT_VERSION = "1"
PRINT_OK = "OK"
PRINT_DAMAGED = "DAMAGED"


def _bad(line_no: int, what: str, code: str = "malformed_card_back_file") -> InvalidInput:
    return InvalidInput(f"line {line_no}: {what}", code=code)


def _timestamp(text: str) -> bool:
    """An ISO 8601 date and time with its offset (as the manufacturer writes `created`)."""
    try:
        return dt.datetime.fromisoformat(text).tzinfo is not None and "T" in text
    except ValueError:
        return False


_ENCRYPTED_PIN = re.compile(r"[0-9A-Fa-f]{32}")


def _num(text: str) -> bool:
    """A number field of a card file: ASCII digits, at most 18 (int() refuses over 4300)."""
    return 0 < len(text) <= 18 and digits(text)


# --- new-card file ----------------------------------------------------------------------------

def new_card_header(*, batch_id: int, face_value: int, count: int, manufacturer: str,
                    created: str, print_kcv: str, expiry: str) -> bytes:
    return (f"H|{NEW_CARD_MAGIC}|{FORMAT_VERSION}|{batch_id}|{face_value}|{count}|"
            f"{manufacturer}|{created}|{print_kcv}|{expiry}\n").encode("ascii")


def new_card_record(serial: str, face_value: int, encrypted_pin_hex: str) -> str:
    return f"D|{serial}|{face_value}|{encrypted_pin_hex}\n"


def trailer(count: int, total: int, sha256_hex: str) -> bytes:
    return f"T|{count}|{total}|{sha256_hex}\n".encode("ascii")


@dataclass(frozen=True, slots=True, kw_only=True)
class NewCardRecord:
    serial: str
    face_value: int
    encrypted_pin: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class NewCardFile:
    batch_id: int
    face_value: int
    manufacturer: str
    created: str
    print_kcv: str
    expiry: str
    records: tuple[NewCardRecord, ...]


def parse_new_card_file(lines: Iterable[bytes]) -> NewCardFile:
    """Parse and check a new-card file (header, records, trailer counts, total and digest)."""
    code = "malformed_new_card_file"
    it = iter(lines)
    head = next(it, b"").decode("ascii", "replace").rstrip("\n").split("|")
    if len(head) != 10 or head[:3] != ["H", NEW_CARD_MAGIC, FORMAT_VERSION] \
            or not all(_num(head[i]) for i in (3, 4, 5)):
        raise _bad(1, "not a new-card file header", code)
    digest = hashlib.sha256()
    records: list[NewCardRecord] = []
    total = 0
    line_no = 1
    for raw in it:
        line_no += 1
        text = raw.decode("ascii", "replace")
        if text.startswith("T|"):
            parts = text.rstrip("\n").split("|")
            # (checked before use: int() would echo the field, maybe a PIN, in its error)
            if len(parts) != 4 or not _num(parts[1]) or not _num(parts[2]):
                raise _bad(line_no, "malformed trailer", code)
            if int(parts[1]) != len(records) or int(parts[1]) != int(head[5]):
                raise _bad(line_no, "trailer count does not match the records", code)
            if int(parts[2]) != total:
                raise _bad(line_no, "trailer total does not match the records", code)
            if parts[3] != digest.hexdigest():
                raise _bad(line_no, "trailer digest does not match the records", code)
            return NewCardFile(batch_id=int(head[3]), face_value=int(head[4]),
                               manufacturer=head[6], created=head[7], print_kcv=head[8],
                               expiry=head[9], records=tuple(records))
        digest.update(raw)
        parts = text.rstrip("\n").split("|")
        if len(parts) != 4 or parts[0] != "D" or not _num(parts[2]) \
                or not _ENCRYPTED_PIN.fullmatch(parts[3]):
            raise _bad(line_no, "malformed record", code)
        face = int(parts[2])
        total += face
        records.append(NewCardRecord(serial=parts[1], face_value=face,
                                     encrypted_pin=bytes.fromhex(parts[3])))
    raise _bad(line_no, "no trailer", code)


# --- card-back file ---------------------------------------------------------------------------

class CardBackRecord(NamedTuple):
    serial: str
    box: int
    pack: int
    status: str
    face_value: int


class CardBackRecords(Sequence[CardBackRecord]):
    """A card-back file's records, kept as columns of machine integers (the serial, box, pack
    and face value of every record, and a byte for its print status) and handed out as
    `CardBackRecord`s one at a time.

    A file holds up to two million records. Kept as objects (a record, its serial, its
    numbers), they were millions of objects that every full pass of Python's garbage collector
    walked while they were held, and that were freed in one go once the file was done with:
    tenths of a second each time, in which the node's event loop answered nothing. Five
    arrays are five objects."""

    __slots__ = ("_serial", "_box", "_pack", "_damaged", "_face")

    def __init__(self, records: Iterable[CardBackRecord] = ()) -> None:
        # every number of a record is at most 18 digits (a serial 16): a signed 64-bit integer
        self._serial = array("q")
        self._box = array("q")
        self._pack = array("q")
        self._damaged = bytearray()
        self._face = array("q")
        for r in records:
            self.add(r.serial, r.box, r.pack, r.status, r.face_value)

    def add(self, serial: str, box: int, pack: int, status: str, face_value: int) -> None:
        """One record; `serial` is 16 ASCII digits and `status` OK or DAMAGED (the parser's
        checks)."""
        self._serial.append(int(serial))
        self._box.append(box)
        self._pack.append(pack)
        self._damaged.append(status == PRINT_DAMAGED)
        self._face.append(face_value)

    def __len__(self) -> int:
        return len(self._serial)

    def _record(self, serial: int, box: int, pack: int, damaged: int,
                face: int) -> CardBackRecord:
        return CardBackRecord(f"{serial:016d}", box, pack,
                              PRINT_DAMAGED if damaged else PRINT_OK, face)

    @overload
    def __getitem__(self, i: int) -> CardBackRecord: ...

    @overload
    def __getitem__(self, i: slice) -> CardBackRecords: ...

    def __getitem__(self, i: int | slice) -> CardBackRecord | CardBackRecords:
        if isinstance(i, slice):
            out = CardBackRecords()
            out._serial, out._box, out._pack = self._serial[i], self._box[i], self._pack[i]
            out._damaged, out._face = self._damaged[i], self._face[i]
            return out
        return self._record(self._serial[i], self._box[i], self._pack[i], self._damaged[i],
                            self._face[i])

    def __iter__(self) -> Iterator[CardBackRecord]:
        return map(self._record, self._serial, self._box, self._pack, self._damaged,
                   self._face)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CardBackRecords):
            return NotImplemented
        return (self._serial, self._box, self._pack, self._damaged, self._face) == (
            other._serial, other._box, other._pack, other._damaged, other._face)

    __hash__ = None  # type: ignore[assignment]  # it grows while a file is read

    def __repr__(self) -> str:
        return f"<CardBackRecords: {len(self)}>"


@dataclass(frozen=True, slots=True, kw_only=True)
class CardBackFile:
    batch_id: int
    manufacturer: str
    created: str
    records: CardBackRecords


def card_back_header(*, batch_id: int, count: int, manufacturer: str, created: str) -> bytes:
    return (f"H|{CARD_BACK_MAGIC}|{FORMAT_VERSION}|{batch_id}|{count}|{manufacturer}|"
            f"{created}\n").encode("ascii")


def card_back_record(r: CardBackRecord) -> bytes:
    return f"D|{r.serial}|{r.box}|{r.pack}|{r.status}|{r.face_value}\n".encode("ascii")


class CardBackParser:
    """Incremental card-back file parser: feed it lines (bytes, with their newline)."""

    def __init__(self, max_records: int = 2_000_000) -> None:
        self._digest = hashlib.sha256()
        self._records = CardBackRecords()
        self._header: list[str] | None = None
        self._done: CardBackFile | None = None
        self._total = 0
        self._line = 0
        self._max = max_records

    def feed(self, raw: bytes) -> None:
        self._line += 1
        if self._done is not None:
            if raw.strip():
                raise _bad(self._line, "data after the trailer")
            return
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _bad(self._line, "not ASCII") from None
        parts = text.rstrip("\r\n").split("|")
        if self._header is None:
            if len(parts) != 7 or parts[:3] != ["H", CARD_BACK_MAGIC, FORMAT_VERSION] \
                    or not _num(parts[3]) or not _num(parts[4]):
                raise _bad(self._line, "not a card-back file header")
            if not _timestamp(parts[6]):
                raise _bad(self._line, "the header's creation time is not an ISO 8601 time "
                           "with its offset")
            if int(parts[4]) > self._max:
                raise _bad(self._line, f"the header announces {int(parts[4])} records; at most "
                           f"{self._max} are taken for this batch")
            self._header = parts
            return
        if parts[0] == "T":
            if len(parts) != 4 or not _num(parts[1]) or not _num(parts[2]):
                raise _bad(self._line, "malformed trailer")
            n = len(self._records)
            if int(parts[1]) != n or int(self._header[4]) != n:
                raise _bad(self._line, f"trailer count {parts[1]} (header {self._header[4]}) "
                           f"but {n} records")
            if int(parts[2]) != self._total:
                raise _bad(self._line, "trailer total does not match the records")
            if parts[3].lower() != self._digest.hexdigest():
                raise _bad(self._line, "trailer digest does not match the records")
            self._done = CardBackFile(batch_id=int(self._header[3]),
                                      manufacturer=self._header[5], created=self._header[6],
                                      records=self._records)
            return
        if len(parts) != 6 or parts[0] != "D":
            raise _bad(self._line, "malformed record")
        serial, box, pack, status, face = parts[1:]
        if len(serial) != 16 or not digits(serial) or not _num(box) \
                or not _num(pack) or not _num(face) \
                or status not in (PRINT_OK, PRINT_DAMAGED):
            raise _bad(self._line, "malformed record")
        if len(self._records) >= self._max:
            raise _bad(self._line, f"more than {self._max} records")
        self._digest.update(raw if raw.endswith(b"\n") else raw + b"\n")
        fv = int(face)
        self._total += fv
        self._records.add(serial, int(box), int(pack), status, fv)

    def result(self) -> CardBackFile:
        if self._done is None:
            raise _bad(self._line, "the file ends without a trailer")
        return self._done


def parse_card_back(data: bytes) -> CardBackFile:
    p = CardBackParser()
    for line in data.splitlines(keepends=True):
        p.feed(line)
    return p.result()


# --- reconciliation ---------------------------------------------------------------------------

MISSING = "missing"
UNEXPECTED = "unexpected"
DAMAGED = "damaged"
FACE_VALUE_CHANGED = "face_value_changed"
DUPLICATE = "duplicate"
KINDS = (MISSING, UNEXPECTED, DAMAGED, FACE_VALUE_CHANGED, DUPLICATE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Discrepancy:
    serial: str
    kind: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"serial": self.serial, "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconciliation:
    batch_id: int
    expected: int
    received: int
    matched: int
    discrepancies: tuple[Discrepancy, ...]
    voided_before: int = 0  # cards of the batch voided before the file came (not matched)
    expired: int = 0  # matched cards past their expiry date when the file came: expired

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for d in self.discrepancies:
            out[d.kind] += 1
        return out

    def to_void(self) -> dict[str, str]:
        """Serials of this batch in discrepancy → the first kind found (unexpected excluded)."""
        out: dict[str, str] = {}
        for d in self.discrepancies:
            if d.kind != UNEXPECTED:
                out.setdefault(d.serial, d.kind)
        return out

    def as_dict(self) -> dict[str, object]:
        return {"batch_id": self.batch_id, "expected": self.expected,
                "received": self.received, "matched": self.matched,
                "voided_before": self.voided_before, "expired": self.expired,
                "counts": self.counts(),
                "discrepancies": [d.as_dict() for d in self.discrepancies]}


def reconcile_steps(*, batch_id: int, prefix: str, first_seq: int, quantity: int,
                    face_value: int, records: Iterable[CardBackRecord],
                    slice_: int = SLICE) -> Generator[None, None, Reconciliation]:
    """Compare a card-back file with the batch (a contiguous serial range of one face value).

    A generator that yields after every `slice_` records or serials and returns the
    reconciliation: its caller can give the event loop a turn at each yield (`reconcile`
    runs it through at once)."""
    # a byte per serial of the batch, set once the file has it: in the batch, a serial is
    # its sequence number (the prefix is the batch's and the check digit follows), and a
    # million of them in a set would be a million objects to make and free
    found = bytearray(quantity)
    n_found = 0
    out: list[Discrepancy] = []
    bad_in_batch: set[int] = set()
    received = 0
    last_seq = first_seq + quantity - 1
    for r in records:
        received += 1
        if received % slice_ == 0:
            yield
        s = r.serial
        seq = int(s[6:15])
        in_batch = (s[:6] == prefix and first_seq <= seq <= last_seq
                    and luhn_digit(s[:15]) == s[15])
        if not in_batch:
            out.append(Discrepancy(serial=s, kind=UNEXPECTED,
                                   detail=f"not a serial of batch {batch_id}"))
            continue
        if found[seq - first_seq]:
            out.append(Discrepancy(serial=s, kind=DUPLICATE,
                                   detail="serial appears more than once"))
            bad_in_batch.add(seq)
            continue
        found[seq - first_seq] = 1
        n_found += 1
        if r.status == PRINT_DAMAGED:
            out.append(Discrepancy(serial=s, kind=DAMAGED,
                                   detail=f"damaged print (box {r.box}, pack {r.pack})"))
            bad_in_batch.add(seq)
        if r.face_value != face_value:
            out.append(Discrepancy(serial=s, kind=FACE_VALUE_CHANGED,
                                   detail=f"printed {r.face_value}, ordered {face_value}"))
            bad_in_batch.add(seq)
    i = found.find(0) if n_found != quantity else -1
    while i >= 0:
        seq = first_seq + i
        out.append(Discrepancy(serial=make_serial(prefix, seq), kind=MISSING,
                               detail="not in the card-back file"))
        bad_in_batch.add(seq)
        if len(out) % slice_ == 0:
            yield
        i = found.find(0, i + 1)
    matched = quantity - len(bad_in_batch)
    return Reconciliation(batch_id=batch_id, expected=quantity, received=received,
                          matched=matched, discrepancies=tuple(out))


def reconcile(*, batch_id: int, prefix: str, first_seq: int, quantity: int, face_value: int,
              records: Iterable[CardBackRecord]) -> Reconciliation:
    """`reconcile_steps` run through at once."""
    return run_through(reconcile_steps(batch_id=batch_id, prefix=prefix, first_seq=first_seq,
                                       quantity=quantity, face_value=face_value,
                                       records=records))
