"""The shared conversation file format: reading, validation, labels, transcripts and round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model.conversation import (
    Conversation,
    Message,
    ScoredMessage,
    ToolCall,
    conversation_from_json,
    iter_conversations,
    message_from_dict,
    parse_transcript_line,
    read_conversations,
    read_transcript,
    scored_messages,
    write_conversations,
)
from model.errors import ConversationFormatError

CALC_SCHEMA: dict[str, Any] = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[Any]) -> Path:
    return write_lines(path, [json.dumps(row, ensure_ascii=False) for row in rows])


def user(name: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "name": name, "content": content, **extra}


def bot(content: str = "", **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **extra}


def conv_of(*messages: dict[str, Any]) -> Conversation:
    return conversation_from_json(list(messages))


# ---------------------------------------------------------------------------------------------- shapes


def test_object_shape_reads_every_field(tmp_path: Path) -> None:
    row = {
        "id": "trip-017",
        "bot_name": "Chime",
        "tools": [CALC_SCHEMA],
        "messages": [
            user("Alice", "anyone up for pizza?"),
            bot(tool_calls=[{"name": "calculator", "arguments": {"expression": "84*0.15"}}]),
            {"role": "tool", "name": "calculator", "content": "12.6"},
            bot("Luigi's closes at 10 tonight."),
        ],
    }
    (conv,) = read_conversations(jsonl(tmp_path / "c.jsonl", [row]))
    assert conv.id == "trip-017"
    assert conv.bot_name == "Chime"
    assert conv.tools == [CALC_SCHEMA]
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.messages[0] == Message(role="user", content="anyone up for pizza?", name="Alice")
    assert conv.messages[1].content == ""
    assert conv.messages[1].tool_calls == [ToolCall("calculator", {"expression": "84*0.15"})]
    assert conv.messages[2] == Message(role="tool", content="12.6", name="calculator")
    assert conv.messages[3].content == "Luigi's closes at 10 tonight."
    assert conv.messages[3].name is None


def test_bare_list_shape_takes_bot_name_from_configuration_and_id_from_file_and_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "recipe.jsonl", [[user("bob", "hi")], [user("carol", "yo"), bot("hey")]])
    convs = read_conversations(path, default_bot_name="Chime")
    assert [c.bot_name for c in convs] == ["Chime", "Chime"]
    assert [c.id for c in convs] == ["recipe:1", "recipe:2"]
    assert convs[1].tools == []
    assert [m.role for m in convs[1].messages] == ["user", "assistant"]


def test_bare_shape_without_default_bot_name_has_none(tmp_path: Path) -> None:
    (conv,) = read_conversations(jsonl(tmp_path / "x.jsonl", [[user("bob", "hi")]]))
    assert conv.bot_name is None


def test_explicit_bot_name_wins_over_the_default(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "x.jsonl", [{"bot_name": "Aria", "messages": [user("bob", "hi")]}])
    assert read_conversations(path, default_bot_name="Chime")[0].bot_name == "Aria"


def test_ids_are_strings_and_missing_ids_name_the_line(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "logs.jsonl",
        [
            json.dumps({"id": 7, "messages": []}),
            "",
            "   ",
            json.dumps({"messages": [user("a", "b")]}),
        ],
    )
    convs = read_conversations(path)
    assert [c.id for c in convs] == ["7", "logs:4"]
    assert convs[0].messages == []


def test_iter_conversations_is_lazy_and_stops_at_the_bad_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", [json.dumps([user("a", "1")]), "{not json"])
    it = iter_conversations(path)
    assert next(it).messages[0].content == "1"
    with pytest.raises(ConversationFormatError, match=r"c\.jsonl:2: not valid JSON"):
        next(it)


def test_content_null_and_missing_become_empty_strings() -> None:
    conv = conv_of({"role": "user", "name": "a", "content": None}, {"role": "assistant"})
    assert [m.content for m in conv.messages] == ["", ""]


def test_missing_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(ConversationFormatError, match="not found"):
        read_conversations(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{oops", "not valid JSON"),
        ("42", "expected an object or a list of messages"),
        ('"just text"', "expected an object or a list of messages"),
        ('{"id": "x"}', "'messages' must be a list"),
        ('{"messages": {"role": "user"}}', "'messages' must be a list"),
        ('["hello"]', "messages[0]: a message must be an object, got str"),
        ('[{"role": "system", "content": "x"}]', "messages[0]: role must be user, assistant or tool"),
        ('[{"content": "x", "name": "a"}]', "messages[0]: role must be user, assistant or tool"),
        ('[{"role": "user", "content": "hi"}]', "messages[0]: a human message needs a 'name'"),
        ('[{"role": "user", "name": "a", "content": 5}]', "messages[0]: content must be a string"),
        ('[{"role": "user", "name": 3, "content": "x"}]', "messages[0]: name must be a string"),
        (
            '[{"role": "user", "name": "a", "content": "x", "tool_calls": [{"name": "f"}]}]',
            "messages[0]: only assistant messages can carry tool_calls",
        ),
        ('[{"role": "assistant", "tool_calls": ["f"]}]', "messages[0].tool_calls[0]: a tool call must be an object"),
        (
            '[{"role": "assistant", "tool_calls": [{"arguments": {}}]}]',
            "tool_calls[0]: a tool call needs a string 'name'",
        ),
        ('[{"role": "assistant", "tool_calls": [{"name": ""}]}]', "tool_calls[0]: a tool call needs a string 'name'"),
        (
            '[{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{bad"}]}]',
            "tool_calls[0]: tool call arguments are not valid JSON",
        ),
        (
            '[{"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1, 2]}]}]',
            "tool_calls[0]: tool call arguments must be an object",
        ),
        (
            '[{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1, 2]"}]}]',
            "tool_calls[0]: tool call arguments must be an object",
        ),
        ('[{"role": "user", "name": "a", "content": "x", "expect": "maybe"}]', "expect must be 'silence' or 'respond'"),
        ('[{"role": "assistant", "content": "x", "expect": "respond"}]', "expect must be 'silence' or 'respond'"),
        ('{"bot_name": "", "messages": []}', "bot_name must be a non-empty string"),
        ('{"bot_name": "   ", "messages": []}', "bot_name must be a non-empty string"),
        ('{"bot_name": 5, "messages": []}', "bot_name must be a non-empty string"),
        ('{"tools": ["calculator"], "messages": []}', "tools[0]: a tool schema must be an object"),
        ('{"tools": [{"description": "x"}], "messages": []}', "tools[0]: a tool schema needs a string 'name'"),
        (
            '{"tools": [{"type": "function", "function": {"description": "x"}}], "messages": []}',
            "tools[0]: a tool schema needs a string 'name'",
        ),
    ],
)
def test_invalid_lines_raise_errors_that_name_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    good = json.dumps([user("alice", "fine")])
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(ConversationFormatError) as info:
        read_conversations(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3")
    assert fragment in message


def test_error_names_the_offending_message_index(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "c.jsonl", [[user("a", "1"), bot("ok"), {"role": "user", "content": "anonymous"}]])
    with pytest.raises(ConversationFormatError) as info:
        read_conversations(path)
    assert str(info.value) == f"{path}:1: messages[2]: a human message needs a 'name'"


def test_message_from_dict_accepts_all_three_roles() -> None:
    assert message_from_dict(user("a", "x", expect="respond")).expect == "respond"
    assert message_from_dict({"role": "assistant", "content": "ok"}).is_human is False
    tool = message_from_dict({"role": "tool", "name": "calculator", "content": "4"})
    assert (tool.role, tool.name, tool.content, tool.is_human) == ("tool", "calculator", "4", False)


# ---------------------------------------------------------------------------------------------- tool calls and schemas


def test_openai_style_tool_calls_with_string_arguments() -> None:
    raw = bot(
        tool_calls=[
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "84*0.15"}'},
            },
            {"type": "function", "function": {"name": "clock", "arguments": ""}},
            {"name": "weather", "arguments": '  {"city": "Zürich", "days": [1, 2]}  '},
            {"name": "noargs"},
        ]
    )
    msg = message_from_dict(raw)
    assert msg.tool_calls == [
        ToolCall("calculator", {"expression": "84*0.15"}),
        ToolCall("clock", {}),
        ToolCall("weather", {"city": "Zürich", "days": [1, 2]}),
        ToolCall("noargs", {}),
    ]


def test_wrapped_tool_schemas_are_unwrapped_and_bare_ones_kept() -> None:
    wrapped = {"type": "function", "function": CALC_SCHEMA}
    clock = {"name": "clock", "description": "the time", "parameters": {"type": "object", "properties": {}}}
    conv = conversation_from_json({"tools": [wrapped, clock], "messages": []})
    assert conv.tools == [CALC_SCHEMA, clock]


def test_schema_with_a_type_other_than_function_is_kept_whole() -> None:
    schema = {"type": "object", "name": "odd", "function": "not a wrapper"}
    assert conversation_from_json({"tools": [schema], "messages": []}).tools == [schema]


def test_tool_call_to_dict() -> None:
    assert ToolCall("f", {"a": 1}).to_dict() == {"name": "f", "arguments": {"a": 1}}


# ---------------------------------------------------------------------------------------------- labels


def test_implicit_labels_respond_only_when_the_bot_answers_next() -> None:
    conv = conv_of(
        user("alice", "who is up for pizza?"),
        user("bob", "me!"),
        user("carol", "Chime, what time does Luigi's close?"),
        bot("10pm tonight."),
        user("alice", "thanks"),
    )
    assert scored_messages(conv) == [
        ScoredMessage(index=0, expected="silence"),
        ScoredMessage(index=1, expected="silence"),
        ScoredMessage(index=2, expected="respond", expected_response="10pm tonight."),
        ScoredMessage(index=4, expected="silence"),
    ]


def test_implicit_label_with_tool_calls_expects_the_calls() -> None:
    conv = conv_of(
        user("dave", "Chime, what's 15% of 84?"),
        bot(tool_calls=[{"name": "calculator", "arguments": {"expression": "84*0.15"}}]),
        {"role": "tool", "name": "calculator", "content": "12.6"},
        bot("12.60"),
        user("erin", "nice"),
    )
    first, last = scored_messages(conv)
    assert first.index == 0
    assert first.expected == "respond"
    assert first.expected_tool_calls == (ToolCall("calculator", {"expression": "84*0.15"}),)
    assert first.expected_response is None  # the bot's immediate turn is the call, not text
    assert last == ScoredMessage(index=4, expected="silence")


def test_a_human_message_followed_by_a_tool_result_is_silence() -> None:
    conv = conv_of(user("a", "x"), {"role": "tool", "name": "t", "content": "r"}, bot("done"))
    assert scored_messages(conv) == [ScoredMessage(index=0, expected="silence")]


def test_explicit_expect_scores_only_marked_messages() -> None:
    conv = conv_of(
        user("alice", "hi all"),  # context only: not scored even though it would be implicit silence
        user("bob", "Chime, ping?", expect="respond"),
        bot("pong"),
        user("carol", "lol", expect="silence"),
        user("dave", "Chime?"),  # context only: not scored
        bot("yes?"),  # a bot reply after an unscored message
        user("erin", "Chime, help", expect="respond"),  # expected but the file has no reply
    )
    assert scored_messages(conv) == [
        ScoredMessage(index=1, expected="respond", expected_response="pong"),
        ScoredMessage(index=3, expected="silence"),
        ScoredMessage(index=6, expected="respond"),
    ]


def test_explicit_silence_ignores_a_following_bot_reply() -> None:
    conv = conv_of(user("a", "x", expect="silence"), bot("I spoke anyway", tool_calls=[{"name": "f"}]))
    assert scored_messages(conv) == [ScoredMessage(index=0, expected="silence")]


def test_explicit_respond_carries_calls_and_response() -> None:
    conv = conv_of(
        user("a", "x", expect="respond"),
        bot("checking", tool_calls=[{"name": "f", "arguments": {"q": 1}}]),
    )
    assert scored_messages(conv) == [
        ScoredMessage(
            index=0, expected="respond", expected_tool_calls=(ToolCall("f", {"q": 1}),), expected_response="checking"
        )
    ]


def test_no_humans_no_scores() -> None:
    assert scored_messages(Conversation(messages=[])) == []
    assert scored_messages(conv_of(bot("hello"), bot("anyone?"))) == []


# ---------------------------------------------------------------------------------------------- transcripts


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("alice: hi", ("alice", "hi")),
        ("alice: meet at 10:30: ok?", ("alice", "meet at 10:30: ok?")),
        ("carol: see https://example.com/a:b", ("carol", "see https://example.com/a:b")),
        ("  Mary Ann  :   spaced out  ", ("Mary Ann", "spaced out")),
        ("bob:", ("bob", "")),
        ("bob:no space", ("bob", "no space")),
        ("🎉 Zoë: ¿qué?", ("🎉 Zoë", "¿qué?")),
    ],
)
def test_parse_transcript_line_splits_at_the_first_colon(line: str, expected: tuple[str, str]) -> None:
    assert parse_transcript_line(line) == expected


@pytest.mark.parametrize("line", ["no colon here", ": nameless", "   : nameless", ""])
def test_parse_transcript_line_rejects_lines_without_a_name(line: str) -> None:
    with pytest.raises(ConversationFormatError, match=r"^here:7: expected 'Name: text'"):
        parse_transcript_line(line, "here:7")


def test_read_transcript_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.txt",
        [
            "# a scripted chat",
            "alice: pizza tonight?",
            "",
            "   ",
            "  # indented comment",
            "bob: sure: 7pm",
            "carol:   https://example.com/menu  ",
        ],
    )
    assert read_transcript(path) == [
        ("alice", "pizza tonight?"),
        ("bob", "sure: 7pm"),
        ("carol", "https://example.com/menu"),
    ]


def test_read_transcript_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.txt", ["# header", "alice: hi", "", "this line has no separator"])
    with pytest.raises(ConversationFormatError) as info:
        read_transcript(path)
    assert str(info.value).startswith(f"{path}:4: expected 'Name: text'")
    assert "this line has no separator" in str(info.value)


def test_read_transcript_handles_crlf(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"alice: hi\r\nbob: yo\r\n")
    assert read_transcript(path) == [("alice", "hi"), ("bob", "yo")]


def test_read_transcript_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConversationFormatError, match="transcript not found"):
        read_transcript(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------- writing


def sample_conversations() -> list[Conversation]:
    return [
        Conversation(
            id="trip-017",
            bot_name="Chime",
            tools=[CALC_SCHEMA],
            messages=[
                Message(role="user", name="Zoë 🎉", content="tip on 84€? «15%»"),
                Message(role="assistant", tool_calls=[ToolCall("calculator", {"expression": "84*0.15"})]),
                Message(role="tool", name="calculator", content="12.6"),
                Message(role="assistant", content="12,60 €"),
                Message(role="user", name="مريم", content="شكرا", expect="silence"),
                Message(role="user", name="bob: the builder", content="", expect="respond"),
            ],
        ),
        Conversation(id="plain", messages=[Message(role="user", name="a", content="line\nbreak")]),
    ]


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    convs = sample_conversations()
    path = tmp_path / "nested" / "dir" / "out.jsonl"
    assert write_conversations(path, convs) == 2
    assert read_conversations(path) == convs


def test_written_lines_use_the_object_shape(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_conversations(path, iter(sample_conversations()))
    text = path.read_text(encoding="utf-8")
    assert "Zoë 🎉" in text and "\\u" not in text  # written as UTF-8, not escaped
    lines = text.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["id", "bot_name", "tools", "messages"]
    assert first["messages"][1] == {
        "role": "assistant",
        "tool_calls": [{"name": "calculator", "arguments": {"expression": "84*0.15"}}],
    }
    assert first["messages"][4] == {"role": "user", "name": "مريم", "content": "شكرا", "expect": "silence"}
    assert first["messages"][5] == {"role": "user", "name": "bob: the builder", "content": "", "expect": "respond"}
    assert second == {"id": "plain", "messages": [{"role": "user", "name": "a", "content": "line\nbreak"}]}


def test_bare_file_round_trips_through_the_object_shape(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "bare.jsonl", [[user("a", "hi"), bot("hello")], [user("b", "x")]])
    first = read_conversations(src, default_bot_name="Chime")
    out = tmp_path / "out.jsonl"
    write_conversations(out, first)
    again = read_conversations(out)
    assert again == first
    assert [c.id for c in again] == ["bare:1", "bare:2"]


def test_openai_input_round_trips_to_plain_tool_calls(tmp_path: Path) -> None:
    row = {
        "tools": [{"type": "function", "function": CALC_SCHEMA}],
        "messages": [
            user("a", "15% of 84?"),
            bot(
                tool_calls=[
                    {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "84*0.15"}'}}
                ]
            ),
        ],
    }
    first = read_conversations(jsonl(tmp_path / "in.jsonl", [row]))
    out = tmp_path / "out.jsonl"
    write_conversations(out, first)
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["tools"] == [CALC_SCHEMA]
    assert written["messages"][1]["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "84*0.15"}}]
    assert read_conversations(out) == first


def test_write_nothing_gives_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    assert write_conversations(path, []) == 0
    assert path.read_text(encoding="utf-8") == ""
    assert read_conversations(path) == []


def test_message_to_dict_keeps_content_unless_only_tool_calls() -> None:
    assert Message(role="assistant").to_dict() == {"role": "assistant", "content": ""}
    assert Message(role="assistant", content="hi", tool_calls=[ToolCall("f", {})]).to_dict() == {
        "role": "assistant",
        "tool_calls": [{"name": "f", "arguments": {}}],
        "content": "hi",
    }
