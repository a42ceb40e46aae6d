"""The adapter registry: versions, atomic promotion and rollback, crash safety, and hot swaps in a live engine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.adapter_registry import (
    AdapterRegistry,
    AdapterRegistryError,
    AdapterWatcher,
    adapter_version,
    default_adapters_dir,
)
from model.config import EngineConfig
from model.engine import Engine, IncomingMessage
from model.errors import ModelLoadError
from tests.test_engine import _decide_all
from training.adapters import add_arguments, run, smoke_validate

CHAT = [
    ("alice", "who's up for pizza tonight?"),
    ("bob", "me! 7pm works"),
    ("carol", "@Chime what's 15% of 84.50?"),
    ("alice", "thanks"),
    ("dave", "see you all there"),
]
ROOT = Path(__file__).resolve().parent.parent


def _lora(model_dir: Path, out: Path, seed: int, threshold: float, named: float) -> Path:
    """A LoRA adapter with random (not zero) B matrices, so that each seed changes the outputs measurably."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    (out / "chime_adapter.json").write_text(json.dumps({"threshold": threshold, "named_threshold": named, "recipe": f"seed{seed}"}))
    (out / "run_card.md").write_text(f"# seed {seed}\n")
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    a = _lora(tiny_model_dir, root / "a", seed=1, threshold=0.3, named=0.2)
    b = _lora(tiny_model_dir, root / "b", seed=2, threshold=0.6, named=0.4)
    broken = _lora(tiny_model_dir, root / "broken", seed=3, threshold=0.5, named=0.5)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return {"a": a, "b": b, "broken": broken}


def _no_incoming(reg: AdapterRegistry) -> bool:
    return not list(reg.versions_dir.glob(".incoming-*"))


def test_add_promote_list_rollback(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.versions() == [] and reg.current() is None
    va = reg.add(adapters["a"], name="a")
    vb = reg.add(adapters["b"])
    assert vb.name.startswith("v") and len(vb.name) == len("vYYYYmmdd-HHMMSS")
    assert [v.name for v in reg.versions()] == ["a", vb.name]  # oldest first
    assert {p.name for p in va.path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "chime_adapter.json", "run_card.md"}
    assert va.meta["threshold"] == 0.3 and not va.serving and reg.current() is None
    reg.promote("a")
    assert reg.current().name == "a" and reg.history() == []
    reg.promote(vb.name)
    assert reg.current().name == vb.name and reg.history() == ["a"]
    assert [v.serving for v in reg.versions()] == [False, True]
    reg.promote(vb.name)  # promoting what serves changes nothing
    assert reg.history() == ["a"]
    assert reg.rollback().name == "a" and reg.current().name == "a" and reg.history() == []
    with pytest.raises(AdapterRegistryError, match="nothing to roll back"):
        reg.rollback()
    # The history has no duplicates and keeps the last 20.
    for i in range(22):
        reg.add(adapters["a"], name=f"n{i}")
        reg.promote(f"n{i}")
    reg.promote("a")
    history = reg.history()
    assert len(history) == 20 and history[0] == "n21" and len(set(history)) == 20
    pointer = json.loads(reg.pointer_path.read_text())
    assert pointer["version"] == "a" and pointer["updated_at"]
    assert not list(reg.root.glob("current.json.tmp-*"))
    # Labels for logs.
    assert adapter_version(str(va.path)) == "a"
    label = adapter_version(str(adapters["a"]))
    assert label.startswith("a@") and len(label) == len("a@") + 8
    assert label.split("@")[1] != adapter_version(str(adapters["b"])).split("@")[1]  # the weights' hash
    assert adapter_version(None) == "none"


def test_names_and_sources_are_validated(tmp_path, adapters, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    for bad in ["../x", "a b", "", ".hidden", "x/y", "é"]:
        with pytest.raises(AdapterRegistryError, match="invalid adapter version name"):
            reg.add(adapters["a"], name=bad)
    with pytest.raises(AdapterRegistryError, match="already exists"):
        reg.add(adapters["b"], name="a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterRegistryError, match="adapter_config.json"):
        reg.add(tmp_path / "empty")
    with pytest.raises(AdapterRegistryError, match="no adapter version"):
        reg.promote("missing")
    # A default name that is taken gets a suffix.
    from datetime import datetime, timezone

    import model.adapter_registry as registry_module

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    monkeypatch.setattr(registry_module, "datetime", FrozenClock)
    assert reg.add(adapters["a"]).name == "v20250102-030405"
    assert reg.add(adapters["b"]).name == "v20250102-030405-2"
    assert [v.name for v in reg.versions()] == ["v20250102-030405", "v20250102-030405-2", "a"]  # by created_at
    monkeypatch.setenv("CHIME_ADAPTERS_DIR", str(tmp_path / "elsewhere"))
    assert default_adapters_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CHIME_ADAPTERS_DIR")
    assert default_adapters_dir() == Path(os.environ["CHIME_HOME"]) / "adapters"


def test_failed_validation_leaves_nothing(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path / "reg")
    seen: list[Path] = []

    def refuse(path: Path) -> None:
        seen.append(path)
        assert (path / "adapter_model.safetensors").is_file()  # validation sees the complete copy
        raise AdapterRegistryError("smoke test failed")

    with pytest.raises(AdapterRegistryError, match="smoke test failed"):
        reg.add(adapters["a"], name="a", validate=refuse)
    assert seen and seen[0].name.startswith(".incoming-a-")
    assert reg.versions() == [] and _no_incoming(reg) and not (reg.versions_dir / "a").exists()
    assert reg.add(adapters["a"], name="a", validate=lambda p: None).name == "a"  # the name is free again


def test_crash_before_rename_changes_nothing(tmp_path, adapters, monkeypatch, tiny_engine_factory):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    reg.promote("a")
    pointer = reg.pointer_path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        reg.add(adapters["b"], name="b")
    monkeypatch.undo()
    assert [v.name for v in reg.versions()] == ["a"] and _no_incoming(reg)
    assert reg.pointer_path.read_bytes() == pointer
    engine = tiny_engine_factory(adapter=str(reg.current().path))
    assert engine.adapter_version == "a"


def test_killed_add_is_invisible_and_cleaned_up(tmp_path, adapters):
    """A process that dies after copying (before the rename) leaves only a hidden directory behind."""
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    reg.promote("a")
    pointer = reg.pointer_path.read_bytes()
    script = (
        "import os, sys\n"
        "from model.adapter_registry import AdapterRegistry\n"
        "AdapterRegistry(sys.argv[1]).add(sys.argv[2], name='b', validate=lambda p: os._exit(3))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(reg.root), str(adapters["b"])], cwd=ROOT, timeout=60)
    assert proc.returncode == 3
    assert len(list(reg.versions_dir.glob(".incoming-b-*"))) == 1  # the half-done copy is there, hidden
    assert [v.name for v in reg.versions()] == ["a"] and reg.current().name == "a"
    assert reg.pointer_path.read_bytes() == pointer
    with pytest.raises(AdapterRegistryError):
        reg.get("b")
    reg.add(adapters["b"], name="b")  # the next add removes the leftover first
    assert _no_incoming(reg) and [v.name for v in reg.versions()] == ["a", "b"]


def test_crash_while_writing_the_pointer_keeps_the_old_one(tmp_path, adapters, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    reg.add(adapters["b"], name="b")
    reg.promote("a")
    pointer = reg.pointer_path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash while replacing the pointer")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        reg.promote("b")
    monkeypatch.undo()
    assert reg.pointer_path.read_bytes() == pointer and reg.current().name == "a"
    assert not list(reg.root.glob("current.json.tmp-*"))


def test_corrupt_pointer_is_a_typed_error(tmp_path, adapters):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    for text in ["{not json", '{"version": 3}', "[]", '{"version": "a", "history": "b"}']:
        reg.pointer_path.write_text(text)
        with pytest.raises(AdapterRegistryError, match="corrupt adapter pointer"):
            reg.current()
        assert [(v.name, v.serving) for v in reg.versions()] == [("a", False)]  # listing still works
    reg.pointer_path.write_text('{"version": "gone", "history": []}')
    with pytest.raises(AdapterRegistryError, match="no adapter version 'gone'"):
        reg.current()
    reg.promote("a")  # promoting repairs the pointer
    assert reg.current().name == "a"


def test_watcher_swaps_the_adapter_between_messages(tmp_path, adapters, tiny_engine_factory):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    reg.add(adapters["b"], name="b")
    reg.promote("a")
    engine = tiny_engine_factory(adapter=str(reg.current().path))
    assert engine.adapter_version == "a" and engine.config.threshold == pytest.approx(0.3)
    watcher = AdapterWatcher(engine, reg)
    assert not watcher.check()  # already serving what the pointer names
    p_before = _decide_all(engine, "c", CHAT[:3])
    turns = [(t.kind, list(t.ids)) for t in engine.channel("c").turns]

    reg.promote("b")
    assert watcher.check()
    assert engine.adapter_version == "b" and engine.adapter == str(reg.get("b").path)
    assert engine.config.threshold == pytest.approx(0.6) and engine.config.named_threshold == pytest.approx(0.4)
    assert [(t.kind, list(t.ids)) for t in engine.channel("c").turns] == turns  # the history is kept
    p_after = _decide_all(engine, "c", CHAT[3:])
    assert not watcher.check()

    fresh_a = Engine.from_config(dataclasses.replace(engine.config, adapter=str(reg.get("a").path), threshold=None, named_threshold=None))
    fresh_b = Engine.from_config(dataclasses.replace(engine.config, adapter=str(reg.get("b").path), threshold=None, named_threshold=None))
    p_a = _decide_all(fresh_a, "c", CHAT)
    p_b = _decide_all(fresh_b, "c", CHAT)
    assert p_before == pytest.approx(p_a[:3], abs=1e-3)
    assert p_after == pytest.approx(p_b[3:], abs=1e-3)  # exactly what an engine started on b decides
    assert max(abs(x - y) for x, y in zip(p_after, p_a[3:], strict=True)) > 1e-2  # and not what a decided


def test_explicit_thresholds_survive_a_reload(adapters, tiny_engine_factory):
    engine = tiny_engine_factory(adapter=str(adapters["a"]), threshold=0.45)
    assert engine.config.named_threshold == pytest.approx(0.45)
    engine.reload_adapter(str(adapters["b"]))
    assert engine.config.threshold == pytest.approx(0.45) and engine.config.named_threshold == pytest.approx(0.45)
    assert engine.adapter_version.startswith("b@")
    engine.reload_adapter(None)  # the base model alone
    assert engine.adapter is None and engine.adapter_version == "none"


def test_failed_load_keeps_the_old_adapter_serving(tmp_path, adapters, tiny_engine_factory, caplog, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    reg.add(adapters["broken"], name="broken")  # no validation: it only fails when loaded
    reg.add(adapters["b"], name="b")
    reg.promote("a")
    engine = tiny_engine_factory(adapter=str(reg.current().path))
    reference = tiny_engine_factory(adapter=str(reg.current().path))
    watcher = AdapterWatcher(engine, reg)
    _decide_all(engine, "c", CHAT[:2])
    _decide_all(reference, "c", CHAT[:2])

    reg.promote("broken")
    with caplog.at_level(logging.ERROR, logger="model.adapter_registry"):
        assert not watcher.check()
    assert "cannot load version broken" in caplog.text
    assert engine.adapter_version == "a" and engine.config.threshold == pytest.approx(0.3)
    assert _decide_all(engine, "c", CHAT[2:]) == pytest.approx(_decide_all(reference, "c", CHAT[2:]), abs=1e-6)
    calls = []
    monkeypatch.setattr(engine, "reload_adapter", lambda path: calls.append(path))
    assert not watcher.check() and calls == []  # the same failed version is not retried every interval
    monkeypatch.undo()

    reg.pointer_path.write_text("{oops")
    with caplog.at_level(logging.ERROR, logger="model.adapter_registry"):
        assert not watcher.check()  # a corrupt pointer is logged, serving goes on
    assert "corrupt adapter pointer" in caplog.text and engine.adapter_version == "a"
    reg.promote("b")
    assert watcher.check() and engine.adapter_version == "b"


def test_reload_refuses_a_different_tokenizer(adapters, tiny_engine_factory, monkeypatch):
    import model.engine as engine_module

    engine = tiny_engine_factory(adapter=str(adapters["a"]))
    real_load = engine_module.load_model

    def load_with_extra_token(config):
        loaded = real_load(config)
        loaded.tokenizer.add_tokens(["<|brand-new|>"])
        return loaded

    monkeypatch.setattr(engine_module, "load_model", load_with_extra_token)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        engine.reload_adapter(str(adapters["b"]))
    assert engine.adapter_version.startswith("a@") and engine.adapter == str(adapters["a"])


def test_watcher_thread_picks_up_a_promotion(tmp_path, adapters, tiny_engine_factory):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add(adapters["a"], name="a")
    reg.add(adapters["b"], name="b")
    reg.promote("a")
    engine = tiny_engine_factory(adapter=str(reg.current().path))
    watcher = AdapterWatcher(engine, reg, interval_s=0.02)
    watcher.start()
    try:
        reg.promote("b")
        deadline = time.monotonic() + 30
        while engine.adapter_version != "b" and time.monotonic() < deadline:
            engine.decide("c", IncomingMessage("alice", "still here?"))  # the bot keeps deciding meanwhile
            time.sleep(0.02)
        assert engine.adapter_version == "b"
    finally:
        watcher.stop()
    assert watcher._thread is None


def test_smoke_validate(tmp_path, adapters, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from model.conversation import read_conversations

    config = EngineConfig(model=str(tiny_model_dir), dtype="float32")
    conversations = read_conversations(ROOT / "conversations/examples.jsonl")
    metrics = smoke_validate(adapters["a"], config, conversations, limit=2)
    assert metrics["n_conversations"] == 2 and metrics["n_scored"] > 0
    with pytest.raises(AdapterRegistryError, match="unreadable weights|does not load"):
        smoke_validate(adapters["broken"], config, conversations)
    nan = tmp_path / "nan"
    nan.mkdir()
    for name in ("adapter_config.json", "chime_adapter.json"):
        (nan / name).write_bytes((adapters["a"] / name).read_bytes())
    tensors = load_file(str(adapters["a"] / "adapter_model.safetensors"))
    next(iter(tensors.values())).fill_(float("nan"))
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    with pytest.raises(AdapterRegistryError, match="non-finite"):
        smoke_validate(nan, config, conversations)
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(AdapterRegistryError):
        reg.add(nan, name="nan", validate=lambda p: smoke_validate(p, config, conversations))
    assert reg.versions() == [] and _no_incoming(reg)


def test_cli(tmp_path, adapters, tiny_model_dir, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="chime")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    d = str(tmp_path / "reg")

    def chime(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        assert args.func is run
        return run(args)

    monkeypatch.chdir(ROOT)  # the smoke test reads conversations/dev/batch_A.jsonl
    assert chime("adapters", "add", str(adapters["a"]), "--name", "a", "--no-validate", "--promote", "--dir", d) == 0
    assert "serving a" in capsys.readouterr().out
    assert chime("adapters", "add", str(adapters["b"]), "--name", "b", "--model", str(tiny_model_dir), "--dir", d) == 0
    assert chime("adapters", "promote", "b", "--dir", d) == 0
    capsys.readouterr()
    assert chime("adapters", "list", "--json", "--dir", d) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["name"], v["serving"]) for v in listed] == [("a", False), ("b", True)]
    assert listed[1]["meta"]["threshold"] == 0.6
    assert chime("adapters", "list", "--dir", d) == 0
    table = capsys.readouterr().out
    assert "a" in table and "b" in table and "●" in table
    assert chime("adapters", "rollback", "--dir", d) == 0
    assert "serving a" in capsys.readouterr().out
    with pytest.raises(AdapterRegistryError, match="nothing to roll back"):
        chime("adapters", "rollback", "--dir", d)
    with pytest.raises(AdapterRegistryError, match="adapter_config.json"):
        chime("adapters", "add", str(tmp_path), "--dir", d)
    monkeypatch.setenv("CHIME_ADAPTERS_DIR", d)
    assert chime("adapters", "list", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def _other_tiny_model(tiny_model_dir: Path, out: Path) -> Path:
    """A model with the same tokenizer but other shapes: an adapter trained on it fits no layer of the tiny one."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(tiny_model_dir, out)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_incompatible_and_unsafe_adapters_are_refused_and_the_old_one_keeps_serving(
        tmp_path, adapters, tiny_model_dir, tiny_engine_factory, caplog):
    """Faults an operator can cause: an adapter trained for another base model, one whose target modules this
    model lacks, a truncated weights file, and pickle weights. Each is refused with a reason naming it, by the
    smoke test before promotion and by a running engine after a promotion without it."""
    from model.conversation import read_conversations

    other = _lora(_other_tiny_model(tiny_model_dir, tmp_path / "other-model"), tmp_path / "other-shapes", 5, 0.5, 0.5)
    wrong_targets = tmp_path / "wrong-targets"
    shutil.copytree(adapters["a"], wrong_targets)
    cfg = json.loads((wrong_targets / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn", "c_proj"]  # GPT-2's names
    (wrong_targets / "adapter_config.json").write_text(json.dumps(cfg))
    truncated = tmp_path / "truncated"
    shutil.copytree(adapters["a"], truncated)
    weights = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["a"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")

    config = EngineConfig(model=str(tiny_model_dir), dtype="float32")
    conversations = read_conversations(ROOT / "conversations/examples.jsonl")
    reg = AdapterRegistry(tmp_path / "reg")
    for bad, reason in [(other, "does not load.*trained for a model with other shapes.*6 weights differ"),
                        (wrong_targets, "does not load.*Target modules .*not found in the base model"),
                        (truncated, "unreadable weights")]:
        with pytest.raises(AdapterRegistryError, match=reason):
            reg.add(bad, name=bad.name, validate=lambda p: smoke_validate(p, config, conversations, limit=1))
    with pytest.raises(AdapterRegistryError, match="pickle file and is refused"):
        reg.add(pickled, name="pickled")
    assert reg.versions() == [] and _no_incoming(reg)

    # promoted without the smoke test: the running engine refuses each and keeps the old adapter
    reg.add(adapters["a"], name="a")
    reg.promote("a")
    for bad in (other, wrong_targets, truncated):
        reg.add(bad, name=bad.name)
    engine = tiny_engine_factory(adapter=str(reg.current().path))
    watcher = AdapterWatcher(engine, reg)
    for bad in (other, wrong_targets, truncated):
        reg.promote(bad.name)
        with caplog.at_level(logging.ERROR, logger="model.adapter_registry"):
            assert not watcher.check()
        assert f"cannot load version {bad.name}" in caplog.text and engine.adapter_version == "a"
    fresh = tiny_engine_factory(adapter=str(reg.versions_dir / "a"))  # still serving exactly "a"
    assert _decide_all(engine, "d", CHAT[:2]) == pytest.approx(_decide_all(fresh, "d", CHAT[:2]), abs=1e-6)
    with pytest.raises(ModelLoadError, match="pickle-based .bin weights are refused"):
        engine.reload_adapter(str(pickled))
    assert engine.adapter_version == "a"
