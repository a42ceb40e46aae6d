"""`chime discord`: Chime as a Discord bot that decides after every message to stay silent or answer.

    export DISCORD_TOKEN=...                  # the bot's token: only ever from the environment
    chime discord [--db URL] [--bot-config discord.yaml] [--replies-per-user N] [engine flags: --threshold, ...]

Then, in a channel of your server, someone with Manage Channels types `/chime enable`.

Setting up the Discord application (once), at https://discord.com/developers/applications:

1. New Application → **Bot** → Reset Token; put it in `DISCORD_TOKEN` (never in YAML, flags or the database).
2. **Bot → Privileged Gateway Intents**: turn on **Message Content Intent** (Chime has to read what people
   say) and **Server Members Intent** (display names of the people who react or are mentioned). Without
   them Discord refuses the connection and `chime discord` stops with a message saying so. (A bot in 100 or
   more servers needs Discord's approval for these intents.)
3. **OAuth2 → URL Generator**: scopes `bot` and `applications.commands`; permissions View Channels, Send
   Messages, Send Messages in Threads, Read Message History and Add Reactions. Open the URL to invite it.

What the bot does (details in `client.py`, `chat.py`, `admin.py`):

- **Channels are off until `/chime enable`** (Manage Channels): a bot that starts logging and talking in
  every channel the moment it joins would surprise people. Threads follow their parent channel.
  `enabled_by_default: true` (a private server) makes every readable channel listen until `/chime disable`.
- **Every message in an enabled channel goes to the engine** (one at a time, in a worker thread, so the
  gateway heartbeat never waits on the model). When messages come faster than the model decides, each
  channel's waiting messages are taken together: the newest is decided, the older ones are read as context
  and logged as `skipped` (`model/dispatch.py`); an engine call that takes longer than
  `decision_timeout_s` leaves the bot silent and is logged as `timeout`. An @mention of the bot or a reply to one of its messages is
  *addressed* and always answered. Answers are Discord replies, split at 2,000 characters, and never ping
  anyone. The bot ignores itself, other bots and webhooks unless `/chime bots on`.
- **Talkativeness** per channel: `/chime talkativeness T` answers when P(respond) ≥ T (lower is chattier);
  without T the channel goes back to the engine's (the adapter's calibrated) threshold.
- **Rate limits**: at most `replies_per_user` replies to one person per `reply_window_minutes` (default 10 per
  10 minutes); past it their messages are context only, and an addressed one gets a ⏳ reaction. Tool calls
  have the engine's per-person budget (`tool_calls_per_user_per_hour`), keyed by the Discord user id.
- **Logging and consent** (docs/memory.md): messages, decisions (with the adapter version), the bot's replies,
  edits, deletions and reactions on its messages go to the database as platform "discord". Training on them
  needs `/chime consent on` (administrators). Anyone can `/chime optout`, `/chime optin`, `/chime forget-me`.
- **Sharding**: `--shards auto|N` runs discord.py's AutoShardedBot; `--shards N --shard-ids 0,1` runs only
  those shards in this process, so one bot spreads over processes that share the database.
- **Backfill**: after a fresh gateway session (not a resume) each enabled channel is read back from its last
  logged message; the missed messages are logged and given to the engine as context, never answered.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

from model.errors import ChimeError, ConfigError

log = logging.getLogger(__name__)

PLATFORM = "discord"
TOKEN_ENV = "DISCORD_TOKEN"


@dataclass
class DiscordConfig:
    """How the Discord bot behaves (the engine has its own `EngineConfig`)."""

    # Channels
    enabled_by_default: bool = False  # listen in every channel the bot can read until `/chime disable`
    backfill_limit: int = 200  # messages per channel read back after a fresh gateway session
    # Rate limits
    replies_per_user: int = 10  # replies to one person per window; 0: no limit
    reply_window_minutes: float = 10.0
    # Load: messages waiting per channel while the engine is busy (past it the oldest leave the engine's
    # context; they stay logged), and how long one engine call may take before the bot gives up on it.
    max_pending_per_channel: int = 20
    decision_timeout_s: float = 60.0
    # Slash commands
    sync_commands: bool = True  # publish the /chime commands to Discord at start-up
    sync_guild: int | None = None  # publish them to this one server only (instant; for development)
    # Sharding (discord.py's AutoShardedBot): "auto" lets Discord choose the shard count; a number fixes it.
    # With `shard_ids`, this process runs only those shards: split one bot over several processes that
    # share the database (each with the full shard count and its own ids).
    shards: str | None = None  # None: one gateway connection (fine below ~2,500 servers) | "auto" | "N"
    shard_ids: list[int] | None = None

    def validate(self) -> None:
        if self.shards is not None and self.shards != "auto" and not (self.shards.isdigit() and int(self.shards) > 0):
            raise ConfigError(f"shards must be 'auto' or a positive number, got {self.shards!r}")
        if self.shard_ids is not None:
            if self.shards is None or not self.shards.isdigit():
                raise ConfigError("shard_ids needs a fixed shard count (shards: N): every process must agree on it")
            if not self.shard_ids or any(not 0 <= i < int(self.shards) for i in self.shard_ids):
                raise ConfigError(f"shard_ids must be between 0 and {int(self.shards) - 1}, got {self.shard_ids}")
        if self.backfill_limit < 0:
            raise ConfigError(f"backfill_limit must be >= 0, got {self.backfill_limit}")
        if self.replies_per_user < 0:
            raise ConfigError(f"replies_per_user must be >= 0 (0: no limit), got {self.replies_per_user}")
        if self.reply_window_minutes <= 0:
            raise ConfigError(f"reply_window_minutes must be positive, got {self.reply_window_minutes}")
        if self.max_pending_per_channel < 1:
            raise ConfigError(f"max_pending_per_channel must be >= 1, got {self.max_pending_per_channel}")
        if self.decision_timeout_s <= 0:
            raise ConfigError(f"decision_timeout_s must be positive, got {self.decision_timeout_s}")


def add_arguments(sub: Any) -> None:
    """The `chime discord` subcommand (`sub` is the CLI's subparsers)."""
    from bot.cli import _add_engine_args

    p = sub.add_parser("discord", help=f"run Chime as a Discord bot (token from ${TOKEN_ENV})")
    p.add_argument("--db", help="database URL (default: $DATABASE_URL, else sqlite in $CHIME_HOME)")
    p.add_argument("--bot-config", help="YAML file of Discord bot settings (DiscordConfig fields)")
    p.add_argument("--replies-per-user", type=int, help="replies to one person per window (0: no limit; default 10)")
    p.add_argument("--reply-window-minutes", type=float, help="the rate limit's window (default 10)")
    p.add_argument("--enabled-by-default", action="store_true", default=None,
                   help="listen in every readable channel until /chime disable (default: only after /chime enable)")
    p.add_argument("--decision-timeout", type=float, dest="decision_timeout_s",
                   help="seconds one engine call may take before the bot stays silent on it (default 60)")
    p.add_argument("--backfill-limit", type=int, help="messages per channel read back after reconnecting (default 200)")
    p.add_argument("--no-sync-commands", action="store_true", help="do not publish the /chime slash commands")
    p.add_argument("--sync-guild", type=int, help="publish the slash commands to this server only (instant)")
    p.add_argument("--shards", help="shard the gateway connection (AutoShardedBot): 'auto' or a shard count")
    p.add_argument("--shard-ids", help="run only these shards in this process, e.g. 0,1 (with --shards N)")
    _add_engine_args(p)
    p.set_defaults(func=run)


def _bot_config(args: argparse.Namespace) -> DiscordConfig:
    from model.config import load_config

    return load_config(DiscordConfig, args.bot_config, {
        "replies_per_user": args.replies_per_user,
        "reply_window_minutes": args.reply_window_minutes,
        "enabled_by_default": args.enabled_by_default,
        "backfill_limit": args.backfill_limit,
        "decision_timeout_s": args.decision_timeout_s,
        "sync_commands": False if args.no_sync_commands else None,
        "sync_guild": args.sync_guild,
        "shards": args.shards,
        "shard_ids": [int(i) for i in args.shard_ids.split(",")] if args.shard_ids else None,
    })


def run(args: argparse.Namespace) -> int:
    """`chime discord`: load the engine, open the database and serve until interrupted."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"{TOKEN_ENV} is not set: put the bot's token (Developer Portal → Bot → Reset Token) in the "
                          "environment; it is never read from a file or a flag")
    bot_config = _bot_config(args)

    import asyncio

    import discord

    from bot.cli import _engine_config, _serving_registry
    from bot.discord_bot.client import make_bot
    from model.adapter_registry import AdapterWatcher
    from model.engine import Engine
    from model.storage.db import make_engine, sessions
    from model.storage.log import ChatLog

    config = _engine_config(args)
    registry = _serving_registry(args, config)
    engine = Engine.from_config(config)
    chat_log = ChatLog(args.db, platform=PLATFORM)  # migrates the database (or keeps trying while it is down)
    db = make_engine(chat_log.url)
    watcher = AdapterWatcher(engine, registry) if registry is not None else None
    bot = make_bot(engine, chat_log, sessions(db), bot_config, watcher=watcher)

    async def serve() -> None:
        async with bot:
            await bot.start(token)

    try:
        asyncio.run(serve())
    except discord.LoginFailure as e:
        raise ChimeError(f"Discord rejected {TOKEN_ENV} ({e}); reset the token in the Developer Portal") from e
    except discord.PrivilegedIntentsRequired as e:
        raise ChimeError("Discord refused the privileged intents: in the Developer Portal, Bot → Privileged Gateway "
                         "Intents, turn on Message Content Intent and Server Members Intent") from e
    except KeyboardInterrupt:
        log.info("discord: interrupted; shutting down")
    finally:
        if watcher is not None:
            watcher.stop(timeout=1)
        if not chat_log.close(timeout=10):
            log.warning("discord: the database is unreachable; %d log entries kept in %s for next time",
                        chat_log.pending, chat_log.spool_path)
        db.dispose()
    return 0
