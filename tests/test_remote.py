"""The `openai` backend: an engine whose forward passes run on a remote completions server.

The server is `chime serve`'s app over the tiny random model on a loopback port (as in test_api.py); the
remote engine loads only the tokenizer of the same model directory and must decide and reply exactly as
a local engine does. A random model does not put the decision markers in its top 20 next tokens, so the
server and client here exchange all 600 (vLLM: `--max-logprobs`); the default top 20 gives the typed error.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from bot.api import create_app
from model.config import EngineConfig
from model.engine import Engine, IncomingMessage
from model.errors import ConfigError, ModelLoadError, RemoteEngineError
from model.remote import RemoteRunner, normalize_base_url
from tests.test_api import serving

VOCAB = 600
MESSAGES = ["who's up for pizza tonight?", "me! 7pm works", "@Chime what's 15% of 84?", "thanks!", "what time?"]


def _settings(tiny_model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"model": str(tiny_model_dir), "dtype": "float32", "seed": 0, "temperature": 0.0, "max_new_tokens": 8,
            "threshold": 1.0, **extra}  # threshold 1: only the @mention gets a reply


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    server = Engine.from_config(EngineConfig(**_settings(tiny_model_dir)))
    with serving(create_app(server, max_logprobs=VOCAB)) as url:
        yield url


def _remote(tiny_model_dir: Path, url: str, top: int = VOCAB) -> Engine:
    engine = Engine.from_config(EngineConfig(**_settings(tiny_model_dir, backend="openai", base_url=url)))
    assert isinstance(engine.runner, RemoteRunner)
    engine.runner.top_logprobs = top
    return engine


def test_remote_decisions_and_replies_match_the_local_engine(tiny_model_dir: Path, base_url: str) -> None:
    local = Engine.from_config(EngineConfig(**_settings(tiny_model_dir)))
    remote = _remote(tiny_model_dir, base_url)
    replies = []
    for text in MESSAGES:
        want = local.handle("general", IncomingMessage("alice", text))
        got = remote.handle("general", IncomingMessage("alice", text))
        assert got.p_respond == pytest.approx(want.p_respond, abs=1e-3), text
        assert got.decision == want.decision
        assert got.response == want.response  # greedy: the same tokens
        replies.append(got.response)
    assert [r is not None for r in replies] == ["@Chime" in t for t in MESSAGES]  # the reply was compared too
    with pytest.raises(ModelLoadError, match="remote backend"):  # the remote server serves the adapter
        remote.reload_adapter(None)


def test_markers_outside_the_top_logprobs_give_the_typed_error(tiny_model_dir: Path, base_url: str) -> None:
    remote = _remote(tiny_model_dir, base_url, top=20)
    with pytest.raises(RemoteEngineError, match="top 20"):
        remote.decide("general", IncomingMessage("alice", MESSAGES[0]))


def test_a_missing_marker_counts_as_minus_infinity(tiny_model_dir: Path) -> None:
    runner = RemoteRunner("http://127.0.0.1:9/v1", "chime", _tokenizer(tiny_model_dir))
    runner.top_tokens = lambda out: {5: -0.1, 7: -3.0}  # type: ignore[method-assign]
    logits = runner.marker_logits(torch.tensor([1, 2]), [7, 9])
    assert logits[0] == -3.0 and logits[1] == -math.inf
    assert torch.sigmoid(logits[1] - logits[0]) == 0.0


def test_unreachable_server_is_a_typed_error_not_a_hang(tiny_model_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    start = time.monotonic()
    with pytest.raises(RemoteEngineError, match="cannot reach"):
        Engine.from_config(EngineConfig(**_settings(tiny_model_dir, backend="openai", base_url=f"http://127.0.0.1:{port}/v1")))
    assert time.monotonic() - start < 10
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        runner = RemoteRunner(f"http://127.0.0.1:{silent.getsockname()[1]}", "m", _tokenizer(tiny_model_dir), timeout_s=0.5)
        with pytest.raises(RemoteEngineError, match="no answer within|cannot reach"):
            runner.served_models()


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        EngineConfig(backend="openai").validate()
    with pytest.raises(ConfigError, match="backend openai"):
        EngineConfig(base_url="http://gpu1:8000/v1").validate()
    EngineConfig(backend="openai", base_url="http://gpu1:8000/v1", remote_model="chime").validate()
    assert normalize_base_url("http://gpu1:8000/") == "http://gpu1:8000/v1"
    assert normalize_base_url("https://x.example/api/v1/") == "https://x.example/api/v1"


def test_completions_endpoint_openai_shape(base_url: str, tiny_format: Any) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=20)
    ids = tiny_format.encode("alice: who is up for pizza tonight?")
    r = client.completions.create(model="anything", prompt=ids, max_tokens=4, temperature=0, logprobs=5)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    steps = len(choice.logprobs.tokens or [])
    assert 1 <= steps <= 4 and len(choice.logprobs.top_logprobs) == steps
    first = choice.logprobs.top_logprobs[0]
    assert 5 <= len(first) <= 6 and choice.logprobs.tokens[0] in first
    assert max(first.values()) == choice.logprobs.token_logprobs[0]  # temperature 0: the likeliest token
    text = client.completions.create(model="x", prompt="alice: hi", max_tokens=3, temperature=0)
    assert text.choices[0].logprobs is None and text.usage is not None and text.usage.prompt_tokens > 0
    for bad in ({"echo": True}, {"logprobs": VOCAB + 1}, {"prompt": [VOCAB + 5]}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**{"model": "x", "prompt": ids, "max_tokens": 1, **bad})


def test_retrain_evaluates_and_promotes_on_a_remote_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`chime retrain --backend openai`: the candidate is loaded into the server at run time, both adapters
    are evaluated there, and after the promotion the name the bots use serves the new adapter."""
    from datetime import datetime, timezone

    from model.adapter_registry import AdapterRegistry
    from tests.test_retrain import _cfg, _log_chats
    from training.retrain import run_cycle

    server = Engine.from_config(EngineConfig(**_settings(tiny_model_dir)))
    app = create_app(server, max_logprobs=VOCAB, allow_lora_updates=True)
    seen: list[str] = []
    serve = server.reload_adapter

    def spy(path: str | None) -> None:  # every adapter the server switches to, in order
        seen.append(Path(path).name if path else "base")
        serve(path)

    server.reload_adapter = spy  # type: ignore[method-assign]
    with serving(app) as url:
        cfg = _cfg(tmp_path, tiny_model_dir, f1_tolerance=2.0, fi_tolerance=2.0, named_tolerance=2.0,
                   backend="openai", base_url=url, remote_model="chime", remote_top_logprobs=VOCAB)
        _log_chats(cfg.db, tmp_path, 6, datetime(2026, 11, 1, tzinfo=timezone.utc))
        result = run_cycle(cfg)
        assert result.status == "promoted", result.reason
        current = AdapterRegistry(cfg.adapters_dir).current()
        assert seen[0] == "adapter"  # the candidate (runs/<name>/adapter) was evaluated on the server ...
        assert "base" in seen  # ... and so was the serving one ("chime" is not loaded yet: the base model)
        models = openai.OpenAI(base_url=url, api_key="x").models.list()
        served = {m.id: m.model_extra.get("root") for m in models.data}
        assert served.get("chime") == str(current.path.resolve())  # the bots' name now serves the promotion
        assert result.candidate not in served  # the candidate's own name was unloaded
