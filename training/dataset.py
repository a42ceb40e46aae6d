"""Training examples: conversations rendered into ids, labels and per-token loss weights.

Only the bot's own tokens are labelled (`ChatFormat.render_conversation` marks them): the body of
each bot turn — "(silence)", "(response) text", tool calls — and its end-of-turn token. Human
messages, tool results, the system header and the assistant header are context (label -100).

Weights handle the imbalance between the classes: the decision token (the one that reads "silence"
or "response" after the shared "(") of every decision turn gets `decision_weight` times its class
weight, where class weights move from 1 (class_balance=0) to inverse class frequency (1). Bot turns
that are not scored (context messages of an explicitly labelled conversation, or the repeated context
at the start of a window) carry no loss at all.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.chat_format import ChatFormat, RenderedConversation
from model.conversation import Conversation, Message, read_conversations
from model.errors import ConfigError
from model.tool_retrieval import RETRIEVAL_MESSAGES, ToolRetriever, has_numeric_parameter, tokenize, tool_document
from training.corpus import dedupe


@dataclass
class SourcedConversation:
    source: str  # the file it came from
    conversation: Conversation


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    decision_pos: list[int]  # positions of decision tokens (in `labels`)
    decision_kind: list[str]  # "silence" or "response" for each
    source: str = ""


@dataclass
class DataReport:
    files: dict[str, int] = field(default_factory=dict)  # conversations used per file
    duplicates_dropped: int = 0
    examples: int = 0
    windows_split: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    class_weights: dict[str, float] = field(default_factory=dict)
    data_hash: str = ""


def expand_globs(patterns: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for pat in patterns:
        found = sorted(glob.glob(pat, recursive=True))
        if not found:
            raise ConfigError(f"no conversation files match {pat!r}")
        paths.extend(Path(p) for p in found)
    return list(dict.fromkeys(paths))


def with_prompt_tools(conv: Conversation, default_tools: Sequence[dict[str, Any]], max_prompt_tools: int = 8) -> Conversation:
    """The conversation with the tools its prompt lists, as the engine would list them.

    A file's own `tools` win; otherwise the configured tools (the built-ins by default), as a live
    channel lists its registry. With more tools than `max_prompt_tools`, the retrieval the engine uses
    picks them (BM25 over the last human messages before the first call), plus every tool the
    conversation calls: training never teaches a call to a tool the prompt did not show.
    """
    tools = list(conv.tools or default_tools)
    if len(tools) > max_prompt_tools:
        first_call = next((i for i, m in enumerate(conv.messages) if m.tool_calls), len(conv.messages))
        humans = [m.content for m in conv.messages[:first_call] if m.is_human][-RETRIEVAL_MESSAGES:]
        chosen = {t["name"] for t in ToolRetriever(tools).select(" ".join(humans), max_prompt_tools)}
        chosen |= {c.name for m in conv.messages for c in m.tool_calls}
        tools = [t for t in tools if t["name"] in chosen]
    return dataclasses.replace(conv, tools=tools)


def load_conversations(
    patterns: Sequence[str],
    caps: dict[str, int] | None = None,
    seed: int = 0,
    bot_name: str = "Chime",
    default_tools: Sequence[dict[str, Any]] = (),
    max_prompt_tools: int = 8,
    require_tool_calls: bool = False,
    keep_listed_tools: bool = False,
    no_fit_examples: int = 0,
) -> tuple[list[SourcedConversation], DataReport]:
    """Read, cap per source and deduplicate the conversations matched by `patterns`; give each its prompt tools.

    `require_tool_calls`: keep only conversations where the bot calls a tool (before the caps apply), and with
    `keep_listed_tools` also those that list their own functions (`tools`) even where the bot calls none: the
    cases where no function fits, which teach not calling. `no_fit_examples` adds up to that many
    conversations built by `no_fit_conversations`, counted and hashed with the rest.
    """
    report = DataReport()
    rng = random.Random(seed)
    items: list[SourcedConversation] = []
    for path in expand_globs(patterns):
        convs = read_conversations(path, default_bot_name=bot_name)
        if require_tool_calls:
            convs = [c for c in convs if any(m.tool_calls for m in c.messages) or (keep_listed_tools and c.tools)]
        for pat, cap in (caps or {}).items():
            if fnmatch.fnmatch(str(path), pat) and len(convs) > cap:
                convs = rng.sample(convs, cap)
        items.extend(SourcedConversation(str(path), c) for c in convs)
    kept, dropped = dedupe(c.conversation for c in items)
    keep_ids = {id(c) for c in kept}
    items = [
        SourcedConversation(c.source, with_prompt_tools(c.conversation, default_tools, max_prompt_tools))
        for c in items
        if id(c.conversation) in keep_ids
    ]
    items += [
        SourcedConversation(c.source, with_prompt_tools(c.conversation, default_tools, max_prompt_tools))
        for c in no_fit_conversations(items, no_fit_examples, seed, default_tools)
    ]
    report.duplicates_dropped = dropped
    for c in items:
        report.files[c.source] = report.files.get(c.source, 0) + 1
    report.data_hash = data_hash(items)
    return items, report


def data_hash(items: Sequence[SourcedConversation]) -> str:
    """A short digest of exactly what trains: each conversation as rendered for training, and its source."""
    digest = hashlib.sha256()
    for c in items:
        digest.update(c.source.encode())
        digest.update(repr(c.conversation.to_dict()).encode())
    return digest.hexdigest()[:16]


# How the bot answers a request its listed tools cannot serve (the no-fit examples below): it says so
# and names what it can do, rather than forcing the request into a function that does something else.
NO_FIT_ANSWERS = (
    "I can't do that with the tools I have here ({names}), sorry.",
    "None of my tools covers that: I only have {names}.",
    "That's outside what my tools do ({names}), so I can't work it out for you.",
    "Sorry, I have no tool for that. What I can run here is {names}.",
)


def _tool_names(tools: Sequence[dict[str, Any]]) -> str:
    names = [str(t.get("name", "")) for t in tools]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def no_fit_conversations(
    items: Sequence[SourcedConversation], n: int, seed: int = 0, default_tools: Sequence[dict[str, Any]] = ()
) -> list[SourcedConversation]:
    """Up to `n` conversations where the bot is asked for something its listed tools cannot do.

    Each takes a conversation whose bot calls a tool, keeps it up to the request that led to the first
    call, and lists instead the tools of another conversation (or the configured built-ins) that share
    no word with the recent messages or with the documentation of the tools it called, as BM25 reads
    them. The bot answers in words that none of its tools fits (`NO_FIT_ANSWERS`). A request with numbers meets tools with numeric parameters where
    possible: that pairing ("the area of a triangle with base 10" beside a body-mass-index function) is
    the one a small model most readily turns into a wrong call. The rest of the source conversation,
    which talks about the result, is dropped.
    """
    rng = random.Random(seed)
    tool_sets: dict[str, list[dict[str, Any]]] = {}
    for tools in [list(default_tools)] + [list(i.conversation.tools) for i in items]:
        if tools:
            tool_sets.setdefault(",".join(sorted(str(t.get("name")) for t in tools)), tools)
    donors = [
        (tools, set().union(*(tool_document(t) for t in tools)), any(has_numeric_parameter(t) for t in tools))
        for tools in tool_sets.values()
    ]
    sources = [i for i in items if any(m.tool_calls for m in i.conversation.messages)]
    rng.shuffle(sources)
    out: list[SourcedConversation] = []
    for item in sources:
        if len(out) >= n:
            break
        conv = item.conversation
        k = next(i for i, m in enumerate(conv.messages) if m.tool_calls)
        if k == 0 or not conv.messages[k - 1].is_human:
            continue
        humans = [m.content for m in conv.messages[:k] if m.is_human][-RETRIEVAL_MESSAGES:]
        words = {w for w in tokenize(" ".join(humans)) if not w.isdigit()} - set(tokenize(conv.bot_name or ""))
        called = {c.name for c in conv.messages[k].tool_calls}
        for tool in list(conv.tools or default_tools):  # nor with the tools it called: same domain, other words
            if tool.get("name") in called:
                words |= set(tool_document(tool))
        has_number = any(ch.isdigit() for ch in conv.messages[k - 1].content)
        unrelated = [(tools, numeric) for tools, doc, numeric in donors if not words & doc]
        if not unrelated:
            continue
        preferred = [tools for tools, numeric in unrelated if numeric] if has_number else []
        tools = rng.choice(preferred or [tools for tools, _ in unrelated])
        messages = [dataclasses.replace(m) for m in conv.messages[:k]]
        if any(m.expect is not None for m in messages):
            messages[-1].expect = "respond"
        answer = rng.choice(NO_FIT_ANSWERS).format(names=_tool_names(tools))
        messages.append(Message(role="assistant", content=answer))
        no_fit = Conversation(messages=messages, bot_name=conv.bot_name, tools=tools, id=f"{conv.id or 'conversation'}:no-fit")
        out.append(SourcedConversation(f"no-fit:{item.source}", no_fit))
    return out


def _scored_turn(conv: Conversation, after: int) -> bool:
    """Is the bot turn following message `after` scored? (all are, unless labels are explicit)."""
    if not any(m.expect is not None for m in conv.messages):
        return True
    msg = conv.messages[after]
    return msg.expect is not None


def _windows(conv: Conversation, fmt: ChatFormat, max_len: int, context: int) -> list[tuple[Conversation, int]]:
    """Cut a conversation into pieces that fit `max_len` tokens, at human-message boundaries.

    Returns (piece, n_context): the first n_context messages of a piece repeat the end of the previous
    piece as context and are not trained again. Every piece trains at least one new message, so a
    message longer than the budget gets a piece of its own (truncated later).
    """
    if len(fmt.render_conversation(conv).input_ids) <= max_len:
        return [(conv, 0)]
    msgs = conv.messages
    starts = [i for i, m in enumerate(msgs) if m.is_human]

    def piece(a: int, b: int) -> Conversation:
        return Conversation(messages=msgs[a:b], bot_name=conv.bot_name, tools=conv.tools, id=conv.id)

    out: list[tuple[Conversation, int]] = []
    begin, trained_from = 0, 0  # the piece starts at `begin`; messages before `trained_from` are context
    while trained_from < len(msgs):
        ends = [s for s in starts if s > trained_from] + [len(msgs)]
        end = ends[0]  # at least one new message
        for cand in ends[1:]:
            if len(fmt.render_conversation(piece(begin, cand)).input_ids) > max_len:
                break
            end = cand
        out.append((piece(begin, end), trained_from - begin))
        if end >= len(msgs):
            break
        prior = [s for s in starts if trained_from <= s < end][-context:] if context else []
        begin = prior[0] if prior and prior[0] > begin else end
        trained_from = end
    return out


def build_examples(items: Sequence[SourcedConversation], fmt: ChatFormat, max_seq_len: int, window_context: int = 2) -> list[Example]:
    examples: list[Example] = []
    for item in items:
        conv = item.conversation
        for piece, n_ctx in _windows(conv, fmt, max_seq_len, window_context):
            ex = _example(piece, n_ctx, fmt, max_seq_len)
            if ex is not None:
                ex.source = item.source
                examples.append(ex)
    return examples


def _example(conv: Conversation, n_ctx: int, fmt: ChatFormat, max_seq_len: int) -> Example | None:
    rendered: RenderedConversation = fmt.render_conversation(conv)
    ids = rendered.input_ids
    labels = [-100] * len(ids)
    pos: list[int] = []
    kinds: list[str] = []
    prefix = len(fmt.decision_prefix_ids)
    for turn in rendered.turns:
        if turn.after < n_ctx or not _scored_turn(conv, turn.after):
            continue
        if turn.end > max_seq_len:
            break
        labels[turn.start : turn.end] = ids[turn.start : turn.end]
        if turn.decision:
            pos.append(turn.start + prefix)
            kinds.append(turn.kind)
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(lab == -100 for lab in labels):
        return None
    return Example(ids, labels, pos, kinds)


def class_weights(examples: Sequence[Example], balance: float) -> dict[str, float]:
    counts = {"silence": 0, "response": 0}
    for ex in examples:
        for k in ex.decision_kind:
            counts[k] += 1
    total = sum(counts.values())
    if not total or not all(counts.values()):
        return {"silence": 1.0, "response": 1.0}
    return {k: (total / (2 * n)) ** balance for k, n in counts.items()}


def to_records(examples: Sequence[Example], weights: dict[str, float], decision_weight: float) -> list[dict[str, Any]]:
    """Rows for a `datasets.Dataset`: input_ids, labels and per-token loss weights."""
    rows = []
    for ex in examples:
        w = [0.0 if lab == -100 else 1.0 for lab in ex.labels]
        for p, k in zip(ex.decision_pos, ex.decision_kind, strict=True):
            w[p] = decision_weight * weights[k]
        rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "loss_weights": w})
    return rows


def summarize(report: DataReport, examples: Sequence[Example], weights: dict[str, float]) -> DataReport:
    report.examples = len(examples)
    report.tokens = sum(len(e.input_ids) for e in examples)
    report.trained_tokens = sum(sum(1 for lab in e.labels if lab != -100) for e in examples)
    report.decisions = {
        "silence": sum(k == "silence" for e in examples for k in e.decision_kind),
        "response": sum(k == "response" for e in examples for k in e.decision_kind),
    }
    report.class_weights = {k: round(v, 4) for k, v in weights.items()}
    return report


@dataclass
class WeightedCollator:
    """Pads input_ids, labels (-100) and loss_weights (0) on the right."""

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        weights = torch.zeros((len(rows), n), dtype=torch.float32)
        attn = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            m = len(r["input_ids"])
            ids[i, :m] = torch.as_tensor(r["input_ids"])
            labels[i, :m] = torch.as_tensor(r["labels"])
            weights[i, :m] = torch.as_tensor(r["loss_weights"])
            attn[i, :m] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "loss_weights": weights}
