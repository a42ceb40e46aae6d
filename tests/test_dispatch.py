"""The dispatcher in front of the engine: coalescing under load, fairness, bounds, timeouts and failures.

The engine is the tiny random model; its `handle` is wrapped so a test can hold the worker busy (a gate)
or make it slow or fail, which is how a real model falls behind or a remote backend hangs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from model.dispatch import Dispatcher, Job, Outcome
from model.engine import Decision, Engine, IncomingMessage


class Gated:
    """`handle` that waits for `open()` before the first call returns, and records what it decided on."""

    def __init__(self, engine: Engine, delay_s: float = 0.0, fail: bool = False):
        self.engine, self.delay_s, self.fail = engine, delay_s, fail
        self.gate = threading.Event()
        self.started = threading.Event()
        self.decided: list[str] = []

    def __call__(self, channel_id: str, msg: IncomingMessage, threshold: float | None) -> Decision:
        self.started.set()
        self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("backend exploded")
        self.decided.append(msg.content)
        return self.engine.handle(channel_id, msg, threshold=threshold)


def humans(engine: Engine, channel_id: str) -> list[str]:
    """The human turns of the channel's history, decoded."""
    ch = engine.channel(channel_id)
    return [engine.fmt.decode(t.ids) for t in ch.turns if t.kind == "human"]


def job(channel: str, text: str, addressed: bool = False, context_only: bool = False) -> Job:
    return Job(channel, IncomingMessage("alice", text, addressed=addressed), context_only=context_only)


async def wait_started(gated: Gated) -> None:
    while not gated.started.is_set():
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_when_behind_the_newest_message_is_decided_and_the_rest_seen(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=2, tools=[])
    gated = Gated(engine)
    d = Dispatcher(engine, gated)
    first = d.submit(job("a", "m0"))
    await wait_started(gated)  # the worker is busy with m0
    later = [d.submit(job("a", f"m{i}")) for i in range(1, 5)]
    assert d.queued == 4
    gated.gate.set()
    outcomes: list[Outcome] = await asyncio.gather(first, *later)
    assert [o.kind for o in outcomes] == ["decided", "skipped", "skipped", "skipped", "decided"]
    assert gated.decided == ["m0", "m4"]
    assert outcomes[-1].batch == 4 and outcomes[-1].answer is outcomes[-1].job
    # every message is in the history, in order, each followed by a bot turn
    assert [h.split(": ", 1)[-1].strip() for h in humans(engine, "a")] == ["m0", "m1", "m2", "m3", "m4"]
    assert engine.channel("a").turns[-1].kind == "bot"
    assert d.max_queued == 4 and d.stats["skipped"] == 3
    await d.close()


@pytest.mark.asyncio
async def test_an_addressed_message_is_never_shed(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=2, tools=[])
    gated = Gated(engine)
    d = Dispatcher(engine, gated)
    first = d.submit(job("a", "m0"))
    await wait_started(gated)
    asked = d.submit(job("a", "@Chime what is 2+2?", addressed=True))
    newest = d.submit(job("a", "lol"))
    gated.gate.set()
    _, o_asked, o_newest = await asyncio.gather(first, asked, newest)
    assert o_asked.kind == "skipped"
    assert o_newest.kind == "decided" and o_newest.answer is o_asked.job
    assert o_newest.decision is not None and o_newest.decision.addressed
    assert o_newest.decision.decision == "respond"  # addressed: always answered
    await d.close()


@pytest.mark.asyncio
async def test_channels_are_served_oldest_waiting_first(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=2, tools=[])
    gated = Gated(engine)
    d = Dispatcher(engine, gated)
    futures = [d.submit(job("flood", "f0"))]
    await wait_started(gated)
    futures.append(d.submit(job("quiet", "q0")))
    futures += [d.submit(job("flood", f"f{i}")) for i in range(1, 30)]
    gated.gate.set()
    await asyncio.gather(*futures)
    assert gated.decided == ["f0", "q0", "f29"]
    await d.close()


@pytest.mark.asyncio
async def test_a_channel_queue_is_bounded(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=2, tools=[])
    gated = Gated(engine)
    d = Dispatcher(engine, gated, max_pending=3)
    futures = [d.submit(job("a", "m0"))]
    await wait_started(gated)
    futures += [d.submit(job("a", f"m{i}")) for i in range(1, 7)]
    assert d.queued == 3
    gated.gate.set()
    kinds = [o.kind for o in await asyncio.gather(*futures)]
    assert kinds == ["decided", "dropped", "dropped", "dropped", "skipped", "skipped", "decided"]
    await d.close()


@pytest.mark.asyncio
async def test_rate_limited_messages_are_context_in_their_place(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=2, tools=[])
    gated = Gated(engine)
    d = Dispatcher(engine, gated)
    futures = [d.submit(job("a", "m0"))]
    await wait_started(gated)
    futures += [d.submit(job("a", "m1")), d.submit(job("a", "m2", context_only=True))]
    gated.gate.set()
    kinds = [o.kind for o in await asyncio.gather(*futures)]
    assert kinds == ["decided", "decided", "context"]
    assert [h.split(": ", 1)[-1].strip() for h in humans(engine, "a")] == ["m0", "m1", "m2"]
    only_context = d.submit(job("a", "m3", context_only=True))
    assert (await only_context).kind == "context" and gated.decided == ["m0", "m1"]
    await d.close()


@pytest.mark.asyncio
async def test_a_backend_that_times_out_leaves_the_bot_silent_not_hung(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=0.0, max_new_tokens=3, tools=[])  # it would answer everything
    gated = Gated(engine, delay_s=1.0)
    gated.gate.set()
    d = Dispatcher(engine, gated, timeout_s=0.2)
    start = time.monotonic()
    outcome = await d.submit(job("a", "hello?"))
    assert outcome.kind == "timeout" and "0.2 s" in (outcome.error or "")
    assert time.monotonic() - start < 0.9  # answered at the timeout, not when the engine finished
    gated.delay_s = 0.0
    nxt = await d.submit(job("a", "still there?"))  # waits for the stuck call, then goes on
    assert nxt.kind == "decided" and nxt.decision is not None and nxt.decision.decision == "respond"
    # the reply to "hello?" was never posted, so the history holds a silent turn after it
    ch = engine.channel("a")
    kinds = [t.kind for t in ch.turns]
    first_bot = ch.turns[kinds.index("human") + 1]
    assert "(silence)" in engine.fmt.decode(first_bot.ids)
    assert d.stats["timeout"] == 1
    await d.close()


@pytest.mark.asyncio
async def test_an_engine_failure_is_an_outcome_and_the_worker_goes_on(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=2, tools=[])
    gated = Gated(engine, fail=True)
    gated.gate.set()
    d = Dispatcher(engine, gated)
    failed = await d.submit(job("a", "boom"))
    assert failed.kind == "error" and "backend exploded" in (failed.error or "")
    gated.fail = False
    assert (await d.submit(job("a", "ok"))).kind == "decided"
    await d.close()


@pytest.mark.asyncio
async def test_close_resolves_what_is_still_waiting(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=2, tools=[])
    gated = Gated(engine)
    d = Dispatcher(engine, gated)
    first = d.submit(job("a", "m0"))
    await wait_started(gated)
    waiting = d.submit(job("b", "m1"))
    await d.close()
    gated.gate.set()
    assert (await waiting).kind == "dropped"
    assert not first.done() or first.result().kind in ("decided", "dropped")


def test_bench_load_accounts_for_every_message(tiny_engine_factory, tmp_path) -> None:
    """The load benchmark on the tiny model: every message logged once with one decisions row, and every
    reply with its bot message (`lost_rows` is computed from the database, not from the run)."""
    from model.loadtest import bench_load

    engine = tiny_engine_factory(threshold=0.3, max_new_tokens=3, tools=[])
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "name": "alice", "content": f"hi {i}"}, {"role": "user", "name": "bob", "content": "yo"}]}) + "\n"
        for i in range(6)))
    result = bench_load(engine, f"sqlite:///{tmp_path / 'load.db'}", [convs], rate=80, seconds=1.0, channels=4,
                        max_pending=3)
    assert result["messages"] == 80 and result["written"]
    assert sum(result["outcomes"].values()) == 80
    assert result["log_rows"]["messages"] == 80 and result["log_rows"]["decisions"] == 80
    assert result["log_rows"]["bot_messages"] == result["replies"] == result["log_rows"]["replies"]
    assert result["lost_rows"] == 0
    assert result["max_waiting"] <= result["max_waiting_bound"] == 12
    assert result["decision_delay_ms_p95"] is not None
