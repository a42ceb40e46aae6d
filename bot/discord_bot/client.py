"""`ChimeBot`: the discord.py bot. It receives the engine and storage, and its features live in cogs.

    bot = ChimeBot(engine, chat_log, sessions(db), DiscordConfig(), watcher=AdapterWatcher(engine, registry))
    async with bot:
        await bot.start(os.environ["DISCORD_TOKEN"])

`setup_hook` reads the settings, adds `ChatCog` (chat.py) and `AdminCog` (admin.py), publishes the slash
commands and starts the adapter watcher. `chime discord` (`bot/discord_bot/__init__.py`) builds all of this.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
from discord.ext import commands
from sqlalchemy.orm import Session, sessionmaker

from bot.discord_bot import PLATFORM, DiscordConfig
from bot.discord_bot.settings import ChannelPrefs, Settings
from model.adapter_registry import AdapterWatcher
from model.engine import Decision, Engine, IncomingMessage
from model.storage.log import ChatLog

log = logging.getLogger(__name__)


def intents() -> discord.Intents:
    """Default intents plus the two privileged ones (Developer Portal → Bot → Privileged Gateway Intents)."""
    wanted = discord.Intents.default()
    wanted.message_content = True  # read what people say
    wanted.members = True  # display names of people who react or are mentioned
    return wanted


class ChimeBot(commands.Bot):
    """Chime on Discord: one engine for every channel, a chat log, and the settings database."""

    def __init__(self, engine: Engine, chat_log: ChatLog, sessions: sessionmaker[Session],
                 config: DiscordConfig | None = None, watcher: AdapterWatcher | None = None, **options: Any):
        super().__init__(command_prefix=commands.when_mentioned, intents=intents(), help_command=None,
                         allowed_mentions=discord.AllowedMentions.none(), **options)
        self.engine = engine
        self.chat_log = chat_log
        self.config = config or DiscordConfig()
        self.watcher = watcher
        self.settings = Settings(sessions, PLATFORM, enabled_by_default=self.config.enabled_by_default)

    async def setup_hook(self) -> None:
        from bot.discord_bot.admin import AdminCog
        from bot.discord_bot.chat import ChatCog

        try:
            await asyncio.to_thread(self.settings.load)
        except Exception:  # the database may be down at start-up: `on_ready` tries again
            log.exception("discord: cannot read the settings now; trying again once connected")
        await self.add_cog(ChatCog(self))
        await self.add_cog(AdminCog(self))
        if self.config.sync_commands:
            await self._sync_commands()
        if self.watcher is not None:
            self.watcher.start()

    async def _sync_commands(self) -> None:
        guild = discord.Object(self.config.sync_guild) if self.config.sync_guild else None
        try:
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        except discord.HTTPException:
            log.exception("discord: cannot publish the slash commands; the bot runs without them")
            return
        log.info("discord: published %d slash commands %s", len(synced),
                 f"to server {self.config.sync_guild}" if guild else "globally")

    async def on_message(self, message: discord.Message) -> None:
        """No prefix commands: `ChatCog` takes the messages, and the commands are slash commands."""

    async def close(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop, 1.0)
        await super().close()

    # ---------------------------------------------------------------- shared by the cogs

    @staticmethod
    def settings_channel_id(channel: Any) -> int:
        """Threads follow their parent channel's settings."""
        return channel.parent_id if isinstance(channel, discord.Thread) else channel.id

    def channel_prefs(self, channel: Any) -> ChannelPrefs:
        return self.settings.channel(self.settings_channel_id(channel))

    def channel_enabled(self, channel: Any) -> bool:
        return self.channel_prefs(channel).enabled

    @property
    def default_threshold(self) -> float:
        """The engine's own threshold (channels without their own talkativeness use it)."""
        threshold = self.engine.config.threshold
        return threshold if threshold is not None else 0.5

    def handle_decision(self, channel_id: str, incoming: IncomingMessage, threshold: float | None) -> Decision:
        """`Engine.handle` at the channel's threshold (blocking: the dispatcher runs it in its worker thread;
        `Engine.thresholds` says how a named message is treated)."""
        return self.engine.handle(channel_id, incoming, threshold=threshold)


class ShardedChimeBot(ChimeBot, commands.AutoShardedBot):
    """ChimeBot over several gateway connections (discord.py's AutoShardedBot); same cogs and behaviour."""


def make_bot(engine: Engine, chat_log: ChatLog, sessions: sessionmaker[Session], config: DiscordConfig,
             watcher: AdapterWatcher | None = None) -> ChimeBot:
    """A `ChimeBot`, or a `ShardedChimeBot` when `config.shards` asks for sharding."""
    if config.shards is None:
        return ChimeBot(engine, chat_log, sessions, config, watcher=watcher)
    options: dict[str, Any] = {}
    if config.shards != "auto":
        options["shard_count"] = int(config.shards)
    if config.shard_ids is not None:
        options["shard_ids"] = list(config.shard_ids)
    return ShardedChimeBot(engine, chat_log, sessions, config, watcher=watcher, **options)

