"""The shipped default adapter: it loads by default, carries its card, and reproduces its recorded decisions."""

from __future__ import annotations

import json

import pytest

from model.loading import SHIPPED_ADAPTER_DIR

pytestmark = pytest.mark.integration

P_TOLERANCE = 0.06  # bf16 on one CPU vs fp32 on another moves P(respond) by up to ~0.03


@pytest.fixture(scope="module")
def shipped_engine():
    from model.config import EngineConfig
    from model.engine import Engine

    return Engine.from_config(EngineConfig(seed=0, temperature=0.0))


def test_shipped_adapter_is_small_and_documented():
    files = {p.name: p.stat().st_size for p in SHIPPED_ADAPTER_DIR.iterdir()}
    assert files["adapter_model.safetensors"] < 8 * 2**20
    meta = json.loads((SHIPPED_ADAPTER_DIR / "chime_adapter.json").read_text())
    assert 0 < meta["threshold"] < 1 and meta["dev_metrics"]["macro_f1"] is not None
    card = json.loads((SHIPPED_ADAPTER_DIR / "run_card.json").read_text())
    assert card["evaluation"]["threshold"] == meta["threshold"]
    assert card["recipe"]["model"] == "default" and card["recipe"]["name"].startswith("cpu-lora")


def test_default_engine_uses_the_shipped_adapter_and_its_threshold(shipped_engine):
    meta = json.loads((SHIPPED_ADAPTER_DIR / "chime_adapter.json").read_text())
    assert shipped_engine.adapter == str(SHIPPED_ADAPTER_DIR)
    assert shipped_engine.config.threshold == pytest.approx(meta["threshold"])


def test_dev_subset_reproduces_recorded_decisions(shipped_engine):
    from model.conversation import read_conversations
    from training.evaluate import evaluate

    ref = json.loads((SHIPPED_ADAPTER_DIR / "reference_decisions.json").read_text())
    convs = [c for c in read_conversations(ref["file"]) if c.id in set(ref["conversations"])]
    _, rows = evaluate(shipped_engine, convs)
    recorded = {(r["id"], r["index"]): r for r in ref["rows"]}
    assert len(rows) == len(recorded) > 20
    for row in rows:
        want = recorded[(row.conversation_id, row.index)]
        assert row.p_respond == pytest.approx(want["p_respond"], abs=P_TOLERANCE), (row.conversation_id, row.index)
        if abs(want["p_respond"] - ref["threshold"]) > P_TOLERANCE:
            assert row.decision == want["decision"], (row.conversation_id, row.index, row.content)
