"""An answer to tool results writes only numbers the conversation holds (model/answer_numbers.py)."""

from __future__ import annotations

import pytest

from model.answer_numbers import AnswerNumbers, NumberTokens, number_forms, number_runs
from model.chat_format import BotTurn
from model.conversation import Message, ToolCall
from model.engine import IncomingMessage


def test_forms_cover_how_people_restate_a_number() -> None:
    forms = number_forms("Ann: what is 5050 squared?\n25502500")
    assert {"5050", "5,050", "25502500", "25,502,500"} <= forms
    assert "255,025" not in forms and "2550250" not in forms
    rounded = number_forms("39.1111 degC and 3.166666667 hours, 32.391666")
    assert {"39.1111", "39.111", "39.11", "39.1", "39", "3.2", "3.17", "3", "32.39"} <= rounded
    assert "39.2" not in rounded and "3.1" not in rounded  # rounded, not cut
    money = number_forms("86")
    assert {"86", "86.0", "86.00"} <= money
    times = number_forms("2026-10-08 09:04 (Thursday), Australia/Sydney, UTC+11:00 and 15:10:33")
    assert {"09:04", "9:04", "09", "9", "2026", "10", "08", "8", "11", "11:00", "15:10", "3:10", "3:10:33"} <= times
    assert "9:40" not in times
    assert {"15", "15.0"} <= number_forms("0.15")  # a fraction as a percentage
    assert {"3", "12", "0.5"} <= number_forms("split three ways, a dozen eggs, half of it")
    assert {"5", "6", "7", "5,6,7"} <= number_forms("sizes 5,6,7")
    assert {"1.2.3", "1", "2", "3"} <= number_forms("version 1.2.3")
    assert "1" * 40 in number_forms("1" * 40)  # beyond the decimal context: as written


def test_number_runs_end_at_a_trailing_separator() -> None:
    assert number_runs("It is 25,502,500. At 9:04, then 3.") == ["25,502,500", "9:04", "3"]


def test_fits_allows_forms_and_their_starts_only() -> None:
    rule = AnswerNumbers(NumberTokens([], 1), "Ann: what is 5050 squared?\n25502500")
    assert rule.fits("5050 squared is 25,502,500.")
    assert rule.fits("5050 squared is 25,5")  # on its way to 25,502,500
    assert rule.fits("is 255")  # still the start of 25502500
    assert not rule.fits("5050 squared is 255,025")
    assert not rule.fits("is 255,")
    assert not rule.fits("is 25 and")  # 25 ended where it is no form


def _digit_tokens() -> NumberTokens:
    texts = [(i, str(i)) for i in range(10)] + [(10, ","), (11, "."), (12, " is"), (13, ".\n"), (14, " 7")]
    return NumberTokens(texts, 16)  # 15: a stop token, with no text


def test_banned_tokens_steer_a_number_to_a_form() -> None:
    rule = AnswerNumbers(_digit_tokens(), "Ann: 5050 squared?\n25502500")

    def allowed(text: str) -> set[int]:
        mask = rule.banned(text)
        return set(range(16)) if mask is None else {i for i in range(16) if not mask[i]}

    assert allowed("it is ") == {2, 5, 10, 11, 12, 13, 15}  # digits that start a form; any word or stop
    assert allowed("it is 2") == {5}  # 2 is no form: only toward 25502500 / 25,502,500
    assert allowed("it is 25") == {5, 10}
    assert allowed("it is 25,502,500") == {10, 11, 12, 13, 15}  # a form: it may end (or take a separator)
    assert allowed("it is 25,502,500.") == {0, 10, 11, 12, 13, 15}  # ended by ".", or 25,502,500.0 on its way
    assert 14 not in allowed("it is ")  # " 7" starts no form


def test_a_number_begun_before_the_rule_is_not_a_dead_end() -> None:
    rule = AnswerNumbers(_digit_tokens(), "25502500")
    assert rule.banned("it is 999") is None  # nothing could follow: the rule stands aside
    assert rule.banned("no numbers here") is not None


def _answer_after_result(engine, result: str) -> None:
    engine.channel("c", bot_name="Chime", tools=None)
    engine.add_human("c", "Ann", "@Chime what is 5050 squared?")
    engine.commit("c", BotTurn(kind="response", text="", tool_calls=(ToolCall("calculator", {"expression": "5050**2"}),)))
    engine.add_message("c", Message(role="tool", name="calculator", content=result))


def _favour_digits(engine, monkeypatch) -> None:
    """Make the random model write digits whenever it may: 7s first (a number nobody said), then the rest."""
    ids = {d: engine.fmt.encode(str(d))[-1] for d in range(10)}
    real = engine.runner.next_logits

    def biased(out):
        logits = real(out).clone()
        for d, i in ids.items():
            logits[i] += 200.0 if d == 7 else 100.0 + d
        return logits

    monkeypatch.setattr(engine.runner, "next_logits", biased)


@pytest.mark.parametrize("ground", [True, False])
def test_the_engine_answers_results_with_their_numbers(tiny_engine_factory, monkeypatch, ground: bool) -> None:
    engine = tiny_engine_factory(threshold=0.0, ground_answer_numbers=ground)
    _answer_after_result(engine, "25502500")
    _favour_digits(engine, monkeypatch)
    reply = engine.generate("c", max_new_tokens=24)
    runs = number_runs(reply.text)
    assert runs
    rule = AnswerNumbers(NumberTokens([], 1), engine._said(engine.channel("c")))
    if ground:
        assert all(run in rule.forms for run in runs[:-1])
        assert runs[-1] in rule.prefixes  # the last may be cut off by the token limit
        assert "7" not in "".join(runs)
    else:
        assert "7" in reply.text  # the test can fail: without the rule the model writes its 7s


def test_the_first_answer_to_a_person_is_not_held_to_the_rule(tiny_engine_factory, monkeypatch) -> None:
    engine = tiny_engine_factory(threshold=0.0)
    engine.decide("c", IncomingMessage("Ann", "@Chime pick a number", addressed=True))
    _favour_digits(engine, monkeypatch)
    assert "7" in engine.generate("c", max_new_tokens=6).text


def test_same_number_allows_rounding_grouping_and_leading_zeros() -> None:
    from training.evaluate import _same_number

    assert _same_number("78.33", "78") and _same_number("39.1", "39.11") and _same_number("25502500", "25,502,500")
    assert _same_number("09:04", "9:04") and not _same_number("09:04", "9:40")
    assert not _same_number("39.1", "39.2") and not _same_number("255025", "25502500") and not _same_number("3", "x")


@pytest.mark.parametrize("ground", [True, False])
def test_result_answers_are_scored_on_the_numbers_they_state(tiny_engine_factory, monkeypatch, ground: bool) -> None:
    from model.conversation import Conversation
    from training.evaluate import evaluate_result_answers, result_answer_metrics

    conv = Conversation(id="sq", messages=[
        Message(role="user", name="Ann", content="@Chime what is 5050 squared?"),
        Message(role="assistant", content="", tool_calls=(ToolCall("calculator", {"expression": "5050**2"}),)),
        Message(role="tool", name="calculator", content="25502500"),
        Message(role="assistant", content="5050 squared is 25,502,500."),
        Message(role="user", name="Bo", content="nice"),
    ])
    engine = tiny_engine_factory(threshold=0.0, ground_answer_numbers=ground, max_new_tokens=12)
    _favour_digits(engine, monkeypatch)
    rows = evaluate_result_answers(engine, conv)
    assert [(r.index, r.results, r.result_numbers) for r in rows] == [(3, "25502500", ["25,502,500"])]
    (row,) = rows
    assert row.stated == ("25502500" in row.response.replace(",", ""))
    if ground:  # only a number the token limit cut off may be no form
        assert row.unsaid_numbers in ([], number_runs(row.response)[-1:])
    else:  # the random model's 7s
        assert any("7" in n for n in row.unsaid_numbers)
    metrics = result_answer_metrics(rows)
    assert metrics["n_result_answers"] == metrics["n_with_result_numbers"] == 1
    assert metrics["answers_with_unsaid_numbers"] == float(bool(row.unsaid_numbers))
    assert engine.channels() == []  # the replay's channel is gone


def test_numbers_inside_a_tool_call_are_not_the_rules() -> None:
    rule = AnswerNumbers(_digit_tokens(), "25502500")
    assert rule.banned('<tool_call>{"name": "calculator", "arguments": {"expression": "84.5*0.') is None
    assert rule.banned('<tool_call>{"name": "calculator", "arguments": {}}</tool_call> It is 2') is not None
