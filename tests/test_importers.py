"""Importers: IRC logs, Glaive tool-call dialogues and recipe files into the shared conversation format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bot.cli import main as cli_main
from model.conversation import ToolCall, read_conversations, scored_messages
from training.corpus import check_conversation, split_key
from training.importers import (
    BOT_NAMES,
    PEOPLE,
    addressed_nick,
    import_irc,
    import_recipe,
    import_toolcalls,
    is_pleasantry,
    lower_first,
)

# ---------------------------------------------------------------------------- IRC

# Lines from 1000 on: the annotated region. Eight messages survive (bot lines, notices and spam are dropped).
REGION = [
    "=== carol [~c@host.example]  has joined #ubuntu",  # 1000
    "[10:00] <alice> anyone know how to mount an iso?",  # 1001 new thread: context
    "[10:01] <bob> alice: sudo mount -o loop file.iso /mnt",  # 1002 addressed to alice
    "[10:01] <ubottu> mount is the command to attach a file system",  # 1003 channel bot: dropped
    "[10:02]  * carol waves",  # 1004 action
    "[10:02] <alice> that worked, cheers",  # 1005 annotated as a reply to bob
    "=== dave is now known as dave_away",  # 1006
    "[10:03] <dave_away> is there a way to upgrade \x0304directly\x03 from 12.04?",  # 1007 colour codes
    "[10:03] <helperbot> try !upgrade",  # 1008 nick ending in bot: dropped
    "[10:04] <carol> dave_away, yes: do-release-upgrade",  # 1009 addressed to dave_away
    "[10:04] <bob> bob: note to self, reboot later",  # 1010 addressed to himself: context
    "[10:05] -spam:#ubuntu- buy things",  # 1011 unparsable
    "[10:05] <carol> eve: welcome back",  # 1012 eve only spoke before line 1000
] + [f"=== guest{i} [~g@host.example]  has quit [Quit: bye]" for i in range(7)]  # 1013-1019

REPLIES = [(1001, 1002), (1002, 1005), (1007, 1009)]  # (A, B): B replies to A
ANNOTATIONS = [(i, i) for i in range(1000, 1020) if i not in (1002, 1005, 1009)] + REPLIES


def write_irc_log(folder: Path, name: str = "2020-01-01.train-a") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    early = [f"=== user{i} [~u@host.example]  has joined #ubuntu" for i in range(1000)]
    early[5] = "[09:00] <eve> hello all"
    lines = early + REGION
    assert len(lines) == 1020
    (folder / f"{name}.ascii.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / f"{name}.annotation.txt").write_text("".join(f"{a} {b} -\n" for a, b in ANNOTATIONS), encoding="utf-8")
    return folder


def test_irc_window_labels_and_cleaning(tmp_path: Path) -> None:
    convs, report = import_irc(write_irc_log(tmp_path / "train"), "train", seed=0)
    assert len(convs) == 1
    conv = convs[0]
    assert conv.id == "irc-train-2020-01-01.train-a-1001"
    rows = [(m.name, m.content, m.expect) for m in conv.messages]
    assert rows == [
        ("alice", "anyone know how to mount an iso?", None),
        ("bob", "alice: sudo mount -o loop file.iso /mnt", "silence"),
        ("carol", "*waves*", None),
        ("alice", "that worked, cheers", "silence"),
        ("dave_away", "is there a way to upgrade directly from 12.04?", None),
        ("carol", "dave_away, yes: do-release-upgrade", "silence"),
        ("bob", "bob: note to self, reboot later", None),
        ("carol", "eve: welcome back", "silence"),
    ]
    assert all(m.role == "user" for m in conv.messages)
    assert conv.bot_name in BOT_NAMES
    assert report.counts["bot_lines_dropped"] == 2
    assert report.counts["unparsable_lines"] == 1
    assert [s.expected for s in scored_messages(conv)] == ["silence"] * 4
    assert check_conversation(conv, authored=False) == []


def test_irc_is_reproducible_dedupes_and_skips(tmp_path: Path) -> None:
    src = write_irc_log(tmp_path / "train")
    first, _ = import_irc(src, "train", seed=3)
    again, _ = import_irc(src, "train", seed=3)
    assert [c.to_dict() for c in first] == [c.to_dict() for c in again]

    for suffix in ("ascii", "annotation"):  # the same log under another name: same content, dropped
        shutil.copy(src / f"2020-01-01.train-a.{suffix}.txt", src / f"2020-01-02.train-a.{suffix}.txt")
    convs, report = import_irc(src, "train", seed=0)
    assert len(convs) == 1 and report.counts["duplicates"] == 1

    shutil.rmtree(src)
    write_irc_log(src)
    (src / "2020-01-01.train-a.annotation.txt").write_text("")  # no reply links: the 3 addressed messages are left
    convs, _ = import_irc(src, "train", seed=0)
    assert sum(m.expect is not None for m in convs[0].messages) == 3
    lines = (src / "2020-01-01.train-a.ascii.txt").read_text().splitlines()
    lines[1012] = "[10:05] <carol> welcome back eve"
    (src / "2020-01-01.train-a.ascii.txt").write_text("\n".join(lines))
    convs, report = import_irc(src, "train", seed=0)  # two labels left: the window is skipped
    assert convs == [] and report.counts["windows_skipped_labels"] == 1


@pytest.mark.parametrize(
    ("text", "nick"),
    [("bob: hi", "bob"), ("stig_, unfortunately", "stig_"), ("@bob, hi", "bob"), ("http://example.com", None),
     ("ok, fine", None), ("no colon here", None)],
)  # fmt: skip
def test_addressed_nick(text: str, nick: str | None) -> None:
    assert addressed_nick(text) == nick


# ---------------------------------------------------------------------------- tool calls

CONVERT = {
    "name": "convert_units",
    "description": "Convert a quantity between units",
    "parameters": {
        "type": "object",
        "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"}},
        "required": ["value"],
    },
}
ARGS_AS_STRING = json.dumps({"value": 5, "from_unit": "mile"})
GLAIVE: list[dict[str, Any]] = [
    {
        "conversations": [
            {"from": "human", "value": "Hi, can you convert 5 miles to km?"},
            {"from": "function_call", "value": json.dumps({"name": "convert_units", "arguments": ARGS_AS_STRING})},
            {"from": "observation", "value": '{"result": 8.05}'},
            {"from": "gpt", "value": "5 miles is about 8.05 km."},
            {"from": "human", "value": "Thank you!"},
            {"from": "gpt", "value": "You're welcome! Anything else?"},
        ],
        "tools": json.dumps([CONVERT]),
    },
    {
        "conversations": [
            {"from": "human", "value": "What is the capital of France?"},
            {"from": "gpt", "value": "Paris."},
            {"from": "human", "value": "And what about Germany?"},
            {"from": "gpt", "value": "Berlin."},
        ],
        "tools": "[]",
    },
]


def write_glaive(tmp_path: Path, extra: list[Any] | None = None) -> Path:
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps(GLAIVE + (extra or [])), encoding="utf-8")
    return path


def _request_index(conv_messages: list, text: str) -> int:
    return next(i for i, m in enumerate(conv_messages) if m.role == "user" and m.content.endswith(text))


def test_toolcalls_group_chat(tmp_path: Path) -> None:
    train, dev, report = import_toolcalls(write_glaive(tmp_path), seed=0, dev_fraction=0.0)
    assert dev == [] and [c.id for c in train] == ["glaive-000", "glaive-001"]
    conv = train[0]
    bot, msgs = conv.bot_name, conv.messages
    assert bot in BOT_NAMES and conv.tools == [CONVERT]
    start = _request_index(msgs, "can you convert 5 miles to km?")
    request = msgs[start]
    assert request.content in (f"{bot}, hi, can you convert 5 miles to km?", f"@{bot} hi, can you convert 5 miles to km?",
                               f"hey {bot} hi, can you convert 5 miles to km?")  # fmt: skip
    assert 2 <= start <= 5 and all(m.role == "user" and m.name in PEOPLE for m in msgs[:start])
    people = {m.name for m in msgs if m.role == "user"}
    assert 2 <= len(people) <= 4 and request.name in people and bot not in people
    assert msgs[start + 1].tool_calls == [ToolCall("convert_units", {"value": 5, "from_unit": "mile"})]
    result = msgs[start + 2]
    assert (result.role, result.name, result.content) == ("tool", "convert_units", '{"result": 8.05}')
    assert msgs[start + 3].content == "5 miles is about 8.05 km."
    thanks = msgs[start + 4]
    assert (thanks.name, thanks.content) == (request.name, "Thank you!")  # kept, not addressed to the bot
    assert all(m.role == "user" for m in msgs[start + 4 :])  # the bot's "You're welcome" is gone
    assert not any("welcome!" in m.content for m in msgs)
    expected = {sm.index: sm.expected for sm in scored_messages(conv)}
    assert expected[start] == "respond" and expected[start + 4] == "silence"
    assert all(expected[i] == "silence" for i in range(start))

    second = train[1].messages
    follow_up = second[_request_index(second, "what about Germany?")]
    assert follow_up.content.endswith("and what about Germany?") and train[1].bot_name in follow_up.content
    assert all(check_conversation(c, authored=False) == [] for c in train)


def test_toolcalls_split_dedupe_and_unparsable(tmp_path: Path) -> None:
    src = write_glaive(tmp_path, extra=[GLAIVE[1], {"conversations": [], "tools": "not json"}, {"tools": "[]"}])
    train, dev, report = import_toolcalls(src, seed=0, dev_fraction=0.5)
    assert report.counts["duplicates"] == 1 and report.counts["unparsable"] == 2
    assert {c.id for c in dev} == {i for i in ("glaive-000", "glaive-001") if split_key(i) < 0.5}
    assert {c.id for c in train} | {c.id for c in dev} == {"glaive-000", "glaive-001"}
    train2, dev2, _ = import_toolcalls(src, seed=0, dev_fraction=0.5)
    assert [c.to_dict() for c in train + dev] == [c.to_dict() for c in train2 + dev2]
    other, _, _ = import_toolcalls(src, seed=1, dev_fraction=0.0)
    assert [c.to_dict() for c in other] != [c.to_dict() for c in train + dev]


def test_toolcalls_refuses_unreadable_files_with_a_reason(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 and JSON nested past the parser's depth are a one-line error, not a traceback;
    a record whose tools are nested too deeply is counted unparsable and the others are kept."""
    from model.errors import ChimeError

    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]')  # Latin-1
    with pytest.raises(ChimeError, match="cannot read .*utf-8"):
        import_toolcalls(latin1)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ChimeError, match="nested too deeply"):
        import_toolcalls(deep)
    src = write_glaive(tmp_path, extra=[{"conversations": GLAIVE[0]["conversations"], "tools": "[" * 100_000 + "]" * 100_000}])
    train, dev, report = import_toolcalls(src, seed=0, dev_fraction=0.0)
    assert report.counts["unparsable"] == 1 and len(train) == len(GLAIVE)


@pytest.mark.parametrize(
    ("text", "closing"),
    [("Thank you!", True), ("Great, thanks for the help!", True), ("Yes, it was Animal Farm. Thank you!", True),
     ("Perfect", True), ("Thank you, that's all I needed.", True),
     ("Thanks! Can you also convert 10 euros?", False), ("Great, thanks! Now, convert 1000 Euros back to USD", False),
     ("That's great! What if I want to leave a 20% tip instead?", False), ("How does blockchain work?", False)],
)  # fmt: skip
def test_is_pleasantry(text: str, closing: bool) -> None:
    assert is_pleasantry(text) is closing


def test_lower_first() -> None:
    assert lower_first("Can you help?") == "can you help?"
    assert lower_first("I need a recipe") == "I need a recipe"
    assert lower_first("I'm hungry") == "I'm hungry"
    assert lower_first("USA or UK?") == "USA or UK?"


# ---------------------------------------------------------------------------- recipe

RECIPE_LINES: list[Any] = [
    [
        {"role": "user", "content": "Alice: pizza tonight?"},
        {"role": "assistant", "content": "(silence)"},
        {"role": "user", "content": "Bob: Chime, is Luigi's open? It says: 10pm"},
        {"role": "assistant", "content": "(response) Until 10 tonight."},
        {"role": "user", "content": "no name here"},
        {"role": "assistant", "content": "(silence)"},
    ],
    {"id": "kept-id", "bot_name": "Pip", "messages": [{"role": "user", "name": "Dana", "content": "re: the trip"}]},
]


def write_recipe(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_recipe_conversion_exact(tmp_path: Path) -> None:
    convs, report = import_recipe(write_recipe(tmp_path / "recipe.jsonl", RECIPE_LINES), bot_name="Chime")
    assert [c.to_dict() for c in convs] == [
        {
            "id": "recipe-00001",
            "bot_name": "Chime",
            "messages": [
                {"role": "user", "name": "Alice", "content": "pizza tonight?"},
                {"role": "user", "name": "Bob", "content": "Chime, is Luigi's open? It says: 10pm"},
                {"role": "assistant", "content": "Until 10 tonight."},
                {"role": "user", "name": "user", "content": "no name here"},
            ],
        },
        {"id": "kept-id", "bot_name": "Pip", "messages": [{"role": "user", "name": "Dana", "content": "re: the trip"}]},
    ]
    assert [s.expected for s in scored_messages(convs[0])] == ["silence", "respond", "silence"]
    assert report.counts == {"duplicates": 0, "unparsable": 0}


def test_cli_import_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_recipe(tmp_path / "recipe.jsonl", RECIPE_LINES + [RECIPE_LINES[0], "not a conversation"])
    out = tmp_path / "out" / "recipe.jsonl"
    assert cli_main(["import", "recipe", str(src), "--out", str(out), "--bot-name", "Juno"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["source"], report["duplicates"], report["unparsable"]) == ("recipe", 1, 1)
    stats = report["outputs"][str(out)]
    assert (stats["conversations"], stats["respond"], stats["silence"]) == (2, 1, 3)
    convs = read_conversations(out)
    assert [c.id for c in convs] == ["recipe-00001", "kept-id"] and convs[0].bot_name == "Juno"
