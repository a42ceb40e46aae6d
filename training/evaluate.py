"""Evaluation: replay conversation files and score when the bot speaks.

Every scored human message is decided exactly as the live bot would: the engine sees only the
messages before it, with the bot's own earlier turns as they are in the file (not its own earlier
decisions), and the incremental cache makes each decision cost only the new tokens. Replies are not
generated unless asked (`generate=True`); where the file expects tool calls, a short generation asks
the model for the call so that `tool_call_accuracy` (same tool, same arguments) and
`tool_call_result_accuracy` (same tool, same result when the registry runs both calls) can be scored.

Run it as `chime eval conversations/dev.jsonl --json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from model.answer_numbers import decimal_places, number_forms, number_runs
from model.chat_format import BotTurn
from model.conversation import Conversation, ToolCall, scored_messages
from model.engine import Engine, IncomingMessage, decision_rule, gate_score, names_bot

TOOL_CALL_MAX_NEW_TOKENS = 160  # room for three calls with a few arguments each


@dataclass
class EvalRow:
    conversation_id: str | None
    index: int
    name: str
    content: str
    expected: str
    decision: str
    p_respond: float
    addressed: bool
    names_bot: bool
    latency_ms: float
    expected_tool_calls: list[dict[str, Any]] = field(default_factory=list)
    predicted_tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_calls_matched: int = 0
    tool_calls_matched_by_result: int = 0
    response: str | None = None
    p_call: float | None = None  # P(the answer opens with a tool call), on expected answers where tools are listed
    call_relevance: float | None = None  # how much of the message the listed tools cover, where p_call is read


def _canonical(value: Any) -> Any:
    """Arguments compared by value: 12 == 12.0, key order ignored, strings trimmed."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def count_matching_calls(expected: Sequence[ToolCall], predicted: Sequence[ToolCall]) -> int:
    """How many expected calls the prediction reproduces (same name and arguments; each used once)."""
    return count_matching_results(expected, predicted, registry=None)


def count_matching_results(expected: Sequence[ToolCall], predicted: Sequence[ToolCall], registry: Any) -> int:
    """How many expected calls the prediction reproduces (each used once) by effect: a registered tool
    run on both calls gives the same successful result ("84.5*1.15/3" and "84.5 * 1.15 / 3" agree);
    calls to tools the registry lacks (a file's own schemas, or registry None) must match exactly."""

    def key(call: ToolCall) -> tuple[str, str]:
        if registry is not None and call.name in registry:
            result = registry.execute(call)
            if result.ok:
                return call.name, "result:" + result.content
        return call.name, json.dumps(_canonical(call.arguments), sort_keys=True)

    unused = [key(c) for c in predicted]
    matched = 0
    for call in expected:
        k = key(call)
        if k in unused:
            unused.remove(k)
            matched += 1
    return matched


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); None with one class."""
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def compute_metrics(rows: Sequence[EvalRow]) -> dict[str, Any]:
    """Decision metrics with "respond" as the positive class. Undefined ratios are None."""
    tp = sum(r.expected == "respond" and r.decision == "respond" for r in rows)
    fp = sum(r.expected == "silence" and r.decision == "respond" for r in rows)
    fn = sum(r.expected == "respond" and r.decision == "silence" for r in rows)
    tn = sum(r.expected == "silence" and r.decision == "silence" for r in rows)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    s_precision, s_recall = _ratio(tn, tn + fn), _ratio(tn, tn + fp)
    respond_f1, silence_f1 = _f1(precision, recall), _f1(s_precision, s_recall)
    named = [r for r in rows if r.expected == "respond" and r.names_bot]
    expected_calls = sum(len(r.expected_tool_calls) for r in rows)
    matched_calls = sum(r.tool_calls_matched for r in rows)
    matched_by_result = sum(r.tool_calls_matched_by_result for r in rows)
    macro = None if respond_f1 is None or silence_f1 is None else (respond_f1 + silence_f1) / 2
    return {
        "n_scored": len(rows),
        "n_expected_respond": tp + fn,
        "n_expected_silence": tn + fp,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "accuracy": _ratio(tp + tn, len(rows)),
        "respond_precision": precision,
        "respond_recall": recall,
        "respond_f1": respond_f1,
        "silence_precision": s_precision,
        "silence_recall": s_recall,
        "silence_f1": silence_f1,
        "macro_f1": macro,
        "false_interruption_rate": _ratio(fp, fp + tn),
        "missed_intervention_rate": _ratio(fn, tp + fn),
        "addressed_recall": _ratio(sum(r.decision == "respond" for r in named), len(named)),
        "n_addressed": len(named),
        "tool_call_accuracy": _ratio(matched_calls, expected_calls),
        "tool_call_result_accuracy": _ratio(matched_by_result, expected_calls),
        "n_expected_tool_calls": expected_calls,
        "roc_auc": roc_auc([r.expected == "respond" for r in rows], [r.p_respond for r in rows]),
    }


def evaluate_conversation(engine: Engine, conv: Conversation, generate: bool = False) -> list[EvalRow]:
    """Replay one conversation through a fresh channel and return a row per scored message."""
    channel_id = f"eval:{conv.id}:{uuid.uuid4().hex[:8]}"
    bot_name = conv.bot_name or engine.config.bot_name
    engine.channel(channel_id, bot_name=bot_name, tools=conv.tools or None)  # none in the file: the engine's own
    scored = {s.index: s for s in scored_messages(conv)}
    rows: list[EvalRow] = []
    try:
        for i, msg in enumerate(conv.messages):
            if msg.role != "user":
                engine.add_message(channel_id, msg)
                continue
            bot_follows = i + 1 < len(conv.messages) and conv.messages[i + 1].role == "assistant"
            target = scored.get(i)
            if target is None:
                engine.add_human(channel_id, msg.name or "", msg.content)
            else:
                d = engine.decide(channel_id, IncomingMessage(msg.name or "", msg.content))
                row = EvalRow(
                    conversation_id=conv.id,
                    index=i,
                    name=msg.name or "",
                    content=msg.content,
                    expected=target.expected,
                    decision=d.decision,
                    p_respond=d.p_respond,
                    addressed=d.addressed,
                    names_bot=names_bot(msg.content, bot_name),
                    latency_ms=d.latency_ms,
                    expected_tool_calls=[c.to_dict() for c in target.expected_tool_calls],
                )
                wants_calls = bool(target.expected_tool_calls)
                if wants_calls or (generate and d.decision == "respond"):
                    reply = engine.generate(
                        channel_id, max_new_tokens=None if generate else TOOL_CALL_MAX_NEW_TOKENS
                    )
                    row.p_call, row.call_relevance = reply.p_call, reply.call_relevance
                    row.predicted_tool_calls = [c.to_dict() for c in reply.tool_calls]
                    row.tool_calls_matched = count_matching_calls(target.expected_tool_calls, reply.tool_calls)
                    if conv.tools:  # the file's own schemas: nothing of ours can run them
                        row.tool_calls_matched_by_result = row.tool_calls_matched
                    else:
                        row.tool_calls_matched_by_result = count_matching_results(
                            target.expected_tool_calls, reply.tool_calls, engine.tools
                        )
                    if generate and d.decision == "respond":
                        row.response = reply.text
                elif target.expected == "respond":  # the call gate is scored on every expected answer
                    row.p_call = engine.call_probability(channel_id)
                    row.call_relevance = engine.call_relevance(channel_id)
                rows.append(row)
            if not bot_follows:
                engine.commit(channel_id, BotTurn(kind="silence"))
    finally:
        engine.reset(channel_id)
    return rows


@dataclass
class ResultAnswerRow:
    """One answer to tool results: the file's and the engine's, with the numbers each states."""

    conversation_id: str | None
    index: int
    results: str  # the tool results it answers, one per line
    expected: str
    response: str
    result_numbers: list[str]  # numbers of the expected answer that come from the results (in one of their forms)
    stated: bool | None  # the response states every one of them (None: the expected answer states none)
    unsaid_numbers: list[str]  # numbers of the response the conversation does not hold in any form
    ms: float


def _same_number(expected: str, said: str) -> bool:
    """Whether `said` states the number `expected`: the same, up to grouping and leading zeros, or the same
    once both are rounded to the fewer decimal places of the two ("78" states 78.33, "39.11" states 39.1)."""
    if expected == said:
        return True
    if ":" in expected or ":" in said:  # times: part by part, leading zeros aside
        a, b = expected.split(":"), said.split(":")
        return len(a) == len(b) and all(x.lstrip("0") == y.lstrip("0") for x, y in zip(a, b, strict=True))
    try:
        x, y = Decimal(expected.replace(",", "")), Decimal(said.replace(",", ""))
    except InvalidOperation:
        return False
    places = min(decimal_places(x), decimal_places(y))
    step = Decimal(1).scaleb(-places)
    return x.quantize(step, rounding=ROUND_HALF_UP) == y.quantize(step, rounding=ROUND_HALF_UP)


def evaluate_result_answers(engine: Engine, conv: Conversation, max_new_tokens: int | None = None) -> list[ResultAnswerRow]:
    """Replay one conversation and, at every bot answer that follows tool results, generate the engine's own
    answer to the same history (the file's calls and results) and compare the numbers it states."""
    channel_id = f"eval-results:{conv.id}:{uuid.uuid4().hex[:8]}"
    engine.channel(channel_id, bot_name=conv.bot_name or engine.config.bot_name, tools=conv.tools or None)
    rows: list[ResultAnswerRow] = []
    try:
        for i, msg in enumerate(conv.messages):
            if msg.role == "assistant" and i and conv.messages[i - 1].role == "tool":
                results: list[str] = []
                for prev in reversed(conv.messages[:i]):
                    if prev.role != "tool":
                        break
                    results.insert(0, prev.content)
                results_text = "\n".join(results)
                said = engine.said(channel_id)
                start = time.perf_counter()
                reply = engine.generate(channel_id, max_new_tokens=max_new_tokens)
                ms = (time.perf_counter() - start) * 1000
                result_forms = number_forms(results_text)
                expected = [n for n in number_runs(msg.content) if n in result_forms]
                stated = number_runs(reply.text)
                said_forms = number_forms(said)
                rows.append(ResultAnswerRow(
                    conversation_id=conv.id,
                    index=i,
                    results=results_text,
                    expected=msg.content,
                    response=reply.text,
                    result_numbers=expected,
                    stated=all(any(_same_number(e, n) for n in stated) for e in expected) if expected else None,
                    unsaid_numbers=[n for n in stated if n not in said_forms],
                    ms=ms,
                ))
            if msg.role == "user":
                engine.add_human(channel_id, msg.name or "", msg.content)
                if not (i + 1 < len(conv.messages) and conv.messages[i + 1].role == "assistant"):
                    engine.commit(channel_id, BotTurn(kind="silence"))
            else:
                engine.add_message(channel_id, msg)
    finally:
        engine.reset(channel_id)
    return rows


def result_answer_metrics(rows: Sequence[ResultAnswerRow]) -> dict[str, Any]:
    """How faithfully answers restate tool results: the share that state every number the expected answer takes
    from the results, and the share that write a number the conversation does not hold."""
    judged = [r for r in rows if r.stated is not None]
    ms = sorted(r.ms for r in rows)
    return {
        "n_result_answers": len(rows),
        "n_with_result_numbers": len(judged),
        "result_numbers_stated": _ratio(sum(bool(r.stated) for r in judged), len(judged)),
        "answers_with_unsaid_numbers": _ratio(sum(bool(r.unsaid_numbers) for r in rows), len(rows)),
        "answer_p50_ms": round(ms[len(ms) // 2], 1) if ms else None,
    }


# The call gate's relevance weights tried in calibration (0: P(call) alone).
RELEVANCE_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)


def _gate_score(r: EvalRow, weight: float) -> float:
    return gate_score(float(r.p_call or 0.0), r.call_relevance, weight)


def call_gate_metrics(rows: Sequence[EvalRow], threshold: float | None, weight: float = 0.0) -> dict[str, Any] | None:
    """How well the gate's score (P(call), and the message's relevance to the tools at `weight`) separates
    answers that should call a tool from answers in words (rows expected to be answered, where the prompt
    listed tools), and the gate's verdicts at `threshold` (None: no gate)."""
    scored = [r for r in rows if r.p_call is not None and r.expected == "respond"]
    if not scored:
        return None
    calls = [r for r in scored if r.expected_tool_calls]
    words = [r for r in scored if not r.expected_tool_calls]
    labels = [bool(r.expected_tool_calls) for r in scored]
    out: dict[str, Any] = {
        "n_call_answers": len(calls),
        "n_word_answers": len(words),
        "auc": roc_auc(labels, [_gate_score(r, weight) for r in scored]),
        "auc_p_call": roc_auc(labels, [float(r.p_call or 0.0) for r in scored]),
        "relevance_weight": weight,
        "threshold": threshold,
    }
    if threshold is not None:
        recall = _ratio(sum(_gate_score(r, weight) >= threshold for r in calls), len(calls))
        words_kept = _ratio(sum(_gate_score(r, weight) < threshold for r in words), len(words))
        out["call_recall"] = recall  # answers that should call and open a call
        out["word_accuracy"] = words_kept  # answers that should not call and start in words
        out["balanced_accuracy"] = None if recall is None or words_kept is None else (recall + words_kept) / 2
    return out


def calibrate_call_gate(rows: Sequence[EvalRow]) -> tuple[float | None, float, dict[str, Any] | None]:
    """The gate's (threshold, relevance weight) with the best balanced accuracy (calls opened vs. answers kept
    in words) on `rows`; ties to the smaller weight, then the threshold nearer 0.5. (None, 0.0, metrics)
    without both kinds of answer to learn from."""
    gate = call_gate_metrics(rows, None)
    if gate is None or not gate["n_call_answers"] or not gate["n_word_answers"]:
        return None, 0.0, gate
    answers = [r for r in rows if r.p_call is not None and r.expected == "respond"]
    best: tuple[tuple[float, float, float], float, float] | None = None
    for weight in RELEVANCE_WEIGHTS:
        if weight and all(r.call_relevance is None for r in answers):
            break  # rows from before relevance was recorded: P(call) alone
        for t in _candidates([_gate_score(r, weight) for r in answers], 200):
            m = call_gate_metrics(rows, t, weight)
            assert m is not None
            key = (m["balanced_accuracy"] or 0.0, -weight, -abs(t - 0.5))
            if best is None or key > best[0]:
                best = (key, round(t, 6), weight)
    assert best is not None
    return best[1], best[2], call_gate_metrics(rows, best[1], best[2])


def rows_at_gate(rows: Sequence[EvalRow], threshold: float, weight: float = 0.0) -> list[EvalRow]:
    """Rows whose calls were generated with the call opened (tool_call_threshold 0) as the gate at
    (`threshold`, `weight`) would have them: an answer whose gate score is below the threshold opens no
    call, so its calls match nothing."""
    out = []
    for r in rows:
        if r.expected_tool_calls and r.p_call is not None and _gate_score(r, weight) < threshold:
            r = dataclasses.replace(r, predicted_tool_calls=[], tool_calls_matched=0, tool_calls_matched_by_result=0)
        out.append(r)
    return out


def evaluate(
    engine: Engine,
    conversations: Iterable[Conversation],
    generate: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[EvalRow]]:
    """Evaluate every conversation; returns (metrics, rows). `progress(n)` is called with rows added."""
    start = time.perf_counter()
    rows: list[EvalRow] = []
    n_conv = 0
    for conv in conversations:
        new = evaluate_conversation(engine, conv, generate=generate)
        rows.extend(new)
        n_conv += 1
        if progress is not None:
            progress(len(new))
    elapsed = time.perf_counter() - start
    metrics = compute_metrics(rows)
    latencies = sorted(r.latency_ms for r in rows)
    metrics.update(
        {
            "n_conversations": n_conv,
            "threshold": engine.config.threshold,
            "named_threshold": engine.config.named_threshold,
            "model": engine.model_name,
            "adapter": engine.adapter,
            "elapsed_s": round(elapsed, 2),
            "decision_p50_ms": round(latencies[len(latencies) // 2], 2) if latencies else None,
            "tool_call_gate": call_gate_metrics(rows, engine.tool_call_threshold, engine.tool_call_relevance_weight),
        }
    )
    return metrics, rows


def write_details(path: str | Path, rows: Iterable[EvalRow | dict[str, Any]]) -> None:
    """One JSON object per row (evaluation rows, or plain dicts such as `chime bfcl`'s)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row if isinstance(row, dict) else asdict(row), ensure_ascii=False, default=str) + "\n")


def rows_at(
    rows: Sequence[EvalRow], threshold: float, always_answer_mentions: bool = True, named_threshold: float | None = None
) -> list[EvalRow]:
    """The same rows decided again at other thresholds (the model's P(respond) does not change)."""
    out = []
    for r in rows:
        speak, _ = decision_rule(r.p_respond, r.addressed, r.names_bot, threshold, named_threshold, always_answer_mentions)
        out.append(dataclasses.replace(r, decision="respond" if speak else "silence"))
    return out


@dataclass
class Calibration:
    threshold: float
    named_threshold: float
    metrics: dict[str, Any]
    feasible: bool  # whether the limits could be met on these rows


def _candidates(scores: Sequence[float], n: int = 80) -> list[float]:
    """Up to n thresholds: midpoints between neighbouring distinct scores, thinned by quantile."""
    distinct = sorted(set(round(s, 6) for s in scores))
    mids = [(a + b) / 2 for a, b in zip(distinct, distinct[1:], strict=False)] or [0.5]
    if len(mids) > n:
        mids = [mids[round(i * (len(mids) - 1) / (n - 1))] for i in range(n)]
    return sorted(set(mids) | {0.5})


def calibrate(
    rows: Sequence[EvalRow],
    always_answer_mentions: bool = True,
    max_false_interruptions: float | None = None,
    max_missed: float | None = None,
    separate_named: bool = True,
) -> Calibration:
    """Thresholds with the best macro-F1 on `rows`, within the limits where any pair meets them.

    Two thresholds: one for messages that name the bot (people addressing it by name) and one for the
    rest; `separate_named=False` ties them. Candidates are midpoints between observed scores. Ties go
    to fewer false interruptions, then to thresholds nearer 0.5.
    """
    assert rows, "no rows to calibrate on"
    general = _candidates([r.p_respond for r in rows if not r.names_bot] or [0.5])
    named_scores = [r.p_respond for r in rows if r.names_bot]
    named = _candidates(named_scores, 40) if separate_named and named_scores else [None]
    best: tuple[tuple, Calibration] | None = None
    for t in general:
        for tn in named:
            m = compute_metrics(rows_at(rows, t, always_answer_mentions, tn))
            fi, missed = m["false_interruption_rate"] or 0.0, m["missed_intervention_rate"] or 0.0
            ok = (max_false_interruptions is None or fi <= max_false_interruptions) and (max_missed is None or missed <= max_missed)
            key = (ok, m["macro_f1"] or 0.0, -fi, -abs(t - 0.5))
            if best is None or key > best[0]:
                best = (key, Calibration(round(t, 6), round(t if tn is None else tn, 6), m, ok))
    assert best is not None
    return best[1]


def cross_validated(rows: Sequence[EvalRow], folds: int = 2, **kwargs: Any) -> dict[str, Any]:
    """Calibrate on all folds but one, decide the held-out fold; metrics over every held-out decision.

    Folds are whole conversations (by a hash of the id), so no conversation is both calibrated and
    scored: an honest estimate of what the calibrated thresholds do on unseen conversations.
    """
    import hashlib

    def fold(r: EvalRow) -> int:
        return int(hashlib.sha256(str(r.conversation_id).encode()).hexdigest()[:8], 16) % folds

    decided: list[EvalRow] = []
    for k in range(folds):
        fit = [r for r in rows if fold(r) != k]
        held = [r for r in rows if fold(r) == k]
        if not fit or not held:
            continue
        cal = calibrate(fit, **kwargs)
        decided.extend(rows_at(held, cal.threshold, kwargs.get("always_answer_mentions", True), cal.named_threshold))
    return compute_metrics(decided)


def threshold_curve(
    rows: Sequence[EvalRow], always_answer_mentions: bool = True, named_threshold: float | None = None, points: int = 101
) -> dict[str, list[float]]:
    """Precision, recall, macro-F1 and false interruptions against the threshold (named one held fixed)."""
    curve: dict[str, list[float]] = {"threshold": [], "precision": [], "recall": [], "macro_f1": [], "false_interruption_rate": []}
    for i in range(points):
        t = i / (points - 1)
        m = compute_metrics(rows_at(rows, t, always_answer_mentions, named_threshold))
        curve["threshold"].append(t)
        for k, src in (("precision", "respond_precision"), ("recall", "respond_recall"), ("macro_f1", "macro_f1"),
                       ("false_interruption_rate", "false_interruption_rate")):
            curve[k].append(m[src] if m[src] is not None else float("nan"))
    return curve
