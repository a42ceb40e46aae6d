"""Labels from real use (training/labels.py) and `chime export` (training/export.py)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from model.conversation import read_conversations, scored_messages
from model.storage.admin import correct, find_person, find_server, forget, set_opt_out, set_training_consent
from model.storage.db import make_engine, session_scope
from model.storage.log import ChatLog, Ref
from tests.test_storage import chat
from training.corpus import check_conversation
from training.export import export
from training.labels import Event, LabelRules, derive_labels, reaction_sign

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def ev(i: int, kind: str = "human", person: str | None = "a", text: str = "hi", minutes: float | None = None, **kw) -> Event:
    return Event(id=f"m{i}", kind=kind, person=person if kind == "human" else None, text=text,
                 at=T0 + timedelta(minutes=i if minutes is None else minutes), **kw)


def labels_of(events, **rules):
    return [(lab.index, lab.expect, lab.rule) for lab in derive_labels(events, LabelRules(**rules))]


def test_reaction_signs() -> None:
    assert reaction_sign("👍") == 1 and reaction_sign("❤️") == 1 and reaction_sign("👎") == -1 and reaction_sign("🍕") == 0


def test_positive_reaction_and_follow_up_make_a_good_response() -> None:
    base = [ev(0, decision="respond", reply_message="r0", reply_text="12.6"), ev(1, "bot", reactions=("👍",), text="12.6")]
    base[1].id = "r0"
    assert labels_of(base) == [(0, "respond", "positive")]
    follow = [ev(0, decision="respond", reply_message="r0", reply_text="x"), ev(1, "bot", text="x"),
              ev(2, person="b", text="thanks Chime, and for 4?", names_bot=True)]
    follow[1].id = "r0"
    assert labels_of(follow) == [(0, "respond", "positive")]


@pytest.mark.parametrize("case", ["reaction", "deleted", "stop"])
def test_negative_signals_mean_it_should_have_stayed_silent(case: str) -> None:
    reply = ev(1, "bot", text="did you know...", reactions=("👎",) if case == "reaction" else (), deleted=case == "deleted")
    reply.id = "r0"
    events = [ev(0, text="pizza tonight?", decision="respond", reply_message="r0", reply_text="did you know...")
              , reply]
    if case == "stop":
        events.append(ev(2, person="b", text="not you, Chime"))
    lab = derive_labels(events)
    assert [(x.expect, x.rule, x.drop_reply) for x in lab] == [("silence", "negative", True)]


def test_negative_wins_over_positive_and_stop_must_be_aimed_at_the_bot() -> None:
    reply = ev(1, "bot", reactions=("👍", "👎"))
    reply.id = "r0"
    assert labels_of([ev(0, decision="respond", reply_message="r0", reply_text="x"), reply]) == [(0, "silence", "negative")]
    reply2 = ev(1, "bot")
    reply2.id = "r0"
    events = [ev(0, decision="respond", reply_message="r0", reply_text="x"), reply2, ev(2, person="b", text="sure"),
              ev(3, person="c", text="stop the car at the bakery")]
    assert labels_of(events) == []  # a "stop" that is not aimed at the bot is not a complaint


def test_missed_response_when_asked_again_by_name() -> None:
    events = [ev(0, text="what's 15% of 84.50?", decision="silence"), ev(1, person="b", text="no idea", decision="silence"),
              ev(2, text="Chime, 15% of 84.50?", names_bot=True, decision="respond", reply_text="12.68")]
    lab = derive_labels(events)
    assert (lab[0].index, lab[0].expect, lab[0].rule, lab[0].reply_text) == (0, "respond", "missed", "12.68")


def test_a_different_request_to_the_bot_is_not_a_missed_response() -> None:
    events = [ev(0, text="me too", decision="silence"),
              ev(1, text="@Chime book a table?", addressed=True, decision="respond", reply_text="done")]
    assert labels_of(events) == []


def test_weak_silence_needs_the_chat_to_carry_on() -> None:
    events = [ev(0, decision="silence"), ev(1, person="b", decision="silence"), ev(2, decision="silence")]
    assert labels_of(events) == [(0, "silence", "weak-silence")]  # the last two have too little after them
    assert labels_of(events, weak_silence=False) == []
    late = [ev(0, decision="silence"), ev(1, person="b", minutes=30), ev(2, minutes=31)]
    assert labels_of(late) == []  # outside the 10-minute window


def test_correction_wins() -> None:
    reply = ev(1, "bot", reactions=("👎",))
    reply.id = "r0"
    events = [ev(0, decision="respond", reply_message="r0", reply_text="x", correction=("respond", "better")), reply]
    lab = derive_labels(events)
    assert (lab[0].expect, lab[0].rule, lab[0].reply_text) == ("respond", "correction", "better")
    silent = [ev(0, decision="silence", correction=("respond", None))]
    assert derive_labels(silent) == []  # respond without any reply to train: not usable


# ----------------------------------------------------------------------------- end to end


@pytest.fixture()
def logged(tmp_path: Path):
    """A Discord server with consent, one without, and a chat with every kind of label."""
    url = f"sqlite:///{tmp_path / 'chime.db'}"
    log = ChatLog(url, platform="discord", spool=tmp_path / "s.jsonl")
    at = T0
    g = Ref("g1", "friends")

    def step(minutes: float = 1.0) -> datetime:
        nonlocal at
        at = at + timedelta(minutes=minutes)
        return at

    # silence, the group carries on: weak silence on the first
    chat(log, "Alice Smith", "anyone up for pizza tonight?", False, server=g, at=step())
    chat(log, "Bob", "yes! Alice Smith you pick", False, server=g, at=step())
    chat(log, "Carol", "I'm in", False, server=g, at=step())
    # a question the bot missed, asked again by name: the reply moves to the first message
    missed, _ = chat(log, "Bob", "how much is 15% of 84.50?", False, server=g, at=step())
    chat(log, "Bob", "Chime, 15% of 84.50?", True, server=g, at=step(), reply="12.68")
    # a reply that got a thumbs down: should have stayed silent
    _, bad = chat(log, "Carol", "ugh mondays", True, server=g, at=step(), reply="Mondays are the best day!")
    log.reaction("c1", bad, Ref("carol", "Carol"), "👎")
    # a reply that got a thumbs up
    _, good = chat(log, "Alice Smith", "Chime what time is it in Tokyo?", True, server=g, at=step(), reply="It's 21:00 in Tokyo.")
    log.reaction("c1", good, Ref("bob", "Bob"), "👍")
    chat(log, "Dave", "my number is <@carol> ask her", False, server=g, at=step())
    # an opted-out person, and a server without consent
    chat(log, "Eve", "Chime, don't train on me", True, server=g, at=step(), reply="ok Eve")
    chat(log, "Zed", "Chime hi", True, server=Ref("g2", "no consent"), channel="c2", at=step(), reply="hi")
    assert log.close()
    engine = make_engine(url)
    with session_scope(engine) as s:
        set_training_consent(s, find_server(s, "friends"), True)
        set_opt_out(s, find_person(s, "Eve"))
    return engine, missed


def test_export_writes_consented_labelled_pseudonymised_conversations(logged, tmp_path: Path) -> None:
    engine, _ = logged
    out = tmp_path / "logged.jsonl"
    with session_scope(engine) as s:
        report = export(s, out, seed=1)
    convs = read_conversations(out)
    assert report.conversations == len(convs) == 1
    assert report.skipped_channels_no_consent == 1 and report.excluded_messages_opted_out == 1
    conv = convs[0]
    assert conv.id.startswith("logged-") and conv.bot_name == "Chime"
    assert check_conversation(conv, authored=False) == []
    text = json.dumps(conv.to_dict(), ensure_ascii=False)
    for real in ("Alice Smith", "Bob", "Carol", "Dave", "Eve", "Zed", "<@carol>", "don't train on me", "Mondays are the best"):
        assert real not in text
    scored = {conv.messages[s.index].content: (s.expected, s.expected_response) for s in scored_messages(conv)}
    assert scored["anyone up for pizza tonight?"] == ("silence", None)
    assert scored["how much is 15% of 84.50?"] == ("respond", "12.68")
    assert scored["ugh mondays"] == ("silence", None)
    tokyo = next(k for k in scored if "Tokyo" in k)
    assert scored[tokyo] == ("respond", "It's 21:00 in Tokyo.")
    # positive twice: the re-asked question got a follow-up addressed to the bot (the Tokyo question)
    assert report.labels == {"weak-silence": report.labels["weak-silence"], "missed": 1, "negative": 1, "positive": 2}
    names = {msg.name for msg in conv.messages if msg.role == "user"}
    assert len(names) == 4  # Alice, Bob, Carol, Dave: one pseudonym each, the same everywhere
    assert any(f"{n} you pick" in m.content for n in names for m in conv.messages)  # a name in the text, replaced
    with session_scope(engine) as s:  # stable ids: the held-out slice stays the same export after export
        export(s, tmp_path / "again.jsonl", seed=2)
    assert read_conversations(tmp_path / "again.jsonl")[0].id == conv.id


def test_export_respects_corrections_forget_and_since(logged, tmp_path: Path) -> None:
    engine, missed = logged
    with session_scope(engine) as s:
        correct(s, missed, "silence")
        forget(s, find_person(s, "Carol"))
    with session_scope(engine) as s:
        export(s, tmp_path / "a.jsonl", seed=0)
    conv = read_conversations(tmp_path / "a.jsonl")[0]
    scored = {conv.messages[x.index].content: x.expected for x in scored_messages(conv)}
    assert scored["how much is 15% of 84.50?"] == "silence"
    assert "ugh mondays" not in json.dumps(conv.to_dict()) and "I'm in" not in json.dumps(conv.to_dict())
    with session_scope(engine) as s:
        report = export(s, tmp_path / "b.jsonl", since=T0 + timedelta(days=1))
    assert report.conversations == 0


def test_cli_export(logged, tmp_path: Path, capsys) -> None:
    from bot.cli import main

    engine, _ = logged
    url = engine.url.render_as_string(hide_password=False)
    out = tmp_path / "conversations" / "logged" / "x.jsonl"
    assert main(["export", "--out", str(out), "--db", url, "--no-weak-silence", "--since", "2026-10-01"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["conversations"] == 1 and "weak-silence" not in report["labels"]
    assert read_conversations(out)
