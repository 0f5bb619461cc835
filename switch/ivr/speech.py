"""Numbers and amounts as words, for the IVR's text-to-speech (pure functions, no I/O).

Chinese amounts follow the way a cashier reads them: `12050` fen is 一百二十元五角, `10000` is
一百元整, `5` is 五分, `100500` is 一千零五元 (整 closes a whole amount whose last word is a
unit, not one that ends on a digit). Inside a number, a run of zeros is read as one 零
(一千零五), zeros at the end of a four-digit group are silent (一百二十), a group below a
thousand that follows a higher group is joined with 零 (一万零五百), and a leading 一十 is read
十 (十五万). English amounts are read in words: "one hundred twenty yuan and fifty fen".
"""

from __future__ import annotations

__all__ = ["MAX_SPOKEN", "amount_en", "amount_zh", "digits_en", "digits_zh", "int_en", "int_zh",
           "speak_amount", "speak_digits", "speak_int"]

#: The largest integer the spellers read (just under ten thousand 万亿).
MAX_SPOKEN = 10**16 - 1

_ZH_DIGITS = "零一二三四五六七八九"
_ZH_POS = ("", "十", "百", "千")
_ZH_UNITS = frozenset("十百千万亿")

_EN_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen")
_EN_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
            "ninety")
_EN_GROUPS = ("", "thousand", "million", "billion", "trillion", "quadrillion")


def _check(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("an integer is required")
    if not 0 <= n <= MAX_SPOKEN:
        raise ValueError(f"can only speak integers from 0 to {MAX_SPOKEN}")


def _zh_group(n: int) -> str:
    """1..9999 without any leading 零; zeros between digits collapse into one 零."""
    digits = f"{n:04d}"
    out: list[str] = []
    pending_zero = False
    for i, ch in enumerate(digits):
        d = int(ch)
        pos = 3 - i
        if d == 0:
            if out:
                pending_zero = True
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(_ZH_DIGITS[d] + _ZH_POS[pos])
    return "".join(out)


def _zh(n: int) -> str:
    """1 ≤ n: groups of 亿 and 万, a 零 where a lower part does not fill its places."""
    if n >= 10**8:
        hi, lo = divmod(n, 10**8)
        out = _zh(hi) + "亿"
        return out + (("零" if lo < 10**7 else "") + _zh(lo) if lo else "")
    if n >= 10**4:
        hi, lo = divmod(n, 10**4)
        out = _zh_group(hi) + "万"
        return out + (("零" if lo < 1000 else "") + _zh_group(lo) if lo else "")
    return _zh_group(n)


def int_zh(n: int) -> str:
    """An integer in Chinese numerals: 1005 → 一千零五, 100000001 → 一亿零一."""
    _check(n)
    if n == 0:
        return "零"
    text = _zh(n)
    return text[1:] if text.startswith("一十") else text


def amount_zh(fen: int) -> str:
    """An amount in fen as spoken in Chinese: 12050 → 一百二十元五角, 10000 → 一百元整."""
    _check(fen)
    yuan, jiao, cents = fen // 100, fen // 10 % 10, fen % 10
    if jiao == 0 and cents == 0:
        spoken = int_zh(yuan)
        # 整 closes an amount whose last word is a unit (一百元整), where the ear could
        # otherwise wait for more; after a final digit (一千零五元) it is not said.
        return f"{spoken}元整" if spoken[-1] in _ZH_UNITS else f"{spoken}元"
    out = f"{int_zh(yuan)}元" if yuan else ""
    if jiao:
        out += f"{_ZH_DIGITS[jiao]}角"
    elif yuan:
        out += "零"  # 一元零五分
    if cents:
        out += f"{_ZH_DIGITS[cents]}分"
    return out


def digits_zh(digits: str) -> str:
    """Digit by digit: 1302 → 一三零二."""
    return "".join(_ZH_DIGITS[int(c)] for c in _only_digits(digits))


def _en_below_thousand(n: int) -> list[str]:
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_EN_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_EN_TENS[tens] + (f"-{_EN_ONES[ones]}" if ones else ""))
    elif rest:
        words.append(_EN_ONES[rest])
    return words


def int_en(n: int) -> str:
    """An integer in English words: 120 → one hundred twenty."""
    _check(n)
    if n == 0:
        return "zero"
    words: list[str] = []
    groups: list[int] = []
    rest = n
    while rest:
        groups.append(rest % 1000)
        rest //= 1000
    for idx in range(len(groups) - 1, -1, -1):
        g = groups[idx]
        if g:
            words += _en_below_thousand(g)
            if _EN_GROUPS[idx]:
                words.append(_EN_GROUPS[idx])
    return " ".join(words)


def amount_en(fen: int) -> str:
    """An amount in fen in English: 12050 → one hundred twenty yuan and fifty fen."""
    _check(fen)
    yuan, cents = divmod(fen, 100)
    if cents == 0:
        return f"{int_en(yuan)} yuan"
    if yuan == 0:
        return f"{int_en(cents)} fen"
    return f"{int_en(yuan)} yuan and {int_en(cents)} fen"


def digits_en(digits: str) -> str:
    """Digit by digit: 1302 → one three zero two."""
    return " ".join(_EN_ONES[int(c)] for c in _only_digits(digits))


def _only_digits(digits: str) -> str:
    if not digits.isascii() or not digits.isdigit():
        raise ValueError("only ASCII digits can be read digit by digit")
    return digits


def speak_amount(fen: int, lang: str) -> str:
    return amount_zh(fen) if lang == "zh" else amount_en(fen)


def speak_int(n: int, lang: str) -> str:
    return int_zh(n) if lang == "zh" else int_en(n)


def speak_digits(digits: str, lang: str) -> str:
    return digits_zh(digits) if lang == "zh" else digits_en(digits)
