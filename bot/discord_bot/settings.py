"""Per-server and per-channel settings of the Discord bot: kept in the database, cached in memory.

The message path reads the cache and never waits on the database; the slash commands write through
(`set_channel`, `set_server`, run off the event loop) and update the cache. Rows live in the
`server_settings` and `channel_settings` tables (model/storage/models.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from model.storage import models as m
from model.storage.admin import bot_settings, set_channel_settings, set_server_settings
from model.storage.log import Ref

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ChannelPrefs:
    enabled: bool
    threshold: float | None = None  # None: the engine's
    enabled_at: datetime | None = None  # a backfill never reads back further than this


@dataclass(frozen=True)
class ServerPrefs:
    reply_to_bots: bool = False  # answer (and log) other bots' and webhooks' messages too


def _platform_id(row_key: str) -> str:
    return row_key.split(":", 1)[1]


def _channel_prefs(row: m.ChannelSettings) -> ChannelPrefs:
    return ChannelPrefs(enabled=row.enabled, threshold=row.threshold, enabled_at=row.enabled_at)


class Settings:
    """The bot's settings by platform id (servers and channels), read once and written through."""

    def __init__(self, sessions: sessionmaker[Session], platform: str, enabled_by_default: bool = False):
        self._sessions = sessions
        self.platform = platform
        self.enabled_by_default = enabled_by_default
        self._servers: dict[str, ServerPrefs] = {}
        self._channels: dict[str, ChannelPrefs] = {}
        self._lock = threading.Lock()  # written from worker threads, read from the event loop
        self.loaded = False

    def transaction(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one committed transaction (blocking: call it in a worker thread)."""
        with self._sessions() as session, session.begin():
            return work(session)

    def load(self) -> None:
        """Read every server's and channel's settings (blocking)."""
        def read(session: Session) -> tuple[dict[str, ServerPrefs], dict[str, ChannelPrefs]]:
            servers, channels = bot_settings(session, self.platform)
            return ({_platform_id(s.server_id): ServerPrefs(s.reply_to_bots) for s in servers},
                    {_platform_id(c.channel_id): _channel_prefs(c) for c in channels})

        servers, channels = self.transaction(read)
        with self._lock:
            self._servers, self._channels = servers, channels
            self.loaded = True
        log.info("discord settings: %d servers, %d channels (%d enabled)", len(servers), len(channels),
                 sum(c.enabled for c in channels.values()))

    # ---------------------------------------------------------------- reading (event loop, never blocks)

    def channel(self, channel_id: int | str) -> ChannelPrefs:
        with self._lock:
            prefs = self._channels.get(str(channel_id))
        return prefs if prefs is not None else ChannelPrefs(enabled=self.enabled_by_default)

    def server(self, guild_id: int | str) -> ServerPrefs:
        with self._lock:
            return self._servers.get(str(guild_id), ServerPrefs())

    def enabled_channel_ids(self) -> list[int]:
        """Channels explicitly enabled (with `enabled_by_default`, every channel not disabled listens too)."""
        with self._lock:
            return [int(cid) for cid, prefs in self._channels.items() if prefs.enabled]

    # ---------------------------------------------------------------- writing (blocking: worker threads)

    def set_channel(self, server: Ref, channel: Ref, by: str | None, bot_name: str | None = None,
                    **changes: Any) -> ChannelPrefs:
        """Change a channel's settings (`enabled=`, `threshold=`; see `set_channel_settings`)."""
        prefs = self.transaction(lambda s: _channel_prefs(
            set_channel_settings(s, self.platform, server, channel, by=by, bot_name=bot_name, **changes)))
        with self._lock:
            self._channels[channel.platform_id] = prefs
        return prefs

    def set_server(self, server: Ref, by: str | None, reply_to_bots: bool) -> ServerPrefs:
        prefs = self.transaction(lambda s: ServerPrefs(
            set_server_settings(s, self.platform, server, by=by, reply_to_bots=reply_to_bots).reply_to_bots))
        with self._lock:
            self._servers[server.platform_id] = prefs
        return prefs
