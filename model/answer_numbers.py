"""Numbers in an answer to tool results come from the conversation.

After a tool returns, the model restates its result for the group, and a small model restates numbers
badly: the calculator returned 25502500 and the 135M default wrote "5050 squared is 255,025". So while the
bot answers after tool results, every number it writes must be one the conversation holds (the people's
messages, the tool results, the bot's own turns), in one of the forms a person writes it:

    as written              25502500, 09:04, 39.1111
    grouped or not          25,502,500 for 25502500, and back
    rounded                 39.1 or 39 for 39.1111; 32.39 for 32.391666; 86.0 and 86.00 for 86
    a time's leading part   09 and 9 for 09:04, 9:04 for 09:04, 3:10 for 15:10, 11 for UTC+11:00
    a percentage            15 for 0.15
    a number word           3 for "three", 12 for "dozen"

Decoding enforces it token by token, like the call grammar (`model/constrained.py`): while the text ends
in a number, the next token may go on only toward one of those forms, and may end the number only where it
is one; a number may start only as one of them starts. A number is a run of digits with ".", "," or ":"
inside ("25,502,500", "09:04"); a separator after its last digit ends it ("86." ends a sentence). Numbers
inside a tool call are not these rules' (a new call may compute: "84.5*0.15"); tool formats whose calls
open with no tag (Llama-3 JSON, GLM-4) are left free, since a call cannot be told from words while it is
being written.

The price: a number the bot would work out itself ("190 minutes" from 3.1667 hours) cannot be written; it
calls the calculator again, or words the answer without it. `EngineConfig.ground_answer_numbers` turns the
rule off. The local backend only: a remote engine returns the top 20 log-probabilities, which may hold no
allowed token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

import torch

from model.grounding import NUMBER_WORDS
from model.tool_format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

SEPARATORS = ".,:"
_RUN_RE = re.compile(r"\d[\d.,:]*")  # a number: digits with separators inside (and maybe one trailing)
_OPEN_RUN_RE = re.compile(r"\d[\d.,:]*\Z")
_GROUPED_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"\d+(?:\.\d+)?")
_WORD_RE = re.compile(r"[^\W\d_]+")
_MAX_PLACES = 6  # roundings offered: to 0 .. this many decimal places (and at least 2, for money)


def _grouped(text: str) -> str:
    """`text` (digits, maybe a decimal part) with its whole part grouped by thousands."""
    whole, dot, frac = text.partition(".")
    return f"{int(whole):,}{dot}{frac}"


def decimal_places(value: Decimal) -> int:
    """How many digits `value` has after its decimal point as written (0 for an integer)."""
    return max(0, -int(value.as_tuple().exponent))


def _decimal_forms(text: str) -> set[str]:
    """A plain decimal number (no grouping) as written, rounded to each number of places, grouped or not,
    and as a percentage when it is a fraction between 0 and 1."""
    forms = {text}
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - callers pass digits with at most one point
        return forms
    places = decimal_places(value)
    values = [(value, places)]
    if 0 < value < 1:
        values.append((value * 100, max(0, places - 2)))
    for v, p in values:
        for k in range(min(max(p, 2), _MAX_PLACES) + 1):
            try:
                rounded = f"{v.quantize(Decimal(1).scaleb(-k), rounding=ROUND_HALF_UP):f}"
            except InvalidOperation:  # more digits than the decimal context holds: as written only
                break
            forms.update((rounded, _grouped(rounded)))
    return forms


def _time_forms(parts: Sequence[str]) -> set[str]:
    """A time or other colon-separated run ("09:04", "15:10:33", "11:00"): each leading part of it, with and
    without the hour's leading zero, and on a 12-hour clock."""
    forms: set[str] = set()
    hour = int(parts[0])
    hours = {parts[0], str(hour)}
    if hour == 0 or 13 <= hour <= 23:
        hours.add(str(hour - 12 if hour else 12))
    for k in range(1, len(parts) + 1):
        forms.update(":".join([h, *parts[1:k]]) for h in hours)
    for part in parts[1:]:
        forms |= _decimal_forms(part)
    return forms


def _run_forms(run: str) -> set[str]:
    """The forms of one number run as found in the conversation (trailing separators already removed)."""
    if not run:
        return set()
    if _GROUPED_RE.fullmatch(run):
        return {run} | _decimal_forms(run.replace(",", ""))
    if "," in run:  # a list written without spaces ("5,6,7", "10:30,11:45")
        forms = {run}
        for piece in run.split(","):
            forms |= _run_forms(piece.strip(SEPARATORS))
        return forms
    if ":" in run:
        parts = run.split(":")
        if all(p.isdigit() for p in parts):
            return {run} | _time_forms(parts)
        return {run}.union(*(_run_forms(p.strip(SEPARATORS)) for p in parts))
    if _DECIMAL_RE.fullmatch(run):
        return _decimal_forms(run)
    # dotted runs such as a version or a date (1.2.3, 07.12.2026): the whole and each part
    return {run}.union(*(_decimal_forms(p) for p in run.split(".") if p))


def number_forms(text: str) -> set[str]:
    """Every form (module docstring) of every number in `text`, in digits or as a number word."""
    forms: set[str] = set()
    for m in _RUN_RE.finditer(text):
        forms |= _run_forms(m.group().rstrip(SEPARATORS))
    for word in set(_WORD_RE.findall(text.lower())):
        value = NUMBER_WORDS.get(word)
        if value is not None:
            forms |= _decimal_forms(f"{Decimal(repr(value)).normalize():f}")
    return forms


def number_runs(text: str) -> list[str]:
    """The numbers written in `text`, as the rules read them (trailing separators removed)."""
    return [m.group().rstrip(SEPARATORS) for m in _RUN_RE.finditer(text)]


class NumberTokens:
    """The tokenizer side, built once per engine: the tokens that write digits, the digit-free tokens that
    start with a separator, and a mask of all the others (which end a number)."""

    def __init__(self, texts: Sequence[tuple[int, str]], size: int):
        self.size = size
        self.digits: list[tuple[int, str]] = []
        self.separators: list[tuple[int, str]] = []
        self.others = torch.ones(size, dtype=torch.bool)
        for i, text in texts:
            if any(c.isdigit() for c in text):
                self.digits.append((i, text))
            elif text[:1] in SEPARATORS and text:
                self.separators.append((i, text))
            else:
                continue
            self.others[i] = False


class AnswerNumbers:
    """For one answer: which tokens may come next so that every number written is one of `number_forms(said)`."""

    def __init__(self, tokens: NumberTokens, said: str):
        self.tokens = tokens
        self.forms = number_forms(said)
        self.prefixes = {form[:k] for form in self.forms for k in range(1, len(form) + 1)}

    def fits(self, text: str) -> bool:
        """Whether the numbers in `text` are forms, the last (ending `text`) at least the start of one."""
        for m in _RUN_RE.finditer(text):
            run = m.group()
            whole = run.rstrip(SEPARATORS)
            if m.end() == len(text):
                if run not in self.prefixes and not (whole != run and whole in self.forms):
                    return False
            elif whole not in self.forms:
                return False
        return True

    def banned(self, text: str) -> torch.Tensor | None:
        """A mask of the tokens that may not follow `text` (the answer so far); None when every token may, or
        when none may (a number begun before the rule applied, which it cannot finish), or inside a tool call
        (`text` has an opening tag not yet closed: calls decoded without the call grammar)."""
        if text.rfind(TOOL_CALL_OPEN) > text.rfind(TOOL_CALL_CLOSE):
            return None
        m = _OPEN_RUN_RE.search(text)
        before = m.group() if m else ""
        candidates = self.tokens.digits + self.tokens.separators if before else self.tokens.digits
        unfit = [i for i, piece in candidates if not self.fits(before + piece)]
        ends = bool(before) and before.rstrip(SEPARATORS) not in self.forms  # a token that ends the number here
        if not unfit and not ends:
            return None
        mask = self.tokens.others.clone() if ends else torch.zeros(self.tokens.size, dtype=torch.bool)
        mask[unfit] = True
        return None if bool(mask.all()) else mask
