"""Consent, opt-out, forgetting, retention and corrections: the administrator's side of the database.

Every function takes an open session (the caller commits). The CLI (`chime consent|opt-out|forget|
label|decisions|db purge`) and the Discord bot's slash commands (`bot/discord_bot/admin.py`) call these; the bot's
per-server and per-channel settings live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from model.storage import models as m
from model.storage.db import StorageError
from model.storage.log import Ref, delete_message_row, ensure_channel, ensure_server, key


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


def latest_decided_message(session: Session, channel_key: str) -> m.Message | None:
    """The newest person's message in the channel (`"<platform>:<platform id>"`) that the bot decided on:
    what an administrator's "teach" in that channel corrects."""
    return session.scalars(
        select(m.Message)
        .join(m.Decision, m.Decision.message_id == m.Message.id)
        .where(m.Message.channel_id == channel_key)
        .order_by(m.Message.created_at.desc())
        .limit(1)
    ).first()


def last_logged_message(session: Session, channel_key: str) -> m.Message | None:
    """The newest message stored for the channel (a person's or the bot's): where a backfill starts."""
    return session.scalars(
        select(m.Message).where(m.Message.channel_id == channel_key).order_by(m.Message.created_at.desc()).limit(1)
    ).first()


def bot_settings(session: Session, platform: str) -> tuple[list[m.ServerSettings], list[m.ChannelSettings]]:
    """Every server's and channel's settings on `platform`, for a bot to cache at start-up."""
    prefix = key(platform, "")
    servers = session.scalars(select(m.ServerSettings).where(m.ServerSettings.server_id.startswith(prefix))).all()
    channels = session.scalars(select(m.ChannelSettings).where(m.ChannelSettings.channel_id.startswith(prefix))).all()
    return list(servers), list(channels)


def set_server_settings(session: Session, platform: str, server_ref: Ref, by: str | None = None,
                        reply_to_bots: bool | None = None) -> m.ServerSettings:
    """Create or change a server's bot settings; fields left None keep their value."""
    srv = ensure_server(session, platform, server_ref)
    row = session.get(m.ServerSettings, srv.id)
    if row is None:
        row = m.ServerSettings(server_id=srv.id, reply_to_bots=False)
        session.add(row)
    if reply_to_bots is not None:
        row.reply_to_bots = reply_to_bots
    row.updated_at = _now()
    row.updated_by = by
    session.flush()
    return row


_UNSET: Any = object()


def set_channel_settings(session: Session, platform: str, server_ref: Ref, channel_ref: Ref, by: str | None = None,
                         enabled: bool | None = None, threshold: float | None = _UNSET,
                         bot_name: str | None = None) -> m.ChannelSettings:
    """Create or change a channel's bot settings. `enabled` None keeps it; `threshold` None goes back to the
    engine's, left out keeps it. Enabling records `enabled_at` (a backfill never reaches further back)."""
    if threshold is not _UNSET and threshold is not None and not 0.0 <= threshold <= 1.0:
        raise StorageError(f"a threshold is between 0 and 1, got {threshold}")
    srv = ensure_server(session, platform, server_ref)
    channel = ensure_channel(session, platform, srv.id, channel_ref, bot_name)
    row = session.get(m.ChannelSettings, channel.id)
    if row is None:
        row = m.ChannelSettings(channel_id=channel.id, enabled=False)
        session.add(row)
    now = _now()
    if enabled is not None:
        if enabled and not row.enabled:
            row.enabled_at = now
        row.enabled = enabled
    if threshold is not _UNSET:
        row.threshold = threshold
    row.updated_at = now
    row.updated_by = by
    session.flush()
    return row
