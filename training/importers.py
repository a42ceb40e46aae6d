"""Importers: real data sets into the shared conversation format (../shared/CONVERSATIONS.md).

    chime import irc --src ../shared/data/irc/train --out conversations/imported/irc_train.jsonl [--max-conversations N]
    chime import toolcalls --src ../shared/data/toolcalls/glaive_toolcall_en_demo.json \
        --out-train conversations/imported/toolcalls_train.jsonl --out-dev conversations/imported/toolcalls_dev.jsonl
    chime import recipe FILE --out OUT [--bot-name Chime]

- `irc`: windows of real #ubuntu chat; messages addressed to another person (`nick: ...`) or annotated as
  replies to someone else carry `"expect": "silence"`, the rest is unscored context.
- `toolcalls`: Glaive tool-use dialogues (ShareGPT layout) set inside a group chat: people chat among
  themselves, then one of them addresses the bot; thank-you messages after an answer stay unanswered.
- `recipe`: the original recipe's bare lists (`"Name: text"`, `(silence)`, `(response) ...`) to the object shape.

Every import is reproducible (seeded random choices, sorted file order), drops content duplicates with
`training.corpus.dedupe` and prints a JSON report: counts by label per output file, and what was dropped.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.conversation import Conversation, Message, ToolCall, conversation_from_json, write_conversations
from model.errors import ChimeError
from training.corpus import check_conversation, dedupe, split_key, stats

# Bot names for imported conversations (none of them is in PEOPLE).
BOT_NAMES = [
    "Chime", "Pip", "Juno", "Otto", "Sage", "Nova", "Echo", "Milo", "Ivy", "Bolt",
    "Pixel", "Remy", "Luna", "Wren", "Orbit", "Kit", "Ziggy", "Atlas", "Bea", "Cosmo",
]  # fmt: skip

# Display names for the people in synthetic group chats: many cultures, a few handles.
PEOPLE = [
    "Aisha", "Mateo", "Priya", "Kenji", "Olga", "Tomás", "Fatima", "Liam", "Chen Wei", "Nkechi",
    "Sofia", "Dmitri", "Amara", "Yuki", "Rahul", "Ingrid", "Kwame", "Leila", "Diego", "Mei",
    "Oluwaseun", "Hana", "Ana Lucía", "Björn", "Zainab", "Arjun", "Chiara", "Tariq", "Emeka", "Siobhan",
    "Thandiwe", "Jae-won", "Nadia", "Pedro", "Astrid", "Ravi", "Camille", "Youssef", "Marisol", "Anh",
    "Kofi", "Elif", "Sven", "Noor", "Tomasz", "Aroha", "Ximena", "Ibrahim", "Rosa", "Mariam",
    "jess", "dave_k", "pixelpanda", "nightowl_22", "Dr. Okafor", "mo 🎧", "k8lyn", "zer0cool", "sunny🌻", "Gran Ruth",
]  # fmt: skip

# Chit-chat a bot should stay out of: greetings, plans, reactions, jokes, remarks to each other.
# `{other}` becomes another person in the chat.
CHITCHAT = [
    "morning all", "hey hey", "evening folks ☕", "hi everyone", "yo", "back from lunch",
    "ugh, mondays", "finally friday!!", "ok I'm here now", "sorry, was stuck in a meeting",
    "brb, door", "back", "lol", "haha same", "😂😂", "omg", "nice!", "love that",
    "that's hilarious", "no way", "wait what", "fair enough", "true true", "agreed",
    "ok ok", "noted 👍", "same here honestly", "I'm so tired today", "need more coffee",
    "it's pouring here", "the sun is finally out", "my cat just knocked my mug over",
    "just burnt my toast again", "traffic was a nightmare this morning", "I'm starving",
    "finished my run, feeling great", "the new season dropped last night", "I have so many tabs open rn",
    "my plant is actually alive, proud of myself", "weekend can't come soon enough",
    "{other} did you get home ok?", "{other} how was the concert?", "{other} you still up for saturday?",
    "{other} happy birthday!! 🎉", "{other} congrats on the new job!", "{other} lol you're the worst",
    "{other} send me the photos later", "{other} I owe you one", "{other} call me when you're free",
    "{other} did you finish that book?", "{other} you coming to the thing tonight?",
    "{other} haha told you so", "{other} thanks for last night, that was fun",
    "{other} tell your mum I said hi", "{other} are you bringing the board games?",
    "{other} good luck today!", "{other} how's the new flat?", "{other} miss you already",
    "{other} I'll be 10 min late, sorry", "{other} save me a seat",
    "{other} did the package arrive?", "{other} your turn to pick the movie",
    "{other}: yes, 7 works for me", "{other}: nah, I'm busy then", "{other}, you're a genius",
    "{other}, stop spamming memes 😅", "{other}, can you grab milk on the way?",
    "@{other} check your DMs", "@{other} welcome back!", "@{other} lol exactly",
    "anyone want to grab dinner later?", "who's in for bowling on sunday?",
    "let's do pizza friday", "I vote tacos", "count me in", "I'm out this week, sorry",
    "see you all tomorrow", "gotta run, bye!", "night night 🌙", "ttyl",
    "just got the tickets 🎟️", "we should plan a trip this summer", "road trip?? 👀",
    "I'm making lasagna tonight", "the gym was packed today", "my code finally compiles lol",
    "so proud of our team today", "can't believe it's already december",
    "this week has been a lot", "what a game last night", "I'm never eating that much again",
    "ok that meme is gold", "my phone is at 2%", "honestly best day in a while",
]  # fmt: skip

_THANKS = re.compile(r"\b(thanks?|thank you|thx|ty|cheers|appreciated?|that's all|that is all|bye|goodbye)\b", re.I)
_CLOSER = re.compile(
    r"^\W*(ok(ay)?|great|perfect|awesome|cool|nice|got it|alright|sounds good|wonderful|excellent)\b", re.I
)
_REQUEST = re.compile(
    r"\?|\b(can|could|would|will) you\b|\b(now|also|another|what|how|why|when|where|which|who|please|tell me|"
    r"help me|let's|i (also )?(need|want)|i'd like|i would like|instead)\b",
    re.I,
)


@dataclass
class Report:
    """What an import did: kept conversations per output file and what was dropped."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # why records were unparsable (the first few are reported)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, **dict(sorted(self.counts.items()))}
        if self.problems:
            out["unparsable_examples"] = self.problems[:5]
        out["outputs"] = self.outputs
        return out


def clean_text(text: str) -> str:
    """Drop IRC colour codes and control characters; tabs become spaces."""
    text = re.sub(r"\x03\d{0,2}(,\d{1,2})?", "", text.replace("\t", " "))
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cc").strip()


# ---------------------------------------------------------------------------- IRC


@dataclass(frozen=True)
class IrcLine:
    line: int  # 0-based line number in the ascii file (what the annotations refer to)
    nick: str
    text: str


_STAMP = re.compile(r"^\[\d{1,2}:\d{2}(?::\d{2})?\] ?(.*)$")
_SAY = re.compile(r"^<[@+]?([^>\s]+)>\s?(.*)$")
_ACT = re.compile(r"^\s*\*\s+(\S+)\s*(.*)$")
_NOTICE_NICK = re.compile(r"^=== (\S+) (?:\[|is now known as (\S+))")
_ADDRESS = re.compile(r"^\s*@?([^\s:,]+)\s*[:,](?!//)")  # not `http://...`
# Words that open a sentence as often as somebody's nick does (`ok, ...`, `well, ...`): never an address.
_NOT_ADDRESS = set(
    "ok okay k no nope yes yeah yep ya sure right well oh ohh ah ahh hm hmm um er so hi hey hello sorry but and or "
    "also anyway thanks thank thx lol wow ugh nah now then edit note btw ps what why how true maybe actually".split()
)


def is_channel_bot(nick: str) -> bool:
    low = nick.lower()
    return bool(re.fullmatch(r"ubot(u|tu|\d+)", low)) or low.endswith("bot")


def parse_irc_log(lines: Sequence[str]) -> tuple[list[IrcLine], set[str], list[int]]:
    """Messages and actions of a log (timestamps stripped), every nick seen in it, and the unparsable lines."""
    said: list[IrcLine] = []
    nicks: set[str] = set()
    unparsable: list[int] = []
    for i, raw in enumerate(lines):
        if raw.startswith("==="):
            m = _NOTICE_NICK.match(raw)
            if m:
                nicks.update(n for n in m.groups() if n)
            continue
        stamp = _STAMP.match(raw)
        body = stamp.group(1) if stamp else ""
        say, act = _SAY.match(body), _ACT.match(body)
        if say:
            nick, text = say.group(1), clean_text(say.group(2))
        elif act:
            nick, text = act.group(1), clean_text(act.group(2))
            text = f"*{text}*" if text else ""
        else:
            if raw.strip():
                unparsable.append(i)
            continue
        nicks.add(nick)
        if text:
            said.append(IrcLine(i, nick, text))
    return said, nicks, unparsable


def read_annotations(path: Path) -> dict[int, list[int]]:
    """`A B -` lines: message B replies to A. Returns B -> [A, ...]."""
    parents: dict[int, list[int]] = {}
    for row in path.read_text(encoding="utf-8").splitlines():
        parts = row.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            parents.setdefault(int(parts[1]), []).append(int(parts[0]))
    return parents


def addressed_nick(text: str) -> str | None:
    """The nick a message starts with (`nick: ...`, `nick, ...`), if any."""
    m = _ADDRESS.match(text)
    return m.group(1) if m and m.group(1).lower() not in _NOT_ADDRESS else None


def _pick_bot_name(rng: random.Random, taken: set[str], text: str) -> str:
    """A bot name that is nobody's nick and that the window's text never mentions."""
    low = text.lower()
    free = [n for n in BOT_NAMES if n.lower() not in taken and not re.search(rf"\b{n.lower()}\b", low)]
    return rng.choice(free or BOT_NAMES)


def import_irc_log(
    ascii_path: Path, split: str, seed: int, report: Report, first_line: int = 1000
) -> list[Conversation]:
    """Cut one annotated log into labelled windows of 8-16 messages."""
    logname = ascii_path.name.removesuffix(".ascii.txt")
    lines = ascii_path.read_text(encoding="utf-8", errors="replace").splitlines()
    said, nicks, unparsable = parse_irc_log(lines)
    report.add("unparsable_lines", sum(i >= first_line for i in unparsable))
    ann_path = ascii_path.with_name(f"{logname}.annotation.txt")
    parents = read_annotations(ann_path) if ann_path.is_file() else {}
    speaker = {s.line: s.nick for s in said}
    for i, raw in enumerate(lines):  # old logs write some actions as `=== nick does x`: their author still counts
        if raw.startswith("=== ") and len(raw.split()) > 1:
            speaker.setdefault(i, raw.split()[1])
    nicks_low = {n.lower() for n in nicks}

    def silent(s: IrcLine) -> bool:
        target = addressed_nick(s.text)
        if target and target.lower() in nicks_low and target.lower() != s.nick.lower():
            return True
        return any(
            a != s.line and a in speaker and speaker[a].lower() != s.nick.lower() for a in parents.get(s.line, [])
        )

    region = [s for s in said if s.line >= first_line]
    bot_lines = [s for s in region if is_channel_bot(s.nick)]
    report.add("bot_lines_dropped", len(bot_lines))
    region = [s for s in region if not is_channel_bot(s.nick)]
    rng = random.Random(f"{seed}:{split}:{logname}")
    out: list[Conversation] = []
    pos = 0
    while pos < len(region):
        size = rng.randint(8, 16)
        window, pos = region[pos : pos + size], pos + size
        report.add("windows")
        if len(window) < 8:
            report.add("windows_skipped_short")
            continue
        if not 2 <= len({s.nick for s in window}) <= 6:
            report.add("windows_skipped_speakers")
            continue
        messages = [Message("user", s.text, name=s.nick, expect="silence" if silent(s) else None) for s in window]
        if sum(m.expect is not None for m in messages) < 3:
            report.add("windows_skipped_labels")
            continue
        bot_name = _pick_bot_name(rng, nicks_low, " ".join(s.text for s in window))
        out.append(Conversation(messages, bot_name=bot_name, id=f"irc-{split}-{logname}-{window[0].line}"))
    return out


def import_irc(
    src: Path, split: str, seed: int = 0, max_conversations: int | None = None
) -> tuple[list[Conversation], Report]:
    """All logs of one split folder, in sorted file order."""
    logs = sorted(src.glob("*.ascii.txt"))
    if not logs:
        raise ChimeError(f"no *.ascii.txt logs in {src}")
    report = Report("irc", {"logs": len(logs), "duplicates": 0, "unparsable_lines": 0})
    convs: list[Conversation] = []
    for path in logs:
        convs.extend(import_irc_log(path, split, seed, report))
    convs, dropped = dedupe(convs)
    report.add("duplicates", dropped)
    if max_conversations is not None and len(convs) > max_conversations:
        keep = sorted(random.Random(seed).sample(range(len(convs)), max_conversations))
        report.add("capped", len(convs) - max_conversations)
        convs = [convs[i] for i in keep]
    return convs, report


# ---------------------------------------------------------------------------- tool calls (Glaive, ShareGPT layout)


def parse_tool_call(value: str) -> ToolCall:
    """`{"name": ..., "arguments": {...} or "<JSON string>"}` from a function_call turn."""
    raw = json.loads(value)
    if not isinstance(raw, dict):
        raise ValueError(f"a function call must be an object: {value[:80]!r}")
    args = raw.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(raw.get("name"), str) or not raw["name"] or not isinstance(args, dict):
        raise ValueError(f"bad function call: {value[:80]!r}")
    return ToolCall(raw["name"], args)


def sharegpt_messages(record: dict[str, Any]) -> tuple[list[Message], list[dict[str, Any]]]:
    """A ShareGPT record as messages (humans still unnamed) and bare tool schemas; raises ValueError if malformed."""
    tools = record.get("tools") or []
    tools = json.loads(tools) if isinstance(tools, str) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise ValueError("tools must be a list of schemas with a name")
    messages: list[Message] = []
    last_call: str | None = None
    for turn in record["conversations"]:
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise ValueError("a turn's value must be a string")
        if role == "human":
            messages.append(Message("user", value.strip(), name=""))
        elif role == "gpt":
            messages.append(Message("assistant", value.strip()))
        elif role == "function_call":
            call = parse_tool_call(value)
            messages.append(Message("assistant", tool_calls=[call]))
            last_call = call.name
        elif role == "observation":
            if last_call is None:
                raise ValueError("an observation without a function call")
            messages.append(Message("tool", value.strip(), name=last_call))
        else:
            raise ValueError(f"unknown turn {role!r}")
    if not messages or messages[0].role != "user":
        raise ValueError("a record must start with a human turn")
    return messages, tools


def is_pleasantry(text: str) -> bool:
    """A short closing message (`Thanks!`, `Great, that's all`) that asks for nothing new."""
    if len(text) > 120 or _REQUEST.search(text):
        return False
    return bool(_THANKS.search(text)) or (len(text.split()) <= 4 and bool(_CLOSER.match(text)))


def lower_first(text: str) -> str:
    """Lowercase the first letter, unless the first word is `I` (`I'm`, ...) or an acronym."""
    word = re.match(r"[A-Za-z]+", text)
    if not word or word.group() == "I" or sum(ch.isupper() for ch in word.group()) > 1:
        return text
    return text[0].lower() + text[1:]


def address(text: str, bot: str, rng: random.Random) -> str:
    prefix = rng.choice([f"{bot}, ", f"@{bot} ", f"hey {bot} "])
    return prefix + lower_first(text)


def _chitchat(rng: random.Random, speakers: list[str], people: list[str], pool: list[str]) -> list[Message]:
    out = []
    for name in speakers:
        line = pool.pop(rng.randrange(len(pool)))
        other = rng.choice([p for p in people if p != name])
        out.append(Message("user", line.format(other=other), name=name))
    return out


def group_chat(messages: list[Message], tools: list[dict[str, Any]], cid: str, rng: random.Random) -> Conversation:
    """Set a one-to-one tool dialogue inside a group chat where one person addresses the bot."""
    bot = "Chime" if rng.random() < 0.5 else rng.choice(BOT_NAMES[1:])
    people = rng.sample(PEOPLE, rng.randint(2, 4))
    requester = people[0]
    n_before = rng.randint(max(2, len(people) - 1), 5)
    speakers = people[1:] + [rng.choice(people) for _ in range(n_before - len(people) + 1)]
    rng.shuffle(speakers)
    pool = list(CHITCHAT)
    out = _chitchat(rng, speakers, people, pool)
    skip_reply = False
    for i, msg in enumerate(messages):
        if msg.role == "user":
            nxt = messages[i + 1] if i + 1 < len(messages) else None
            answered = i > 0 and messages[i - 1].role == "assistant"
            skip_reply = answered and (nxt is None or not nxt.tool_calls) and is_pleasantry(msg.content)
            content = msg.content if skip_reply else address(msg.content, bot, rng)
            out.append(Message("user", content, name=requester))
        elif skip_reply and msg.role == "assistant":
            skip_reply = False  # the bot does not answer a thank-you
        else:
            out.append(msg)
    out.extend(_chitchat(rng, [rng.choice(people) for _ in range(rng.randint(0, 2))], people, pool))
    return Conversation(out, bot_name=bot, tools=tools, id=cid)


def import_toolcalls(
    src: Path, seed: int = 0, dev_fraction: float = 0.15
) -> tuple[list[Conversation], list[Conversation], Report]:
    """Glaive records as group chats, split into (train, dev) by the hash of their id."""
    try:
        records = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError (bytes that are not UTF-8)
        raise ChimeError(f"cannot read {src}: {e}") from e
    except RecursionError:
        raise ChimeError(f"cannot read {src}: JSON nested too deeply") from None
    if not isinstance(records, list):
        raise ChimeError(f"{src}: expected a JSON list of records")
    report = Report("toolcalls", {"records": len(records), "duplicates": 0, "unparsable": 0, "invalid": 0})
    bare: list[Conversation] = []
    for index, record in enumerate(records):
        try:
            messages, tools = sharegpt_messages(record)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # JSONDecodeError is a ValueError
            report.add("unparsable")
            report.problems.append(f"record {index}: {type(e).__name__}: {e}")
            continue
        bare.append(Conversation(messages, tools=tools, id=f"glaive-{index:03d}"))
    bare, dropped = dedupe(bare)  # before names and chit-chat are added, which would make every copy unique
    report.add("duplicates", dropped)
    train: list[Conversation] = []
    dev: list[Conversation] = []
    for conv in bare:
        assert conv.id is not None
        chat = group_chat(conv.messages, conv.tools, conv.id, random.Random(f"{seed}:{conv.id}"))
        if check_conversation(chat, authored=False):
            report.add("invalid")
            continue
        (dev if split_key(conv.id) < dev_fraction else train).append(chat)
    return train, dev, report


# ---------------------------------------------------------------------------- the original recipe's format


def recipe_conversation(raw: Any, default_id: str, bot_name: str) -> Conversation:
    """One line of a recipe file (bare list or object shape) in the object shape."""
    obj = {"messages": raw} if isinstance(raw, list) else dict(raw)
    messages: list[dict[str, Any]] = []
    for msg in obj.get("messages") or []:
        msg = dict(msg)
        content = msg.get("content") or ""
        if msg.get("role") == "user" and msg.get("name") is None:
            name, sep, text = content.partition(": ")
            msg["name"], msg["content"] = (
                (name.strip(), text.strip()) if sep and name.strip() else ("user", content.strip())
            )
        elif msg.get("role") == "assistant":
            stripped = content.strip()
            if stripped == "(silence)" and not msg.get("tool_calls"):
                continue  # silence is implicit: a human message not followed by the bot
            if stripped.startswith("(response)"):
                msg["content"] = stripped.removeprefix("(response)").strip()
        messages.append(msg)
    obj["messages"] = messages
    obj.setdefault("id", default_id)
    obj.setdefault("bot_name", bot_name)
    return conversation_from_json(obj, default_id)


def import_recipe(src: Path, bot_name: str = "Chime") -> tuple[list[Conversation], Report]:
    if not src.is_file():
        raise ChimeError(f"recipe file not found: {src}")
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChimeError(f"{src}: not UTF-8 text: {e}") from e
    report = Report("recipe", {"duplicates": 0, "unparsable": 0})
    convs: list[Conversation] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            convs.append(recipe_conversation(json.loads(line), f"recipe-{lineno:05d}", bot_name))
        except (ValueError, TypeError, AttributeError, RecursionError, ChimeError) as e:  # bad JSON or a malformed message
            report.add("unparsable")
            report.problems.append(f"line {lineno}: {type(e).__name__}: {e}")
    convs, dropped = dedupe(convs)
    report.add("duplicates", dropped)
    return convs, report


# ---------------------------------------------------------------------------- CLI


def _write(report: Report, path: str, convs: list[Conversation]) -> None:
    write_conversations(path, convs)
    report.outputs[path] = stats(convs).to_dict()


def cmd_import(args: argparse.Namespace) -> int:
    if args.source == "irc":
        src = Path(args.src)
        convs, report = import_irc(src, args.split or src.name, args.seed, args.max_conversations)
        _write(report, args.out, convs)
    elif args.source == "toolcalls":
        train, dev, report = import_toolcalls(Path(args.src), args.seed, args.dev_fraction)
        _write(report, args.out_train, train)
        _write(report, args.out_dev, dev)
    else:
        convs, report = import_recipe(Path(args.file), args.bot_name)
        _write(report, args.out, convs)
    print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    return 0


def add_import_command(sub: argparse._SubParsersAction) -> None:
    """Register `chime import irc|toolcalls|recipe`."""
    p = sub.add_parser("import", help="convert real data sets into the shared conversation format")
    kinds = p.add_subparsers(dest="source", required=True)

    k = kinds.add_parser("irc", help="#ubuntu IRC logs with reply annotations (../shared/data/irc)")
    k.add_argument("--src", required=True, help="a split folder of NAME.ascii.txt / NAME.annotation.txt pairs")
    k.add_argument("--out", required=True)
    k.add_argument("--split", help="split name for the ids (default: the --src folder's name)")
    k.add_argument("--max-conversations", type=int, help="keep a seeded sample of at most N windows")
    k.add_argument("--seed", type=int, default=0)

    k = kinds.add_parser("toolcalls", help="Glaive tool-use dialogues in the ShareGPT layout, as group chats")
    k.add_argument("--src", required=True, help="a JSON list of {conversations, tools} records")
    k.add_argument("--out-train", required=True)
    k.add_argument("--out-dev", required=True)
    k.add_argument("--dev-fraction", type=float, default=0.15)
    k.add_argument("--seed", type=int, default=0)

    k = kinds.add_parser("recipe", help="the original recipe's lists of 'Name: text' / (silence) / (response) turns")
    k.add_argument("file")
    k.add_argument("--out", required=True)
    k.add_argument("--bot-name", default="Chime", help="bot name for conversations that do not name one")

    p.set_defaults(func=cmd_import)
