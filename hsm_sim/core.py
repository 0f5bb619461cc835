"""The simulated HSM's command processor: one message in, one message out (sans-I/O).

Everything that touches a clear key or PIN happens here and nothing of it leaves: responses
carry key blocks, check values, MACs, tags and encrypted PIN blocks only.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from crypto.cmac import constant_time_equal, kcv, mac8
from crypto.errors import KeyBlockError, PinBlockError
from crypto.pinblock import Format4Codec
from crypto.tr31 import KeyBlockHeader, KeyBlockProtection
from crypto.voucher import generate_pin, voucher_tag, voucher_tag_matches
from hsm_sim.wire import COMMANDS, MAX_MESSAGE, FieldError, FieldReader, response_code

__all__ = [
    "FIRMWARE",
    "KEY_PROFILES",
    "MAX_VOUCHERS",
    "HsmCore",
    "KeyProfile",
]

log = logging.getLogger("hsm_sim")

FIRMWARE = "gridpay-hsm-sim 1.0"
MAX_VOUCHERS = 1000  # serials per voucher-generate request (the response must fit a frame)
SERIAL_LEN = 16
PIN_BLOCK_FORMAT_ISO4 = "48"  # payShield's code for ISO 9564 format 4
_LMK_MASKED_LENGTH = 32  # every key under the LMK looks like an AES-256 key


@dataclass(frozen=True, slots=True)
class KeyProfile:
    """What a key of one TR-31 usage is: algorithm, length, permitted modes of use."""

    usage: str
    algorithm: str
    length: int
    modes: frozenset[str]
    default_mode: str
    blocks: tuple[tuple[str, str], ...] = ()


KEY_PROFILES: MappingProxyType[str, KeyProfile] = MappingProxyType({
    p.usage: p for p in (
        KeyProfile("K0", "A", 32, frozenset("BDE"), "B"),
        KeyProfile("K1", "A", 32, frozenset("BDE"), "B"),
        KeyProfile("P0", "A", 16, frozenset("BDE"), "B"),
        KeyProfile("M6", "A", 16, frozenset("CGV"), "C"),
        KeyProfile("V0", "H", 32, frozenset("CGV"), "C", (("HM", "21"),)),
    )
})


@dataclass(frozen=True, slots=True)
class _Use:
    """A permitted use of a key: usages, algorithm, modes of use."""

    usages: frozenset[str]
    algorithm: str
    modes: frozenset[str]


_KEK_WRAP = _Use(frozenset({"K0", "K1"}), "A", frozenset("BE"))
_KEK_UNWRAP = _Use(frozenset({"K0", "K1"}), "A", frozenset("BD"))
_MAC_GENERATE = _Use(frozenset({"M6"}), "A", frozenset("CG"))
_MAC_VERIFY = _Use(frozenset({"M6"}), "A", frozenset("CV"))
_PIN_ENCRYPT = _Use(frozenset({"P0"}), "A", frozenset("BE"))
_PIN_DECRYPT = _Use(frozenset({"P0"}), "A", frozenset("BD"))
_VOUCHER_GENERATE = _Use(frozenset({"V0"}), "H", frozenset("CG"))
_VOUCHER_VERIFY = _Use(frozenset({"V0"}), "H", frozenset("CV"))

_KEY_BLOCK_ERRORS: MappingProxyType[str, str] = MappingProxyType({
    "header": "A4", "length": "80", "encoding": "15", "mac": "10", "key": "10",
})


class _Refused(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _check_use(header: KeyBlockHeader, use: _Use) -> None:
    if header.key_usage not in use.usages:
        raise _Refused("A6")
    if header.algorithm != use.algorithm:
        raise _Refused("A7")
    if header.mode_of_use not in use.modes:
        raise _Refused("A8")


def _check_profile(header: KeyBlockHeader, key: bytes) -> None:
    profile = KEY_PROFILES.get(header.key_usage)
    if profile is None:
        raise _Refused("04")
    if header.algorithm != profile.algorithm:
        raise _Refused("A7")
    if header.mode_of_use not in profile.modes:
        raise _Refused("A8")
    if profile.algorithm == "H" and len(key) != profile.length:
        raise _Refused("10")


Handler = Callable[["HsmCore", FieldReader], tuple[str, bytes]]


class HsmCore:
    """The HSM: an LMK, an authorised flag, and the command table."""

    def __init__(self, lmk: bytes, *, authorised: bool, firmware: str = FIRMWARE,
                 cache_size: int = 4096) -> None:
        self._lmk = KeyBlockProtection(lmk)
        self._lmk_kcv = kcv(lmk).hex().upper()
        self._authorised = authorised
        self._firmware = firmware
        self._cache: OrderedDict[str, tuple[KeyBlockHeader, bytes]] = OrderedDict()
        self._cache_size = cache_size

    def __repr__(self) -> str:
        return f"HsmCore(lmk_kcv={self._lmk_kcv!r}, authorised={self._authorised})"

    @property
    def lmk_kcv(self) -> str:
        return self._lmk_kcv

    @property
    def authorised(self) -> bool:
        return self._authorised

    # --- the message loop -------------------------------------------------------------------

    def handle(self, message: bytes) -> bytes:
        """Process one request message (no length prefix); returns the response message.

        Never raises for any input of at least 6 bytes.
        """
        header, command = message[:4], message[4:6]
        reply = response_code(command)
        spec = _TABLE.get(command)
        if spec is None:
            log.info("hsm command refused", extra={"command": _printable(command),
                                                   "error": "68"})
            return header + reply + b"68"
        try:
            code, payload = spec(self, FieldReader(message, 6))
        except FieldError as exc:
            code, payload = exc.code, b""
        except _Refused as exc:
            code, payload = exc.code, b""
        except KeyBlockError as exc:
            code, payload = _KEY_BLOCK_ERRORS[exc.reason], b""
        except PinBlockError:
            code, payload = "20", b""
        except Exception:  # a bug must not leak data or kill the connection
            log.exception("hsm internal error", extra={"command": _printable(command)})
            code, payload = "41", b""
        response = header + reply + code.encode() + payload
        if len(response) > MAX_MESSAGE:
            return header + reply + b"80"
        log.debug("hsm command", extra={"command": _printable(command), "error": code})
        return response

    # --- helpers ----------------------------------------------------------------------------

    def _require_authorised(self) -> None:
        if not self._authorised:
            raise _Refused("17")

    def _lmk_key(self, block: str, use: _Use | None = None) -> tuple[KeyBlockHeader, bytes]:
        cached = self._cache.get(block)
        if cached is None:
            cached = self._lmk.unwrap(block)
            self._cache[block] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(block)
        if use is not None:
            _check_use(cached[0], use)
        return cached

    def _lmk_wrap(self, header: KeyBlockHeader, key: bytes) -> bytes:
        return b"S" + self._lmk.wrap(header, key, masked_length=_LMK_MASKED_LENGTH).encode()

    # --- commands ---------------------------------------------------------------------------

    def nc(self, r: FieldReader) -> tuple[str, bytes]:
        r.end()
        return "00", (self._lmk_kcv + self._firmware).encode("ascii")

    def b2(self, r: FieldReader) -> tuple[str, bytes]:
        data = r.data()
        r.end()
        return "00", data

    def a0(self, r: FieldReader) -> tuple[str, bytes]:
        mode = r.text(1)
        usage = r.text(2)
        mode_of_use = r.text(1)
        exportability = r.text(1)
        if mode not in ("0", "1"):
            raise FieldError("15", "A0 mode must be 0 or 1")
        kek_block = r.key_block() if mode == "1" else None
        r.end()
        if kek_block is not None:
            self._require_authorised()
        profile = KEY_PROFILES.get(usage)
        if profile is None:
            raise _Refused("04")
        if mode_of_use not in profile.modes:
            raise _Refused("A8")
        if exportability not in ("E", "N", "S"):
            raise _Refused("A4")
        kek: tuple[KeyBlockHeader, bytes] | None = None
        if kek_block is not None:
            if exportability == "N":
                raise _Refused("29")
            kek = self._lmk_key(kek_block, _KEK_WRAP)
        header = KeyBlockHeader(key_usage=usage, algorithm=profile.algorithm,
                                mode_of_use=mode_of_use, exportability=exportability,
                                optional_blocks=profile.blocks)
        key = secrets.token_bytes(profile.length)
        out = self._lmk_wrap(header, key)
        if kek is not None:
            out += b"S" + KeyBlockProtection(kek[1]).wrap(header, key).encode()
        return "00", out + kcv(key).hex().upper().encode()

    def a6(self, r: FieldReader) -> tuple[str, bytes]:
        kek_block = r.key_block()
        foreign_block = r.key_block()
        expected = r.optional_hex(6)
        r.end()
        self._require_authorised()
        _, kek = self._lmk_key(kek_block, _KEK_UNWRAP)
        header, key = KeyBlockProtection(kek).unwrap(foreign_block)
        _check_profile(header, key)
        check = kcv(key)
        if expected is not None and not constant_time_equal(check, expected):
            raise _Refused("10")
        return "00", self._lmk_wrap(header, key) + check.hex().upper().encode()

    def a8(self, r: FieldReader) -> tuple[str, bytes]:
        kek_block = r.key_block()
        key_block = r.key_block()
        r.end()
        self._require_authorised()
        _, kek = self._lmk_key(kek_block, _KEK_WRAP)
        header, key = self._lmk_key(key_block)
        if header.exportability not in ("E", "S"):
            raise _Refused("29")
        exported = KeyBlockProtection(kek).wrap(header, key)
        return "00", b"S" + exported.encode() + kcv(key).hex().upper().encode()

    def bu(self, r: FieldReader) -> tuple[str, bytes]:
        block = r.key_block()
        r.end()
        _, key = self._lmk_key(block)
        return "00", kcv(key).hex().upper().encode()

    def m6(self, r: FieldReader) -> tuple[str, bytes]:
        block = r.key_block()
        data = r.data()
        r.end()
        _, key = self._lmk_key(block, _MAC_GENERATE)
        return "00", mac8(key, data).hex().upper().encode()

    def m8(self, r: FieldReader) -> tuple[str, bytes]:
        block = r.key_block()
        data = r.data()
        mac = r.hex(16)
        r.end()
        _, key = self._lmk_key(block, _MAC_VERIFY)
        return ("00" if constant_time_equal(mac8(key, data), mac) else "01"), b""

    def zg(self, r: FieldReader) -> tuple[str, bytes]:
        vvk_block = r.key_block()
        print_block = r.key_block()
        pin_length = int(r.digits(2))
        count = int(r.digits(4))
        if not 1 <= count <= MAX_VOUCHERS:
            raise FieldError("15", "voucher count out of range")
        serials = [r.digits(SERIAL_LEN) for _ in range(count)]
        r.end()
        if not 4 <= pin_length <= 12:
            raise _Refused("24")
        _, vvk = self._lmk_key(vvk_block, _VOUCHER_GENERATE)
        _, print_key = self._lmk_key(print_block, _PIN_ENCRYPT)
        codec = Format4Codec(print_key)
        out = bytearray()
        for serial in serials:
            pin = generate_pin(pin_length)
            out += voucher_tag(vvk, serial, pin)
            out += codec.encipher(pin, serial)
        return "00", bytes(out)

    def zv(self, r: FieldReader) -> tuple[str, bytes]:
        pin_key_block = r.key_block()
        vvk_block = r.key_block()
        format_code = r.text(2)
        serial = r.digits(SERIAL_LEN)
        pin_block = r.hex(32)
        tag = r.hex(64)
        r.end()
        if format_code != PIN_BLOCK_FORMAT_ISO4:
            raise _Refused("23")
        _, pin_key = self._lmk_key(pin_key_block, _PIN_DECRYPT)
        _, vvk = self._lmk_key(vvk_block, _VOUCHER_VERIFY)
        try:
            pin = Format4Codec(pin_key).decipher(pin_block, serial)
        except PinBlockError:
            # A block that does not decode is simply not the card's PIN: no oracle.
            return "01", b""
        return ("00" if voucher_tag_matches(vvk, serial, pin, tag) else "01"), b""


def _printable(command: bytes) -> str:
    return command.decode("ascii", "replace") if command.isascii() else command.hex()


_HANDLERS: dict[str, Handler] = {
    "NC": HsmCore.nc, "B2": HsmCore.b2, "A0": HsmCore.a0, "A6": HsmCore.a6,
    "A8": HsmCore.a8, "BU": HsmCore.bu, "M6": HsmCore.m6, "M8": HsmCore.m8,
    "ZG": HsmCore.zg, "ZV": HsmCore.zv,
}
assert set(_HANDLERS) == set(COMMANDS)  # noqa: S101 - the two tables must agree
_TABLE: MappingProxyType[bytes, Handler] = MappingProxyType(
    {code.encode(): handler for code, handler in _HANDLERS.items()}
)
