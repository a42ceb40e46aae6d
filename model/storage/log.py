"""`ChatLog`: how the bot front-ends write what happened, without ever waiting on the database.

    log = ChatLog(url, platform="discord")
    mid = log.message(server=Ref("123", "My server"), channel=Ref("456", "general"),
                      author=Ref("789", "alice"), content="anyone up for pizza?", platform_message_id="999")
    log.decision(mid, decision, adapter_version=engine.adapter_version, model=engine.model_name)
    log.close()

Every call turns into an operation (a JSON-able dict with its own id) appended to an in-memory queue;
a writer thread applies the queue in batches, one transaction per batch. If the database is
unreachable the batch stays queued, the queue is saved to a spool file (so a restart during the outage
loses nothing), and the writer retries with backoff until the database returns. Operations are
idempotent (writer-made ids, insert-or-ignore), so a batch that committed but whose acknowledgement was
lost is simply skipped when replayed. A batch that fails for another reason (a bug, bad data) is
retried one operation at a time; an operation that still fails goes to a dead-letter file, never back
into the queue.

Consent is applied when writing: a message from someone who opted out (or was forgotten) is kept only
if their server allows logging opted-out people for moderation; otherwise it and its decision are not
stored at all.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from model.config import data_dir
from model.storage import models as m
from model.storage.db import database_url, make_engine, safe_url, sessions, upgrade

log = logging.getLogger(__name__)

LOCAL_PLATFORM = "local"  # the terminal simulator: its operator is the administrator, consent on by default
DECIDED = ("respond", "silence")
UNDECIDED = ("skipped", "dropped", "timeout", "error")  # decisions-table values for messages not decided on


@dataclass(frozen=True)
class Ref:
    """A platform object (server, channel, person) by its platform id, with its current display name."""

    platform_id: str
    name: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def key(platform: str, platform_id: str) -> str:
    return f"{platform}:{platform_id}"


def is_connection_error(e: BaseException) -> bool:
    """True when `e` means the database could not be reached (retry later), not that the data was bad."""
    if isinstance(e, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(e, DBAPIError) and bool(e.connection_invalidated)


# --------------------------------------------------------------------------- applying operations


def _insert_ignore(session: Session, model: type[m.Base], values: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING (idempotent writes, safe against a concurrent writer)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    else:  # pragma: no cover - other backends: check first (not safe against concurrent writers)
        if session.get(model, values.get("id")) is not None:
            return
        stmt = model.__table__.insert().values(**values)
    session.execute(stmt)


def _get_or_insert(session: Session, model: type[m.Base], values: dict[str, Any]) -> Any:
    """The row with `values["id"]`, inserted from `values` when missing (safe against a concurrent writer)."""
    row = session.get(model, values["id"])
    if row is None:
        _insert_ignore(session, model, {**values, "created_at": datetime.now(timezone.utc)})
        row = session.get(model, values["id"])
        assert row is not None
    return row


def ensure_server(session: Session, platform: str, ref: Ref) -> m.Server:
    server = _get_or_insert(session, m.Server, {
        "id": key(platform, ref.platform_id), "platform": platform, "platform_id": ref.platform_id, "name": ref.name,
        "training_consent": platform == LOCAL_PLATFORM, "log_opted_out": False,
    })
    if ref.name and server.name != ref.name:
        server.name = ref.name
    return server


def ensure_channel(session: Session, platform: str, server_id: str, ref: Ref, bot_name: str | None) -> m.Channel:
    channel = _get_or_insert(session, m.Channel, {
        "id": key(platform, ref.platform_id), "server_id": server_id, "platform_id": ref.platform_id, "name": ref.name,
        "bot_name": bot_name,
    })
    if ref.name and channel.name != ref.name:
        channel.name = ref.name
    if bot_name and channel.bot_name != bot_name:
        channel.bot_name = bot_name
    return channel


def ensure_person(session: Session, platform: str, ref: Ref) -> m.Person:
    person = _get_or_insert(session, m.Person, {
        "id": key(platform, ref.platform_id), "platform": platform, "platform_id": ref.platform_id,
        "display_name": ref.name, "opted_out": False,
    })
    if ref.name and person.display_name != ref.name and person.forgotten_at is None:
        person.display_name = ref.name
    return person


def may_log(server: m.Server, person: m.Person | None) -> bool:
    """Whether a message by `person` may be stored at all (consent rules; bots' own messages always)."""
    if person is None:
        return True
    if person.opted_out or person.forgotten_at is not None:
        return server.log_opted_out
    return True


def _find_message(session: Session, channel_key: str, platform_message_id: str) -> m.Message | None:
    return session.scalars(
        select(m.Message).where(m.Message.channel_id == channel_key, m.Message.platform_message_id == platform_message_id)
    ).first()


def _apply_message(session: Session, op: dict[str, Any]) -> None:
    platform = op["platform"]
    server = ensure_server(session, platform, Ref(**op["server"]))
    channel = ensure_channel(session, platform, server.id, Ref(**op["channel"]), op.get("bot_name"))
    person = ensure_person(session, platform, Ref(**op["author"])) if op.get("author") else None
    if not may_log(server, person):
        return
    reply_to = None
    if op.get("reply_to_platform_id"):
        target = _find_message(session, channel.id, op["reply_to_platform_id"])
        reply_to = target.id if target is not None else None
        if person is None and target is None:
            return  # the bot's answer to a message that is not stored (opted out, deleted, forgotten): not kept either
    _insert_ignore(session, m.Message, {
        "id": op["id"], "channel_id": channel.id, "person_id": person.id if person else None,
        "author_kind": "human" if person else "bot", "platform_message_id": op.get("platform_message_id"),
        "display_name": op["display_name"], "content": op["content"], "addressed": bool(op.get("addressed")),
        "reply_to_id": reply_to, "created_at": _time(op["at"]),
    })


def _apply_decision(session: Session, op: dict[str, Any]) -> None:
    if session.get(m.Message, op["message_id"]) is None:
        return  # the message was not stored (consent) or has been deleted/forgotten since
    if session.get(m.Decision, op["id"]) is not None:
        return
    at = _time(op["at"])
    _insert_ignore(session, m.Decision, {
        "id": op["id"], "message_id": op["message_id"], "decision": op["decision"], "p_respond": op.get("p_respond"),
        "threshold": op["threshold"], "addressed": bool(op.get("addressed")), "adapter_version": op["adapter_version"],
        "model": op.get("model"), "latency_ms": op["latency_ms"], "created_at": at,
    })
    reply = op.get("reply")
    if reply is not None:
        bot_message = reply.get("message_id")
        if bot_message is not None and session.get(m.Message, bot_message) is None:
            bot_message = None
        _insert_ignore(session, m.Reply, {
            "id": reply["id"], "decision_id": op["id"], "message_id": bot_message, "text": reply["text"],
            "n_tokens": reply.get("n_tokens", 0), "reply_ms": reply.get("reply_ms"), "created_at": at,
        })
    for i, call in enumerate(op.get("tool_calls") or []):
        _insert_ignore(session, m.ToolCallRecord, {
            "id": call["id"], "decision_id": op["id"], "position": i, "name": call["name"][:200],
            "arguments": call["arguments"], "ok": call.get("ok"), "result": call.get("result"), "created_at": at,
        })


def _apply_edit(session: Session, op: dict[str, Any]) -> None:
    msg = _find_message(session, key(op["platform"], op["channel"]), op["platform_message_id"])
    if msg is not None:
        msg.content = op["content"]
        msg.edited_at = _time(op["at"])


def delete_message_row(session: Session, msg: m.Message, at: datetime) -> None:
    """A person's message is removed with everything derived from it; the bot's own is kept, marked deleted."""
    if msg.author_kind == "bot":
        msg.deleted_at = at
        return
    # the bot's answer to it is derived from it: remove every posted piece of it (a long answer is several
    # messages, each a reply to this one), whether or not a decision links it
    replies = set(session.scalars(
        select(m.Reply.message_id).join(m.Decision, m.Reply.decision_id == m.Decision.id).where(m.Decision.message_id == msg.id)
    ).all())
    replies |= set(session.scalars(
        select(m.Message.id).where(m.Message.reply_to_id == msg.id, m.Message.author_kind == "bot")).all())
    for bot_msg in [r for r in replies if r]:
        row = session.get(m.Message, bot_msg)
        if row is not None:
            session.delete(row)
    session.delete(msg)


def _apply_delete(session: Session, op: dict[str, Any]) -> None:
    msg = _find_message(session, key(op["platform"], op["channel"]), op["platform_message_id"])
    if msg is not None:
        delete_message_row(session, msg, _time(op["at"]) or datetime.now(timezone.utc))


def _apply_reaction(session: Session, op: dict[str, Any]) -> None:
    msg = _find_message(session, key(op["platform"], op["channel"]), op["platform_message_id"])
    if msg is None:
        return
    person = ensure_person(session, op["platform"], Ref(**op["person"]))
    if person.opted_out or person.forgotten_at is not None:
        return
    if op.get("removed"):
        session.execute(
            update(m.Feedback)
            .where(m.Feedback.message_id == msg.id, m.Feedback.person_id == person.id, m.Feedback.value == op["emoji"],
                   m.Feedback.kind == "reaction", m.Feedback.removed_at.is_(None))
            .values(removed_at=_time(op["at"]))
        )
        return
    _insert_ignore(session, m.Feedback, {
        "id": op["id"], "message_id": msg.id, "person_id": person.id, "kind": "reaction", "value": op["emoji"][:64],
        "text": None, "created_at": _time(op["at"]),
    })


APPLY = {
    "message": _apply_message,
    "decision": _apply_decision,
    "edit": _apply_edit,
    "delete": _apply_delete,
    "reaction": _apply_reaction,
}


def apply_ops(session: Session, ops: Iterable[dict[str, Any]]) -> None:
    for op in ops:
        APPLY[op["op"]](session, op)
        session.flush()


# --------------------------------------------------------------------------- the writer


class ChatLog:
    """Buffered, outage-proof logging of messages, decisions, edits, deletions and reactions."""

    def __init__(
        self,
        url: str | None = None,
        platform: str = LOCAL_PLATFORM,
        spool: str | Path | None = None,
        batch_size: int = 200,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        migrate: bool = True,
        start: bool = True,
    ):
        self.url = database_url(url)
        self.platform = platform
        if migrate:
            try:
                upgrade(self.url)
            except Exception as e:  # noqa: BLE001 - the bot keeps working; the writer retries later
                log.warning("chat log: cannot migrate %s now (%s); will keep trying", safe_url(self.url), e)
        self.engine = make_engine(self.url)
        self._sessions = sessions(self.engine)
        safe = "".join(ch if ch.isalnum() else "_" for ch in safe_url(self.url))[-80:]
        self.spool_path = Path(spool) if spool else data_dir() / "spool" / f"{safe}.jsonl"
        self.dead_letter_path = self.spool_path.with_suffix(".dead.jsonl")
        self.batch_size = batch_size
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self._pending: collections.deque[dict[str, Any]] = collections.deque(self._load_spool())
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self.healthy = True
        self.written = 0
        self.failures = 0
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # ---------------------------------------------------------------- the front-end API (never raises on DB trouble)

    def message(
        self,
        *,
        server: Ref,
        channel: Ref,
        author: Ref | None,
        content: str,
        display_name: str | None = None,
        platform_message_id: str | None = None,
        addressed: bool = False,
        reply_to_platform_id: str | None = None,
        bot_name: str | None = None,
        at: datetime | None = None,
    ) -> str:
        """Queue a message (author None: the bot's own); returns its id (for `decision`)."""
        op_id = m.new_id()
        self._put({
            "op": "message", "id": op_id, "platform": self.platform, "server": _ref(server), "channel": _ref(channel),
            "author": _ref(author) if author else None, "display_name": display_name or (author.name if author else bot_name) or "",
            "content": content, "platform_message_id": platform_message_id or op_id, "addressed": addressed,
            "reply_to_platform_id": reply_to_platform_id, "bot_name": bot_name,
            "at": (at or datetime.now(timezone.utc)).isoformat(),
        })
        return op_id

    def decision(self, message_id: str, d: Any, *, adapter_version: str, model: str | None = None,
                 bot_message_id: str | None = None) -> str:
        """Queue the engine's `Decision` on message `message_id`, with its reply and tool calls."""
        op_id = m.new_id()
        results = list(d.tool_results)
        calls = []
        for i, c in enumerate(d.tool_calls):
            r = results[i] if i < len(results) else None
            calls.append({"id": m.new_id(), "name": c.name, "arguments": _jsonable(c.arguments),
                          "ok": None if r is None else r.ok, "result": None if r is None else r.content})
        reply = None
        if d.decision == "respond":
            reply = {"id": m.new_id(), "text": d.response or "", "n_tokens": d.reply_tokens, "reply_ms": d.reply_ms,
                     "message_id": bot_message_id}
        self._put({
            "op": "decision", "id": op_id, "message_id": message_id, "decision": d.decision, "p_respond": float(d.p_respond),
            "threshold": float(d.threshold), "addressed": bool(d.addressed), "adapter_version": adapter_version,
            "model": model, "latency_ms": float(d.latency_ms), "reply": reply, "tool_calls": calls, "at": _now(),
        })
        return op_id

    def unanswered(self, message_id: str, outcome: str, *, latency_ms: float, threshold: float, addressed: bool = False,
                   adapter_version: str, model: str | None = None) -> str:
        """Queue a message the engine did not decide on: `skipped` (seen as context while a newer message of
        its channel was decided), `dropped` (its channel's queue overflowed), `timeout` or `error`. It has no
        P(respond) and no label."""
        if outcome not in UNDECIDED:
            raise ValueError(f"not an undecided outcome: {outcome!r} (one of {', '.join(UNDECIDED)})")
        op_id = m.new_id()
        self._put({
            "op": "decision", "id": op_id, "message_id": message_id, "decision": outcome, "p_respond": None,
            "threshold": float(threshold), "addressed": bool(addressed), "adapter_version": adapter_version,
            "model": model, "latency_ms": float(latency_ms), "reply": None, "tool_calls": [], "at": _now(),
        })
        return op_id

    def edit(self, channel: str, platform_message_id: str, content: str, at: datetime | None = None) -> None:
        self._put({"op": "edit", "id": m.new_id(), "platform": self.platform, "channel": channel,
                   "platform_message_id": platform_message_id, "content": content,
                   "at": (at or datetime.now(timezone.utc)).isoformat()})

    def delete(self, channel: str, platform_message_id: str, at: datetime | None = None) -> None:
        self._put({"op": "delete", "id": m.new_id(), "platform": self.platform, "channel": channel,
                   "platform_message_id": platform_message_id, "at": (at or datetime.now(timezone.utc)).isoformat()})

    def reaction(self, channel: str, platform_message_id: str, person: Ref, emoji: str, removed: bool = False,
                 at: datetime | None = None) -> None:
        self._put({"op": "reaction", "id": m.new_id(), "platform": self.platform, "channel": channel,
                   "platform_message_id": platform_message_id, "person": _ref(person), "emoji": emoji, "removed": removed,
                   "at": (at or datetime.now(timezone.utc)).isoformat()})

    # ---------------------------------------------------------------- lifecycle

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chime-chatlog", daemon=True)
            self._thread.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written; False if the timeout came first (e.g. DB down)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Write what can be written within `timeout`; spool the rest to disk. True if nothing is left."""
        done = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout))
            self._thread = None
        with self._cond:
            if self._pending:
                self._save_spool()
        self.engine.dispose()
        return done

    # ---------------------------------------------------------------- internals

    def _put(self, op: dict[str, Any]) -> None:
        with self._cond:
            self._pending.append(op)
            self._cond.notify_all()

    def _run(self) -> None:
        delay = self.retry_initial_s
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing and (not self._pending or not self.healthy):
                    return
                batch = [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]
                self._busy = True
            try:
                self._write(batch)
            except Exception as e:  # noqa: BLE001 - any failure keeps the batch; the loop decides what to do
                if is_connection_error(e):
                    self.failures += 1
                    if self.healthy:
                        log.warning("chat log: database unreachable (%s); buffering", type(e).__name__)
                    self.healthy = False
                    with self._cond:
                        self._busy = False
                        self._save_spool()
                        self._cond.wait(delay)  # woken early by close()
                        if self._closing:
                            return
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                log.exception("chat log: a batch failed; retrying its operations one by one")
                self._write_one_by_one(batch)
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                self._busy = False
                self.written += len(batch)
                if not self.healthy:
                    log.warning("chat log: database back; %d operations left to write", len(self._pending))
                self.healthy = True
                delay = self.retry_initial_s
                if self.spool_path.exists():
                    if self._pending:
                        self._save_spool()
                    else:
                        self.spool_path.unlink(missing_ok=True)
                self._cond.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        with self._sessions() as session, session.begin():
            apply_ops(session, batch)

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> None:
        for op in batch:
            while True:
                try:
                    self._write([op])
                    break
                except Exception as e:  # noqa: BLE001
                    if is_connection_error(e):  # the database went away meanwhile: wait for it
                        time.sleep(self.retry_initial_s)
                        if self._closing:
                            raise
                        continue
                    log.error("chat log: operation %s (%s) rejected: %s; kept in %s", op.get("id"), op.get("op"), e,
                              self.dead_letter_path)
                    self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
                    with self.dead_letter_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"error": str(e)[:500], "op": op}, ensure_ascii=False) + "\n")
                    break

    def _save_spool(self) -> None:
        """Persist the queue (atomically) so a restart during an outage loses nothing."""
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for op in self._pending:
                f.write(json.dumps(op, ensure_ascii=False) + "\n")
        tmp.replace(self.spool_path)

    def _load_spool(self) -> list[dict[str, Any]]:
        if not self.spool_path.exists():
            return []
        ops = []
        for line in self.spool_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    ops.append(json.loads(line))
                except json.JSONDecodeError:
                    log.error("chat log: skipping a corrupt spool line in %s", self.spool_path)
        if ops:
            log.info("chat log: %d operations from the spool %s will be written first", len(ops), self.spool_path)
        return ops


def _ref(ref: Ref) -> dict[str, Any]:
    return {"platform_id": str(ref.platform_id), "name": ref.name}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def bench_log(url: str, messages: int = 2000) -> dict[str, Any]:
    """What logging costs the bot and how fast the writer drains: `messages` person messages, each with a
    decision (every third one answered, with a reply message), queued as fast as possible.

    Reports the enqueue time per message (what a decision pays: message, decision and reply queued), the
    time until everything is written, and messages and rows per second.
    """
    import tempfile
    from types import SimpleNamespace

    spool = Path(tempfile.mkdtemp(prefix="chime-bench-log-")) / "spool.jsonl"
    log_ = ChatLog(url, platform="bench", spool=spool, start=False)
    server, channel = Ref("bench-server"), Ref(f"bench-{time.time_ns()}")
    enqueue = []
    start = time.perf_counter()
    for i in range(messages):
        t0 = time.perf_counter()
        mid = log_.message(server=server, channel=channel, author=Ref(f"p{i % 7}", f"person {i % 7}"), content=f"message {i}")
        answered = i % 3 == 0
        bot = log_.message(server=server, channel=channel, author=None, content=f"reply {i}", bot_name="Chime") if answered else None
        d = SimpleNamespace(decision="respond" if answered else "silence", p_respond=0.5, threshold=0.5, addressed=False,
                            latency_ms=40.0, response=f"reply {i}" if answered else None, reply_tokens=3, reply_ms=100.0,
                            tool_calls=[], tool_results=[])
        log_.decision(mid, d, adapter_version="bench", model="bench", bot_message_id=bot)
        enqueue.append(time.perf_counter() - t0)
        if i == 0:
            log_.start()
    queued = time.perf_counter() - start
    ok = log_.flush(timeout=600)
    drained = time.perf_counter() - start
    log_.close()
    n_answered = (messages + 2) // 3
    rows = messages * 2 + n_answered * 2  # people's messages and decisions; replies and the bot's messages
    enqueue.sort()
    return {
        "url": safe_url(log_.url),
        "messages": messages,
        "enqueue_us_p50": round(enqueue[len(enqueue) // 2] * 1e6, 1),
        "enqueue_us_p99": round(enqueue[int(len(enqueue) * 0.99)] * 1e6, 1),
        "queue_seconds": round(queued, 3),
        "written": ok,
        "drain_seconds": round(drained, 3),
        "messages_per_second": round(messages / drained, 1),
        "rows_per_second": round(rows / drained, 1),
    }
