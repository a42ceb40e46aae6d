"""The `/chime` slash commands: status, channel settings, consent, opt-out, forget-me and corrections.

    /chime status                          what Chime does here and what is logged
    /chime enable | disable                listen in this channel or not (Manage Channels)
    /chime talkativeness [threshold]       answer when P(respond) >= threshold; none: the default (Manage Channels)
    /chime bots on|off                     answer other bots and webhooks (Manage Server)
    /chime consent on|off [moderation_log] training on this server's messages (Administrator)
    /chime teach should_have_spoken|should_have_stayed_silent [reply]   correct the last decision here (Administrator)
    /chime optout | optin | forget-me      anyone, about their own messages

Every answer is ephemeral (only the caller sees it). Permissions are checked in the commands themselves
(a server can change who sees a command, so hiding it is not enough). The database work runs in a worker
thread; a storage error becomes the answer, anything else is logged with its context and answered briefly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands
from sqlalchemy.orm import Session

from bot.discord_bot import PLATFORM
from model.errors import ChimeError
from model.storage import models as m
from model.storage.admin import correct, forget, latest_decided_message, set_opt_out, set_training_consent
from model.storage.log import Ref, ensure_person, ensure_server, key

if TYPE_CHECKING:
    from bot.discord_bot.client import ChimeBot

log = logging.getLogger(__name__)

LOGGED = ("In listening channels Chime logs the messages, its decisions and replies, edits, deletions and "
          "reactions to its own messages.")
VERDICTS = {"should_have_spoken": "respond", "should_have_stayed_silent": "silence"}


async def say(interaction: discord.Interaction, text: str) -> None:
    """Answer only the caller, whether or not the answer was deferred."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True)
    else:
        await interaction.response.send_message(text, ephemeral=True)


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class AdminCog(commands.Cog):
    """The `/chime` command group."""

    chime = app_commands.Group(name="chime", description="Chime: status, settings, consent and your data",
                               guild_only=True)

    def __init__(self, bot: ChimeBot):
        self.bot = bot

    # ---------------------------------------------------------------- helpers

    async def _allowed(self, interaction: discord.Interaction, permission: str, label: str) -> bool:
        perms = interaction.permissions
        if perms.administrator or getattr(perms, permission):
            return True
        await say(interaction, f"Only members with the {label} permission can do that.")
        return False

    async def _transaction(self, interaction: discord.Interaction, work: Callable[[Session], str]) -> None:
        """Run `work` in a transaction off the event loop and answer with its text."""
        try:
            text = await asyncio.to_thread(self.bot.settings.transaction, work)
        except ChimeError as e:
            text = f"That did not work: {e}"
        except Exception:
            log.exception("discord: /%s by %s in server %s failed", _command_name(interaction), interaction.user.id,
                          interaction.guild.id if interaction.guild else "-")
            text = "Something went wrong; it has been logged."
        await say(interaction, text)

    async def _change_channel(self, interaction: discord.Interaction, **changes: object) -> str | None:
        """Write a channel setting (on the parent, for a thread); None after answering with the error."""
        guild, channel = interaction.guild, interaction.channel
        assert guild is not None and channel is not None
        target = guild.get_channel(self.bot.settings_channel_id(channel)) or channel
        try:
            await asyncio.to_thread(self.bot.settings.set_channel, _server(guild),
                                    Ref(str(target.id), getattr(target, "name", None)), _by(interaction),
                                    self.bot.engine.config.bot_name, **changes)
        except Exception as e:
            log.exception("discord: /%s in channel %s failed", _command_name(interaction), target.id)
            await say(interaction, f"That did not work: {e}" if isinstance(e, ChimeError) else
                      "Something went wrong; it has been logged.")
            return None
        return f"#{getattr(target, 'name', target.id)}"

    # ---------------------------------------------------------------- status

    @chime.command(name="status", description="What Chime does in this channel, and what it logs")
    async def status(self, interaction: discord.Interaction) -> None:
        guild, channel, user = interaction.guild, interaction.channel, interaction.user
        assert guild is not None and channel is not None
        prefs = self.bot.channel_prefs(channel)
        engine = self.bot.engine
        threshold = prefs.threshold if prefs.threshold is not None else self.bot.default_threshold
        config = self.bot.config
        limit = (f"at most {config.replies_per_user} replies per person per {config.reply_window_minutes:g} minutes"
                 if config.replies_per_user else "no limit on replies per person")
        lines = [
            f"**{engine.config.bot_name}** in #{getattr(channel, 'name', channel.id)}: "
            + ("listening." if prefs.enabled else "not listening (`/chime enable`, Manage Channels)."),
            f"Adapter: `{engine.adapter_version}` on `{engine.model_name}`.",
            f"Talkativeness: answers when P(respond) ≥ {threshold:.2f}"
            + (" (this channel's)" if prefs.threshold is not None else " (the default)")
            + f"; @mentions and replies to it are always answered; {limit}.",
            "Other bots and webhooks: " + ("answered." if self.bot.settings.server(guild.id).reply_to_bots else "ignored."),
        ]

        def read(session: Session) -> str:
            server = session.get(m.Server, key(PLATFORM, str(guild.id)))
            person = session.get(m.Person, key(PLATFORM, str(user.id)))
            consent = server is not None and server.training_consent
            moderation = server is not None and server.log_opted_out
            you = "Your messages are logged here; `/chime optout` stops that, `/chime forget-me` deletes them."
            if person is not None and (person.opted_out or person.forgotten_at is not None):
                you = ("You opted out: your messages are "
                       + ("kept for moderation only, never for training." if moderation else "not logged."))
            return "\n".join([*lines, LOGGED,
                              "Training consent for this server: " + (
                                  "**on**: what is logged here may retrain Chime." if consent else
                                  "**off**: nothing from this server is used for training (administrators: "
                                  "`/chime consent on`)."), you])

        await self._transaction(interaction, read)

    # ---------------------------------------------------------------- channel and server settings

    @chime.command(name="enable", description="Listen (and log) in this channel (Manage Channels)")
    async def enable(self, interaction: discord.Interaction) -> None:
        if not await self._allowed(interaction, "manage_channels", "Manage Channels"):
            return
        where = await self._change_channel(interaction, enabled=True)
        if where is None:
            return
        text = (f"{self.bot.engine.config.bot_name} now listens in {where} and answers when it has something to add. "
                f"{LOGGED} `/chime status` shows the details.")
        channel, me = interaction.channel, interaction.guild.me if interaction.guild else None
        if me is not None and isinstance(channel, discord.abc.GuildChannel):
            mine = channel.permissions_for(me)
            missing = [name for name, ok in (("Send Messages", mine.send_messages),
                                             ("Read Message History", mine.read_message_history)) if not ok]
            if missing:
                text += f"\nIt lacks the {' and '.join(missing)} permission here."
        await say(interaction, text)

    @chime.command(name="disable", description="Stop listening in this channel (Manage Channels)")
    async def disable(self, interaction: discord.Interaction) -> None:
        if not await self._allowed(interaction, "manage_channels", "Manage Channels"):
            return
        where = await self._change_channel(interaction, enabled=False)
        if where is not None:
            await say(interaction, f"{self.bot.engine.config.bot_name} no longer listens in {where}; nothing more "
                      "is logged there.")

    @chime.command(name="talkativeness", description="Answer when P(respond) ≥ threshold: lower is chattier "
                   "(Manage Channels)")
    @app_commands.describe(threshold="0 to 1: answer when the model's P(respond) is at least this; leave out to go "
                           "back to the default")
    async def talkativeness(self, interaction: discord.Interaction,
                            threshold: app_commands.Range[float, 0.0, 1.0] | None = None) -> None:
        if not await self._allowed(interaction, "manage_channels", "Manage Channels"):
            return
        where = await self._change_channel(interaction, threshold=threshold)
        if where is None:
            return
        if threshold is None:
            await say(interaction, f"{where} is back to the default: answers when P(respond) ≥ "
                      f"{self.bot.default_threshold:.2f}.")
        else:
            await say(interaction, f"In {where}, {self.bot.engine.config.bot_name} now answers when P(respond) ≥ "
                      f"{threshold:.2f} (@mentions and replies to it are always answered).")

    @chime.command(name="bots", description="Answer other bots and webhooks in this server, or not (Manage Server)")
    async def bots(self, interaction: discord.Interaction, state: Literal["on", "off"]) -> None:
        if not await self._allowed(interaction, "manage_guild", "Manage Server"):
            return
        assert interaction.guild is not None
        try:
            await asyncio.to_thread(self.bot.settings.set_server, _server(interaction.guild), _by(interaction),
                                    state == "on")
        except Exception:
            log.exception("discord: /chime bots in server %s failed", interaction.guild.id)
            await say(interaction, "Something went wrong; it has been logged.")
            return
        await say(interaction, "Other bots' and webhooks' messages are now " + (
            "read and may be answered (the per-person reply limit keeps bots from talking in circles)."
            if state == "on" else "ignored."))

    # ---------------------------------------------------------------- consent and corrections (administrators)

    @chime.command(name="consent", description="Allow training on this server's logged messages, or not "
                   "(Administrator)")
    @app_commands.describe(moderation_log="keep opted-out people's messages for moderation (never for training)")
    async def consent(self, interaction: discord.Interaction, state: Literal["on", "off"],
                      moderation_log: bool | None = None) -> None:
        if not await self._allowed(interaction, "administrator", "Administrator"):
            return
        guild, by = interaction.guild, _by(interaction)
        assert guild is not None

        def change(session: Session) -> str:
            set_training_consent(session, ensure_server(session, PLATFORM, _server(guild)), state == "on", by=by,
                                 log_opted_out=moderation_log)
            text = ("Training consent is **on**: messages logged in this server may be used to retrain Chime "
                    "(people who opted out never are)." if state == "on" else
                    "Training consent is **off**: nothing from this server is used for training.")
            if moderation_log is not None:
                text += (" Opted-out people's messages are kept for moderation." if moderation_log else
                         " Opted-out people's messages are not logged.")
            return text

        await self._transaction(interaction, change)

    @chime.command(name="teach", description="Correct Chime's last decision in this channel (Administrator)")
    @app_commands.describe(verdict="what Chime should have done after the last message it decided on",
                           reply="what it should have said (for should_have_spoken)")
    async def teach(self, interaction: discord.Interaction,
                    verdict: Literal["should_have_spoken", "should_have_stayed_silent"], reply: str | None = None) -> None:
        if not await self._allowed(interaction, "administrator", "Administrator"):
            return
        assert interaction.channel is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        await asyncio.to_thread(self.bot.chat_log.flush, 10.0)  # the latest decision may still be queued
        channel_key, by, expect = key(PLATFORM, str(interaction.channel.id)), _by(interaction), VERDICTS[verdict]

        def record(session: Session) -> str:
            message = latest_decided_message(session, channel_key)
            if message is None:
                return "Nothing to correct: Chime has not decided on any message in this channel yet."
            correct(session, message.id, expect, text=reply, by=by)
            done = "answered" if expect == "respond" else "stayed silent after"
            text = f"Noted: Chime should have {done} {message.display_name}'s “{_snippet(message.content)}”."
            if expect == "respond" and not reply:
                text += " Add `reply:` with what it should have said, so the correction can be trained on."
            return text

        await self._transaction(interaction, record)

    # ---------------------------------------------------------------- everyone's own data

    @chime.command(name="optout", description="Stop logging your messages and never train on them")
    async def optout(self, interaction: discord.Interaction) -> None:
        who = _person(interaction)

        def change(session: Session) -> str:
            set_opt_out(session, ensure_person(session, PLATFORM, who), True)
            return ("You are opted out: from now on your messages are not logged (unless this server keeps them for "
                    "moderation) and never used for training. Earlier ones stay until you use `/chime forget-me`.")

        await self._transaction(interaction, change)

    @chime.command(name="optin", description="Allow logging your messages again")
    async def optin(self, interaction: discord.Interaction) -> None:
        who = _person(interaction)

        def change(session: Session) -> str:
            set_opt_out(session, ensure_person(session, PLATFORM, who), False)
            return "You are opted in again: your messages in listening channels are logged."

        await self._transaction(interaction, change)

    @chime.command(name="forget-me", description="Delete your logged messages and what derives from them")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        who = _person(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        await asyncio.to_thread(self.bot.chat_log.flush, 10.0)  # messages still queued are deleted too

        def delete(session: Session) -> str:
            report = forget(session, ensure_person(session, PLATFORM, who))
            return (f"Done: deleted {report.messages} of your messages, {report.bot_replies} of Chime's replies to "
                    f"them and {report.feedback} reactions. Your messages will not be logged again.")

        await self._transaction(interaction, delete)


def _server(guild: discord.Guild) -> Ref:
    return Ref(str(guild.id), guild.name)


def _person(interaction: discord.Interaction) -> Ref:
    return Ref(str(interaction.user.id), interaction.user.display_name)


def _by(interaction: discord.Interaction) -> str:
    return key(PLATFORM, str(interaction.user.id))


def _command_name(interaction: discord.Interaction) -> str:
    command = getattr(interaction, "command", None)
    return command.qualified_name if command is not None else "chime"
