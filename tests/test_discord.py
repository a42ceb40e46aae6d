"""The Discord bot against dpytest's fake gateway (no network) with the tiny random model and SQLite.

dpytest 0.7 cannot send interactions, so the slash commands are called through their callbacks with a
minimal fake `Interaction` (user, guild, channel, permissions, response, followup).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext.test import backend, callbacks, factories
from sqlalchemy import select

from bot.discord_bot import DiscordConfig
from bot.discord_bot.admin import AdminCog
from bot.discord_bot.chat import ChatCog, ReplyLimiter, split_message
from bot.discord_bot.client import ChimeBot
from model.engine import Engine, IncomingMessage, Reply
from model.storage import models as m
from model.storage.db import make_engine, session_scope, sessions
from model.storage.log import ChatLog

# ----------------------------------------------------------------------------- fakes


@dataclass
class FakeInteraction:
    """What the /chime handlers use of a `discord.Interaction`; `answers` collects (text, ephemeral)."""

    user: discord.Member
    channel: discord.TextChannel
    permissions: discord.Permissions
    answers: list[tuple[str, bool]] = field(default_factory=list)
    command: Any = None

    def __post_init__(self) -> None:
        self.guild = self.channel.guild
        self.response = _Response(self.answers)
        self.followup = _Followup(self.answers)


class _Response:
    def __init__(self, answers: list[tuple[str, bool]]):
        self.answers, self._done = answers, False

    def is_done(self) -> bool:
        return self._done

    async def send_message(self, content: str, *, ephemeral: bool = False, **_: Any) -> None:
        assert not self._done, "answered twice"
        self.answers.append((content, ephemeral))
        self._done = True

    async def defer(self, *, ephemeral: bool = False, thinking: bool = False) -> None:
        assert ephemeral, "deferred answers must stay ephemeral"
        self._done = True


class _Followup:
    def __init__(self, answers: list[tuple[str, bool]]):
        self.answers = answers

    async def send(self, content: str, *, ephemeral: bool = False, **_: Any) -> None:
        self.answers.append((content, ephemeral))


@dataclass
class Chime:
    bot: ChimeBot
    engine: Engine
    chat_log: ChatLog
    url: str
    guild: discord.Guild
    general: discord.TextChannel
    random: discord.TextChannel
    alice: discord.Member
    bob: discord.Member
    payloads: list[dict[str, Any]]
    typing: list[int]
    reactions: list[tuple[int, str]]  # the bot's own: (message id, emoji)

    @property
    def me(self) -> discord.ClientUser:
        assert self.bot.user is not None
        return self.bot.user

    async def command(self, name: str, user: discord.Member, channel: discord.TextChannel | None = None,
                      perms: discord.Permissions | None = None, **options: Any) -> str:
        """Run `/chime NAME` as `user`; returns its (single, ephemeral) answer."""
        cog = self.bot.get_cog("AdminCog")
        assert isinstance(cog, AdminCog)
        command = cog.chime.get_command(name)
        assert isinstance(command, app_commands.Command)
        interaction = FakeInteraction(user, channel or self.general, perms or discord.Permissions.none())
        await command.callback(cog, interaction, **options)
        assert len(interaction.answers) == 1 and interaction.answers[0][1], interaction.answers
        return interaction.answers[0][0]

    async def enable(self, channel: discord.TextChannel | None = None) -> None:
        answer = await self.command("enable", self.alice, channel, discord.Permissions(manage_channels=True))
        assert "now listens" in answer

    def rows(self, model: type[m.Base], *where: Any) -> list[Any]:
        assert self.chat_log.flush(20)
        engine = make_engine(self.url)
        with session_scope(engine) as s:
            found = list(s.scalars(select(model).where(*where)).all())
        engine.dispose()
        return found

    def sent(self) -> list[discord.Message]:
        out = []
        while not dpytest.sent_queue.empty():
            out.append(dpytest.get_message())
        return out


def fixed_reply(engine: Engine, text: str) -> None:
    """The engine's generations return `text` (the tiny random model writes noise, possibly nothing)."""

    def generate(channel_id: str, *args: Any, **kwargs: Any) -> Reply:
        return Reply(text, [], [], 3, 1.0)

    engine.generate = generate  # type: ignore[method-assign]


@pytest_asyncio.fixture
async def chime(tmp_path: Path, tiny_engine_factory) -> AsyncIterator[Chime]:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=4, tools=[])  # silent unless addressed
    url = f"sqlite:///{tmp_path / 'chime.db'}"
    chat_log = ChatLog(url, platform="discord", spool=tmp_path / "spool.jsonl")
    db = make_engine(url)
    bot = ChimeBot(engine, chat_log, sessions(db), DiscordConfig(sync_commands=False))
    dpytest.configure(bot, guilds=["Friends"], text_channels=["general", "random"], voice_channels=0,
                      members=["alice", "bob"])
    await bot._async_setup_hook()  # what `login` does before `setup_hook`
    await bot.setup_hook()
    config = dpytest.get_config()
    payloads: list[dict[str, Any]] = []
    real_send = bot.http.send_message

    async def send_message(channel_id: int, *, params: Any) -> Any:
        channel = bot.get_channel(channel_id)  # noqa: F841 - dpytest reads its caller's `channel`
        payloads.append(params.payload)
        return await real_send(channel_id, params=params)

    bot.http.send_message = send_message  # type: ignore[method-assign,assignment]
    typing: list[int] = []

    async def on_typing(channel: Any) -> None:
        typing.append(channel.id)

    callbacks.set_callback(on_typing, "send_typing")
    reactions: list[tuple[int, str]] = []

    async def add_reaction(channel_id: int, message_id: int, emoji: str) -> None:  # dpytest's lacks the 'type' field
        reactions.append((message_id, emoji))

    bot.http.add_reaction = add_reaction  # type: ignore[method-assign,assignment]
    yield Chime(bot, engine, chat_log, url, config.guilds[0], config.channels[0], config.channels[1],
                config.members[0], config.members[1], payloads, typing, reactions)
    await dpytest.empty_queue()
    callbacks.remove_callback("send_typing")
    chat_log.close()
    db.dispose()


async def reply_to(chime: Chime, target: discord.Message, content: str, author: discord.Member) -> discord.Message:
    """`author` answers `target` with Discord's reply feature (dpytest has no helper for it)."""
    channel = target.channel
    data = factories.make_message_dict(channel, author, content=content, type=19)
    data["message_reference"] = {"message_id": target.id, "channel_id": channel.id, "guild_id": channel.guild.id}
    data["referenced_message"] = factories.make_message_dict(channel, target.author, id_num=target.id,
                                                             content=target.content)
    return await _post(data)


async def react(member: discord.Member, message: discord.Message, emoji: str, removed: bool = False) -> None:
    """A reaction event as discord.py 2.7 reads it (dpytest 0.7's lacks the 'type' field)."""
    data = {"message_id": message.id, "channel_id": message.channel.id, "guild_id": message.guild.id,
            "user_id": member.id, "emoji": {"id": None, "name": emoji}, "type": 0, "burst": False}
    state = backend.get_state()
    if removed:
        state.parse_message_reaction_remove(data)
    else:
        state.parse_message_reaction_add({**data, "member": factories.dict_from_member(member)})
    await dpytest.run_all_events()


async def _post(data: dict[str, Any]) -> discord.Message:
    state = backend.get_state()
    state.parse_message_create(data)
    backend._cur_config.messages.setdefault(data["channel_id"], []).append(data)
    await dpytest.run_all_events()
    return state._get_message(data["id"])


def mention(chime: Chime) -> str:
    return f"<@{chime.me.id}>"


# ----------------------------------------------------------------------------- helpers


def test_split_message_keeps_everything_under_the_limit() -> None:
    text = "\n".join(f"line {i} " + "word " * 40 for i in range(30))
    pieces = split_message(text)
    assert len(pieces) > 1 and all(len(p) <= 2000 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert split_message("x" * 4500) == ["x" * 2000, "x" * 2000, "x" * 500]
    assert split_message("  ") == []


def test_reply_limiter_slides() -> None:
    now = [0.0]
    limiter = ReplyLimiter(2, 600, clock=lambda: now[0])
    for _ in range(2):
        assert limiter.allows((1, 1))
        limiter.record((1, 1))
    assert not limiter.allows((1, 1)) and limiter.allows((1, 2))
    now[0] = 601
    assert limiter.allows((1, 1))
    assert ReplyLimiter(0, 600).allows((1, 1))


def test_the_command_needs_a_token_and_reads_its_settings(monkeypatch) -> None:
    import argparse

    from bot.discord_bot import _bot_config, add_arguments, run
    from model.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers())
    args = parser.parse_args(["discord", "--replies-per-user", "3", "--no-sync-commands", "--threshold", "0.4"])
    config = _bot_config(args)
    assert (config.replies_per_user, config.sync_commands, config.enabled_by_default) == (3, False, False)
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="DISCORD_TOKEN is not set"):
        run(args)
    with pytest.raises(ConfigError, match="replies_per_user"):
        _bot_config(parser.parse_args(["discord", "--replies-per-user", "-1"]))


@pytest.mark.asyncio
async def test_sharding_splits_one_bot_over_processes(tiny_engine_factory, tmp_path: Path) -> None:
    """What can be checked without a gateway: the sharded bot is discord.py's AutoShardedBot with the
    shard count and this process's shard ids; the settings refuse inconsistent ones."""
    import argparse

    from bot.discord_bot import _bot_config, add_arguments
    from bot.discord_bot.client import ShardedChimeBot, make_bot
    from model.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers())
    config = _bot_config(parser.parse_args(["discord", "--shards", "4", "--shard-ids", "2,3"]))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    log = ChatLog(url, platform="discord", spool=tmp_path / "s.jsonl")
    db = make_engine(url)
    engine = tiny_engine_factory()
    bot = make_bot(engine, log, sessions(db), config)
    assert isinstance(bot, ShardedChimeBot) and isinstance(bot, discord.AutoShardedClient)
    assert (bot.shard_count, bot.shard_ids) == (4, [2, 3])
    assert bot.engine is engine and bot.config.shard_ids == [2, 3]  # the same ChimeBot underneath
    plain = make_bot(engine, log, sessions(db), _bot_config(parser.parse_args(["discord"])))
    assert type(plain) is ChimeBot
    auto = make_bot(engine, log, sessions(db), _bot_config(parser.parse_args(["discord", "--shards", "auto"])))
    assert isinstance(auto, discord.AutoShardedClient) and auto.shard_count is None
    for bad in (["--shard-ids", "0"], ["--shards", "auto", "--shard-ids", "0"], ["--shards", "2", "--shard-ids", "2"],
                ["--shards", "zero"]):
        with pytest.raises(ConfigError, match="shard"):
            _bot_config(parser.parse_args(["discord", *bad]))
    await plain.close()  # (a sharded client that never connected has no gateway state to close)
    log.close()
    db.dispose()


# ----------------------------------------------------------------------------- messages


@pytest.mark.asyncio
async def test_a_mention_gets_a_reply_without_pings(chime: Chime) -> None:
    await chime.enable()
    fixed_reply(chime.engine, f"Lima. @everyone <@{chime.bob.id}>")
    seen: list[IncomingMessage] = []
    decide = chime.engine.decide

    def spy(channel_id: str, msg: IncomingMessage, threshold: float | None = None):
        seen.append(msg)
        return decide(channel_id, msg, threshold)

    chime.engine.decide = spy  # type: ignore[method-assign]
    asked = await dpytest.message(f"{mention(chime)} what's the capital of Peru?", chime.general, chime.alice)
    [sent] = chime.sent()
    assert sent.content.startswith("Lima.")
    payload = chime.payloads[-1]
    assert payload["message_reference"]["message_id"] == asked.id  # a reply to the question
    assert payload["allowed_mentions"] == {"parse": [], "replied_user": False}  # pings nobody
    assert chime.typing == [chime.general.id]
    # the engine saw the display name, the bot's mention as @Chime, and the Discord user id (tool budgets)
    assert (seen[0].name, seen[0].addressed, seen[0].user_id) == (chime.alice.display_name, True, str(chime.alice.id))
    assert seen[0].content == "@Chime what's the capital of Peru?"

    [decision] = chime.rows(m.Decision)
    assert (decision.decision, decision.addressed, decision.adapter_version) == ("respond", True, chime.engine.adapter_version)
    [reply] = chime.rows(m.Reply)
    bot_message = chime.rows(m.Message, m.Message.id == reply.message_id)[0]
    assert (bot_message.author_kind, bot_message.platform_message_id) == ("bot", str(sent.id))
    question = chime.rows(m.Message, m.Message.platform_message_id == str(asked.id))[0]
    assert question.content.startswith("@Chime") and question.display_name == chime.alice.display_name
    assert bot_message.reply_to_id == question.id
    server = chime.rows(m.Server)[0]
    assert (server.id, server.name, server.training_consent) == (f"discord:{chime.guild.id}", "Friends", False)


@pytest.mark.asyncio
async def test_chatter_at_a_high_threshold_stays_silent_and_is_logged(chime: Chime, monkeypatch) -> None:
    monkeypatch.setattr("bot.discord_bot.chat.TYPING_AFTER_S", 30.0)  # a slow shared machine must not show typing
    await chime.enable()
    await dpytest.message("anyone up for pizza tonight?", chime.general, chime.alice)
    await dpytest.message("sure, 8pm?", chime.general, chime.bob)
    assert chime.sent() == [] and chime.typing == []
    decisions = chime.rows(m.Decision)
    assert [d.decision for d in decisions] == ["silence", "silence"] and all(d.threshold == 1.0 for d in decisions)


@pytest.mark.asyncio
async def test_channel_talkativeness_overrides_the_engine(chime: Chime) -> None:
    await chime.enable()
    fixed_reply(chime.engine, "count me in")
    answer = await chime.command("talkativeness", chime.alice, perms=discord.Permissions(manage_channels=True),
                                 threshold=0.0)
    assert "0.00" in answer
    await dpytest.message("anyone up for pizza tonight?", chime.general, chime.bob)
    assert [s.content for s in chime.sent()] == ["count me in"]
    assert chime.engine.config.threshold == 1.0  # the engine's own threshold is back in place
    assert chime.rows(m.Decision)[0].threshold == 0.0
    await chime.command("talkativeness", chime.alice, perms=discord.Permissions(manage_channels=True))  # the default again
    await dpytest.message("ok", chime.general, chime.bob)
    assert chime.sent() == []
    assert "Manage Channels" in await chime.command("talkativeness", chime.bob, threshold=0.5)


@pytest.mark.asyncio
async def test_a_reply_to_the_bots_message_is_addressed(chime: Chime) -> None:
    await chime.enable()
    fixed_reply(chime.engine, "Lima")
    await dpytest.message(f"{mention(chime)} capital of Peru?", chime.general, chime.alice)
    [answer] = chime.sent()
    await reply_to(chime, answer, "and of Chile?", chime.alice)  # no mention: a Discord reply
    [second] = chime.sent()
    assert second.content == "Lima"
    followup = chime.rows(m.Message, m.Message.content == "and of Chile?")[0]
    assert followup.addressed and followup.reply_to_id is not None
    assert chime.rows(m.Decision, m.Decision.message_id == followup.id)[0].decision == "respond"


@pytest.mark.asyncio
async def test_bots_and_webhooks_are_ignored_unless_the_server_wants_them(chime: Chime) -> None:
    await chime.enable()
    state = backend.get_state()
    robot = backend.make_member(state.store_user(factories.make_user_dict("helperbot", 7, None, bot=True)), chime.guild)
    await dpytest.message(f"{mention(chime)} beep", chime.general, robot)
    await _post(factories.make_message_dict(chime.general, chime.bob, content="via webhook", webhook_id=42))
    assert chime.sent() == [] and chime.rows(m.Message) == []
    answer = await chime.command("bots", chime.alice, perms=discord.Permissions(manage_guild=True), state="on")
    assert "may be answered" in answer
    fixed_reply(chime.engine, "boop")
    await dpytest.message(f"{mention(chime)} beep", chime.general, robot)
    assert [s.content for s in chime.sent()] == ["boop"]
    await dpytest.message("ignored: the bot's own messages never go through the engine", chime.general, chime.alice)
    assert len(chime.rows(m.Decision)) == 2


@pytest.mark.asyncio
async def test_long_answers_are_split(chime: Chime) -> None:
    await chime.enable()
    long = ("All the details you asked for. " * 150).strip()  # 4,649 characters
    fixed_reply(chime.engine, long)
    await dpytest.message(f"{mention(chime)} tell me everything", chime.general, chime.alice)
    sent = chime.sent()
    assert len(sent) == 3 and all(len(s.content) <= 2000 for s in sent)
    assert " ".join(s.content for s in sent) == long
    assert "message_reference" in chime.payloads[0] and "message_reference" not in chime.payloads[1]
    assert all(p["allowed_mentions"]["parse"] == [] for p in chime.payloads)
    assert len(chime.rows(m.Message, m.Message.author_kind == "bot")) == 3
    [reply] = chime.rows(m.Reply)
    assert reply.text == long


@pytest.mark.asyncio
async def test_disabled_channels_are_ignored(chime: Chime) -> None:
    await chime.enable(chime.general)
    fixed_reply(chime.engine, "hi")
    await dpytest.message(f"{mention(chime)} hello?", chime.random, chime.alice)
    assert chime.sent() == [] and chime.rows(m.Message) == []
    assert "Manage Channels" in await chime.command("disable", chime.bob)
    assert "no longer listens" in await chime.command("disable", chime.alice,
                                                      perms=discord.Permissions(manage_channels=True))
    await dpytest.message(f"{mention(chime)} hello?", chime.general, chime.alice)
    assert chime.sent() == [] and chime.rows(m.Message) == []
    assert chime.engine.channels() == []


@pytest.mark.asyncio
async def test_replies_per_person_are_rate_limited(chime: Chime) -> None:
    await chime.enable()
    cog = chime.bot.get_cog("ChatCog")
    assert isinstance(cog, ChatCog)
    cog._limiter = ReplyLimiter(2, 600)
    fixed_reply(chime.engine, "yes?")
    for i in range(3):
        await dpytest.message(f"{mention(chime)} question {i}", chime.general, chime.alice)
    assert len(chime.sent()) == 2
    limited = chime.rows(m.Message, m.Message.content == "@Chime question 2")[0]
    assert chime.rows(m.Decision, m.Decision.message_id == limited.id) == []  # context only
    assert chime.reactions == [(chime.general.last_message_id, "⏳")]
    await dpytest.message(f"{mention(chime)} my turn", chime.general, chime.bob)  # others are not limited
    assert len(chime.sent()) == 1


@pytest.mark.asyncio
async def test_engine_failures_are_logged_and_the_bot_keeps_serving(chime: Chime, caplog) -> None:
    await chime.enable()
    handle = chime.engine.handle

    def broken(channel_id: str, msg: IncomingMessage, threshold: float | None = None):
        raise RuntimeError("out of memory")

    chime.engine.handle = broken  # type: ignore[method-assign]
    await dpytest.message(f"{mention(chime)} hi", chime.general, chime.alice)
    assert "out of memory" in caplog.text and "failed" in caplog.text
    chime.engine.handle = handle  # type: ignore[method-assign]
    fixed_reply(chime.engine, "back")
    await dpytest.message(f"{mention(chime)} hi again", chime.general, chime.alice)
    assert [s.content for s in chime.sent()] == ["back"]


@pytest.mark.asyncio
async def test_a_backend_that_times_out_leaves_the_bot_silent_and_logged(chime: Chime, caplog) -> None:
    await chime.enable()
    cog = chime.bot.get_cog("ChatCog")
    assert isinstance(cog, ChatCog)
    cog.dispatcher.timeout_s = 0.3
    fixed_reply(chime.engine, "late answer")
    handle = chime.engine.handle

    def stuck(channel_id: str, msg: IncomingMessage, threshold: float | None = None):
        time.sleep(1.5)  # a remote backend that hangs past the timeout
        return handle(channel_id, msg, threshold)

    chime.engine.handle = stuck  # type: ignore[method-assign]
    started = time.monotonic()
    await dpytest.message(f"{mention(chime)} are you there?", chime.general, chime.alice)
    assert time.monotonic() - started < 1.2 and chime.sent() == []
    assert "longer than 0.3 s" in caplog.text
    chime.engine.handle = handle  # type: ignore[method-assign]
    fixed_reply(chime.engine, "back")
    await dpytest.message(f"{mention(chime)} hello?", chime.general, chime.alice)
    assert [s.content for s in chime.sent()] == ["back"]  # the late "late answer" was never posted
    rows = {d.decision: d for d in chime.rows(m.Decision)}
    assert set(rows) == {"timeout", "respond"} and rows["timeout"].p_respond is None


@pytest.mark.asyncio
async def test_a_burst_is_shed_to_the_newest_message_and_logged(chime: Chime) -> None:
    await chime.enable()
    gate = threading.Event()
    handle = chime.engine.handle
    decided: list[str] = []

    started = threading.Event()

    def slow(channel_id: str, msg: IncomingMessage, threshold: float | None = None):
        started.set()
        gate.wait(10)
        decided.append(msg.content)
        return handle(channel_id, msg, threshold)

    chime.engine.handle = slow  # type: ignore[method-assign]
    first = asyncio.ensure_future(dpytest.message("burst 0", chime.general, chime.bob))
    while not started.is_set():  # the engine is busy with the first message
        await asyncio.sleep(0.01)
    threading.Timer(0.5, gate.set).start()
    await asyncio.gather(first, *(dpytest.message(f"burst {i}", chime.general, chime.bob) for i in range(1, 4)))
    assert decided == ["burst 0", "burst 3"]
    kinds = {msg.content: d.decision for msg in chime.rows(m.Message) for d in chime.rows(m.Decision)
             if d.message_id == msg.id}
    assert kinds == {"burst 0": "silence", "burst 1": "skipped", "burst 2": "skipped", "burst 3": "silence"}


# ----------------------------------------------------------------------------- edits, deletions, reactions


@pytest.mark.asyncio
async def test_edits_deletions_and_reactions_reach_the_database(chime: Chime) -> None:
    await chime.enable()
    fixed_reply(chime.engine, "Lima")
    asked = await dpytest.message(f"{mention(chime)} capital of Peru?", chime.general, chime.alice)
    [answer] = chime.sent()
    data = factories.make_message_dict(chime.general, chime.alice, id_num=asked.id, content="capital of Peru, please?",
                                       edited_timestamp=datetime.now(timezone.utc).isoformat())
    data["member"] = factories.dict_from_member(chime.alice)
    backend.get_state().parse_message_update(data)
    await react(chime.bob, answer, "👍")
    await react(chime.alice, answer, "😂")
    await react(chime.alice, answer, "😂", removed=True)
    await react(chime.bob, asked, "👀")  # on a person's message: not a label, not logged
    edited = chime.rows(m.Message, m.Message.platform_message_id == str(asked.id))[0]
    assert edited.content == "capital of Peru, please?" and edited.edited_at is not None
    feedback = {(f.value, f.removed_at is not None) for f in chime.rows(m.Feedback)}
    assert feedback == {("👍", False), ("😂", True)}
    assert {f.person_id for f in chime.rows(m.Feedback)} == {f"discord:{chime.bob.id}", f"discord:{chime.alice.id}"}

    await answer.delete()  # someone removes the bot's reply: kept, marked (a label)
    chatter = await dpytest.message("nevermind", chime.general, chime.bob)
    backend.delete_message(chatter)  # a person deletes their own message: gone
    await dpytest.run_all_events()
    assert chime.rows(m.Message, m.Message.platform_message_id == str(answer.id))[0].deleted_at is not None
    assert chime.rows(m.Message, m.Message.platform_message_id == str(chatter.id)) == []


# ----------------------------------------------------------------------------- slash commands


@pytest.mark.asyncio
async def test_status_says_what_is_logged_and_the_consent(chime: Chime) -> None:
    answer = await chime.command("status", chime.bob)
    assert "not listening" in answer and "Training consent for this server: **off**" in answer
    assert chime.engine.adapter_version in answer and "1.00" in answer
    await chime.enable()
    await chime.command("optout", chime.bob)
    answer = await chime.command("status", chime.bob)
    assert "listening." in answer and "You opted out" in answer and "logs the messages" in answer


@pytest.mark.asyncio
async def test_consent_needs_an_administrator(chime: Chime) -> None:
    answer = await chime.command("consent", chime.bob, perms=discord.Permissions(manage_guild=True), state="on")
    assert "Administrator" in answer
    assert chime.rows(m.Server) == []
    answer = await chime.command("consent", chime.alice, perms=discord.Permissions(administrator=True), state="on",
                                 moderation_log=True)
    assert "**on**" in answer
    [server] = chime.rows(m.Server)
    assert server.training_consent and server.log_opted_out and server.consent_changed_by == f"discord:{chime.alice.id}"
    assert "**on**" in await chime.command("status", chime.bob)


@pytest.mark.asyncio
async def test_optout_stops_logging_and_optin_restarts_it(chime: Chime) -> None:
    await chime.enable()
    await chime.command("optout", chime.bob)
    await dpytest.message("private", chime.general, chime.bob)
    assert chime.rows(m.Message, m.Message.content == "private") == []
    await chime.command("optin", chime.bob)
    await dpytest.message("public", chime.general, chime.bob)
    assert len(chime.rows(m.Message, m.Message.content == "public")) == 1


@pytest.mark.asyncio
async def test_forget_me_deletes_the_callers_rows(chime: Chime) -> None:
    await chime.enable()
    fixed_reply(chime.engine, "noted, alice")
    await dpytest.message(f"{mention(chime)} my address is 12 Elm St", chime.general, chime.alice)
    await dpytest.message("hi all", chime.general, chime.bob)
    answer = await chime.command("forget-me", chime.alice)
    assert "deleted 1 of your messages, 1 of Chime's replies" in answer
    contents = [r.content for r in chime.rows(m.Message)]
    assert contents == ["hi all"]
    person = chime.rows(m.Person, m.Person.id == f"discord:{chime.alice.id}")[0]
    assert person.forgotten_at is not None and person.display_name is None
    await dpytest.message("I'm back", chime.general, chime.alice)
    assert [r.content for r in chime.rows(m.Message)] == ["hi all"]
    assert "forgotten" in await chime.command("optin", chime.alice)


@pytest.mark.asyncio
async def test_teach_corrects_the_last_decision_in_the_channel(chime: Chime) -> None:
    await chime.enable()
    admin = discord.Permissions(administrator=True)
    assert "Nothing to correct" in await chime.command("teach", chime.alice, perms=admin, verdict="should_have_spoken")
    await dpytest.message("what time is the match?", chime.general, chime.bob)
    await dpytest.message("ok", chime.random, chime.bob)  # another channel (not listening) does not count
    assert "Administrator" in await chime.command("teach", chime.bob, verdict="should_have_spoken")
    answer = await chime.command("teach", chime.alice, perms=admin, verdict="should_have_spoken", reply="At 8, on TV2.")
    assert "should have answered" in answer and "what time is the match?" in answer
    [fb] = chime.rows(m.Feedback)
    message = chime.rows(m.Message, m.Message.id == fb.message_id)[0]
    assert (fb.kind, fb.value, fb.text, fb.source) == ("correction", "respond", "At 8, on TV2.", f"discord:{chime.alice.id}")
    assert message.content == "what time is the match?"


@pytest.mark.asyncio
async def test_the_slash_commands_are_a_valid_chime_group(chime: Chime) -> None:
    [group] = chime.bot.tree.get_commands()
    payload = group.to_dict(chime.bot.tree)  # what would be published: names, descriptions, options
    assert payload["name"] == "chime"
    assert {c["name"] for c in payload["options"]} == {"status", "enable", "disable", "talkativeness", "bots",
                                                       "consent", "teach", "optout", "optin", "forget-me"}
    descriptions = [c["description"] for c in payload["options"]]
    descriptions += [o["description"] for c in payload["options"] for o in c.get("options", [])]
    assert all(0 < len(d) <= 100 for d in descriptions)


# ----------------------------------------------------------------------------- backfill


@pytest.mark.asyncio
async def test_backfill_logs_and_observes_missed_messages_without_replying(chime: Chime) -> None:
    await chime.enable()
    await dpytest.message("before the outage", chime.general, chime.alice)
    chime.rows(m.Message)  # written
    state = backend.get_state()
    state.stop_dispatch()  # the bot is away: messages arrive without it
    backend.make_message("did everyone get home?", chime.bob, chime.general)
    backend.make_message(f"{mention(chime)} are you there?", chime.alice, chime.general)
    state.start_dispatch()
    turns = len(chime.engine.channel(str(chime.general.id)).turns)
    chime.bot.dispatch("ready")  # a fresh gateway session
    await dpytest.run_all_events()
    await asyncio.sleep(0)
    assert chime.sent() == []
    logged = chime.rows(m.Message)
    assert [r.content for r in sorted(logged, key=lambda r: r.created_at)] == [
        "before the outage", "did everyone get home?", "@Chime are you there?"]
    assert len(chime.rows(m.Decision)) == 1  # only the live message was decided on
    assert len(chime.engine.channel(str(chime.general.id)).turns) == turns + 4  # two messages and two silences
    cog = chime.bot.get_cog("ChatCog")
    assert isinstance(cog, ChatCog)
    assert await cog.backfill() == 0  # nothing new the second time
