"""The call gate: P(call) read off the model after "(response)", a calibrated threshold on it deciding
whether a reply opens with a tool call, and its calibration and scoring in evaluation and training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.config import EngineConfig
from model.conversation import Conversation, Message, ToolCall
from model.engine import IncomingMessage, gate_score
from model.loading import resolve_tool_call_relevance_weight, resolve_tool_call_threshold
from model.tool_format import TOOL_CALL_OPEN, get_tool_format
from model.tool_retrieval import relevance
from training.evaluate import EvalRow, calibrate_call_gate, call_gate_metrics, evaluate, rows_at_gate


@pytest.mark.parametrize(("name", "opening"), [("plain", TOOL_CALL_OPEN), ("hermes", TOOL_CALL_OPEN),
                                               ("llama3", '{"name": "'), ("glm4", None)])
def test_each_format_names_the_text_a_call_opens_with(name: str, opening: str | None) -> None:
    fmt = get_tool_format(name)
    assert fmt.call_opening() == opening
    if opening is not None:
        assert fmt.render_calls([ToolCall("anything", {"x": 1})]).startswith(opening)


def test_the_opening_tokens_are_how_a_call_turn_starts(tiny_format) -> None:
    from model.chat_format import BotTurn

    ids = tiny_format.call_open_ids
    assert ids and (" " + TOOL_CALL_OPEN).startswith(tiny_format.decode(ids))
    turn = tiny_format.bot_turn_ids(BotTurn(kind="response", tool_calls=(ToolCall("calculator", {"expression": "1"}),)))
    marker = tiny_format._response_ids
    assert turn.body[len(marker) : len(marker) + len(ids)] == ids


def _history(engine, channel: str) -> None:
    engine.add_human(channel, "alice", "we need the total for the trip")
    engine.decide(channel, IncomingMessage("bob", "@Chime what is 84.5 * 3?", addressed=True))


def test_p_call_is_the_teacher_forced_probability_of_the_opening(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=0.0)
    _history(engine, "c")
    p = engine.call_probability("c")
    ch = engine.channel("c")
    header = engine.fmt.bot_header_ids + engine.fmt.decision_prefix_ids + engine.fmt.response_marker_rest_ids()
    ids = ch.window_ids() + header + engine.fmt.call_open_ids
    start = len(ch.window_ids()) + len(header)
    state = engine.runner.new_state()
    logp = 0.0
    for k in range(start, len(ids)):  # one full forward per position, no shared cache
        engine.runner.crop(state, 0)
        out = engine.runner.extend(state, ids[:k])
        logp += float(torch.log_softmax(engine.runner.next_logits(out).float(), -1)[ids[k]])
    assert p is not None and p == pytest.approx(math.exp(logp), rel=1e-3, abs=1e-9)
    # reading P(call) leaves the channel's cache as it was: the next decision is unchanged
    twin = tiny_engine_factory(threshold=0.0)
    _history(twin, "c")
    a = engine.decide("c", IncomingMessage("carol", "thanks"))
    b = twin.decide("c", IncomingMessage("carol", "thanks"))
    assert a.p_respond == pytest.approx(b.p_respond, abs=1e-6)


def test_a_channel_without_tools_has_no_p_call(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=0.0, tools=[])
    _history(engine, "c")
    assert engine.call_probability("c") is None
    assert engine.generate("c", max_new_tokens=4).p_call is None


def test_the_gate_opens_a_call_at_or_above_its_threshold_and_keeps_words_below(tiny_engine_factory) -> None:
    # the random model's values are noise nobody said: grounding would withdraw the call it opened
    opened = tiny_engine_factory(threshold=0.0, tool_call_threshold=0.0, max_tool_rounds=0, max_new_tokens=200,
                                 ground_required_arguments=False)
    _history(opened, "c")
    reply = opened.generate("c")
    assert reply.p_call is not None
    assert reply.tool_calls and not reply.errors  # opened, then the constrained decoder finished a valid call
    assert reply.tool_calls[0].name in ("calculator", "convert_units", "current_time")

    closed = tiny_engine_factory(threshold=0.0, tool_call_threshold=1.0, max_new_tokens=8)
    _history(closed, "c")
    steps: list[torch.Tensor] = []
    sample = closed._sample
    closed._sample = lambda logits: steps.append(logits) or sample(logits)  # type: ignore[method-assign]
    closed.generate("c")
    assert steps[0][closed.fmt.call_open_ids[0]] == -math.inf  # the opening's first token is barred
    assert math.isfinite(float(steps[1][closed.fmt.call_open_ids[0]]))  # only at the start


def test_the_gate_threshold_comes_from_the_adapter_unless_set_or_off(tmp_path) -> None:
    (tmp_path / "chime_adapter.json").write_text(json.dumps({"tool_call_threshold": 0.3}))
    adapter = str(tmp_path)
    assert resolve_tool_call_threshold(EngineConfig(), adapter) == 0.3
    assert resolve_tool_call_threshold(EngineConfig(tool_call_threshold=0.7), adapter) == 0.7
    assert resolve_tool_call_threshold(EngineConfig(tool_call_gate=False), adapter) is None
    assert resolve_tool_call_threshold(EngineConfig(), None) is None  # nothing calibrated: the model's choice
    (tmp_path / "chime_adapter.json").write_text(json.dumps({"tool_call_threshold": 7}))
    assert resolve_tool_call_threshold(EngineConfig(), adapter) is None


def _row(p_call: float | None, calls: int, matched: int = 0, expected: str = "respond") -> EvalRow:
    expected_calls = [{"name": "f", "arguments": {"x": i}} for i in range(calls)]
    return EvalRow(None, 0, "a", "x", expected, "respond", 0.9, True, True, 1.0, expected_tool_calls=expected_calls,
                   predicted_tool_calls=expected_calls[:matched], tool_calls_matched=matched,
                   tool_calls_matched_by_result=matched, p_call=p_call)


def test_calibration_separates_call_answers_from_word_answers() -> None:
    rows = [_row(0.9, 1, 1), _row(0.8, 2, 1), _row(0.6, 1, 0), _row(0.3, 0), _row(0.2, 0), _row(0.65, 0),
            _row(None, 0, expected="silence")]
    threshold, weight, gate = calibrate_call_gate(rows)
    assert threshold is not None and gate is not None and weight == 0.0  # no relevance recorded: P(call) alone
    assert 0.3 < threshold <= 0.6
    assert gate["call_recall"] == 1.0 and gate["word_accuracy"] == pytest.approx(2 / 3)
    assert gate["auc"] == pytest.approx(8 / 9)
    gated = rows_at_gate(rows, 0.7)  # a stricter gate: the 0.6 answer opens no call
    assert [r.tool_calls_matched for r in gated[:3]] == [1, 1, 0] and gated[2].predicted_tool_calls == []
    assert rows[2].p_call == 0.6 and rows_at_gate(rows, 0.85)[1].tool_calls_matched == 0
    assert call_gate_metrics(rows, 0.7)["word_accuracy"] == 1.0


def test_no_gate_without_both_kinds_of_answer() -> None:
    assert calibrate_call_gate([_row(0.9, 1, 1), _row(0.4, 2)])[0] is None
    assert calibrate_call_gate([_row(None, 0, expected="silence")]) == (None, 0.0, None)


def test_relevance_is_the_share_of_the_message_a_tool_documents() -> None:
    primes = {"name": "prime_numbers_in_range", "description": "List the prime numbers between two integers.",
              "parameters": {"type": "object", "properties": {"start": {"type": "integer"}, "end": {"type": "integer"}}}}
    circle = {"name": "geometry.circle_area", "description": "Area of a circle.",
              "parameters": {"type": "object", "properties": {"radius": {"type": "number", "description": "radius"}}}}
    assert relevance("Chime, find the fastest route from New York to Boston", [primes], ignore="Chime") == 0.0
    assert relevance("Chime what's the area of a circle with radius 3?", [primes, circle], ignore="Chime") == 1.0
    assert relevance("primes between 10 and 20", [primes]) == 1.0  # numbers fill numeric parameters
    assert relevance("primes between 10 and 20", [circle]) == 0.5  # the numbers only
    assert relevance("", [circle]) == 0.0 and relevance("area", []) == 0.0


def test_the_gate_score_adds_weighted_relevance_to_the_logit() -> None:
    assert gate_score(0.3, 0.9, 0.0) == 0.3 and gate_score(0.3, None, 5.0) == 0.3
    assert gate_score(0.5, 0.5, 2.0) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert gate_score(0.2, 1.0, 4.0) > gate_score(0.2, 0.5, 4.0) > gate_score(0.2, 0.0, 4.0) == pytest.approx(0.2)
    assert 0.0 < gate_score(0.0, 1.0, 8.0) < 1.0 and gate_score(1.0, 0.0, 8.0) <= 1.0


def test_calibration_weighs_relevance_where_p_call_alone_cannot_separate() -> None:
    rows = [_row(0.6, 1, 1), _row(0.5, 1, 1), _row(0.4, 1, 1), _row(0.6, 0), _row(0.5, 0), _row(0.4, 0)]
    for r, rel in zip(rows, (0.8, 0.6, 0.7, 0.0, 0.1, 0.2), strict=True):
        r.call_relevance = rel
    threshold, weight, gate = calibrate_call_gate(rows)
    assert gate is not None and gate["auc_p_call"] == 0.5
    assert weight > 0 and gate["balanced_accuracy"] == 1.0 and gate["auc"] == 1.0 and gate["relevance_weight"] == weight
    assert [r.tool_calls_matched for r in rows_at_gate(rows, threshold, weight)][:3] == [1, 1, 1]
    assert [r.tool_calls_matched for r in rows_at_gate(rows, threshold)][:3] != [1, 1, 1]  # P(call) alone drops some


def test_the_engine_gate_weighs_the_message_s_relevance(tiny_engine_factory, tmp_path) -> None:
    tool = {"name": "trip_total", "description": "Total cost of a trip for a group.",
            "parameters": {"type": "object", "properties": {"people": {"type": "integer", "description": "people"}}}}
    engine = tiny_engine_factory(threshold=0.0, tool_call_threshold=0.999, tool_call_relevance_weight=100.0,
                                 max_tool_rounds=0, max_new_tokens=200)
    engine.channel("c", bot_name="Chime", tools=[tool])
    engine.decide("c", IncomingMessage("bob", "@Chime trip total for 4 people?", addressed=True))
    reply = engine.generate("c")
    assert reply.call_relevance == 1.0 and reply.p_call is not None and reply.p_call < 0.999
    assert reply.tool_calls and reply.tool_calls[0].name == "trip_total"  # relevance carried it over the threshold
    engine.decide("c", IncomingMessage("bob", "@Chime who won the match yesterday?", addressed=True))
    reply = engine.generate("c")
    assert reply.call_relevance == 0.0 and reply.p_call is not None and reply.p_call < 0.999
    assert not reply.tool_calls  # P(call) alone, below the threshold
    assert engine.call_relevance("c") == 0.0
    (tmp_path / "chime_adapter.json").write_text(json.dumps({"tool_call_relevance_weight": 2.5}))
    assert resolve_tool_call_relevance_weight(EngineConfig(), str(tmp_path)) == 2.5
    assert resolve_tool_call_relevance_weight(EngineConfig(tool_call_relevance_weight=0.0), str(tmp_path)) == 0.0
    assert resolve_tool_call_relevance_weight(EngineConfig(), None) == 0.0


def test_evaluation_reads_p_call_on_expected_answers(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=0.5, tool_call_threshold=0.0)
    conv = Conversation(id="g", messages=[
        Message(role="user", name="alice", content="lunch at noon?"),
        Message(role="user", name="bob", content="Chime what is 3 * 4?"),
        Message(role="assistant", tool_calls=[ToolCall("calculator", {"expression": "3 * 4"})]),
        Message(role="tool", name="calculator", content="12"),
        Message(role="assistant", content="12."),
        Message(role="user", name="carol", content="Chime say hi to everyone"),
        Message(role="assistant", content="Hi everyone!"),
    ])
    metrics, rows = evaluate(engine, [conv])
    by_text = {r.content: r for r in rows}
    assert by_text["lunch at noon?"].p_call is None  # expected silence: no answer to gate
    assert by_text["Chime what is 3 * 4?"].p_call is not None
    assert by_text["Chime say hi to everyone"].p_call is not None
    gate = metrics["tool_call_gate"]
    assert gate["n_call_answers"] == 1 and gate["n_word_answers"] == 1 and gate["threshold"] == 0.0
    assert gate["call_recall"] == 1.0 and gate["word_accuracy"] == 0.0


def test_the_forced_opening_completes_the_tag(tiny_format) -> None:
    assert tiny_format.decode(tiny_format.call_force_ids) == " " + TOOL_CALL_OPEN
    assert tiny_format.call_force_ids[: len(tiny_format.call_open_ids)] == tiny_format.call_open_ids


def test_after_tool_results_the_model_goes_on_without_the_gate(tiny_engine_factory) -> None:
    """The gate decides the first answer to a person; after results a forced call could loop to the round limit."""
    engine = tiny_engine_factory(threshold=0.0, tool_call_threshold=0.0, max_new_tokens=200, max_tool_rounds=2,
                                 ground_required_arguments=False)  # the random model's call is noise nobody said
    d = engine.handle("c", IncomingMessage("bob", "@Chime what is 84.5 * 3?", addressed=True))
    assert d.tool_calls and d.tool_results  # the first answer was opened as a call and ran
    engine.add_message("c", Message(role="tool", name="calculator", content="253.5"))
    reply = engine.generate("c", max_new_tokens=4)
    assert reply.p_call is None  # no gate after a result
