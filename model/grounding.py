"""Grounded optional arguments: a value nobody said is not passed to a tool.

Small models fill optional parameters with values invented from the schema (`flights_per_year: 500`,
`league: "NFL"`, `units: "m"`) where the person gave none; the tool then runs with a made-up value instead
of its default. `drop_ungrounded_optional` removes an *optional* argument whose value has nothing in
common with the conversation so far (the people's messages, earlier tool results, the bot's own turns):

    string     kept when one of its words (a run of letters or of digits: "24h" is "24" and "h") appears
               in the conversation; words are compared on their first five characters, so "meters" is
               grounded by "meter", and a shorter word of three letters or more by a said word it starts
               ("inch" by "inches")
    number     kept when the conversation holds the same number, in digits or as a common word ("three",
               "dozen", "half"), or scaled by 100, 1,000 or a million either way (percentages,
               thousands), or by 60 (minutes and hours)
    array      kept when every element is grounded; an object when every value is
    boolean    always kept: "yes" has no spelling to look for

`drop_unsaid_items` trims a list of strings (required or optional) to the items somebody said, when at
least one was said: `plant_types: ["Annual", "Perennial", "Shrub"]` after "a good variety of annual plants"
keeps "Annual". An item repeated more often than the conversation says it is kept once
(`["G", "C", "G", "C", "C"]` for "more G and C" is `["G", "C"]`). A list none of whose items was said is
left to the rules below (an optional one is dropped).

An optional string is also dropped when it only repeats another argument's words, more often than the
conversation says them: `team: "Brady"` beside `player_name: "Tom Brady"`, `make: "acoustic"` beside
`type: "acoustic"` ("an acoustic instrument" names one thing, not two). It is compared with the required
arguments and the optional ones before it, so of two optional copies the first stays.

`percent_as_described` passes a percentage the person said ("5%", "5 percent") in the form its number
parameter asks for: 5 where its name says "percent" or "pct"; otherwise 0.05 where its description says
"as a decimal", "fraction" or "0.05 = 5%", and 5 where it says "percent" or "%". A parameter that says
neither is left to the model.

`said_flags` passes true to a boolean parameter the latest message names, where the model passed false:
`include_owner` after "include the owner's name", `with_verdict` after "the lawsuit with its verdict",
`organic` after "organic bananas". Every word of the parameter's name but a leading verb ("include",
"with", "is", "show", ...) must be said, and none after a negation ("without the verdict", "not organic").

`said_choices` passes the one `enum` value the latest message says where the model wrote one it does not
("freezer", not "fridge"). `said_direction` exchanges a source and target pair (`from_unit`/`to_unit`,
`origin`/`destination`) the model wrote the wrong way round for the message; `said_sides` gives such a pair
that names one unit on both sides the unit the message says for the other ("4200 feet in metres" answered
metre -> m runs foot -> m). `said_whole` passes a path, address, id or name the model cut short as the
whole the message says ("2022/AL2562", "A77312", "Nikola Jokic").

Required arguments are never dropped (the schema wants them whatever they are): `withdraw_unsaid_required`
withdraws a whole call whose required arguments hold a number nobody said, or one said number in more
places than it was said. A value the person did state in another form that none of these rules sees
("a couple" for 2, "noon" for 12:00) is lost to the tool's default: the price of not running tools on
invented values. `EngineConfig.ground_optional_arguments` and `ground_required_arguments` turn them off.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from model.conversation import ToolCall
from model.tools import format_number

_WORD_RE = re.compile(r"[^\W\d_]+|\d+")  # runs of letters, runs of digits: "24h" is "24" and "h"
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:e[-+]?\d+(?!\w))?")
_DIGITS_RE = re.compile(r"\d+")
_PERCENT_RE = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*(?:%|percent\b|per cent\b)")
# what a number parameter's name and description say it takes: a fraction ("as a decimal", "0.05 for 5%")
# or a percentage ("in percent", "rate_pct", "in %"); "decimal places" is about rounding
_WANTS_FRACTION_RE = re.compile(r"decimal(?!\s+places?)|fraction|(?<![\d.])0?\.\d+\s*(?:=|is|for|means)\s*\d+(?:\.\d+)?\s*%"
                                r"|\d\s*%\s*(?:=|is|as|->)\s*0?\.\d")
_WANTS_PERCENT_RE = re.compile(r"percent|pct(?![a-z])|%")
_PREFIX = 5
_SCALES = (1, 100, 1000, 60, 1e6)
NUMBER_WORDS = {w: float(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {
    "thirty": 30.0, "forty": 40.0, "fifty": 50.0, "hundred": 100.0, "thousand": 1000.0, "million": 1e6,
    "dozen": 12.0, "half": 0.5, "quarter": 0.25, "once": 1.0, "twice": 2.0, "single": 1.0, "double": 2.0,
    "triple": 3.0, "first": 1.0, "second": 2.0, "third": 3.0}  # fmt: skip


def _close(value: float, target: float) -> bool:
    return abs(value - target) <= 1e-9 * max(1.0, abs(target))


def _same_number(said: float, value: float) -> bool:
    """Whether `value` is the number `said`, as written or scaled by one of `_SCALES` either way."""
    return any(_close(candidate, value) for s in _SCALES for candidate in (said * s, said / s))


class GroundingContext:
    """The words and numbers of a conversation's text, for testing argument values against."""

    def __init__(self, text: str) -> None:
        lowered = text.lower()
        words = _WORD_RE.findall(lowered)
        self.words = {w[:_PREFIX] for w in words}
        # shorter value words match the start of a said word ("inch" in "inches", "day" in "days")
        self.stems = {w[:k] for w in words for k in range(3, _PREFIX) if len(w) > k}
        # every number said, as often as it was said: in digits or as a common word
        self.mentions = [NUMBER_WORDS[w] for w in words if w in NUMBER_WORDS]
        for m in _NUMBER_RE.finditer(lowered):
            try:
                self.mentions.append(float(m.group().replace(",", "")))
            except ValueError:  # pragma: no cover - the pattern only matches numbers
                continue
        self.numbers = set(self.mentions)
        self.word_counts = collections.Counter(words)
        self.percents = {float(m.group(1)) for m in _PERCENT_RE.finditer(lowered)}

    def has_number(self, value: float) -> bool:
        return any(_same_number(n, value) for n in self.numbers)

    def times_said(self, value: float) -> int:
        """How many of the numbers said are `value` (under the same scales as `has_number`)."""
        return sum(_same_number(n, value) for n in self.mentions)

    def grounds(self, value: Any, letters: bool = True) -> bool:
        """Whether `value` was said. `letters=False` tests only the numbers in it: a number as ever, and a
        string by its runs of digits (a date, a year: one of them said is enough; one without digits
        passes), not its letters: units, time zones and names are often written in a normal form nobody
        says ("degF" for "Fahrenheit", "Asia/Tokyo" for "Japan")."""
        return all(self._grounds_leaf(leaf, letters) for leaf in _leaves(value))

    def _grounds_leaf(self, value: Any, letters: bool) -> bool:
        if isinstance(value, bool) or value is None:
            return True
        if isinstance(value, (int, float)):
            return self.has_number(_float(value))
        if isinstance(value, str):
            if not letters:
                digits = _DIGITS_RE.findall(value)
                return not digits or any(d[:_PREFIX] in self.words for d in digits)
            words = _WORD_RE.findall(value.lower())
            return not words or any(w[:_PREFIX] in self.words or w in self.stems for w in words)
        return True


def _leaves(value: Any) -> Iterator[Any]:
    """The values inside an argument value: the elements of lists and the values of objects, at any depth."""
    if isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _with_parameters(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]]
) -> list[tuple[ToolCall, dict[str, Any] | None]]:
    """Each call with its tool's parameters schema; None for a tool not listed or arguments not an object."""
    schemas = {t.get("name"): t for t in tools}
    return [(call, (schemas[call.name].get("parameters") or {})
             if call.name in schemas and isinstance(call.arguments, dict) else None) for call in calls]


def drop_ungrounded_optional(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], context: GroundingContext
) -> tuple[list[ToolCall], list[str]]:
    """The calls without their ungrounded optional arguments, and a note for each argument dropped.

    A call to a tool that is not listed is left as it is (validation refuses it later, with its reason).
    """
    out: list[ToolCall] = []
    notes: list[str] = []
    for call, params in _with_parameters(calls, tools):
        if params is None:
            out.append(call)
            continue
        required = set(params.get("required") or [])
        properties = params.get("properties") or {}
        kept: dict[str, Any] = {}
        for key, value in call.arguments.items():
            if key in properties and key not in required:
                if not context.grounds(value):
                    notes.append(f"{call.name}: dropped optional argument {key}={value!r}: nobody said it")
                    continue
                before = [k for k in call.arguments if k in required and k != key] + list(kept)
                other = _repeated(value, [(k, call.arguments[k]) for k in before], context)
                if other is not None:
                    notes.append(f"{call.name}: dropped optional argument {key}={value!r}: it repeats {other}")
                    continue
            kept[key] = value
        out.append(call if len(kept) == len(call.arguments) else ToolCall(name=call.name, arguments=kept))
    return out, notes


def drop_unsaid_items(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], context: GroundingContext
) -> tuple[list[ToolCall], list[str]]:
    """The calls with each top-level list of strings trimmed to the items somebody said, each kept as often as
    it was said (see the module's doc), and a note for each list trimmed."""

    def read(key: str, schema: dict[str, Any], value: Any) -> tuple[list[str], str] | None:
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return None
        kept: list[str] = []
        for item in value:
            if not context.grounds(item):
                continue
            words = _WORD_RE.findall(item.lower())
            if item in kept and words and all(context.word_counts[w] <= kept.count(item) for w in set(words)):
                continue  # said fewer times than listed: the model repeated it
            kept.append(item)
        if not kept or kept == value:
            return None
        return kept, "only the items somebody said, as often as they said them"

    return _reread(calls, tools, read)


def _repeated(value: Any, others: Sequence[tuple[str, Any]], context: GroundingContext) -> str | None:
    """The name of the argument among `others` whose string holds every word of the string `value`, where the
    conversation says those words fewer times than the two values use them; None when there is none."""
    if not isinstance(value, str):
        return None
    words = _WORD_RE.findall(value.lower())
    if not words:
        return None
    for key, other in others:
        if not isinstance(other, str):
            continue
        other_words = _WORD_RE.findall(other.lower())
        if set(words) <= set(other_words) and all(
            context.word_counts[w] < words.count(w) + other_words.count(w) for w in set(words)
        ):
            return key
    return None


def _reread(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], read: Callable[[str, dict[str, Any], Any], Any]
) -> tuple[list[ToolCall], list[str]]:
    """The calls with each top-level argument value that `read(key, its schema, value)` rereads replaced, and a
    note for each: `read` returns (new value, why) or None to keep the value. A call to a tool that is not
    listed, or whose arguments are not an object, is left as it is."""
    out: list[ToolCall] = []
    notes: list[str] = []
    for call, params in _with_parameters(calls, tools):
        if params is None:
            out.append(call)
            continue
        properties = params.get("properties") or {}
        arguments = dict(call.arguments)
        for key, value in call.arguments.items():
            schema = properties.get(key)
            reread = read(key, schema, value) if isinstance(schema, dict) else None
            if reread is not None:
                arguments[key], why = reread
                notes.append(f"{call.name}: {key}={_shown(value)} passed as {_shown(arguments[key])}: {why}")
        out.append(call if arguments == call.arguments else ToolCall(name=call.name, arguments=arguments))
    return out, notes


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return format_number(_float(value)) if isinstance(value, (int, float)) else repr(value)


def percent_as_described(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], context: GroundingContext
) -> tuple[list[ToolCall], list[str]]:
    """The calls with each percentage the person said in the form its parameter asks for, and a note for each
    value changed: a number parameter whose name or description asks for a fraction gets 0.05 for a said
    "5%" the model passed as 5, and one that asks for a percentage gets 5 for one passed as 0.05. Only
    top-level number parameters (not integers), and only values that are a said percentage in the other
    form; a description that asks for neither is left to the model (conventions differ: an "interest_rate"
    takes 5 in one API and 0.05 in the next)."""

    def read(key: str, schema: dict[str, Any], value: Any) -> tuple[float, str] | None:
        if schema.get("type") != "number" or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # a number written as a string is left to coercion and validation
        description = str(schema.get("description") or "").lower()
        if _WANTS_PERCENT_RE.search(key.lower()):  # the name decides first: "rate_pct", "tip_percentage"
            fraction = False
        elif _WANTS_FRACTION_RE.search(description):
            fraction = True
        elif _WANTS_PERCENT_RE.search(description):
            fraction = False
        else:
            return None
        number = _float(value)
        for p in context.percents:
            if p != 0 and _close(number, p if fraction else p / 100):
                return (p / 100 if fraction else p), "the percentage said, in the form its description asks for"
        return None

    return _reread(calls, tools, read) if context.percents else (list(calls), [])


_FLAG_VERBS = frozenset("include includes including with is has have show get use want return allow enable should "
                        "do add consider".split())  # fmt: skip
_NEGATIONS = frozenset("no not without exclude excluding except never don't dont skip nor".split())
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def parameter_words(name: str) -> list[str]:
    """The words of a parameter's name, lower-cased: `include_owner` -> ["include", "owner"], `fullName` ->
    ["full", "name"]."""
    return _WORD_RE.findall(_CAMEL_RE.sub("_", name).replace("_", " ").lower())


def _flag_words(name: str) -> list[str]:
    """The words of a boolean parameter's name that say what it turns on: `include_owner` -> ["owner"],
    `fullName` -> ["full", "name"]."""
    words = parameter_words(name)
    while words and words[0] in _FLAG_VERBS:
        words = words[1:]
    return words


def _named_positively(word: str, message: list[str]) -> bool:
    """Whether `word` is said in `message` (its words, in order), matched as grounding matches words, with no
    negation among the three words before it."""
    for i, said in enumerate(message):
        if said[:_PREFIX] == word[:_PREFIX] or (len(word) >= 3 and said.startswith(word)):
            if not _NEGATIONS.intersection(message[max(0, i - 3) : i]):
                return True
    return False


def said_flags(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], message: str
) -> tuple[list[ToolCall], list[str]]:
    """The calls with true for each boolean parameter the latest `message` names where the model passed false,
    and a note for each (see the module's doc). Only top-level booleans, and only false ones: a true the
    person did not name may still be the tool's intent ("details" for "tell me all about it")."""
    said = re.findall(r"[^\W\d_]+(?:'[a-z]+)?|\d+", message.lower())

    def read(key: str, schema: dict[str, Any], value: Any) -> tuple[bool, str] | None:
        if value is not False or schema.get("type") != "boolean":
            return None
        words = _flag_words(key)
        if words and all(_named_positively(w, said) for w in words):
            return True, f"the message asks for {' '.join(words)}"
        return None

    return _reread(calls, tools, read)


def withdraw_unsaid_required(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], context: GroundingContext
) -> tuple[list[ToolCall], list[str]]:
    """The calls whose required arguments hold no number nobody said, and a note for each call withdrawn
    because one does: a call that cannot run without a number nobody gave is a guess (a formula fed with
    numbers the model made up, a date it picked), and the person should be asked instead.

    Numbers are tested as `drop_ungrounded_optional` tests them, and strings by their digits only
    (`GroundingContext.grounds` with `letters=False`). A call is also withdrawn when its required arguments
    use one number in more places than it was said (`_reused_numbers`): the model filled a slot nobody
    gave a value for with a number meant for another. A call to a tool that is not listed is left as it is
    (validation refuses it later, with its reason)."""
    kept: list[ToolCall] = []
    notes: list[str] = []
    for call, params in _with_parameters(calls, tools):
        required = [key for key in (params or {}).get("required") or [] if key in call.arguments]
        unsaid = [key for key in required if not context.grounds(call.arguments[key], letters=False)]
        if unsaid:
            values = ", ".join(f"{key}={call.arguments[key]!r}" for key in unsaid)
            notes.append(f"{call.name}: withdrawn: nobody said its required {values}")
            continue
        reused = _reused_numbers([call.arguments[key] for key in required], context)
        if reused:
            values = ", ".join(f"{format_number(v)} fills {k} required values but was said {n}" for v, k, n in reused)
            notes.append(f"{call.name}: withdrawn: {values}")
            continue
        kept.append(call)
    return kept, notes


def _float(value: int | float) -> float:
    """`value` as a float; an integer too large for one (JSON allows any length) as an infinity, which no said
    number matches."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _as_number(value: Any) -> float | None:
    """A leaf value as a number: a number, or a string that is one whole ("3", "1,500"); the digits inside
    a date or a name are not a number, and booleans are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return _float(value)
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        return float(value.strip().replace(",", ""))
    return None


def _reused_numbers(values: Sequence[Any], context: GroundingContext) -> list[tuple[float, int, int]]:
    """(number, slots it fills, times it was said) for each number the values use more often than it was said.

    A number said once is one value: `price=10, sales_tax=10` after "a 10% sales tax", or a route from
    (5, 6) to (6, 5) after "sides 5 and 6", puts one said number into two slots. A number said twice
    ("from 5 to 5") may fill two."""
    used = collections.Counter(n for leaf in _leaves(list(values)) if (n := _as_number(leaf)) is not None)
    out = []
    for value, slots in used.items():
        if slots > 1 and slots > (said := context.times_said(value)):
            out.append((value, slots, said))
    return out


# which way a pair of string parameters points: the word that names the source and the one that names the target
_SOURCE_WORDS = frozenset("from source src origin base input".split())
_TARGET_WORDS = frozenset("to target dest destination output into".split())
# the words a target is said after ("in km", "to Boston", "into euros", "as hex"); "how many km" is read apart
_TARGET_CUES = frozenset("to into in as".split())
# words that are units to pint but never name a value here ("in" is inch, "a" a year, "at" an atmosphere)
_NOT_NAMES = frozenset("a an at in to as of per is by the and or s h".split())
_CUE_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:/[^\W\d_]+)?")
_DEGREE_RE = re.compile(r"[°º]\s*")
_TEMPERATURE_LETTERS = {"f": "degF", "c": "degC"}  # "350 F", "30 C": farad and coulomb to pint
_TEMPERATURES = frozenset(("degree_Fahrenheit", "degree_Celsius", "kelvin"))


def _direction_pairs(properties: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) pairs among the string parameters: names alike but for one word that names a source and
    one that names a target (`from_unit` and `to_unit`, `base_currency` and `target_currency`, `origin` and
    `destination`); a name that could pair with more than one other is left out."""
    sides: dict[str, dict[tuple[str, ...], list[str]]] = {"source": {}, "target": {}}
    for name, schema in properties.items():
        if not (isinstance(schema, dict) and schema.get("type") == "string"):
            continue
        words = parameter_words(name)
        for i, word in enumerate(words):
            side = "source" if word in _SOURCE_WORDS else "target" if word in _TARGET_WORDS else None
            if side is not None:
                sides[side].setdefault(tuple(words[:i] + words[i + 1 :]), []).append(name)
                break
    return [(sources[0], targets[0]) for rest, sources in sides["source"].items()
            if len(sources) == 1 and len(targets := sides["target"].get(rest, [])) == 1]


def _unit_of(text: str) -> str | None:
    """The unit `text` names to pint ("km" and "kilometres" are kilometer), or None: not a unit."""
    key = text.strip()
    key = _TEMPERATURE_LETTERS.get(key.lower(), key)
    if not key or len(key) > 40 or key.lower() in _NOT_NAMES:
        return None
    return _parsed_unit(key)


@functools.lru_cache(maxsize=4096)
def _parsed_unit(text: str) -> str | None:
    from model.tools import _unit_registry

    for spelling in dict.fromkeys((text, text.lower())):  # "Fahrenheit" is not a unit to pint, "fahrenheit" is
        try:
            return str(_unit_registry().parse_units(_DEGREE_RE.sub("deg", spelling)))
        except Exception:  # pint raises many kinds of error for words that are not units
            continue
    return None


def _names(token: str, value: str) -> bool:
    """Whether the said `token` names the argument `value`: one of its words ("miles" for "mile", "euros" for
    "EUR", "Boston" for "Boston, MA"), the same or either starting with the other where that one has three
    letters or more, or the same unit ("fahrenheit" for "degF", "kg" for "kilogram", "F" after a number for
    "degF")."""
    t = token.lower()
    if t in _NOT_NAMES:
        return False
    for word in _WORD_RE.findall(value.lower()):
        if word == t or (len(word) >= 3 and t.startswith(word)) or (len(t) >= 3 and word.startswith(t)):
            return True
    unit = _unit_of(token)
    return unit is not None and unit == _unit_of(value)


def _cues(message: str, numbers: Sequence[float]) -> tuple[list[str], list[str]]:
    """The words of `message` that say a source (the word after one of the call's `numbers`, "20 celsius"; the
    word after "from") and those that say a target (the word after "to", "into", "in" or "as"; after "how
    many")."""
    tokens = _CUE_TOKEN_RE.findall(_DEGREE_RE.sub("deg", message))
    sources: list[str] = []
    targets: list[str] = []
    for i, token in enumerate(tokens[:-1]):
        following = tokens[i + 1]
        if following[0].isdigit():
            continue
        low = token.lower()
        if token[0].isdigit():
            said = _as_number(token)
            if said is not None and any(_close(said, n) for n in numbers):
                sources.append(following)
        elif low == "from":
            sources.append(following)
        elif low in _TARGET_CUES or (low == "many" and i > 0 and tokens[i - 1].lower() == "how"):
            targets.append(following)
    return sources, targets


def _call_cues(arguments: dict[str, Any], message: str) -> tuple[list[str], list[str]]:
    """`_cues` of `message` for a call with these `arguments`: its numbers are the ones said before a source."""
    numbers = [n for v in arguments.values() if (n := _as_number(v)) is not None and not isinstance(v, str)]
    return _cues(message, numbers)


def said_direction(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], message: str
) -> tuple[list[ToolCall], list[str]]:
    """The calls with each source and target pair the model wrote the wrong way round swapped, as the latest
    `message` says them, and a note for each swap.

    A pair is two string parameters named alike but for a source word and a target word (`_direction_pairs`).
    The message says a source right after the number the call converts ("20 celsius", "350F", "100 miles")
    and after "from"; it says a target after "to", "into", "in" or "as" ("to fahrenheit", "in km") and after
    "how many" ("how many km is 100 miles"). The two values are swapped when a said source names the model's
    target or a said target its source, and nothing the message says agrees with the model's order:
    `convert_units(20, from_unit="degF", to_unit="degC")` after "convert 20 celsius to fahrenheit" becomes
    ("degC", "degF"). Values are only exchanged, never written."""
    out: list[ToolCall] = []
    notes: list[str] = []
    for call, params in _with_parameters(calls, tools):
        pairs = _direction_pairs(params.get("properties") or {}) if params is not None else []
        if not pairs:
            out.append(call)
            continue
        arguments = dict(call.arguments)
        said_sources, said_targets = _call_cues(arguments, message)
        for source, target in pairs:
            a, b = arguments.get(source), arguments.get(target)
            if not (isinstance(a, str) and isinstance(b, str)) or a.strip().lower() == b.strip().lower():
                continue
            backwards = [t for t in said_sources if _names(t, b) and not _names(t, a)] + [
                t for t in said_targets if _names(t, a) and not _names(t, b)]
            forwards = [t for t in said_sources if _names(t, a) and not _names(t, b)] + [
                t for t in said_targets if _names(t, b) and not _names(t, a)]
            if backwards and not forwards:
                arguments[source], arguments[target] = b, a
                notes.append(f"{call.name}: {source}={a!r} and {target}={b!r} swapped: the message says "
                             f"{', '.join(repr(t) for t in backwards)} the other way round")
        out.append(call if arguments == call.arguments else ToolCall(name=call.name, arguments=arguments))
    return out, notes


_LETTERS_RE = re.compile(r"[^\W\d_]+")


def said_choices(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], message: str
) -> tuple[list[ToolCall], list[str]]:
    """The calls with each `enum` value the model wrote that the latest `message` does not say, where it says
    exactly one other value of that enum, passed as that one, and a note for each: `compartment: "fridge"`
    after "set the freezer to -20" is "freezer", `species: "cat"` after "adoptable dogs" is "dog". A value is
    said when a word of the message names it as `said_direction` reads words ("dogs" for "dog", "miles" for
    "mi"). Only top-level strings."""
    words = _LETTERS_RE.findall(message)

    def said(value: str) -> bool:
        return any(_names(word, value) for word in words)

    def read(key: str, schema: dict[str, Any], value: Any) -> tuple[str, str] | None:
        choices = schema.get("enum")
        if not isinstance(choices, list) or not isinstance(value, str) or said(value):
            return None
        named = [c for c in choices if isinstance(c, str) and c != value and said(c)]
        return (named[0], "the one choice the message says") if len(named) == 1 else None

    return _reread(calls, tools, read)


def _unit_form(unit: str, schema: dict[str, Any], documented: Sequence[str], named: bool = True) -> str | None:
    """How to pass `unit` (a pint unit) to a parameter: the enum value that names it (None when its enum has
    none), else the first word of the tool's documentation that names it ("degF" from "e.g. mile, kg, degF"),
    else (`named`) pint's own name ("foot")."""
    if "enum" in schema:
        return next((v for v in schema["enum"] if isinstance(v, str) and _unit_of(v) == unit), None)
    return next((w for w in documented if _unit_of(w) == unit), unit if named else None)


def said_sides(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], message: str
) -> tuple[list[ToolCall], list[str]]:
    """The calls with each source and target pair that names one unit on both sides (a conversion to itself,
    which nobody asks for) given the unit the latest `message` says for the other side, and a note for each.

    `convert_units(4200, from_unit="metre", to_unit="m")` after "how much is 4200 feet in metres" has the
    target right (the message says "metres" after "in") and the source wrong (it says "feet" after 4200): the
    source becomes "foot". "121 C, what's that in F?" answered `("C", "degC")` gets the target "degF"; "2.5
    cups of flour to grams" answered `("cup", "cup")` the target "g" where the tool documents "g". Pairs and
    cues are `said_direction`'s. Only where both values are units to pint, and the message says that unit on
    one side and, on the other, exactly one other unit and never that one. The unit is written as the
    parameter's enum has it, else as the tool's documentation writes it, else by pint's name. A bare "C" or
    "F" in a pair of temperatures is written as the documentation writes that unit (pint reads coulomb and
    farad), where it does."""
    out: list[ToolCall] = []
    notes: list[str] = []
    for call, params in _with_parameters(calls, tools):
        properties = (params.get("properties") or {}) if params is not None else {}
        pairs = _direction_pairs(properties)
        if not pairs:
            out.append(call)
            continue
        arguments = dict(call.arguments)
        said = _call_cues(arguments, message)
        for source, target in pairs:
            a, b = arguments.get(source), arguments.get(target)
            unit = _unit_of(a) if isinstance(a, str) and isinstance(b, str) else None
            if unit is None or _unit_of(b) is None:
                continue
            docs = [_tool_description(tools, call.name)] + [
                str(properties[k].get("description") or "") for k in (source, target)]
            documented = _DOC_WORD_RE.findall(_ABBREVIATION_RE.sub(" ", " ".join(docs)))
            for side in (source, target):  # "C" and "F" are coulomb and farad to a tool that reads units with pint
                value = arguments[side]
                if isinstance(value, str) and value.strip().lower() in _TEMPERATURE_LETTERS and _unit_of(
                        arguments[target if side == source else source]) in _TEMPERATURES:
                    form = _unit_form(_unit_of(value) or "", properties[side], documented, named=False)
                    if form is not None and form != value:
                        notes.append(f"{call.name}: {side}={value!r} is {form!r}, as the tool writes it")
                        arguments[side] = form
            a, b = arguments[source], arguments[target]
            if _unit_of(b) != unit:
                continue
            for side, (here, there) in ((source, said), (target, said[::-1])):
                others = {u for t in here if (u := _unit_of(t)) is not None and u != unit}
                if len(others) != 1 or any(_unit_of(t) == unit for t in here) or not any(_unit_of(t) == unit for t in there):
                    continue
                (other,) = others
                form = _unit_form(other, properties[side], documented)
                if form is not None:
                    notes.append(f"{call.name}: {side}={arguments[side]!r} is {form!r}: the message says it "
                                 f"({other}), and {(a if side == target else b)!r} for the other side")
                    arguments[side] = form
                break
        out.append(call if arguments == call.arguments else ToolCall(name=call.name, arguments=arguments))
    return out, notes


def _tool_description(tools: Sequence[dict[str, Any]], name: str) -> str:
    """The description of the listed tool called `name` ("" when none)."""
    return next((str(t.get("description") or "") for t in tools if t.get("name") == name), "")


_DOC_WORD_RE = re.compile(r"[A-Za-z\u00b0\u00b5_]+")
_ABBREVIATION_RE = re.compile(r"\b(?:e\.g|i\.e|etc|cf)\.", re.IGNORECASE)  # "e.g." holds no "g" (gram)

# what stands around a said token but is not part of it: quotes, brackets, the end of a sentence
_TOKEN_EDGES = "\"'`()[]{}<>\u201c\u201d\u2018\u2019"
_TOKEN_JOINERS = frozenset("/\\@:~#+")  # what joins the parts of a path, an address, an id, "C#", "C++"
_POSSESSIVE_RE = re.compile(r"['\u2019]s$")
_PREFIXED_ID_RE = re.compile(r"([A-Z]{1,3}-?)(\d{3,})")  # an order or booking id: "A77312", "HX-55920"
_JOINER_SPLIT_RE = re.compile("[" + re.escape("".join(sorted(_TOKEN_JOINERS))) + "]")


def _whole_token(value: str, message: str) -> str | None:
    """The one token of `message` (a run without spaces, less quotes, brackets and a sentence's end) that
    `value` is a cut-out part of, where the rest is joined on by a path, address or id separator or is only
    symbols; None when there is none, more than one, or the message also says `value` on its own."""
    v = value.strip().lower()
    tokens = [raw.strip(_TOKEN_EDGES).rstrip(".,;!?").strip(_TOKEN_EDGES) for raw in message.split()]
    if any(t.lower() == v for t in tokens) or any(ch.isspace() for ch in v):
        return None
    if v.isdigit():  # a number is a value of its own ("2022" of "2022/03/11"), but for an id's letters
        ids = {t for t in tokens if (m := _PREFIXED_ID_RE.fullmatch(t)) and m.group(2) == v}
        return ids.pop() if len(ids) == 1 else None
    if not any(ch.isalpha() for ch in v):
        return None
    found: list[str] = []
    for token in tokens:
        low = token.lower()
        i = low.find(v)
        if i < 0 or not _TOKEN_JOINERS.intersection(token):
            continue
        if (i > 0 and low[i - 1].isalnum()) or (i + len(v) < len(low) and low[i + len(v)].isalnum()):
            continue  # part of a longer word: "inch" in "inches" is another word, not a cut
        parts = [p for p in _JOINER_SPLIT_RE.split(token) if p]
        if all(p.isalpha() for p in parts) and not _TOKEN_JOINERS.intersection(token) - {"/", "\\", ":"}:
            continue  # words joined by "/" are a pair or a ratio ("USD/EUR", "km/h"), not one name
        if token not in found:
            found.append(token)
    return found[0] if len(found) == 1 else None


_SENTENCE_END_RE = re.compile(r"[.!?]$")
_RUN_BREAK_RE = re.compile(r"[.,;:!?]$")


def _name_runs(message: str, bot_name: str | None = None) -> list[list[str]]:
    """The runs of capitalised words in `message` ("Dishoom Shoreditch", "Nikola Jokic"): a run ends at
    punctuation, a bracket or quote, or a word in lower case, and leaves out a sentence's first word ("Find
    Tesla's price") and the bot's name."""
    runs: list[list[str]] = []
    run: list[str] = []
    initial = True
    for raw in message.split():
        if raw[:1] in _TOKEN_EDGES and run:  # "Glucose (C6H12O6)": a bracket or quote starts anew
            runs.append(run)
            run = []
        word = raw.strip(_TOKEN_EDGES)
        core = _POSSESSIVE_RE.sub("", word.rstrip(".,;:!?").strip(_TOKEN_EDGES))
        bot = bot_name is not None and core.lower() == bot_name.lower()
        if core[:1].isupper() and not initial and not bot:
            run.append(core)
        elif run:
            runs.append(run)
            run = []
        if run and (_RUN_BREAK_RE.search(word) or raw.rstrip(_TOKEN_EDGES) != raw):
            runs.append(run)
            run = []
        initial = bool(_SENTENCE_END_RE.search(word)) or (bot and initial)
    if run:
        runs.append(run)
    return runs


def _whole_name(value: str, runs: Sequence[Sequence[str]]) -> str | None:
    """The one of the message's `runs` of capitalised words (`_name_runs`) that holds `value`'s capitalised
    words in a row and more: "Nikola Jokic" for "Jokic", "Skillet Cornbread" for "Cornbread"; None when there
    is none, more than one, or the message also says `value` as a run of its own."""
    words = value.lower().split()
    if not words or not all(w[:1].isupper() for w in value.split()):
        return None
    lowered = [[w.lower() for w in run] for run in runs]
    if words in lowered:
        return None
    found = {" ".join(run) for run, low in zip(runs, lowered, strict=True)
             if any(low[i : i + len(words)] == words for i in range(len(low) - len(words) + 1))}
    return found.pop() if len(found) == 1 else None


def said_whole(
    calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], message: str, bot_name: str | None = None
) -> tuple[list[ToolCall], list[str]]:
    """The calls with each string argument the model cut out of a longer token of the latest `message` passed
    whole, and a note for each: `docket: "AL2562"` after "docket numbered 2022/AL2562" is "2022/AL2562",
    `to: "example.com"` after "at john.doe@example.com" is the address, `data_source: "myfMRI.nii"` the path
    "~/data/myfMRI.nii", `key: "C"` after "in C# major" is "C#". Only where the rest of the token is joined on
    by a path, address or id separator (/ \\ @ : ~) or is symbols alone (# +); a word inside a longer word
    ("inch" in "inches", "gas" in "gas-fueled") and words joined by "/" alone ("USD/EUR", "km/h") are left
    alone, as is a value without a letter ("2022" of "2022/03/11" is a year), but for the digits of an id
    whose one to three capital letters the model left off (`order_id: "77312"` after "track order A77312",
    "55920" of "HX-55920"); a value the message also says on its own, or one cut out of two different
    tokens, is left alone too. A name the model cut short is passed whole in the same way: capitalised words
    that are part of one longer run of capitalised words of the message (`_name_runs`: not a sentence's first
    word, not `bot_name`) become the run, `player: "Jokic"` after "Otto Nikola Jokic per-game stats" is
    "Nikola Jokic". Only top-level strings of parameters without an enum."""
    runs = _name_runs(message, bot_name)

    def read(held: set[str], key: str, schema: dict[str, Any], value: Any) -> tuple[str, str] | None:
        """`held`: the words of the call's string arguments."""
        if not isinstance(value, str) or schema.get("type") != "string" or "enum" in schema:
            return None
        whole = _whole_token(value, message)
        if whole is not None:
            return whole, "the whole of what the message says"
        name = _whole_name(value, runs)
        if name is None or (set(name.lower().split()) - set(value.lower().split())) & held:
            return None  # the rest of the name is another argument's ("Fender", "American Professional II")
        return name, "the whole name the message says"

    out: list[ToolCall] = []
    notes: list[str] = []
    for call in calls:
        values = call.arguments.values() if isinstance(call.arguments, dict) else ()
        held = {w for v in values if isinstance(v, str) for w in v.lower().split()}
        read_calls, read_notes = _reread([call], tools, functools.partial(read, held))
        out.extend(read_calls)
        notes.extend(read_notes)
    return out, notes
