"""One call per thing the person asked for.

Asked "the factorial of 5, 10 and 15" or "the weather in Seattle and Los Angeles", the 135M default model
writes one call, for one item, and stops: it rarely opens a second call, let alone a third, and the person
gets a third of the answer. `one_call_per_said_item` makes the other calls from the one the model wrote, in
the first answer to a person (`Engine.generate`), by three rules.

**A said list.** When a call's argument holds exactly one item of a list said in the latest message, the call
is copied once for each other item, with that item in the argument's place. A list is two or more items
joined by commas, "and", "or" or "&" with nothing else between them:

    numbers    "5, 10 and 15", "$1000 or $2000", "5m and 10m" (a unit of up to three letters, or "%", may
               follow each number; after a space, "42.195 km and 21.1 km", only when it follows both, so
               "3 km and 5 miles" is no list); not a date ("May 1, 2022"), a time ("52:30"), a point or list
               written out ("(3, 4)", "[45, 12, 67]"), or an exponent ("m^3")
    names      "Seattle and Los Angeles", "Taylor Swift, Adele and Maroon 5": runs of capitalised words,
               when the value is said as one ("Madrid's" is "Madrid")
    words      "copper and aluminum", "a human or a chimp": as many words as the value has, after "a", "an"
               or "the", not starting with a pronoun or a verb such as "is" or "can" ("train and you can
               transfer" is no list), and followed by punctuation, the end, or a word such as "in", "at" or
               "for" ("meters and a height of 20" is no list)

A list of names holds no word in capitals unless they all are ("Nordlys AS in NO and Vantor GmbH" is no list
of NO and Vantor GmbH). A list of words needs an "and", "or" or "&" ("Chicago, Illinois" is one place), and
two words joined by a comma and "and" are two clauses, not a list ("is vegan, and takes under 30 minutes");
numbers may be joined by commas alone ("case numbers 67813, 71249"). A quoted value's list is quoted too
("'dataset1' and 'dataset2'"). A call is copied only when none of the list's other items is already in it:
`distance(origin="New York", destination="Boston")` after "New York and Boston" uses both and stays one
call. An item any call of the reply already holds is not copied again (the model wrote the calls for 5 and
10: only 15 is added). Only top-level string, number and integer arguments are read, one per call (the first
that holds an item), and an item the parameter's type or `enum` cannot take is not copied.

**A group of said numbers.** Where that leaves one call, and its number arguments hold two or more numbers
said one after another, the numbers it leaves unused are cut into groups of as many, in order; each group
said with the same units as the call's ("6 feet ... 80 kg, also 5.6 feet ... 60 kg") becomes a copy with those
numbers in the same arguments: `pythagoras(a=3, b=4)` after "3 and 4, 5 and 12" adds `pythagoras(a=5, b=12)`.
Nothing is copied when the unused numbers are not whole groups.

**A number said after a parameter's name.** Otherwise, each unused number that comes within four words after
a word of exactly one of the call's number parameters' names (and after no other number) is a copy with it
in that parameter: "a radius of 5 meters, another with a radius of 10" adds `radius=10`. Numbers naming
different parameters one after another make one copy; a said percentage takes the form the call gave its
first one (0.04 for "4%" beside 0.05 for "5%").

A call the model wrote is never changed or dropped, and a reply without a call gets none. Copies are capped
at 7 per call (and `Engine.handle` runs at most `max_tool_calls_per_turn`). `EngineConfig.one_call_per_item`
turns it off (`--single-calls`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.conversation import ToolCall
from model.grounding import _WORD_RE, _as_number, _close, _leaves, _with_parameters, parameter_words
from model.tools import format_number

# between two items: a comma (with "and"/"or" after it or not), or "and"/"or"/"&" alone
_SEP = r"(?:\s*,\s*(?:(?:and|or|&)\s+)?|\s+(?:and|or|&)\s+)"
_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_NUMBER_ITEM_RE = re.compile(rf"(?<![\w.])[$£€]?({_NUMBER})(?:[a-zA-Z]{{1,3}}\b|%)?(?!\w|\.\d)")
_NUMBER_SEP_RE = re.compile(rf"(?:[a-zA-Z]{{1,3}}\b|%)?['\"]?{_SEP}['\"]?")
# "42.195 km and 21.1 km": a unit after a space joins two numbers only when the next number has it too
_SPACED_UNIT_SEP_RE = re.compile(rf"\s([a-zA-Z]{{1,3}})\b['\"]?{_SEP}['\"]?")
# words that begin no item of a list of words: "a human and you", "train and you can transfer"
_NOT_ITEMS = "|".join("""i you he she it we they me him her us them my your his its our their this that these
those is are was were be been do does did have has had can could will would should may might must also then
so not no please get find give show tell make let what which who how when where why and or""".split())
_CAPITAL_ITEM = r"[A-Z](?:[\w&.-]|'(?!s\b)(?=\w))*(?:\s+[A-Z0-9](?:[\w&-]|'(?!s\b)(?=\w))*)*"
_WORD = r"[^\W\d_](?:[\w-]|'(?!s\b)(?=\w))*"  # "don't" is a word; "Madrid's" is "Madrid"
# what may follow the last item of a list of lower-case words: "copper and aluminum?", "water and iron at sea
# level", not "meters and a height of 20"
_CLOSED_RE = re.compile(
    r"(?:'s)?\s*(?:[.,;:!?)\"']|$|(?:in|on|at|for|from|with|to|using|by|as|respectively|each|please)\b)"
)
# the word after a number that is its unit ("6 feet"), unless it is one of these
_UNIT_RE = re.compile(r" ?([^\W\d_]+)")
_NOT_UNITS = frozenset(_NOT_ITEMS.split("|")) | {"of", "to", "for", "with", "at", "by", "from", "the", "a", "an"}
# numbers that are not numbers of their own: a date ("May 1, 2022", "2022-05-01"), a time ("52:30"), an exponent
# ("m^3"); and, for lists of alternatives, a point or a list written out ("(3, 4)", "[45, 12, 67]")
_DATE_TIME_EXPONENT = (
    r"\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}"
    r"|\d{4}-\d{1,2}-\d{1,2}|\d{1,2}:\d{2}(?::\d{2})?|\^\s*-?\d+"
)
_NOT_OWN_NUMBERS_RE = re.compile(_DATE_TIME_EXPONENT, flags=re.IGNORECASE)
_NOT_A_LIST_RE = re.compile(_DATE_TIME_EXPONENT + r"|\([^()]*,[^()]*\)|\[[^\[\]]*,[^\[\]]*\]", flags=re.IGNORECASE)
_MAX_ITEMS = 8
_LOOK_BACK = 200  # characters searched for the item before another (the search is quadratic in them)


def _number_lists(message: str) -> list[list[float]]:
    """The lists of numbers in `message`: runs of numbers joined only by separators."""
    lists: list[list[float]] = []
    run: list[float] = []
    end = -1
    message = _NOT_A_LIST_RE.sub(lambda m: " " * len(m.group()), message)
    for m in _NUMBER_ITEM_RE.finditer(message):
        value = float(m.group(1).replace(",", ""))  # inf for 400 digits: ends the list, and is no item
        if run and (not math.isfinite(value) or not _joined(message, end, m)):
            if len(run) > 1:
                lists.append(run)
            run = []
        if math.isfinite(value):
            run.append(value)
        end = m.end(1)
    if len(run) > 1:
        lists.append(run)
    return lists


def _joined(message: str, end: int, m: re.Match[str]) -> bool:
    """Whether the number `m` continues the list whose last number ends at `end`: only separators between
    them ("5, 10", "5m and 10m"), or the same unit of up to three letters after both ("42.195 km and 21.1 km")."""
    between = message[end : m.start()]
    if _NUMBER_SEP_RE.fullmatch(between):
        return True
    spaced = _SPACED_UNIT_SEP_RE.fullmatch(between)
    if spaced is None or spaced.group(1).lower() in _NOT_UNITS:
        return False
    return re.match(rf"\s{re.escape(spaced.group(1))}\b", message[m.end(1) :], flags=re.IGNORECASE) is not None


def _names(said: str) -> bool:
    """Whether the words of a value, as said, are a name: every one capitalised (or a number), the first a word."""
    words = said.split()
    return said[:1].isupper() and all(w[:1].isupper() or w[:1].isdigit() for w in words)


def _item_pattern(said: str) -> str:
    """What one more item like `said` looks like: a run of capitalised words for a name, else as many words
    (after "a", "an" or "the", which are not part of it)."""
    if _names(said):
        return _CAPITAL_ITEM
    return r"(?:(?:a|an|the)\s+)?" + r"(?!(?:" + _NOT_ITEMS + r")\b)" + r"\s+".join([_WORD] * len(said.split()))


def _word_list(message: str, value: str) -> list[str]:
    """The list `value` is said in, as said (`value` among them), or [] when it is not said in one."""
    value = " ".join(value.split())
    if not value or not re.search(r"\w", value):
        return []
    found = re.search(rf"(?<!\w){re.escape(value)}(?!\w)", message, flags=re.IGNORECASE)
    if found is None:
        return []
    item = _item_pattern(found.group())
    start, pos = found.span()
    quote = message[start - 1 : start] if start > 0 else ""
    if quote in ("'", '"') and message[pos : pos + 1] == quote:  # a quoted value: its list is quoted too
        start, pos = start - 1, pos + 1
        after = re.compile(rf"{_SEP}{quote}({item}){quote}")
        before = re.compile(rf"{quote}({item}){quote}{_SEP}$")
    else:
        after = re.compile(rf"{_SEP}({item})(?!\w)")
        before = re.compile(rf"(?<!\w)({item}){_SEP}$")
    items, joins = [found.group()], []
    acronym = _acronym(found.group())
    while len(items) < _MAX_ITEMS and (m := after.match(message, pos)) and _acronym(m.group(1)) == acronym:
        items.append(m.group(1))
        joins.append(m.group())
        pos = m.end()
    head = message[:start]
    while len(items) < _MAX_ITEMS and (m := before.search(head[-_LOOK_BACK:])) and _acronym(m.group(1)) == acronym:
        items.insert(0, m.group(1))
        joins.append(m.group())
        head = head[: len(head) - len(m.group())]
    # commas alone do not make a list of words ("Chicago, Illinois" is one place), and two words joined by a
    # comma and "and" are two clauses ("is vegan, and takes under 30 minutes"), not a list
    coordinated = any(re.search(r"\b(?:and|or)\b|&", j) for j in joins)
    clauses = len(items) == 2 and "," in joins[0]
    closed = _names(found.group()) or _CLOSED_RE.match(message, pos) is not None
    return [_bare(item) for item in items] if len(items) > 1 and coordinated and closed and not clauses else []


def _acronym(said: str) -> bool:
    """Whether `said` is written in capitals ("NY", "DE"): a list of those holds no name ("Vantor GmbH in DE and
    ..."), nor a list of names one of them."""
    return len(said) > 1 and said.isupper()


def _bare(item: str) -> str:
    return re.sub(r"^(?:a|an|the)\s+", "", item, flags=re.IGNORECASE)


def _is(value: Any, item: Any) -> bool:
    """Whether an argument value is the item: the same number, or the same words whatever their case."""
    if isinstance(item, float):
        number = _as_number(value)
        return number is not None and _close(number, item)
    return isinstance(value, str) and " ".join(value.lower().split()) == item.lower()


def _holds(arguments: dict[str, Any], item: Any) -> bool:
    """Whether any argument value (at any depth) is or contains the item."""

    def holds(value: Any) -> bool:
        if isinstance(item, str) and isinstance(value, str):
            return re.search(rf"(?<!\w){re.escape(item)}(?!\w)", value, flags=re.IGNORECASE) is not None
        return _is(value, item)

    return any(holds(leaf) for leaf in _leaves(arguments))


def _typed(item: Any, schema: dict[str, Any]) -> Any:
    if isinstance(item, float):
        if schema.get("type") == "integer":
            return int(item) if item.is_integer() else None
        if schema.get("type") == "number":
            return int(item) if item.is_integer() else item
        return format_number(item) if schema.get("type") == "string" else None
    return item if schema.get("type") == "string" else None


def _list_for(value: Any, message: str, numbers: list[list[float]]) -> list[Any]:
    if isinstance(value, bool):
        return []
    number = _as_number(value)
    if number is not None:
        return next((list(run) for run in numbers if any(_close(number, n) for n in run)), [])
    return list(_word_list(message, value)) if isinstance(value, str) else []


def one_call_per_said_item(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], message: str
) -> tuple[list[ToolCall], list[str]]:
    """The calls with the copies the latest `message` asks for, and a note for each copy: a call for every other
    item of a said list one of its arguments holds an item of; then, where that leaves one call, a call for each
    further group of said numbers, and for the numbers said after one of its parameters' names (see the
    module's doc)."""
    out, notes = _per_list_item(calls, tools, message)
    if len(out) == 1:
        more, also = _per_number_group(out[0], tools, message)
        out, notes = out + more, notes + also
    return out, notes


def _per_list_item(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], message: str
) -> tuple[list[ToolCall], list[str]]:
    numbers = _number_lists(message)
    out: list[ToolCall] = []
    notes: list[str] = []
    for call, params in _with_parameters(calls, tools):
        out.append(call)
        if params is None:
            continue
        properties = params.get("properties") or {}
        for key, value in call.arguments.items():
            schema = properties.get(key)
            if not isinstance(schema, dict) or schema.get("type") not in ("string", "number", "integer"):
                continue
            items = _list_for(value, message, numbers)
            others = [item for item in items if not _is(value, item)]
            if not others or len(others) == len(items) or any(_holds(call.arguments, item) for item in others):
                continue
            enum = schema.get("enum")
            for item in others:
                typed = _typed(item, schema)
                if typed is None or (enum is not None and typed not in enum):
                    continue
                if any(_holds(c.arguments, item) for c in [*calls, *out]):
                    continue  # a call already has it
                out.append(ToolCall(name=call.name, arguments={**call.arguments, key: typed}))
                notes.append(f"{call.name}: one call per item said: {key}={typed!r} as well")
            break
    return out, notes


@dataclass
class _Said:
    value: float
    start: int
    end: int
    percent: bool  # said with "%": 0.05 in an argument is this 5
    unit: str  # the word right after it ("feet" in "6 feet tall"), "" for none or a word like "and"


def _said_numbers(message: str) -> list[_Said]:
    """The numbers said in `message`, in order, without those inside a date or an exponent."""
    message = _NOT_OWN_NUMBERS_RE.sub(lambda m: " " * len(m.group()), message)
    out = []
    for m in _NUMBER_ITEM_RE.finditer(message):
        value = float(m.group(1).replace(",", ""))
        if math.isfinite(value):
            after = _UNIT_RE.match(message, m.end(1))
            unit = after.group(1).lower() if after else ""
            out.append(_Said(value, m.start(1), m.end(), m.group().endswith("%"), "" if unit in _NOT_UNITS else unit))
    return out


def _fills(number: float, said: _Said) -> bool:
    return _close(number, said.value) or (said.percent and _close(number, said.value / 100))


def _name_words(key: str) -> set[str]:
    """A parameter name's words of three letters or more, each also with a plural "s": `initial_velocity` ->
    {"initial", "initials", "velocity", "velocitys"}; "played" is not `player_count`'s."""
    return {form for w in parameter_words(key) if len(w) >= 3 for form in (w, w + "s")}


def _per_number_group(
    call: ToolCall, tools: Sequence[dict[str, Any]], message: str
) -> tuple[list[ToolCall], list[str]]:
    """Copies of the one call for the said numbers it leaves unused (see the module's doc)."""
    (params,) = [p for _, p in _with_parameters([call], tools)]
    said = _said_numbers(message)
    if params is None or len(said) < 2:
        return [], []
    properties = params.get("properties") or {}
    used: set[int] = set()

    def take(value: Any) -> int | None:
        """The first said number not yet used that `value` is, now used; None when there is none."""
        number = _as_number(value)
        if number is None:
            return None
        index = next((i for i, n in enumerate(said) if i not in used and _fills(number, n)), None)
        if index is not None:
            used.add(index)
        return index

    slots: list[tuple[int, str]] = []  # (index of the said number, parameter) for each number argument
    for key, value in call.arguments.items():
        schema = properties.get(key)
        if not isinstance(schema, dict) or schema.get("type") not in ("number", "integer"):
            continue
        if (index := take(value)) is not None:
            slots.append((index, key))
    for value in _leaves(call.arguments):  # numbers in strings and lists are used too
        take(value)
    unused = [i for i in range(len(said)) if i not in used]
    if not slots or not unused:
        return [], []
    slots.sort()
    keys, k = [key for _, key in slots], len(slots)
    together = [i for i, _ in slots] == list(range(slots[0][0], slots[0][0] + k))  # said one after another
    units = [said[i].unit for i, _ in slots]
    if k > 1 and together and len(unused) % k == 0:
        # each group said like the first: "6 feet and 80 kg, and 5.6 feet and 60 kg", not "5ft 10in"
        groups = [list(zip(keys, unused[g : g + k], strict=True)) for g in range(0, len(unused), k)]
        groups = [group for group in groups if [said[i].unit for _, i in group] == units]
        why = "the next group of numbers said"
    else:
        groups = _named_numbers(message, said, unused, slots)
        why = "said after its name"
    out: list[ToolCall] = []
    notes: list[str] = []
    for group in groups[: _MAX_ITEMS - 1]:
        arguments = dict(call.arguments)
        for key, index in group:
            typed = _typed_said(said[index], call.arguments[key], properties[key])
            if typed is None:
                break
            arguments[key] = typed
        else:
            out.append(ToolCall(name=call.name, arguments=arguments))
            shown = ", ".join(f"{key}={format_number(float(arguments[key]))}" for key, _ in group)
            notes.append(f"{call.name}: one call per group of numbers said: {shown} as well ({why})")
    return out, notes


def _named_numbers(
    message: str, said: list[_Said], unused: list[int], slots: list[tuple[int, str]]
) -> list[list[tuple[str, int]]]:
    """Unused said numbers that come within four words after a word of exactly one number parameter's name (and
    after no other number since), as
    groups for copies: a run of them naming different parameters is one copy ("a present value of $7000 at
    4%" changes two arguments of one call)."""
    names = {key: _name_words(key) for _, key in slots}
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    for index in unused:
        start = said[index].start  # the words since the number before it, at most four
        since = max(start - 60, said[index - 1].end if index else 0)
        before = set(_WORD_RE.findall(message[since:start].lower())[-4:])
        keys = [key for key, words in names.items() if words & before]
        if len(keys) != 1:
            continue
        if any(key == keys[0] for key, _ in current):
            groups.append(current)
            current = []
        current.append((keys[0], index))
    return groups + ([current] if current else [])


def _typed_said(said: _Said, was: Any, schema: dict[str, Any]) -> Any:
    """A said number for a parameter, in the form the call passed its first value: 0.04 for a said "4%" where the
    call passed a said 5% as 0.05."""
    value = said.value
    number = _as_number(was)
    if said.percent and number is not None and abs(number) < 1 and not _close(number, value):
        value /= 100
    return _typed(value, schema)

