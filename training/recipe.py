"""Training recipes: one YAML file per recipe, loaded into `Recipe` and overridable from the CLI.

`chime train --recipe training/recipes/cpu-lora.yaml epochs=2 learning_rate=1e-4` loads the file,
applies the `key=value` overrides (values parsed as YAML) and validates every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import DEFAULT_MODEL, load_config
from model.errors import ConfigError


@dataclass
class Recipe:
    """Everything a training run depends on (saved into the run card)."""

    name: str = "cpu-lora"
    model: str = DEFAULT_MODEL  # "default", a local directory or a cached Hugging Face id
    output_dir: str = "runs/cpu-lora"
    seed: int = 0
    bot_name: str = "Chime"  # for conversation files without their own bot name

    # Data: globs of conversation files. `source_caps` limits how many conversations a source (a
    # glob matched against file paths) contributes, sampled with `seed`.
    train_files: list[str] = field(default_factory=lambda: ["conversations/train/*.jsonl"])
    dev_files: list[str] = field(default_factory=lambda: ["conversations/dev/*.jsonl"])
    source_caps: dict[str, int] = field(default_factory=dict)
    # Keep only conversations with at least one tool call (a tool-call phase on top of an adapter);
    # `keep_listed_tools` also keeps those listing their own functions where none fits (answered in words).
    require_tool_calls: bool = False
    keep_listed_tools: bool = False
    # Add up to this many conversations where the bot is asked for something its listed tools cannot do
    # and says so in words (`training.dataset.no_fit_conversations`): they teach not forcing a call.
    no_fit_examples: int = 0
    max_seq_len: int = 1024  # longer conversations are cut into windows at message boundaries
    window_context: int = 2  # messages repeated (untrained) at the start of a following window
    # Tools listed in the prompt of conversations that carry none (as the engine lists its registry),
    # the retrieval budget, and the tool format ("auto": from the chat template), as in EngineConfig.
    tools: list[str] = field(default_factory=lambda: ["calculator", "convert_units", "current_time"])
    max_prompt_tools: int = 8
    tool_format: str = "auto"

    # Imbalance: the decision token ("silence"/"response" after "(") carries extra weight, and the
    # two classes are reweighted towards balance (0: none, 1: inverse class frequency).
    decision_weight: float = 3.0
    class_balance: float = 1.0

    # Device and precision
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # QLoRA: NF4 base weights (CUDA; on CPU only for tests, very slow)
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    gradient_checkpointing: bool = False
    torch_threads: int | None = None

    # LoRA. `init_adapter`: continue from that adapter's weights (e.g. model/adapters/default) instead
    # of fresh ones; its own shape (r, alpha, targets, layers) then wins over the lora_* fields.
    init_adapter: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_top_layers: int | None = None  # adapt only the top N blocks: backward stops below them (faster on CPU)

    # Optimisation
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    optim: str = "adamw_torch"  # paged_adamw_8bit for QLoRA on CUDA
    max_grad_norm: float = 1.0
    group_by_length: bool = True  # batches of similar length: less padding

    # Bookkeeping
    logging_steps: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # adapter weights on disk

    # After training: evaluate on the dev split and calibrate the threshold there
    evaluate: bool = True
    eval_limit: int | None = None  # conversations per dev file (None: all)
    calibration_max_false_interruptions: float | None = 0.03  # limits the calibrated thresholds must meet where they can
    calibration_max_missed: float | None = 0.15
    calibration_separate_named: bool = True  # a second threshold for messages that name the bot

    def validate(self) -> None:
        if self.max_seq_len < 128:
            raise ConfigError(f"max_seq_len must be at least 128, got {self.max_seq_len}")
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ConfigError("lora_r and lora_alpha must be positive")
        if not 0 <= self.class_balance <= 1:
            raise ConfigError(f"class_balance must be in [0, 1], got {self.class_balance}")
        if self.decision_weight <= 0:
            raise ConfigError(f"decision_weight must be positive, got {self.decision_weight}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("batch_size and gradient_accumulation_steps must be positive")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")
        if self.no_fit_examples < 0:
            raise ConfigError(f"no_fit_examples must be 0 or more, got {self.no_fit_examples}")
        if not self.train_files:
            raise ConfigError("train_files is empty")


def recipe_tools(recipe: Recipe) -> list[dict[str, Any]]:
    """The schemas of the recipe's tools (built-in names or "package.module:function")."""
    from model.tools import registry_from_names

    try:
        return registry_from_names(recipe.tools).schemas()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"tools: {e}") from e


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings to a dict; values are parsed as YAML (numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {pair!r}: {e}") from e
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    values = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return load_config(Recipe, path, values)
