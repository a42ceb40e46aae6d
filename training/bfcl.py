"""`chime bfcl`: Chime's tool calling on the Berkeley Function Calling Leaderboard (BFCL), scored by
the `bfcl-eval` package's own AST checker on its own data.

Each BFCL question becomes a one-message group chat: "User: <question>" addressed to the bot (as a
direct question is), with the entry's functions as the channel's tools, rendered in the model's tool
format. The engine decides (the mention forces a reply), generates greedily, and its parsed calls,
after the same lossless argument coercion a live call gets, go to the checker. For `irrelevance`
the right answer is no call at all. With `max_prompt_tools`, only the k functions BM25 ranks highest
for the question are shown (the retrieval the engine uses when many tools are registered).

`bfcl-eval` runs in its own environment (`make bfcl-setup` -> `.venv-bfcl`; see training/bfcl_score.py
for why); `--bfcl-python` or CHIME_BFCL_PYTHON points elsewhere. BFCL data is evaluation data only:
nothing here writes it where training reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.conversation import ToolCall
from model.errors import ChimeError
from model.tool_format import bare_schema, normalize_schema
from model.tool_retrieval import ToolRetriever
from model.tools import ToolError, validate_against_schema

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
SCORER = Path(__file__).with_name("bfcl_score.py")
DEFAULT_BFCL_PYTHON = ".venv-bfcl/bin/python"
MAX_NEW_TOKENS = 256

# Published reference points (BFCL non-live; issue 4): simple, multiple, parallel, parallel_multiple, irrelevance.
REFERENCES = {
    "Qwen2.5-0.5B-Instruct (FC)": {"simple_python": 61.2, "multiple": 78.0, "parallel": 60.0, "parallel_multiple": 50.0,
                                   "irrelevance": 46.2},
    "Hammer2.1-0.5b (FC)": {"simple_python": 68.0, "multiple": 83.0, "parallel": 71.5, "parallel_multiple": 54.0,
                            "irrelevance": 73.9},
}  # fmt: skip


class BfclUnavailable(ChimeError):
    """bfcl-eval's environment is missing or broken."""


def bfcl_python(explicit: str | None = None) -> str:
    """The Python interpreter of the environment that has bfcl-eval."""
    candidates = [explicit, os.environ.get("CHIME_BFCL_PYTHON"), DEFAULT_BFCL_PYTHON,
                  str(Path(__file__).resolve().parent.parent / DEFAULT_BFCL_PYTHON)]  # fmt: skip
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise BfclUnavailable(
        "bfcl-eval is not installed: run `make bfcl-setup` (creates .venv-bfcl), or point --bfcl-python / "
        "CHIME_BFCL_PYTHON at a Python that has bfcl-eval"
    )


def _run_scorer(python: str, args: Sequence[str], stdin: str | None = None) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [python, str(SCORER), *args], input=stdin, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise BfclUnavailable(f"bfcl-eval failed ({' '.join(args[:1])}): {' | '.join(tail)}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def load_entries(python: str, category: str, limit: int | None = None) -> list[dict[str, Any]]:
    if category not in CATEGORIES:
        raise ChimeError(f"unknown BFCL category {category!r}; choose from {', '.join(CATEGORIES)}")
    return _run_scorer(python, ["dump", category] + ([] if limit is None else ["--limit", str(limit)]))


def score(python: str, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    payload = "".join(json.dumps({"id": r["id"], "category": r["category"], "calls": r["calls"]}) + "\n" for r in results)
    return _run_scorer(python, ["score"], stdin=payload) if results else []


def question_text(entry: dict[str, Any]) -> str:
    """The first turn's user text (non-live BFCL entries are single-turn)."""
    turn = entry["question"][0]
    return "\n".join(m["content"] for m in turn if m.get("role") == "user")


def coerce_call(call: ToolCall, tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The call as the registry would run it: arguments coerced losslessly, or left as generated."""
    schema = next((t for t in tools if t.get("name") == call.name), None)
    args: dict[str, Any] = dict(call.arguments)
    if schema is not None:
        try:
            args = validate_against_schema(call.name, schema, args)
        except ToolError:
            pass  # the checker sees the call as generated, and fails it
    return {"name": call.name, "arguments": args}


def answer_entry(engine: Any, entry: dict[str, Any], max_prompt_tools: int | None = None) -> dict[str, Any]:
    from model.engine import IncomingMessage

    tools = [normalize_schema(bare_schema(f)) for f in entry["function"]]
    text = question_text(entry)
    shown = ToolRetriever(tools).select(text, max_prompt_tools) if max_prompt_tools else tools
    channel = f"bfcl:{entry['id']}"
    engine.reset(channel)
    engine.channel(channel, bot_name="Chime", tools=shown)
    start = time.perf_counter()
    decision = engine.decide(channel, IncomingMessage("User", text, addressed=True))
    reply = engine.generate(channel, max_new_tokens=MAX_NEW_TOKENS)
    engine.reset(channel)
    return {
        "id": entry["id"],
        "category": entry["category"],
        "question": text,
        "shown_tools": [t["name"] for t in shown],
        "p_respond": round(decision.p_respond, 4),
        "p_call": None if reply.p_call is None else round(reply.p_call, 6),  # the call gate's inputs
        "call_relevance": None if reply.call_relevance is None else round(reply.call_relevance, 4),
        "tool_call_threshold": engine.tool_call_threshold,  # 0: every call opened, so `replay_gate` can read it
        "reply": reply.text,
        "calls": [coerce_call(c, tools) for c in reply.tool_calls],
        "parse_errors": reply.errors,
        "seconds": round(time.perf_counter() - start, 3),
    }


def run_bfcl(
    engine: Any,
    categories: Sequence[str] = CATEGORIES,
    limit: int | None = None,
    python: str | None = None,
    max_prompt_tools: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer and score the categories; returns (summary, per-entry details)."""
    py = bfcl_python(python)
    details: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"categories": {}, "max_prompt_tools": max_prompt_tools, "limit": limit}
    start = time.perf_counter()
    for category in categories:
        entries = load_entries(py, category, limit)
        results = []
        for i, entry in enumerate(entries):
            results.append(answer_entry(engine, entry, max_prompt_tools))
            if progress:
                progress(category, i + 1, len(entries))
        verdicts = {v["id"]: v for v in score(py, results)}
        for r in results:
            v = verdicts[r["id"]]
            r["valid"] = bool(v["valid"])
            if not v["valid"]:
                r["error"], r["error_type"] = v.get("error"), v.get("error_type")
        correct = sum(r["valid"] for r in results)
        summary["categories"][category] = {
            "n": len(results),
            "correct": correct,
            "accuracy": round(100 * correct / len(results), 1) if results else None,
            "seconds_per_entry": round(sum(r["seconds"] for r in results) / max(len(results), 1), 2),
        }
        details.extend(results)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary, details


def replay_gate(details: Sequence[dict[str, Any]], threshold: float, weight: float = 0.0) -> dict[str, Any]:
    """The scores the call gate at (`threshold`, `weight`) would get, read off the details of a run that
    opened every call (`chime bfcl --tool-call-threshold 0 --details F`), without generating again.

    An entry whose recorded gate score (`model.engine.gate_score` of its P(call) and relevance) reaches
    the threshold keeps its recorded verdict; one below it would have started its reply in words, which is
    right for `irrelevance` and wrong elsewhere. An entry without P(call) (no tools shown) keeps its
    verdict. Replaying the shipped gate on the 2026-12-07 gate-open run gives the scores of the run at that
    gate (177 of 400 simple_python, 216 of 240 irrelevance). What it cannot see: a reply whose opening was
    banned can still write a call later in its text, which a replay counts as words."""
    from model.engine import gate_score

    closed_runs = sorted({str(r.get("tool_call_threshold")) for r in details if r.get("tool_call_threshold") != 0})
    if closed_runs:
        raise ChimeError(
            "a gate replay needs the details of a run that opened every call (chime bfcl --tool-call-threshold 0 "
            f"--details F); these were recorded with tool_call_threshold {', '.join(closed_runs)}"
        )
    summary: dict[str, Any] = {"categories": {}, "replay": True, "tool_call_threshold": threshold,
                               "tool_call_relevance_weight": weight}  # fmt: skip
    for r in details:
        opened = r.get("p_call") is None or gate_score(r["p_call"], r.get("call_relevance"), weight) >= threshold
        valid = bool(r["valid"]) if opened else r["category"] == "irrelevance"
        c = summary["categories"].setdefault(r["category"], {"n": 0, "correct": 0, "opened": 0})
        c["n"] += 1
        c["correct"] += valid
        c["opened"] += opened
    for c in summary["categories"].values():
        c["accuracy"] = round(100 * c["correct"] / c["n"], 1)
    return summary


def format_table(summary: dict[str, Any], label: str = "Chime") -> str:
    cats = list(summary["categories"])
    head = "| model | " + " | ".join(cats) + " |\n| --- |" + " ---: |" * len(cats) + "\n"
    ours = "| " + label + " | " + " | ".join(
        f"{summary['categories'][c]['accuracy']} ({summary['categories'][c]['n']})" for c in cats
    ) + " |\n"
    refs = "".join("| " + name + " | " + " | ".join(str(ref.get(c, "")) for c in cats) + " |\n" for name, ref in REFERENCES.items())
    return head + ours + refs


def progress_to_stderr(category: str, done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"\r{category}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
