"""The card manufacturer simulator: new-card file in, card-back file out, with chosen defects.

`python -m switch.cards.manufacturer NEW_CARD_FILE --out CARD_BACK_FILE [--missing N]
[--unexpected N] [--damaged N] [--changed-face N] [--seed S]` (also `gridpay cards manufacture`).

Cards are packed 100 to a pack and 10 packs to a box, in serial order. Defects hit distinct
cards chosen with a seeded generator, so a run is reproducible; the summary lists the serials of
every defect so that a test can check the reconciliation report exactly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from switch.cards.errors import CardError
from switch.cards.files import (
    PRINT_DAMAGED,
    PRINT_OK,
    CardBackRecord,
    card_back_header,
    card_back_record,
    parse_new_card_file,
    trailer,
)
from switch.cards.serials import MAX_SEQ, make_serial, serial_seq

PACK = 100
BOX = 10 * PACK


@dataclass(frozen=True, slots=True, kw_only=True)
class ManufactureSummary:
    batch_id: int
    delivered: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    damaged: tuple[str, ...]
    changed_face: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"batch_id": self.batch_id, "delivered": self.delivered,
                "missing": list(self.missing), "unexpected": list(self.unexpected),
                "damaged": list(self.damaged), "changed_face": list(self.changed_face)}


def manufacture(new_card_file: Path, out: Path, *, missing: int = 0, unexpected: int = 0,
                damaged: int = 0, changed_face: int = 0, seed: int = 0,
                face_values: Sequence[int] = (5000, 10000, 20000, 50000)
                ) -> ManufactureSummary:
    """Print the cards of `new_card_file` and write the card-back file to `out`."""
    with new_card_file.open("rb") as fh:
        ncf = parse_new_card_file(fh)
    serials = [r.serial for r in ncf.records]
    n = len(serials)
    if min(missing, unexpected, damaged, changed_face) < 0:
        raise ValueError("defect counts cannot be negative")
    if missing + damaged + changed_face > n:
        raise ValueError(f"more defects than the {n} cards of the file")
    if unexpected > max(n, 1000):  # a few strays; not a second production run in memory
        raise ValueError(f"at most {max(n, 1000)} unexpected cards for a file of {n}")
    rng = random.Random(seed)
    chosen = rng.sample(range(n), missing + damaged + changed_face)
    miss = set(chosen[:missing])
    dmg = set(chosen[missing:missing + damaged])
    chg = set(chosen[missing + damaged:])
    other_faces = [f for f in face_values if f != ncf.face_value] or [ncf.face_value + 1]

    digest = hashlib.sha256()
    count = total = 0
    tmp = out.with_name(out.name + ".part")
    with tmp.open("wb") as fh:
        body: list[bytes] = []
        for i, rec in enumerate(ncf.records):
            if i in miss:
                continue
            face = rng.choice(other_faces) if i in chg else rec.face_value
            line = card_back_record(CardBackRecord(
                serial=rec.serial, box=i // BOX + 1, pack=i // PACK + 1,
                status=PRINT_DAMAGED if i in dmg else PRINT_OK, face_value=face))
            body.append(line)
        extra: list[str] = []
        if unexpected:
            prefix = serial_seq(serials[0])[0] if serials else "000000"
            for k in range(unexpected):
                s = make_serial(prefix, MAX_SEQ - k)
                extra.append(s)
                body.append(card_back_record(CardBackRecord(
                    serial=s, box=9999, pack=99999, status=PRINT_OK,
                    face_value=ncf.face_value)))
        for line in body:
            digest.update(line)
            count += 1
            total += int(line.rsplit(b"|", 1)[1])
        fh.write(card_back_header(batch_id=ncf.batch_id, count=count,
                                  manufacturer=ncf.manufacturer,
                                  created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds")))
        fh.writelines(body)
        fh.write(trailer(count, total, digest.hexdigest()))
    tmp.replace(out)
    return ManufactureSummary(
        batch_id=ncf.batch_id, delivered=count,
        missing=tuple(serials[i] for i in sorted(miss)), unexpected=tuple(extra),
        damaged=tuple(serials[i] for i in sorted(dmg)),
        changed_face=tuple(serials[i] for i in sorted(chg)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gridpay cards manufacture",
                                description="card manufacturer simulator")
    p.add_argument("new_card_file", type=Path)
    p.add_argument("--out", type=Path, required=True, help="card-back file to write")
    p.add_argument("--missing", type=int, default=0)
    p.add_argument("--unexpected", type=int, default=0)
    p.add_argument("--damaged", type=int, default=0)
    p.add_argument("--changed-face", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        summary = manufacture(a.new_card_file, a.out, missing=a.missing,
                              unexpected=a.unexpected, damaged=a.damaged,
                              changed_face=a.changed_face, seed=a.seed)
    except (OSError, ValueError, CardError) as e:
        print(f"gridpay cards manufacture: {e}", file=sys.stderr)
        return 2
    doc = summary.as_dict()
    print(orjson.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in doc.items()}
                       ).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
