"""Dev key provisioning: a simulated key ceremony that puts the TEST keys into the HSM.

In production no clear key ever reaches the switch: institution keys arrive as TR-31 blocks
under a key-encryption key (KEK) agreed with the institution, and are imported with A6. The dev
configuration (`config/hsm-dev.toml`, public, TEST ONLY) instead holds well-known clear keys so
that simulators, tests and benchmarks can build MACs and PIN blocks. The ceremony here:

1. checks that the HSM runs the public dev LMK (NC returns its check value);
2. plays the custodians' console step: the dev ceremony KEK is wrapped under the dev LMK with
   `crypto.tr31` (possible only because the dev LMK components are public) and its check value
   confirmed by the HSM (BU);
3. wraps each dev clear key under the ceremony KEK with its TR-31 header (usage, algorithm, mode
   of use, exportability) and imports it with A6, checking the KCV the HSM computes;
4. exports the manufacturer's print key under the manufacturer's KEK (A8), as the card centre
   would to deliver it.

The result is a `KeyRing`: key name -> key block under the LMK and its KCV.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from crypto.cmac import kcv
from crypto.lmk import LmkComponent, combine_lmk
from crypto.tr31 import KeyBlockHeader, wrap
from switch.hsm_client import HsmClient, KeyBlock

__all__ = [
    "DEV_CONFIG",
    "DevKeys",
    "KeyProvisioningError",
    "KeyRing",
    "KeyRingEntry",
    "dev_keys_json",
    "load_dev_keys",
    "provision_dev_keys",
]

DEV_CONFIG = Path(__file__).resolve().parent.parent / "config" / "hsm-dev.toml"

# Key names in the ring.
CEREMONY_KEK = "kek:ceremony"
IVR_PIN = "pin:ivr"
VVK = "vvk"


def mac_key_name(institution: str) -> str:
    return f"mac:{institution}"


def print_key_name(manufacturer: str) -> str:
    return f"print:{manufacturer}"


def manufacturer_kek_name(manufacturer: str) -> str:
    return f"kek:{manufacturer}"


def exported_print_key_name(manufacturer: str) -> str:
    return f"print_export:{manufacturer}"


class KeyProvisioningError(Exception):
    """The dev keys cannot be loaded, shown or provisioned (message carries no key)."""


def _hex_key(value: object, name: str, sizes: Iterable[int]) -> bytes:
    try:
        key = bytes.fromhex(str(value))
    except ValueError:
        raise KeyProvisioningError(f"dev key {name} is not hex") from None
    if len(key) not in set(sizes):
        raise KeyProvisioningError(f"dev key {name} has a wrong length")
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class DevKeys:
    """The clear TEST keys of the dev configuration (repr masked)."""

    lmk_components: tuple[LmkComponent, ...]
    ceremony_kek: bytes
    ivr_pin_key: bytes
    voucher_verification_key: bytes | None
    institution_mac: tuple[tuple[str, bytes], ...]
    manufacturer_print: tuple[tuple[str, bytes], ...]
    manufacturer_kek: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        combine_lmk(self.lmk_components)  # checks every component's KCV
        if len(self.ceremony_kek) != 32:
            raise KeyProvisioningError("the ceremony KEK must be AES-256")
        if {m for m, _ in self.manufacturer_print} - {m for m, _ in self.manufacturer_kek}:
            raise KeyProvisioningError("every manufacturer print key needs a manufacturer KEK")

    def __repr__(self) -> str:
        return (f"DevKeys(lmk_kcv={self.dev_lmk_kcv!r}, institutions="
                f"{[i for i, _ in self.institution_mac]}, manufacturers="
                f"{[m for m, _ in self.manufacturer_print]}, <keys masked>)")

    @property
    def dev_lmk_kcv(self) -> str:
        return kcv(combine_lmk(self.lmk_components)).hex().upper()

    def mac_key(self, institution: str) -> bytes:
        return dict(self.institution_mac)[institution]

    def print_key(self, manufacturer: str) -> bytes:
        return dict(self.manufacturer_print)[manufacturer]


def load_dev_keys(path: Path | str | None = None) -> DevKeys:
    """Read the dev LMK components and `[dev_keys]` from the dev configuration (TEST ONLY)."""
    with open(DEV_CONFIG if path is None else path, "rb") as fh:
        doc: dict[str, Any] = tomllib.load(fh)
    hsm = doc.get("hsm", {})
    if hsm.get("dev_lmk") is not True:
        raise KeyProvisioningError("this configuration is not marked as the dev LMK")
    dev = doc.get("dev_keys")
    if not isinstance(dev, dict):
        raise KeyProvisioningError("no [dev_keys] table")

    def table(name: str, sizes: tuple[int, ...]) -> tuple[tuple[str, bytes], ...]:
        items: Mapping[str, object] = dev.get(name, {})
        return tuple(sorted((str(k), _hex_key(v, f"{name}.{k}", sizes))
                            for k, v in items.items()))

    vvk = dev.get("voucher_verification_key")
    return DevKeys(
        lmk_components=tuple(LmkComponent(value_hex=str(c["value"]), kcv_hex=str(c["kcv"]))
                             for c in hsm.get("lmk_components", [])),
        ceremony_kek=_hex_key(dev.get("ceremony_kek"), "ceremony_kek", (32,)),
        ivr_pin_key=_hex_key(dev.get("ivr_pin_key"), "ivr_pin_key", (16, 32)),
        voucher_verification_key=None if vvk is None else _hex_key(vvk, "vvk", (32,)),
        institution_mac=table("institution_mac", (16,)),
        manufacturer_print=table("manufacturer_print", (16, 32)),
        manufacturer_kek=table("manufacturer_kek", (16, 32)),
    )


def dev_keys_json(dev: DevKeys, lmk_is_dev: bool) -> str:
    """The clear dev keys as JSON (for `gridpay dev keys --json`); refused unless the HSM in
    use runs the dev LMK, so that real keys can never be shown by this path."""
    if not lmk_is_dev:
        raise KeyProvisioningError("refused: the HSM does not use the dev LMK")

    def entry(key: bytes) -> dict[str, str]:
        return {"key": key.hex().upper(), "kcv": kcv(key).hex().upper()}

    doc: dict[str, Any] = {
        "test_only": True,
        "lmk_kcv": dev.dev_lmk_kcv,
        "institution_mac": {i: entry(k) for i, k in dev.institution_mac},
        "ivr_pin_key": entry(dev.ivr_pin_key),
        "manufacturer_print": {m: entry(k) for m, k in dev.manufacturer_print},
        "manufacturer_kek": {m: entry(k) for m, k in dev.manufacturer_kek},
    }
    if dev.voucher_verification_key is not None:
        doc["voucher_verification_key"] = entry(dev.voucher_verification_key)
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True, slots=True)
class KeyRingEntry:
    name: str
    block: KeyBlock
    kcv: str


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Key name -> key block under the LMK (and KCV). Blocks are masked in the repr."""

    entries: tuple[KeyRingEntry, ...]

    def __repr__(self) -> str:
        return "KeyRing(" + ", ".join(f"{e.name}:{e.kcv}" for e in self.entries) + ")"

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, name: str) -> KeyRingEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def block(self, name: str) -> KeyBlock:
        return self.entry(name).block

    def mac_key(self, institution: str) -> KeyBlock:
        return self.block(mac_key_name(institution))

    def print_key(self, manufacturer: str) -> KeyBlock:
        return self.block(print_key_name(manufacturer))

    @property
    def ivr_pin_key(self) -> KeyBlock:
        return self.block(IVR_PIN)

    @property
    def vvk(self) -> KeyBlock:
        return self.block(VVK)

    def as_rows(self) -> list[tuple[str, str, str]]:
        """(name, key block text, kcv) rows, e.g. for a database table."""
        return [(e.name, e.block.text, e.kcv) for e in self.entries]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, str]]) -> KeyRing:
        return cls(tuple(KeyRingEntry(n, KeyBlock(b), k) for n, b, k in rows))


def _header(usage: str, algorithm: str, mode: str, exportability: str,
            blocks: tuple[tuple[str, str], ...] = ()) -> KeyBlockHeader:
    return KeyBlockHeader(key_usage=usage, algorithm=algorithm, mode_of_use=mode,
                          exportability=exportability, optional_blocks=blocks)


async def provision_dev_keys(hsm: HsmClient, dev: DevKeys) -> KeyRing:
    """Run the dev key ceremony against `hsm` (which must run the dev LMK, authorised)."""
    lmk_kcv, _ = await hsm.diagnostics()
    if lmk_kcv.upper() != dev.dev_lmk_kcv:
        raise KeyProvisioningError("the HSM does not use the dev LMK; dev keys not provisioned")
    lmk = combine_lmk(dev.lmk_components)
    entries: list[KeyRingEntry] = []

    # Console step of the ceremony (dev only): the KEK under the LMK, confirmed by the HSM.
    kek_block = KeyBlock(wrap(lmk, _header("K1", "A", "B", "N"), dev.ceremony_kek,
                              masked_length=32))
    kek_kcv = kcv(dev.ceremony_kek).hex().upper()
    if (await hsm.key_check_value(kek_block)) != kek_kcv:
        raise KeyProvisioningError("the HSM computed another check value for the ceremony KEK")
    entries.append(KeyRingEntry(CEREMONY_KEK, kek_block, kek_kcv))

    async def load(name: str, header: KeyBlockHeader, key: bytes) -> KeyBlock:
        under_kek = wrap(dev.ceremony_kek, header, key)
        block, check = await hsm.import_key(kek_block, under_kek,
                                            expected_kcv=kcv(key).hex().upper())
        entries.append(KeyRingEntry(name, block, check))
        return block

    for institution, key in dev.institution_mac:
        await load(mac_key_name(institution), _header("M6", "A", "C", "N"), key)
    await load(IVR_PIN, _header("P0", "A", "B", "E"), dev.ivr_pin_key)
    if dev.voucher_verification_key is not None:
        await load(VVK, _header("V0", "H", "C", "N", (("HM", "21"),)),
                   dev.voucher_verification_key)
    else:
        generated = await hsm.generate_key("V0", mode_of_use="C")
        entries.append(KeyRingEntry(VVK, generated.key_block, generated.kcv))
    manufacturer_keks = dict(dev.manufacturer_kek)
    for manufacturer, key in dev.manufacturer_print:
        print_block = await load(print_key_name(manufacturer),
                                 _header("P0", "A", "E", "E"), key)
        mkek_block = await load(manufacturer_kek_name(manufacturer),
                                _header("K0", "A", "E", "N"), manufacturer_keks[manufacturer])
        exported, check = await hsm.export_key(mkek_block, print_block)
        entries.append(KeyRingEntry(exported_print_key_name(manufacturer), exported, check))
    return KeyRing(tuple(entries))
