"""The training corpus: checks, statistics, deduplication and the train/dev split.

`chime data check FILE...` lints conversation files against the corpus rules (structure, sizes,
tool-call sequences) and `chime data stats FILE...` reports counts by source and label. The authored
conversations live in `conversations/train/` and `conversations/dev/`; the dev split is fixed by
`split_key` (a hash of the conversation id), so no training run ever sees a dev conversation.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.conversation import Conversation, read_conversations, scored_messages
from model.tools import ToolError, builtin_tools, validate_against_schema

# The built-in tools as the corpus calls them: the schemas the engine derives from their functions.
BUILTIN_TOOLS: list[dict] = [t.schema() for t in builtin_tools()]
MIN_HUMAN, MAX_HUMAN = 6, 20
MIN_PEOPLE, MAX_PEOPLE = 2, 6


@dataclass
class CheckResult:
    path: str
    conversations: int = 0
    problems: list[str] = field(default_factory=list)


def check_conversation(conv: Conversation, authored: bool = True) -> list[str]:
    """Structural problems of one conversation (empty when it is fine)."""
    where = conv.id or "?"
    problems: list[str] = []
    msgs = conv.messages
    humans = [m for m in msgs if m.is_human]
    people = {m.name for m in humans}
    if authored:
        if not MIN_HUMAN <= len(humans) <= MAX_HUMAN:
            problems.append(f"{where}: {len(humans)} human messages (want {MIN_HUMAN}-{MAX_HUMAN})")
        if not MIN_PEOPLE <= len(people) <= MAX_PEOPLE:
            problems.append(f"{where}: {len(people)} people (want {MIN_PEOPLE}-{MAX_PEOPLE})")
        if not conv.id:
            problems.append("a conversation without an id")
    if msgs and msgs[0].role != "user":
        problems.append(f"{where}: must start with a human message")
    pending_calls = 0
    for i, m in enumerate(msgs):
        prev = msgs[i - 1] if i else None
        if m.role == "user":
            if pending_calls:
                problems.append(f"{where}[{i}]: a human message before the tool results")
            if not m.name or not m.content.strip():
                problems.append(f"{where}[{i}]: a human message needs a name and text")
        elif m.role == "assistant":
            if prev is None or prev.role == "assistant":
                problems.append(f"{where}[{i}]: a bot message must follow a human message or a tool result")
            if pending_calls:
                problems.append(f"{where}[{i}]: a bot message before all tool results arrived")
            if m.tool_calls:
                pending_calls = len(m.tool_calls)
            elif not m.content.strip():
                problems.append(f"{where}[{i}]: an empty bot message")
        elif m.role == "tool":
            if not pending_calls:
                problems.append(f"{where}[{i}]: a tool result without a call")
            else:
                pending_calls -= 1
                if pending_calls == 0 and (i + 1 >= len(msgs) or msgs[i + 1].role != "assistant"):
                    problems.append(f"{where}[{i}]: tool results must be followed by the bot's answer")
    if pending_calls:
        problems.append(f"{where}: unanswered tool calls at the end")
    schemas = {t.get("name"): t for t in (conv.tools or BUILTIN_TOOLS)}
    for m in msgs:
        for call in m.tool_calls:
            schema = schemas.get(call.name)
            if schema is None:
                problems.append(f"{where}: calls unknown tool {call.name!r}")
                continue
            try:
                validate_against_schema(call.name, schema, call.arguments)
            except ToolError as e:
                problems.append(f"{where}: a call does not fit its schema: {e}")
    return problems


def check_files(paths: Sequence[str | Path], authored: bool = True) -> list[CheckResult]:
    results = []
    seen: dict[str, str] = {}
    for path in paths:
        res = CheckResult(str(path))
        try:
            convs = read_conversations(path)
        except Exception as e:  # a file that does not parse is one problem, reported
            res.problems.append(f"{path}: {e}")
            results.append(res)
            continue
        res.conversations = len(convs)
        for conv in convs:
            res.problems.extend(check_conversation(conv, authored=authored))
            if conv.id:
                if conv.id in seen:
                    res.problems.append(f"{conv.id}: duplicate id (also in {seen[conv.id]})")
                seen[conv.id] = str(path)
        results.append(res)
    return results


def content_key(conv: Conversation) -> str:
    """A hash of what the model sees, for deduplication (ids and bot names ignored)."""
    payload = [(m.role, (m.name or "").lower(), " ".join(m.content.lower().split()), [c.to_dict() for c in m.tool_calls]) for m in conv.messages]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def dedupe(convs: Iterable[Conversation]) -> tuple[list[Conversation], int]:
    """Drop conversations whose content repeats an earlier one; returns (kept, dropped)."""
    seen: set[str] = set()
    kept: list[Conversation] = []
    dropped = 0
    for conv in convs:
        key = content_key(conv)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(conv)
    return kept, dropped


DEV_FRACTION = 0.2


def split_file(path: str | Path, root: str | Path = "conversations", dev_fraction: float = DEV_FRACTION) -> dict[str, int]:
    """Write each line of `path` to ROOT/dev/NAME or ROOT/train/NAME by `split_key` of its id (lines kept verbatim)."""
    out: dict[str, list[str]] = {"train": [], "dev": []}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        conv_id = json.loads(line).get("id")
        if not conv_id:
            raise ValueError(f"{path}:{i + 1}: a conversation without an id cannot be split")
        out["dev" if split_key(conv_id) < dev_fraction else "train"].append(line)
    for part, lines in out.items():
        target = Path(root) / part / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {part: len(lines) for part, lines in out.items()}


def split_key(conv_id: str) -> float:
    """A stable number in [0, 1) from the id: the dev split is every id below the dev fraction."""
    return int(hashlib.sha256(conv_id.encode()).hexdigest()[:8], 16) / 2**32


@dataclass
class Stats:
    conversations: int = 0
    human: int = 0
    respond: int = 0
    silence: int = 0
    tool_call_turns: int = 0
    people: Counter = field(default_factory=Counter)
    bot_names: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "conversations": self.conversations,
            "human_messages": self.human,
            "respond": self.respond,
            "silence": self.silence,
            "respond_share": round(self.respond / max(1, self.respond + self.silence), 3),
            "tool_call_turns": self.tool_call_turns,
            "bot_names": len(self.bot_names),
            "bot_name_not_chime_share": round(1 - self.bot_names.get("Chime", 0) / max(1, self.conversations), 3),
            "people_per_conversation": dict(sorted(self.people.items())),
        }


def stats(convs: Iterable[Conversation]) -> Stats:
    s = Stats()
    for conv in convs:
        s.conversations += 1
        s.bot_names[conv.bot_name or "Chime"] += 1
        s.people[len({m.name for m in conv.messages if m.is_human})] += 1
        s.human += sum(1 for m in conv.messages if m.is_human)
        for sm in scored_messages(conv):
            if sm.expected == "respond":
                s.respond += 1
                if sm.expected_tool_calls:
                    s.tool_call_turns += 1
            else:
                s.silence += 1
    return s


def add_arguments(ap: Any) -> None:
    """The arguments of `chime data` (and `python -m training.corpus`)."""
    ap.add_argument("action", choices=["check", "stats", "split"])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--imported", action="store_true", help="skip the authored-corpus size rules")
    ap.add_argument("--dev-fraction", type=float, default=DEV_FRACTION, help="split: share of ids that go to dev")
    ap.add_argument("--root", default="conversations", help="split: writes ROOT/train/NAME and ROOT/dev/NAME")


def run(args: Any) -> int:
    """check: lint (exit 1 on problems); stats: counts by label per file; split: train/dev by id."""
    if args.action == "split":
        for path in args.files:
            counts = split_file(path, args.root, args.dev_fraction)
            print(json.dumps({"file": str(path), **counts}))
        return 0
    if args.action == "check":
        bad = 0
        for res in check_files(args.files, authored=not args.imported):
            print(f"{res.path}: {res.conversations} conversations, {len(res.problems)} problems")
            for p in res.problems:
                print("  " + p)
            bad += len(res.problems)
        return 1 if bad else 0
    per_file = {}
    for path in args.files:
        per_file[str(path)] = stats(read_conversations(path)).to_dict()
    print(json.dumps(per_file, indent=1, ensure_ascii=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.corpus check|stats|split FILE...` (the same as `chime data ...`)."""
    import argparse

    ap = argparse.ArgumentParser(prog="chime data")
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
