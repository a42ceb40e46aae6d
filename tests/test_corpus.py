"""The corpus: lint rules, statistics, the fixed dev split, and the committed data itself."""

from __future__ import annotations

import glob
import json

from bot.cli import main
from model.conversation import Conversation, Message, ToolCall, read_conversations
from training.corpus import check_conversation, check_files, dedupe, split_key, stats


def _conv(*msgs: Message, cid: str = "c1") -> Conversation:
    return Conversation(id=cid, messages=list(msgs))


def test_check_flags_broken_structure():
    ok = [Message(role="user", name=n, content="hi") for n in "abcabc"]
    assert check_conversation(_conv(*ok)) == []
    few = check_conversation(_conv(*ok[:3]))
    assert any("human messages" in p for p in few)
    orphan = check_conversation(_conv(*ok, Message(role="tool", name="calculator", content="1")))
    assert any("without a call" in p for p in orphan)
    call = Message(role="assistant", tool_calls=[ToolCall("calculator", {"expression": "1+1"})])
    unanswered = check_conversation(_conv(*ok, call))
    assert any("unanswered tool calls" in p for p in unanswered)
    unknown = Message(role="assistant", tool_calls=[ToolCall("rm_rf", {})])
    assert any("unknown tool" in p for p in check_conversation(_conv(*ok, unknown, Message(role="tool", name="rm_rf", content="x"),
                                                                         Message(role="assistant", content="done"))))
    double = check_conversation(_conv(*ok, Message(role="assistant", content="a"), Message(role="assistant", content="b")))
    assert any("must follow a human" in p for p in double)


def test_split_is_stable_and_keeps_lines(tmp_path):
    src = tmp_path / "batch.jsonl"
    lines = [json.dumps({"id": f"X-{i:03d}", "note": "kept", "messages": [{"role": "user", "name": "a", "content": str(i)}]})
             for i in range(50)]
    src.write_text("\n".join(lines) + "\n")
    assert main(["data", "split", str(src), "--root", str(tmp_path / "out")]) == 0
    dev = (tmp_path / "out" / "dev" / "batch.jsonl").read_text().splitlines()
    train = (tmp_path / "out" / "train" / "batch.jsonl").read_text().splitlines()
    assert sorted(dev + train) == sorted(lines)
    assert all(split_key(json.loads(line)["id"]) < 0.2 for line in dev)
    assert 3 <= len(dev) <= 18


def test_committed_corpus_meets_the_rules():
    train = sorted(glob.glob("conversations/train/*.jsonl"))
    dev = sorted(glob.glob("conversations/dev/*.jsonl"))
    assert train and dev
    for res in check_files(train + dev):
        assert res.problems == [], res.problems[:5]
    convs = [c for f in train + dev for c in read_conversations(f)]
    assert len(convs) >= 400
    _, dropped = dedupe(convs)
    assert dropped == 0
    train_ids = {c.id for f in train for c in read_conversations(f)}
    dev_ids = {c.id for f in dev for c in read_conversations(f)}
    assert not train_ids & dev_ids
    assert all(split_key(i) < 0.2 for i in dev_ids) and all(split_key(i) >= 0.2 for i in train_ids)
    s = stats(convs).to_dict()
    assert 0.15 <= s["respond_share"] <= 0.33  # mostly silence, as in a group chat (19.0% with the second tool-call round)
    assert s["bot_name_not_chime_share"] >= 0.3
    assert set(s["people_per_conversation"]) <= {2, 3, 4, 5, 6}
    assert s["tool_call_turns"] > 50
