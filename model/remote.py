"""The `openai` backend: forward passes on a remote OpenAI-compatible completions server.

The engine keeps everything else local (the chat format, tokenisation, channel histories, the decision
rule, tool calls); only the model's next-token distribution comes from the server, through the legacy
completions API with a list of token ids as the prompt and `logprobs` for the top tokens. Many bots (or
Discord servers) can so share GPU workers. The reference server is vLLM:

    vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora \\
        --lora-modules chime=model/adapters/default --max-logprobs 20   # rank-16 adapter: vLLM default --max-lora-rank
    chime discord --backend openai --base-url http://gpu1:8000/v1 --remote-model chime

Another `chime serve` works too (it serves `POST /v1/completions`). The API key, if the server needs
one, comes from the environment only: CHIME_REMOTE_API_KEY, else OPENAI_API_KEY.

How the Runner interface maps onto requests: a channel's "state" is just its token ids (`crop` and
`extend` are list operations, free); `extend` returns the ids as a tensor handle meaning "the output
after these ids". `marker_logits` and `next_logits` each make one request (`max_tokens=1`,
`temperature=0`, `logprobs=20`, vLLM's `return_tokens_as_token_ids`), so a decision is one request and a
reply one request per token; vLLM's prefix caching keeps those cheap on the server.

Limits: the server returns only the top `top_logprobs` (vLLM's `--max-logprobs`, 20 by default) log
probabilities. A decision needs "silence" and "response" among them (a trained adapter puts both at
the top after "("); a marker missing from the list counts as -inf (P(respond) is then 0 or 1), and both
missing raises RemoteEngineError. Replies sample from the top tokens only (greedy replies are exact;
sampling is top-k=20 sampling on top of the engine's top-p). Logprobs are log-softmax values, which
differ from logits by a constant per position: the two-way softmax of a decision is unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.config import DEFAULT_MODEL, EngineConfig
from model.errors import ConfigError, RemoteEngineError
from model.loading import DEFAULT_CACHE_NAME, LoadedModel, load_tokenizer, prepare_default_model, resolve_adapter
from model.runner import Runner

log = logging.getLogger(__name__)

API_KEY_ENV = ("CHIME_REMOTE_API_KEY", "OPENAI_API_KEY")
TOKEN_ID_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` spelling of a token


@dataclass
class RemoteState:
    ids: list[int] = field(default_factory=list)


class RemoteClient:
    """JSON requests to an OpenAI-compatible server; connection failures retried, every failure typed."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0, connect_retries: int = 2):
        self.base_url = normalize_base_url(base_url)
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.connect_retries = connect_retries

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request; connection failures are retried, every failure becomes RemoteEngineError."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.connect_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                    result = json.loads(response.read())
                    if not isinstance(result, dict):
                        raise RemoteEngineError(f"{method} {url}: expected a JSON object, got {type(result).__name__}")
                    return result
            except urllib.error.HTTPError as e:
                raise RemoteEngineError(f"{method} {url}: HTTP {e.code}: {_error_message(e)}") from e
            except (urllib.error.URLError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                # Only a refused or reset connection is worth another try; a timeout already waited long.
                if isinstance(reason, ConnectionError) and attempt < self.connect_retries:
                    log.warning("remote %s unreachable (%s); retrying", url, reason)
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise RemoteEngineError(f"{method} {url}: cannot reach the server: {reason}") from e
            except TimeoutError as e:
                raise RemoteEngineError(f"{method} {url}: no answer within {self.timeout_s:.0f} s") from e
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RemoteEngineError(f"{method} {url}: the answer is not JSON: {e}") from e
        raise AssertionError("unreachable")


    def load_lora_adapter(self, name: str, path: str) -> None:
        """vLLM's runtime adapter loading (the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or
        `chime serve --allow-lora-updates`); `path` must exist on the server's filesystem."""
        self.request("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_lora_adapter(self, name: str) -> None:
        self.request("POST", "/unload_lora_adapter", {"lora_name": name})


class RemoteRunner(Runner):
    """A Runner whose forward passes happen on an OpenAI-compatible completions server."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: Any,
        api_key: str | None = None,
        top_logprobs: int = 20,
        timeout_s: float = 60.0,
        connect_retries: int = 2,
    ):
        self.device = "remote"
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.top_logprobs = top_logprobs
        self.timeout_s = timeout_s
        self.client = RemoteClient(self.base_url, api_key, timeout_s, connect_retries)
        self._ids_by_text: dict[str, int] | None = None  # for servers that name tokens by their text
        self._last: tuple[tuple[int, ...], dict[int, float]] | None = None  # one request per position

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.client.request(method, path, body)

    def served_models(self) -> list[str]:
        data = self.request("GET", "/models").get("data")
        if not isinstance(data, list):
            raise RemoteEngineError(f"GET {self.base_url}/models: no model list in the answer")
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    # ------------------------------------------------------------------ the Runner interface

    def new_state(self) -> RemoteState:
        return RemoteState()

    def length(self, state: RemoteState) -> int:
        return len(state.ids)

    def crop(self, state: RemoteState, length: int) -> None:
        assert 0 <= length <= len(state.ids), f"cannot crop {len(state.ids)} tokens to {length}"
        del state.ids[length:]

    def extend(self, state: RemoteState, ids: Sequence[int]) -> torch.Tensor:
        assert len(ids) > 0, "extend needs at least one token"
        state.ids.extend(int(i) for i in ids)
        return torch.tensor(state.ids, dtype=torch.long)  # the handle: "the output after these ids"

    def marker_logits(self, out: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        top = self.top_tokens(out)
        if not any(t in top for t in token_ids):
            raise RemoteEngineError(
                f"none of the marker tokens {self.tokenizer.convert_ids_to_tokens(list(token_ids))} is among the "
                f"server's top {self.top_logprobs} next tokens: is {self.model!r} the base model with Chime's adapter?"
            )
        return torch.tensor([top.get(t, -math.inf) for t in token_ids], dtype=torch.float32)

    def next_logits(self, out: torch.Tensor) -> torch.Tensor:
        logits = torch.full((self.vocab_size,), -math.inf, dtype=torch.float32)
        for token, logprob in self.top_tokens(out).items():
            logits[token] = logprob
        return logits

    # ------------------------------------------------------------------ top tokens

    def top_tokens(self, out: torch.Tensor) -> dict[int, float]:
        """{token id: logprob} of the server's top next tokens after the ids in `out`."""
        ids = tuple(int(i) for i in out.tolist())
        if self._last is not None and self._last[0] == ids:
            return self._last[1]
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.top_logprobs,
            "echo": False,
            "return_tokens_as_token_ids": True,  # vLLM: "token_id:N" keys, exact whatever the token's text
        }
        answer = self.request("POST", "/completions", body)
        try:
            logprobs = answer["choices"][0]["logprobs"]
            entries = dict(logprobs["top_logprobs"][0])
            if logprobs.get("tokens") and logprobs.get("token_logprobs"):  # the chosen token, when not listed
                entries.setdefault(logprobs["tokens"][0], logprobs["token_logprobs"][0])
        except (KeyError, IndexError, TypeError) as e:
            raise RemoteEngineError(f"POST {self.base_url}/completions: no top logprobs in the answer ({e!r})") from e
        top: dict[int, float] = {}
        for name, logprob in entries.items():
            token = self._token_id(str(name))
            if token is not None and logprob is not None and 0 <= token < self.vocab_size:
                top[token] = max(float(logprob), top.get(token, -math.inf))
        if not top:
            raise RemoteEngineError(f"POST {self.base_url}/completions: no usable tokens in the top logprobs")
        self._last = (ids, top)
        return top

    def _token_id(self, name: str) -> int | None:
        if name.startswith(TOKEN_ID_PREFIX) and name[len(TOKEN_ID_PREFIX) :].isdigit():
            return int(name[len(TOKEN_ID_PREFIX) :])
        if self._ids_by_text is None:  # a server without vLLM's token-id spelling: tokens by their text
            self._ids_by_text = {}
            for i in range(self.vocab_size):
                self._ids_by_text.setdefault(self.tokenizer.decode([i]), i)
        return self._ids_by_text.get(name)


def normalize_base_url(url: str) -> str:
    """The OpenAI base URL without a trailing slash; a bare host gets vLLM's "/v1"."""
    url = url.rstrip("/")
    if urllib.parse.urlsplit(url).path == "":
        url += "/v1"
    return url


def remote_api_key() -> str | None:
    for name in API_KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        return str(message or body)[:300]
    except Exception:
        return str(e.reason)


def load_remote(config: EngineConfig) -> tuple[LoadedModel, RemoteRunner]:
    """The tokenizer of `config.model` and a runner for the server at `config.base_url` (checked: it answers).

    The model's weights are not loaded; the adapter is only resolved, for its calibrated thresholds (the
    server must serve the same one: `remote_model`). With `remote_model` unset the server must serve
    exactly one model.
    """
    assert config.base_url is not None, "validate() requires base_url for the openai backend"
    path = str(prepare_default_model()) if config.model == DEFAULT_MODEL else config.model
    tokenizer = load_tokenizer(path)
    runner = RemoteRunner(config.base_url, config.remote_model or "", tokenizer, api_key=remote_api_key(),
                          top_logprobs=config.remote_top_logprobs)
    served = runner.served_models()
    if config.remote_model is None:
        if len(served) != 1:
            raise ConfigError(f"{runner.base_url} serves {served}: choose one with remote_model (--remote-model)")
        runner.model = served[0]
    elif config.remote_model not in served:
        log.warning("%s lists %s, not %r; requests name it anyway", runner.base_url, served, config.remote_model)
    name = path if config.model != DEFAULT_MODEL else DEFAULT_CACHE_NAME
    loaded = LoadedModel(model=None, tokenizer=tokenizer, device=f"{runner.base_url} ({runner.model})", dtype=None,
                         name=name, adapter=resolve_adapter(config), quantized=False)
    return loaded, runner
