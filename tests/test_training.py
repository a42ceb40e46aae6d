"""Training: the loss mask, weights, windows, recipes, and end-to-end (Q)LoRA runs on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.conversation import Conversation, Message, ToolCall, read_conversations, write_conversations
from model.errors import ConfigError
from training.dataset import (
    SourcedConversation,
    WeightedCollator,
    build_examples,
    class_weights,
    load_conversations,
    no_fit_conversations,
    to_records,
)
from training.evaluate import EvalRow, calibrate, cross_validated, rows_at
from training.recipe import load_recipe, parse_overrides

THREE_PEOPLE = Conversation(
    id="mask-1",
    bot_name="Pip",
    messages=[
        Message(role="user", name="Ana", content="who is up for pizza?"),
        Message(role="user", name="Ben", content="me"),
        Message(role="user", name="Cy", content="Pip, 84 * 0.15?"),
        Message(role="assistant", tool_calls=[ToolCall("calculator", {"expression": "84*0.15"})]),
        Message(role="tool", name="calculator", content="12.6"),
        Message(role="assistant", content="12.6"),
        Message(role="user", name="Ana", content="thanks Pip"),
    ],
)


def test_examples_weights_and_labels(tiny_format):
    (ex,) = build_examples([SourcedConversation("x", THREE_PEOPLE)], tiny_format, max_seq_len=4096)
    assert ex.decision_kind == ["silence", "silence", "response", "silence"]  # the answer after the tool is not a decision
    for p, kind in zip(ex.decision_pos, ex.decision_kind, strict=True):
        expected = tiny_format.silence_token_id if kind == "silence" else tiny_format.response_token_id
        assert ex.labels[p] == ex.input_ids[p] == expected
    weights = class_weights([ex], balance=1.0)
    assert weights["response"] == pytest.approx(2.0) and weights["silence"] == pytest.approx(4 / 6)
    (row,) = to_records([ex], weights, decision_weight=3.0)
    w = row["loss_weights"]
    for p, kind in zip(ex.decision_pos, ex.decision_kind, strict=True):
        assert w[p] == pytest.approx(3.0 * weights[kind])
    trained = [i for i, lab in enumerate(row["labels"]) if lab != -100]
    assert all(w[i] > 0 for i in trained)
    assert all(w[i] == 0 for i in range(len(w)) if row["labels"][i] == -100)
    assert not class_weights([ex], balance=0.0) != {"silence": 1.0, "response": 1.0}


def test_explicit_labels_train_only_labelled_turns(tiny_format):
    conv = Conversation(
        id="irc",
        messages=[
            Message(role="user", name="a", content="hi all"),
            Message(role="user", name="b", content="a: hello", expect="silence"),
            Message(role="user", name="c", content="lol"),
        ],
    )
    (ex,) = build_examples([SourcedConversation("x", conv)], tiny_format, max_seq_len=4096)
    assert len(ex.decision_pos) == 1
    rendered = tiny_format.render_conversation(conv)
    second = rendered.turns[1]
    assert [i for i, lab in enumerate(ex.labels) if lab != -100] == list(range(second.start, second.end))


def test_long_conversations_are_windowed_without_training_twice(tiny_format):
    msgs = []
    for i in range(30):
        msgs.append(Message(role="user", name=f"p{i % 3}", content=f"message number {i} " + "words " * 8))
        if i % 5 == 4:
            msgs.append(Message(role="assistant", content=f"reply {i}"))
    conv = Conversation(messages=msgs, id="long")
    full = tiny_format.render_conversation(conv)
    examples = build_examples([SourcedConversation("x", conv)], tiny_format, max_seq_len=len(full.input_ids) // 3, window_context=2)
    assert len(examples) >= 3
    assert all(len(e.input_ids) <= len(full.input_ids) // 3 for e in examples)
    # Every human message is decided (trained) exactly once across the windows.
    assert sum(len(e.decision_pos) for e in examples) == 30
    assert sum(k == "response" for e in examples for k in e.decision_kind) == 6


def test_collator_pads(tiny_format):
    rows = to_records(build_examples([SourcedConversation("x", THREE_PEOPLE)], tiny_format, 4096), {"silence": 1, "response": 1}, 2.0)
    short = {k: v[:10] for k, v in rows[0].items()}
    batch = WeightedCollator(pad_token_id=0, pad_to_multiple_of=8)([rows[0], short])
    n = batch["input_ids"].shape[1]
    assert n % 8 == 0 and n >= len(rows[0]["input_ids"])
    assert batch["attention_mask"][1, 10:].sum() == 0 and (batch["labels"][1, 10:] == -100).all()
    assert batch["loss_weights"][1, 10:].sum() == 0


def test_recipe_overrides_and_validation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nlora_r: 4\ntrain_files: [a.jsonl]\n")
    recipe = load_recipe(path, ["lora_r=16", "learning_rate=1e-4", "target_modules=[q_proj,v_proj]", "source_caps={'*irc*': 5}"])
    assert recipe.lora_r == 16 and recipe.learning_rate == pytest.approx(1e-4)
    assert recipe.target_modules == ["q_proj", "v_proj"] and recipe.source_caps == {"*irc*": 5}
    with pytest.raises(ConfigError, match="unknown setting"):
        load_recipe(path, ["lora_rank=4"])
    with pytest.raises(ConfigError, match="lora_r"):
        load_recipe(path, ["lora_r=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])
    for name in ("cpu-lora", "cuda-qlora-8b"):
        load_recipe(Path("training/recipes") / f"{name}.yaml")


def test_source_caps_and_dedupe(tmp_path):
    convs = [Conversation(id=f"c{i}", messages=[Message(role="user", name="a", content=f"hi {i}")]) for i in range(10)]
    write_conversations(tmp_path / "irc_train.jsonl", convs + [Conversation(id="dup", messages=convs[0].messages)])
    write_conversations(tmp_path / "authored.jsonl", convs[:2])
    items, report = load_conversations([str(tmp_path / "*.jsonl")], {"*irc_train.jsonl": 4}, seed=0)
    assert report.files[str(tmp_path / "irc_train.jsonl")] <= 4
    assert report.files[str(tmp_path / "authored.jsonl")] == 2
    again, report2 = load_conversations([str(tmp_path / "*.jsonl")], {"*irc_train.jsonl": 4}, seed=0)
    assert [c.conversation.id for c in again] == [c.conversation.id for c in items] and report2.data_hash == report.data_hash
    items, report = load_conversations([str(tmp_path / "*.jsonl")])
    assert report.duplicates_dropped == 3  # the "dup" row and the two authored copies


def _row(p: float, expected: str, addressed: bool = False, named: bool = False, cid: str | None = None) -> EvalRow:
    return EvalRow(cid, 0, "a", "x", expected, "silence", p, addressed, addressed or named, 1.0)


def test_calibrate_picks_the_separating_threshold():
    rows = [_row(0.1, "silence"), _row(0.2, "silence"), _row(0.35, "silence"), _row(0.6, "respond"), _row(0.9, "respond")]
    cal = calibrate(rows)
    assert 0.35 < cal.threshold < 0.6 and cal.metrics["macro_f1"] == 1.0 and cal.feasible
    decided = rows_at(rows, 0.95)
    assert [r.decision for r in decided] == ["silence"] * 5
    assert rows_at([_row(0.01, "respond", addressed=True)], 0.5)[0].decision == "respond"
    assert rows_at([_row(0.01, "respond", addressed=True)], 0.5, always_answer_mentions=False)[0].decision == "silence"


def test_calibrate_named_threshold_and_limits():
    # Named messages that should get answers score lower than unnamed chatter the bot must ignore:
    # one threshold cannot separate them, two can.
    rows = [_row(0.3, "respond", named=True), _row(0.35, "respond", named=True), _row(0.1, "silence", named=True),
            _row(0.5, "silence"), _row(0.55, "silence"), _row(0.8, "respond"), _row(0.2, "silence")]
    tied = calibrate(rows, separate_named=False)
    assert tied.threshold == tied.named_threshold and tied.metrics["macro_f1"] < 1.0
    cal = calibrate(rows)
    assert 0.1 < cal.named_threshold < 0.3 and 0.55 < cal.threshold < 0.8 and cal.metrics["macro_f1"] == 1.0
    assert cal.metrics["addressed_recall"] == 1.0
    # Limits that cannot be met are reported, and the best macro-F1 is kept.
    noisy = [_row(0.6, "silence"), _row(0.4, "respond"), _row(0.7, "respond"), _row(0.2, "silence")]
    assert not calibrate(noisy, max_false_interruptions=0.0, max_missed=0.0).feasible
    # Cross-validation scores every row once, with thresholds fitted on the other fold.
    many = [_row(0.1 + 0.8 * (i % 2), "respond" if i % 2 else "silence", cid=f"c{i}") for i in range(40)]
    cv = cross_validated(many, folds=2)
    assert cv["n_scored"] == 40 and cv["macro_f1"] == 1.0


def _tiny_recipe(tmp_path: Path, model_dir: Path, **extra) -> list[str]:
    train = tmp_path / "train.jsonl"
    dev = tmp_path / "dev.jsonl"
    convs = read_conversations("conversations/examples.jsonl")
    write_conversations(train, convs[:4] + [THREE_PEOPLE])
    write_conversations(dev, [Conversation(id=f"dev-{c.id}", bot_name=c.bot_name, messages=c.messages, tools=c.tools) for c in convs[4:]])
    settings = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "train_files": [str(train)],
        "dev_files": [str(dev)],
        "max_steps": 4,
        "batch_size": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "lora_r": 4,
        "lora_alpha": 8,
        "learning_rate": 0.01,
        **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def test_train_end_to_end_resume_and_serve(tmp_path, tiny_model_dir, capsys):
    from bot.cli import main
    from model.config import EngineConfig
    from model.engine import Engine

    overrides = _tiny_recipe(tmp_path, tiny_model_dir)
    assert main(["train", "--recipe", "training/recipes/cpu-lora.yaml", "--quiet", *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "run"
    adapter = run / "adapter"
    assert summary["steps"] == 4 and 0 <= summary["threshold"] <= 1
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    card = json.loads((run / "run_card.json").read_text())
    assert card["data"]["decisions"]["response"] > 0 and len(card["data"]["data_hash"]) == 16
    assert card["evaluation"]["calibrated"]["n_scored"] > 0
    assert "Dev evaluation" in (adapter / "run_card.md").read_text()
    meta = json.loads((adapter / "chime_adapter.json").read_text())
    assert meta["threshold"] == summary["threshold"]
    # The engine loads the adapter and takes its calibrated threshold unless one is given.
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), adapter=str(adapter), dtype="float32"))
    assert engine.config.threshold == pytest.approx(meta["threshold"])
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), adapter=str(adapter), dtype="float32", threshold=0.7))
    assert engine.config.threshold == 0.7
    # A second run into the same directory must resume, not overwrite.
    assert main(["train", "--recipe", "training/recipes/cpu-lora.yaml", "--quiet", *overrides]) == 2
    assert "--resume" in capsys.readouterr().err
    more = [o for o in overrides if not o.startswith("max_steps")] + ["max_steps=6"]
    assert main(["train", "--recipe", "training/recipes/cpu-lora.yaml", "--quiet", "--resume", "--no-eval", *more]) == 0
    card = json.loads((run / "run_card.json").read_text())
    assert card["training"]["steps"] == 6 and card["training"]["resumed_from"].endswith("checkpoint-4")


def test_require_tool_calls_keeps_conversations_that_call(tmp_path):
    call = Message(role="assistant", content="", tool_calls=[ToolCall("calculator", {"expression": "1+1"})])
    convs = [
        Conversation(id="talk", messages=[Message(role="user", name="a", content="hi")]),
        Conversation(id="calls", messages=[Message(role="user", name="a", content="Chime, 1+1?"), call,
                                           Message(role="tool", name="calculator", content="2")]),
    ]
    write_conversations(tmp_path / "mixed.jsonl", convs)
    listed = Conversation(id="listed", tools=[{"name": "stats.mean", "description": "Mean.", "parameters": {
        "type": "object", "properties": {"values": {"type": "array", "items": {"type": "number"}}}, "required": ["values"]}}],
        messages=[Message(role="user", name="a", content="Chime, who wrote Dune?"),
                  Message(role="assistant", content="Frank Herbert.")])
    write_conversations(tmp_path / "mixed.jsonl", [*convs, listed])
    items, report = load_conversations([str(tmp_path / "*.jsonl")], require_tool_calls=True)
    assert [c.conversation.id for c in items] == ["calls"]
    items, _ = load_conversations([str(tmp_path / "*.jsonl")], require_tool_calls=True, keep_listed_tools=True)
    assert [c.conversation.id for c in items] == ["calls", "listed"]
    items, _ = load_conversations([str(tmp_path / "*.jsonl")])
    assert len(items) == 3


def _schema(name: str, description: str, **params: str) -> dict:
    return {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in params.items()}, "required": list(params)}}


def test_no_fit_conversations_pair_requests_with_tools_that_cannot_serve_them():
    area = _schema("geometry.triangle_area", "Area of a triangle from its base and height.", base="number", height="number")
    weather = _schema("weather.now", "Current weather in a city.", city="string")
    bmi = _schema("health.bmi", "Body mass index from weight in kg and height in m.", weight_kg="number", height_m="number")
    forecast = _schema("weather.forecast", "Weather forecast for a city.", city="string", days="integer")

    def asks(cid: str, tools: list, text: str, call: ToolCall) -> SourcedConversation:
        return SourcedConversation(f"{cid}.jsonl", Conversation(id=cid, bot_name="Pip", tools=tools, messages=[
            Message(role="user", name="Ana", content="quick one"),
            Message(role="user", name="Ben", content=text),
            Message(role="assistant", tool_calls=[call]),
            Message(role="tool", name=call.name, content="25"),
            Message(role="assistant", content="It's 25."),
            Message(role="user", name="Ana", content="thanks"),
        ]))

    items = [
        asks("tri", [area], "Pip, a triangle with base 10 and height 5?", ToolCall(area["name"], {"base": 10, "height": 5})),
        asks("oslo", [weather], "Pip, how is it in Oslo right now?", ToolCall(weather["name"], {"city": "Oslo"})),
        asks("bmi", [bmi], "Pip what's my BMI at 70 kg and 1.75 m?", ToolCall(bmi["name"], {"weight_kg": 70, "height_m": 1.75})),
        SourcedConversation("talk.jsonl", Conversation(id="talk", tools=[forecast], messages=[
            Message(role="user", name="Ana", content="Pip, who wrote Dune?"), Message(role="assistant", content="Frank Herbert.")])),
    ]
    out = no_fit_conversations(items, 10, seed=0)
    assert sorted(o.conversation.id for o in out) == ["bmi:no-fit", "oslo:no-fit", "tri:no-fit"]  # only chats that call
    by_id = {o.conversation.id: o.conversation for o in out}
    for o in out:
        conv = o.conversation
        assert o.source.startswith("no-fit:")
        assert [m.role for m in conv.messages] == ["user", "user", "assistant"]  # cut at the request, answered in words
        answer = conv.messages[-1]
        assert not answer.tool_calls and all(t["name"] in answer.content for t in conv.tools)
        source = next(i.conversation for i in items if i.conversation.id == conv.id.split(":")[0])
        assert {t["name"] for t in conv.tools}.isdisjoint({c.name for m in source.messages for c in m.tool_calls})
    # Oslo's weather question never meets weather.forecast, which shares "weather" and "city" with the tool it
    # called, nor the triangle question health.bmi ("height"); requests with numbers meet tools with numeric
    # parameters (weather.now has none).
    assert by_id["oslo:no-fit"].tools[0]["name"] != "weather.forecast"
    assert by_id["tri:no-fit"].tools == [forecast]
    assert by_id["bmi:no-fit"].tools in ([area], [forecast])
    assert no_fit_conversations(items, 1, seed=0)[0].conversation.id in by_id
    assert no_fit_conversations(items, 10, seed=0)[0].conversation.messages[-1].content == out[0].conversation.messages[-1].content
    assert no_fit_conversations(items, 0) == []


def test_no_fit_conversations_join_the_training_data_and_its_hash(tmp_path, tiny_format):
    from training.train import prepare_data

    weather = _schema("weather.report", "Weather report for a city.", city="string")
    oslo = Conversation(id="oslo", bot_name="Pip", tools=[weather], messages=[
        Message(role="user", name="Ana", content="Pip, how is it in Oslo?"),
        Message(role="assistant", tool_calls=[ToolCall("weather.report", {"city": "Oslo"})]),
        Message(role="tool", name="weather.report", content="4 C, rain"),
        Message(role="assistant", content="4 °C and raining."),
    ])
    train = tmp_path / "train.jsonl"
    write_conversations(train, [THREE_PEOPLE, oslo])
    base = {"train_files": [str(train)], "dev_files": [str(tmp_path / "none.jsonl")]}
    plain, plain_report = prepare_data(load_recipe(None, base), tiny_format)
    more, report = prepare_data(load_recipe(None, {**base, "no_fit_examples": 5}), tiny_format)
    # the sum meets the weather tool and the weather question the built-ins: one no-fit chat each
    assert report["files"] == {str(train): 2, f"no-fit:{train}": 2}
    assert len(more) == len(plain) + 2 and report["data_hash"] != plain_report["data_hash"]


def test_training_continues_from_an_adapter(tmp_path, tiny_model_dir):
    """`init_adapter` starts from that adapter's LoRA weights (and shape), trains them, and saves a new adapter."""
    import torch
    from safetensors.torch import load_file

    from model.errors import ModelLoadError
    from training.recipe import load_recipe
    from training.train import train

    first = train(load_recipe("training/recipes/cpu-lora.yaml", _tiny_recipe(tmp_path, tiny_model_dir, evaluate=False, report_to=[])), progress=False)
    before = load_file(Path(first.adapter_dir) / "adapter_model.safetensors")
    overrides = _tiny_recipe(tmp_path, tiny_model_dir, evaluate=False, report_to=[], max_steps=1, learning_rate=0.0,
                             lora_r=2, init_adapter=first.adapter_dir, output_dir=str(tmp_path / "again"))
    second = train(load_recipe("training/recipes/cpu-lora.yaml", overrides), progress=False)
    after = load_file(Path(second.adapter_dir) / "adapter_model.safetensors")
    assert after.keys() == before.keys()  # the adapter's r=4, not the recipe's r=2
    assert all(torch.equal(after[k], before[k]) for k in before)  # learning rate 0: the loaded weights, unchanged
    assert second.card["training"]["trainable_parameters"] == first.card["training"]["trainable_parameters"] > 0
    assert second.card["recipe"]["lora_r"] == 4 and second.card["recipe"]["init_adapter"] == first.adapter_dir
    # with a learning rate (after the first, warm-up step at 0), the loaded weights move
    overrides = [o for o in overrides if not o.startswith(("learning_rate", "output_dir", "max_steps"))]
    third = train(load_recipe("training/recipes/cpu-lora.yaml", [*overrides, "max_steps=3", f"output_dir={json.dumps(str(tmp_path / 'third'))}"]),
                  progress=False)
    moved = load_file(Path(third.adapter_dir) / "adapter_model.safetensors")
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    # an adapter trained on another base model is refused, and so is a directory that is not an adapter
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(first.adapter_dir, foreign)
    meta = json.loads((foreign / "chime_adapter.json").read_text())
    (foreign / "chime_adapter.json").write_text(json.dumps({**meta, "base_model": "someone/else"}))
    with pytest.raises(ConfigError, match="trained on 'someone/else'"):
        train(load_recipe("training/recipes/cpu-lora.yaml", [*overrides, f"init_adapter={json.dumps(str(foreign))}",
                                                            f"output_dir={json.dumps(str(tmp_path / 'f'))}"]), progress=False)
    (tmp_path / "empty").mkdir()
    bad = [*overrides, f"init_adapter={json.dumps(str(tmp_path / 'empty'))}", f"output_dir={json.dumps(str(tmp_path / 'bad'))}"]
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        train(load_recipe("training/recipes/cpu-lora.yaml", bad), progress=False)


def test_dev_conversations_never_train(tmp_path, tiny_model_dir):
    from bot.cli import main

    overrides = _tiny_recipe(tmp_path, tiny_model_dir)
    dev = tmp_path / "dev.jsonl"
    write_conversations(dev, read_conversations(tmp_path / "train.jsonl")[:1])
    assert main(["train", "--recipe", "training/recipes/cpu-lora.yaml", "--quiet", *overrides]) == 2


def test_qlora_path_on_cpu(tmp_path, tiny_model_dir):
    """The QLoRA code path (NF4, double quantisation, k-bit preparation) runs with bitsandbytes on CPU."""
    pytest.importorskip("bitsandbytes")
    from training.recipe import load_recipe
    from training.train import train

    overrides = _tiny_recipe(tmp_path, tiny_model_dir, max_steps=1, load_in_4bit=True, evaluate=False, report_to=[])
    recipe = load_recipe("training/recipes/cuda-qlora-8b.yaml", overrides + ['device="cpu"', 'dtype="float32"', 'optim="adamw_torch"'])
    result = train(recipe, progress=False)
    assert result.card["training"]["steps"] == 1
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    assert result.card["recipe"]["load_in_4bit"] and result.card["recipe"]["bnb_4bit_use_double_quant"]
    assert result.card["training"]["quantized_linear_layers"] == 2 * 7  # every linear layer of both blocks is NF4


def test_bench_train_reports_all_runs(tmp_path, tiny_model_dir):
    from training.bench import bench_train

    recipe = load_recipe("training/recipes/cpu-lora.yaml", _tiny_recipe(tmp_path, tiny_model_dir, source_caps={}))
    result = bench_train(recipe, steps=2, trl_steps=2)
    assert set(result["runs"]) == {"chime", "trl-default", "trl-default-fp32"}
    for run in result["runs"].values():
        assert run["tokens_per_second"] > 0 and run["trained_tokens_per_second"] > 0
        assert run["trained_tokens_per_second"] <= run["tokens_per_second"]
    assert "bf16=True" in result["runs"]["trl-default"]["note"]


def test_windows_always_progress_with_huge_messages(tiny_format):
    long = "word " * 400
    msgs = [Message(role="user", name=f"p{i % 2}", content=long if i % 3 == 0 else f"short {i}") for i in range(9)]
    conv = Conversation(messages=msgs, id="huge")
    examples = build_examples([SourcedConversation("x", conv)], tiny_format, max_seq_len=200, window_context=2)
    assert sum(len(e.decision_pos) for e in examples) <= 9
    assert all(len(e.input_ids) <= 200 for e in examples)
    assert len(examples) >= 3
