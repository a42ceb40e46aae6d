"""Conversation objects and the shared conversation file format (JSON Lines).

One conversation per line, either the object shape
`{"id", "bot_name", "tools", "messages"}` or the bare shape of the original recipe (a JSON list of
messages). See ../shared/CONVERSATIONS.md. Training, evaluation, logging and export all read and write
conversations through this module.

Labels: a human message immediately followed by an assistant message should get a response; one
followed by another human message (or ending the conversation) should get silence. When any message
of a conversation carries `"expect"`, only those messages are scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.errors import ConversationFormatError

# Undecodable bytes read with errors="surrogateescape"; valid UTF-8 never decodes to these.
_UNDECODABLE_RE = re.compile("[\udc80-\udcff]")

Role = Literal["user", "assistant", "tool"]
Expect = Literal["silence", "respond"]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass
class Message:
    role: Role
    content: str = ""
    name: str | None = None  # display name of a human, or the tool's name for a tool result
    tool_calls: list[ToolCall] = field(default_factory=list)
    expect: Expect | None = None

    @property
    def is_human(self) -> bool:
        return self.role == "user"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.content or not self.tool_calls:
            out["content"] = self.content
        if self.expect is not None:
            out["expect"] = self.expect
        return out


@dataclass
class Conversation:
    messages: list[Message]
    bot_name: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        if self.bot_name is not None:
            out["bot_name"] = self.bot_name
        if self.tools:
            out["tools"] = self.tools
        out["messages"] = [m.to_dict() for m in self.messages]
        return out


@dataclass(frozen=True)
class ScoredMessage:
    """A human message that evaluation scores, with what the bot should have done."""

    index: int
    expected: Expect
    expected_tool_calls: tuple[ToolCall, ...] = ()
    expected_response: str | None = None


def _tool_schema(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConversationFormatError(f"{where}: a tool schema must be an object")
    schema = raw.get("function", raw) if raw.get("type") == "function" else raw
    if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
        raise ConversationFormatError(f"{where}: a tool schema needs a string 'name'")
    return schema


def _tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise ConversationFormatError(f"{where}: a tool call must be an object")
    if raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        raw = raw["function"]
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConversationFormatError(f"{where}: a tool call needs a string 'name'")
    args = raw.get("arguments", {})
    if isinstance(args, str):  # OpenAI puts arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ConversationFormatError(f"{where}: tool call arguments are not valid JSON: {e}") from e
    if not isinstance(args, dict):
        raise ConversationFormatError(f"{where}: tool call arguments must be an object")
    return ToolCall(name=name, arguments=args)


def message_from_dict(raw: Any, where: str = "message") -> Message:
    if not isinstance(raw, dict):
        raise ConversationFormatError(f"{where}: a message must be an object, got {type(raw).__name__}")
    role = raw.get("role")
    if role not in ("user", "assistant", "tool"):
        raise ConversationFormatError(f"{where}: role must be user, assistant or tool, got {role!r}")
    content = raw.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ConversationFormatError(f"{where}: content must be a string")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise ConversationFormatError(f"{where}: name must be a string")
    if role == "user" and name is None:
        raise ConversationFormatError(f"{where}: a human message needs a 'name'")
    calls_raw = raw.get("tool_calls") or []
    if not isinstance(calls_raw, list):
        raise ConversationFormatError(f"{where}: tool_calls must be a list")
    calls = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls_raw)]
    if calls and role != "assistant":
        raise ConversationFormatError(f"{where}: only assistant messages can carry tool_calls")
    expect = raw.get("expect")
    if expect is not None and (expect not in ("silence", "respond") or role != "user"):
        raise ConversationFormatError(f"{where}: expect must be 'silence' or 'respond', on a human message")
    return Message(role=role, content=content, name=name, tool_calls=calls, expect=expect)


def conversation_from_json(raw: Any, where: str = "conversation", default_bot_name: str | None = None) -> Conversation:
    """Parse one conversation in either the object or the bare-list shape."""
    if isinstance(raw, list):
        raw = {"messages": raw}
    if not isinstance(raw, dict):
        raise ConversationFormatError(f"{where}: expected an object or a list of messages")
    messages_raw = raw.get("messages")
    if not isinstance(messages_raw, list):
        raise ConversationFormatError(f"{where}: 'messages' must be a list")
    messages = [message_from_dict(m, f"{where}: messages[{i}]") for i, m in enumerate(messages_raw)]
    bot_name = raw.get("bot_name")
    if bot_name is None:
        bot_name = default_bot_name
    if bot_name is not None and (not isinstance(bot_name, str) or not bot_name.strip()):
        raise ConversationFormatError(f"{where}: bot_name must be a non-empty string")
    tools_raw = raw.get("tools") or []
    if not isinstance(tools_raw, list):
        raise ConversationFormatError(f"{where}: 'tools' must be a list of tool schemas")
    tools = [_tool_schema(t, f"{where}: tools[{i}]") for i, t in enumerate(tools_raw)]
    cid = raw.get("id")
    return Conversation(messages=messages, bot_name=bot_name, tools=tools, id=None if cid is None else str(cid))


def iter_conversations(path: str | Path, default_bot_name: str | None = None) -> Iterator[Conversation]:
    """Yield conversations from a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConversationFormatError(f"conversation file not found: {path}")
    with path.open(encoding="utf-8", errors="surrogateescape") as f:  # bad bytes: an error naming the line
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            _check_decoded(line, where)
            try:
                raw = json.loads(line)
            except (ValueError, RecursionError) as e:  # also numbers past int's digit limit, nesting past the recursion limit
                raise ConversationFormatError(f"{where}: not valid JSON: {e}") from e
            conv = conversation_from_json(raw, where, default_bot_name)
            if conv.id is None:
                conv.id = f"{path.stem}:{lineno}"
            yield conv


def _check_decoded(line: str, where: str) -> None:
    if _UNDECODABLE_RE.search(line):
        raise ConversationFormatError(f"{where}: not UTF-8 text")


def read_conversations(path: str | Path, default_bot_name: str | None = None) -> list[Conversation]:
    return list(iter_conversations(path, default_bot_name))


def write_conversations(path: str | Path, conversations: Iterable[Conversation]) -> int:
    """Write conversations in the object shape; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    # A lone surrogate (read from a "\ud83d" escape) cannot be UTF-8; inside a JSON string, which is the only
    # place one can be, backslashreplace writes the same escape back.
    with path.open("w", encoding="utf-8", errors="backslashreplace") as f:
        for conv in conversations:
            f.write(json.dumps(conv.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


def scored_messages(conv: Conversation) -> list[ScoredMessage]:
    """The human messages that are scored in `conv`, each with its expected behaviour."""
    explicit = any(m.expect is not None for m in conv.messages)
    out = []
    for i, msg in enumerate(conv.messages):
        if not msg.is_human:
            continue
        nxt = conv.messages[i + 1] if i + 1 < len(conv.messages) else None
        bot_follows = nxt is not None and nxt.role == "assistant"
        if explicit:
            if msg.expect is None:
                continue
            expected: Expect = msg.expect
        else:
            expected = "respond" if bot_follows else "silence"
        calls: tuple[ToolCall, ...] = ()
        response = None
        if expected == "respond" and bot_follows and nxt is not None:
            calls = tuple(nxt.tool_calls)
            response = nxt.content or None
        out.append(ScoredMessage(index=i, expected=expected, expected_tool_calls=calls, expected_response=response))
    return out


def parse_transcript_line(line: str, where: str = "line") -> tuple[str, str]:
    """Split `Name: text` at the first colon."""
    name, sep, text = line.partition(":")
    if not sep or not name.strip():
        raise ConversationFormatError(f"{where}: expected 'Name: text', got {line[:60]!r}")
    return name.strip(), text.strip()


def read_transcript(path: str | Path) -> list[tuple[str, str]]:
    """Read a plain transcript: one `Name: text` per line; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConversationFormatError(f"transcript not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
        _check_decoded(line, f"{path}:{lineno}")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(parse_transcript_line(line, f"{path}:{lineno}"))
    return out
