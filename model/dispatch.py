"""One engine, many channels: a bounded queue per channel, one worker, and load shedding.

The engine is one model on one device, so it decides one message at a time. A busy server can send more
messages than that allows; queueing all of them would make every decision later than the last, and an
answer to a conversation that moved on is worse than none. So each channel keeps its own pending
messages, and when the worker gets to a channel it takes all of them at once:

- the newest message is decided (and answered when the bot speaks);
- the older ones are *seen*: they go into the channel's history as context with a silent bot turn
  (`Engine.observe`), and their outcome says so, so the caller can record them;
- if one of the older ones addressed the bot, the newest is decided as addressed, and the outcome names
  the addressed message as the one to answer: an @mention is never shed.

Channels are served oldest-waiting first, so a flood in one channel cannot starve the others. A channel
holds at most `max_pending` waiting messages; past that its oldest are dropped from the engine's context
(they are still in the chat log, which the caller writes on arrival).

An engine call that takes longer than `timeout_s` (a stuck remote backend, say) resolves its messages as
`timeout`: the bot stays silent and the caller logs it, instead of hanging. The call itself cannot be
interrupted; when it finally returns, a reply it committed to the history is retracted (it was never
posted), and the worker goes on with what queued meanwhile.

    dispatcher = Dispatcher(engine, timeout_s=30)
    outcome = await dispatcher.submit(Job("general", IncomingMessage("alice", "hi")))
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from model.engine import Decision, Engine, IncomingMessage

log = logging.getLogger(__name__)

OutcomeKind = Literal["decided", "skipped", "context", "dropped", "timeout", "error"]


@dataclass(eq=False)
class Job:
    """A message for the engine. `context_only`: taken in as context, never answered (e.g. rate-limited)."""

    channel_id: str
    incoming: IncomingMessage
    threshold: float | None = None
    context_only: bool = False
    tag: Any = None  # the caller's own (e.g. the platform message)
    arrived: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Outcome] | None = field(default=None, repr=False)


@dataclass
class Outcome:
    """What became of a job.

    decided   the engine decided on it; `decision` says what, `answer` is the job to reply to (itself, or
              an older addressed message of the channel that was shed in its favour)
    skipped   a newer message of the channel was decided instead; this one was seen as context
    context   a context-only job, seen
    dropped   the channel's queue overflowed; this one is in the chat log but not in the engine's context
    timeout   the engine took longer than the timeout; the bot stays silent
    error     the engine failed; `error` says how
    """

    kind: OutcomeKind
    job: Job
    decision: Decision | None = None
    answer: Job | None = None
    delay_ms: float = 0.0  # arrival until this outcome
    batch: int = 1  # messages the engine call took in
    error: str | None = None


class Dispatcher:
    """Per-channel queues in front of one engine worker; see the module docstring."""

    def __init__(self, engine: Engine, handle: Callable[[str, IncomingMessage, float | None], Decision] | None = None,
                 *, max_pending: int = 20, timeout_s: float | None = 60.0):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.engine = engine
        self._handle = handle or (lambda channel_id, msg, threshold: engine.handle(channel_id, msg, threshold=threshold))
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self._pending: dict[str, collections.deque[Job]] = {}
        self._ready: collections.OrderedDict[str, None] = collections.OrderedDict()  # channels waiting, oldest first
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.stats = collections.Counter[str]()
        self.max_queued = 0  # the most messages waiting at once (all channels)
        self.busy_s = 0.0  # time spent in engine calls

    # ---------------------------------------------------------------- the caller's side

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def start(self) -> None:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="chime-dispatcher")

    async def close(self) -> None:
        """Stop the worker; jobs still waiting resolve as dropped."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for q in self._pending.values():
            for job in q:
                self._resolve(Outcome("dropped", job))
        self._pending.clear()
        self._ready.clear()

    def submit(self, job: Job) -> asyncio.Future[Outcome]:
        """Queue `job`; the returned future resolves with its `Outcome` (never with an exception)."""
        self.start()
        assert self._wake is not None
        job.future = asyncio.get_running_loop().create_future()
        q = self._pending.setdefault(job.channel_id, collections.deque())
        q.append(job)
        if len(q) > self.max_pending:
            self._resolve(Outcome("dropped", q.popleft()))
            self.stats["dropped"] += 1
        self._ready.setdefault(job.channel_id, None)
        self.max_queued = max(self.max_queued, self.queued)
        self._wake.set()
        return job.future

    # ---------------------------------------------------------------- the worker

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            channel_id, _ = self._ready.popitem(last=False)
            jobs = list(self._pending.pop(channel_id, ()))
            if jobs:
                await self._serve(channel_id, jobs)

    async def _serve(self, channel_id: str, jobs: list[Job]) -> None:
        answerable = [j for j in jobs if not j.context_only]
        chosen = answerable[-1] if answerable else None
        seen = [j for j in jobs if j is not chosen]
        answer = chosen
        incoming = None
        if chosen is not None:
            addressed = [j for j in answerable if j.incoming.addressed]
            incoming = chosen.incoming
            if addressed and not chosen.incoming.addressed:
                answer = addressed[-1]
                incoming = dataclasses.replace(chosen.incoming, addressed=True)
        started = time.perf_counter()
        call = asyncio.ensure_future(asyncio.to_thread(self._engine_call, channel_id, jobs, chosen, incoming))
        try:
            decision = await asyncio.wait_for(asyncio.shield(call), self.timeout_s)
        except asyncio.TimeoutError:
            log.warning("engine: channel %s took longer than %.1f s for %d messages; staying silent", channel_id,
                        self.timeout_s, len(jobs))
            self.stats["timeout"] += len(jobs)
            for job in jobs:
                self._resolve(Outcome("timeout", job, batch=len(jobs), error=f"no decision within {self.timeout_s:g} s"))
            await self._finish_late(channel_id, call)
            self.busy_s += time.perf_counter() - started
            return
        except Exception as e:  # the engine failed: these messages go unanswered, the worker goes on
            log.exception("engine: channel %s failed on %d messages", channel_id, len(jobs))
            self.stats["error"] += len(jobs)
            for job in jobs:
                self._resolve(Outcome("error", job, batch=len(jobs), error=f"{type(e).__name__}: {e}"))
            self.busy_s += time.perf_counter() - started
            return
        self.busy_s += time.perf_counter() - started
        for job in seen:
            kind: OutcomeKind = "context" if job.context_only else "skipped"
            self.stats[kind] += 1
            self._resolve(Outcome(kind, job, batch=len(jobs)))
        if chosen is not None:
            assert decision is not None
            self.stats["decided"] += 1
            self._resolve(Outcome("decided", chosen, decision=decision, answer=answer, batch=len(jobs)))

    def _engine_call(self, channel_id: str, jobs: list[Job], chosen: Job | None,
                     incoming: IncomingMessage | None) -> Decision | None:
        """In arrival order: the jobs before the chosen one as context, the chosen one decided, then the
        context-only jobs that came after it."""
        decision = None
        for job in jobs:
            if job is chosen and incoming is not None:
                decision = self._handle(channel_id, incoming, job.threshold)
            else:
                self.engine.observe(channel_id, job.incoming.name, job.incoming.content)
        return decision

    async def _finish_late(self, channel_id: str, call: asyncio.Future[Decision | None]) -> None:
        """Wait for a timed-out engine call (it holds the engine) and undo a reply nobody will see."""
        try:
            decision = await call
        except Exception:
            log.exception("engine: the timed-out call in channel %s failed when it finished", channel_id)
            return
        if decision is not None and decision.decision == "respond":
            await asyncio.to_thread(self.engine.retract_reply, channel_id)

    def _resolve(self, outcome: Outcome) -> None:
        future = outcome.job.future
        outcome.delay_ms = (time.monotonic() - outcome.job.arrived) * 1000
        if future is not None and not future.done():
            future.set_result(outcome)
