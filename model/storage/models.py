"""The tables (SQLAlchemy 2.0 declarative). Migrations in `migrations/versions` must match these.

Keys: servers, channels and people are keyed by `"<platform>:<platform id>"`, so a writer can refer to
them without a round trip; messages, decisions, replies, tool calls and feedback by UUIDs made by the
writer, so a buffered batch can be retried after an outage without duplicating anything.

Consent lives on `servers.training_consent` (off until an administrator turns it on; on for the local
simulator) and `people.opted_out`; `servers.log_opted_out` says whether opted-out people's messages may
still be kept for moderation (never exported). See docs/memory.md and SECURITY.md.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


class Server(Base):
    """A Discord guild, or the simulator's local "server"."""

    __tablename__ = "servers"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # "<platform>:<platform id>"
    platform: Mapped[str] = mapped_column(String(32))
    platform_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str | None] = mapped_column(String(200))
    training_consent: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_changed_at: Mapped[datetime | None]
    consent_changed_by: Mapped[str | None] = mapped_column(String(160))
    log_opted_out: Mapped[bool] = mapped_column(Boolean, default=False)  # keep opted-out people's messages for moderation
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Channel(Base):
    __tablename__ = "channels"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    server_id: Mapped[str] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"), index=True)
    platform_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str | None] = mapped_column(String(200))
    bot_name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Person(Base):
    __tablename__ = "people"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_id: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str | None] = mapped_column(String(200))
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    opted_out_at: Mapped[datetime | None]
    forgotten_at: Mapped[datetime | None]  # `chime forget`: their rows were deleted; never logged or exported again
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Message(Base):
    """A message in a channel: a person's (author_kind "human") or the bot's own reply ("bot")."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("channel_id", "platform_message_id", name="uq_messages_channel_platform_message"),
        Index("ix_messages_channel_created", "channel_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    person_id: Mapped[str | None] = mapped_column(ForeignKey("people.id", ondelete="CASCADE"), index=True)
    author_kind: Mapped[str] = mapped_column(String(8))  # human | bot
    platform_message_id: Mapped[str | None] = mapped_column(String(128))
    display_name: Mapped[str] = mapped_column(String(200))
    content: Mapped[str] = mapped_column(Text)
    addressed: Mapped[bool] = mapped_column(Boolean, default=False)  # the platform reported an @mention or a reply to the bot
    reply_to_id: Mapped[str | None] = mapped_column(String(32))  # messages.id it replies to, when known
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    edited_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]  # only bot replies are kept after deletion (a label); people's are removed


class Decision(Base):
    """What the engine decided after a human message."""

    __tablename__ = "decisions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    # respond | silence; or, with no P(respond), what the engine did not decide: skipped (seen as context
    # when a newer message of the channel was decided instead), dropped, timeout, error
    decision: Mapped[str] = mapped_column(String(8))
    p_respond: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    addressed: Mapped[bool] = mapped_column(Boolean, default=False)
    adapter_version: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200))
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reply(Base):
    __tablename__ = "replies"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    decision_id: Mapped[str] = mapped_column(ForeignKey("decisions.id", ondelete="CASCADE"), unique=True)
    message_id: Mapped[str | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), index=True)  # the bot's posted message
    text: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reply_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ToolCallRecord(Base):
    __tablename__ = "tool_calls"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    decision_id: Mapped[str] = mapped_column(ForeignKey("decisions.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    arguments: Mapped[dict[str, Any]]
    ok: Mapped[bool | None] = mapped_column(Boolean)  # None: the call was not executed
    result: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Feedback(Base):
    """A reaction to a message, or an administrator's correction of a decision (see training/labels.py)."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_message", "message_id"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    person_id: Mapped[str | None] = mapped_column(ForeignKey("people.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # reaction | correction
    value: Mapped[str] = mapped_column(String(64))  # the emoji, or respond | silence
    text: Mapped[str | None] = mapped_column(Text)  # a correction's better reply
    source: Mapped[str | None] = mapped_column(String(200))  # who made a correction (e.g. "cli:alice")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[datetime | None]  # the reaction was taken back


class AdapterRecord(Base):
    """An adapter version the retraining loop produced or served, with its status."""

    __tablename__ = "adapter_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # candidate | promoted | rejected | failed
    recipe: Mapped[str | None] = mapped_column(String(200))
    data_hash: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]


class Evaluation(Base):
    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_name: Mapped[str] = mapped_column(String(200), index=True)
    dataset: Mapped[str] = mapped_column(String(64))  # dev | logged-heldout
    n_messages: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Export(Base):
    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime | None]
    until: Mapped[datetime]
    conversations: Mapped[int] = mapped_column(Integer)
    labelled: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServerSettings(Base):
    """A platform bot's settings for one server (Discord: set with `/chime ...` slash commands)."""

    __tablename__ = "server_settings"
    server_id: Mapped[str] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"), primary_key=True)
    reply_to_bots: Mapped[bool] = mapped_column(Boolean, default=False)  # other bots' and webhooks' messages too
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(160))  # who changed them last (e.g. "discord:123")


class ChannelSettings(Base):
    """A platform bot's settings for one channel: whether it listens there, and its talkativeness."""

    __tablename__ = "channel_settings"
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    enabled_at: Mapped[datetime | None]  # when it was last enabled: backfill never reaches further back
    threshold: Mapped[float | None] = mapped_column(Float)  # None: the engine's (the adapter's calibrated one)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(160))
