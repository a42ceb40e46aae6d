"""The simulator: script mode through the CLI, and the interactive loop with scripted input."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from bot.cli import main
from bot.simulator import run_interactive

KEYS = {"name", "content", "decision", "p_respond", "response", "tool_calls", "latency_ms"}


def _tiny_args(tiny_model_dir: Path) -> list[str]:
    return ["--model", str(tiny_model_dir), "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "6"]


def test_script_mode_prints_one_json_object_per_message(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "chat.txt"
    script.write_text(
        "# a comment line\n"
        "alice: who's up for pizza?\n"
        "\n"
        "bob: me: definitely, at 7:30\n"
        "carol: @Chime what's a good topping?\n"
        "dave: https://example.com/menu\n"
    )
    code = main(["simulate", "--script", str(script), "--json", "--threshold", "1", *_tiny_args(tiny_model_dir)])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["name"] for r in rows] == ["alice", "bob", "carol", "dave"]
    assert rows[1]["content"] == "me: definitely, at 7:30"  # only the first colon separates the speaker
    for r in rows:
        assert KEYS <= set(r)
        assert 0.0 <= r["p_respond"] <= 1.0 and r["latency_ms"] > 0
    assert [r["decision"] for r in rows] == ["silence", "silence", "respond", "silence"]
    assert rows[2]["response"] is not None and rows[0]["response"] is None


def test_script_errors_are_one_line(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "bad.txt"
    script.write_text("alice: fine\nthis line has no speaker\n")
    assert main(["simulate", "--script", str(script), "--json", *_tiny_args(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "bad.txt:2" in err and "Name: text" in err
    assert main(["simulate", "--script", str(tmp_path / "missing.txt"), *_tiny_args(tiny_model_dir)]) == 2


def test_interactive_loop(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(threshold=1.0, max_new_tokens=4)
    inputs = iter([
        "alice: hello everyone",
        "/as bob",
        "what's up?",
        "/threshold 0",
        "https://example.com",
        "/threshold 7",
        "/history",
        "/nope",
        "carol: @Chime hi",
        "/quit",
    ])
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    run_interactive(engine, console, read=lambda prompt: next(inputs))
    out = buffer.getvalue()
    assert out.count("silent") == 2  # alice and bob at threshold 1
    assert "now speaking as bob" in out
    assert "threshold set to 0.00" in out
    assert "usage: /threshold" in out
    assert "bob: https://example.com" in out  # a URL is a message, not a speaker change
    assert "unknown command /nope" in out
    assert out.count("responds") == 2
    kinds = [t.kind for t in engine.channel("simulator").turns]
    assert kinds == ["human", "bot"] * 4


def test_the_simulator_logs_to_the_database_and_the_log_exports(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    from sqlalchemy import select

    from model.conversation import read_conversations
    from model.storage import models as m
    from model.storage.db import make_engine, session_scope

    script = tmp_path / "chat.txt"
    script.write_text("alice: pizza tonight?\nbob: yes\ncarol: me too\ndave: 7pm?\ncarol: @Chime book a table?\n")
    url = f"sqlite:///{tmp_path / 'sim.db'}"
    assert main(["simulate", "--script", str(script), "--json", "--threshold", "1", "--db", url, *_tiny_args(tiny_model_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    engine = make_engine(url)
    with session_scope(engine) as s:
        messages = s.scalars(select(m.Message).order_by(m.Message.created_at)).all()
        decisions = s.scalars(select(m.Decision)).all()
        assert [x.display_name for x in messages if x.author_kind == "human"] == ["alice", "bob", "carol", "dave", "carol"]
        assert len(decisions) == 5 and {d.adapter_version for d in decisions} == {"none"}
        assert [x.content for x in messages if x.author_kind == "bot"] == [rows[-1]["response"]]
        assert s.get(m.Server, "local:local").training_consent  # the simulator's operator is the administrator
    engine.dispose()
    out = tmp_path / "logged.jsonl"
    assert main(["export", "--out", str(out), "--db", url]) == 0
    conv = read_conversations(out)[0]
    # alice's silence is confirmed by the chat carrying on; "me too" is not what carol then asked the bot
    assert [x.expect for x in conv.messages if x.role == "user"] == ["silence", None, None, None, None]
    # --no-log writes nothing
    other = tmp_path / "none.db"
    assert main(["simulate", "--script", str(script), "--json", "--no-log", "--db", f"sqlite:///{other}",
                 *_tiny_args(tiny_model_dir)]) == 0
    assert not other.exists()
