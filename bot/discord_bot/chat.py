"""The conversation side of the Discord bot: messages, edits, deletions, reactions and backfill.

`ChatCog` turns Discord events into the engine's `IncomingMessage` and the chat log's operations; it knows
which channels listen (the settings cache), who may be answered (bots, rate limits) and how an answer is
posted (a reply, split at 2,000 characters, pinging nobody). The engine itself knows nothing of Discord.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.discord_bot import PLATFORM
from model.dispatch import Dispatcher, Job, Outcome
from model.engine import Decision, IncomingMessage
from model.storage import models as m
from model.storage.admin import last_logged_message
from model.storage.log import Ref, key

if TYPE_CHECKING:
    from bot.discord_bot.client import ChimeBot

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # Discord's longest message
NO_PINGS = discord.AllowedMentions.none()
RATE_LIMITED_EMOJI = "⏳"
# An unaddressed message shows the typing indicator only once the engine is still busy after this long:
# `Engine.handle` decides (tens of milliseconds) and then generates (seconds) in one call, and a typing
# indicator followed by silence would look broken.
TYPING_AFTER_S = 0.5
_REMEMBERED = 5000  # message ids kept to recognise replies to the bot and messages already handled
_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")
_HANDLED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
HistoryChannel = discord.TextChannel | discord.VoiceChannel | discord.StageChannel  # channels with settings and history


# ---------------------------------------------------------------------------- helpers


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at a line break or else a space where possible."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = rest.rfind("\n", 0, limit + 1)
        if cut < limit // 2:
            cut = rest.rfind(" ", 0, limit + 1)
        if cut < limit // 2:
            cut = limit
        piece = rest[:cut].rstrip()
        if piece:
            pieces.append(piece)
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def message_text(message: discord.Message, bot_id: int, bot_name: str, readable: bool) -> str:
    """The message as text: the bot's own mention becomes `@BotName` (as in the training data), attachments
    `[attachment: name]`. With `readable` (what the model reads) every other mention becomes `@name`/`#channel`;
    without (what is logged) people's mentions stay `<@id>`, which exports replace with pseudonyms."""
    text = re.sub(rf"<@!?{bot_id}>", lambda _: "@" + bot_name, message.content or "")
    if readable:
        guild = message.guild
        users = {u.id: u for u in message.mentions}

        def user(mt: re.Match[str]) -> str:
            uid = int(mt.group(1))
            found = users.get(uid) or (guild.get_member(uid) if guild else None)
            return "@" + (found.display_name if found else "someone")

        def role(mt: re.Match[str]) -> str:
            found = guild.get_role(int(mt.group(1))) if guild else None
            return "@" + (found.name if found else "role")

        def channel(mt: re.Match[str]) -> str:
            found = guild.get_channel_or_thread(int(mt.group(1))) if guild else None
            return "#" + (found.name if found else "channel")

        text = _CHANNEL_MENTION.sub(channel, _ROLE_MENTION.sub(role, _USER_MENTION.sub(user, text)))
    files = [f"[attachment: {a.filename}]" for a in message.attachments]
    return "\n".join([t for t in [text.strip(), *files] if t])


class ReplyLimiter:
    """At most `limit` replies per key (a person in a server) in any `window_s` seconds; 0 means no limit."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._times: dict[tuple[int, int], collections.deque[float]] = collections.defaultdict(collections.deque)

    def _recent(self, who: tuple[int, int]) -> collections.deque[float]:
        times = self._times[who]
        cutoff = self._clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        return times

    def allows(self, who: tuple[int, int]) -> bool:
        if self.limit <= 0:
            return True
        allowed = len(self._recent(who)) < self.limit
        if not self._times[who]:
            del self._times[who]  # nobody is remembered for longer than a window
        return allowed

    def record(self, who: tuple[int, int]) -> None:
        if self.limit > 0:
            self._recent(who).append(self._clock())


class _Recent:
    """A bounded set of ids (oldest forgotten first)."""

    def __init__(self, size: int = _REMEMBERED):
        self._ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.size = size

    def add(self, item: int) -> bool:
        """Remember `item`; False if it was already there."""
        if item in self._ids:
            return False
        self._ids[item] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, item: object) -> bool:
        return item in self._ids


# ---------------------------------------------------------------------------- the cog


class ChatCog(commands.Cog):
    """Messages through the engine, answers as replies, and everything logged to the chat log."""

    def __init__(self, bot: ChimeBot):
        self.bot = bot
        # one engine call at a time; per-channel queues that shed load when the model falls behind
        self.dispatcher = Dispatcher(bot.engine, bot.handle_decision, max_pending=bot.config.max_pending_per_channel,
                                     timeout_s=bot.config.decision_timeout_s)
        self._limiter = ReplyLimiter(bot.config.replies_per_user, bot.config.reply_window_minutes * 60)
        self._handled = _Recent()  # messages already decided or observed (live and backfill may overlap)
        self._posted = _Recent()  # the bot's own messages: a reply to one of them addresses the bot

    async def cog_unload(self) -> None:
        await self.dispatcher.close()

    # ---------------------------------------------------------------- who and where

    @property
    def _me(self) -> int:
        assert self.bot.user is not None, "the bot is not logged in"
        return self.bot.user.id

    @property
    def _bot_name(self) -> str:
        return self.bot.engine.config.bot_name

    def _listens(self, message: discord.Message) -> bool:
        """Whether the message is one the bot takes in: a server channel that listens, not its own, not
        another bot's or a webhook's unless the server wants those, and a plain message or reply."""
        if message.guild is None or message.author.id == self._me or message.type not in _HANDLED_TYPES:
            return False
        if not self.bot.channel_enabled(message.channel):
            return False
        if message.author.bot or message.webhook_id is not None:
            return self.bot.settings.server(message.guild.id).reply_to_bots
        return True

    def _addressed(self, message: discord.Message) -> bool:
        """An @mention of the bot (or of its own role), or a reply to one of its messages."""
        if any(u.id == self._me for u in message.mentions):
            return True
        if any(role.tags is not None and role.tags.bot_id == self._me for role in message.role_mentions):
            return True
        ref = message.reference
        if ref is not None and ref.message_id is not None:
            target = ref.resolved if isinstance(ref.resolved, discord.Message) else ref.cached_message
            if target is not None:
                return target.author.id == self._me
            return ref.message_id in self._posted
        return False

    def _refs(self, message: discord.Message) -> tuple[Ref, Ref]:
        assert message.guild is not None
        channel = Ref(str(message.channel.id), getattr(message.channel, "name", None))
        return Ref(str(message.guild.id), message.guild.name), channel

    def _log_message(self, message: discord.Message, addressed: bool) -> str:
        server, channel = self._refs(message)
        ref = message.reference
        return self.bot.chat_log.message(
            server=server, channel=channel, author=Ref(str(message.author.id), message.author.display_name),
            content=message_text(message, self._me, self._bot_name, readable=False),
            platform_message_id=str(message.id), addressed=addressed,
            reply_to_platform_id=str(ref.message_id) if ref is not None and ref.message_id else None,
            bot_name=self._bot_name, at=message.created_at,
        )

    # ---------------------------------------------------------------- messages

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not self._listens(message) or not self._handled.add(message.id):
            return
        text = message_text(message, self._me, self._bot_name, readable=True)
        if not text:
            return  # nothing to read (a sticker or an embed alone)
        try:
            await self._respond(message, text)
        except Exception:  # the bot keeps serving: one message's failure is logged with its context
            log.exception("discord: message %s by %s in #%s (%s) failed", message.id, message.author.id,
                          getattr(message.channel, "name", "?"), message.guild.id if message.guild else "-")

    async def _respond(self, message: discord.Message, text: str) -> None:
        assert message.guild is not None
        addressed = self._addressed(message)
        message_id = self._log_message(message, addressed)
        who = (message.guild.id, message.author.id)
        incoming = IncomingMessage(message.author.display_name, text, addressed=addressed,
                                   user_id=str(message.author.id))
        limited = not self._limiter.allows(who)
        if limited:
            log.info("discord: %s is over %d replies per %g min; message %s is context only", message.author.id,
                     self._limiter.limit, self._limiter.window_s / 60, message.id)
        job = Job(str(message.channel.id), incoming, self.bot.channel_prefs(message.channel).threshold,
                  context_only=limited, tag=message)
        outcome = await self._decide(message, job)
        if outcome.kind == "context":
            if addressed:
                await self._react(message, RATE_LIMITED_EMOJI)
            return
        decision = outcome.decision
        if outcome.kind != "decided" or decision is None:
            self.bot.chat_log.unanswered(
                message_id, outcome.kind, latency_ms=outcome.delay_ms, addressed=addressed,
                threshold=job.threshold if job.threshold is not None else self.bot.default_threshold,
                adapter_version=self.bot.engine.adapter_version, model=self.bot.engine.model_name)
            return
        posted: list[str] = []
        if decision.decision == "respond":
            target = outcome.answer.tag if outcome.answer is not None else message
            self._limiter.record((message.guild.id, target.author.id))
            posted = await self._post(target, decision)
        self.bot.chat_log.decision(message_id, decision, adapter_version=decision.adapter_version
                                   or self.bot.engine.adapter_version, model=self.bot.engine.model_name,
                                   bot_message_id=posted[0] if posted else None)

    async def _decide(self, message: discord.Message, job: Job) -> Outcome:
        """The job's outcome from the dispatcher, with the typing indicator while the engine generates."""
        work = self.dispatcher.submit(job)
        surely_answered = job.incoming.addressed and not job.context_only and self.bot.engine.config.always_answer_mentions
        if not surely_answered:  # type only once the engine is evidently generating
            done, _ = await asyncio.wait({work}, timeout=TYPING_AFTER_S)
            if done or job.context_only:
                return await work
        try:
            async with message.channel.typing():
                return await asyncio.shield(work)
        except discord.HTTPException as e:  # no permission to type: answer anyway
            log.debug("discord: no typing indicator in %s: %s", job.channel_id, e)
            return await work

    async def _post(self, message: discord.Message, decision: Decision) -> list[str]:
        """Post the answer as a reply (split when long, pinging nobody); returns the chat log ids of the posts."""
        pieces = split_message(decision.response or "")
        if not pieces:
            log.warning("discord: the engine chose to respond to message %s but its reply is empty", message.id)
            return []
        server, channel = self._refs(message)
        logged: list[str] = []
        for i, piece in enumerate(pieces):
            try:
                if i == 0:
                    # a question deleted meanwhile makes this fail: then it goes unanswered, as it should
                    sent = await message.reply(piece, allowed_mentions=NO_PINGS, mention_author=False)
                else:
                    sent = await message.channel.send(piece, allowed_mentions=NO_PINGS)
            except discord.HTTPException as e:
                log.warning("discord: cannot post the reply to message %s in #%s: %s", message.id, channel.name, e)
                break
            self._posted.add(sent.id)
            logged.append(self.bot.chat_log.message(
                server=server, channel=channel, author=None, content=piece, platform_message_id=str(sent.id),
                reply_to_platform_id=str(message.id), bot_name=self._bot_name, at=sent.created_at,
            ))
        return logged

    async def _react(self, message: discord.Message, emoji: str) -> None:
        try:
            await message.add_reaction(emoji)
        except discord.HTTPException as e:
            log.debug("discord: cannot react to message %s: %s", message.id, e)

    # ---------------------------------------------------------------- edits, deletions, reactions

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        message = payload.message
        if payload.guild_id is None or message.author.id == self._me or message.edited_at is None:
            return  # not a server message, the bot's own, or no edit (e.g. a link preview arriving)
        # the chat log only changes a message it stored, so disabled channels stay out of the database
        self.bot.chat_log.edit(str(payload.channel_id), str(payload.message_id),
                               message_text(message, self._me, self._bot_name, readable=False), at=message.edited_at)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            self.bot.chat_log.delete(str(payload.channel_id), str(payload.message_id))

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            for message_id in payload.message_ids:
                self.bot.chat_log.delete(str(payload.channel_id), str(message_id))

    def _reactor(self, payload: discord.RawReactionActionEvent) -> Ref | None:
        """The person reacting, or None for the bot itself, other bots and direct messages."""
        if payload.guild_id is None or payload.user_id == self._me:
            return None
        guild = self.bot.get_guild(payload.guild_id)
        member = payload.member or (guild.get_member(payload.user_id) if guild else None)
        if member is not None and member.bot:
            return None
        return Ref(str(payload.user_id), member.display_name if member else None)

    def _author_of(self, payload: discord.RawReactionActionEvent) -> int | None:
        if payload.message_author_id is not None:
            return payload.message_author_id
        if payload.message_id in self._posted:
            return self._me
        cached = discord.utils.get(self.bot.cached_messages, id=payload.message_id)
        return cached.author.id if cached is not None else None

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        person = self._reactor(payload)
        if person is not None and self._author_of(payload) == self._me:  # reactions on the bot's messages are labels
            self.bot.chat_log.reaction(str(payload.channel_id), str(payload.message_id), person, str(payload.emoji))

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        # Discord does not say whose message lost the reaction; the chat log only marks a reaction it stored
        person = self._reactor(payload)
        if person is not None:
            self.bot.chat_log.reaction(str(payload.channel_id), str(payload.message_id), person, str(payload.emoji),
                                       removed=True)

    # ---------------------------------------------------------------- backfill

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """A fresh gateway session (not a resume): catch up with what was said meanwhile."""
        log.info("discord: connected as %s to %d servers", self.bot.user, len(self.bot.guilds))
        if not self.bot.settings.loaded:
            try:
                await asyncio.to_thread(self.bot.settings.load)
            except Exception:
                log.exception("discord: cannot read the settings; every channel is %s until they can be read",
                              "enabled" if self.bot.settings.enabled_by_default else "disabled")
        await self.backfill()

    def _backfill_channels(self) -> Iterable[HistoryChannel]:
        if self.bot.settings.enabled_by_default:
            for guild in self.bot.guilds:
                for channel in guild.text_channels:
                    if self.bot.channel_enabled(channel):
                        yield channel
            return
        for channel_id in self.bot.settings.enabled_channel_ids():
            found = self.bot.get_channel(channel_id)
            if isinstance(found, (discord.TextChannel, discord.VoiceChannel, discord.StageChannel)):
                yield found

    async def backfill(self) -> int:
        """Log the messages each listening channel received since its last logged one and give them to the
        engine as context; none of them is answered. Returns how many were taken in."""
        if self.bot.config.backfill_limit <= 0:
            return 0
        await asyncio.to_thread(self.bot.chat_log.flush, 10.0)  # "the last logged message" must be written
        total = 0
        for channel in list(self._backfill_channels()):
            try:
                total += await self._backfill_channel(channel)
            except Exception:
                log.exception("discord: backfill of #%s (%s) failed; going on", channel.name, channel.id)
        if total:
            log.info("discord: backfilled %d messages", total)
        return total

    async def _backfill_channel(self, channel: HistoryChannel) -> int:
        channel_id = channel.id
        last = await asyncio.to_thread(self.bot.settings.transaction, lambda s: _platform_message_id(
            last_logged_message(s, key(PLATFORM, str(channel_id)))))
        if last is None:
            return 0  # nothing logged yet: what was said before the channel was enabled is not ours to read
        after = last
        enabled_at = self.bot.channel_prefs(channel).enabled_at
        if enabled_at is not None:
            after = max(after, discord.utils.time_snowflake(enabled_at))
        found = [m async for m in channel.history(limit=self.bot.config.backfill_limit, after=discord.Object(after),
                                                  oldest_first=True)]
        if len(found) >= self.bot.config.backfill_limit:
            log.warning("discord: channel %s has more than %d messages to backfill; taking the oldest", channel_id,
                        self.bot.config.backfill_limit)
        taken = []
        for message in sorted(found, key=lambda m: m.id):
            if message.id <= after or not self._listens(message) or not self._handled.add(message.id):
                continue
            text = message_text(message, self._me, self._bot_name, readable=True)
            if not text:
                continue
            self._log_message(message, self._addressed(message))
            # context only, in order, through the engine's one worker (before any newer live message)
            taken.append(self.dispatcher.submit(Job(str(channel_id), IncomingMessage(message.author.display_name, text),
                                                    context_only=True, tag=message)))
        await asyncio.gather(*taken)
        return len(taken)


def _platform_message_id(message: m.Message | None) -> int | None:
    pid = message.platform_message_id if message is not None else None
    return int(pid) if pid and pid.isdigit() else None
