"""The storage commands of `chime`: db, consent, opt-out, forget, label, decisions, export.

    chime db upgrade [--db URL]                  create or migrate the database to the current schema
    chime db current                             the schema revision the database is at
    chime db purge --older-than-days N           retention: delete older messages and what derives from them
    chime consent SERVER on|off [--moderation-log on|off]   training consent for a server
    chime opt-out PERSON [--undo]                a person's messages are never exported
    chime forget PERSON [--platform P]           delete a person's messages and derived rows
    chime decisions [--limit 20] [--channel C]   recent decisions, with message ids for `label`
    chime label MESSAGE_ID respond|silence [--reply TEXT]   correct a decision
    chime export [--since DATE] --out FILE.jsonl consented, labelled conversations, pseudonymised

`--db` defaults to $DATABASE_URL, else the SQLite file in Chime's data directory ($CHIME_HOME).
"""

from __future__ import annotations

import argparse
import getpass
import json
from datetime import datetime, timezone
from typing import Any

from model.errors import ChimeError


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help="database URL (default: $DATABASE_URL, else sqlite in $CHIME_HOME)")


def _engine(args: argparse.Namespace) -> Any:
    from model.storage.db import make_engine, upgrade

    url = upgrade(args.db)  # every command works on a current schema
    return make_engine(url)


def add_arguments(sub: Any) -> None:
    p = sub.add_parser("db", help="database: upgrade (migrate), current revision, purge old rows")
    p.add_argument("action", choices=["upgrade", "current", "purge"])
    p.add_argument("--older-than-days", type=float, help="purge: delete messages older than this many days")
    _db_arg(p)
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("consent", help="turn training on the messages of a server on or off (administrators)")
    p.add_argument("server", help="server key (discord:123), platform id or name")
    p.add_argument("state", choices=["on", "off"])
    p.add_argument("--moderation-log", choices=["on", "off"], help="keep opted-out people's messages for moderation")
    p.add_argument("--platform")
    _db_arg(p)
    p.set_defaults(func=cmd_consent)

    p = sub.add_parser("opt-out", help="exclude a person's messages from training exports (or --undo)")
    p.add_argument("person", help="person key (discord:123), platform id or display name")
    p.add_argument("--undo", action="store_true", help="opt back in")
    p.add_argument("--platform")
    _db_arg(p)
    p.set_defaults(func=cmd_opt_out)

    p = sub.add_parser("forget", help="delete a person's messages and everything derived from them")
    p.add_argument("person", help="person key (discord:123), platform id or display name")
    p.add_argument("--platform", help="only look on this platform (discord, local)")
    _db_arg(p)
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("decisions", help="recent decisions with their message ids")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--channel", help="channel key or platform id")
    p.add_argument("--json", action="store_true")
    _db_arg(p)
    p.set_defaults(func=cmd_decisions)

    p = sub.add_parser("label", help="correct the decision after a message (respond or silence)")
    p.add_argument("message_id", help="the message id (from `chime decisions`; a unique prefix is enough)")
    p.add_argument("expect", choices=["respond", "silence"])
    p.add_argument("--reply", help="the reply the bot should have given (needed for respond when it stayed silent)")
    _db_arg(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("export", help="write consented, labelled conversations in the shared format")
    p.add_argument("--out", required=True, help="e.g. conversations/logged/NAME.jsonl")
    p.add_argument("--since", help="only conversations starting at or after this date (YYYY-MM-DD or ISO time)")
    p.add_argument("--no-weak-silence", action="store_true", help="drop unconfirmed silences (see training/labels.py)")
    p.add_argument("--seed", type=int, help="seed of the pseudonym mapping (default: random per export)")
    _db_arg(p)
    p.set_defaults(func=cmd_export)


def parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError as e:
        raise ChimeError(f"--since: not a date: {value!r}") from e
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def cmd_db(args: argparse.Namespace) -> int:
    from model.storage.db import current_revision, head_revision, safe_url, session_scope, upgrade

    if args.action == "upgrade":
        url = upgrade(args.db)
        print(f"{safe_url(url)}: at revision {current_revision(url)} (head {head_revision()})")
        return 0
    if args.action == "current":
        rev = current_revision(args.db)
        print(json.dumps({"revision": rev, "head": head_revision(), "current": rev == head_revision()}))
        return 0
    if args.older_than_days is None:
        raise ChimeError("db purge needs --older-than-days N")
    from model.storage.admin import purge_older_than

    with session_scope(_engine(args)) as s:
        n = purge_older_than(s, args.older_than_days)
    print(f"purged {n} messages older than {args.older_than_days:g} days")
    return 0


def cmd_consent(args: argparse.Namespace) -> int:
    from model.storage.admin import find_server, set_training_consent
    from model.storage.db import session_scope

    with session_scope(_engine(args)) as s:
        server = find_server(s, args.server, args.platform)
        set_training_consent(s, server, args.state == "on", by=f"cli:{getpass.getuser()}",
                             log_opted_out=None if args.moderation_log is None else args.moderation_log == "on")
        print(f"{server.id}: training consent {'on' if server.training_consent else 'off'}, "
              f"opted-out people's messages {'kept for moderation' if server.log_opted_out else 'not logged'}")
    return 0


def cmd_opt_out(args: argparse.Namespace) -> int:
    from model.storage.admin import find_person, set_opt_out
    from model.storage.db import session_scope

    with session_scope(_engine(args)) as s:
        person = find_person(s, args.person, args.platform)
        set_opt_out(s, person, not args.undo)
        print(f"{person.id}: {'opted out' if person.opted_out else 'opted in'}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from model.storage.admin import find_person, forget
    from model.storage.db import session_scope

    with session_scope(_engine(args)) as s:
        report = forget(s, find_person(s, args.person, args.platform))
    print(f"{report.person}: deleted {report.messages} messages, {report.bot_replies} bot replies to them and "
          f"{report.feedback} reactions; excluded from future logging for training and from exports")
    return 0


def cmd_decisions(args: argparse.Namespace) -> int:
    from model.storage.admin import recent_decisions
    from model.storage.db import session_scope

    with session_scope(_engine(args)) as s:
        rows = recent_decisions(s, args.limit, args.channel)
        out = [{"message_id": msg.id, "channel": msg.channel_id, "name": msg.display_name, "text": msg.content[:120],
                "decision": d.decision, "p_respond": None if d.p_respond is None else round(d.p_respond, 4), "adapter": d.adapter_version,
                "reply": r.text[:120] if r else None, "at": msg.created_at.isoformat()} for msg, d, r in rows]
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=1))
        return 0
    for row in reversed(out):
        reply = f"  -> {row['reply']}" if row["reply"] is not None else ""
        p = "  -  " if row["p_respond"] is None else f"{row['p_respond']:.2f}"
        print(f"{row['message_id'][:10]}  {row['decision']:8} p={p}  {row['name']}: {row['text']}{reply}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from model.storage.admin import correct
    from model.storage.db import session_scope

    with session_scope(_engine(args)) as s:
        fb = correct(s, args.message_id, args.expect, args.reply, by=f"cli:{getpass.getuser()}")
        print(f"message {fb.message_id}: corrected to {args.expect}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.storage.db import session_scope
    from training.export import export
    from training.labels import LabelRules

    with session_scope(_engine(args)) as s:
        report = export(s, args.out, since=parse_since(args.since), rules=LabelRules(weak_silence=not args.no_weak_silence),
                        seed=args.seed)
    print(json.dumps(report.to_dict(), ensure_ascii=False))
    return 0
