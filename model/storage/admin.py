"""Consent, opt-out, forgetting, retention and corrections: the administrator's side of the database.

Every function takes an open session (the caller commits). The CLI (`chime consent|opt-out|forget|
label|decisions|db purge`) and, later, the Discord slash commands call these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from model.storage import models as m
from model.storage.db import StorageError
from model.storage.log import delete_message_row


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _find(session: Session, model: type[m.Server] | type[m.Person], who: str, platform: str | None, what: str,
          name_column) -> Any:  # noqa: ANN001 - a mapped column
    """One row by key ("discord:123"), platform id or current name (which must be unambiguous)."""
    q = select(model).where(or_(model.id == who, model.platform_id == who, func.lower(name_column) == who.lower()))
    if platform:
        q = q.where(model.platform == platform)
    found = session.scalars(q).all()
    if not found:
        raise StorageError(f"no {what} {who!r}" + (f" on {platform}" if platform else ""))
    if len(found) > 1:
        raise StorageError(f"{who!r} matches several: {', '.join(r.id for r in found)}; give the id or --platform")
    return found[0]


def find_server(session: Session, who: str, platform: str | None = None) -> m.Server:
    return _find(session, m.Server, who, platform, "server", m.Server.name)


def find_person(session: Session, who: str, platform: str | None = None) -> m.Person:
    return _find(session, m.Person, who, platform, "person", m.Person.display_name)


def set_training_consent(session: Session, server: m.Server, on: bool, by: str | None = None,
                         log_opted_out: bool | None = None) -> None:
    server.training_consent = on
    server.consent_changed_at = _now()
    server.consent_changed_by = by
    if log_opted_out is not None:
        server.log_opted_out = log_opted_out


def set_opt_out(session: Session, person: m.Person, opted_out: bool = True) -> None:
    """Opt a person out of training (their messages are never exported) or back in."""
    if not opted_out and person.forgotten_at is not None:
        raise StorageError(f"{person.id} was forgotten; they cannot be opted back in from here")
    person.opted_out = opted_out
    person.opted_out_at = _now() if opted_out else None


@dataclass
class ForgetReport:
    person: str
    messages: int
    bot_replies: int
    feedback: int


def forget(session: Session, person: m.Person) -> ForgetReport:
    """Delete a person's messages and everything derived from them (decisions, the bot's replies to them,
    tool calls, reactions on them), the reactions they gave, and their name. What is kept: a tombstone row
    (platform id, `forgotten_at`, opted out) so nothing of theirs is logged for training or exported again."""
    now = _now()
    messages = session.scalars(select(m.Message).where(m.Message.person_id == person.id)).all()
    replies = session.scalars(
        select(m.Reply.message_id)
        .join(m.Decision, m.Reply.decision_id == m.Decision.id)
        .join(m.Message, m.Decision.message_id == m.Message.id)
        .where(m.Message.person_id == person.id, m.Reply.message_id.is_not(None))
    ).all()
    for msg in messages:
        delete_message_row(session, msg, now)
    session.flush()
    n_feedback = session.execute(delete(m.Feedback).where(m.Feedback.person_id == person.id)).rowcount or 0
    person.display_name = None
    person.opted_out = True
    person.opted_out_at = person.opted_out_at or now
    person.forgotten_at = now
    return ForgetReport(person.id, len(messages), len(replies), n_feedback)


def purge_older_than(session: Session, days: float) -> int:
    """Retention: delete every message older than `days` days with what derives from it; returns the count."""
    cutoff = _now() - timedelta(days=days)
    old = session.scalars(select(m.Message).where(m.Message.created_at < cutoff)).all()
    for msg in old:
        session.delete(msg)
    return len(old)


def correct(session: Session, message_id: str, expect: str, text: str | None = None, by: str | None = None) -> m.Feedback:
    """An administrator's verdict on the decision after `message_id`: respond (optionally with a better
    reply) or silence. The latest correction wins over every other label rule."""
    if expect not in ("respond", "silence"):
        raise StorageError("a correction is 'respond' or 'silence'")
    msg = session.get(m.Message, message_id)
    if msg is None:
        matches = session.scalars(select(m.Message).where(m.Message.id.startswith(message_id))).all()
        if len(matches) != 1:
            raise StorageError(f"no single message with id {message_id!r}")
        msg = matches[0]
    if msg.author_kind != "human":
        raise StorageError("corrections are about the decision after a person's message; this one is the bot's")
    fb = m.Feedback(message_id=msg.id, person_id=None, kind="correction", value=expect, text=text or None,
                    source=by, created_at=_now())
    session.add(fb)
    return fb


def recent_decisions(session: Session, limit: int = 20, channel: str | None = None) -> list[tuple[m.Message, m.Decision, m.Reply | None]]:
    q = (
        select(m.Message, m.Decision, m.Reply)
        .join(m.Decision, m.Decision.message_id == m.Message.id)
        .outerjoin(m.Reply, m.Reply.decision_id == m.Decision.id)
        .order_by(m.Message.created_at.desc())
        .limit(limit)
    )
    if channel:
        q = q.where(or_(m.Message.channel_id == channel, m.Message.channel_id.endswith(":" + channel)))
    return [(a, b, c) for a, b, c in session.execute(q).all()]
