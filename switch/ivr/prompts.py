"""The IVR's prompts: stable ids, the text in Chinese and English, and how values are spoken.

A prompt's text is a template whose `{fields}` are spoken according to their kind: amounts in
words (一百二十元五角 / one hundred twenty yuan and fifty fen), account, card and transaction
numbers digit by digit, counts as numbers, names as given (already masked). The table is checked
when the module is imported: every prompt has both languages and names only known fields.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from switch.ivr.speech import speak_amount, speak_digits, speak_int

__all__ = ["FIELD_KINDS", "LANGS", "PROMPTS", "PromptText", "render"]

LANGS = ("zh", "en")

#: field name -> how it is spoken
FIELD_KINDS: Mapping[str, str] = MappingProxyType({
    "account": "digits", "serial": "digits", "receipt": "digits",
    "arrears": "amount", "prepaid": "amount", "face_value": "amount", "amount": "amount",
    "arrears_after": "amount", "prepaid_after": "amount",
    "tries_left": "int", "name": "text",
})


@dataclass(frozen=True, slots=True)
class PromptText:
    zh: str
    en: str

    def fields(self) -> frozenset[str]:
        out: set[str] = set()
        for text in (self.zh, self.en):
            out |= {f for _, f, _, _ in string.Formatter().parse(text) if f}
        return frozenset(out)


P = PromptText

PROMPTS: Mapping[str, PromptText] = MappingProxyType({
    "welcome": P("欢迎致电电费充值服务。", "Welcome to the electricity recharge service."),
    "menu": P("充值卡充值请按1，查询余额和欠费请按2，人工服务请按0。",
              "To recharge with a card, press 1. To hear your balance and arrears, press 2. "
              "To speak to an agent, press 0."),
    "agent_transfer": P("正在为您转接人工服务，请稍候。",
                        "Transferring you to an agent. Please hold."),
    "enter_account": P("请输入十位电费户号，以井号键结束。",
                       "Please enter your ten-digit account number, then the hash key."),
    "account_unknown": P("户号{account}不存在。", "There is no account {account}."),
    "account_closed": P("户号{account}已销户，不能充值。",
                        "Account {account} is closed and cannot be recharged."),
    "confirm_account": P("户名{name}，户号{account}，欠费{arrears}，预付余额{prepaid}。"
                         "确认请按1，重新输入请按2。",
                         "Account {account}, name {name}, arrears {arrears}, prepaid balance "
                         "{prepaid}. To confirm, press 1. To enter another account, press 2."),
    "balance": P("户名{name}，户号{account}，欠费{arrears}，预付余额{prepaid}。",
                 "Account {account}, name {name}: arrears {arrears}, prepaid balance {prepaid}."),
    "balance_menu": P("用充值卡为这个户号充值请按1，返回主菜单请按2，结束通话请按9。",
                      "To recharge this account with a card, press 1. For the main menu, "
                      "press 2. To end the call, press 9."),
    "enter_card_serial": P("请输入充值卡背面的十六位卡号，以井号键结束。",
                           "Please enter the sixteen-digit card number printed on the back of "
                           "the card, then the hash key."),
    "serial_invalid": P("卡号有误，请核对后重新输入。",
                        "That card number is not valid. Please check it and try again."),
    "card_not_found": P("没有找到这张充值卡。", "We cannot find that card."),
    "card_not_sold": P("这张充值卡尚未售出，不能使用。",
                       "That card has not been sold yet and cannot be used."),
    "card_used": P("这张充值卡已经使用过了。", "That card has already been used."),
    "card_voided": P("这张充值卡已作废。", "That card has been voided."),
    "card_expired": P("这张充值卡已过期。", "That card has expired."),
    "card_locked": P("这张充值卡因密码错误次数过多已被锁定，请到营业厅办理解锁。",
                     "That card is locked after too many wrong PINs. Please visit a service "
                     "hall to have it unlocked."),
    "enter_pin": P("请刮开密码区，输入十二位密码，以井号键结束。",
                   "Please scratch the panel and enter the twelve-digit PIN, then the hash key."),
    "pin_wrong": P("密码错误，您还可以尝试{tries_left}次。",
                   "Wrong PIN. Attempts left: {tries_left}."),
    "pin_too_many": P("密码错误次数过多，本次通话结束。",
                      "Too many wrong PINs. This call will now end."),
    "card_locked_now": P("密码错误次数过多，这张充值卡已被锁定，请到营业厅办理解锁。",
                         "Too many wrong PINs: the card is now locked. Please visit a service "
                         "hall to have it unlocked."),
    "ani_blocked": P("您的号码暂时不能使用本服务，请到营业厅办理。",
                     "This service is unavailable from your number. Please visit a service "
                     "hall."),
    "service_busy": P("系统繁忙，请稍后再试。",
                      "The service is busy. Please try again in a moment."),
    "confirm_recharge": P("您将用面值{face_value}的充值卡为户号{account}充值。"
                          "确认充值请按1，取消请按2。",
                          "You are about to recharge account {account} with a card of "
                          "{face_value}. To recharge, press 1. To cancel, press 2."),
    "recharge_cancelled": P("已取消充值。", "The recharge has been cancelled."),
    "result_credited": P("充值成功，已为户号{account}充值{amount}。",
                         "Done: {amount} has been credited to account {account}."),
    "result_arrears": P("预计尚欠电费{arrears_after}。",
                        "Your remaining arrears are expected to be {arrears_after}."),
    "result_prepaid": P("预计预付余额为{prepaid_after}。",
                        "Your prepaid balance is expected to be {prepaid_after}."),
    "result_txn": P("交易号{receipt}。", "The transaction number is {receipt}."),
    "result_menu": P("继续用其他充值卡充值请按1，结束通话请按9。",
                     "To recharge with another card, press 1. To end the call, press 9."),
    "invalid_input": P("输入有误。", "Sorry, that is not a valid choice."),
    "no_input": P("没有收到您的输入。", "We did not receive your input."),
    "too_many_attempts": P("输入错误次数过多。", "Too many attempts."),
    "goodbye": P("感谢您的来电，再见。", "Thank you for calling. Goodbye."),
})


def _check_table() -> None:
    for pid, text in PROMPTS.items():
        if not text.zh or not text.en:
            raise RuntimeError(f"prompt {pid} lacks a language")
        unknown = text.fields() - set(FIELD_KINDS)
        if unknown:
            raise RuntimeError(f"prompt {pid} names unknown fields {sorted(unknown)}")


_check_table()


def _spoken(kind: str, value: object, lang: str) -> str:
    if kind == "amount":
        assert isinstance(value, int)
        return speak_amount(value, lang)
    if kind == "int":
        assert isinstance(value, int)
        if lang == "zh" and value == 2:
            return "两"  # a count of two is 两次, not 二次
        return speak_int(value, lang)
    if kind == "digits":
        return speak_digits(str(value), lang)
    return str(value)


def render(prompt_id: str, lang: str, values: Mapping[str, object]) -> str:
    """The text of a prompt in `lang` with its fields spoken (KeyError: unknown id or field)."""
    text = PROMPTS[prompt_id]
    template = text.zh if lang == "zh" else text.en
    needed = text.fields()
    spoken = {f: _spoken(FIELD_KINDS[f], values[f], lang) for f in needed}
    return template.format_map(spoken)
