"""`chime bench load`: a burst of traffic through the dispatcher, the engine and the chat log.

Messages come at a fixed rate (default 50/s for 60 s) over many channels (default 20), as a busy server
would send them: each channel replays real group chats (the people's messages of conversation files, in
order; the dev split by default), and every message is logged on arrival, queued for the engine
(`model/dispatch.py`), and its outcome logged when it comes: a decision (with the reply, as the bot's
message, when it speaks), or skipped/timeout/error/dropped. The engine generates real replies.

What it reports:

- offered and achieved rate; outcomes by kind; replies;
- decision delay (a message's arrival until its decision) p50/p95/max for decided messages, and the
  delay until every message was taken in (decided or seen as context);
- the most messages waiting at once (bounded: at most `max_pending` per channel);
- the engine's busy fraction;
- the log check, read back from the database after the writer drained: every message has exactly one row
  and one decisions row, and every reply a bot message (`lost_rows` must be 0).

The schedule is fixed by `seed` (channel assignment and message order), so runs are comparable; the
timings are this machine's.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.conversation import iter_conversations
from model.dispatch import Dispatcher, Job, Outcome
from model.engine import Engine, IncomingMessage
from model.storage.db import make_engine, safe_url, session_scope
from model.storage.log import ChatLog, Ref


def chat_streams(paths: Sequence[str | Path], channels: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """`channels` streams of (name, text): the people's messages of the conversations in `paths` (files, or
    folders of .jsonl files), whole conversations dealt to channels in a seeded order."""
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("*.jsonl")) if p.is_dir() else [p])]
    convs = [c for f in files for c in iter_conversations(f)]
    if not convs:
        raise ValueError(f"no conversations in {', '.join(map(str, paths))}")
    random.Random(seed).shuffle(convs)
    streams: list[list[tuple[str, str]]] = [[] for _ in range(channels)]
    for i, conv in enumerate(convs):
        streams[i % channels].extend((m.name or "someone", m.content) for m in conv.messages if m.role == "user")
    return streams


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def _drive(engine: Engine, chat_log: ChatLog, streams: list[list[tuple[str, str]]], *, rate: float, seconds: float,
                 timeout_s: float, max_pending: int, progress: Callable[[str], None] | None) -> dict[str, Any]:
    dispatcher = Dispatcher(engine, max_pending=max_pending, timeout_s=timeout_s)
    run = f"load-{time.time_ns()}"
    server = Ref(run, "load test")
    channels = [Ref(f"{run}-{i}", f"channel-{i}") for i in range(len(streams))]
    total = int(rate * seconds)
    cursor = [0] * len(streams)
    handled: list[asyncio.Task[None]] = []
    outcomes: list[Outcome] = []
    replies = 0

    async def settle(job: Job, message_id: str, future: asyncio.Future[Outcome]) -> None:
        nonlocal replies
        outcome = await future
        outcomes.append(outcome)
        d = outcome.decision
        if outcome.kind == "decided" and d is not None:
            bot_message = None
            if d.decision == "respond":
                replies += 1
                bot_message = chat_log.message(server=server, channel=channels[int(job.channel_id)], author=None,
                                               content=d.response or "", bot_name=engine.config.bot_name)
            chat_log.decision(message_id, d, adapter_version=d.adapter_version or engine.adapter_version,
                              model=engine.model_name, bot_message_id=bot_message)
        else:
            kind = "skipped" if outcome.kind == "context" else outcome.kind
            chat_log.unanswered(message_id, kind, latency_ms=outcome.delay_ms, threshold=engine.config.threshold or 0.5,
                                adapter_version=engine.adapter_version, model=engine.model_name)

    start = time.monotonic()
    for i in range(total):
        due = start + i / rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        c = i % len(streams)
        stream = streams[c]
        name, text = stream[cursor[c] % len(stream)]
        cursor[c] += 1
        message_id = chat_log.message(server=server, channel=channels[c], author=Ref(f"{c}-{name}", name), content=text,
                                      bot_name=engine.config.bot_name)
        job = Job(str(c), IncomingMessage(name, text, user_id=f"{c}-{name}"))
        handled.append(asyncio.ensure_future(settle(job, message_id, dispatcher.submit(job))))
        if progress is not None and i % int(rate * 10) == 0 and i:
            progress(f"{i}/{total} sent, {dispatcher.queued} waiting, {len(outcomes)} settled")
    sent_s = time.monotonic() - start
    await asyncio.gather(*handled)
    settled_s = time.monotonic() - start
    await dispatcher.close()
    decided = [o.delay_ms for o in outcomes if o.kind == "decided"]
    kinds = Counter(o.kind for o in outcomes)
    return {
        "run": run, "messages": total, "replies": replies, "sent_seconds": round(sent_s, 2),
        "achieved_rate": round(total / sent_s, 1), "settled_seconds": round(settled_s, 2),
        "outcomes": dict(sorted(kinds.items())),
        "decision_delay_ms_p50": _percentile(decided, 0.5), "decision_delay_ms_p95": _percentile(decided, 0.95),
        "decision_delay_ms_max": _percentile(decided, 1.0),
        "taken_in_delay_ms_p95": _percentile([o.delay_ms for o in outcomes], 0.95),
        "max_waiting": dispatcher.max_queued, "max_waiting_bound": max_pending * len(streams),
        "engine_busy_fraction": round(dispatcher.busy_s / settled_s, 3),
    }


def _count_rows(url: str, run: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from model.storage import models as m

    db = make_engine(url)
    try:
        with session_scope(db) as s:
            channel_ids = select(m.Channel.id).join(m.Server, m.Channel.server_id == m.Server.id).where(
                m.Server.platform_id == run)
            in_run = m.Message.channel_id.in_(channel_ids)
            people = s.scalar(select(func.count()).select_from(m.Message).where(in_run, m.Message.author_kind == "human"))
            bots = s.scalar(select(func.count()).select_from(m.Message).where(in_run, m.Message.author_kind == "bot"))
            decisions = s.scalar(select(func.count()).select_from(m.Decision).join(m.Message).where(in_run))
            replies = s.scalar(select(func.count()).select_from(m.Reply).join(m.Decision).join(
                m.Message, m.Decision.message_id == m.Message.id).where(in_run, m.Reply.message_id.is_not(None)))
    finally:
        db.dispose()
    return {"messages": int(people or 0), "bot_messages": int(bots or 0), "decisions": int(decisions or 0),
            "replies": int(replies or 0)}


def bench_load(engine: Engine, url: str, conversations: Sequence[str | Path], *, rate: float = 50, seconds: float = 60,
               channels: int = 20, seed: int = 0, timeout_s: float = 30.0, max_pending: int = 20,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Drive `rate` messages/s for `seconds` over `channels` channels through `engine` and the chat log at
    `url`; return the figures (see the module docstring)."""
    if rate <= 0 or seconds <= 0 or channels < 1:
        raise ValueError("rate and seconds must be positive and channels at least 1")
    streams = chat_streams(conversations, channels, seed)
    spool = Path(tempfile.mkdtemp(prefix="chime-bench-load-")) / "spool.jsonl"
    chat_log = ChatLog(url, platform="bench", spool=spool)
    try:
        result = asyncio.run(_drive(engine, chat_log, streams, rate=rate, seconds=seconds, timeout_s=timeout_s,
                                    max_pending=max_pending, progress=progress))
        drain_start = time.monotonic()
        written = chat_log.flush(timeout=600)
        result["log_drain_seconds_after_burst"] = round(time.monotonic() - drain_start, 2)
    finally:
        chat_log.close()
    rows = _count_rows(chat_log.url, result["run"])
    result["log_rows"] = rows
    result["lost_rows"] = (result["messages"] - rows["messages"]) + (result["messages"] - rows["decisions"]) + (
        result["replies"] - rows["bot_messages"]) + (result["replies"] - rows["replies"])
    result.update({"written": written, "url": safe_url(chat_log.url), "rate": rate, "seconds": seconds,
                   "channels": channels, "seed": seed, "timeout_s": timeout_s, "max_pending": max_pending,
                   "model": engine.model_name, "adapter": engine.adapter_version})
    return result
