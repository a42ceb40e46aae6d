"""`chime export`: consented, labelled conversations from the database, in the shared conversation format.

    chime export [--since 2026-11-01] --out conversations/logged/nov.jsonl [--no-weak-silence]

What is exported:

- only channels of servers whose administrator turned training consent on (the simulator's local
  server has it on);
- never a message of someone who opted out or was forgotten, nor the bot's reply to it;
- each channel's timeline cut into conversations at pauses longer than `gap_minutes` (and at
  `max_messages`), and only conversations with at least one label (training/labels.py);
- labelled messages carry `"expect"`: only they are trained and scored, the rest is context. A message
  labelled silence has the bot's actual reply removed; a respond label is followed by the reply to
  train (the bot's own, a correction's, or for a missed response the reply the bot gave when asked
  again);
- names pseudonymised consistently within one export (a fresh random mapping per export): display
  names, and their occurrences and Discord mentions (`<@id>`) in the text. The bot keeps its name.

Conversation ids are stable (`logged-` + a hash of the channel and first message), so `training.corpus.
split_key` gives every logged conversation a fixed side: ids below the dev fraction are the held-out
slice `chime retrain` evaluates on and never trains on.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from model.conversation import Conversation, Message, ToolCall, write_conversations
from model.engine import names_bot
from model.storage import models as m
from model.storage.log import DECIDED
from training.labels import Event, Label, LabelRules, derive_labels

PSEUDONYMS = (
    "Avery Blake Casey Dana Eden Finley Gray Harper Indigo Jules Kai Lane Morgan Noor Oakley Parker Quinn Reese Sage "
    "Tatum Umber Val Wren Xen Yael Zion Ash Bay Cedar Drew Ellis Fern Glen Hollis Ira Jory Kit Lark Marlo Nico Onyx "
    "Perry Rowan Shay Tali Uri Vesper Winter Yuri Zuri Arden Briar Cove Dale Emery Flynn Gale Haven Isle Joss Kendall "
    "Linden Merritt Nova Ocean Pax Remy Sky Teagan Vale Wynn"
).split()


@dataclass
class ExportReport:
    path: str
    conversations: int = 0
    messages: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # by rule
    expect: dict[str, int] = field(default_factory=dict)  # respond / silence
    skipped_channels_no_consent: int = 0
    excluded_messages_opted_out: int = 0
    heldout_conversations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Pseudonyms:
    """A per-export mapping person -> made-up name, applied to names and to the text."""

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)
        self._pool = list(PSEUDONYMS)
        self._rng.shuffle(self._pool)
        self._by_person: dict[str, str] = {}
        self._real: dict[str, str] = {}  # lowercase real name -> pseudonym
        self._platform_ids: dict[str, str] = {}

    def name(self, person: m.Person) -> str:
        if person.id not in self._by_person:
            n = len(self._by_person)
            base = self._pool[n % len(self._pool)]
            self._by_person[person.id] = base if n < len(self._pool) else f"{base}{n // len(self._pool) + 1}"
            if person.display_name:
                self._real[person.display_name.lower()] = self._by_person[person.id]
            self._platform_ids[person.platform_id] = self._by_person[person.id]
        return self._by_person[person.id]

    def text(self, text: str, bot_name: str) -> str:
        text = re.sub(r"<@!?(\d+)>", lambda mt: "@" + self._platform_ids.get(mt.group(1), "someone"), text)
        names = sorted((n for n in self._real if len(n) >= 3 and n != bot_name.lower()), key=len, reverse=True)
        if not names:
            return text
        pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(n) for n in names) + r")(?!\w)", re.IGNORECASE)
        return pattern.sub(lambda mt: self._real[mt.group(1).lower()], text)


def _conv_id(channel_id: str, first_message: str) -> str:
    return "logged-" + hashlib.sha256(f"{channel_id}|{first_message}".encode()).hexdigest()[:16]


def export(
    session: Session,
    out: str | Path,
    since: datetime | None = None,
    rules: LabelRules | None = None,
    gap_minutes: float = 30.0,
    max_messages: int = 60,
    seed: int | None = None,
    bot_name_default: str = "Chime",
    record: bool = True,
) -> ExportReport:
    """Write the consented, labelled conversations to `out` (JSONL); returns what was written."""
    rules = rules or LabelRules()
    report = ExportReport(path=str(out))
    pseudo = Pseudonyms(seed)
    conversations: list[Conversation] = []
    from training.corpus import DEV_FRACTION, split_key

    for channel, server in session.execute(select(m.Channel, m.Server).join(m.Server, m.Channel.server_id == m.Server.id)).all():
        if not server.training_consent:
            report.skipped_channels_no_consent += 1
            continue
        bot_name = channel.bot_name or bot_name_default
        timeline = _timeline(session, channel, bot_name, report)
        labels = {lab.index: lab for lab in derive_labels([t.event for t in timeline], rules)}
        by_id = {it.message.id: it for it in timeline}
        for segment in _segments(timeline, gap_minutes, max_messages):
            if since is not None and _aware(timeline[segment[0]].message.created_at) < since:
                continue
            seg_labels = [labels[i] for i in segment if i in labels]
            if not seg_labels:
                continue
            conv = _conversation(timeline, by_id, segment, labels, pseudo, bot_name, channel.id)
            conversations.append(conv)
            report.conversations += 1
            report.heldout_conversations += split_key(conv.id or "") < DEV_FRACTION
            report.messages += len(conv.messages)
            for lab in seg_labels:
                report.labels[lab.rule] = report.labels.get(lab.rule, 0) + 1
                report.expect[lab.expect] = report.expect.get(lab.expect, 0) + 1
    write_conversations(out, conversations)
    if record:
        session.add(m.Export(path=str(out), since=since, until=datetime.now(timezone.utc),
                             conversations=report.conversations, labelled=sum(report.expect.values())))
    return report


@dataclass
class _Item:
    message: m.Message
    event: Event
    person: m.Person | None
    tool_calls: list[m.ToolCallRecord] = field(default_factory=list)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _timeline(session: Session, channel: m.Channel, bot_name: str, report: ExportReport) -> list[_Item]:
    rows = session.scalars(
        select(m.Message).where(m.Message.channel_id == channel.id).order_by(m.Message.created_at, m.Message.id)
    ).all()
    ids = [r.id for r in rows]
    people = {p.id: p for p in session.scalars(select(m.Person).where(m.Person.id.in_({r.person_id for r in rows if r.person_id})))}
    decisions = {d.message_id: d for d in session.scalars(select(m.Decision).where(m.Decision.message_id.in_(ids)))}
    replies = {r.decision_id: r for r in session.scalars(select(m.Reply).where(m.Reply.decision_id.in_([d.id for d in decisions.values()])))}
    calls: dict[str, list[m.ToolCallRecord]] = {}
    for c in session.scalars(select(m.ToolCallRecord).where(m.ToolCallRecord.decision_id.in_([d.id for d in decisions.values()]))
                             .order_by(m.ToolCallRecord.position)):
        calls.setdefault(c.decision_id, []).append(c)
    feedback = session.scalars(select(m.Feedback).where(m.Feedback.message_id.in_(ids)).order_by(m.Feedback.created_at)).all()
    reactions: dict[str, list[str]] = {}
    corrections: dict[str, tuple[str, str | None]] = {}
    for fb in feedback:
        if fb.kind == "reaction" and fb.removed_at is None:
            reactions.setdefault(fb.message_id, []).append(fb.value)
        elif fb.kind == "correction":
            corrections[fb.message_id] = (fb.value, fb.text)  # ordered by time: the latest wins

    excluded: set[str] = set()  # messages of opted-out people, and the bot's replies to them
    items: list[_Item] = []
    for r in rows:
        person = people.get(r.person_id) if r.person_id else None
        if person is not None and (person.opted_out or person.forgotten_at is not None):
            report.excluded_messages_opted_out += 1
            d = decisions.get(r.id)
            rep = replies.get(d.id) if d else None
            if rep is not None and rep.message_id:
                excluded.add(rep.message_id)
            continue
        if r.id in excluded:
            continue
        d = decisions.get(r.id)
        rep = replies.get(d.id) if d else None
        ev = Event(
            id=r.id, kind=r.author_kind, person=r.person_id, text=r.content, at=_aware(r.created_at),
            addressed=r.addressed, names_bot=names_bot(r.content, bot_name), reply_to=r.reply_to_id,
            decision=d.decision if d and d.decision in DECIDED else None, reply_message=rep.message_id if rep else None,
            reply_text=rep.text if rep else None, deleted=r.deleted_at is not None,
            reactions=tuple(reactions.get(r.id, ())), correction=corrections.get(r.id),
        )
        items.append(_Item(r, ev, person, calls.get(d.id, []) if d else []))
    return items


def _segments(timeline: Sequence[_Item], gap_minutes: float, max_messages: int) -> list[list[int]]:
    """Indices of the timeline's people's messages, cut at pauses and at `max_messages`."""
    segments: list[list[int]] = []
    last: datetime | None = None
    for i, it in enumerate(timeline):
        if it.event.kind != "human":
            continue
        at = it.event.at
        if not segments or (last is not None and at - last > timedelta(minutes=gap_minutes)) or len(segments[-1]) >= max_messages:  # type: ignore[operator]
            segments.append([])
        segments[-1].append(i)
        last = at  # type: ignore[assignment]
    return segments


def _conversation(timeline: Sequence[_Item], by_id: dict[str, _Item], segment: Sequence[int], labels: dict[int, Label],
                  pseudo: Pseudonyms, bot_name: str, channel_id: str) -> Conversation:
    messages: list[Message] = []
    for i in segment:
        it = timeline[i]
        lab = labels.get(i)
        assert it.person is not None
        messages.append(Message(role="user", name=pseudo.name(it.person), content=pseudo.text(it.message.content, bot_name),
                                expect=lab.expect if lab else None))
        ev = it.event
        if lab is not None and lab.drop_reply:
            continue
        if lab is not None and lab.reply_text is not None:
            messages.append(Message(role="assistant", content=pseudo.text(lab.reply_text, bot_name)))
            continue
        if ev.decision != "respond" or ev.reply_text is None:
            continue
        posted = by_id.get(ev.reply_message or "")
        if posted is not None and posted.event.deleted:
            continue
        executed = [c for c in it.tool_calls if c.ok is not None]
        if executed:
            messages.append(Message(role="assistant", tool_calls=[ToolCall(c.name, dict(c.arguments)) for c in executed]))
            messages.extend(Message(role="tool", name=c.name, content=c.result or "") for c in executed)
        messages.append(Message(role="assistant", content=pseudo.text(ev.reply_text, bot_name)))
    first = timeline[segment[0]].message.id
    return Conversation(messages=messages, bot_name=bot_name, id=_conv_id(channel_id, first))
