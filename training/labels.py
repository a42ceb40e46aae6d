"""Training labels from what happened after each decision (the rules; docs/labels.md explains them).

For every person's message the bot decided on, in order of strength:

1. **Correction.** An administrator's verdict (`chime label MESSAGE respond|silence [--reply TEXT]`)
   wins over everything below. The latest correction counts.
2. **The bot spoke** (its reply R):
   - *should have stayed silent* when R was deleted, got a negative reaction (👎 😠 🙄 🤫 …, not taken
     back), or was followed, within the follow-up window, by "stop" / "not you" / "nobody asked" /
     "shut up" / … that is aimed at the bot (it names or @mentions the bot, replies to R, or is the
     very next message after R);
   - otherwise a *good response* when R got a positive reaction (👍 ❤️ 😂 🎉 …) or a follow-up in the
     window is addressed to the bot (names or @mentions it, or replies to R);
   - otherwise unlabelled (kept as context).
   Negative evidence wins over positive: a bot that annoys one person in a group is the costly error.
3. **The bot stayed silent:**
   - *missed response* when, within the window and before saying anything else, the same person
     addresses the bot by name or @mention with the same request ("asked again": at least
     `reask_overlap` of the first message's words recur). The reply the bot then gave becomes the reply to the first message;
     without one the message stays context.
   - *weak silence* when the group carried on for at least `min_carry_on` more messages in the window
     and nobody addressed the bot. Silence is the common, cheap outcome and most silences are right,
     but nobody confirmed this one, so only these "the chat went on fine" silences are used, and
     `chime export --no-weak-silence` drops them.
   - otherwise unlabelled (context): e.g. the last message before a pause, where nothing shows
     whether a reply was wanted.

The follow-up window is the next `window_messages` messages from people, within `window_minutes`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

NEGATIVE_REACTIONS = frozenset(
    "👎 😠 😡 🙄 🤫 🤐 ❌ 🚫 🛑 😒 🙅 🙅‍♀️ 🙅‍♂️ 💩 -1 thumbsdown".split()
)
POSITIVE_REACTIONS = frozenset(
    "👍 ❤️ ❤ 😂 🤣 🎉 ✅ 🙏 💯 🔥 😄 😀 🥰 👏 ⭐ 🌟 +1 thumbsup heart".split()
)
STOP_RE = re.compile(
    r"\b(stop( it)?|not you|nobody asked|no one asked|didn'?t ask you|shut up|be quiet|go away|quiet,? bot|"
    r"(i was|we were|wasn'?t|weren'?t) (not )?talking to (you|the bot)|not talking to you|mind your own)\b",
    re.IGNORECASE,
)


def _normalize_emoji(e: str) -> str:
    return e.replace("\ufe0f", "").strip()


_NEGATIVE = frozenset(_normalize_emoji(x) for x in NEGATIVE_REACTIONS)
_POSITIVE = frozenset(_normalize_emoji(x) for x in POSITIVE_REACTIONS)


def reaction_sign(emoji: str) -> int:
    """+1 positive, -1 negative, 0 neither."""
    e = _normalize_emoji(emoji)
    if e in _NEGATIVE:
        return -1
    return 1 if e in _POSITIVE else 0


@dataclass
class Event:
    """One message of a channel's timeline, with what the label rules need (built by the exporter)."""

    id: str
    kind: str  # human | bot
    person: str | None
    text: str
    at: object  # datetime
    addressed: bool = False  # @mention or platform reply to the bot, as the platform reported it
    names_bot: bool = False
    reply_to: str | None = None  # message id it replies to
    decision: str | None = None  # human messages: respond | silence
    reply_message: str | None = None  # id of the bot's posted reply, when it spoke
    reply_text: str | None = None
    deleted: bool = False  # bot messages: deleted on the platform
    reactions: tuple[str, ...] = ()  # emoji, not taken back
    correction: tuple[str, str | None] | None = None  # (respond|silence, reply text)


@dataclass
class Label:
    index: int  # position of the human message in the timeline
    expect: str  # respond | silence
    rule: str  # correction | negative | positive | missed | weak-silence
    reply_text: str | None = None  # the reply to train for "respond" (None: the bot's own reply)
    drop_reply: bool = False  # the bot's actual reply must not appear after this message


@dataclass
class LabelRules:
    window_messages: int = 3
    window_minutes: float = 10.0
    min_carry_on: int = 2
    reask_overlap: float = 0.3
    weak_silence: bool = True


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) >= 2}


def same_request(first: str, again: str, rules: LabelRules) -> bool:
    """Does `again` repeat `first`? At least `reask_overlap` of the first message's words recur."""
    a = _words(first)
    return bool(a) and len(a & _words(again)) / len(a) >= rules.reask_overlap


def derive_labels(events: Sequence[Event], rules: LabelRules | None = None) -> list[Label]:
    rules = rules or LabelRules()
    by_id = {e.id: i for i, e in enumerate(events)}
    labels: list[Label] = []
    for i, ev in enumerate(events):
        if ev.kind != "human" or ev.decision is None:
            continue
        if ev.correction is not None:
            expect, text = ev.correction
            if expect == "silence":
                labels.append(Label(i, "silence", "correction", drop_reply=True))
            elif text or (ev.decision == "respond" and ev.reply_text):
                labels.append(Label(i, "respond", "correction", reply_text=text or None))
            continue
        window = _window(events, i, rules)
        if ev.decision == "respond":
            label = _after_reply(events, i, window, by_id)
        else:
            label = _after_silence(events, i, window, rules)
        if label is not None:
            labels.append(label)
    return labels


def _window(events: Sequence[Event], i: int, rules: LabelRules) -> list[int]:
    """Indices of the people's messages after message i that fall in its follow-up window."""
    start = events[i].at
    out = []
    for j in range(i + 1, len(events)):
        e = events[j]
        if e.kind != "human":
            continue
        if e.at - start > timedelta(minutes=rules.window_minutes) or len(out) >= rules.window_messages:  # type: ignore[operator]
            break
        out.append(j)
    return out


def _after_reply(events: Sequence[Event], i: int, window: list[int], by_id: dict[str, int]) -> Label | None:
    ev = events[i]
    reply = events[by_id[ev.reply_message]] if ev.reply_message in by_id else None
    signs = [reaction_sign(r) for r in (reply.reactions if reply else ())]
    negative = (reply is not None and reply.deleted) or -1 in signs
    positive = 1 in signs
    for n, j in enumerate(window):
        f = events[j]
        aimed = f.addressed or f.names_bot or (reply is not None and f.reply_to == reply.id) or n == 0
        if STOP_RE.search(f.text) and aimed:
            negative = True
        elif f.addressed or f.names_bot or (reply is not None and f.reply_to == reply.id):
            positive = True
    if negative:
        return Label(i, "silence", "negative", drop_reply=True)
    if positive:
        return Label(i, "respond", "positive")
    return None


def _after_silence(events: Sequence[Event], i: int, window: list[int], rules: LabelRules) -> Label | None:
    ev = events[i]
    for j in window:
        f = events[j]
        if f.person == ev.person and not (f.addressed or f.names_bot):
            break  # they said something else first: a re-ask further on is about that, not this message
        if f.person == ev.person and (f.addressed or f.names_bot):
            if f.decision == "respond" and f.reply_text and not STOP_RE.search(f.text) and same_request(ev.text, f.text, rules):
                return Label(i, "respond", "missed", reply_text=f.reply_text)
            return None
    if any(events[j].addressed or events[j].names_bot for j in window):
        return None  # someone turned to the bot: not a clear "carry on"
    if rules.weak_silence and len(window) >= rules.min_carry_on:
        return Label(i, "silence", "weak-silence")
    return None
