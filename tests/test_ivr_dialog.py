"""The IVR's pure parts: the amount spellers, the prompts, the dialog table and state machine
(in memory: no node, no sockets; the full path is in test_ivr_api.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switch.cards.serials import make_serial
from switch.ivr import dialog
from switch.ivr.dialog import (
    AccountFact,
    AniBlocked,
    Busy,
    Call,
    CardFact,
    DialogError,
    Digits,
    Limits,
    LookupAccount,
    LookupCard,
    NotFound,
    PinBlock,
    PinFact,
    Redeem,
    RedeemFact,
    Step,
    Timeout,
    Turn,
    VerifyPin,
    advance,
    allocate,
    plan,
    start,
)
from switch.ivr.prompts import FIELD_KINDS, PROMPTS, render
from switch.ivr.simulator import spoken_digits
from switch.ivr.speech import (
    MAX_SPOKEN,
    amount_en,
    amount_zh,
    digits_en,
    digits_zh,
    int_en,
    int_zh,
)

# --- amounts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fen", "zh", "en"), [
    (12050, "一百二十元五角", "one hundred twenty yuan and fifty fen"),
    (10000, "一百元整", "one hundred yuan"),
    (5, "五分", "five fen"),
    (100500, "一千零五元", "one thousand five yuan"),
    (50, "五角", "fifty fen"),
    (105, "一元零五分", "one yuan and five fen"),
    (155, "一元五角五分", "one yuan and fifty-five fen"),
    (0, "零元", "zero yuan"),
    (1000, "十元整", "ten yuan"),
    (1500, "十五元", "fifteen yuan"),
    (5000, "五十元整", "fifty yuan"),
    (1001000, "一万零一十元整", "ten thousand ten yuan"),
    (10000000, "十万元整", "one hundred thousand yuan"),
    (10000000000, "一亿元整", "one hundred million yuan"),
    (10000010000, "一亿零一百元整", "one hundred million one hundred yuan"),
    (123456789012, "十二亿三千四百五十六万七千八百九十元一角二分",
     "one billion two hundred thirty-four million five hundred sixty-seven thousand eight "
     "hundred ninety yuan and twelve fen"),
])
def test_amounts(fen: int, zh: str, en: str) -> None:
    assert amount_zh(fen) == zh
    assert amount_en(fen) == en


@pytest.mark.parametrize(("n", "zh"), [
    (10, "十"), (11, "十一"), (20, "二十"), (101, "一百零一"), (110, "一百一十"),
    (1001, "一千零一"), (1010, "一千零一十"), (1100, "一千一百"), (10001, "一万零一"),
    (10010, "一万零一十"), (100000, "十万"), (100010, "十万零一十"), (101000, "十万一千"),
    (1000000, "一百万"), (10000000, "一千万"), (100000000, "一亿"), (100000001, "一亿零一"),
    (100010000, "一亿零一万"), (110000000, "一亿一千万"), (1000000000, "十亿"),
    (1000100000000, "一万零一亿"), (1000000000000, "一万亿"),
    (10000000000000, "十万亿"), (10001000000000, "十万零一十亿"),
])
def test_chinese_zero_and_ten_rules(n: int, zh: str) -> None:
    assert int_zh(n) == zh


_ZH_D = {c: i for i, c in enumerate("零一二三四五六七八九")}
_ZH_U = {"十": 10, "百": 100, "千": 1000}


def _small(text: str) -> int:
    total = digit = 0
    for ch in text:
        if ch in _ZH_D:
            digit = _ZH_D[ch]
        else:
            total += (digit or 1) * _ZH_U[ch]
            digit = 0
    return total + digit


def _below_yi(text: str) -> int:
    hi, sep, lo = text.partition("万")
    return _small(hi) * 10**4 + _small(lo) if sep else _small(text)


def parse_zh(text: str) -> int:
    """An independent reader of Chinese numerals (to check that the speller round-trips)."""
    hi, sep, lo = text.partition("亿")
    return _below_yi(hi) * 10**8 + _below_yi(lo) if sep else _below_yi(text)


@given(st.integers(min_value=0, max_value=MAX_SPOKEN))
def test_chinese_numbers_read_back(n: int) -> None:
    text = int_zh(n)
    assert parse_zh(text) == n
    assert "零零" not in text
    if n:
        assert not text.endswith("零") and not text.startswith("零")


_EN = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_EN.update({w: 10 * (i + 2) for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split())})
_EN_BIG = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12,
           "quadrillion": 10**15}


def parse_en(text: str) -> int:
    total = current = 0
    for word in text.replace("-", " ").split():
        if word in _EN:
            current += _EN[word]
        elif word == "hundred":
            current *= 100
        else:
            total += current * _EN_BIG[word]
            current = 0
    return total + current


@given(st.integers(min_value=0, max_value=MAX_SPOKEN))
def test_english_numbers_read_back(n: int) -> None:
    assert parse_en(int_en(n)) == n


@given(st.integers(min_value=0, max_value=10**12))
def test_amounts_read_back(fen: int) -> None:
    zh = amount_zh(fen)
    yuan_part, sep, rest = zh.partition("元")
    if sep:
        assert parse_zh(yuan_part) == fen // 100
    else:
        rest = zh
    jiao = rest.split("角")[0][-1:] if "角" in zh else "零"
    assert _ZH_D[jiao] == fen // 10 % 10
    en = amount_en(fen)
    words = en.split(" yuan")
    yuan = parse_en(words[0]) if " yuan" in en else 0
    cents = parse_en(en.rsplit("and ", 1)[-1].removesuffix(" fen")) if en.endswith("fen") else 0
    assert yuan * 100 + cents == fen


def test_digits_and_bounds() -> None:
    assert digits_zh("0120") == "零一二零"
    assert digits_en("0120") == "zero one two zero"
    assert spoken_digits(digits_zh("2025010100001"), "zh") == "2025010100001"
    assert spoken_digits("The number is " + digits_en("907") + ".", "en") == "907"
    for bad in (-1, MAX_SPOKEN + 1):
        with pytest.raises(ValueError):
            amount_zh(bad)
    with pytest.raises(TypeError):
        int_en(True)
    with pytest.raises(ValueError):
        digits_zh("12a")


def test_every_prompt_renders_in_both_languages() -> None:
    values: dict[str, object] = {
        "account": "0123456789", "serial": "1302250000000012", "receipt": "20250101",
        "arrears": 12050, "prepaid": 0, "face_value": 10000, "amount": 10000,
        "arrears_after": 2050, "prepaid_after": 0, "tries_left": 2, "name": "张**"}
    assert set(values) == set(FIELD_KINDS)
    for pid in PROMPTS:
        zh, en = render(pid, "zh", values), render(pid, "en", values)
        assert zh and en and "{" not in zh + en
    assert render("pin_wrong", "zh", values) == "密码错误，您还可以尝试两次。"
    assert "一百二十元五角" in render("confirm_account", "zh", values)
    assert "one hundred twenty yuan and fifty fen" in render("confirm_account", "en", values)
    assert "零一二三四五六七八九" in render("confirm_account", "zh", values)


# --- the dialog ----------------------------------------------------------------------------------

ACCT = "0123456789"
SERIAL = make_serial("130225", 42)
BLOCK = PinBlock("0123456789ABCDEF0123456789ABCDEF")
LIMITS = Limits()


def new_call(lang: str = "zh") -> Call:
    return Call(call_id="call-1", ani="13800000000", dnis="95598", lang=lang)


def active(arrears: int = 12050, prepaid: int = 0) -> AccountFact:
    return AccountFact(account_no=ACCT, name="张**", status="active", arrears=arrears,
                       prepaid=prepaid)


def ids(turn: Turn) -> list[str]:
    return [p.id for p in turn.prompts]


def step(call: Call, inp: dialog.Input, fact: dialog.Fact | None = None) -> tuple[Call, Turn]:
    """One turn as the shell does it: the effect planned must match the fact supplied."""
    effect = plan(call, inp)
    if fact is None:
        assert effect is None or isinstance(effect, LookupCard), effect
    return advance(call, inp, fact, LIMITS)


def at_pin() -> Call:
    call, _ = start(new_call())
    call, _ = step(call, Digits("1"))
    call, _ = step(call, Digits(ACCT + "#"), active())
    call, _ = step(call, Digits("1"))
    call, turn = step(call, Digits(SERIAL), CardFact(state="sold", face_value=10000))
    assert call.step is Step.ENTER_PIN and turn.collect.kind == "pin"
    return call


def test_the_table_covers_every_step_and_is_documented() -> None:
    assert set(dialog.STEPS) == set(Step)
    table = dialog.dialog_table()
    for s in Step:
        assert f"`{s.value}`" in table


def test_recharge_path_and_result_allocation() -> None:
    call, turn = start(new_call())
    assert ids(turn) == ["welcome", "menu"] and call.turns == 1
    call, turn = step(call, Digits("1"))
    assert call.step is Step.ENTER_ACCOUNT and call.purpose == "recharge"
    assert plan(call, Digits(ACCT)) == LookupAccount(ACCT)
    call, turn = step(call, Digits(ACCT), active(arrears=12050, prepaid=300))
    assert call.step is Step.CONFIRM_ACCOUNT and "张**" in turn.prompts[0].text
    call, _ = step(call, Digits("1"))
    assert plan(call, Digits(SERIAL + "#")) == LookupCard(SERIAL)
    call, _ = step(call, Digits(SERIAL + "#"), CardFact(state="sold", face_value=10000))
    assert plan(call, BLOCK) == VerifyPin(SERIAL, BLOCK)
    call, turn = step(call, BLOCK, PinFact(match=True))
    assert call.step is Step.CONFIRM_RECHARGE and "一百元整" in turn.prompts[0].text
    assert plan(call, Digits("1")) == Redeem(SERIAL, ACCT, 10000)
    call, turn = advance(call, Digits("1"),
                         RedeemFact(outcome="ok", amount=10000, receipt_no="2025"), LIMITS)
    assert call.step is Step.RESULT
    assert ids(turn) == ["result_credited", "result_arrears", "result_txn", "result_menu"]
    assert "二十元五角" in turn.prompts[1].text  # 120.50 - 100.00 still owed
    assert call.account is not None and (call.account.arrears, call.account.prepaid) == (2050,
                                                                                         300)
    # another card: the account's figures now include the first card
    call, _ = step(call, Digits("1"))
    call, _ = step(call, Digits(SERIAL), CardFact(state="sold", face_value=5000))
    call, _ = step(call, BLOCK, PinFact(match=True))
    call, turn = advance(call, Digits("1"),
                         RedeemFact(outcome="ok", amount=5000, receipt_no="2026"), LIMITS)
    assert ids(turn)[1] == "result_prepaid" and "三十二元五角" in turn.prompts[1].text
    call, turn = step(call, Digits("9"))
    assert call.ended and turn.hangup and ids(turn) == ["goodbye"]
    with pytest.raises(DialogError):
        plan(call, Digits("1"))


def test_allocation_pays_arrears_first() -> None:
    assert allocate(12050, 0, 10000) == (2050, 0)
    assert allocate(12050, 100, 20000) == (0, 8050)
    assert allocate(0, 500, 5000) == (0, 5500)


@pytest.mark.parametrize(("fact", "prompt"), [
    (NotFound(), "account_unknown"),
    (AccountFact(account_no=ACCT, name="李*", status="closed", arrears=0, prepaid=0),
     "account_closed"),
    (Busy(), "service_busy"),
])
def test_account_failures_three_times_then_goodbye(fact: dialog.Fact, prompt: str) -> None:
    call, _ = start(new_call())
    call, _ = step(call, Digits("1"))
    for _ in range(2):
        call, turn = advance(call, Digits(ACCT), fact, LIMITS)
        assert call.step is Step.ENTER_ACCOUNT and ids(turn) == [prompt, "enter_account"]
    call, turn = advance(call, Digits(ACCT), fact, LIMITS)
    # a service that stayed busy is said to be so, not the caller to have erred
    why = [] if isinstance(fact, Busy) else ["too_many_attempts"]
    assert ids(turn) == [prompt, *why, "goodbye"] and turn.hangup and call.ended


def test_the_third_unknown_or_closed_account_of_a_call_ends_it_in_a_row_or_not() -> None:
    closed = AccountFact(account_no=ACCT, name="李*", status="closed", arrears=0, prepaid=0)
    call, _ = start(new_call())
    call, _ = step(call, Digits("1"))
    call, turn = advance(call, Digits(ACCT), NotFound(), LIMITS)
    assert ids(turn) == ["account_unknown", "enter_account"] and call.account_failures == 1
    call, _ = advance(call, Digits(ACCT), active(), LIMITS)  # found: a good input
    assert call.step is Step.CONFIRM_ACCOUNT and call.strikes == 0
    call, _ = step(call, Digits("2"))  # another account
    call, turn = advance(call, Digits(ACCT), closed, LIMITS)
    assert ids(turn) == ["account_closed", "enter_account"] and not call.ended
    call, turn = advance(call, Digits(ACCT), NotFound(), LIMITS)
    assert ids(turn) == ["account_unknown", "too_many_attempts", "goodbye"]
    assert call.ended and turn.hangup and call.account_failures == 3
    # the limit is a setting
    call, _ = start(new_call())
    call, _ = step(call, Digits("2"))  # balance: the same step, the same count
    call, turn = advance(call, Digits(ACCT), NotFound(), Limits(account_tries=1))
    assert call.ended and ids(turn)[-1] == "goodbye"


def test_a_call_that_goes_on_too_long_ends_without_doing_what_its_last_input_asks() -> None:
    limits = Limits(max_turns=6)
    call = at_pin()  # the start and four inputs: five turns
    assert call.turns == 5
    call, turn = advance(call, BLOCK, PinFact(match=True), limits)  # the sixth: allowed
    assert call.step is Step.CONFIRM_RECHARGE and not call.ended
    assert plan(call, Digits("1"), limits) is None  # the seventh redeems nothing
    done, turn = advance(call, Digits("1"), None, limits)
    assert done.ended and turn.hangup and ids(turn) == ["too_many_attempts", "goodbye"]
    assert done.result is None and done.turns == 7


def test_strikes_reset_after_a_good_input() -> None:
    call, _ = start(new_call())
    call, _ = step(call, Digits("5"))
    call, _ = step(call, Timeout())
    assert call.strikes == 2
    call, _ = step(call, Digits("1"))
    assert call.strikes == 0 and call.step is Step.ENTER_ACCOUNT
    call, turn = step(call, Digits("123"))  # wrong length: a strike, no lookup
    assert ids(turn) == ["invalid_input", "enter_account"] and call.strikes == 1
    call, turn = step(call, BLOCK)  # a PIN block where digits are expected
    assert ids(turn) == ["invalid_input", "enter_account"] and call.strikes == 2


def test_menu_agent_and_balance() -> None:
    call, _ = start(new_call("en"))
    agent, turn = step(call, Digits("0"))
    assert agent.step is Step.AGENT and turn.hangup and agent.ended
    call, _ = step(call, Digits("2"))
    call, turn = step(call, Digits(ACCT), active(arrears=0, prepaid=5000))
    assert call.step is Step.BALANCE and ids(turn) == ["balance", "balance_menu"]
    assert "fifty yuan" in turn.prompts[0].text
    call, turn = step(call, Digits("4"))
    assert ids(turn) == ["invalid_input", "balance_menu"]
    call, turn = step(call, Digits("1"))
    assert call.step is Step.ENTER_CARD_SERIAL and call.purpose == "recharge"


@pytest.mark.parametrize(("state", "prompt"), [
    ("ordered", "card_not_sold"), ("produced", "card_not_sold"), ("in_stock", "card_not_sold"),
    ("issued", "card_not_sold"), ("redeemed", "card_used"), ("voided", "card_voided"),
    ("expired", "card_expired"), ("locked", "card_locked"),
])
def test_card_states(state: str, prompt: str) -> None:
    call = dataclasses.replace(at_pin(), step=Step.ENTER_CARD_SERIAL)
    call, turn = step(call, Digits(SERIAL), CardFact(state=state, face_value=10000))
    assert call.step is Step.ENTER_CARD_SERIAL and ids(turn) == [prompt, "enter_card_serial"]


def test_wrong_check_digit_needs_no_lookup() -> None:
    call = dataclasses.replace(at_pin(), step=Step.ENTER_CARD_SERIAL)
    bad = SERIAL[:15] + str((int(SERIAL[15]) + 1) % 10)
    assert plan(call, Digits(bad)) is None
    call, turn = advance(call, Digits(bad), None, LIMITS)
    assert ids(turn) == ["serial_invalid", "enter_card_serial"]


def test_pin_limits_in_memory() -> None:
    call = at_pin()
    call, turn = advance(call, BLOCK, PinFact(match=False, card_failures=1), LIMITS)
    assert ids(turn) == ["pin_wrong", "enter_pin"] and "两次" in turn.prompts[0].text
    call, turn = advance(call, BLOCK, PinFact(match=False, card_failures=4), LIMITS)
    assert "一次" in turn.prompts[0].text  # the card's limit is nearer than the call's
    call, turn = advance(call, BLOCK, PinFact(match=False, card_failures=5), LIMITS)
    assert ids(turn) == ["pin_too_many", "goodbye"] and call.ended
    locked, turn = advance(at_pin(), BLOCK, PinFact(match=False, card_failures=5,
                                                    card_locked=True), LIMITS)
    assert ids(turn) == ["card_locked_now", "goodbye"] and locked.ended
    blocked, turn = advance(at_pin(), BLOCK, PinFact(match=False, card_failures=5,
                                                     card_locked=True, ani_blocked=True),
                            LIMITS)
    assert ids(turn) == ["ani_blocked", "goodbye"] and blocked.ended
    busy, turn = advance(at_pin(), BLOCK, Busy(), LIMITS)
    assert ids(turn) == ["service_busy", "enter_pin"] and busy.pin_failures == 0
    gone, turn = advance(at_pin(), BLOCK, AniBlocked(), LIMITS)
    assert gone.ended and ids(turn)[0] == "ani_blocked"
    moved, turn = advance(at_pin(), BLOCK, CardFact(state="redeemed", face_value=1), LIMITS)
    assert moved.step is Step.ENTER_CARD_SERIAL and ids(turn)[0] == "card_used"


def test_attempts_left_count_the_caller_numbers_daily_limit_too() -> None:
    """Eight wrong PINs from the number today, ten allowed: the ninth leaves one, not two."""
    _, turn = advance(at_pin(), BLOCK, PinFact(match=False, card_failures=1, ani_left=1),
                      LIMITS)
    assert ids(turn) == ["pin_wrong", "enter_pin"] and "一次" in turn.prompts[0].text


@pytest.mark.parametrize(("inp", "fact", "said"), [
    (Timeout(), None, ["no_input", "too_many_attempts", "goodbye"]),
    (Digits("12#"), None, ["invalid_input", "too_many_attempts", "goodbye"]),
    (BLOCK, Busy(), ["service_busy", "goodbye"]),
])
def test_a_call_ended_at_the_pin_step_is_not_asked_for_its_pin(inp: dialog.Input,
                                                                fact: dialog.Fact | None,
                                                                said: list[str]) -> None:
    """The third strike ends the call: the caller is not asked for the PIN again just before
    it hangs up, and a service that stayed busy says so rather than blaming the caller."""
    call = at_pin()
    for _ in range(2):
        call, turn = advance(call, inp, fact, LIMITS)
        assert ids(turn)[-1] == "enter_pin" and not call.ended
    call, turn = advance(call, inp, fact, LIMITS)
    assert call.ended and ids(turn) == said


def test_redemption_refused_or_busy() -> None:
    call = at_pin()
    call, _ = advance(call, BLOCK, PinFact(match=True), LIMITS)
    used, turn = advance(call, Digits("1"), RedeemFact(outcome="used"), LIMITS)
    assert used.step is Step.ENTER_CARD_SERIAL and ids(turn)[0] == "card_used"
    busy, turn = advance(call, Digits("1"), Busy(), LIMITS)
    assert busy.step is Step.CONFIRM_RECHARGE and ids(turn) == ["service_busy",
                                                                 "confirm_recharge"]
    cancelled, turn = step(call, Digits("2"))
    assert cancelled.step is Step.MENU and ids(turn) == ["recharge_cancelled", "menu"]


def test_call_state_round_trips_and_is_validated() -> None:
    call = at_pin()
    assert Call.from_json(call.as_json()) == call
    # a call saved by a later version (a field this one does not know) is still read
    assert Call.from_json({**call.as_json(), "added_later": 1}) == call
    later = call.as_json()
    assert later["account"] is not None
    later["account"] = {**later["account"], "added_later": 2}
    assert Call.from_json(later) == call
    for bad in ({"call_id": "a b"}, {"ani": "+1"}, {"lang": "fr"}, {"dnis": ""}):
        with pytest.raises(DialogError):
            dataclasses.replace(new_call(), **bad)  # type: ignore[arg-type]
    with pytest.raises(DialogError):
        PinBlock("xyz")
    assert "0123" not in repr(BLOCK) and "0123" not in repr(VerifyPin(SERIAL, BLOCK))
    with pytest.raises(DialogError):
        Digits("12a")


def test_the_docs_show_the_current_table() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "ivr.md"
    assert dialog.dialog_table() in docs.read_text(encoding="utf-8")
