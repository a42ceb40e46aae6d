"""`chime bench train`: training throughput of Chime's trainer against TRL run with its defaults.

All runs train LoRA adapters on the same conversations (the recipe's training data, in order) and time
steps after the first (warm-up) with a Trainer callback. "Trained tokens" are the bot's tokens, the
ones the completion-only loss supervises; for the TRL default run, which trains on every token, the
same conversations hold the same number of bot tokens, so the figures compare like with like.

Rows:
- chime: the recipe as `chime train` runs it (fp32 on CPU, weighted completion-only loss, logits only
  where trained, length-grouped batches).
- trl-default: `SFTTrainer` with a default `SFTConfig` (bf16=True, gradient checkpointing, its own
  tokenization of the conversations through the chat template), same LoRA settings and batch size.
- trl-default-fp32: the same with bf16=False, to separate the precision default from the rest.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from training.recipe import Recipe, recipe_tools


def _timer_callback() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def _steady(times: list[float]) -> float:
    steady = times[1:] or times
    return sum(steady) / len(steady)


def bench_train(recipe: Recipe, steps: int = 6, trl_steps: int = 2, include: tuple[str, ...] = ("chime", "trl-default", "trl-default-fp32")) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    from model.chat_format import ChatFormat
    from model.loading import resolve_device
    from training.dataset import WeightedCollator, build_examples, class_weights, load_conversations, to_records
    from training.train import _trainer_class, load_base, lora_config, resolve_train_dtype, sft_config

    device = resolve_device(recipe.device)
    dtype = resolve_train_dtype(recipe, device)
    n_examples = recipe.batch_size * (steps + 1)
    model, tokenizer, path = load_base(recipe, device, dtype)
    fmt = ChatFormat(tokenizer, tool_format=recipe.tool_format)
    items, _ = load_conversations(
        recipe.train_files, recipe.source_caps, recipe.seed, recipe.bot_name, recipe_tools(recipe), recipe.max_prompt_tools
    )
    examples = build_examples(items, fmt, recipe.max_seq_len, recipe.window_context)[: n_examples]
    weights = class_weights(examples, recipe.class_balance)
    records = to_records(examples, weights, recipe.decision_weight)
    per_example_tokens = sum(len(r["input_ids"]) for r in records) / len(records)
    per_example_trained = sum(sum(lab != -100 for lab in r["labels"]) for r in records) / len(records)
    results: dict[str, Any] = {
        "device": device,
        "threads": torch.get_num_threads(),
        "batch_size": recipe.batch_size,
        "examples": len(records),
        "mean_tokens_per_example": round(per_example_tokens, 1),
        "mean_trained_tokens_per_example": round(per_example_trained, 1),
        "runs": {},
    }

    def record(name: str, timer: Any, tokens: float, trained: float, note: str) -> None:
        step_s = _steady(timer.times)
        results["runs"][name] = {
            "steps_timed": max(1, len(timer.times) - 1),
            "seconds_per_step": round(step_s, 2),
            "mean_tokens_per_example": round(tokens, 1),
            "tokens_per_second": round(tokens * recipe.batch_size / step_s, 1),
            "trained_tokens_per_second": round(trained * recipe.batch_size / step_s, 1),
            "note": note,
        }

    if "chime" in include:
        peft_model = get_peft_model(model, lora_config(recipe, model))
        with tempfile.TemporaryDirectory() as tmp:
            bench_recipe = Recipe(**{**recipe.__dict__, "output_dir": tmp, "max_steps": steps, "report_to": [], "save_steps": 10**9})
            args = sft_config(bench_recipe, device, dtype, progress=False)
            timer = _timer_callback()
            trainer = _trainer_class()(
                model=peft_model, args=args, train_dataset=Dataset.from_list(records),
                data_collator=WeightedCollator(pad_token_id=tokenizer.pad_token_id or 0), processing_class=tokenizer, callbacks=[timer],
            )
            trainer.train()
        record("chime", timer, per_example_tokens, per_example_trained, f"{str(dtype).replace('torch.', '')}, weighted completion-only loss")
        del trainer, peft_model
    del model

    # TRL with its defaults on the same conversations, as chat messages.
    convs = []
    seen = set()
    for item in items:
        if len(convs) >= n_examples:
            break
        if id(item.conversation) in seen:
            continue
        seen.add(id(item.conversation))
        convs.append({"messages": fmt.template_messages(item.conversation, recipe.bot_name)})
    for name, bf16 in (("trl-default", True), ("trl-default-fp32", False)):
        if name not in include:
            continue
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(path)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = SFTConfig(output_dir=tmp, max_steps=trl_steps, per_device_train_batch_size=recipe.batch_size, report_to="none",
                            save_strategy="no", disable_tqdm=True, use_cpu=device == "cpu", bf16=bf16)
            timer = _timer_callback()
            trainer = SFTTrainer(model=base, args=cfg, train_dataset=Dataset.from_list(convs), processing_class=tokenizer,
                                 peft_config=lora_config(recipe, base), callbacks=[timer])
            trainer.train()
            lengths = [len(r["input_ids"]) for r in trainer.train_dataset.select(range(min(len(convs), n_examples)))]
        tokens = sum(lengths) / len(lengths)
        # The same conversations hold the same bot tokens; scale by the share of the sequence TRL kept.
        trained = tokens * per_example_trained / per_example_tokens
        record(name, timer, tokens, trained, f"SFTConfig defaults (bf16={bf16}, gradient_checkpointing={cfg.gradient_checkpointing}, "
                                        f"max_length={cfg.max_length}), loss on every token")
        del trainer, base
    return results
