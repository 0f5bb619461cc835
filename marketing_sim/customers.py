"""The simulator's seeded customers, generated lazily and deterministically (no I/O).

A customer is a pure function of ``(seed, index)``: nothing is generated at start-up, and any
account can be produced in a few microseconds when it is first asked for.  Only the changes
made by postings are kept (see :mod:`marketing_sim.ledger`).

Account numbers are ten digits: a nine-digit serial ``100000000 + index`` followed by a Luhn
check digit, so that consecutive customers have increasing account numbers and a mistyped
number is almost always unknown rather than someone else's account.

Randomness comes from BLAKE2b over ``seed`` and ``index``, so that the same seed gives the same
customers on every Python version and platform.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final, Literal

SERIAL_BASE: Final = 100_000_000
MAX_CUSTOMERS: Final = 900_000_000
#: The most recent billing period of the seeded bills; arrears end at this month.
LAST_BILLED_PERIOD: Final = (2026, 4)
#: How many seeded customers in 10,000 have each property.
CLOSED_PER_10K: Final = 200
ARREARS_PER_10K: Final = 3000
PREPAID_PER_10K: Final = 2000
MAX_ARREARS_MONTHS: Final = 6

AccountStatus = Literal["active", "closed"]

# Common surnames and given-name characters; every one of them is in GBK (checked by the tests).
SURNAMES: Final = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶"
    "程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾"
    "毛郝龚邵万钱严覃武戴莫孔向汤"
)
GIVEN_NAME_CHARS: Final = (
    "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红建文辉国荣志海鹏飞春梅宇浩然欣怡"
    "子轩雨涵博佳琪思远晨阳嘉慧淑珍凤德福永宏俊峰立新振东庆云燕丹婷雪莉金宝林松柏瑞祥"
)
CITY: Final = "河北省保定市"
URBAN_DISTRICTS: Final = ("竞秀区", "莲池区", "满城区", "清苑区", "徐水区")
STREETS: Final = (
    "朝阳北大街",
    "东风中路",
    "裕华西路",
    "七一东路",
    "长城北大街",
    "五四西路",
    "复兴中路",
    "天威西路",
    "恒祥北大街",
    "向阳南大街",
    "建设南路",
    "乐凯大街",
)
COUNTIES: Final = ("定兴县", "易县", "涞水县", "阜平县", "唐县", "望都县", "蠡县", "博野县")
TOWNS: Final = ("城关镇", "北河镇", "南庄镇", "东关镇", "西城镇", "高村乡", "大王店镇")
VILLAGES: Final = (
    "张家庄村",
    "李各庄村",
    "王家营村",
    "前屯村",
    "后屯村",
    "东马村",
    "西柳村",
    "南关村",
)


class CustomerError(ValueError):
    """Bad customer-book parameters."""


def check_count(count: int) -> None:
    """Refuse a number of customers the book cannot seed (`CustomerError`, which says the
    range)."""
    if not 0 <= count <= MAX_CUSTOMERS:
        raise CustomerError(f"customers must be from 0 to {MAX_CUSTOMERS:,}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Bill:
    """One monthly bill: ``period`` is ``YYYY-MM``, ``amount`` in fen."""

    period: str
    amount: int

    def __post_init__(self) -> None:
        if len(self.period) != 7 or self.period[4] != "-":
            raise CustomerError(f"bad billing period {self.period!r}")
        if self.amount <= 0:
            raise CustomerError("a bill amount must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Customer:
    """A customer as seeded, before any posting."""

    account_no: str
    name: str
    address: str
    status: AccountStatus
    bills: tuple[Bill, ...]
    prepaid_balance: int


def luhn_check_digit(digits: str) -> str:
    """The Luhn check digit to append to ``digits``."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 0:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def _period(months_back: int) -> str:
    year, month = LAST_BILLED_PERIOD
    serial = year * 12 + (month - 1) - months_back
    return f"{serial // 12:04d}-{serial % 12 + 1:02d}"


class CustomerBook:
    """The seeded customers: ``count`` of them, from ``seed``; account order is index order."""

    __slots__ = ("_count", "_seed_key")

    def __init__(self, *, count: int, seed: int) -> None:
        check_count(count)
        self._count = count
        self._seed_key = hashlib.blake2b(str(seed).encode(), digest_size=16).digest()

    @property
    def count(self) -> int:
        return self._count

    def account_no(self, index: int) -> str:
        """The account number of the customer at ``index``."""
        serial = str(SERIAL_BASE + index)
        return serial + luhn_check_digit(serial)

    def index_of(self, account_no: str) -> int | None:
        """The index of ``account_no``, or ``None`` when no such seeded customer exists."""
        if len(account_no) != 10 or not account_no.isascii() or not account_no.isdigit():
            return None
        if luhn_check_digit(account_no[:9]) != account_no[9]:
            return None
        index = int(account_no[:9]) - SERIAL_BASE
        if not 0 <= index < self._count:
            return None
        return index

    def first_index_after(self, account_no: str) -> int:
        """The index of the first customer whose account number sorts after ``account_no``."""
        if account_no < self.account_no(0):
            return 0
        index = int(account_no[:9]) - SERIAL_BASE
        if index >= self._count:
            return self._count
        return index + 1 if self.account_no(index) <= account_no else index

    def customer(self, index: int) -> Customer:
        """The seeded customer at ``index`` (deterministic in the seed and the index)."""
        if not 0 <= index < self._count:
            raise CustomerError("no such customer")
        digest = hashlib.blake2b(
            struct.pack("<Q", index), digest_size=64, key=self._seed_key
        ).digest()
        r = struct.unpack("<16I", digest)
        surname = SURNAMES[r[0] % len(SURNAMES)]
        given = GIVEN_NAME_CHARS[r[1] % len(GIVEN_NAME_CHARS)]
        if r[2] % 10 < 6:
            given += GIVEN_NAME_CHARS[r[3] % len(GIVEN_NAME_CHARS)]
        if r[4] % 10 < 8:
            address = (
                f"{CITY}{URBAN_DISTRICTS[r[5] % len(URBAN_DISTRICTS)]}"
                f"{STREETS[r[6] % len(STREETS)]}{r[7] % 300 + 1}号"
                f"{r[8] % 20 + 1}栋{r[9] % 6 + 1}单元{r[10] % 18 + 1}0{r[11] % 4 + 1}室"
            )
        else:
            address = (
                f"{CITY}{COUNTIES[r[5] % len(COUNTIES)]}{TOWNS[r[6] % len(TOWNS)]}"
                f"{VILLAGES[r[7] % len(VILLAGES)]}{r[8] % 200 + 1}号"
            )
        status: AccountStatus = "closed" if r[12] % 10_000 < CLOSED_PER_10K else "active"
        category = r[13] % 10_000
        bills: tuple[Bill, ...] = ()
        prepaid = 0
        if category < ARREARS_PER_10K:
            months = r[14] % MAX_ARREARS_MONTHS + 1
            # Each month's bill amount varies around a per-customer base of 30 to 400 yuan.
            base = 3_000 + r[15] % 37_000
            bills = tuple(
                Bill(
                    period=_period(back),
                    amount=base + (r[(back * 5) % 16] % 2_000) * 7 % (base // 2 + 1),
                )
                for back in range(months - 1, -1, -1)
            )
        elif category < ARREARS_PER_10K + PREPAID_PER_10K:
            prepaid = (r[14] % 2_000 + 1) * 100
        return Customer(
            account_no=self.account_no(index),
            name=surname + given,
            address=address,
            status=status,
            bills=bills,
            prepaid_balance=prepaid,
        )
