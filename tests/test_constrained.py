"""Schema-constrained tool calls (`model/constrained.py`): whatever the model prefers, an opened call ends
as a valid call to one of the channel's tools."""

from __future__ import annotations

import json
import random

import pytest

from model.constrained import CallGrammar, call_schema
from model.conversation import ToolCall
from model.engine import IncomingMessage
from model.tool_format import TOOL_CALL_OPEN, ToolFormat, get_tool_format
from model.tools import ToolError, builtin_tools, validate_against_schema

TOOLS = [t.schema() for t in builtin_tools()] + [{
    "name": "book_table", "description": "Book a table.",
    "parameters": {"type": "object", "properties": {
        "restaurant": {"type": "string"}, "people": {"type": "integer"}, "outside": {"type": "boolean"},
        "time": {"type": "string", "enum": ["18:00", "19:00", "20:00"]}},
        "required": ["restaurant", "people"], "additionalProperties": False},
}]


def _walk(grammar: CallGrammar, fmt: ToolFormat, rng: random.Random, max_tokens: int = 400) -> str | None:
    """Random allowed tokens until the call is complete: what the worst model could write."""
    decoder = grammar.decoder(TOOLS, fmt)
    assert decoder is not None
    inside: list[int] = []
    for _ in range(max_tokens):
        allowed = decoder.allowed(inside)
        if allowed is None:
            return grammar.tokenizer.decode(inside + decoder.close_ids)
        # prefer short tokens that close strings and objects, so walks end within the budget
        closing = [t for t in allowed if any(c in grammar.tokenizer.decode([t]) for c in '"}]')]
        inside.append(rng.choice(closing if closing and rng.random() < 0.3 else allowed))
    return None


@pytest.mark.parametrize("format_name", ["plain", "hermes"])
def test_any_path_through_the_grammar_is_a_valid_call(tiny_tokenizer, format_name: str) -> None:
    fmt = get_tool_format(format_name)
    grammar = CallGrammar(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    rng = random.Random(0)
    finished = 0
    for _ in range(30):
        text = _walk(grammar, fmt, rng)
        if text is None:
            continue  # a random walk may wander in a free string; the engine's token limit ends those
        finished += 1
        parsed = fmt.parse(TOOL_CALL_OPEN + text)
        assert not parsed.errors and len(parsed.tool_calls) == 1, text
        call = parsed.tool_calls[0]
        schema = next(t for t in TOOLS if t["name"] == call.name)
        try:
            validate_against_schema(call.name, schema, call.arguments)
        except ToolError as e:  # the grammar fixes structure, names and types; a number's size is the validator's
            assert "got inf" in str(e) or "got -inf" in str(e), str(e)
    assert finished >= 15


@pytest.mark.parametrize("format_name", ["plain", "hermes"])
def test_walks_never_end_in_a_dead_state(tiny_tokenizer, format_name: str) -> None:
    """Pieces of multi-byte characters are left out of the automaton's table: with them, about 1 walk in 70
    reached a state with no allowed token mid-string, and the call was closed as broken JSON."""
    fmt = get_tool_format(format_name)
    grammar = CallGrammar(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    assert not any("\ufffd" in text for _, text, _ in grammar.data.regular_tokens)
    for seed in range(12):
        rng = random.Random(seed)
        for _ in range(10):
            text = _walk(grammar, fmt, rng)
            if text is not None:
                parsed = fmt.parse(TOOL_CALL_OPEN + text)
                assert not parsed.errors and len(parsed.tool_calls) == 1, (seed, text)


NUMBERS = {"name": "scale", "description": "Scale.", "parameters": {"type": "object", "properties": {
    "factor": {"type": "number"}, "times": {"type": "integer"}}, "required": ["factor", "times"]}}


def _number_parser():
    from lmformatenforcer import JsonSchemaParser

    return JsonSchemaParser(call_schema([NUMBERS]))


def _feed(text: str):
    """The parser after `text`, or the index of the first character it refused."""
    parser = _number_parser()
    for i, ch in enumerate(text):
        if ch not in parser.get_allowed_characters():
            return i
        parser = parser.add_character(ch)
    return parser


def test_a_decimal_point_needs_a_digit_after_it(tiny_tokenizer) -> None:
    """lm-format-enforcer 0.11.3 allows `1.e5` (not JSON; upstream #181) and integers with exponents (a float
    once parsed); the grammar installs the fix."""
    CallGrammar(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    head = '{"name": "scale", "arguments": {"factor": '
    for good in ("0.5", "-0.25", "10.125e-3", "1e5", "3", "-7.0E+2"):
        parser = _feed(head + good + ', "times": 2}}')
        assert not isinstance(parser, int) and parser.can_end(), good
        assert json.loads(head + good + ', "times": 2}}')
    for bad in ("1.e5", "0.E2", "-1.e-2", "2.,", "2.}"):
        assert _feed(head + bad) == len(head) + bad.index(".") + 1, bad
    assert _feed(head + '2, "times": 1e3') == len(head) + len('2, "times": 1')
    assert _feed(head + '2, "times": -0.5') == len(head) + len('2, "times": -0')


def test_number_walks_are_json(tiny_tokenizer) -> None:
    """Walks that spend most of their tokens in numbers: every finished call parses and has the schema's types."""
    grammar = CallGrammar(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    fmt = get_tool_format("hermes")
    decoder = grammar.decoder([NUMBERS], fmt)
    assert decoder is not None
    numeric = {t for t in range(len(tiny_tokenizer)) if set(tiny_tokenizer.decode([t]).strip()) <= set("-+.eE0123456789")}
    rng, finished = random.Random(0), 0
    for _ in range(200):
        inside: list[int] = []
        for _ in range(200):
            allowed = decoder.allowed(inside)
            if allowed is None:
                break
            in_numbers = [t for t in allowed if t in numeric]
            inside.append(rng.choice(in_numbers if in_numbers and rng.random() < 0.8 else allowed))
        else:
            continue
        finished += 1
        text = tiny_tokenizer.decode(inside + decoder.close_ids)
        parsed = fmt.parse(TOOL_CALL_OPEN + text)
        assert not parsed.errors and len(parsed.tool_calls) == 1, text
        args = parsed.tool_calls[0].arguments
        assert isinstance(args["factor"], (int, float)) and isinstance(args["times"], int), text
    assert finished >= 80


def test_the_schema_has_one_branch_per_tool() -> None:
    schema = call_schema(TOOLS)
    assert [b["properties"]["name"]["enum"] for b in schema["anyOf"]] == [[t["name"]] for t in TOOLS]
    assert call_schema(TOOLS[:1])["properties"]["arguments"]["required"] == ["expression"]
    with pytest.raises(ToolError):
        validate_against_schema("book_table", TOOLS[-1], {"restaurant": "x"})


def test_formats_without_a_tag_are_left_free(tiny_tokenizer) -> None:
    grammar = CallGrammar(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    assert grammar.decoder(TOOLS, get_tool_format("llama3")) is None
    assert grammar.decoder([], get_tool_format("plain")) is None


@pytest.mark.parametrize("constrained", [True, False])
def test_the_engine_constrains_an_opened_call(tiny_engine_factory, constrained: bool) -> None:
    """The tiny random model is steered into opening a call; constrained, it must finish a valid one."""
    engine = tiny_engine_factory(threshold=0.0, tools=["calculator", "convert_units"], max_new_tokens=300,
                                 constrained_tool_calls=constrained, max_tool_rounds=0)
    opening = engine.fmt.encode(TOOL_CALL_OPEN)
    rng = random.Random(1)
    steps = {"n": 0}
    decode = engine.fmt.decode

    def steered(logits):
        """The first tokens open a call; then any token the engine left possible (finite logits), leaning
        to ones that close strings and objects so that a random walk ends."""
        steps["n"] += 1
        if steps["n"] <= len(opening):
            return opening[steps["n"] - 1]
        possible = [int(i) for i in (logits > -float("inf")).nonzero().flatten()]
        closing = [t for t in possible if any(c in decode([t]) for c in '"}')]
        return rng.choice(closing if closing and rng.random() < 0.4 else possible)

    engine._sample = steered  # type: ignore[method-assign]
    d = engine.handle("c", IncomingMessage("alice", "@Chime 2+2?", addressed=True))
    if constrained:
        assert not d.tool_call_errors and len(d.tool_calls) >= 1
        assert d.tool_calls[0].name in ("calculator", "convert_units")
        validate_against_schema(d.tool_calls[0].name, next(t.schema() for t in builtin_tools()
                                                            if t.name == d.tool_calls[0].name), d.tool_calls[0].arguments)
    else:  # the random model writes noise after the tag: no valid call
        assert d.tool_calls == [] or d.tool_call_errors


def test_a_rendered_call_is_accepted_token_by_token(tiny_tokenizer) -> None:
    """The grammar never blocks the training format's own rendering of a call."""
    fmt = get_tool_format("plain")
    grammar = CallGrammar(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    decoder = grammar.decoder(TOOLS, fmt)
    assert decoder is not None
    rendered = fmt.render_calls([ToolCall("book_table", {"restaurant": "Luigi's", "people": 4, "time": "19:00"})])
    body = rendered[len(TOOL_CALL_OPEN) : rendered.rindex("}") + 1]
    ids = tiny_tokenizer.encode(body, add_special_tokens=False)
    for i, token in enumerate(ids):
        allowed = decoder.allowed(ids[:i])
        assert allowed is not None and token in allowed, (i, tiny_tokenizer.decode(ids[: i + 1]))
    assert decoder.allowed(ids) is None  # complete
    assert json.loads(body)["arguments"]["people"] == 4
