"""The decide/respond engine: after every message, stay silent or speak.

Per channel the engine keeps the rendered history (system header, human turns, bot turns, tool
results) as token ids, and the runner's key/value cache of a prefix of it. Each forward pass first
finds how much of the cache still matches the history (everything except what changed since the
last call), crops the rest, and runs only the new tokens: a decision costs the new message's tokens
plus the few tokens of the previous bot turn, not the whole history; `prefill` (called by `handle`
after each turn) runs even those ahead of time. With `incremental=False` every
decision re-encodes the whole window instead (the naive way; used as the benchmark baseline and in
tests that check both give the same result).

Deciding: one forward pass over `...human turn + assistant header + "("` gives the next-token logits
of "silence" and "response"; P(respond) = softmax over those two. A message that addresses the bot
explicitly (an @mention or a reply to it, as the platform reports it; `@BotName` in the text
otherwise) always gets a reply when `always_answer_mentions` is set; the reported P(respond) is still
the model's own. The reply is generated only when the bot speaks.

When a channel's history would exceed `max_context_tokens`, its oldest exchanges are dropped until
it fits in `context_keep_ratio` of the budget and the cache is rebuilt once (amortised over the many
messages that then fit again).

Usage:

    engine = Engine.from_config(EngineConfig())
    d = engine.handle("general", IncomingMessage("alice", "@Chime what's the capital of Peru?"))
    print(d.decision, d.p_respond, d.response)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from model.adapter_registry import adapter_version
from model.answer_numbers import AnswerNumbers, NumberTokens
from model.chat_format import BotTurn, ChatFormat
from model.config import EngineConfig
from model.constrained import CallDecoder, CallGrammar, token_texts
from model.conversation import Message, ToolCall
from model.errors import ConfigError, ModelLoadError
from model.grounding import (
    GroundingContext,
    drop_ungrounded_optional,
    drop_unsaid_items,
    percent_as_described,
    said_choices,
    said_direction,
    said_flags,
    said_sides,
    said_whole,
    withdraw_unsaid_required,
)
from model.loading import (
    load_model,
    release_memory,
    resolve_threshold,
    resolve_tool_call_relevance_weight,
    resolve_tool_call_threshold,
)
from model.runner import Runner, build_runner
from model.said_lists import one_call_per_said_item
from model.tool_format import TOOL_CALL_OPEN
from model.tool_retrieval import RETRIEVAL_MESSAGES, ToolRetriever, relevance
from model.tools import ToolBudget, ToolRegistry, ToolResult, registry_from_names

log = logging.getLogger(__name__)


def gate_score(p_call: float, call_relevance: float | None, weight: float) -> float:
    """What the call gate compares with its threshold: sigmoid(logit P(call) + weight x relevance), which is
    P(call) itself at weight 0. The weight is calibrated with the threshold (`training/evaluate.py`)."""
    if not weight or call_relevance is None:
        return p_call
    p = min(max(p_call, 1e-9), 1 - 1e-9)
    return 1.0 / (1.0 + math.exp(-(math.log(p / (1 - p)) + weight * call_relevance)))


@dataclass
class IncomingMessage:
    name: str
    content: str
    addressed: bool | None = None  # platform-reported mention/reply; None: look for @BotName in the text
    user_id: str | None = None  # the platform's id of the author (tool budgets); None: the display name


@dataclass
class Decision:
    name: str
    content: str
    decision: Literal["silence", "respond"]
    p_respond: float
    addressed: bool
    latency_ms: float  # the decision alone (tokenise + one forward pass)
    threshold: float
    response: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[str] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    reply_ms: float | None = None
    reply_tokens: int = 0
    forward_tokens: int = 0  # tokens the decision's forward pass actually ran
    adapter_version: str | None = None  # the adapter that decided (logs; an adapter swap may follow)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "content": self.content,
            "decision": self.decision,
            "p_respond": round(self.p_respond, 6),
            "response": self.response,
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "tool_results": [{"name": r.name, "ok": r.ok, "content": r.content} for r in self.tool_results],
            "latency_ms": round(self.latency_ms, 2),
            "addressed": self.addressed,
            "reply_ms": None if self.reply_ms is None else round(self.reply_ms, 2),
        }


@dataclass
class Reply:
    text: str
    tool_calls: list[ToolCall]
    errors: list[str]
    n_tokens: int
    ms: float
    p_call: float | None = None  # P(the reply opens with a tool call), for an answer to a person where tools are listed
    call_relevance: float | None = None  # how much of the message the listed tools cover (the gate's second input)


@dataclass
class _Turn:
    kind: Literal["human", "bot", "tool"]
    ids: list[int]


@dataclass
class Channel:
    id: str
    bot_name: str
    tools: list[dict[str, Any]]
    system_ids: list[int]
    state: Any
    turns: list[_Turn] = field(default_factory=list)
    cache_ids: list[int] = field(default_factory=list)  # exactly the ids the runner state holds
    awaiting_bot_turn: bool = False
    rebuilds: int = 0
    retrieved: bool = False  # tools chosen per message from the engine's registry (more than fit the prompt)
    recent: list[str] = field(default_factory=list)  # the latest human messages: the tool retrieval query
    last_message: str = ""  # the latest human message: the call gate's relevance query, where flags are read

    def window_ids(self) -> list[int]:
        ids = list(self.system_ids)
        for turn in self.turns:
            ids.extend(turn.ids)
        return ids

    def history_tokens(self) -> int:
        return len(self.system_ids) + sum(len(t.ids) for t in self.turns)


def names_bot(text: str, bot_name: str) -> bool:
    """True when the message contains the bot's name as a word (with or without @)."""
    return re.search(r"(?<!\w)@?" + re.escape(bot_name.strip()) + r"(?!\w)", text or "", re.IGNORECASE) is not None


def decision_rule(
    p_respond: float, addressed: bool, named: bool, threshold: float, named_threshold: float | None, always_answer_mentions: bool
) -> tuple[bool, float]:
    """(speak, threshold used): the named threshold for messages naming the bot; an @mention may force a reply.

    The one rule for live decisions and for re-deciding evaluation rows at other thresholds.
    """
    used = named_threshold if named and named_threshold is not None else threshold
    return p_respond >= used or (addressed and always_answer_mentions), used


def mentions_bot(text: str, bot_name: str) -> bool:
    """True when `text` contains `@BotName` (case-insensitive, not followed by a word character)."""
    return re.search("@" + re.escape(bot_name.strip()) + r"(?!\w)", text or "", re.IGNORECASE) is not None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: histories share long prefixes.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _TextStream:
    """Turns a growing list of generated ids into new text pieces, correct for multi-byte and BPE tokens.

    A token may end inside a UTF-8 character (the decoded text then ends in U+FFFD) or change how the
    tokens before it decode, so each step decodes a short window (the last emitted piece's tokens plus
    the new ones) and emits only what the window adds beyond its already-emitted part, once the text no
    longer ends in an incomplete character (the incremental detokenisation of vLLM and TGI).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], emit: Callable[[str], None]):
        self._decode = decode
        self._emit = emit
        self._prefix = 0  # start of the decoding window: context for how the new tokens decode
        self._read = 0  # tokens up to here have been emitted

    def push(self, ids: Sequence[int], final: bool = False) -> None:
        if self._read >= len(ids):
            return
        done = self._decode(ids[self._prefix : self._read])
        text = self._decode(ids[self._prefix :])
        if len(text) > len(done) and (final or not text.endswith("\ufffd")):
            self._emit(text[len(done) :])
            self._prefix, self._read = self._read, len(ids)

    def flush(self, ids: Sequence[int]) -> None:
        """Emit what is left at the end (an incomplete character decodes as U+FFFD, as in the full text)."""
        self.push(ids, final=True)


class Engine:
    """Decides and replies for any number of channels; one model, state per channel."""

    def __init__(self, runner: Runner, fmt: ChatFormat, config: EngineConfig, model_name: str = "model"):
        self.runner = runner
        try:
            self.tools: ToolRegistry | None = registry_from_names(config.tools) if config.tools else None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"tools: {e}") from e
        self.fmt = fmt
        self.config = config
        self.tool_budget = ToolBudget(config.tool_calls_per_user_per_hour, config.tool_calls_per_channel_per_hour)
        schemas = self.tools.schemas() if self.tools is not None else []
        self.retriever = ToolRetriever(schemas) if len(schemas) > config.max_prompt_tools else None
        # Thresholds the user set (None: the adapter's calibrated ones); `from_config` passes the values from
        # before resolution, so that a reloaded adapter brings its own calibration unless the user chose.
        self._explicit_thresholds: tuple[float | None, float | None] = (config.threshold, config.named_threshold)
        # the call gate's threshold (None: no gate); `from_config` and adapter reloads resolve the adapter's
        self.tool_call_threshold: float | None = config.tool_call_threshold if config.tool_call_gate else None
        self.tool_call_relevance_weight: float = config.tool_call_relevance_weight or 0.0
        if config.threshold is None:
            config.threshold = 0.5
        if config.named_threshold is None:
            config.named_threshold = config.threshold
        self.model_name = model_name
        self.adapter = config.adapter
        self.adapter_version = adapter_version(config.adapter)  # which adapter decided, for logs
        self._reload_lock = threading.Lock()  # one adapter load at a time
        self._call_grammar: CallGrammar | None = None  # built on the first constrained call (same tokenizer after swaps)
        self._token_texts: list[tuple[int, str, bool]] | None = None  # each token's text, for both
        self._number_tokens: NumberTokens | None = None  # built on the first answer to tool results
        self._channels: dict[str, Channel] = {}
        self._lock = threading.RLock()
        self._generator = torch.Generator()
        if config.seed is not None:
            self._generator.manual_seed(config.seed)
        else:
            self._generator.seed()

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        config = dataclasses.replace(config)  # the engine resolves adapter and thresholds in its own copy
        config.validate()
        explicit = (config.threshold, config.named_threshold)
        runner: Runner
        if config.backend == "openai":  # forward passes on a remote server: only the tokenizer loads here
            from model.remote import load_remote

            loaded, runner = load_remote(config)
        else:
            loaded = load_model(config)
            runner = build_runner(loaded.model, dtype=loaded.dtype, device=loaded.device, consume=True)
        config.threshold, config.named_threshold = resolve_threshold(config, loaded.adapter)
        config.adapter = loaded.adapter
        fmt = ChatFormat(
            loaded.tokenizer, max_message_chars=config.max_message_chars, prompt=config.prompt,
            tool_format=config.tool_format,
        )
        log.info("engine ready: %s (adapter %s) on %s, %s, runner %s", loaded.name, loaded.adapter,
                 loaded.device, loaded.dtype, type(runner).__name__)
        name = loaded.name
        del loaded  # the fast runner holds its own (fused) weights; the module tree can go
        release_memory()
        engine = cls(runner, fmt, config, model_name=name)
        engine._explicit_thresholds = explicit
        engine.tool_call_threshold = resolve_tool_call_threshold(config, config.adapter)
        engine.tool_call_relevance_weight = resolve_tool_call_relevance_weight(config, config.adapter)
        return engine

    # ------------------------------------------------------------------ adapter hot swap

    def reload_adapter(self, path: str | None) -> None:
        """Serve the adapter at `path` (None: the base model alone) from the next decision on.

        The model loads outside the engine's lock, as `from_config` loads it, while decisions go on with
        the old weights; then `swap_model` replaces the runner between two messages. Thresholds the user
        set keep winning, otherwise the new adapter's calibrated ones apply. Raises ModelLoadError (the
        old adapter keeps serving) when it does not load or its tokenizer differs from the serving one.
        """
        if self.config.backend == "openai":
            raise ModelLoadError("the remote backend serves its adapter itself: promote it on the serving engine "
                                 "(e.g. vLLM --lora-modules), not here")
        with self._reload_lock:
            threshold, named_threshold = self._explicit_thresholds
            config = dataclasses.replace(self.config, adapter=path, threshold=threshold, named_threshold=named_threshold)
            config.validate()
            start = time.perf_counter()
            loaded = load_model(config)
            if len(loaded.tokenizer) != len(self.fmt.tokenizer):
                raise ModelLoadError(
                    f"adapter {path}: its model's tokenizer has {len(loaded.tokenizer)} tokens, the serving one "
                    f"{len(self.fmt.tokenizer)}; channel histories are token ids, so a different tokenizer needs a restart"
                )
            threshold, named_threshold = resolve_threshold(config, loaded.adapter)
            call_threshold = resolve_tool_call_threshold(config, loaded.adapter)
            relevance_weight = resolve_tool_call_relevance_weight(config, loaded.adapter)
            runner = build_runner(loaded.model, dtype=loaded.dtype, device=loaded.device, consume=True)
            adapter = loaded.adapter
            del loaded
            release_memory()
            self.swap_model(runner, adapter, threshold, named_threshold)
            with self._lock:
                self.tool_call_threshold = call_threshold
                self.tool_call_relevance_weight = relevance_weight
            log.info("engine: adapter %s (%s) loaded in %.1f s; thresholds %.3f / %.3f", adapter, self.adapter_version,
                     time.perf_counter() - start, threshold, named_threshold)

    def swap_model(self, runner: Runner, adapter: str | None, threshold: float, named_threshold: float | None) -> None:
        """Replace the weights between two messages; every channel keeps its history and re-encodes it once.

        The caches hold keys and values of the old weights, so each channel gets a fresh runner state; the
        token history stays valid because the tokenizer is the same.
        """
        label = adapter_version(adapter)  # hashes the weights file: outside the lock
        with self._lock:
            self.runner = runner
            self.adapter = adapter
            self.adapter_version = label
            self.config.adapter = adapter
            self.config.threshold = threshold
            self.config.named_threshold = named_threshold if named_threshold is not None else threshold
            for ch in self._channels.values():
                ch.state = runner.new_state()
                ch.cache_ids = []

    # ------------------------------------------------------------------ channels

    def channel(self, channel_id: str, bot_name: str | None = None, tools: Sequence[dict[str, Any]] | None = None) -> Channel:
        """The channel's state, created on first use (bot name fixed at creation).

        The prompt lists `tools` when given (a conversation file's own schemas), else the engine's
        registered tools; with more registered than `max_prompt_tools`, the most relevant ones for
        the latest messages (re-chosen per message; a changed set re-encodes the history once).
        """
        with self._lock:
            ch = self._channels.get(channel_id)
            if ch is None:
                name = bot_name or self.config.bot_name
                retrieved = tools is None and self.retriever is not None
                if tools is not None:
                    tool_list = list(tools)
                elif self.retriever is not None:
                    tool_list = self.retriever.select("", self.config.max_prompt_tools)
                else:
                    tool_list = self.tools.schemas() if self.tools is not None else []
                ch = Channel(
                    id=channel_id,
                    bot_name=name,
                    tools=tool_list,
                    system_ids=self.fmt.system_ids(name, tool_list),
                    state=self.runner.new_state(),
                    retrieved=retrieved,
                )
                self._channels[channel_id] = ch
            return ch

    def _retrieve_tools(self, ch: Channel, text: str) -> None:
        """Re-choose the channel's prompt tools for the latest human messages (retrieval channels only)."""
        if not ch.retrieved or self.retriever is None:
            return
        ch.recent = (ch.recent + [text])[-RETRIEVAL_MESSAGES:]
        chosen = self.retriever.select(" ".join(ch.recent), self.config.max_prompt_tools)
        if [t["name"] for t in chosen] != [t["name"] for t in ch.tools]:
            ch.tools = chosen
            ch.system_ids = self.fmt.system_ids(ch.bot_name, chosen)

    def reset(self, channel_id: str) -> None:
        with self._lock:
            self._channels.pop(channel_id, None)

    def channels(self) -> list[str]:
        return list(self._channels)

    # ------------------------------------------------------------------ history

    def add_human(self, channel_id: str, name: str, text: str) -> None:
        """Add a human message as context, with no decision and no implicit bot turn."""
        with self._lock:
            ch = self.channel(channel_id)
            self._close_pending(ch)
            ch.last_message = text
            ids = self.fmt.human_ids(name, text)
            self._fit(ch, len(ids))
            ch.turns.append(_Turn("human", ids))

    def observe(self, channel_id: str, name: str, text: str) -> None:
        """A message the bot saw but did not decide on (backfill, load shedding): human + (silence)."""
        with self._lock:
            self.add_human(channel_id, name, text)
            self.commit(channel_id, BotTurn(kind="silence"))

    def add_message(self, channel_id: str, msg: Message) -> None:
        """Add a message from a conversation file as it is (humans get no implicit bot turn here)."""
        if msg.role == "user":
            self.add_human(channel_id, msg.name or "", msg.content)
        elif msg.role == "assistant":
            self.commit(channel_id, BotTurn.from_message(msg))
        else:
            with self._lock:
                ch = self.channel(channel_id)
                ch.turns.append(_Turn("tool", self.fmt.tool_ids(msg.name or "tool", msg.content)))

    def commit(self, channel_id: str, turn: BotTurn) -> None:
        """Record what the bot did after the last message (silence, a reply, tool calls)."""
        with self._lock:
            ch = self.channel(channel_id)
            ch.turns.append(_Turn("bot", self.fmt.bot_turn_ids(turn).ids))
            ch.awaiting_bot_turn = False

    def retract_reply(self, channel_id: str) -> None:
        """Take back the bot's answer to the last message (it was never posted: the platform timed out or
        failed): the turns after the last human message become one silent bot turn."""
        with self._lock:
            ch = self.channel(channel_id)
            last = max((i for i, t in enumerate(ch.turns) if t.kind == "human"), default=None)
            if last is None:
                return
            del ch.turns[last + 1 :]
            ch.turns.append(_Turn("bot", self.fmt.bot_turn_ids(BotTurn(kind="silence")).ids))
            ch.awaiting_bot_turn = False

    def _close_pending(self, ch: Channel) -> None:
        if ch.awaiting_bot_turn:  # decided but never committed: the bot stayed silent
            ch.turns.append(_Turn("bot", self.fmt.bot_turn_ids(BotTurn(kind="silence")).ids))
            ch.awaiting_bot_turn = False

    def _fit(self, ch: Channel, incoming: int) -> None:
        """Drop the oldest exchanges when the history plus `incoming` tokens would overflow."""
        reserve = incoming + len(self.fmt.bot_header_ids) + self.config.max_new_tokens + 8
        budget = self.config.max_context_tokens
        if ch.history_tokens() + reserve <= budget:
            return
        target = int(budget * self.config.context_keep_ratio) - reserve
        total = ch.history_tokens()
        drop = 0
        while drop < len(ch.turns) and total > max(target, len(ch.system_ids)):
            total -= len(ch.turns[drop].ids)
            drop += 1
            # an exchange starts at a human turn: never keep a bot turn whose message is gone
            while drop < len(ch.turns) and ch.turns[drop].kind != "human":
                total -= len(ch.turns[drop].ids)
                drop += 1
        if drop:
            del ch.turns[:drop]
            ch.rebuilds += 1
            log.debug("channel %s: dropped %d turns, %d tokens of history remain", ch.id, drop, total)

    # ------------------------------------------------------------------ forward passes

    def _sync(self, ch: Channel, target: list[int], need_output: bool) -> tuple[torch.Tensor | None, int]:
        """Make the cache hold exactly `target`, running only what it lacks; returns (output, tokens run).

        The cache keeps its longest prefix shared with `target` (everything with `incremental=False`
        is re-run). With `need_output`, at least the last token is run so there is an output.
        """
        keep = _common_prefix(ch.cache_ids, target) if self.config.incremental else 0
        if need_output:
            keep = min(keep, len(target) - 1)
        if keep == len(target):
            return None, 0
        self.runner.crop(ch.state, keep)
        out = self.runner.extend(ch.state, target[keep:])
        ch.cache_ids = target
        return out, len(target) - keep

    def _forward(self, ch: Channel, extra: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Bring the cache to history + `extra` and return the last position's output."""
        out, n = self._sync(ch, ch.window_ids() + list(extra), need_output=True)
        assert out is not None
        return out, n

    def prefill(self, channel_id: str) -> int:
        """Idle-time work after a bot turn: encode its tail and the next user turn's header now.

        The next message is most likely a human one, so its fixed prefix (e.g. "<|im_start|>user\n")
        is run too; if something else comes, the cache check simply discards it. Returns the number of
        tokens run. `handle` calls this after committing, so a decision only pays for the message.
        """
        with self._lock:
            ch = self.channel(channel_id)
            if ch.awaiting_bot_turn or not self.config.incremental:
                return 0
            _, n = self._sync(ch, ch.window_ids() + self.fmt.human_header_ids, need_output=False)
            return n

    def thresholds(self, threshold: float | None = None) -> tuple[float, float | None]:
        """(threshold, named threshold) for a decision: the engine's, or `threshold` (e.g. a channel's
        talkativeness) with messages naming the bot keeping the lower of it and the engine's named one,
        so naming the bot never makes an answer less likely."""
        assert self.config.threshold is not None
        if threshold is None:
            return self.config.threshold, self.config.named_threshold
        named = self.config.named_threshold
        return threshold, min(threshold, named) if named is not None else threshold

    def decide(self, channel_id: str, msg: IncomingMessage, threshold: float | None = None) -> Decision:
        """Add the message and decide whether to respond (at `threshold` when given, see `thresholds`);
        generates nothing."""
        with self._lock:
            start = time.perf_counter()
            ch = self.channel(channel_id)
            self._close_pending(ch)
            self._retrieve_tools(ch, msg.content)
            ch.last_message = msg.content
            ids = self.fmt.human_ids(msg.name, msg.content)
            self._fit(ch, len(ids))
            ch.turns.append(_Turn("human", ids))
            ch.awaiting_bot_turn = True
            out, n = self._forward(ch, self.fmt.bot_header_ids + self.fmt.decision_prefix_ids)
            logits = self.runner.marker_logits(out, [self.fmt.silence_token_id, self.fmt.response_token_id])
            p = float(torch.sigmoid(logits[1] - logits[0]))
            if math.isnan(p):
                p = 0.0
            addressed = msg.addressed if msg.addressed is not None else mentions_bot(msg.content, ch.bot_name)
            base, named = self.thresholds(threshold)
            speak, used = decision_rule(
                p, addressed, names_bot(msg.content, ch.bot_name), base, named, self.config.always_answer_mentions,
            )
            return Decision(
                name=msg.name,
                content=msg.content,
                decision="respond" if speak else "silence",
                p_respond=p,
                addressed=addressed,
                latency_ms=(time.perf_counter() - start) * 1000,
                threshold=used,
                forward_tokens=n,
                adapter_version=self.adapter_version,
            )

    def generate(
        self,
        channel_id: str,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Reply:
        """Generate the bot's reply after the last message (after "(response)"), without committing it.

        `on_text`, when given, is called with each newly decoded piece of the raw generated text as
        tokens come (for streaming); the pieces concatenate to the decoded text before parsing. An
        exception it raises stops generation and propagates (how a server abandons a disconnected stream).

        Parsed calls are grounded (`model/grounding.py`): optional arguments nobody said are dropped, and a
        call whose required argument holds a number nobody said is withdrawn. When every call is withdrawn the
        answer is decoded again with the call opening banned, so the bot answers (or asks) in words; a
        streamed reply has already sent its text, so it only loses the calls. A call for one item of a list
        the latest message says is copied for the others (`model/said_lists.py`). An answer to tool results
        writes only numbers the conversation holds (`model/answer_numbers.py`).
        """
        with self._lock:
            start = time.perf_counter()
            ch = self.channel(channel_id)
            assert ch.turns and ch.turns[-1].kind in ("human", "tool"), "generate needs a message to answer"
            limit = max_new_tokens or self.config.max_new_tokens
            header = self.fmt.bot_header_ids + self.fmt.decision_prefix_ids + self.fmt.response_marker_rest_ids()
            out, _ = self._forward(ch, header)
            stream = _TextStream(self.fmt.decode, on_text) if on_text is not None else None
            # the gate decides the first answer to a person; after tool results the model goes on freely
            # (the gate was calibrated on answers to people, and forcing calls there could loop to the round limit)
            first = ch.turns[-1].kind == "human"
            numbers = None if first else self._answer_numbers(ch)
            p_call = self._call_probability(ch, out) if first and ch.tools and self.fmt.call_open_ids else None
            call_relevance = self._call_relevance(ch) if p_call is not None else None
            opening: list[int] = []  # the call gate's verdict: open a call, or (banned) start otherwise
            banned: int | None = None
            if p_call is not None and self.tool_call_threshold is not None:
                if gate_score(p_call, call_relevance, self.tool_call_relevance_weight) >= self.tool_call_threshold:
                    opening = list(self.fmt.call_force_ids[:limit])
                else:
                    banned = self.fmt.call_open_ids[0]
            base = self.runner.length(ch.state)
            generated = self._decode(ch, out, limit, min_new_tokens, opening, banned, stream, numbers)
            parsed = self.fmt.parse_reply(self.fmt.decode(generated))
            tool_calls, errors = list(parsed.tool_calls), list(parsed.errors)
            text, n_tokens = parsed.text, len(generated)
            if tool_calls and ch.tools:
                context = GroundingContext(self._said(ch))
                if self.config.read_arguments:
                    tool_calls, scaled = percent_as_described(tool_calls, ch.tools, context)
                    tool_calls, flags = said_flags(tool_calls, ch.tools, ch.last_message)
                    tool_calls, picked = said_choices(tool_calls, ch.tools, ch.last_message)
                    tool_calls, swapped = said_direction(tool_calls, ch.tools, ch.last_message)
                    tool_calls, sided = said_sides(tool_calls, ch.tools, ch.last_message)
                    tool_calls, whole = said_whole(tool_calls, ch.tools, ch.last_message, ch.bot_name)
                    errors.extend(scaled + flags + picked + swapped + sided + whole)
                if self.config.ground_optional_arguments:
                    tool_calls, trimmed = drop_unsaid_items(tool_calls, ch.tools, context)
                    tool_calls, dropped = drop_ungrounded_optional(tool_calls, ch.tools, context)
                    errors.extend(trimmed + dropped)
                if self.config.ground_required_arguments:
                    tool_calls, withdrawn = withdraw_unsaid_required(tool_calls, ch.tools, context)
                    errors.extend(withdrawn)
                    if withdrawn and not tool_calls and stream is None and self.fmt.call_open_ids:
                        # every call stood on a number nobody said: answer in words instead (ask for it)
                        self.runner.crop(ch.state, base)
                        del ch.cache_ids[base:]
                        again = self._decode(ch, out, limit, min_new_tokens, [], self.fmt.call_open_ids[0], None, numbers)
                        retry = self.fmt.parse_reply(self.fmt.decode(again))
                        text, n_tokens = retry.text, n_tokens + len(again)
                        errors.extend(retry.errors)
                if tool_calls and first and self.config.one_call_per_item:  # not again after the results
                    tool_calls, copied = one_call_per_said_item(tool_calls, ch.tools, ch.last_message)
                    errors.extend(copied)
            return Reply(
                text=text,
                tool_calls=tool_calls,
                errors=errors,
                n_tokens=n_tokens,
                ms=(time.perf_counter() - start) * 1000,
                p_call=p_call,
                call_relevance=call_relevance,
            )

    def _decode(
        self,
        ch: Channel,
        out: torch.Tensor,
        limit: int,
        min_new_tokens: int,
        opening: Sequence[int],
        banned: int | None,
        stream: _TextStream | None,
        numbers: AnswerNumbers | None = None,
    ) -> list[int]:
        """Decode the reply's tokens after "(response)" (`out`: the output there) into the channel's cache:
        `opening` forced first (an opened call), or the `banned` token not first; inside an opened call only
        schema-valid JSON (`model/constrained.py`); outside calls, with `numbers`, only numbers the
        conversation holds (`model/answer_numbers.py`)."""
        generated: list[int] = []
        calls = self._call_decoder(ch)
        inside: list[int] | None = None  # ids since an opened tool call's tag, while constrained
        while len(generated) < limit:
            logits = self.runner.next_logits(out).clone()
            forced: list[int] = []
            if opening and not generated:
                forced = list(opening)
            elif inside is not None and calls is not None:
                allowed = calls.allowed(inside)
                if allowed is None:  # the call's JSON is complete: close it, decode freely again
                    forced, inside = calls.close_ids[: limit - len(generated)], None
                else:
                    masked = torch.full_like(logits, -float("inf"))
                    masked[allowed] = logits[allowed]
                    logits = masked
            elif len(generated) < min_new_tokens:
                logits[list(self.fmt.stop_ids)] = -float("inf")
            if banned is not None and not generated:
                logits[banned] = -float("inf")
            if numbers is not None and inside is None and not forced:
                mask = numbers.banned(self.fmt.decode(generated))  # None inside a call (`--free-tool-calls`)
                if mask is not None:
                    logits[: mask.shape[0]][mask[: logits.shape[0]]] = -float("inf")
            if not forced:
                token = self._sample(logits)
                if token in self.fmt.stop_ids:
                    break
                forced = [token]
                if inside is not None:
                    inside.append(token)
            generated.extend(forced)
            if stream is not None:
                stream.push(generated)
            out = self.runner.extend(ch.state, forced)
            ch.cache_ids.extend(forced)
            if calls is not None and inside is None and self.fmt.decode(generated[-8:]).endswith(TOOL_CALL_OPEN):
                inside = []
        if stream is not None:
            stream.flush(generated)
        return generated

    def said(self, channel_id: str) -> str:
        """The channel's turns as text, as grounding and the answer-number rule read them."""
        with self._lock:
            return self._said(self.channel(channel_id))

    def _said(self, ch: Channel) -> str:
        """The channel's turns as text (the messages, the bot's turns, tool results; not the system header):
        what grounding reads."""
        return "\n".join(self.fmt.decode(t.ids) for t in ch.turns)

    def call_probability(self, channel_id: str) -> float | None:
        """P(the reply to the last message opens with a tool call), without generating; None when the
        channel lists no tools or the tool format has no call opening."""
        with self._lock:
            ch = self.channel(channel_id)
            if not (ch.tools and self.fmt.call_open_ids):
                return None
            header = self.fmt.bot_header_ids + self.fmt.decision_prefix_ids + self.fmt.response_marker_rest_ids()
            out, _ = self._forward(ch, header)
            return self._call_probability(ch, out)

    def call_relevance(self, channel_id: str) -> float | None:
        """How much of the latest message the channel's tools cover (`relevance`); None without tools."""
        with self._lock:
            ch = self.channel(channel_id)
            return self._call_relevance(ch) if ch.tools else None

    def _call_relevance(self, ch: Channel) -> float:
        return relevance(ch.last_message, ch.tools, ignore=ch.bot_name)

    def _call_probability(self, ch: Channel, out: torch.Tensor) -> float:
        """P(the reply opens with a tool call): the model's probability of the format's call opening right
        after "(response)" (`out`: the output there), by teacher forcing the opening's few tokens; the cache
        is cropped back afterwards. The call gate compares `gate_score` of it with `tool_call_threshold`."""
        ids = self.fmt.call_open_ids
        base = self.runner.length(ch.state)
        logp = 0.0
        for k, token in enumerate(ids):
            logp += float(torch.log_softmax(self.runner.next_logits(out).float(), dim=-1)[token])
            if k + 1 < len(ids) and logp > -math.inf:
                out = self.runner.extend(ch.state, [token])
        self.runner.crop(ch.state, base)
        p = math.exp(logp)
        return 0.0 if math.isnan(p) else p

    def _call_decoder(self, ch: Channel) -> CallDecoder | None:
        """Schema-constrained tool calls for this channel's tools (`model/constrained.py`), when on. Not for a
        remote backend: it returns only the top 20 log-probabilities, which may hold no allowed token."""
        if not (self.config.constrained_tool_calls and ch.tools) or self.config.backend != "local":
            return None
        if self._call_grammar is None:
            self._call_grammar = CallGrammar(self.fmt.tokenizer, self.fmt.stop_ids, self._texts())
        return self._call_grammar.decoder(ch.tools, self.fmt.tool_format)

    def _texts(self) -> list[tuple[int, str, bool]]:
        if self._token_texts is None:
            self._token_texts = token_texts(self.fmt.tokenizer)
        return self._token_texts

    def _answer_numbers(self, ch: Channel) -> AnswerNumbers | None:
        """The number rule for an answer to tool results (`model/answer_numbers.py`), when on. Not for a
        remote backend, for the reason `_call_decoder` gives."""
        if not self.config.ground_answer_numbers or self.config.backend != "local":
            return None
        if not self.fmt.tool_format.tagged:
            return None  # Llama-3 and GLM-4 calls open with no tag: a call cannot be told from words while written
        if self._number_tokens is None:
            size = len(self.fmt.tokenizer)
            self._number_tokens = NumberTokens([(i, text) for i, text, _ in self._texts()], size)
        return AnswerNumbers(self._number_tokens, self._said(ch))

    def _sample(self, logits: torch.Tensor) -> int:
        if self.config.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.config.temperature, dim=-1)
        if self.config.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < self.config.top_p
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=self._generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def handle(self, channel_id: str, msg: IncomingMessage, threshold: float | None = None) -> Decision:
        """Decide on a message (at `threshold` when given) and, when speaking, generate and commit the reply
        (the live path)."""
        with self._lock:
            d = self.decide(channel_id, msg, threshold)
            if d.decision == "respond":
                start = time.perf_counter()
                reply = self.generate(channel_id)
                d.tool_calls, d.tool_call_errors = list(reply.tool_calls), list(reply.errors)
                tokens = reply.n_tokens
                rounds = 0
                # The tool loop: calls -> validated, bounded execution -> results as tool turns -> answer.
                while reply.tool_calls and self.tools is not None and rounds < self.config.max_tool_rounds:
                    cap = self.config.max_tool_calls_per_turn
                    calls, extra = reply.tool_calls[:cap], len(reply.tool_calls) - cap
                    self.commit(channel_id, BotTurn(kind="response", text=reply.text, tool_calls=tuple(calls)))
                    caller = msg.user_id or msg.name  # who asked: budgets and `caller` tools use it, never the text
                    for call in calls:
                        refused = self.tool_budget.take(caller, channel_id)
                        result = ToolResult(call.name[:64], False, f"error: {refused}") if refused else self.tools.execute(call, caller)
                        d.tool_results.append(result)
                        log.info("channel %s: tool %s(%s) -> %s", channel_id, call.name[:64],
                                 json.dumps(call.arguments, ensure_ascii=False, default=str)[:200], result.content[:200])
                        self.add_message(channel_id, Message(role="tool", name=result.name, content=result.content))
                    if extra > 0:  # one result for all the calls past the cap, none of which ran
                        result = ToolResult("tools", False, f"error: {extra} more tool calls refused: at most {cap} per turn")
                        d.tool_results.append(result)
                        self.add_message(channel_id, Message(role="tool", name=result.name, content=result.content))
                    reply = self.generate(channel_id)
                    d.tool_calls.extend(reply.tool_calls)
                    d.tool_call_errors.extend(reply.errors)
                    tokens += reply.n_tokens
                    rounds += 1
                d.response = reply.text
                d.reply_ms = (time.perf_counter() - start) * 1000
                d.reply_tokens = tokens
                # Out of rounds, calls left unexecuted are dropped from the history (tools on), or kept as
                # reported calls when execution is off.
                final_calls = () if self.tools is not None else tuple(reply.tool_calls)
                self.commit(channel_id, BotTurn(kind="response", text=reply.text, tool_calls=final_calls))
            else:
                self.commit(channel_id, BotTurn(kind="silence"))
            self.prefill(channel_id)
            return d
