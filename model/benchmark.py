"""Benchmarks of the engine: decision latency against history length, reply speed, matmul throughput.

Library code: returns dicts, prints nothing. `chime bench decide|generate|memory` runs them and writes
the figures (and a PNG plot) that BENCHMARKS.md records.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from model.chat_format import BotTurn
from model.engine import Engine, IncomingMessage

# A pool of ordinary group-chat lines to grow synthetic histories from.
_CHAT_LINES = [
    ("alice", "anyone up for pizza tonight? I was thinking the place on 5th street"),
    ("bob", "I'm in, but can we make it after 7? I have a call until then"),
    ("carol", "7:30 works for me. should we book a table or just walk in?"),
    ("dave", "they don't take bookings on fridays I think, last time we waited 20 minutes"),
    ("erin", "lol that was the night the oven broke"),
    ("alice", "ok let's meet at 7:30 at the corner then, whoever is first grabs a table"),
    ("frank", "sorry just catching up, is this for tonight or tomorrow?"),
    ("bob", "tonight! 7:30 at the pizza place on 5th"),
    ("carol", "has anyone finished the report for monday? I'm stuck on the budget section"),
    ("dave", "I did the first half, the numbers are in the shared sheet under Q3"),
    ("erin", "the Q3 tab has the old exchange rate though, we should update it"),
    ("frank", "I can fix the rates tomorrow morning if someone sends me the source"),
    ("alice", "here's the link from finance, it has the daily rates for the whole quarter"),
    ("bob", "thanks! also did anyone see the match last night? what a finish"),
    ("carol", "that last-minute goal was unreal, I jumped off the couch"),
    ("dave", "I missed it, no spoilers please, watching the replay later"),
]

BENCH_MESSAGE = "quick question for everyone: does the new schedule mean we start at nine on Mondays, or do we keep the old times?"


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 10) -> float:
    """Measured dense matmul throughput on this machine (GFLOP/s) for reference."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def message_of_tokens(engine: Engine, n_tokens: int, name: str = "maria") -> str:
    """A message whose whole user turn (wrapper included) is about `n_tokens` tokens."""
    words = BENCH_MESSAGE.split()
    text = ""
    i = 0
    while len(engine.fmt.human_ids(name, text)) < n_tokens:
        text = (text + " " + words[i % len(words)]).strip()
        i += 1
    return text


def build_history(engine: Engine, channel_id: str, tokens: int) -> int:
    """Fill a fresh channel with ordinary chat (human + silence turns) up to `tokens` of history."""
    engine.reset(channel_id)
    ch = engine.channel(channel_id)
    i = 0
    while ch.history_tokens() - len(ch.system_ids) < tokens:
        name, text = _CHAT_LINES[i % len(_CHAT_LINES)]
        engine.observe(channel_id, name, text)
        i += 1
    return ch.history_tokens() - len(ch.system_ids)


def _time_decisions(engine: Engine, channel_id: str, message: str, repeats: int) -> list[float]:
    ch = engine.channel(channel_id)
    # Warm the cache as a live channel is: the history, the last bot turn and the next user turn's
    # header are already encoded (`Engine.prefill`); the decision pays for the message itself.
    engine.decide(channel_id, IncomingMessage("maria", "ok"))
    engine.commit(channel_id, BotTurn(kind="silence"))
    engine.prefill(channel_id)  # what `handle` does after every turn
    mark = len(ch.turns)
    cached = len(ch.cache_ids)
    times = []
    for _ in range(repeats):
        d = engine.decide(channel_id, IncomingMessage("maria", message))
        times.append(d.latency_ms)
        # Roll back to the warm state: history encoded, the last bot turn's tail still pending.
        del ch.turns[mark:]
        ch.awaiting_bot_turn = False
        engine.runner.crop(ch.state, min(cached, engine.runner.length(ch.state)))
        ch.cache_ids = ch.cache_ids[: engine.runner.length(ch.state)]
    return times


def bench_decide(
    engine: Engine,
    history_tokens: Sequence[int] = (0, 500, 1500, 3000),
    message_tokens: int = 30,
    repeats: int = 9,
    full_repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decision latency per message as history grows: incremental cache against full re-encoding."""
    budget = max(history_tokens) + 1024
    incremental = Engine(engine.runner, engine.fmt, dataclasses.replace(engine.config, incremental=True, max_context_tokens=max(budget, engine.config.max_context_tokens)), engine.model_name)
    full = Engine(engine.runner, engine.fmt, dataclasses.replace(incremental.config, incremental=False), engine.model_name)
    message = message_of_tokens(engine, message_tokens)
    result: dict[str, Any] = {
        "history_tokens": [],
        "incremental_p50_ms": [],
        "full_p50_ms": [],
        "speedup": [],
        "message_tokens": len(engine.fmt.human_ids("maria", message)),
        "repeats": repeats,
    }
    for target in history_tokens:
        if progress:
            progress(f"history {target} tokens")
        actual = build_history(incremental, "bench", target)
        inc = statistics.median(_time_decisions(incremental, "bench", message, repeats))
        build_history(full, "bench", target)
        ful = statistics.median(_time_decisions(full, "bench", message, full_repeats))
        result["history_tokens"].append(actual)
        result["incremental_p50_ms"].append(round(inc, 2))
        result["full_p50_ms"].append(round(ful, 2))
        result["speedup"].append(round(ful / inc, 1))
    result["matmul_gflops_fp32"] = round(matmul_gflops(torch.float32), 1)
    result["matmul_gflops_bf16"] = round(matmul_gflops(torch.bfloat16), 1)
    result.update(environment(engine))
    return result


def bench_generate(engine: Engine, new_tokens: int = 64, history_tokens: int = 500, repeats: int = 3) -> dict[str, Any]:
    """Reply generation speed (tokens/s) after a history, sampling forced to run `new_tokens` tokens."""
    rates = []
    for _ in range(repeats):
        build_history(engine, "bench-gen", history_tokens)
        engine.decide("bench-gen", IncomingMessage("maria", "@" + engine.config.bot_name + " can you summarise the plan?"))
        reply = engine.generate("bench-gen", max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        rates.append(reply.n_tokens / (reply.ms / 1000))
    engine.reset("bench-gen")
    return {
        "new_tokens": new_tokens,
        "history_tokens": history_tokens,
        "tokens_per_s_p50": round(statistics.median(rates), 1),
        "tokens_per_s": [round(r, 1) for r in rates],
        **environment(engine),
    }


def environment(engine: Engine) -> dict[str, Any]:
    runner = engine.runner
    return {
        "model": engine.model_name,
        "adapter": engine.adapter,
        "runner": type(runner).__name__,
        "dtype": str(getattr(runner, "dtype", "model")).replace("torch.", ""),
        "device": runner.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
