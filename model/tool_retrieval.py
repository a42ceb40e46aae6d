"""Retrieval-aware tool choice: when more tools are registered than fit the prompt, list only the ones
most relevant to the conversation at hand (as Gorilla does with API documentation).

Relevance is BM25 (the `rank_bm25` package) over each tool's name (split at "_", "." and camelCase),
description and parameter names and descriptions, queried with the latest human messages. The chosen
tools keep their registry order, so the same set always renders the same prompt. Training applies the
same selection (`training/dataset.py`), so the model learns with the prompts it will see.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rank_bm25 import BM25Okapi

from model.tool_format import bare_schema

RETRIEVAL_MESSAGES = 3  # the latest human messages that form the query (engine and training alike)
_WORD_RE = re.compile(r"[A-Za-z]+|\d+")
_STOP = frozenset(
    "a an and are as at be by can for from how i in is it me of on or please the to what whats with you your".split()
)


def tokenize(text: str) -> list[str]:
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase -> camel Case
    words = (m.group(0).lower() for m in _WORD_RE.finditer(text))
    return [_stem(w) for w in words if w not in _STOP]


def _stem(word: str) -> str:
    """Plural and verb "-s" folded onto the stem (miles -> mile, converts -> convert): enough for BM25 here."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def tool_document(tool: dict[str, Any]) -> list[str]:
    schema = bare_schema(tool)
    params = (schema.get("parameters") or {}).get("properties") or {}
    parts = [str(schema.get("name", "")).replace("_", " ").replace(".", " "), str(schema.get("description", ""))]
    for name, spec in params.items():
        parts.append(str(name).replace("_", " "))
        if isinstance(spec, dict):
            parts.append(str(spec.get("description", "")))
    return tokenize(" ".join(parts))


def has_numeric_parameter(tool: dict[str, Any]) -> bool:
    params = (bare_schema(tool).get("parameters") or {}).get("properties") or {}
    return any(isinstance(p, dict) and p.get("type") in ("number", "integer") for p in params.values())


def relevance(query: str, tools: Sequence[dict[str, Any]], ignore: str = "") -> float:
    """How much of a message the listed tools could be about: the share of its words (as BM25 reads them,
    without those of `ignore`, the bot's name) found in the documentation of the tool that covers most of
    them, a number counting as found in a tool with a numeric parameter. 0.0 for a message about something
    none of them mentions (a question about routes with only a prime-number tool); the call gate adds it
    to P(call) with a calibrated weight (`model.engine.gate_score`)."""
    skip = set(tokenize(ignore))
    words = [w for w in tokenize(query) if w not in skip and (len(w) > 1 or w.isdigit())]  # not the s of what's
    if not words or not tools:
        return 0.0
    best = 0
    for tool in tools:
        doc, numeric = set(tool_document(tool)), has_numeric_parameter(tool)
        best = max(best, sum(w in doc or (numeric and w.isdigit()) for w in words))
    return best / len(words)


class ToolRetriever:
    """Top-k tools for a query by BM25 over their documentation."""

    def __init__(self, tools: Sequence[dict[str, Any]]):
        self.tools = list(tools)
        docs = [tool_document(t) or ["_"] for t in self.tools]
        self._bm25 = BM25Okapi(docs) if self.tools else None

    def scores(self, query: str) -> list[float]:
        if self._bm25 is None:
            return []
        return [float(s) for s in self._bm25.get_scores(tokenize(query))]

    def select(self, query: str, k: int) -> list[dict[str, Any]]:
        """The k most relevant tools (all of them when k >= their number), in registry order."""
        if k >= len(self.tools):
            return list(self.tools)
        scores = self.scores(query)
        best = sorted(range(len(self.tools)), key=lambda i: (-scores[i], i))[: max(k, 0)]
        return [self.tools[i] for i in sorted(best)]
