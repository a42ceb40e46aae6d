"""`chime eval`: metrics on hand-made data with known answers, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main
from model.conversation import ToolCall
from training.evaluate import EvalRow, compute_metrics, count_matching_calls, names_bot, roc_auc


def _row(expected: str, decision: str, p: float = 0.5, named: bool = False, **kw) -> EvalRow:
    return EvalRow(
        conversation_id="c", index=0, name="x", content="", expected=expected, decision=decision,
        p_respond=p, addressed=False, names_bot=named, latency_ms=1.0, **kw,
    )


def test_metrics_on_a_known_confusion() -> None:
    # 3 TP (one names the bot), 1 FN (names the bot), 2 FP, 4 TN
    rows = (
        [_row("respond", "respond", named=True)] + [_row("respond", "respond")] * 2
        + [_row("respond", "silence", named=True)]
        + [_row("silence", "respond")] * 2 + [_row("silence", "silence")] * 4
    )
    m = compute_metrics(rows)
    assert m["n_scored"] == 10
    assert m["confusion"] == {"tp": 3, "fp": 2, "fn": 1, "tn": 4}
    assert m["respond_precision"] == pytest.approx(3 / 5)
    assert m["respond_recall"] == pytest.approx(3 / 4)
    assert m["respond_f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    s_p, s_r = 4 / 5, 4 / 6
    assert m["silence_f1"] == pytest.approx(2 * s_p * s_r / (s_p + s_r))
    assert m["macro_f1"] == pytest.approx((m["respond_f1"] + m["silence_f1"]) / 2)
    assert m["false_interruption_rate"] == pytest.approx(2 / 6)
    assert m["missed_intervention_rate"] == pytest.approx(1 / 4)
    assert m["addressed_recall"] == pytest.approx(1 / 2)
    assert m["tool_call_accuracy"] is None


def test_undefined_ratios_are_none() -> None:
    m = compute_metrics([_row("silence", "silence")])
    assert m["respond_recall"] is None and m["respond_precision"] is None and m["respond_f1"] is None
    assert m["macro_f1"] is None
    assert m["false_interruption_rate"] == 0.0
    assert m["addressed_recall"] is None


def test_tool_call_matching_by_value() -> None:
    expected = [ToolCall("calc", {"x": 12, "y": "a"}), ToolCall("calc", {"x": 1})]
    assert count_matching_calls(expected, [ToolCall("calc", {"y": "a ", "x": 12.0})]) == 1
    assert count_matching_calls(expected, [ToolCall("calc", {"x": 1}), ToolCall("calc", {"x": 12, "y": "a"})]) == 2
    assert count_matching_calls(expected, [ToolCall("calc", {"x": 1}), ToolCall("calc", {"x": 1})]) == 1
    assert count_matching_calls(expected, [ToolCall("other", {"x": 1})]) == 0
    rows = [_row("respond", "respond", expected_tool_calls=[{}, {}], tool_calls_matched=1)]
    assert compute_metrics(rows)["tool_call_accuracy"] == pytest.approx(0.5)


def test_roc_auc() -> None:
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0
    assert roc_auc([True, False], [0.1, 0.9]) == 0.0
    assert roc_auc([True, False, True, False], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([True, True], [0.1, 0.2]) is None


def test_names_bot() -> None:
    assert names_bot("chime, what do you think?", "Chime")
    assert names_bot("hey @Chime", "Chime")
    assert not names_bot("the chimes rang", "Chime")


HANDMADE = [
    # implicit labels: a human message followed by the bot should get a response
    {"id": "a", "bot_name": "Chime", "messages": [
        {"role": "user", "name": "alice", "content": "anyone seen my keys?"},
        {"role": "user", "name": "bob", "content": "@Chime where do keys usually hide?"},
        {"role": "assistant", "content": "Under the sofa, mostly."},
        {"role": "user", "name": "alice", "content": "ha thanks"},
    ]},
    # explicit labels: only these are scored; another bot name
    {"id": "b", "bot_name": "Pip", "messages": [
        {"role": "user", "name": "carol", "content": "lunch?"},
        {"role": "user", "name": "dave", "content": "sure", "expect": "silence"},
        {"role": "user", "name": "carol", "content": "@Pip what's 2+2?", "expect": "respond"},
        {"role": "assistant", "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}]},
        {"role": "tool", "name": "calculator", "content": "4"},
        {"role": "assistant", "content": "4"},
    ]},
    # the bare list shape of the original recipe
    [{"role": "user", "name": "erin", "content": "good morning"}, {"role": "user", "name": "frank", "content": "morning!"}],
]


@pytest.fixture()
def handmade_file(tmp_path: Path) -> Path:
    path = tmp_path / "handmade.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in HANDMADE) + "\n")
    return path


def _eval(capsys, tiny_model_dir: Path, path: Path, *extra: str) -> dict:
    code = main(["eval", str(path), "--json", "--quiet", "--model", str(tiny_model_dir), "--dtype", "float32",
                 "--temperature", "0", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_command_always_respond(capsys, tiny_model_dir: Path, handmade_file: Path, tmp_path: Path) -> None:
    details = tmp_path / "rows.jsonl"
    m = _eval(capsys, tiny_model_dir, handmade_file, "--threshold", "0", "--details", str(details))
    # scored: a: 3 messages (1 respond), b: 2 (1 respond), bare: 2 (0 respond)
    assert m["n_scored"] == 7 and m["n_conversations"] == 3
    assert m["n_expected_respond"] == 2
    assert m["respond_recall"] == 1.0
    assert m["respond_precision"] == pytest.approx(2 / 7)
    assert m["false_interruption_rate"] == 1.0
    assert m["missed_intervention_rate"] == 0.0
    assert m["addressed_recall"] == 1.0
    assert m["n_expected_tool_calls"] == 1
    assert 0.0 <= m["tool_call_accuracy"] <= 1.0
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert len(rows) == 7
    assert {r["expected"] for r in rows} == {"respond", "silence"}
    assert all(0.0 <= r["p_respond"] <= 1.0 for r in rows)


def test_eval_command_only_mentions(capsys, tiny_model_dir: Path, handmade_file: Path) -> None:
    # threshold 1: the model alone never speaks; the two @mentions are still answered
    m = _eval(capsys, tiny_model_dir, handmade_file, "--threshold", "1")
    assert m["confusion"] == {"tp": 2, "fp": 0, "fn": 0, "tn": 5}
    assert m["macro_f1"] == 1.0
    m = _eval(capsys, tiny_model_dir, handmade_file, "--threshold", "1", "--no-mention-override")
    assert m["confusion"] == {"tp": 0, "fp": 0, "fn": 2, "tn": 5}
    assert m["respond_recall"] == 0.0


def test_eval_limit_and_errors(capsys, tiny_model_dir: Path, handmade_file: Path, tmp_path: Path) -> None:
    m = _eval(capsys, tiny_model_dir, handmade_file, "--limit", "1")
    assert m["n_conversations"] == 1 and m["n_scored"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no name"}]}\n')
    code = main(["eval", str(bad), "--json", "--model", str(tiny_model_dir)])
    assert code == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_eval_command_result_answers(capsys, tiny_model_dir: Path, handmade_file: Path, tmp_path: Path) -> None:
    details = tmp_path / "answers.jsonl"
    m = _eval(capsys, tiny_model_dir, handmade_file, "--result-answers", "--max-new-tokens", "6", "--details", str(details))
    # one answer follows a tool result ("4" after 2+2), and it states the result's number
    assert m["n_result_answers"] == m["n_with_result_numbers"] == 1 and m["ground_answer_numbers"] is True
    assert 0.0 <= m["result_numbers_stated"] <= 1.0 and m["answers_with_unsaid_numbers"] in (0.0, 1.0)
    (row,) = [json.loads(line) for line in details.read_text().splitlines()]
    assert row["results"] == "4" and row["result_numbers"] == ["4"] and row["expected"] == "4"
    assert main(["eval", str(handmade_file), "--result-answers", "--baseline", "--model", str(tiny_model_dir)]) == 2
    assert "--result-answers" in capsys.readouterr().err
