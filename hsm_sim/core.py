"""The simulated HSM's command processor: one message in, one message out (sans-I/O).

Everything that touches a clear key or PIN happens here and nothing of it leaves: responses
carry key blocks, check values, MACs, tags and encrypted PIN blocks only.

Working keys are unwrapped once: an LRU of `_WorkingKey` entries, indexed by the exact text of
the key block under the LMK, keeps each key with its authenticated header and, made on first
use, the cipher objects built from it (a CMAC context, a format-4 PIN codec). The header is
still checked against the command's permitted use on every command, and a block that does not
unwrap is never cached, so a cached key changes only how fast an answer comes, never the answer.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from crypto.cmac import AES_KEY_SIZES, constant_time_equal, kcv
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
    """A permitted use of a key: usages, algorithm (completed by the usage's profile's
    optional blocks, such as an HMAC key's hash), modes of use."""

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


class _WorkingKey:
    """A key unwrapped from a block under the LMK, as the HSM holds it in its memory.

    Besides the header and the key it keeps, built on first use, the objects that the commands
    would otherwise build from the key on every call: a primed AES-CMAC context (each MAC works
    on a copy of it, the context itself is never fed data) and a format-4 PIN block codec
    (ECB, which carries no state from one block to the next). The repr names the usage only.
    """

    __slots__ = ("_cmac", "_codec", "_kcv", "header", "key", "profile_blocks")

    def __init__(self, header: KeyBlockHeader, key: bytes) -> None:
        self.header = header
        self.key = key
        # whether the header carries the optional blocks its usage's profile asks for (an
        # HMAC key's hash): the header cannot change, so judged once, not on every command
        profile = KEY_PROFILES.get(header.key_usage)
        self.profile_blocks = profile is not None and _blocks_match(header, profile.blocks)
        self._cmac: cmac.CMAC | None = None
        self._codec: Format4Codec | None = None
        self._kcv: bytes | None = None

    def __repr__(self) -> str:
        return f"_WorkingKey(usage={self.header.key_usage!r}, <masked>)"

    def mac8(self, data: bytes) -> bytes:
        """AES-CMAC of `data` truncated to 8 bytes (what `crypto.cmac.mac8` computes)."""
        primed = self._cmac
        if primed is None:
            # the key is an AES key: only algorithm A blocks are allowed to MAC commands, and
            # unwrapping refuses an A block whose key is not 16, 24 or 32 bytes
            primed = self._cmac = cmac.CMAC(algorithms.AES(self.key))
        ctx = primed.copy()
        ctx.update(data)
        return ctx.finalize()[:8]

    def format4(self) -> Format4Codec:
        """The format-4 PIN block codec of this key, made once."""
        codec = self._codec
        if codec is None:
            codec = self._codec = Format4Codec(self.key)
        return codec

    def kcv(self) -> bytes:
        """The key check value, computed once."""
        check = self._kcv
        if check is None:
            check = self._kcv = kcv(self.key)
        return check


class _Refused(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _check_use(working: _WorkingKey, use: _Use) -> None:
    header = working.header
    if header.key_usage not in use.usages:
        raise _Refused("A6")
    # the blocks that complete the algorithm are the usage's own (every usage here has a
    # profile)
    if header.algorithm != use.algorithm or not working.profile_blocks:
        raise _Refused("A7")
    if header.mode_of_use not in use.modes:
        raise _Refused("A8")


def _blocks_match(header: KeyBlockHeader, blocks: tuple[tuple[str, str], ...]) -> bool:
    """The header carries each of `blocks` with its value: an HMAC key's hash (`HM`) is part
    of its algorithm, so a key marked for SHA-1, or for no hash, is not a SHA-256 key."""
    return all(header.optional(bid) == value for bid, value in blocks)


def _check_profile(header: KeyBlockHeader, key: bytes) -> None:
    profile = KEY_PROFILES.get(header.key_usage)
    if profile is None:
        raise _Refused("04")
    if header.algorithm != profile.algorithm or not _blocks_match(header, profile.blocks):
        raise _Refused("A7")
    if header.mode_of_use not in profile.modes:
        raise _Refused("A8")
    if profile.algorithm == "H" and len(key) != profile.length:
        raise _Refused("10")


def _check_key(header: KeyBlockHeader, key: bytes) -> None:
    """A key under the LMK that this HSM can work with: every key it holds is an AES key or
    an HMAC key (whose check value is an AES-CMAC too), so 16, 24 or 32 bytes. An authentic
    block with another algorithm (single DES, say) or length gets its refusal here, not an
    internal error from the first command that uses the key."""
    if header.algorithm not in ("A", "H"):
        raise _Refused("A7")
    if len(key) not in AES_KEY_SIZES:  # unwrap has refused such an AES key already: HMAC's
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
        self._cache: OrderedDict[str, _WorkingKey] = OrderedDict()
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
        entry = _TABLE.get(command)
        if entry is None:
            log.info("hsm command refused", extra={"command": _printable(command),
                                                   "error": "68"})
            return header + response_code(command) + b"68"
        spec, reply = entry
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
        if log.isEnabledFor(logging.DEBUG):
            log.debug("hsm command", extra={"command": _printable(command), "error": code})
        return response

    # --- helpers ----------------------------------------------------------------------------

    def _require_authorised(self) -> None:
        if not self._authorised:
            raise _Refused("17")

    def _lmk_key(self, block: str, use: _Use | None = None) -> _WorkingKey:
        """The working key in `block` (under the LMK), checked for `use` when one is given.

        Unwrapped on first sight (any `KeyBlockError` propagates and nothing is cached), then
        served from the LRU; the least recently used key is forgotten when it is full.
        """
        cache = self._cache
        working = cache.get(block)
        if working is None:
            working = _WorkingKey(*self._lmk.unwrap(block))
            _check_key(working.header, working.key)
            cache[block] = working
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(block)
        if use is not None:
            _check_use(working, use)
        return working

    @property
    def cached_keys(self) -> int:
        """How many working keys are held unwrapped (never which)."""
        return len(self._cache)

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
        kek: bytes | None = None
        if kek_block is not None:
            if exportability == "N":
                raise _Refused("29")
            kek = self._lmk_key(kek_block, _KEK_WRAP).key
        header = KeyBlockHeader(key_usage=usage, algorithm=profile.algorithm,
                                mode_of_use=mode_of_use, exportability=exportability,
                                optional_blocks=profile.blocks)
        key = secrets.token_bytes(profile.length)
        out = self._lmk_wrap(header, key)
        if kek is not None:
            out += b"S" + KeyBlockProtection(kek).wrap(header, key).encode()
        return "00", out + kcv(key).hex().upper().encode()

    def a6(self, r: FieldReader) -> tuple[str, bytes]:
        kek_block = r.key_block()
        foreign_block = r.key_block()
        expected = r.optional_hex(6)
        r.end()
        self._require_authorised()
        kek = self._lmk_key(kek_block, _KEK_UNWRAP).key
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
        kek = self._lmk_key(kek_block, _KEK_WRAP).key
        working = self._lmk_key(key_block)
        if working.header.exportability not in ("E", "S"):
            raise _Refused("29")
        exported = KeyBlockProtection(kek).wrap(working.header, working.key)
        return "00", b"S" + exported.encode() + working.kcv().hex().upper().encode()

    def bu(self, r: FieldReader) -> tuple[str, bytes]:
        block = r.key_block()
        r.end()
        return "00", self._lmk_key(block).kcv().hex().upper().encode()

    def m6(self, r: FieldReader) -> tuple[str, bytes]:
        block = r.key_block()
        data = r.data()
        r.end()
        return "00", self._lmk_key(block, _MAC_GENERATE).mac8(data).hex().upper().encode()

    def m8(self, r: FieldReader) -> tuple[str, bytes]:
        block = r.key_block()
        data = r.data()
        mac = r.hex(16)
        r.end()
        expected = self._lmk_key(block, _MAC_VERIFY).mac8(data)
        return ("00" if constant_time_equal(expected, mac) else "01"), b""

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
        vvk = self._lmk_key(vvk_block, _VOUCHER_GENERATE).key
        codec = self._lmk_key(print_block, _PIN_ENCRYPT).format4()
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
        pin_key = self._lmk_key(pin_key_block, _PIN_DECRYPT)
        vvk = self._lmk_key(vvk_block, _VOUCHER_VERIFY).key
        try:
            pin = pin_key.format4().decipher(pin_block, serial)
        except PinBlockError:
            # A block that does not decode is simply not the card's PIN: no oracle, neither in
            # the answer nor in the time it takes (the tag is computed all the same)
            voucher_tag_matches(vvk, serial, _NO_PIN, tag)
            return "01", b""
        return ("00" if voucher_tag_matches(vvk, serial, pin, tag) else "01"), b""


_NO_PIN = "000000000000"  # the stand-in whose tag a block that does not decode costs


def _printable(command: bytes) -> str:
    return command.decode("ascii", "replace") if command.isascii() else command.hex()


_HANDLERS: dict[str, Handler] = {
    "NC": HsmCore.nc, "B2": HsmCore.b2, "A0": HsmCore.a0, "A6": HsmCore.a6,
    "A8": HsmCore.a8, "BU": HsmCore.bu, "M6": HsmCore.m6, "M8": HsmCore.m8,
    "ZG": HsmCore.zg, "ZV": HsmCore.zv,
}
assert set(_HANDLERS) == set(COMMANDS)  # noqa: S101 - the two tables must agree
# command code -> (handler, response code), both as the bytes that arrive and leave
_TABLE: MappingProxyType[bytes, tuple[Handler, bytes]] = MappingProxyType({
    code.encode(): (handler, response_code(code.encode()))
    for code, handler in _HANDLERS.items()
})
