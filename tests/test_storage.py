"""Storage against SQLite and PostgreSQL: migrations, the buffered chat log, consent, forget, retention,
outages and concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from model.conversation import ToolCall
from model.engine import Decision
from model.storage import models as m
from model.storage.admin import correct, find_person, forget, purge_older_than, set_opt_out, set_training_consent
from model.storage.db import current_revision, head_revision, make_engine, session_scope, upgrade
from model.storage.log import ChatLog, Ref
from model.tools import ToolResult
from tests.storage_helpers import PG_URL, CuttableProxy, drop_schema, fresh_schema_url, postgres_available

PG_MISSING = postgres_available()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'chime.db'}"
        return
    if PG_MISSING:
        pytest.skip(PG_MISSING)
    url, schema = fresh_schema_url()
    yield url
    drop_schema(schema)


def decision(name: str, content: str, respond: bool, p: float = 0.9, response: str | None = "ok", calls=(), results=()) -> Decision:
    return Decision(name=name, content=content, decision="respond" if respond else "silence", p_respond=p,
                    addressed=False, latency_ms=12.5, threshold=0.5, response=response if respond else None,
                    tool_calls=list(calls), tool_results=list(results), reply_ms=40.0 if respond else None, reply_tokens=7)


GUILD = Ref("g1", "guild")


def chat(log: ChatLog, name: str, content: str, respond: bool, server: Ref = GUILD, channel: str = "c1",
         at: datetime | None = None, reply: str = "sure", **kw) -> tuple[str, str | None]:
    mid = log.message(server=server, channel=Ref(channel, channel), author=Ref(name.lower(), name), content=content,
                      bot_name="Chime", at=at)
    bot = log.message(server=server, channel=Ref(channel, channel), author=None, content=reply, bot_name="Chime",
                      at=(at + timedelta(seconds=1)) if at else None) if respond else None
    log.decision(mid, decision(name, content, respond, response=reply, **kw), adapter_version="v1", model="tiny",
                 bot_message_id=bot)
    return mid, bot


def count(url: str, model: type[m.Base]) -> int:
    engine = make_engine(url)
    with session_scope(engine) as s:
        n = s.scalar(select(func.count()).select_from(model))
    engine.dispose()
    return int(n or 0)


# ----------------------------------------------------------------------------- migrations


def test_upgrade_blank_database_gives_the_models_schema(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), m.Base.metadata)
        tables = set(conn.dialect.get_table_names(conn))
    engine.dispose()
    assert diff == []
    assert {"servers", "channels", "people", "messages", "decisions", "replies", "tool_calls", "feedback",
            "adapter_versions", "evaluations", "exports", "alembic_version"} <= tables
    upgrade(db_url)  # idempotent
    assert current_revision(db_url) == head_revision()


def test_upgrading_a_database_with_rows_keeps_them(db_url: str) -> None:
    """0003 rebuilds the decisions table on SQLite: its replies and tool calls (ON DELETE CASCADE children)
    must survive the copy, and the undecided outcomes can be stored afterwards."""
    upgrade(db_url, "0002")
    log_ = ChatLog(db_url, platform="local", spool=None, migrate=False)
    mid = log_.message(server=Ref("s"), channel=Ref("c"), author=Ref("alice"), content="what is 2+2?")
    log_.decision(mid, decision("alice", "what is 2+2?", True, response="4",
                                calls=[ToolCall("calculator", {"expression": "2+2"})],
                                results=[ToolResult("calculator", True, "4")]), adapter_version="v1")
    assert log_.flush(10)
    log_.close()
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert (count(db_url, m.Decision), count(db_url, m.Reply), count(db_url, m.ToolCallRecord)) == (1, 1, 1)
    log_ = ChatLog(db_url, platform="local", spool=None)
    later = log_.message(server=Ref("s"), channel=Ref("c"), author=Ref("bob"), content="anyone?")
    log_.unanswered(later, "skipped", latency_ms=3.0, threshold=0.5, adapter_version="v1")
    with pytest.raises(ValueError, match="undecided"):
        log_.unanswered(later, "respond", latency_ms=3.0, threshold=0.5, adapter_version="v1")
    assert log_.flush(10)
    log_.close()
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        rows = {d.decision: d.p_respond for d in s.scalars(select(m.Decision))}
    engine.dispose()
    assert rows == {"respond": 0.9, "skipped": None}


def test_cli_db_upgrade_and_current(tmp_path: Path, capsys) -> None:
    from bot.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "upgrade", "--db", url]) == 0
    assert main(["db", "current", "--db", url]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(out)["current"] is True


# ----------------------------------------------------------------------------- the chat log


def test_chat_log_writes_messages_decisions_replies_and_tool_calls(db_url: str, tmp_path: Path) -> None:
    log = ChatLog(db_url, platform="discord", spool=tmp_path / "spool.jsonl")
    mid, bot = chat(log, "Alice", "@Chime 84.5*0.15?", True, reply="12.675",
                    calls=[ToolCall("calculator", {"expression": "84.5*0.15"})], results=[ToolResult("calculator", True, "12.675")])
    chat(log, "Bob", "lol", False)
    log.edit("c1", mid, "@Chime what is 84.5*0.15?")
    assert log.close(timeout=20)
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        msg = s.get(m.Message, mid)
        assert msg is not None and msg.content == "@Chime what is 84.5*0.15?" and msg.edited_at is not None
        d = s.scalars(select(m.Decision).where(m.Decision.message_id == mid)).one()
        assert (d.decision, d.adapter_version, d.latency_ms) == ("respond", "v1", 12.5)
        reply = s.scalars(select(m.Reply).where(m.Reply.decision_id == d.id)).one()
        assert reply.message_id == bot and reply.text == "12.675"
        call = s.scalars(select(m.ToolCallRecord)).one()
        assert (call.name, call.arguments, call.ok, call.result) == ("calculator", {"expression": "84.5*0.15"}, True, "12.675")
        server = s.get(m.Server, "discord:g1")
        assert server is not None and server.training_consent is False  # off until an administrator turns it on
        assert s.scalar(select(func.count()).select_from(m.Message)) == 3
    engine.dispose()


def test_local_platform_has_consent_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    log = ChatLog(url, spool=tmp_path / "s.jsonl")
    chat(log, "alice", "hi", False, server=Ref("local"))
    assert log.close()
    with session_scope(make_engine(url)) as s:
        assert s.get(m.Server, "local:local").training_consent is True


def test_opted_out_messages_are_not_logged_unless_moderation_logging(db_url: str, tmp_path: Path) -> None:
    log = ChatLog(db_url, platform="discord", spool=tmp_path / "spool.jsonl")
    chat(log, "Alice", "hello", False)
    assert log.flush()
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        set_opt_out(s, find_person(s, "Alice"))
    chat(log, "Alice", "secret plans", True)
    assert log.flush()
    with session_scope(engine) as s:
        assert s.scalars(select(m.Message.content).where(m.Message.author_kind == "human")).all() == ["hello"]
        assert s.scalar(select(func.count()).select_from(m.Decision)) == 1
        set_training_consent(s, s.get(m.Server, "discord:g1"), True, log_opted_out=True)
    chat(log, "Alice", "for the moderators", False)
    assert log.close()
    with session_scope(engine) as s:
        assert "for the moderators" in s.scalars(select(m.Message.content)).all()
    engine.dispose()


def test_platform_deletion_removes_a_persons_message_and_marks_the_bots(db_url: str, tmp_path: Path) -> None:
    log = ChatLog(db_url, platform="discord", spool=tmp_path / "spool.jsonl")
    mid, bot = chat(log, "Alice", "Chime, joke please", True, reply="knock knock")
    mid2, bot2 = chat(log, "Bob", "Chime, another", True, reply="why did the chicken")
    log.delete("c1", mid)  # Alice deletes her message: it and the bot's reply to it go
    log.delete("c1", bot2)  # someone deletes the bot's reply to Bob: kept, marked (a label)
    assert log.close()
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        assert s.get(m.Message, mid) is None and s.get(m.Message, bot) is None
        assert s.scalars(select(m.Decision).where(m.Decision.message_id == mid)).first() is None
        assert s.get(m.Message, bot2).deleted_at is not None
        assert s.get(m.Message, mid2) is not None
    engine.dispose()


def test_answers_follow_the_message_they_answer(db_url: str, tmp_path: Path) -> None:
    """The bot's answer, in every piece it was posted in, lives and dies with the person's message: not kept
    for an opted-out person, and all pieces deleted with the message (as Discord logs them: replies by id)."""
    log = ChatLog(db_url, platform="discord", spool=tmp_path / "spool.jsonl")
    channel = Ref("c1", "c1")

    def ask(name: str, pid: str, pieces: int) -> str:
        mid = log.message(server=GUILD, channel=channel, author=Ref(name.lower(), name), content="@Chime tell me a story",
                          platform_message_id=pid, addressed=True, bot_name="Chime")
        posted = [log.message(server=GUILD, channel=channel, author=None, content=f"part {i}", bot_name="Chime",
                              platform_message_id=f"{pid}-r{i}", reply_to_platform_id=pid) for i in range(pieces)]
        log.decision(mid, decision(name, "story", True, response="part 0"), adapter_version="v1", bot_message_id=posted[0])
        return mid

    ask("Alice", "100", 3)
    assert log.flush()
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        set_opt_out(s, find_person(s, "Alice"))
    ask("Alice", "200", 2)  # opted out: neither her message nor the answers to it are stored
    ask("Bob", "300", 1)
    assert log.flush()
    with session_scope(engine) as s:
        bots = s.scalars(select(m.Message.content).where(m.Message.author_kind == "bot")).all()
    assert sorted(bots) == ["part 0", "part 0", "part 1", "part 2"]
    log.delete("c1", "100")  # Alice deletes her first question: all three pieces of the answer go with it
    assert log.close()
    with session_scope(engine) as s:
        assert s.scalars(select(m.Message.platform_message_id).order_by(m.Message.platform_message_id)).all() == [
            "300", "300-r0"]
    engine.dispose()


def test_forget_deletes_a_person_and_what_derives_from_them(db_url: str, tmp_path: Path) -> None:
    log = ChatLog(db_url, platform="discord", spool=tmp_path / "spool.jsonl")
    a1, r1 = chat(log, "Alice", "Chime, my address is 12 Elm St", True, reply="noted, Alice")
    b1, r2 = chat(log, "Bob", "Chime, hi", True, reply="hi Bob")
    log.reaction("c1", r2, Ref("alice", "Alice"), "👍")
    log.reaction("c1", r1, Ref("bob", "Bob"), "👍")
    assert log.flush()
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        report = forget(s, find_person(s, "alice", platform="discord"))
    assert (report.messages, report.bot_replies, report.feedback) == (1, 1, 1)
    with session_scope(engine) as s:
        contents = s.scalars(select(m.Message.content)).all()
        assert not any("Elm" in c or "Alice" in c for c in contents)
        assert s.scalar(select(func.count()).select_from(m.Feedback)) == 0  # hers, and Bob's on the deleted reply
        person = s.get(m.Person, "discord:alice")
        assert person.forgotten_at is not None and person.display_name is None and person.opted_out
        assert s.get(m.Message, b1) is not None
    chat(log, "Alice", "I'm back", False)  # a forgotten person's new messages are not logged for training
    assert log.close()
    with session_scope(engine) as s:
        assert "I'm back" not in s.scalars(select(m.Message.content)).all()
    engine.dispose()


def test_cli_forget_and_label(tmp_path: Path, capsys) -> None:
    from bot.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    log = ChatLog(url, platform="discord", spool=tmp_path / "s.jsonl")
    mid, _ = chat(log, "Alice", "hello all", False)
    assert log.close()
    assert main(["label", mid[:12], "respond", "--reply", "hello Alice!", "--db", url]) == 0
    assert main(["decisions", "--json", "--db", url]) == 0
    rows = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert rows[0]["message_id"] == mid
    assert main(["forget", "Alice", "--db", url]) == 0
    assert "deleted 1 messages" in capsys.readouterr().out
    assert main(["forget", "nobody", "--db", url]) == 2


def test_retention_purges_old_rows(db_url: str, tmp_path: Path) -> None:
    log = ChatLog(db_url, spool=tmp_path / "s.jsonl")
    old = datetime.now(timezone.utc) - timedelta(days=100)
    chat(log, "alice", "ancient", True, at=old)
    chat(log, "bob", "recent", False)
    assert log.close()
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        assert purge_older_than(s, 90) == 2  # the message and the bot's reply
    with session_scope(engine) as s:
        assert s.scalars(select(m.Message.content)).all() == ["recent"]
        assert s.scalar(select(func.count()).select_from(m.Decision)) == 1
    engine.dispose()


def test_correction_is_stored(db_url: str, tmp_path: Path) -> None:
    log = ChatLog(db_url, spool=tmp_path / "s.jsonl")
    mid, bot = chat(log, "alice", "hm", True)
    assert log.close()
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        correct(s, mid, "silence", by="cli:test")
        with pytest.raises(Exception, match="bot's"):
            correct(s, bot, "silence")
    with session_scope(engine) as s:
        fb = s.scalars(select(m.Feedback)).one()
        assert (fb.kind, fb.value, fb.source) == ("correction", "silence", "cli:test")
    engine.dispose()


# ----------------------------------------------------------------------------- faults


def test_postgres_outage_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """PostgreSQL goes away (every connection cut, new ones refused) in the middle of a stream of
    messages; the bot keeps going; when it comes back, every row is there exactly once."""
    if PG_MISSING:
        pytest.skip(PG_MISSING)
    proxy = CuttableProxy()
    url, schema = fresh_schema_url(host_port=("127.0.0.1", proxy.port))
    try:
        log = ChatLog(url, platform="discord", spool=tmp_path / "spool.jsonl", retry_initial_s=0.05, retry_max_s=0.2)
        for i in range(30):
            chat(log, f"p{i % 4}", f"message {i}", i % 3 == 0)
        assert log.flush(timeout=20)
        proxy.cut()
        t0 = time.perf_counter()
        for i in range(30, 90):
            chat(log, f"p{i % 4}", f"message {i}", i % 3 == 0)  # never blocks on the dead database
        assert time.perf_counter() - t0 < 1.0
        assert not log.flush(timeout=1.0)
        assert not log.healthy and log.pending > 0
        assert (tmp_path / "spool.jsonl").exists()  # a restart now would not lose the buffer
        proxy.restore()
        assert log.flush(timeout=30)
        assert log.close()
        assert not (tmp_path / "spool.jsonl").exists()
        real_url = url.replace(f"127.0.0.1:{proxy.port}", "127.0.0.1:5432")
        assert count(real_url, m.Message) == 90 + 30  # 90 messages from people, 30 replies
        assert count(real_url, m.Decision) == 90
    finally:
        proxy.close()
        drop_schema(schema)


def test_spool_survives_a_restart_during_an_outage(tmp_path: Path) -> None:
    """The database is down for the whole life of one ChatLog; a later one writes what it buffered."""
    db = tmp_path / "chime.db"
    upgrade(f"sqlite:///{db}")
    unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/test"  # nothing listens on port 1
    spool = tmp_path / "spool.jsonl"
    log = ChatLog(unreachable, spool=spool, retry_initial_s=0.05)
    for i in range(10):
        chat(log, "alice", f"m{i}", False)
    assert not log.close(timeout=0.5)
    assert len(spool.read_text().splitlines()) == 20  # 10 messages + 10 decisions
    log2 = ChatLog(f"sqlite:///{db}", spool=spool)
    assert log2.close(timeout=10)
    assert count(f"sqlite:///{db}", m.Decision) == 10
    assert not spool.exists()


def test_a_bad_operation_goes_to_the_dead_letter_file_not_back_into_the_queue(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    log = ChatLog(url, spool=tmp_path / "spool.jsonl")
    mid, _ = chat(log, "alice", "ok", False)
    log._put({"op": "message", "id": "x" * 40, "platform": "local", "server": {"platform_id": "s", "name": None},
              "channel": {"platform_id": "c", "name": None}, "author": {"platform_id": "a", "name": "a"},
              "display_name": "a", "content": "too long an id", "platform_message_id": "p", "at": "not a time"})
    chat(log, "bob", "fine", False)
    assert log.close()
    assert count(url, m.Decision) == 2
    dead = [json.loads(line) for line in (tmp_path / "spool.dead.jsonl").read_text().splitlines()]
    assert len(dead) == 1 and dead[0]["op"]["content"] == "too long an id"


def _writer(url: str, who: str, n: int) -> None:
    log = ChatLog(url, platform="discord", spool=Path(url.split("///")[-1] + f".{who}.spool") if url.startswith("sqlite") else
                  Path("/tmp") / f"chime-test-{who}-{time.time_ns()}.spool", migrate=False, batch_size=5)
    for i in range(n):
        chat(log, who, f"{who} {i}", i % 2 == 0, channel=f"chan-{who}")
    assert log.close(timeout=60)


def _admin(url: str, rounds: int) -> None:
    """The retraining job's side: reads, exports and writes evaluations while the bot writes."""
    from training.export import export

    engine = make_engine(url)
    for i in range(rounds):
        with session_scope(engine) as s:
            s.add(m.Evaluation(adapter_name=f"v{i}", dataset="dev", n_messages=i, metrics={"macro_f1": 0.9}))
            export(s, Path("/tmp") / f"chime-test-export-{time.time_ns()}.jsonl", record=False)
    engine.dispose()


def test_concurrent_writers_do_not_corrupt_the_database(db_url: str) -> None:
    upgrade(db_url)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db_url, f"w{i}", 60)) for i in range(2)]
    procs.append(ctx.Process(target=_admin, args=(db_url, 15)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    assert count(db_url, m.Decision) == 120
    assert count(db_url, m.Message) == 120 + 60
    assert count(db_url, m.Evaluation) == 15
    if db_url.startswith("sqlite"):
        engine = make_engine(db_url)
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        engine.dispose()


def test_postgres_url_without_driver_uses_psycopg() -> None:
    from model.storage.db import normalize_url

    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url(PG_URL) == PG_URL
