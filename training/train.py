"""`chime train`: completion-only (Q)LoRA fine-tuning with TRL's SFTTrainer and PEFT.

The dataset is pre-tokenized by `training.dataset` (labels only on the bot's turns, per-token loss
weights for the class imbalance), so SFTTrainer's own preparation is skipped and its loss is replaced
by the weighted one below. Everything else — the training loop, optimiser and scheduler, gradient
accumulation, progress bar, TensorBoard logging and resumable checkpoints — is the Trainer's.

A run writes into `output_dir`:
    checkpoint-*/        resumable checkpoints (`chime train ... --resume`)
    tensorboard/         TensorBoard event files
    adapter/             the PEFT adapter + chime_adapter.json (calibrated threshold, metrics) + card
    run_card.json/.md    recipe, data hash and counts, training figures, dev metrics
    dev_details.jsonl    one row per dev message: P(respond), the decision, P(call), the calls generated
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import DEFAULT_MODEL
from model.errors import ConfigError, ModelLoadError
from model.loading import ADAPTER_META
from training.recipe import Recipe, recipe_tools

DEV_DETAILS = "dev_details.jsonl"

log = logging.getLogger(__name__)

def resolve_train_dtype(recipe: Recipe, device: str) -> Any:
    """fp32 on CPU unless asked otherwise (bf16 training there is ~25x slower), bf16 on CUDA."""
    import torch

    if recipe.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, recipe.dtype)


def weighted_loss(logits: Any, labels: Any, weights: Any) -> tuple[Any, Any]:
    """Σ w·CE / Σ w over next-token predictions; returns (loss, per-token CE)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    ce = ce.view_as(labels)
    w = weights.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1e-8), ce


def _trainer_class() -> type:
    import torch
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        """SFTTrainer with per-token loss weights; logits only where a label is trained."""

        loss_is_scaled_for_ga = False  # the weighted mean is per micro-batch: let the Trainer scale it

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"][:, 1:]
            weights = inputs["loss_weights"][:, 1:]
            # Positions whose logits are needed: any row trains the next token there.
            keep = (weights > 0).any(dim=0).nonzero().flatten()
            if keep.numel() == 0:
                keep = torch.tensor([0], device=labels.device)
            outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, logits_to_keep=keep
            )
            loss, _ = weighted_loss(outputs.logits, labels[:, keep], weights[:, keep])
            return (loss, outputs) if return_outputs else loss

    return WeightedSFTTrainer


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    card: dict[str, Any]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def prepare_data(recipe: Recipe, fmt: Any) -> tuple[Any, dict[str, Any]]:
    """The training dataset and a report of what went into it."""
    from datasets import Dataset

    from training.dataset import build_examples, class_weights, load_conversations, summarize, to_records

    items, report = load_conversations(
        recipe.train_files, recipe.source_caps, recipe.seed, recipe.bot_name, recipe_tools(recipe), recipe.max_prompt_tools,
        recipe.require_tool_calls, recipe.keep_listed_tools, recipe.no_fit_examples,
    )
    dev_ids = _dev_ids(recipe)
    leaked = sorted({i.conversation.id for i in items if i.conversation.id in dev_ids})
    if leaked:
        raise ConfigError(f"{len(leaked)} training conversation(s) are in the dev split, e.g. {leaked[:3]}")
    examples = build_examples(items, fmt, recipe.max_seq_len, recipe.window_context)
    weights = class_weights(examples, recipe.class_balance)
    report = summarize(report, examples, weights)
    report.windows_split = len(examples) - len(items)
    records = to_records(examples, weights, recipe.decision_weight)
    return Dataset.from_list(records), dataclasses.asdict(report)


def _dev_ids(recipe: Recipe) -> set[str]:
    from training.dataset import expand_globs

    ids: set[str] = set()
    try:
        paths = expand_globs(recipe.dev_files)
    except ConfigError:
        return ids
    from model.conversation import iter_conversations

    for p in paths:
        ids.update(c.id for c in iter_conversations(p) if c.id)
    return ids


def load_base(recipe: Recipe, device: str, dtype: Any) -> tuple[Any, Any, str]:
    """The base model ready for LoRA (quantised to NF4 for QLoRA), its tokenizer and path."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.loading import load_tokenizer, prepare_default_model

    path = str(prepare_default_model()) if recipe.model == DEFAULT_MODEL else recipe.model
    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if recipe.load_in_4bit:
        from transformers import BitsAndBytesConfig

        if not device.startswith("cuda"):
            log.warning("QLoRA on CPU: bitsandbytes 4-bit runs there but very slowly; use it for tests only")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 or not device.startswith("cuda") else torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if recipe.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    else:
        model.to(device)
    model.config.use_cache = False
    return model, tokenizer, path


def linear_module_names(model: Any) -> list[str]:
    """Names of the linear layers inside the transformer blocks (what "all-linear" adapts)."""
    names = set()
    for full, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt") and ".layers." in f".{full}":
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(recipe: Recipe, model: Any = None) -> Any:
    from peft import LoraConfig

    targets: Any = "all-linear" if recipe.target_modules == ["all-linear"] else list(recipe.target_modules)
    layers = None
    if recipe.lora_top_layers is not None:
        if model is None:
            raise ConfigError("lora_top_layers needs the model")
        num_layers = model.config.num_hidden_layers
        layers = list(range(max(0, num_layers - recipe.lora_top_layers), num_layers))
        if targets == "all-linear":
            targets = linear_module_names(model)
    return LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout, target_modules=targets,
        layers_to_transform=layers, task_type="CAUSAL_LM",
    )


def adopt_adapter_shape(recipe: Recipe, num_layers: int) -> Recipe:
    """The recipe with the LoRA shape of its `init_adapter` (r, alpha, dropout, targets, top layers), so the
    run card tells what was trained; unchanged without one. Refuses, before any data is prepared, an
    adapter trained on another base model or one without a readable config."""
    if not recipe.init_adapter:
        return recipe
    from model.loading import adapter_meta

    base = adapter_meta(recipe.init_adapter).get("base_model")
    if base and base != recipe.model:
        raise ConfigError(f"init_adapter {recipe.init_adapter} was trained on {base!r}; the recipe's model is {recipe.model!r}")
    path = Path(recipe.init_adapter) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"init_adapter {recipe.init_adapter}: no readable adapter_config.json ({e})") from e
    layers = cfg.get("layers_to_transform")
    top = None
    if isinstance(layers, list) and layers:
        top = len(layers)
        if sorted(layers) != list(range(num_layers - top, num_layers)):
            raise ConfigError(f"init_adapter {recipe.init_adapter} adapts layers {layers}, not a top block of {num_layers}")
    targets = cfg.get("target_modules")
    shape = {"lora_r": cfg.get("r", recipe.lora_r), "lora_alpha": cfg.get("lora_alpha", recipe.lora_alpha),
             "lora_dropout": cfg.get("lora_dropout", recipe.lora_dropout), "lora_top_layers": top,
             "target_modules": sorted(targets) if isinstance(targets, list) else [str(targets)]}
    changed = {k: v for k, v in shape.items() if getattr(recipe, k) != v}
    if changed:
        log.info("init_adapter %s: its LoRA shape wins over the recipe's: %s", recipe.init_adapter, changed)
    return dataclasses.replace(recipe, **shape)


def with_lora(model: Any, recipe: Recipe) -> Any:
    """The base model with trainable LoRA weights: fresh ones, or those of `recipe.init_adapter`."""
    from peft import get_peft_model

    if not recipe.init_adapter:
        return get_peft_model(model, lora_config(recipe, model))
    from model.loading import attach_adapter

    return attach_adapter(model, recipe.init_adapter, merge=False, trainable=True)


def sft_config(recipe: Recipe, device: str, dtype: Any, progress: bool = True) -> Any:
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=recipe.output_dir,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        optim=recipe.optim,
        max_grad_norm=recipe.max_grad_norm,
        # Precision from the device, never TRL's default (bf16=True made CPU runs 12x slower).
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        gradient_checkpointing=recipe.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
        logging_steps=recipe.logging_steps,
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        report_to=list(recipe.report_to) or "none",
        seed=recipe.seed,
        data_seed=recipe.seed,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run a recipe end to end: data, (Q)LoRA training, adapter, dev evaluation, calibration, card."""
    import torch
    from transformers import set_seed

    from model.chat_format import ChatFormat
    from model.loading import resolve_device
    from training.dataset import WeightedCollator

    set_seed(recipe.seed)
    if recipe.torch_threads:
        torch.set_num_threads(recipe.torch_threads)
    device = resolve_device(recipe.device)
    dtype = resolve_train_dtype(recipe, device)
    out = Path(recipe.output_dir)
    checkpoint = last_checkpoint(recipe.output_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("no checkpoint in %s: starting from scratch", out)
    if not resume and out.exists() and any(out.glob("checkpoint-*")):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")

    model, tokenizer, base_path = load_base(recipe, device, dtype)
    recipe = adopt_adapter_shape(recipe, model.config.num_hidden_layers)
    quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    fmt = ChatFormat(tokenizer, tool_format=recipe.tool_format)
    dataset, data_report = prepare_data(recipe, fmt)
    log.info("training data: %s", json.dumps({k: v for k, v in data_report.items() if k != "files"}))

    model = with_lora(model, recipe)
    trainable, total = model.get_nb_trainable_parameters()
    args = sft_config(recipe, device, dtype, progress)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=WeightedCollator(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start

    adapter_dir = out / "adapter"
    save_adapter(model, adapter_dir, recipe.save_dtype)
    steps = int(result.global_step)
    epochs_done = float(result.metrics.get("epoch", recipe.epochs))
    tokens_seen = int(data_report["tokens"] * epochs_done)
    trained_seen = int(data_report["trained_tokens"] * epochs_done)
    card: dict[str, Any] = {
        "recipe": dataclasses.asdict(recipe),
        "base_model": recipe.model if recipe.model != DEFAULT_MODEL else "SmolLM2-135M-Instruct (embedded default)",
        "base_path": base_path,
        "data": data_report,
        "training": {
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "quantized_linear_layers": quantized,
            "trainable_parameters": int(trainable),
            "total_parameters": int(total),
            "steps": steps,
            "epochs": round(epochs_done, 3),
            "train_loss": round(float(result.training_loss), 5),
            "seconds": round(seconds, 1),
            "resumed_from": checkpoint,
            "tokens_per_second": round(tokens_seen / seconds, 1) if seconds and not checkpoint else None,
            "trained_tokens_per_second": round(trained_seen / seconds, 1) if seconds and not checkpoint else None,
            "log_history": [h for h in trainer.state.log_history if "loss" in h],
        },
        "environment": {
            "git_commit": _git_commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        },
    }
    del trainer, model
    import gc

    gc.collect()
    if recipe.evaluate:
        card["evaluation"] = evaluate_adapter(recipe, str(adapter_dir), details=out / DEV_DETAILS)
    save_card(out, adapter_dir, recipe, card)
    return TrainResult(str(out), str(adapter_dir), card)


def save_adapter(model: Any, adapter_dir: Path, save_dtype: str) -> None:
    """Save the LoRA weights (cast to `save_dtype`: an adapter of a few MB)."""
    import torch

    target = getattr(torch, save_dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(target)
    model.save_pretrained(str(adapter_dir))


def evaluate_adapter(
    recipe: Recipe, adapter_dir: str | None, engine_settings: dict[str, Any] | None = None, details: Path | None = None
) -> dict[str, Any]:
    """Decide every dev message with the adapter, calibrate the thresholds there, and score them.

    Besides the metrics at the calibrated thresholds (calibrated and scored on the same dev split, as
    the engine will use them), the card keeps the metrics at 0.5 and a 2-fold cross-validated estimate
    (thresholds fitted on half the dev conversations, scored on the other half).

    The call gate is calibrated the same way: expected calls are generated with the call opened
    (tool_call_threshold 0), P(call) and the message's relevance to the listed tools are read on every
    expected answer, and the gate's threshold and relevance weight are the pair that best separates answers
    that call from answers in words; tool-call accuracy is then scored as the gate would have it (an answer
    scoring below the threshold opens no call). `details`: a file for one JSON row
    per dev message, as the calibrated thresholds decide it.
    """
    from model.config import EngineConfig
    from model.conversation import read_conversations
    from model.engine import Engine
    from training.dataset import expand_globs
    from training.evaluate import (
        calibrate,
        calibrate_call_gate,
        compute_metrics,
        cross_validated,
        evaluate,
        rows_at,
        rows_at_gate,
        write_details,
    )

    config = EngineConfig(
        model=recipe.model, adapter=adapter_dir, bot_name=recipe.bot_name, threshold=0.5, device=recipe.device,
        tools=list(recipe.tools), tool_format=recipe.tool_format, max_prompt_tools=recipe.max_prompt_tools,
        temperature=0.0,  # scored tool calls are greedy
        tool_call_threshold=0.0,  # expected calls are generated opened; the gate is calibrated below
        **(engine_settings or {}),  # e.g. a remote backend (chime retrain --backend openai)
    )
    engine = Engine.from_config(config)
    per_file: dict[str, Any] = {}
    all_rows = []
    for path in expand_globs(recipe.dev_files):
        convs = read_conversations(path, default_bot_name=recipe.bot_name)
        if recipe.eval_limit:
            convs = convs[: recipe.eval_limit]
        _, rows = evaluate(engine, convs)
        per_file[str(path)] = rows
        all_rows.extend(rows)
    aam = config.always_answer_mentions
    limits = {
        "always_answer_mentions": aam,
        "max_false_interruptions": recipe.calibration_max_false_interruptions,
        "max_missed": recipe.calibration_max_missed,
        "separate_named": recipe.calibration_separate_named,
    }
    gate_threshold, gate_weight, gate = calibrate_call_gate(all_rows)
    if gate_threshold is not None:
        all_rows = rows_at_gate(all_rows, gate_threshold, gate_weight)
        per_file = {path: rows_at_gate(rows, gate_threshold, gate_weight) for path, rows in per_file.items()}
    cal = calibrate(all_rows, **limits)
    if details is not None:
        write_details(details, rows_at(all_rows, cal.threshold, aam, cal.named_threshold))
    result: dict[str, Any] = {
        "tool_call_threshold": gate_threshold,
        "tool_call_relevance_weight": gate_weight,
        "tool_call_gate": gate,
        "threshold": cal.threshold,
        "named_threshold": cal.named_threshold,
        "limits_met": cal.feasible,
        "limits": {k: v for k, v in limits.items() if k != "always_answer_mentions"},
        "dev_files": sorted(per_file),
        "calibrated": cal.metrics,
        "at_0.5": compute_metrics(rows_at(all_rows, 0.5, aam)),
        "cross_validated_2fold": cross_validated(all_rows, folds=2, **limits),
        "calibrated_per_file": {
            path: compute_metrics(rows_at(rows, cal.threshold, aam, cal.named_threshold)) for path, rows in per_file.items()
        },
    }
    return result


def recalibrate(recipe: Recipe) -> dict[str, Any]:
    """Re-run the dev evaluation and calibration of `output_dir/adapter` and rewrite its metadata and card."""
    out = Path(recipe.output_dir)
    adapter_dir = out / "adapter"
    card_path = adapter_dir / "run_card.json"
    if not card_path.is_file():
        raise ConfigError(f"no trained adapter with a run card in {adapter_dir}")
    card = json.loads(card_path.read_text())
    card["recipe"].update({k: v for k, v in dataclasses.asdict(recipe).items() if k.startswith("calibration_") or k in ("dev_files", "eval_limit")})
    card["evaluation"] = evaluate_adapter(recipe, str(adapter_dir), details=out / DEV_DETAILS)
    save_card(out, adapter_dir, recipe, card)
    return card


def save_card(out: Path, adapter_dir: Path, recipe: Recipe, card: dict[str, Any]) -> None:
    """The engine's metadata next to the adapter, and the run card in the run and adapter directories."""
    write_adapter_meta(adapter_dir, recipe, card)
    write_card(out, card)
    write_card(adapter_dir, card)


def write_adapter_meta(adapter_dir: Path, recipe: Recipe, card: dict[str, Any]) -> None:
    """What the engine reads next to the adapter: the calibrated threshold and the base model."""
    ev = card.get("evaluation") or {}
    meta = {
        "base_model": recipe.model,
        "threshold": ev.get("threshold", 0.5),
        "named_threshold": ev.get("named_threshold", ev.get("threshold", 0.5)),
        "recipe": recipe.name,
        "data_hash": card["data"]["data_hash"],
        "tool_call_threshold": ev.get("tool_call_threshold"),  # the call gate (None: none calibrated)
        "tool_call_relevance_weight": ev.get("tool_call_relevance_weight", 0.0),
        "dev_metrics": {k: ev.get("calibrated", {}).get(k) for k in ("macro_f1", "false_interruption_rate", "missed_intervention_rate", "addressed_recall")},
    }
    (adapter_dir / ADAPTER_META).write_text(json.dumps(meta, indent=1) + "\n")


def write_card(directory: Path, card: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run_card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    (directory / "run_card.md").write_text(card_markdown(card))


def card_markdown(card: dict[str, Any]) -> str:
    r, d, t = card["recipe"], card["data"], card["training"]
    lines = [
        f"# Run card: {r['name']}",
        "",
        f"- Base model: {card['base_model']}",
        f"- LoRA r={r['lora_r']} alpha={r['lora_alpha']} dropout={r['lora_dropout']} targets={r['target_modules']}"
        + (f" in the top {r['lora_top_layers']} blocks" if r.get("lora_top_layers") else "")
        + (f", 4-bit {r['bnb_4bit_quant_type']}" if r["load_in_4bit"] else "")
        + (f"; continued from the adapter {r['init_adapter']}" if r.get("init_adapter") else ""),
        f"- Data hash {d['data_hash']}: {d['examples']} examples, {d['tokens']} tokens ({d['trained_tokens']} trained), "
        f"decisions {d['decisions']}, class weights {d['class_weights']}, decision weight {r['decision_weight']}",
        f"- Training: {t['steps']} steps, {t['epochs']} epochs, {t['seconds']} s on {t['device']} ({t['dtype']}), "
        f"final mean loss {t['train_loss']}, {t['trained_tokens_per_second']} trained tokens/s",
        f"- Commit {card['environment']['git_commit']}, torch {card['environment']['torch']}, {card['environment']['machine']}",
        "",
        "## Data files",
        "",
        *[f"- {path}: {n}" for path, n in d["files"].items()],
    ]
    ev = card.get("evaluation")
    if ev:
        lines += [
            "",
            f"## Dev evaluation (thresholds calibrated on dev: {ev['threshold']}, named {ev.get('named_threshold')}; "
            f"limits {ev.get('limits')} met: {ev.get('limits_met')})",
            "",
        ]
        keys = ["macro_f1", "respond_precision", "respond_recall", "false_interruption_rate", "missed_intervention_rate", "addressed_recall", "n_scored"]
        lines.append("| | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for name in ("calibrated", "cross_validated_2fold", "at_0.5"):
            if name not in ev:
                continue
            m = ev[name]
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
        for path, m in ev["calibrated_per_file"].items():
            lines.append(f"| {path} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
        calibrated = ev.get("calibrated") or {}
        lines += ["", f"Tool calls (same tool and arguments / same result): {_fmt(calibrated.get('tool_call_accuracy'))} / "
                  f"{_fmt(calibrated.get('tool_call_result_accuracy'))} of {calibrated.get('n_expected_tool_calls')} expected calls."]
        gate = ev.get("tool_call_gate")
        if gate:
            weight = ev.get("tool_call_relevance_weight") or 0.0
            rule = f"P(call) >= {ev.get('tool_call_threshold')}" if not weight else (
                f"sigmoid(logit P(call) + {weight} x relevance) >= {ev.get('tool_call_threshold')}")
            lines += ["", f"Call gate (open a call when {rule}): ROC AUC {_fmt(gate.get('auc'))} "
                      f"(P(call) alone {_fmt(gate.get('auc_p_call'))}); "
                      f"{_fmt(gate.get('call_recall'))} of {gate['n_call_answers']} answers that should call open one, "
                      f"{_fmt(gate.get('word_accuracy'))} of {gate['n_word_answers']} answers in words stay in words."]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
