"""Fuzzing: hypothesis properties for everything that reads untrusted input.

Human names and messages (the chat-format escaping), model output (the tool-call parsers), tool calls
(validation, the allowlist, execution, budgets), conversation files, transcripts and imported logs. The other
test modules pin examples; these properties must hold for every input, adversarial ones included.

    .venv/bin/python -m pytest tests/test_fuzz.py                          # quick: 200 examples a property
    CHIME_FUZZ_PROFILE=fuzz-slow .venv/bin/python -m pytest tests/test_fuzz.py   # 10,000: `make fuzz`, `make test` (CI)

The profiles are registered in tests/conftest.py. Hypothesis spends about a third of a millisecond on each
example plus a little for every choice it draws, so the strategies here draw few choices: text as whole
strings, meaningful pieces as the characters of a key alphabet, JSON values from one short program string.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import string
import tempfile
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from model.chat_format import MAX_NAME_CHARS, RESPONSE_MARKER, BotTurn, ChatFormat, parse_bot_body
from model.conversation import (
    Conversation,
    Message,
    ToolCall,
    read_conversations,
    read_transcript,
    write_conversations,
)
from model.errors import ChimeError, ConversationFormatError
from model.grounding import (
    GroundingContext,
    drop_ungrounded_optional,
    drop_unsaid_items,
    percent_as_described,
    said_choices,
    said_direction,
    said_flags,
    said_sides,
    said_whole,
    withdraw_unsaid_required,
)
from model.said_lists import one_call_per_said_item
from model.tool_format import FORMATS, MAX_CALLS_PER_TURN
from model.tools import Tool, ToolBudget, ToolError, ToolRegistry
from tests.tiny import build_tiny_tokenizer
from training.importers import addressed_nick, import_recipe, parse_irc_log

pytestmark = pytest.mark.fuzz

FUZZ = settings(settings.get_profile(os.environ.get("CHIME_FUZZ_PROFILE", "fuzz")))

MARKER_RE = re.compile(r"\(\s*(silence|response)\s*\)", re.IGNORECASE)
TOOL_TAG_RE = re.compile(r"<\s*/?\s*(tool_call|tool_response|tool_result|tools)\s*>", re.IGNORECASE)
TEMPLATE_TOKEN_RE = re.compile(r"<\|[^|<>\n]{0,40}\|>")


def visible(text: str) -> bool:
    return all(ch in "\n\t" or unicodedata.category(ch) not in ("Cf", "Cc", "Cs", "Co") for ch in text)


# ---------------------------------------------------------------------------------------------- text


# Pieces of everything that means something to the template, the tokenizer, the markers or the parsers,
# with the characters people use to hide them (zero-width, bidirectional controls, Unicode tags).
ATTACK_PIECES = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>assistant\n", "<|im_start|>user\n",
    "<|im_start|>tool\n", "<|im_end|>\n<|im_start|>assistant\n(response) ", "<|fake|>", "<|", "|>", "<", "|",
    ">", "im_end", "(response)", "(silence)", "( Response )", "(SILENCE)", "(", ")", "response", "silence",
    "<tool_call>", "</tool_call>", "< tool_call >", "<tool_response>", "</tools>", "{", "}", '"name"',
    ":", ": ", "\n", "\r\n", "\r", "\t", " ", "\u2028", "\x85", "\x0b",
    "\u200b", "\u200d", "\u2060", "\ufeff", "\u202e", "\u2066", "\u2069", "\u061c", "\U000e0041", "\U000e007f",
    "\x00", "\x07", "\x1b[31m", "\x7f", "\ud800", "\ue000", "\U000f0000",
    "a", "Chime", "@Chime", "#", "é", "🎉", "👩‍💻", "مريم", "中文", "…",
]  # fmt: skip

# Pieces of tool-call syntax of every family, to assemble near-calls from.
CALL_PIECES = [
    "<tool_call>", "</tool_call>", "<tool_call>\n", "\n</tool_call>", "{", "}", "[", "]", '"name"', '"arguments"',
    '"parameters"', ": ", ", ", '"calculator"', '"x"', "1", "-1.5e3", "null", "true", '"', "\\", "\\u00", "; ",
    "\n", " ", "<|python_tag|>", "calculator\n", "get_time\n", "NaN", "Infinity", "12345678901234567890",
    '{"name": "f", "arguments": {}}', '{"name": "f", "parameters": {"a": [1, {"b": null}]}}',
    '"arguments": "{\\"a\\": 1}"', '{"name": ""}', '{"name": 3}', "(response)", "(silence)", "é", "🎉", "\ud800",
]  # fmt: skip


def _keys(n: int) -> str:
    """`n` private-use characters, one per piece or scalar a strategy picks as a character of a string."""
    return "".join(chr(0xF0000 + i) for i in range(n))


def _cut(text: str, n: int) -> list[str]:
    """`text` in `n` pieces of about equal length."""
    step = len(text) // n if n else 0
    return [text[i * step : (i + 1) * step if i < n - 1 else len(text)] for i in range(n)]


def woven(pieces: list[str], max_pieces: int = 6, max_chars: int = 30) -> st.SearchStrategy[str]:
    """Arbitrary text with meaningful pieces spread through it (adjacent where the text is short)."""
    keys = _keys(len(pieces))
    table = dict(zip(keys, pieces, strict=True))

    def weave(text: str, chosen: str) -> str:
        parts = _cut(text, len(chosen) + 1)
        return "".join(part + table[k] for part, k in zip(parts, chosen, strict=False)) + parts[-1]

    return st.builds(weave, st.text(max_size=max_chars), st.text(keys, max_size=max_pieces))


def untrusted(max_pieces: int = 6, max_chars: int = 30) -> st.SearchStrategy[str]:
    return woven(ATTACK_PIECES, max_pieces, max_chars)


REPEATS = st.sampled_from([1, 1, 1, 1, 1, 1, 20, 100])  # long messages and names: up to a few thousand characters
TEXT = st.builds(str.__mul__, untrusted(), REPEATS)
NAME = st.builds(str.__mul__, untrusted(3, 16), REPEATS)
CALL_TEXT = woven(CALL_PIECES, max_pieces=12, max_chars=20)
_NAME_HEAD, _NAME_TAIL = string.ascii_letters + "_", string.ascii_letters + string.digits + "_.-"
REGISTRY_NAME = st.builds(str.__add__, st.sampled_from(_NAME_HEAD), st.text(_NAME_TAIL, max_size=63))  # what register() takes


# ---------------------------------------------------------------------------------------------- JSON

# Strings that coercion may or may not accept as numbers, booleans or enum values.
NUMERIC_TEXT = [
    "12", " 12 ", "+7", "-0", "3.0", "3.5", ".5", "5.", "1e3", "1e999", "-1E-2", "0x10", "1_000", "١٢", "１２",
    "12abc", "", " ", "true", "False", "TRUE", "yes", "nan", "inf", "m", "km", "3", "None", "1" * 31,
]  # fmt: skip
# Scalars `json.loads` can return, boundary cases first (10**400 is past float's range; "Infinity" parses).
SCALARS: list[Any] = [
    None, True, False, 0, 1, -1, 3, 2**53 + 1, 2**63, 10**400, -(10**400), 0.5, 3.0, -0.0, 1e-300, 1e308,
    math.inf, -math.inf, *NUMERIC_TEXT, *ATTACK_PIECES, *CALL_PIECES,
]  # fmt: skip


def _json_value(program: str, pool: list[Any], text: str, integer: int, real: float) -> Any:
    """The JSON value `program` describes, one character a step: "[" and "{" open a list or an object, ")"
    closes the innermost, "s", "i" and "f" put the free text, integer or float, and a key character puts its
    scalar from `pool`. In an object, steps alternate key (the step's text form) and value."""
    scalars = dict(zip(_keys(len(pool)), pool, strict=True))
    root: list[Any] = []
    stack: list[Any] = [root]
    pending: list[str | None] = [None]  # an object's key waiting for its value
    for step in program:
        if step == ")":
            if len(stack) > 1:
                stack.pop()
                pending.pop()
            continue
        free = {"[": [], "{": {}, "s": text, "i": integer, "f": real}
        value = free[step] if step in free else scalars[step]
        top = stack[-1]
        if isinstance(top, dict) and pending[-1] is None:
            pending[-1] = value if isinstance(value, str) else json.dumps(value)
            continue
        if isinstance(top, dict):
            top[pending[-1]] = value
            pending[-1] = None
        else:
            top.append(value)
        if isinstance(value, (list, dict)):
            stack.append(value)
            pending.append(None)
    return root[0] if root else None


def json_values(pool: list[Any] = SCALARS, steps: int = 10, root: str = "") -> st.SearchStrategy[Any]:
    """JSON values (nested lists and objects of `pool` scalars and free ones) in five draws whatever their size;
    `root` "{" or "[" makes every value an object or a list."""
    return st.builds(
        lambda program, free_text, integer, real: _json_value(root + program, pool, free_text, integer, real),
        st.text("[{)sif" + _keys(len(pool)), max_size=steps),
        st.text(max_size=12),
        st.integers(),
        st.floats(allow_nan=False),
    )


JSON = json_values([*SCALARS, math.nan])
JUNK = json_values([*SCALARS, math.nan], steps=4)  # a wrong value where a file has a field
FINITE_OBJECT = json_values(root="{")  # no NaN: a round trip compares with ==


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChatFormat, ...]:
    """The tiny ChatML tokenizer at the default message limit, and at a short one so truncation is fuzzed too."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("fuzz-tokenizer")
    build_tiny_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    return ChatFormat(tokenizer), ChatFormat(tokenizer, max_message_chars=40)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One directory for the files every example writes (function-scoped tmp_path does not mix with @given), in
    memory where there is /dev/shm: rewriting a file on this disk costs milliseconds, 10,000 times a property."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path_factory.mktemp("fuzz-files")
        return
    path = Path(tempfile.mkdtemp(prefix="chime-fuzz-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@functools.cache
def special_ids(fmt: ChatFormat) -> frozenset[int]:
    tok = fmt.tokenizer
    return frozenset(tok.all_special_ids) | frozenset((getattr(tok, "added_tokens_decoder", None) or {}).keys())


@functools.cache
def special_strings(fmt: ChatFormat) -> tuple[str, ...]:
    return tuple(str(t) for t in fmt.tokenizer.all_special_tokens)


# ---------------------------------------------------------------------------------------------- chat-format escaping


@FUZZ
@given(text=TEXT)
def test_cleaned_text_holds_no_special_tokens_markers_tags_or_invisibles(formats: tuple[ChatFormat, ...], text: str) -> None:
    for fmt in formats:
        cleaned = fmt.clean_text(text)
        assert cleaned and cleaned == cleaned.strip()
        assert not any(s in cleaned for s in special_strings(fmt)), cleaned
        assert not TEMPLATE_TOKEN_RE.search(cleaned) and not MARKER_RE.search(cleaned) and not TOOL_TAG_RE.search(cleaned)
        assert visible(cleaned) and "\r" not in cleaned
        assert not set(fmt.encode(cleaned)) & special_ids(fmt)
        assert len(cleaned) <= 2 * fmt.max_message_chars + 40  # truncated; breaking tokens apart adds little


@FUZZ
@given(name=NAME)
def test_cleaned_names_are_one_short_colon_free_line(formats: tuple[ChatFormat, ...], name: str) -> None:
    fmt = formats[0]
    shown = fmt.clean_name(name)
    assert 0 < len(shown) <= MAX_NAME_CHARS
    assert ":" not in shown and shown.splitlines() == [shown] and "\t" not in shown
    assert shown == shown.strip() and visible(shown)
    assert not any(s in shown for s in special_strings(fmt))
    assert not TEMPLATE_TOKEN_RE.search(shown) and not MARKER_RE.search(shown) and not TOOL_TAG_RE.search(shown)
    # In the rendered turn the first colon is the one after the name, whatever the text holds.
    segment = fmt.human_segment(name, "re: (response) ok")
    assert segment.partition(":")[0] == "<|im_start|>user\n" + shown


_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # never in a model's decoded text (calls escape them when rendered)


def _conversation(roles: str, blob: str, repeat: int, bot_name: str, calls: list[ToolCall]) -> Conversation:
    """Messages for `roles` (u a human, a the bot, t a tool result), names and texts cut from `blob`, the first
    text repeated `repeat` times; every other bot turn carries `calls`. The bot's text may hold template tokens
    too: a model can spell them out of ordinary tokens."""
    fields = _cut(blob, 2 * len(roles))
    messages = []
    for i, role in enumerate(roles):
        name, text = fields[2 * i], fields[2 * i + 1] * (repeat if i == 0 else 1)
        if role == "a":
            messages.append(Message("assistant", _SURROGATE_RE.sub("", text), tool_calls=calls if i % 2 else []))
        else:
            messages.append(Message("user" if role == "u" else "tool", text, name=name))
    return Conversation(messages, bot_name=bot_name)


CONVERSATION = st.builds(
    _conversation,
    st.text("uat", max_size=6),
    untrusted(16, 150),
    REPEATS,
    untrusted(3, 16),
    st.lists(st.builds(ToolCall, REGISTRY_NAME, FINITE_OBJECT), max_size=2),
)


@FUZZ
@given(conv=CONVERSATION, short=st.booleans())
def test_rendered_conversations_hold_only_the_structures_special_tokens(
    formats: tuple[ChatFormat, ...], conv: Conversation, short: bool
) -> None:
    """Whatever humans (or the bot, repeating them) write, the ids have one <|im_start|> ... <|im_end|> per turn
    and one assistant header per bot turn, exactly where the bot turns are; only bot tokens are trained; the ids
    decode to the text."""
    fmt = formats[short]
    rendered = fmt.render_conversation(conv)
    ids = rendered.input_ids
    start, end, specials = fmt.encode("<|im_start|>"), fmt.encode("<|im_end|>"), special_ids(fmt)
    turns = 1 + sum(m.role != "assistant" for m in conv.messages) + len(rendered.turns)
    assert [t for t in ids if t in specials] == (start + end) * turns
    header = fmt.bot_header_ids
    at = [i for i in range(len(ids)) if ids[i : i + len(header)] == header]
    assert at == [t.start - len(header) for t in rendered.turns]
    assert sum(rendered.loss_mask) == sum(t.end - t.start for t in rendered.turns)
    assert fmt.tokenizer.decode(ids, skip_special_tokens=False) == fmt.render_text(conv)


# ---------------------------------------------------------------------------------------------- tool-call parsers


def _same_calls(a: tuple[ToolCall, ...], b: tuple[ToolCall, ...]) -> bool:
    """Equal as JSON (NaN, which a parser may return, is never equal to itself)."""
    return json.dumps([c.to_dict() for c in a]) == json.dumps([c.to_dict() for c in b])


@FUZZ
@given(name=st.sampled_from(sorted(FORMATS)), text=CALL_TEXT)
@example(name="plain", text="<tool_call>" + "[" * 5000 + "</tool_call>")
@example(name="hermes", text='<tool_call>{"name": "f", "arguments": "' + "[" * 5000 + '"}</tool_call>')
@example(name="llama3", text='{"name": "f", "parameters": ' + "[" * 5000)
@example(name="glm4", text="f\n" + '{"a": ' + "[" * 5000)
@example(name="plain", text='<tool_call>{"name": "f", "arguments": {"n": ' + "9" * 5000 + "}}</tool_call>")
@example(name="llama3", text='{"name": "f", "parameters": {"n": ' + "9" * 5000 + "}}")
@example(name="glm4", text="f\n{" + '"n": ' + "9" * 5000 + "}")
def test_parsers_never_raise_and_return_well_formed_calls(name: str, text: str) -> None:
    fmt = FORMATS[name]()
    parsed = fmt.parse(text)
    assert parsed.text == parsed.text.strip()
    assert len(parsed.tool_calls) <= MAX_CALLS_PER_TURN
    assert all(isinstance(c.name, str) and c.name and isinstance(c.arguments, dict) for c in parsed.tool_calls)
    assert all(isinstance(e, str) and e for e in parsed.errors)
    # What was parsed renders and parses back to the same calls, and a bot turn parses the same way.
    assert _same_calls(fmt.parse(fmt.render_calls(parsed.tool_calls)).tool_calls, parsed.tool_calls)
    turn = parse_bot_body(f"{RESPONSE_MARKER} {text}", fmt)
    assert turn.kind == "response" and _same_calls(turn.tool_calls, parsed.tool_calls)


# Reply text around calls: no call syntax of any family ("<", braces) and no ";" (Llama 3's separator).
REPLY_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="<>{};"), max_size=30).map(str.strip)


@FUZZ
@given(
    name=st.sampled_from(sorted(FORMATS)),
    text=REPLY_TEXT,
    calls=st.lists(st.builds(ToolCall, REGISTRY_NAME, FINITE_OBJECT), max_size=2),
)
@example(name="plain", text="", calls=[ToolCall("f", {"a": "</tool_call>", "b": "\ud83d"})])
def test_rendered_calls_round_trip_whatever_their_arguments_hold(name: str, text: str, calls: list[ToolCall]) -> None:
    """Any registrable tool name with any JSON arguments (call tags, template tokens, quotes, newlines, lone
    surrogates in strings)."""
    fmt = FORMATS[name]()
    assume(name != "llama3" or "<|python_tag|>" not in json.dumps([c.arguments for c in calls]))  # dropped anywhere
    assert fmt.parse(fmt.render_calls(calls)).tool_calls == tuple(calls)
    turn = BotTurn(kind="response", text=text, tool_calls=tuple(calls))
    assert parse_bot_body(turn.body(fmt), fmt) == turn


# ---------------------------------------------------------------------------------------------- validation and execution


class Spy:
    """A tool function that records every call that reaches it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        return "ok"


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "n": {"type": "integer"},
        "x": {"type": "number"},
        "label": {"type": "string"},
        "flag": {"type": "boolean"},
        "unit": {"enum": ["m", "km", 3, None]},
        "ids": {"type": "array", "items": {"type": "integer"}},
        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "options": {"type": "object"},
        "anything": {},
    },
    "required": ["n", "label"],
    "additionalProperties": False,
}
PARAMS = sorted(SCHEMA["properties"])
SPY = Spy()
UNLISTED = Spy()  # a function that exists but was never registered
REGISTRY = ToolRegistry([Tool("measure", "every parameter type", SCHEMA, SPY)])
CALL_NAMES = st.sampled_from(
    ["measure", "measure", "Measure", "measure ", " measure", "measure\x00", "measure\u200b", "mеasure", "measure.",
     "unlisted", "calculator", "", "__import__", "os.system"]
) | st.text(max_size=12)  # fmt: skip


def _arguments(keys: str, values: list[Any], other: str) -> dict[str, Any]:
    """Parameter names (one key character each; "?" the free name) zipped with values."""
    names = [PARAMS[ord(k) - 0xF0000] if k != "?" else other for k in keys]
    return dict(zip(names, values, strict=False))


ARGUMENTS = st.builds(
    _arguments,
    st.text(_keys(len(PARAMS)) + "?", max_size=6),
    json_values([*SCALARS, math.nan], steps=14, root="["),
    st.text(max_size=6),
)


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Whether `value` has exactly the schema's type (what validation promises to hand a tool)."""
    if "enum" in schema:
        return any(type(value) is type(c) and value == c for c in schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return type(value) is int
    if kind == "number":
        return type(value) is int or (type(value) is float and math.isfinite(value))
    if kind == "string":
        return type(value) is str
    if kind == "boolean":
        return type(value) is bool
    if kind == "array":
        return type(value) is list and all(conforms(v, schema.get("items", {})) for v in value)
    if kind == "object":
        return type(value) is dict
    return True


def fits(arguments: Any) -> bool:
    props = SCHEMA["properties"]
    return (
        isinstance(arguments, dict)
        and set(arguments) <= set(props)
        and set(SCHEMA["required"]) <= set(arguments)
        and all(conforms(v, props[k]) for k, v in arguments.items())
    )


@FUZZ
@given(name=CALL_NAMES, arguments=ARGUMENTS | JSON)
@example(name="measure", arguments={"n": 1, "label": "x", "x": 10**400})
def test_validation_hands_over_schema_conforming_arguments_or_rejects_with_a_tool_error(name: str, arguments: Any) -> None:
    try:
        tool, args = REGISTRY.validate(ToolCall(name, arguments))
    except ToolError as e:
        assert str(e)
        assert not (name == "measure" and fits(arguments)), f"valid arguments rejected: {e}"
        return
    assert tool.name == name == "measure"
    props = SCHEMA["properties"]
    assert set(args) == set(arguments) and set(SCHEMA["required"]) <= set(args)
    assert all(conforms(v, props[k]) for k, v in args.items()), args
    # Coercion is lossless: values that already fit pass unchanged.
    assert all(args[k] is v or args[k] == v for k, v in arguments.items() if conforms(v, props[k]))


@FUZZ
@given(name=CALL_NAMES, arguments=ARGUMENTS)
def test_only_registered_tools_ever_run(name: str, arguments: dict[str, Any]) -> None:
    before = len(SPY.calls)
    result = REGISTRY.execute(ToolCall(name, arguments))
    ran = len(SPY.calls) - before
    assert not UNLISTED.calls
    assert ran == (1 if result.ok else 0)
    if name != "measure":
        assert not result.ok and result.content.startswith("error: unknown tool")
    elif ran:
        assert SPY.calls[-1] == result.arguments and result.content == "ok"
    else:
        assert result.content.startswith("error: ")


GROUNDED = {"name": "measure", "parameters": {**SCHEMA, "properties": {
    **SCHEMA["properties"], "x": {"type": "number", "description": "a rate as a decimal (0.05 = 5%)"},
    "with_flag": {"type": "boolean"}, "rate_pct": {"type": "number"}}}}  # fmt: skip
SAID = st.text(string.ascii_letters + string.digits + " %.,'-", max_size=40) | st.text(max_size=40)


@FUZZ
@given(name=CALL_NAMES, arguments=ARGUMENTS, said=SAID)
@example(name="measure", arguments={"n": 5, "label": "flag", "x": 5, "flag": False, "unit": "flag"}, said="5% flag")
@example(name="measure", arguments={"n": 1, "label": "a", "anything": ["a", "b", "a"], "options": ["b"]}, said="a")
@example(name="measure", arguments={"n": 10**400, "label": "a", "x": -(10**400), "ids": [10**400]}, said="5% 1e400")
def test_argument_grounding_never_raises_and_only_drops_or_rereads_values(name: str, arguments: dict[str, Any],
                                                                          said: str) -> None:  # fmt: skip
    """The grounding rules take any call: they keep its name, add no argument, drop only optional ones, and
    change a value only from a number to the said percentage's other form, from false to true, or from a
    list of strings to some of its items."""
    context = GroundingContext(said)
    calls = [ToolCall(name, arguments)]
    calls, _ = percent_as_described(calls, [GROUNDED], context)
    calls, _ = said_flags(calls, [GROUNDED], said)
    calls, _ = drop_unsaid_items(calls, [GROUNDED], context)
    calls, _ = drop_ungrounded_optional(calls, [GROUNDED], context)
    calls, _ = withdraw_unsaid_required(calls, [GROUNDED], context)
    assert len(calls) <= 1
    for call in calls:
        assert call.name == name and set(call.arguments) <= set(arguments)
        assert set(GROUNDED["parameters"]["required"]) & set(arguments) <= set(call.arguments)
        for key, value in call.arguments.items():
            before = arguments[key]
            if value is before or value == before and type(value) is type(before):
                continue
            if before is False:
                assert value is True
            elif isinstance(before, list):  # a list of strings trimmed to some of its items, in order
                assert value and all(isinstance(v, str) for v in before) and len(value) < len(before)
                rest = iter(before)
                assert all(any(v == b for b in rest) for v in value)
            else:
                assert isinstance(before, (int, float)) and isinstance(value, float)
                assert math.isclose(value, before / 100) or math.isclose(value, before * 100)


DIRECTED = {"name": "measure", "parameters": {**SCHEMA, "properties": {
    **SCHEMA["properties"], "from_unit": {"type": "string"}, "to_unit": {"type": "string"},
    "origin": {"type": "string"}, "destination": {"type": "string"}}}}  # fmt: skip
DIRECTIONS = st.text(string.ascii_letters + string.digits + " °/.,-@~#+:'", max_size=40) | st.sampled_from(
    ["convert 20 celsius to fahrenheit", "how many km is 100 miles", "102.4 F in C", "from Oslo to Rome",
     "5 in in cm", "1 a to at", "docket 2022/AL25 to a@b.c in C# from ~/x/Oslo",
     "ok, fly from New  York City to Rome's Old Town? track A77312", "4200 feet in metres, 121 C in F"])  # fmt: skip
UNITS = st.sampled_from(["degF", "degC", "km", "mile", "F", "in", "Oslo", "Rome", "", "°", "a", "York", "New York",
                         "77312", "metre", "C"]) | st.text(max_size=8)  # fmt: skip


@FUZZ
@given(arguments=ARGUMENTS, ends=st.lists(UNITS, min_size=4, max_size=4) | st.lists(st.sampled_from(SCALARS), max_size=4),
       said=DIRECTIONS)  # fmt: skip
@example(arguments={"n": 20}, ends=["degF", "degC", "Rome", "Oslo"], said="20 celsius to fahrenheit from Oslo to Rome")
@example(arguments={"x": 1e400}, ends=["°", "in", "a", "a"], said="1e400 ° in °")
@example(arguments={"label": "AL25"}, ends=["C", "a", "b.c", "Oslo"], said="docket 2022/AL25 to a@b.c in C# from ~/x/Oslo")
def test_said_direction_and_whole_never_raise_and_only_exchange_a_pair_or_pass_a_said_token(
    arguments: dict[str, Any], ends: list[Any], said: str
) -> None:
    """The direction and whole-token reads take any call: they keep the name and every argument, and change
    values only by exchanging the two of a source and target pair, or by passing a string whole as a token
    or a run of words of the message that holds it."""
    arguments = {**arguments, **dict(zip(["from_unit", "to_unit", "origin", "destination"], ends, strict=False))}
    calls, notes = said_whole([ToolCall("measure", arguments)], [DIRECTED], said)
    (whole,) = calls
    for key, value in whole.arguments.items():
        if value is not arguments[key]:  # a token of the message, or a run of its words
            assert isinstance(value, str) and arguments[key].lower() in value.lower()
            assert value in said or all(word in said for word in value.split())
    assert len(notes) == sum(value is not arguments[key] for key, value in whole.arguments.items())
    arguments = whole.arguments
    calls, notes = said_direction([ToolCall("measure", arguments)], [DIRECTED], said)
    (call,) = calls
    assert call.name == "measure" and list(call.arguments) == list(arguments)
    changed = {k for k in arguments if call.arguments[k] is not arguments[k]}
    assert len(notes) == len(changed) // 2
    for source, target in (("from_unit", "to_unit"), ("origin", "destination")):
        if source in changed:
            assert call.arguments[source] is arguments[target] and call.arguments[target] is arguments[source]
            changed -= {source, target}
    assert not changed


@FUZZ
@given(arguments=ARGUMENTS, ends=st.lists(UNITS, min_size=4, max_size=4) | st.lists(st.sampled_from(SCALARS), max_size=4),
       said=DIRECTIONS)  # fmt: skip
@example(arguments={"n": 4200}, ends=["metre", "m", "Oslo", "Oslo"], said="4200 feet in metres")
@example(arguments={"n": 121}, ends=["C", "degC", "a", "a"], said="121 C, what's that in F?")
def test_said_sides_never_raises_and_only_writes_units_into_a_unit_pair(
    arguments: dict[str, Any], ends: list[Any], said: str
) -> None:
    """The sides read takes any call: it keeps the name and every argument, and changes only a source or
    target that was a unit to pint, to a spelling of a unit, with a note for each."""
    from model.grounding import _unit_of

    arguments = {**arguments, **dict(zip(["from_unit", "to_unit", "origin", "destination"], ends, strict=False))}
    calls, notes = said_sides([ToolCall("measure", arguments)], [DIRECTED], said)
    (call,) = calls
    assert call.name == "measure" and list(call.arguments) == list(arguments)
    changed = [k for k in arguments if call.arguments[k] is not arguments[k]]
    assert len(notes) >= len(changed) and set(changed) <= {"from_unit", "to_unit", "origin", "destination"}
    for key in changed:
        assert _unit_of(arguments[key]) is not None and _unit_of(call.arguments[key]) is not None


CHOOSING = {"name": "measure", "parameters": {"type": "object", "properties": {
    "mode": {"type": "string", "enum": ["eco", "fast", "mi", "km", "a", ""]}, "kind": {"type": "string", "enum": [1, None, "x"]},
    "free": {"type": "string"}}}}  # fmt: skip


@FUZZ
@given(arguments=st.dictionaries(st.sampled_from(["mode", "kind", "free", "other"]), UNITS | st.sampled_from(SCALARS)),
       said=DIRECTIONS | st.sampled_from(["eco please", "5 miles, fast", "a fast eco"]))  # fmt: skip
@example(arguments={"mode": "fast"}, said="eco please")
def test_said_choices_never_raises_and_only_picks_another_value_of_the_enum(arguments: dict[str, Any], said: str) -> None:
    """The choice read takes any call: it keeps every argument, and changes only a value of an enum to another
    value of that enum, with a note for each."""
    calls, notes = said_choices([ToolCall("measure", arguments)], [CHOOSING], said)
    (call,) = calls
    changed = [k for k in arguments if call.arguments[k] is not arguments[k]]
    assert list(call.arguments) == list(arguments) and len(notes) == len(changed)
    for key in changed:  # "free" has no enum and "other" no schema: never changed
        assert key in ("mode", "kind") and isinstance(call.arguments[key], str)
        assert call.arguments[key] in CHOOSING["parameters"]["properties"][key]["enum"]


LISTED = st.text(string.ascii_letters + string.digits + " ,&'$%.-()", max_size=60) | st.sampled_from(
    ["5, 10 and 15", "Oslo, Bergen and Tromsø", "3 and 4, 5 and 12", "flag and label or x", "1,000 or 2,000m",
     "n 5 x 2.5, n 6 x 3.5", "label a and label b, x of 5% or x of 7%"])  # fmt: skip


@FUZZ
@given(name=CALL_NAMES, arguments=ARGUMENTS, said=LISTED)
@example(name="measure", arguments={"n": 5, "label": "Oslo"}, said="5, 10 and 15 in Oslo or Bergen")
@example(name="measure", arguments={"n": 5, "x": 1.5}, said="5 and " + "9" * 400 + " and 1.5 or 2")
@example(name="measure", arguments={"n": 5, "x": 0.05}, said="n 5 x 5%, then n 6 x 7%")
def test_one_call_per_said_item_never_raises_and_only_copies_a_call_with_said_values(
    name: str, arguments: dict[str, Any], said: str
) -> None:
    """Any call and any message: the call the model wrote comes first, unchanged, and each call added is a new
    copy of it with string or number arguments changed to values the message says (a said percentage may be
    passed as its fraction)."""
    calls, notes = one_call_per_said_item([ToolCall(name, arguments)], [GROUNDED], said)
    assert calls[0] == ToolCall(name, arguments) and len(notes) == len(calls) - 1 <= 7
    numbers = [float(n.replace(",", "")) for n in re.findall(r"\d+(?:,\d{3})*(?:\.\d+)?", said)]
    for i, call in enumerate(calls[1:], 1):
        assert call.name == name == "measure" and set(call.arguments) == set(arguments)
        assert call not in calls[:i]
        changed = [k for k, v in arguments.items() if call.arguments[k] != v or type(call.arguments[k]) is not type(v)]
        assert changed
        for key in changed:
            value = call.arguments[key]
            assert isinstance(value, (str, int, float)) and not isinstance(value, bool)
            if isinstance(value, str) and not re.fullmatch(r"-?[\d.]+", value):
                assert value.lower() in said.lower()
            else:
                assert any(math.isclose(float(value), n) or math.isclose(float(value) * 100, n) for n in numbers)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for this value")


RELEASE = threading.Event()  # never set: a hanging tool waits until it has timed out
EXCEPTIONS = [ValueError, KeyError, TypeError, RuntimeError, ZeroDivisionError, OverflowError, RecursionError,
              OSError, AssertionError, UnicodeError, NotImplementedError, ToolError]  # fmt: skip
ODD_RESULTS = [10**5000, Unprintable()]  # results with no text: past str's digit limit, a broken __str__
# What a deployer's tool may do: raise, return JSON or something odd, or hang (one time in twenty).
BEHAVIOURS = [*(("raise", e) for e in EXCEPTIONS), *(("odd", r) for r in ODD_RESULTS), *[("return", None)] * 3, ("hang", None)]


def _misbehaving(kind: str, payload: Any, message: str, value: Any) -> Any:
    def func(**_: Any) -> Any:
        if kind == "raise":
            raise payload(message)
        if kind == "hang":
            RELEASE.wait(0.02)
        return payload if kind == "odd" else value

    return func


# Arguments that validate (exactly, or by lossless coercion) and ones that do not.
CALL_ARGUMENTS = [({"n": 1, "label": "x"}, True), ({"n": "1", "label": 2}, True), ({"n": 1}, False),
                  ({"n": 1, "label": "x", "z": 0}, False)]  # fmt: skip


@FUZZ
@given(behaviour=st.sampled_from(BEHAVIOURS), message=st.text(max_size=20), value=JSON,
       arguments=st.sampled_from(CALL_ARGUMENTS))  # fmt: skip
@example(behaviour=("odd", 10**5000), message="", value=None, arguments=CALL_ARGUMENTS[0])
def test_failing_tools_become_error_results_never_exceptions(
    behaviour: tuple[str, Any], message: str, value: Any, arguments: tuple[dict[str, Any], bool]
) -> None:
    """The engine's tool loop relies on this: whatever a deployer's tool does, execution returns a result."""
    kind, payload = behaviour
    tool = Tool("measure", "misbehaves", SCHEMA, _misbehaving(kind, payload, message, value), timeout_s=0.002)
    result = ToolRegistry([tool]).execute(ToolCall("measure", arguments[0]))
    assert isinstance(result.content, str)
    assert result.ok or result.content.startswith("error: ")
    if kind != "return" or not arguments[1]:
        assert not result.ok


USERS, CHANNELS = ["alice", "bob", "Alice", ""], ["general", "random"]
GAPS = [0.0, 0.001, 0.5, 1.0, 59.999, 60.0, 3599.0, 3600.0, None]  # None: the free gap
STEPS = [(u, c, g) for u in USERS for c in CHANNELS for g in GAPS]


@FUZZ
@given(
    per_user=st.none() | st.integers(0, 3),
    per_channel=st.none() | st.integers(0, 5),
    window=st.sampled_from([1.0, 60.0, 3600.0]),
    steps=st.text(_keys(len(STEPS)), max_size=30),
    free_gap=st.floats(0, 5000),
)
def test_tool_budget_is_a_sliding_window_per_person_and_per_channel(
    per_user: int | None, per_channel: int | None, window: float, steps: str, free_gap: float
) -> None:
    """A call is granted exactly when fewer than each limit were granted in the last `window` seconds (a person's
    budget spans channels); refusals count against nothing."""
    now = 0.0
    budget = ToolBudget(per_user, per_channel, window_s=window, clock=lambda: now)
    granted: list[tuple[float, str, str]] = []
    for key in steps:
        user, channel, gap = STEPS[ord(key) - 0xF0000]
        now += free_gap if gap is None else gap
        recent = [(u, c) for t, u, c in granted if t > now - window]
        mine = sum(1 for u, _ in recent if u == user)
        here = sum(1 for _, c in recent if c == channel)
        allowed = (per_user is None or mine < per_user) and (per_channel is None or here < per_channel)
        refused = budget.take(user, channel)
        assert (refused is None) == allowed, (refused, mine, here)
        if refused is None:
            granted.append((now, user, channel))
        else:
            assert refused.startswith("tool-call budget used up")


# ---------------------------------------------------------------------------------------------- conversation files

# Tool calls as files hold them: plain, OpenAI-style (wrapped, arguments as a JSON string), and broken ones.
CALL_SHAPES: list[Any] = [
    [], [], [{"name": "calculator", "arguments": {"expression": "84*0.15"}}],
    [{"name": "f", "arguments": '{"a": [1, null]}'}, {"name": "g"}],
    [{"type": "function", "function": {"name": "f", "arguments": "{}"}}], [{"name": "f", "arguments": "  "}],
    [{"name": "f", "arguments": "{bad"}], [{"name": "f", "arguments": "[1]"}], [{"name": ""}], [{"arguments": {}}],
    ["calculator"], [{"type": "function", "function": "f"}], {"name": "f"}, "[]",
]  # fmt: skip
TOOL_SHAPES: list[Any] = [
    [], [{"name": "calculator", "parameters": {"type": "object", "properties": {}}}],
    [{"type": "function", "function": {"name": "clock"}}], [{"type": "function", "function": {"name": 3}}],
    [{"description": "no name"}], ["calculator"], {"name": "f"},
]  # fmt: skip
# An edit sets a field to the junk value (lower case) or removes it (upper case): a message's role, name,
# content, tool_calls, expect; the conversation's messages, id, bot_name, tools.
MESSAGE_FIELDS = {"r": "role", "n": "name", "c": "content", "t": "tool_calls", "e": "expect"}
TOP_FIELDS = {"m": "messages", "i": "id", "b": "bot_name", "o": "tools"}
_FIELDS = {**MESSAGE_FIELDS, **TOP_FIELDS}
EDITS = "".join(_FIELDS) + "".join(_FIELDS).upper()


def _conversation_json(
    bare: bool, roles: str, blob: str, calls: Any, tools: Any, expect: str, edits: str, junk: Any
) -> Any:
    """A conversation as a file line holds it (object or bare shape), near-valid: `roles` (u a human, a the bot,
    t a tool result, x not even an object) with names and texts cut from `blob`, then `edits` applied."""
    fields = _cut(blob, 2 * len(roles))
    messages: list[Any] = []
    for i, role in enumerate(roles):
        name, text = fields[2 * i], fields[2 * i + 1]
        if role == "u":
            messages.append({"role": "user", "name": name, "content": text, **({"expect": expect} if expect else {})})
        elif role == "a":
            messages.append({"role": "assistant", "content": text or None, "tool_calls": calls})
        elif role == "t":
            messages.append({"role": "tool", "name": name, "content": text})
        else:
            messages.append(junk)
    conv: dict[str, Any] = {"id": fields[0] if fields else "c1", "bot_name": "Chime", "tools": tools, "messages": messages}
    for i, edit in enumerate(edits):
        field = _FIELDS[edit.lower()]
        if edit.lower() in TOP_FIELDS:
            target = conv
        elif messages and isinstance(messages[i % len(messages)], dict) and messages[i % len(messages)] is not junk:
            target = messages[i % len(messages)]
        else:
            continue
        if edit.islower():
            target[field] = junk
        else:
            target.pop(field, None)
    return conv.get("messages") if bare else conv


CONVERSATION_JSON = st.builds(
    _conversation_json,
    st.booleans(),
    st.text("uuatx", max_size=4),
    untrusted(6, 40),
    st.sampled_from(CALL_SHAPES),
    st.sampled_from(TOOL_SHAPES),
    st.sampled_from(["", "", "silence", "respond", "maybe"]),
    st.text(EDITS, max_size=2),
    JUNK,
)


def _damaged(line: bytes, cut: int, junk: bytes) -> bytes:
    cut %= len(line) + 1
    return line[:cut] + junk + line[cut:]


CONVERSATION_LINE = st.one_of(
    # ensure_ascii=False: a lone surrogate becomes bytes that are not UTF-8; ensure_ascii=True: a "\ud800" escape
    CONVERSATION_JSON.map(lambda c: json.dumps(c, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    CONVERSATION_JSON.map(lambda c: json.dumps(c).encode()),
    st.builds(_damaged, CONVERSATION_JSON.map(lambda c: json.dumps(c).encode()), st.integers(0, 400), st.binary(max_size=4)),
    st.binary(max_size=40),
)
DEEP = b"[" * 5000 + b"]" * 5000


def assert_valid(conv: Conversation) -> None:
    """What every reader of a Conversation may rely on."""
    assert conv.id is None or isinstance(conv.id, str)
    assert conv.bot_name is None or (isinstance(conv.bot_name, str) and conv.bot_name.strip())
    assert all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in conv.tools)
    for m in conv.messages:
        assert m.role in ("user", "assistant", "tool") and isinstance(m.content, str)
        assert m.name is None or isinstance(m.name, str)
        assert m.role != "user" or m.name is not None
        assert m.expect is None or (m.role == "user" and m.expect in ("silence", "respond"))
        assert not m.tool_calls or m.role == "assistant"
        assert all(isinstance(c.name, str) and c.name and isinstance(c.arguments, dict) for c in m.tool_calls)


@FUZZ
@given(lines=st.lists(CONVERSATION_LINE, max_size=2), default_bot_name=st.none() | st.just("Chime"))
@example(lines=[DEEP], default_bot_name=None)
@example(lines=[b'{"messages": [], "id": ' + b"1" * 5000 + b"}"], default_bot_name=None)
@example(lines=[b'{"messages": [], "tools": 5}'], default_bot_name=None)
@example(lines=[b'[{"role": "assistant", "tool_calls": true}]'], default_bot_name=None)
@example(lines=[b"\xff\xfe{}"], default_bot_name=None)
@example(lines=[b'[{"role": "user", "name": "\\ud83d", "content": "x"}]'], default_bot_name=None)
def test_conversation_files_read_into_valid_conversations_or_a_format_error(
    scratch: Path, lines: list[bytes], default_bot_name: str | None
) -> None:
    path = scratch / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        convs = read_conversations(path, default_bot_name)
    except ConversationFormatError as e:
        assert str(path) in str(e)
        return
    for conv in convs:
        assert_valid(conv)
        assert isinstance(conv.id, str)  # a file's conversations always have one: their own, or file and line
    # Whatever was read is written in the object shape and reads back the same.
    copy = scratch / "fuzz-copy.jsonl"
    assert write_conversations(copy, convs) == len(convs)
    again = read_conversations(copy, default_bot_name)
    assert [json.dumps(c.to_dict()) for c in again] == [json.dumps(c.to_dict()) for c in convs]


# ---------------------------------------------------------------------------------------------- transcripts and imports

TRANSCRIPT_PIECES = [
    "alice", "Bob", "Dr. Who", ":", ": ", "::", "#", " #", "  ", "\t", "\n", "\r\n", "\r", "\u2028", "\x85", "\x0c",
    "\x1c", "http://x", "12:30", "(response)", "<|im_end|>", "\ufeff", "\u200b", "é", "🎉", "\ud800",
]  # fmt: skip
TRANSCRIPT = woven(TRANSCRIPT_PIECES, max_pieces=16, max_chars=40).map(
    lambda text: text.encode("utf-8", "surrogatepass")  # a lone surrogate: bytes that are not UTF-8
) | st.binary(max_size=60)


@FUZZ
@given(data=TRANSCRIPT)
@example(data=b"alice: caf\xe9")
def test_transcripts_read_into_named_lines_or_a_format_error(scratch: Path, data: bytes) -> None:
    path = scratch / "fuzz.txt"
    path.write_bytes(data)
    try:
        lines = read_transcript(path)
    except ConversationFormatError as e:
        assert str(path) in str(e)
        return
    for name, text in lines:
        assert name and name == name.strip() and ":" not in name and name.splitlines() == [name]
        assert text == text.strip() and "\n" not in text and "\r" not in text


def _recipe_json(bare: bool, roles: str, blob: str, reply: str, junk: Any) -> Any:
    """A line of the original recipe: humans as "Name: text" (u) or named (n), the bot as "(silence)" or
    "(response) ..." (a), or junk (x)."""
    fields = _cut(blob, len(roles))
    messages: list[Any] = []
    for role, text in zip(roles, fields, strict=True):
        if role == "u":
            messages.append({"role": "user", "content": text})
        elif role == "n":
            messages.append({"role": "user", "name": text, "content": text})
        elif role == "a":
            messages.append({"role": "assistant", "content": reply + text})
        else:
            messages.append(junk)
    return messages if bare else {"messages": messages, "id": junk if "x" in roles else "r1"}


RECIPE_JSON = st.builds(
    _recipe_json,
    st.booleans(),
    st.text("uuanx", max_size=4),
    woven(TRANSCRIPT_PIECES, 8, 40),
    st.sampled_from(["(silence)", "(response) ", " (response)", ""]),
    JUNK,
)
RECIPE_LINE = st.one_of(
    RECIPE_JSON.map(lambda r: json.dumps(r).encode()),
    st.builds(_damaged, RECIPE_JSON.map(lambda r: json.dumps(r).encode()), st.integers(0, 400), st.binary(max_size=4)),
    st.binary(max_size=40),
)


@FUZZ
@given(lines=st.lists(RECIPE_LINE, max_size=2))
@example(lines=[DEEP])
@example(lines=[b"\xff"])
def test_recipe_import_keeps_or_reports_every_line(scratch: Path, lines: list[bytes]) -> None:
    """`chime import recipe` turns every line into a conversation, a duplicate or a counted problem."""
    path = scratch / "fuzz-recipe.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        convs, report = import_recipe(path)
    except ChimeError as e:  # only for a file that is not text at all
        assert str(path) in str(e)
        return
    nonblank = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(convs) + report.counts["unparsable"] + report.counts["duplicates"] == len(nonblank)
    for conv in convs:
        assert_valid(conv)


IRC_PIECES = [
    "\n[12:34] <ana> ", "\n[1:02:03] <@op> ", "\n<+v> ", "\n[12:34]  * ana ", "\n=== ana is now known as bo",
    "\n=== bo [~b@host] has joined", "\n", "<", ">", "<a b>", " * ", "nick: ", "nick, ", "ok, ", "http://x",
    "\x03", "\x034,12", "\x02", "\t", " ", "é", "🎉",
]  # fmt: skip


@FUZZ
@given(log=woven(IRC_PIECES, max_pieces=16, max_chars=60))
def test_irc_logs_parse_into_clean_nicks_and_texts(log: str) -> None:
    lines = log.split("\n")
    said, nicks, unparsable = parse_irc_log(lines)
    assert set(unparsable) <= set(range(len(lines)))
    for line in said:
        assert 0 <= line.line < len(lines) and line.line not in unparsable
        assert line.nick and not any(ch.isspace() for ch in line.nick) and line.nick in nicks
        assert line.text and line.text == line.text.strip()
        assert all(unicodedata.category(ch) != "Cc" for ch in line.text)
        addressed = addressed_nick(line.text)
        assert addressed is None or (addressed and not re.search(r"[\s:,]", addressed))
