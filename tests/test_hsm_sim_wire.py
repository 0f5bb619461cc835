"""`FieldReader` against a plain reading of the field rules, on random and mutated input: the
same values, the same error codes, at the same positions (the simulator and the switch's client
both parse with it)."""

from __future__ import annotations

import random

from hsm_sim.wire import FieldError, FieldReader

HEX = set(b"0123456789ABCDEFabcdef")
DIGITS = set(b"0123456789")


class Plain:
    """The field rules spelt out one by one, with no regard for speed."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def raw(self, n: int) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            raise FieldError("80", "")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def text(self, n: int) -> str:
        raw = self.raw(n)
        if any(not 0x20 < b < 0x7F for b in raw):
            raise FieldError("15", "")
        return raw.decode()

    def digits(self, n: int) -> str:
        raw = self.raw(n)
        if any(b not in DIGITS for b in raw):
            raise FieldError("15", "")
        return raw.decode()

    def hex(self, n: int) -> bytes:
        raw = self.raw(n)
        if n % 2 or any(b not in HEX for b in raw):
            raise FieldError("15", "")
        return bytes.fromhex(raw.decode())

    def data_(self) -> bytes:
        return self.raw(int(self.hex(4).hex(), 16))

    def key_block(self) -> str:
        if self.raw(1) != b"S":
            raise FieldError("15", "")
        if len(self.data) - self.pos < 5:
            raise FieldError("80", "")
        length_text = self.data[self.pos + 1:self.pos + 5]
        if any(b not in DIGITS for b in length_text):
            raise FieldError("A4", "")
        if int(length_text.decode()) < 16:
            raise FieldError("A4", "")
        block = self.raw(int(length_text.decode()))
        if not block.isascii():
            raise FieldError("15", "")
        return block.decode()


OPS = ("raw", "text", "digits", "hex", "data", "key_block")
ALPHABET = b"0123456789ABCDEFabcdefGSZ \x00\x7f\x80\xff~!"


def run(reader: FieldReader | Plain, ops: list[tuple[str, int]]) -> list[object]:
    out: list[object] = []
    for op, n in ops:
        try:
            if op == "data":
                value: object = reader.data() if isinstance(reader, FieldReader) \
                    else reader.data_()
            elif op == "key_block":
                value = reader.key_block()
            else:
                value = getattr(reader, op)(n)
        except FieldError as exc:
            out.append(("error", exc.code))
            break
        out.append(value)
    out.append(len(reader.data) - reader.pos if isinstance(reader, Plain)
               else reader.remaining)
    return out


def test_field_reader_matches_the_plain_rules() -> None:
    rng = random.Random(11)
    for _ in range(20000):
        if rng.random() < 0.4:  # something shaped like a key block, perhaps damaged
            length = rng.choice([0, 5, 16, 32, 48, 9999])
            data = bytearray(b"SD" + f"{length:04d}".encode()
                             + bytes(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))))
            for _ in range(rng.randint(0, 2)):
                data[rng.randrange(len(data))] = rng.choice(ALPHABET)
        else:
            data = bytearray(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        ops = [(rng.choice(OPS), rng.randint(-1, 12)) for _ in range(rng.randint(1, 5))]
        assert run(FieldReader(bytes(data)), ops) == run(Plain(bytes(data)), ops), (data, ops)
