"""`chime retrain`: a whole cycle on the tiny model (export, train, evaluate, promote or reject), and a
kill in the middle of training that must leave the serving adapter as it was."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from model.adapter_registry import AdapterRegistry
from model.conversation import read_conversations, write_conversations
from model.errors import ConfigError
from model.storage import models as m
from model.storage.db import make_engine, session_scope
from model.storage.log import ChatLog, Ref
from tests.test_storage import chat
from tests.test_training import _tiny_recipe
from training.recipe import parse_overrides
from training.retrain import RetrainConfig, parse_every, run_cycle, verdict


def _log_chats(url: str, tmp_path: Path, n: int, start: datetime) -> None:
    """`n` short local (consented) chats, each with weak silences and an answered @mention."""
    log = ChatLog(url, spool=tmp_path / "spool.jsonl")
    for k in range(n):
        at = start + timedelta(hours=k)
        ch = f"chan{k}"
        for i, (who, text) in enumerate([("alice", "anyone seen my keys?"), ("bob", "nope"), ("carol", "check the car"),
                                         ("alice", "found them"), ("bob", "@Chime what's 2+2?")]):
            chat(log, who, text, who == "bob" and i == 4, server=Ref("local"), channel=ch, at=at + timedelta(minutes=i),
                 reply="4")
    assert log.close()


def _cfg(tmp_path: Path, tiny_model_dir: Path, **kw) -> RetrainConfig:
    overrides = parse_overrides(_tiny_recipe(tmp_path, tiny_model_dir, save_steps=100))
    overrides.pop("output_dir")
    return RetrainConfig(recipes=("training/recipes/cpu-lora.yaml",), overrides=overrides, db=f"sqlite:///{tmp_path / 'chime.db'}",
                         adapters_dir=str(tmp_path / "adapters"), logged_dir=str(tmp_path / "logged"),
                         runs_dir=str(tmp_path / "runs"), min_labels=1, heldout_min_messages=1, **kw)


def test_verdict_compares_every_set() -> None:
    cfg = RetrainConfig()
    serving = {"dev": {"macro_f1": 0.90, "false_interruption_rate": 0.02, "addressed_recall": 0.95},
               "logged-heldout": {"macro_f1": 0.80, "false_interruption_rate": 0.10, "addressed_recall": None}}
    same = json.loads(json.dumps(serving))
    assert verdict(same, serving, cfg) == (True, [])
    worse = json.loads(json.dumps(serving))
    worse["logged-heldout"]["false_interruption_rate"] = 0.2
    ok, reasons = verdict(worse, serving, cfg)
    assert not ok and "logged-heldout: false interruptions" in reasons[0]
    better = {"dev": {"macro_f1": 0.93, "false_interruption_rate": 0.01, "addressed_recall": 0.96}}
    assert verdict(better, serving, cfg)[0]
    # tool calls: a candidate that calls worse is rejected, within the tolerance it passes
    serving["dev"]["tool_call_accuracy"] = 0.28
    fewer = {"dev": {**serving["dev"], "tool_call_accuracy": 0.15}}
    ok, reasons = verdict(fewer, serving, cfg)
    assert not ok and reasons == ["dev: tool-call accuracy 0.150 vs serving 0.280"]
    assert verdict({"dev": {**serving["dev"], "tool_call_accuracy": 0.27}}, serving, cfg)[0]


def test_parse_every() -> None:
    assert parse_every("24h") == 86400 and parse_every("90m") == 5400 and parse_every("1d") == 86400
    with pytest.raises(ConfigError):
        parse_every("daily")


def test_schedule_runs_cycles_and_survives_a_failed_one(monkeypatch, capsys) -> None:
    import training.retrain as retrain

    calls = []

    def fake_cycle(cfg):
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise RuntimeError("out of disk")
        return retrain.CycleResult(status="skipped", reason="test")

    monkeypatch.setattr(retrain, "run_cycle", fake_cycle)
    assert retrain.schedule(RetrainConfig(), every_s=0.3, cycles=3) == 3
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.5  # the first now, then on the interval
    assert capsys.readouterr().out.count('"status": "skipped"') == 2


def test_retrain_cycles_promote_skip_and_reject(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, f1_tolerance=2.0, fi_tolerance=2.0, named_tolerance=2.0, tool_tolerance=2.0)  # anything passes
    assert run_cycle(cfg).status == "skipped"  # nothing logged yet
    _log_chats(cfg.db, tmp_path, 6, datetime(2026, 11, 1, tzinfo=timezone.utc))
    first = run_cycle(cfg)
    assert first.status == "promoted", first.reason
    assert first.serving == "none" and first.export["train_labels"] + first.export["heldout_labels"] > 0
    assert {"candidate/dev", "serving/dev"} <= set(first.metrics)
    registry = AdapterRegistry(cfg.adapters_dir)
    current = registry.current()
    assert current is not None and current.name == first.candidate
    assert json.loads((current.path / "chime_adapter.json").read_text())["threshold"] is not None
    train_file = Path(cfg.logged_dir) / "retrain.train.jsonl"
    assert train_file.exists() and (Path(cfg.logged_dir) / "retrain.heldout.jsonl").exists()

    assert run_cycle(cfg).status == "skipped"  # nothing new

    _log_chats(cfg.db, tmp_path, 3, datetime(2026, 11, 5, tzinfo=timezone.utc))
    strict = _cfg(tmp_path, tiny_model_dir, f1_tolerance=-1.0)  # nothing passes: better by more than 1.0 F1
    second = run_cycle(strict)
    assert second.status == "rejected" and "macro-F1" in second.reason
    assert second.serving == first.candidate
    assert second.serving_dev_reused  # the promoted candidate's dev result from the first cycle
    assert second.metrics["serving/dev"]["macro_f1"] == first.metrics["candidate/dev"]["macro_f1"]
    assert registry.current().name == first.candidate  # unchanged
    engine = make_engine(cfg.db)
    with session_scope(engine) as s:
        rows = {r.name: r.status for r in s.scalars(select(m.AdapterRecord))}
        evaluations = s.scalars(select(m.Evaluation)).all()
    engine.dispose()
    assert rows == {first.candidate: "promoted", second.candidate: "rejected"}
    assert {e.dataset for e in evaluations} >= {"dev"} and len(evaluations) >= 4


def test_a_kill_during_training_leaves_the_serving_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, f1_tolerance=2.0, fi_tolerance=2.0, named_tolerance=2.0, tool_tolerance=2.0)
    _log_chats(cfg.db, tmp_path, 6, datetime(2026, 11, 1, tzinfo=timezone.utc))
    first = run_cycle(cfg)
    assert first.status == "promoted"
    pointer = (Path(cfg.adapters_dir) / "current.json").read_text()
    _log_chats(cfg.db, tmp_path, 2, datetime(2026, 11, 9, tzinfo=timezone.utc))
    overrides = {**cfg.overrides, "max_steps": 400}
    args = [sys.executable, "-m", "training.retrain", "--db", cfg.db, "--adapters-dir", cfg.adapters_dir,
            "--logged-dir", cfg.logged_dir, "--runs-dir", cfg.runs_dir, "--min-labels", "1",
            "--f1-tolerance", "2", "--fi-tolerance", "2", "--named-tolerance", "2", "--tool-tolerance", "2",
            *[f"{k}={json.dumps(v)}" for k, v in overrides.items()]]
    proc = subprocess.Popen(args, cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    runs = Path(cfg.runs_dir)
    while time.monotonic() < deadline and not any(runs.glob("r*/checkpoint-*")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)  # mid-training, after a checkpoint was written
    proc.wait()
    assert (Path(cfg.adapters_dir) / "current.json").read_text() == pointer
    registry = AdapterRegistry(cfg.adapters_dir)
    assert registry.current().name == first.candidate and len(registry.versions()) == 1
    from model.config import EngineConfig
    from model.engine import Engine

    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), adapter=str(registry.current().path), dtype="float32"))
    assert engine.adapter_version == first.candidate
    # the next cycle starts over cleanly (the killed run's record says "training"; a new name is used)
    again = run_cycle(cfg)
    assert again.status == "promoted" and again.candidate != first.candidate


def test_a_cycle_trains_its_stages_in_turn(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The default stages (the shipped adapter's recipe, then its tool-call phase): the second continues the
    first's adapter, on the chats that call tools, and only the last is evaluated and promoted."""
    from training.retrain import DEFAULT_RECIPES

    convs = read_conversations("conversations/examples.jsonl")
    assert any(m.tool_calls for c in convs for m in c.messages)
    train = tmp_path / "stages-train.jsonl"
    write_conversations(train, convs)
    cfg = _cfg(tmp_path, tiny_model_dir, f1_tolerance=2.0, fi_tolerance=2.0, named_tolerance=2.0, tool_tolerance=2.0)
    cfg = dataclasses.replace(cfg, recipes=DEFAULT_RECIPES,
                              overrides={**cfg.overrides, "train_files": [str(train)], "source_caps": {}, "max_steps": 2})
    _log_chats(cfg.db, tmp_path, 6, datetime(2026, 11, 1, tzinfo=timezone.utc))
    result = run_cycle(cfg)
    assert result.status == "promoted", result.reason
    runs = Path(cfg.runs_dir)
    first = runs / f"{result.candidate}-stage1"
    card = json.loads((runs / result.candidate / "run_card.json").read_text())
    assert card["recipe"]["name"] == result.candidate and card["recipe"]["require_tool_calls"]
    assert card["recipe"]["init_adapter"] == str(first / "adapter")
    assert json.loads((first / "run_card.json").read_text())["recipe"]["init_adapter"] is None
    assert "evaluation" in card and "evaluation" not in json.loads((first / "run_card.json").read_text())
    engine = make_engine(cfg.db)
    with session_scope(engine) as s:
        record = s.scalars(select(m.AdapterRecord).where(m.AdapterRecord.name == result.candidate)).one()
        assert record.recipe == "cpu-lora+cpu-lora-tool-phase"
    engine.dispose()
