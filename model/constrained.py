"""Schema-constrained tool calls: once the model opens a call, only schema-valid JSON can follow.

A small model knows *that* it should call a tool long before it reliably writes the call: it misspells a
function name, invents an argument, drops a required one, or writes a number as words. Free text is fine
for the reply, but a call is data with a schema, so after the model writes the opening tag
(`<tool_call>`) each next token is restricted to those that keep the text a prefix of a JSON object
matching one of the channel's tools: `{"name": <one of the tool names>, "arguments": <that tool's
parameters schema>}`. When the object is complete the closing tag is appended and decoding is free again,
so the model can still answer in words or make another call. Whether to call at all stays the model's
choice.

The character-level JSON-schema automaton is lm-format-enforcer's (`JsonSchemaParser`, `TokenEnforcer`);
its tokenizer table (each token's text) is built here from the tokenizer alone, once per engine (about a
second for a 49k vocabulary), because its transformers integration predates transformers 5. A step costs
about a millisecond on top of the forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from model.conversation import ToolCall
from model.tool_format import ToolFormat, bare_schema

log = logging.getLogger(__name__)


def call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call to any of `tools`: the name fixes the arguments' schema."""
    options = []
    for tool in tools:
        bare = bare_schema(tool)
        params = dict(bare.get("parameters") or {"type": "object", "properties": {}})
        params.setdefault("type", "object")
        options.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [bare["name"]]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    return options[0] if len(options) == 1 else {"anyOf": options}


def _require_fraction_digit() -> None:
    """lm-format-enforcer 0.11.3 lets an exponent follow the decimal point (`1.e5`), which is not JSON: the call
    was closed as broken JSON (upstream noamgat/lm-format-enforcer#181, open). It also lets an integer take an
    exponent (`0E234545`) or a fraction after "-0" (`-0.01`), which JSON reads as a float (or inf). After a
    decimal point only a digit may follow, and integers are digits. The library builds its number states by
    this module-level name (also in `_clone`), so the subclass takes their place once per process; everything
    else is the library's."""
    from lmformatenforcer import jsonschemaparser

    library_state = jsonschemaparser.NumberParsingState
    if getattr(library_state, "requires_fraction_digit", False):
        return

    class NumberParsingState(library_state):  # type: ignore[misc, valid-type]
        requires_fraction_digit = True

        def get_allowed_characters(self) -> str:
            if self.parsed_string.endswith("."):
                return "0123456789"
            allowed = super().get_allowed_characters()
            if not self.allow_floating_point:  # the library also offers "-0." to an integer
                allowed = allowed.replace("e", "").replace("E", "").replace(".", "")
            return allowed

    jsonschemaparser.NumberParsingState = NumberParsingState


def token_texts(tokenizer: Any) -> list[tuple[int, str, bool]]:
    """(id, the text the token adds to a text, whether that text starts a new word) for every regular token:
    special tokens and pieces of a multi-byte character (whose text depends on their neighbours) left out.
    Each token is decoded after "0", which keeps a leading space that decoding a token alone may drop."""
    special = set(tokenizer.all_special_ids)
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        after_zero = tokenizer.decode([zero, i])[1:]
        if "\ufffd" not in after_zero:
            out.append((i, after_zero, len(after_zero) > len(tokenizer.decode([i]))))
    return out


class CallGrammar:
    """The tokenizer side, built once: which text each token adds (what lm-format-enforcer needs). A
    piece of a multi-byte character is left out: the character automaton cannot follow it (it could end in a
    dead state mid-string); whole-character tokens remain."""

    def __init__(self, tokenizer: Any, stop_ids: Iterable[int], texts: Sequence[tuple[int, str, bool]] | None = None):
        from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

        _require_fraction_digit()
        self.tokenizer = tokenizer
        regular = list(texts if texts is not None else token_texts(tokenizer))
        self.end_id = min(stop_ids)  # the automaton's "complete" signal; never generated inside a call
        self.data = TokenEnforcerTokenizerData(regular, self._decode, self.end_id, False, len(tokenizer))
        # lm-format-enforcer 0.11 lets an object or array close right after a comma ({"a": 1,}); not JSON
        self.closers = frozenset(i for i, text, _ in regular if text.lstrip()[:1] in ("}", "]"))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids).rstrip("\ufffd")

    def decoder(self, tools: Sequence[dict[str, Any]], tool_format: ToolFormat) -> CallDecoder | None:
        """A decoder for calls to `tools` in `tool_format`, or None when the format has no tagged JSON calls."""
        if not tools:
            return None
        rendered = tool_format.render_calls([ToolCall("f", {})])
        if not tool_format.tagged or "}" not in rendered:
            return None  # llama3/glm4 calls are not opened by a tag
        close = rendered[rendered.rindex("}") + 1 :]
        return CallDecoder(self, call_schema(tools), close)


class CallDecoder:
    """Per generation: the allowed next tokens inside a call, and the closing tag's ids."""

    def __init__(self, grammar: CallGrammar, schema: dict[str, Any], close: str):
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        self.grammar = grammar
        self.enforcer = TokenEnforcer(grammar.data, JsonSchemaParser(schema))
        self.close_ids = list(grammar.tokenizer.encode(close, add_special_tokens=False))
        self._prompt = [grammar.end_id]  # the enforcer keys its state on a prompt; any fixed one will do

    def allowed(self, inside: Sequence[int]) -> list[int] | None:
        """Token ids that may follow `inside` (the ids since the opening tag); None once the call is complete
        (or the automaton has nothing left, which ends the call the same way)."""
        tokens = self.enforcer.get_allowed_tokens(self._prompt + list(inside)).allowed_tokens
        if not tokens or self.grammar.end_id in tokens:
            return None
        if _after_comma(self.grammar.tokenizer.decode(list(inside))):
            tokens = [t for t in tokens if t not in self.grammar.closers] or tokens
        return tokens


def _after_comma(text: str) -> bool:
    """Whether the last character of `text` outside JSON strings, whitespace aside, is a comma."""
    last, in_string, escaped = "", False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string, last = True, '"'
        elif not ch.isspace():
            last = ch
    return not in_string and last == ","
