"""`chime bfcl`: BFCL entries through the engine, scored by bfcl-eval's own checker (in .venv-bfcl)."""

from __future__ import annotations

import json

import pytest

from bot.cli import main
from model.conversation import ToolCall
from model.errors import ChimeError
from training.bfcl import bfcl_python, coerce_call, format_table, load_entries, replay_gate, run_bfcl, score


@pytest.fixture(scope="module")
def bfcl() -> str:
    return bfcl_python()  # `make test` creates .venv-bfcl; a missing one is a failure, not a skip


def test_scores_come_from_bfcl_evals_checker(bfcl: str) -> None:
    right = [{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}]
    results = [
        {"id": "simple_python_0", "category": "simple_python", "calls": right},
        {"id": "simple_python_0", "category": "simple_python", "calls": [{"name": "calculate_triangle_area", "arguments": {"base": 10.5, "height": 5}}]},
        {"id": "simple_python_0", "category": "simple_python", "calls": []},
        {"id": "simple_python_0", "category": "simple_python", "calls": right + right},
        {"id": "irrelevance_0", "category": "irrelevance", "calls": []},
        {"id": "irrelevance_0", "category": "irrelevance", "calls": right},
    ]  # fmt: skip
    verdicts = score(bfcl, results)
    assert [v["valid"] for v in verdicts] == [True, False, False, False, True, False]
    assert verdicts[1]["error_type"] == "type_error:simple"
    assert verdicts[3]["error_type"] == "simple_function_checker:wrong_count"
    entry = load_entries(bfcl, "parallel_multiple", limit=1)[0]
    calls = [{"name": name, "arguments": {k: v[0] for k, v in args.items() if v[0] != ""}}
             for answer in entry["ground_truth"] for name, args in answer.items()]  # fmt: skip
    flipped = [{"id": entry["id"], "category": "parallel_multiple", "calls": list(reversed(calls))}]
    assert score(bfcl, flipped)[0]["valid"]  # parallel calls in any order


def test_coerce_call_is_the_registrys_lossless_coercion() -> None:
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}]
    assert coerce_call(ToolCall("f", {"n": "12"}), tools) == {"name": "f", "arguments": {"n": 12}}
    assert coerce_call(ToolCall("f", {"n": "twelve"}), tools) == {"name": "f", "arguments": {"n": "twelve"}}
    assert coerce_call(ToolCall("g", {"x": 1}), tools) == {"name": "g", "arguments": {"x": 1}}


def test_run_bfcl_through_the_engine(bfcl: str, tiny_engine_factory) -> None:
    engine = tiny_engine_factory(max_new_tokens=8)
    summary, details = run_bfcl(engine, ["simple_python", "multiple"], limit=2, python=bfcl, max_prompt_tools=1)
    assert [summary["categories"][c]["n"] for c in ("simple_python", "multiple")] == [2, 2]
    assert len(details) == 4 and all(isinstance(d["valid"], bool) for d in details)
    assert all(len(d["shown_tools"]) == 1 for d in details)
    assert sum(c["correct"] for c in summary["categories"].values()) == sum(d["valid"] for d in details)
    assert "| Chime |" in format_table(summary) and "Hammer2.1-0.5b" in format_table(summary)
    assert engine.channels() == []  # every question's channel is gone afterwards


def _entry(category: str, p_call: float | None, relevance: float | None, valid: bool, threshold: float | None = 0.0) -> dict:
    return {"category": category, "p_call": p_call, "call_relevance": relevance, "valid": valid,
            "tool_call_threshold": threshold}  # fmt: skip


def test_replay_gate_reads_a_gate_open_run_at_another_gate() -> None:
    rows = [
        _entry("simple_python", 0.9, 0.0, True),   # opens at 0.5: its right call counts
        _entry("simple_python", 0.3, 0.0, True),   # closed at 0.5: words, wrong for simple_python
        _entry("simple_python", 0.3, 1.0, True),   # relevance at weight 2 carries it over 0.5
        _entry("irrelevance", 0.9, 0.0, False),    # opens and calls: wrong
        _entry("irrelevance", 0.3, 0.0, False),    # closed: answered in words, right
        _entry("irrelevance", None, None, True),   # no P(call): the recorded verdict
    ]  # fmt: skip
    summary = replay_gate(rows, 0.5)
    assert summary["categories"]["simple_python"] == {"n": 3, "correct": 1, "opened": 1, "accuracy": 33.3}
    assert summary["categories"]["irrelevance"] == {"n": 3, "correct": 2, "opened": 2, "accuracy": 66.7}
    assert replay_gate(rows, 0.5, weight=2.0)["categories"]["simple_python"]["correct"] == 2
    assert replay_gate(rows, 0.0)["categories"]["irrelevance"]["correct"] == 1  # the run as recorded
    with pytest.raises(ChimeError, match="opened every call"):
        replay_gate(rows + [_entry("simple_python", 0.9, 0.0, True, threshold=0.8)], 0.5)


def test_chime_bfcl_replay_reads_the_gate_off_a_details_file(tmp_path, capsys) -> None:
    rows = [_entry("simple_python", 0.9, 0.0, True), _entry("simple_python", 0.3, 0.0, True),
            _entry("irrelevance", 0.3, 0.0, False), _entry("irrelevance", 0.9, 0.0, False)]  # fmt: skip
    path = tmp_path / "open.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["bfcl", "--replay", str(path), "--tool-call-threshold", "0.5", "--no-adapter", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [summary["categories"][c]["correct"] for c in ("simple_python", "irrelevance")] == [1, 1]
    assert main(["bfcl", "--replay", str(path), "--tool-call-threshold", "0.5", "--no-adapter", "--json",
                 "--categories", "irrelevance", "--limit", "1"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["categories"] == {"irrelevance": {"n": 1, "correct": 1, "opened": 0, "accuracy": 100.0}}
    assert main(["bfcl", "--replay", str(path), "--no-adapter"]) == 2  # no gate to replay: an error, not a guess
    assert "needs a call gate" in capsys.readouterr().err
