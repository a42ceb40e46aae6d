"""`chime serve`: an OpenAI-compatible HTTP API over Chime's engine (FastAPI + uvicorn).

    chime serve [--host 127.0.0.1] [--port 8000] [--mode chat|group] [engine flags: --model, --adapter, ...]
    CHIME_API_KEY=... chime serve      # then every request needs "Authorization: Bearer <key>"

Any OpenAI client works against `http://HOST:PORT/v1`:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="chime", messages=[
        {"role": "user", "name": "alice", "content": "who's up for pizza?"},
        {"role": "user", "name": "bob", "content": "@Chime what's 15% of 84?"},
    ], extra_body={"chime": {"mode": "group"}})
    r.choices[0].message.content    # "" when the bot stays silent
    r.choices[0].model_extra["chime"]  # {"decision": "respond", "p_respond": 0.93, ...}

Endpoints: `GET /v1/models` (the one served model), `POST /v1/chat/completions`. Any `model` value is
accepted (one model is served); responses name the served one. docs/api.md has the full reference.

How OpenAI messages become a Chime conversation (a fresh engine channel per request, reset after it):

- `system`/`developer` messages are ignored: Chime renders its own system header (the bot's name and
  the tools), the one its adapter was trained on. The bot's name comes from `chime.bot_name`.
- `user` messages are group-chat messages; `name` is the speaker's display name (default "user").
  Two human messages in a row get the implicit "(silence)" bot turn between them, as in conversation files.
- `assistant` messages are the bot's earlier turns: content and/or `tool_calls` (JSON-string arguments).
- `tool` messages are tool results; `tool_call_id` names the preceding assistant call they answer.
- The last message must be a user or tool message: the reply answers it.

`tools` (OpenAI function tools) are listed in the prompt; the model's calls come back as `tool_calls`
with `finish_reason: "tool_calls"`. The API never runs tools: the client runs them and sends the results
back as `tool` messages, as with OpenAI. Without `tools` (or with `tool_choice: "none"`) the prompt lists
none, and calls the model writes anyway are dropped. `tool_choice` "required" or a named function is
refused (400): the model cannot be forced.

Sampling: `temperature` (0: greedy), `top_p`, `seed`, `max_tokens`/`max_completion_tokens` override the
engine's settings for the request; left out, the engine's own apply (`--temperature`, `--max-new-tokens`).

The `chime` extension field (in the request body; `extra_body={"chime": {...}}` with the openai client):

    "chime": {"mode": "chat" | "group", "bot_name": "Chime", "threshold": 0.5}

- `mode: "chat"` (the default, what a plain OpenAI client expects; `chime serve --mode group` changes
  it): the bot always replies.
- `mode: "group"`: the engine first decides on the last user message, as in a group chat. Silent: the
  reply is `content: ""` with `finish_reason: "stop"`. Every group-mode choice carries
  `"chime": {"decision": "respond" | "silence", "p_respond": float, "threshold": float, "addressed": bool}`
  (when the last message is a tool result the bot already chose to speak: decision "respond",
  `p_respond` null). `threshold` overrides the engine's (calibrated) thresholds for this request;
  an @mention of the bot is answered whatever the threshold unless the server runs with
  `--no-mention-override`, so `threshold: 1.0` answers only @mentions.

Streaming (`stream: true`): Server-Sent Events of `chat.completion.chunk` objects: the role first, then
content as tokens are generated, then tool calls (one delta per call, complete arguments) and a chunk
with `finish_reason`, then `data: [DONE]`. Text that could be the start of a tool call in the model's
tool format (e.g. `<tool_call>`) is held back until it is known, so the streamed content always equals
the non-streamed `content`. In group mode the role chunk and the final chunk carry `chime`.
`stream_options.include_usage` adds a last chunk with `usage`.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 for invalid requests,
401 for a missing or wrong key. The engine handles one request at a time (one worker thread, in arrival
order); a client that disconnects mid-stream stops its generation at the next token.
"""

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fastapi import FastAPI

    from model.conversation import Message, ToolCall
    from model.engine import Engine

log = logging.getLogger(__name__)

Mode = Literal["chat", "group"]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------------------- request schema

class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are ignored


class ContentPart(_Schema):
    type: str
    text: str | None = None


class FunctionCall(_Schema):
    name: str = Field(min_length=1)
    arguments: str = ""  # a JSON object as a string, as OpenAI sends it


class ToolCallIn(_Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Schema):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Schema):
    type: Literal["function"]
    function: FunctionDef


class ChimeOptions(_Schema):
    model_config = ConfigDict(extra="forbid")  # a typo in Chime's own field is an error

    mode: Mode | None = None
    bot_name: str | None = Field(default=None, min_length=1, max_length=48)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class StreamOptions(_Schema):
    include_usage: bool = False


class ChatCompletionRequest(_Schema):
    model: str | None = None  # any value: one model is served
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    stop: str | list[str] | None = None
    chime: ChimeOptions | None = None


class CompletionRequest(_Schema):
    """The legacy completions API (`POST /v1/completions`): a raw prompt, no chat template."""

    model: str | None = None  # any value: one model is served
    prompt: str | list[int] = Field(min_length=1)  # text, or token ids of the served model's tokenizer
    max_tokens: int = Field(default=16, ge=1)  # OpenAI's default
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    logprobs: int | None = Field(default=None, ge=0)  # top logprobs per generated token (at most the server's max_logprobs)
    echo: bool = False
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extension: tokens named "token_id:N"


class ApiError(Exception):
    """An error the client caused or should see, rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- requests as engine work


@dataclass
class Plan:
    """What one request asks of the engine, checked and converted to Chime's own objects."""

    mode: Mode
    bot_name: str
    tools: list[dict[str, Any]]  # bare function schemas for the prompt
    history: list["Message"]  # everything before the message answered
    last: "Message"  # a user message (decided on in group mode) or a tool result
    threshold: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None


@dataclass
class Outcome:
    decision: Literal["respond", "silence"] | None  # None in chat mode
    p_respond: float | None
    threshold: float | None
    addressed: bool | None
    text: str
    tool_calls: list["ToolCall"] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "tool_calls"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def chime(self) -> dict[str, Any]:
        p = None if self.p_respond is None else round(self.p_respond, 6)
        return {"decision": self.decision, "p_respond": p, "threshold": self.threshold, "addressed": self.addressed}


class _Abandoned(Exception):
    """The client went away: stop generating."""


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"only text content is supported, got a {part.type!r} part", f"{where}.content[{i}]")
        parts.append(part.text)
    return "\n".join(parts)


def _arguments(raw: str, where: str) -> dict[str, Any]:
    try:
        args = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise ApiError(400, f"tool call arguments are not valid JSON: {e.msg}", where) from e
    if not isinstance(args, dict):
        raise ApiError(400, "tool call arguments must be a JSON object", where)
    return args


def plan_request(req: ChatCompletionRequest, engine: "Engine", default_mode: Mode = "chat") -> Plan:
    """Check a request and turn it into Chime messages; raises ApiError (400) for what cannot be served."""
    from model.conversation import Message, ToolCall

    if req.stop:
        raise ApiError(400, "stop sequences are not supported", "stop")
    if isinstance(req.tool_choice, dict) or req.tool_choice == "required":
        raise ApiError(400, "tool_choice can be 'auto' or 'none': the model cannot be forced to call a tool", "tool_choice")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > engine.config.max_context_tokens:
        raise ApiError(400, f"max_tokens is larger than the context ({engine.config.max_context_tokens} tokens)",
                       "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    options = req.chime or ChimeOptions()
    tools = [] if req.tool_choice == "none" else [t.function.model_dump(exclude_none=True) for t in req.tools or []]

    messages: list[Message] = []
    call_names: dict[str, str] = {}  # tool_call_id -> the function it called
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        text = _text(m.content, where)
        if m.role in ("system", "developer"):
            continue  # Chime renders its own system header (see the module docstring)
        if m.role == "user":
            messages.append(Message(role="user", content=text, name=m.name or "user"))
        elif m.role == "assistant":
            calls = []
            for j, c in enumerate(m.tool_calls or []):
                calls.append(ToolCall(c.function.name, _arguments(c.function.arguments, f"{where}.tool_calls[{j}].function.arguments")))
                call_names[c.id] = c.function.name
            messages.append(Message(role="assistant", content=text, tool_calls=calls))
        else:
            if m.tool_call_id is None or m.tool_call_id not in call_names:
                raise ApiError(400, "a tool message's tool_call_id must name a tool call of an earlier assistant message",
                               f"{where}.tool_call_id")
            messages.append(Message(role="tool", content=text, name=call_names[m.tool_call_id]))
    if not messages or messages[-1].role == "assistant":
        raise ApiError(400, "the last message must be a user or tool message: the reply answers it", "messages")
    return Plan(
        mode=options.mode or default_mode,
        bot_name=options.bot_name or engine.config.bot_name,
        tools=tools,
        history=messages[:-1],
        last=messages[-1],
        threshold=options.threshold,
        temperature=0.0 if req.top_p == 0 else req.temperature,  # top_p 0 keeps only the likeliest token
        top_p=req.top_p or None,
        seed=req.seed,
        max_tokens=max_tokens,
    )


@contextlib.contextmanager
def _sampling(engine: "Engine", temperature: float | None, top_p: float | None, seed: int | None) -> Iterator[None]:
    """The request's sampling settings for the duration of one request (the caller holds the engine's lock).

    `Engine.generate` samples with the engine's own settings and generator; a request's overrides are
    set there and put back afterwards, the generator's state included, so requests do not leak settings.
    """
    config = engine.config
    saved = config.temperature, config.top_p
    state = engine._generator.get_state() if seed is not None else None
    try:
        if temperature is not None:
            config.temperature = temperature
        if top_p is not None:
            config.top_p = top_p
        if seed is not None:
            engine._generator.manual_seed(seed)
        yield
    finally:
        config.temperature, config.top_p = saved
        if state is not None:
            engine._generator.set_state(state)


def run_plan(engine: "Engine", plan: Plan, post: Callable[[str, Any], None] | None = None,
             cancel: threading.Event | None = None) -> Outcome:
    """Do one request's engine work (blocking; in the server's worker thread).

    A fresh channel holds the request's messages and is dropped afterwards. With `post` (streaming), the
    group decision is posted as ("decision", Outcome) and generated text as ("text", piece); a set
    `cancel` stops generation at the next token.
    """
    from model.chat_format import BotTurn
    from model.engine import IncomingMessage, decision_rule, names_bot

    channel_id = f"api-{uuid.uuid4().hex}"
    fmt = engine.fmt
    with engine._lock, _sampling(engine, plan.temperature, plan.top_p, plan.seed):
        try:
            ch = engine.channel(channel_id, plan.bot_name, plan.tools)
            following = (plan.history + [plan.last])[1:]
            for msg, nxt in zip(plan.history, following, strict=True):
                engine.add_message(channel_id, msg)
                if msg.role == "user" and nxt.role != "assistant":
                    engine.commit(channel_id, BotTurn(kind="silence"))  # the implicit silence between two messages
            outcome = Outcome(decision="respond" if plan.mode == "group" else None, p_respond=None, threshold=None,
                              addressed=None, text="")
            if plan.last.role == "user" and plan.mode == "group":
                d = engine.decide(channel_id, IncomingMessage(plan.last.name or "user", plan.last.content))
                speak, threshold = d.decision == "respond", d.threshold
                if plan.threshold is not None:
                    speak, threshold = decision_rule(d.p_respond, d.addressed, names_bot(d.content, ch.bot_name),
                                                     plan.threshold, plan.threshold, engine.config.always_answer_mentions)
                outcome.decision = "respond" if speak else "silence"
                outcome.p_respond, outcome.threshold, outcome.addressed = d.p_respond, threshold, d.addressed
            elif plan.last.role == "user":
                engine.add_human(channel_id, plan.last.name or "user", plan.last.content)
            else:
                engine.add_message(channel_id, plan.last)
            if post is not None and plan.mode == "group":
                post("decision", outcome)
            head = ch.history_tokens() + len(fmt.bot_header_ids) + len(fmt.decision_prefix_ids)
            if outcome.decision == "silence":
                outcome.prompt_tokens = head
                return outcome

            def on_text(piece: str) -> None:
                if cancel is not None and cancel.is_set():
                    raise _Abandoned()
                assert post is not None
                post("text", piece)

            limit = plan.max_tokens or engine.config.max_new_tokens
            reply = engine.generate(channel_id, max_new_tokens=limit, on_text=on_text if post is not None else None)
            outcome.text = reply.text
            outcome.prompt_tokens = head + len(fmt.response_marker_rest_ids())
            outcome.completion_tokens = reply.n_tokens
            if reply.errors:
                log.info("request %s: tool calls that did not parse: %s", channel_id, "; ".join(reply.errors))
            if reply.tool_calls and not plan.tools:
                log.info("request %s: dropped %d tool call(s): the request lists no tools", channel_id, len(reply.tool_calls))
            elif reply.tool_calls:
                outcome.tool_calls = list(reply.tool_calls)
                outcome.finish_reason = "tool_calls"
            if outcome.finish_reason != "tool_calls" and reply.n_tokens >= limit:
                outcome.finish_reason = "length"
            return outcome
        finally:
            engine.reset(channel_id)


# ---------------------------------------------------------------------------- raw completions


@dataclass(eq=False)
class _CachedPrompt:
    runner: Any
    state: Any
    ids: list[int]


class PromptCache:
    """Runner states of recent raw completions: a prompt that extends one of them runs only its new tokens.

    A remote Chime engine (the `openai` backend) resends a channel's whole history for every decision and
    every reply token; each such prompt extends the previous one, so with this cache each costs only its
    new tokens, as with vLLM's prefix caching. A few states are kept (about one per active channel): a
    prompt continues the state sharing most of it (at least half of that state: the same conversation,
    whose re-rendered last turn may differ), else takes a fresh state or the least recently used one.
    """

    def __init__(self, slots: int = 4):
        self.slots = slots
        self._entries: list[_CachedPrompt] = []

    def clear(self) -> None:
        self._entries.clear()

    def forward(self, runner: Any, ids: list[int]) -> tuple[_CachedPrompt, Any]:
        """Bring a state to exactly `ids` (at least the last token is run); returns it and the last output."""
        from model.engine import _common_prefix

        self._entries = [e for e in self._entries if e.runner is runner]  # a swapped model: old caches are void
        shared = {id(e): _common_prefix(e.ids, ids) for e in self._entries}
        entry = max(self._entries, key=lambda e: shared[id(e)], default=None)
        if entry is None or 2 * shared[id(entry)] < len(entry.ids):
            if len(self._entries) < self.slots:
                entry = _CachedPrompt(runner, runner.new_state(), [])
            else:
                entry = self._entries[0]
        if entry in self._entries:
            self._entries.remove(entry)
        self._entries.append(entry)  # most recently used last
        keep = min(_common_prefix(entry.ids, ids), len(ids) - 1)
        runner.crop(entry.state, keep)
        out = runner.extend(entry.state, ids[keep:])
        entry.ids = list(ids)
        return entry, out

    def extend(self, entry: _CachedPrompt, token: int) -> Any:
        out = entry.runner.extend(entry.state, [token])
        entry.ids.append(token)
        return out


def completion_ids(req: CompletionRequest, engine: "Engine", max_logprobs: int = 20) -> list[int]:
    """The request's prompt as token ids, checked against the vocabulary and the context; ApiError (400) otherwise."""
    if req.logprobs is not None and req.logprobs > max_logprobs:
        raise ApiError(400, f"logprobs can be at most {max_logprobs}", "logprobs")
    if req.echo:
        raise ApiError(400, "echo is not supported", "echo")
    if req.stream:
        raise ApiError(400, "streaming is not supported for /v1/completions", "stream")
    if isinstance(req.prompt, str):
        ids = engine.fmt.encode(req.prompt)
    else:
        ids = list(req.prompt)
        vocab = len(engine.fmt.tokenizer)
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    if len(ids) + req.max_tokens > engine.config.max_context_tokens:
        raise ApiError(400, f"prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceed the context "
                            f"({engine.config.max_context_tokens} tokens)", "prompt")
    return ids


def run_completion(engine: "Engine", cache: PromptCache, req: CompletionRequest, ids: list[int]) -> dict[str, Any]:
    """Continue the raw token ids `ids` with the served model (blocking; in the server's worker thread).

    The engine's sampling (with the request's overrides) picks each token; logprobs are the model's own
    (log-softmax of the logits before temperature), as vLLM reports them. A token that ends a turn stops
    generation (finish "stop"): it is listed in the logprobs, not in the text.
    """
    import torch

    fmt = engine.fmt
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    def name(token: int) -> str:
        return f"token_id:{token}" if req.return_tokens_as_token_ids else str(fmt.tokenizer.decode([token]))

    temperature = 0.0 if req.top_p == 0 else req.temperature
    with engine._lock, _sampling(engine, temperature, req.top_p or None, req.seed):
        entry, out = cache.forward(engine.runner, ids)
        generated: list[int] = []
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        text, finish, cut_by_stop_string = "", "length", False
        while len(generated) < req.max_tokens:
            logits = engine.runner.next_logits(out).float()
            token = engine._sample(logits)
            if req.logprobs is not None:
                logprobs = torch.log_softmax(logits, dim=-1)
                values, order = torch.topk(logprobs, min(req.logprobs, logprobs.numel()))
                top = {name(int(i)): float(v) for i, v in zip(order, values, strict=True)}
                top.setdefault(name(token), float(logprobs[token]))  # the chosen token is always listed
                tokens.append(name(token))
                token_logprobs.append(float(logprobs[token]))
                top_logprobs.append(top)
            if token in fmt.stop_ids:
                finish = "stop"
                break
            generated.append(token)
            text = fmt.decode(generated)
            cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
            if cut >= 0:
                text, finish, cut_by_stop_string = text[:cut], "stop", True
                break
            if len(generated) < req.max_tokens:
                out = cache.extend(entry, token)
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if req.logprobs is not None:
        offsets = [len(fmt.decode(generated[:i])) for i in range(len(tokens))]
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                              "text_offset": offsets}
    n_out = len(generated) + (finish == "stop" and not cut_by_stop_string)  # a stop token counts, as in vLLM
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id(engine), "choices": [choice],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}}


# ---------------------------------------------------------------------------- streaming


def _before_openers(text: str, openers: tuple[str, ...]) -> int:
    """Where the first opener starts, or the start of a trailing partial opener, else len(text)."""
    cut = len(text)
    for opener in openers:
        i = text.find(opener)
        if i >= 0:
            cut = min(cut, i)
            continue
        for k in range(min(len(opener) - 1, len(text)), 0, -1):
            if text.endswith(opener[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut


def call_start(text: str, tool_format: str) -> int:
    """How much of the raw generated `text` surely is reply text, not (the start of) a tool call.

    Grows monotonically as `text` grows, so what was streamed stays a prefix of what can be streamed.
    """
    if tool_format in ("plain", "hermes"):
        return _before_openers(text, ("<tool_call>",))
    if tool_format == "llama3":
        return _before_openers(text, ("{", "<|python_tag|>"))
    if tool_format == "glm4":  # a call is a name on its own line, then a line starting with "{"
        starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                starts.append(i + 1)
        lines = text.split("\n")
        for k, line in enumerate(lines):
            if line.lstrip(" \t").startswith("{"):
                return starts[max(k - 1, 0)]
        return starts[max(len(lines) - 2, 0)]
    return 0  # an unknown format: nothing streams before the end


class ContentStream:
    """The content deltas of a streamed reply: equal, concatenated, to the parsed reply's text.

    Reply text is stripped and tool calls are cut out of it, so leading and trailing whitespace and
    whatever may be a tool call are held back until more text (or the end) shows what they are.
    """

    def __init__(self, tool_format: str):
        self.tool_format = tool_format
        self.raw = ""
        self.sent = ""

    def feed(self, piece: str) -> str:
        self.raw += piece
        safe = self.raw[: call_start(self.raw, self.tool_format)].strip()
        if not safe.startswith(self.sent):  # cannot happen while call_start grows monotonically
            return ""
        new, self.sent = safe[len(self.sent) :], safe
        return new

    def finish(self, text: str) -> str:
        """The rest of the final parsed `text` after what was streamed."""
        if not text.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the reply %r", self.sent[:80], text[:80])
            return ""
        rest, self.sent = text[len(self.sent) :], text
        return rest


# ---------------------------------------------------------------------------- responses


def model_id(engine: "Engine") -> str:
    """The served model's id: chime/<base model>/<adapter version>."""
    return f"chime/{Path(engine.model_name).name or engine.model_name}/{engine.adapter_version}"


def _tool_calls_json(calls: list["ToolCall"], streamed: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls):
        item: dict[str, Any] = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
        }
        out.append({"index": i, **item} if streamed else item)
    return out


def _usage(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def completion_json(outcome: Outcome, plan: Plan, model: str, fingerprint: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": outcome.text, "refusal": None}
    if outcome.tool_calls:
        message["content"] = outcome.text or None
        message["tool_calls"] = _tool_calls_json(outcome.tool_calls)
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": outcome.finish_reason}
    if plan.mode == "group":
        choice["chime"] = outcome.chime()
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint, "choices": [choice], "usage": _usage(outcome)}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------- the app


class LoraRequest(_Schema):
    """vLLM's runtime adapter requests: `{"lora_name", "lora_path"}` (unload needs only the name)."""

    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str | None = None


class LoraRoutes:
    """Which adapter serves a request: the one loaded under the request's `model` name, else the one the
    server started with. Swapping happens in the engine thread, between requests."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.routes: dict[str, str] = {}
        self.default = engine.adapter

    def serve(self, model: str | None, prompts: "PromptCache") -> None:
        target = self.routes.get(model or "", self.default)
        if target == self.engine.adapter:
            return
        self.engine.reload_adapter(target)
        prompts.clear()  # cached states hold the old weights' keys and values


class EngineWorker:
    """Runs engine work in one thread, one request at a time in arrival order, off the event loop."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chime-engine")

    async def run(self, plan: Plan, post: Callable[[str, Any], None] | None = None,
                  cancel: threading.Event | None = None) -> Outcome:
        cancel = cancel or threading.Event()
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, run_plan, self.engine, plan, post, cancel)
        try:
            return await job
        except asyncio.CancelledError:  # a queued job is dropped; a running one stops at its next token
            cancel.set()
            raise

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run other engine work (a raw completion) in the same thread, in turn with the chat requests."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def create_app(engine: "Engine", api_key: str | None = None, default_mode: Mode = "chat",
               max_logprobs: int = 20, allow_lora_updates: bool = False) -> "FastAPI":
    """The HTTP app over `engine`. With `api_key`, every request needs `Authorization: Bearer <api_key>`.

    `max_logprobs` caps `logprobs` of `/v1/completions` (vLLM's `--max-logprobs`, 20 by default).
    `allow_lora_updates` opens vLLM's runtime adapter endpoints (`POST /v1/load_lora_adapter` and
    `/v1/unload_lora_adapter`, vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): a request whose `model` names a
    loaded adapter is served with it (the engine swaps adapters between requests); any other name gets
    the adapter the server started with. `chime retrain --backend openai` uses them to evaluate a candidate.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    worker = EngineWorker(engine)
    loras = LoraRoutes(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    # With a key, nothing answers without it: FastAPI's own schema and docs pages are off too.
    pages: dict[str, Any] = {"openapi_url": None, "docs_url": None, "redoc_url": None} if api_key else {}
    app = FastAPI(title="Chime", summary="OpenAI-compatible chat completions with learned silence", lifespan=lifespan,
                  **pages)
    app.state.engine = engine
    app.state.worker = worker

    def error_response(err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param is None:
            message = f"the request body must be a JSON object (Content-Type: application/json): {first.get('msg')}"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(ApiError(400, message, param))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(ApiError(err.status_code, str(err.detail), code=None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, "the server failed to handle the request", kind="server_error"))

    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "missing or incorrect API key (Authorization: Bearer ...)", code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": model_id(engine), "object": "model", "created": int(time.time()), "owned_by": "chime",
                "chime": {"base_model": engine.model_name, "adapter": engine.adapter_version,
                          "bot_name": engine.config.bot_name, "default_mode": default_mode}}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        adapters = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "chime", "root": path,
                     "parent": model_card()["id"]} for name, path in loras.routes.items()]
        return {"object": "list", "data": [model_card(), *adapters]}

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize)])
    async def load_lora_adapter(req: LoraRequest) -> dict[str, Any]:
        if not allow_lora_updates:
            raise ApiError(400, "runtime adapter updates are off (chime serve --allow-lora-updates)", code="lora_updates_off")
        if not req.lora_path:
            raise ApiError(400, "lora_path is required", "lora_path")
        if req.lora_name in loras.routes:
            raise ApiError(400, f"an adapter named {req.lora_name!r} is already loaded; unload it first", "lora_name")
        if not (Path(req.lora_path) / "adapter_config.json").is_file():
            raise ApiError(400, f"not an adapter directory on this server: {req.lora_path}", "lora_path")
        loras.routes[req.lora_name] = str(Path(req.lora_path).resolve())
        return {"object": "lora_adapter", "lora_name": req.lora_name, "lora_path": loras.routes[req.lora_name]}

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize)])
    async def unload_lora_adapter(req: LoraRequest) -> dict[str, Any]:
        if not allow_lora_updates:
            raise ApiError(400, "runtime adapter updates are off (chime serve --allow-lora-updates)", code="lora_updates_off")
        if loras.routes.pop(req.lora_name, None) is None:
            raise ApiError(404, f"no adapter named {req.lora_name!r} is loaded", "lora_name", code="model_not_found")
        return {"object": "lora_adapter", "lora_name": req.lora_name, "unloaded": True}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorize)])
    async def get_model(model: str) -> dict[str, Any]:
        card = model_card()
        if model != card["id"]:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {card['id']!r}", "model",
                           code="model_not_found")
        return card

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        await worker.call(loras.serve, req.model, prompts)
        plan = plan_request(req, engine, default_mode)
        model, fingerprint = model_id(engine), engine.adapter_version
        if not req.stream:
            return completion_json(await worker.run(plan), plan, model, fingerprint)
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(stream_completion(worker, plan, model, fingerprint, usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    prompts = PromptCache()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        await worker.call(loras.serve, req.model, prompts)
        ids = completion_ids(req, engine, max_logprobs)
        result: dict[str, Any] = await worker.call(run_completion, engine, prompts, req, ids)
        return result

    return app


async def stream_completion(worker: EngineWorker, plan: Plan, model: str, fingerprint: str,
                            include_usage: bool) -> AsyncIterator[str]:
    """The Server-Sent Events of one streamed completion (see the module docstring)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def post(kind: str, value: Any) -> None:  # from the worker thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    cancel = threading.Event()
    job = asyncio.ensure_future(worker.run(plan, post, cancel))
    job.add_done_callback(lambda _: events.put_nowait(("done", None)))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, chime: Outcome | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if chime is not None:
            choice["chime"] = chime.chime()
        return _sse({**base, "choices": [choice], **({"usage": None} if include_usage else {})})

    content = ContentStream(worker.engine.fmt.tool_format.name)
    try:
        if plan.mode == "chat":
            yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "done":
                break
            if kind == "decision":
                yield chunk({"role": "assistant", "content": ""}, chime=value)
            elif kind == "text" and (new := content.feed(value)):
                yield chunk({"content": new})
        outcome = job.result()
        if rest := content.finish(outcome.text):
            yield chunk({"content": rest})
        if outcome.tool_calls:
            yield chunk({"tool_calls": _tool_calls_json(outcome.tool_calls, streamed=True)})
        yield chunk({}, outcome.finish_reason, chime=outcome if plan.mode == "group" else None)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(outcome)})
        yield _sse("[DONE]")
    except Exception:
        log.exception("streamed completion failed")
        yield _sse(ApiError(500, "the server failed while generating", kind="server_error").body())
    finally:
        cancel.set()  # the client went away (or all is sent): stop the worker at its next token
        if not job.done():
            job.cancel()


# ---------------------------------------------------------------------------- the command


def add_arguments(sub: Any) -> None:
    """The `chime serve` subcommand."""
    from bot.cli import _add_engine_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat completions) over the engine",
                       description="Serve /v1/chat/completions and /v1/models. Set CHIME_API_KEY to require "
                                   "'Authorization: Bearer <key>'. See docs/api.md.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--allow-lora-updates", action="store_true",
                   help="open /v1/load_lora_adapter and /v1/unload_lora_adapter (as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)")
    p.add_argument("--mode", choices=["chat", "group"], default="chat",
                   help="for requests without chime.mode: chat (always reply, default) or group (decide first)")
    _add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`chime serve`: build the engine once and serve it with uvicorn until interrupted."""
    import sys

    import uvicorn

    from bot.cli import _engine_config, _serving_registry
    from model.engine import Engine

    config = _engine_config(args)
    registry = _serving_registry(args, config)
    engine = Engine.from_config(config)
    watcher = None
    if registry is not None:  # pick up promoted adapters between requests
        from model.adapter_registry import AdapterWatcher

        watcher = AdapterWatcher(engine, registry)
        watcher.start()
    api_key = os.environ.get("CHIME_API_KEY") or None
    if api_key is None and args.host not in LOOPBACK_HOSTS:
        log.warning("serving on %s without CHIME_API_KEY: anyone who can reach the port can use the model", args.host)
    app = create_app(engine, api_key=api_key, default_mode=args.mode, allow_lora_updates=args.allow_lora_updates)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"chime serve: http://{host}:{args.port}/v1 serving {model_id(engine)} ({args.mode} mode by default; "
          f"API key {'required' if api_key else 'not required'})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if getattr(args, "verbose", False) else "warning",
                    timeout_graceful_shutdown=5)
    finally:
        if watcher is not None:
            watcher.stop(timeout=1)
    return 0
