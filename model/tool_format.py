"""Tool formats: how tool schemas and calls are written for a model family, and how calls are parsed.

Chime's bot turn is always "(response) ..." (the decision marker comes first, so a decision stays one
forward pass); what follows the marker when the bot calls tools depends on the model family:

    plain    compact one-line signatures in the system prompt; calls as
             <tool_call>{"name": ..., "arguments": {...}}</tool_call>       (SmolLM2 and other templates
             without tool support; the default model's format)
    hermes   Hermes/Qwen2.5: <tools>JSON schemas</tools> in the system prompt; calls as
             <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
    llama3   Llama-3.1 JSON tool calling: schemas as JSON in the system prompt; calls as
             {"name": ..., "parameters": {...}}, several joined by "; "
    glm4     GLM-4: "## name" sections of JSON schemas; calls as the name on a line, then JSON arguments

`detect_tool_format` picks one from the tokenizer's chat template (its own tool tags), and the
`tool_format` setting overrides it. Where the template itself renders `tools=` (Qwen2.5, Hermes, ...),
the system prompt's tool section is the template's own rendering (`ChatFormat` does that); the other
families use the section written here.

Parsing never raises: whatever does not parse is reported as an error string and the text around it
is the reply. Several calls in one turn are parsed in order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from model.conversation import ToolCall

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
MAX_CALLS_PER_TURN = 16
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")

# JSON-schema type names as benchmarks and other projects spell them, mapped to JSON Schema's.
_TYPE_ALIASES = {"dict": "object", "float": "number", "tuple": "array", "int": "integer", "str": "string",
                 "bool": "boolean", "list": "array", "double": "number", "long": "integer"}  # fmt: skip


def bare_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool schema without the OpenAI wrapper ({"type": "function", "function": {...}})."""
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        return tool["function"]
    return tool


def normalize_schema(schema: Any) -> Any:
    """A tool's JSON schema with type aliases ("dict", "float", "tuple", "any") made standard."""
    if isinstance(schema, list):
        return [normalize_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: normalize_schema(v) if k in ("properties", "items", "parameters", "additionalProperties") else v
           for k, v in schema.items()}  # fmt: skip
    if "properties" in out and isinstance(out["properties"], dict):
        out["properties"] = {k: normalize_schema(v) for k, v in out["properties"].items()}
    kind = out.get("type")
    if isinstance(kind, str):
        if kind == "any":
            out.pop("type")
        else:
            out["type"] = _TYPE_ALIASES.get(kind, kind)
    return out


def _dumps(value: Any) -> str:
    """JSON as a call is written: non-ASCII text kept, but escaped where it would break the turn. Lone surrogates
    (a parsed "\\ud83d" can leave one in the arguments) no tokenizer encodes, and a closing tag inside a string
    would end the call early; their escapes read back as the same strings."""
    text = _LONE_SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))
    return text.replace(TOOL_CALL_CLOSE, "<\\/" + TOOL_CALL_CLOSE[2:])


@dataclass(frozen=True)
class ParsedReply:
    text: str
    tool_calls: tuple[ToolCall, ...]
    errors: tuple[str, ...] = ()


def _call_from_obj(obj: Any, args_key: str = "arguments") -> tuple[ToolCall | None, str | None]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None, "tool call needs an object with a string 'name'"
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False) if args.strip() else {}
        except (ValueError, RecursionError):  # also numbers past int's digit limit, nesting past the recursion limit
            return None, f"tool call arguments are not valid JSON ({obj['name'][:64]!r})"
    if not isinstance(args, dict):
        return None, f"tool call arguments must be an object ({obj['name'][:64]!r})"
    return ToolCall(name=obj["name"], arguments=args), None


def _type_hint(schema: dict[str, Any]) -> str:
    if "enum" in schema and isinstance(schema["enum"], list):
        return "|".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"][:12])
    kind = schema.get("type", "any")
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"array[{_type_hint(schema['items'])}]"
    return str(kind)


class ToolFormat:
    """Base: the plain format (compact signatures, <tool_call> JSON calls)."""

    name: ClassVar[str] = "plain"

    # ---------------------------------------------------------------- schemas in the system prompt

    def signature(self, schema: dict[str, Any]) -> str:
        """One line per tool: name(param: type, optional?: type): description. param: description ..."""
        params = schema.get("parameters") or {}
        props = params.get("properties") or {}
        required = set(params.get("required") or [])
        sig = ", ".join(f"{p}{'' if p in required else '?'}: {_type_hint(s if isinstance(s, dict) else {})}"
                        for p, s in props.items())  # fmt: skip
        line = f"{schema.get('name')}({sig})"
        desc = " ".join(str(schema.get("description") or "").split())
        if desc:
            line += f": {desc}"
        notes = [f"{p}: {' '.join(str(s.get('description')).split())}" for p, s in props.items()
                 if isinstance(s, dict) and s.get("description")]  # fmt: skip
        if notes:
            line += " [" + "; ".join(notes) + "]"
        return line

    def system_section(self, tools: Sequence[dict[str, Any]], response_marker: str) -> str:
        lines = "\n".join(f"- {self.signature(normalize_schema(bare_schema(t)))}" for t in tools)
        return (
            f"\nTools you can call:\n{lines}\nTo call tools, answer {response_marker} "
            f'{TOOL_CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{TOOL_CALL_CLOSE}, one tag per call. '
            "Use only these tools, only the arguments they list, and only values people gave."
        )

    # ---------------------------------------------------------------- calls

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        return " ".join(
            f"{TOOL_CALL_OPEN}{_dumps({'name': c.name, 'arguments': c.arguments})}{TOOL_CALL_CLOSE}"
            for c in calls
        )

    @property
    def tagged(self) -> bool:
        """Whether every call opens with the <tool_call> tag (plain, Hermes/Qwen), so a call can be told from
        words while it is written; Llama-3 JSON and GLM-4 calls cannot."""
        return self.render_calls([ToolCall("f", {})]).startswith(TOOL_CALL_OPEN)

    def call_opening(self) -> str | None:
        """The text every rendered call starts with, whatever the tool (where the model commits to calling),
        or None when calls start with the tool's name (nothing tells a call from words before it)."""
        a, b = self.render_calls([ToolCall("a", {})]), self.render_calls([ToolCall("b", {})])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        opening = a[:n]
        if TOOL_CALL_OPEN in opening:  # tagged calls: the tag alone (the constrained decoder takes over there)
            return opening[: opening.index(TOOL_CALL_OPEN) + len(TOOL_CALL_OPEN)]
        return opening if opening.strip() else None

    def parse(self, generated: str) -> ParsedReply:
        return _parse_tagged(generated)


def _parse_tagged(generated: str) -> ParsedReply:
    calls: list[ToolCall] = []
    errors: list[str] = []
    for raw in _TOOL_CALL_RE.findall(generated):
        try:
            obj = json.loads(raw, strict=False)
        except json.JSONDecodeError as e:
            errors.append(f"tool call is not valid JSON: {e.msg}")
            continue
        except (ValueError, RecursionError):  # a number past int's digit limit, nesting past the recursion limit
            errors.append("tool call is too large or too deeply nested to read")
            continue
        call, err = _call_from_obj(obj)
        if err:
            errors.append(err)
        elif call is not None:
            calls.append(call)
    text = _TOOL_CALL_RE.sub("", generated)
    if TOOL_CALL_OPEN in text:  # an unclosed call, e.g. cut by max_new_tokens
        text, _, _ = text.partition(TOOL_CALL_OPEN)
        errors.append("unterminated tool call")
    return _bounded(text, calls, errors)


def _bounded(text: str, calls: list[ToolCall], errors: list[str]) -> ParsedReply:
    if len(calls) > MAX_CALLS_PER_TURN:
        errors.append(f"{len(calls)} tool calls in one turn; only the first {MAX_CALLS_PER_TURN} are kept")
        calls = calls[:MAX_CALLS_PER_TURN]
    return ParsedReply(text=text.strip(), tool_calls=tuple(calls), errors=tuple(errors))


class HermesFormat(ToolFormat):
    """Hermes / Qwen2.5 function calling."""

    name = "hermes"

    def system_section(self, tools: Sequence[dict[str, Any]], response_marker: str) -> str:
        body = "\n".join(json.dumps({"type": "function", "function": normalize_schema(bare_schema(t))}, ensure_ascii=False) for t in tools)
        return (
            "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{body}\n</tools>\n\nFor each function call, answer {response_marker} and return a json "
            "object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}'
        )

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(
            f"{TOOL_CALL_OPEN}\n{_dumps({'name': c.name, 'arguments': c.arguments})}\n{TOOL_CALL_CLOSE}"
            for c in calls
        )


def _scan_json_objects(text: str) -> tuple[list[tuple[int, int, Any]], str]:
    """Every top-level JSON object in `text` as (start, end, value), and the text outside them."""
    decoder = json.JSONDecoder(strict=False)
    found: list[tuple[int, int, Any]] = []
    rest: list[str] = []
    i = last = 0
    while True:
        j = text.find("{", i)
        if j < 0:
            break
        try:
            value, end = decoder.raw_decode(text, j)
        except (ValueError, RecursionError):  # also numbers past int's digit limit, nesting past the recursion limit
            i = j + 1
            continue
        found.append((j, end, value))
        rest.append(text[last:j])
        i = last = end
    rest.append(text[last:])
    return found, "".join(rest)


class Llama3Format(ToolFormat):
    """Llama 3.1/3.2 JSON tool calling ({"name", "parameters"}; several calls joined by "; ")."""

    name = "llama3"

    def system_section(self, tools: Sequence[dict[str, Any]], response_marker: str) -> str:
        body = "\n\n".join(json.dumps({"type": "function", "function": normalize_schema(bare_schema(t))}, ensure_ascii=False, indent=4) for t in tools)
        return (
            "\n\nGiven the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n"
            f'Answer {response_marker} and then, for each call, {{"name": function name, "parameters": dictionary of '
            'argument name and its value}, separated by "; ". Do not use variables.\n\n' + body
        )

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        return "; ".join(_dumps({"name": c.name, "parameters": c.arguments}) for c in calls)

    def parse(self, generated: str) -> ParsedReply:
        text = generated.replace("<|python_tag|>", "")
        calls: list[ToolCall] = []
        errors: list[str] = []
        found, rest = _scan_json_objects(text)
        for _, _, obj in found:
            if isinstance(obj, dict) and "name" in obj and ("parameters" in obj or "arguments" in obj):
                call, err = _call_from_obj(obj, "parameters")
                if err:
                    errors.append(err)
                elif call is not None:
                    calls.append(call)
            else:
                errors.append("a JSON object that is not a tool call")
        if not found and text.lstrip().startswith("{"):
            errors.append("tool call is not valid JSON")
            rest = ""
        rest = re.sub(r"^[\s;]+|[\s;]+$", "", rest) if calls else rest
        return _bounded(rest, calls, errors)


class Glm4Format(ToolFormat):
    """GLM-4 (glm-4-9b-chat) tool calling: the function name on its own line, then its JSON arguments."""

    name = "glm4"
    _CALL_RE = re.compile(r"(?m)^[ \t]*([A-Za-z_][A-Za-z0-9_.\-]{0,63})[ \t]*\n[ \t]*(?=\{)")

    def system_section(self, tools: Sequence[dict[str, Any]], response_marker: str) -> str:
        parts = [f"## {bare_schema(t).get('name')}\n\n{json.dumps(normalize_schema(bare_schema(t)), ensure_ascii=False, indent=4)}" for t in tools]
        return (
            "\n\n# 可用工具\n\n" + "\n\n".join(parts) + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
            f"\nTo call a function, answer {response_marker}, then its name on one line and its JSON arguments on the next."
        )

    def render_calls(self, calls: Sequence[ToolCall]) -> str:
        # each call starts on its own line, also after reply text
        return "".join(f"\n{c.name}\n{_dumps(c.arguments)}" for c in calls)

    def parse(self, generated: str) -> ParsedReply:
        calls: list[ToolCall] = []
        errors: list[str] = []
        decoder = json.JSONDecoder(strict=False)
        pieces: list[str] = []
        pos = 0
        for m in self._CALL_RE.finditer(generated):
            if m.start() < pos:
                continue
            try:
                args, end = decoder.raw_decode(generated, m.end())
            except (ValueError, RecursionError):  # also numbers past int's digit limit, nesting past the recursion limit
                errors.append(f"tool call arguments are not valid JSON ({m.group(1)!r})")
                continue
            if not isinstance(args, dict):
                errors.append(f"tool call arguments must be an object ({m.group(1)!r})")
                continue
            pieces.append(generated[pos : m.start()])
            calls.append(ToolCall(name=m.group(1), arguments=args))
            pos = end
        pieces.append(generated[pos:])
        return _bounded("".join(pieces), calls, errors)


FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (ToolFormat, HermesFormat, Llama3Format, Glm4Format)}


def detect_tool_format(chat_template: str | None) -> str:
    """The tool format a model family expects, read from its chat template's own markers."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "Environment: ipython" in t or '"parameters": dictionary of argument name' in t:
        return "llama3"
    if "[gMASK]" in t or "<|observation|>" in t:
        return "glm4"
    return "plain"


def get_tool_format(name: str, chat_template: str | None = None) -> ToolFormat:
    """`name` ("auto" detects from the chat template) as a ToolFormat instance."""
    if name == "auto":
        name = detect_tool_format(chat_template)
    if name not in FORMATS:
        raise ValueError(f"unknown tool format {name!r}; choose auto or one of {', '.join(FORMATS)}")
    return FORMATS[name]()
