"""The terminal simulator: a multi-user chat where you type as several people and watch Chime decide.

    chime simulate                      interactive: type `alice: who's up for pizza?`
    chime simulate --script chat.txt    replay a transcript (one `Name: text` per line)
    chime simulate --script chat.txt --json

After every message it shows what Chime decided, its probability of responding, the reply when it
speaks, and how long the decision took.

Everything is logged (unless `--no-log`) to Chime's database as the "local" platform: one server
("local"), the channel "simulator", one person per name. The person running the simulator is its
administrator, so training consent is on and `chime export` includes these conversations. `/react` and
`/delete` give the label rules something to work with (training/labels.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TextIO

from rich.console import Console
from rich.markup import escape

from model.engine import Decision, Engine, IncomingMessage
from model.errors import ChimeError
from model.storage.log import ChatLog, Ref

CHANNEL = "simulator"
SERVER = Ref("local", "local simulator")
# "alice: text" switches speaker; the colon must be followed by a space so URLs stay messages.
_SPEAKER_RE = re.compile(r"^([^:\s/][^:]{0,31}):\s+(.*)$", re.DOTALL)

HELP = """\
Type a message as someone: [bold]alice: who's up for pizza?[/] (the first colon separates the name),
or just type text to speak as the current speaker. Address the bot with [bold]@{bot}[/].
Commands:
  /as NAME        switch the current speaker
  /threshold P    set talkativeness (respond when P(respond) >= P)
  /react EMOJI    react to Chime's last reply (👍 good, 👎 it should have kept quiet)
  /delete         delete Chime's last reply (it should have kept quiet)
  /history        show the conversation so far
  /reset          start a new conversation
  /help           this help
  /quit           leave (Ctrl-D works too)"""


class SimulatorLog:
    """Logs the simulator's messages and decisions to a `ChatLog` and remembers Chime's last reply."""

    def __init__(self, chat_log: ChatLog, bot_name: str, channel: str = CHANNEL):
        self.chat_log = chat_log
        self.bot_name = bot_name
        self.channel = Ref(channel, channel)
        self.last_reply: str | None = None  # platform id of Chime's last reply

    def record(self, engine: Engine, d: Decision, at: datetime) -> None:
        mid = self.chat_log.message(server=SERVER, channel=self.channel, author=Ref(d.name, d.name), content=d.content,
                                    addressed=d.addressed, bot_name=self.bot_name, at=at)
        bot_mid = None
        if d.decision == "respond":
            bot_mid = self.chat_log.message(server=SERVER, channel=self.channel, author=None, content=d.response or "",
                                            bot_name=self.bot_name)
            self.last_reply = bot_mid  # the simulator's platform ids are the message ids
        self.chat_log.decision(mid, d, adapter_version=d.adapter_version or engine.adapter_version, model=engine.model_name,
                               bot_message_id=bot_mid)


def replay(engine: Engine, lines: Iterable[tuple[str, str]], channel: str = CHANNEL,
           log: SimulatorLog | None = None) -> Iterable[Decision]:
    """Feed `(name, text)` messages through the engine, yielding each decision (with any reply)."""
    for name, text in lines:
        at = datetime.now(timezone.utc)
        d = engine.handle(channel, IncomingMessage(name=name, content=text))
        if log is not None:
            log.record(engine, d, at)
        yield d


def format_decision(d: Decision, bot_name: str) -> str:
    """One or two lines of rich markup describing a decision."""
    timing = f"{d.latency_ms:.0f} ms"
    if d.decision == "silence":
        return f"  [dim]{escape(bot_name)} · silent · p={d.p_respond:.2f} · {timing}[/]"
    why = " · addressed" if d.addressed else ""
    reply_time = f" (+{d.reply_ms:.0f} ms reply)" if d.reply_ms is not None else ""
    head = f"  [cyan]{escape(bot_name)} · responds · p={d.p_respond:.2f}{why} · {timing}{reply_time}[/]"
    body = escape(d.response or "") if (d.response or "").strip() else "[dim](empty reply)[/]"
    trace = ""
    results = list(d.tool_results)
    for i, call in enumerate(d.tool_calls):
        trace += f"\n    [yellow]tool call[/] {escape(call.name)}({escape(json.dumps(call.arguments, ensure_ascii=False))})"
        if i < len(results):
            colour = "green" if results[i].ok else "red"
            trace += f" [{colour}]→ {escape(results[i].content)}[/]"
    return f"{head}{trace}\n  [bold cyan]{escape(bot_name)}:[/] {body}"


def run_script(engine: Engine, lines: list[tuple[str, str]], as_json: bool, out: TextIO, console: Console,
               log: SimulatorLog | None = None) -> None:
    for d in replay(engine, lines, log=log):
        if as_json:
            out.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
            out.flush()
        else:
            console.print(f"[bold]{escape(d.name)}:[/] {escape(d.content)}")
            console.print(format_decision(d, engine.config.bot_name))


def run_interactive(engine: Engine, console: Console, read: Callable[[str], str] = input,
                    log: SimulatorLog | None = None) -> None:
    bot = engine.config.bot_name
    console.print(f"[bold]Chime simulator[/] · model {escape(engine.model_name)} · adapter {engine.adapter or 'none'} · "
                  f"threshold {engine.config.threshold:.2f} (named {engine.config.named_threshold or engine.config.threshold:.2f})")
    console.print(HELP.format(bot=escape(bot)))
    speaker = "alice"
    history: list[str] = []
    while True:
        try:
            line = read(f"[{speaker}] > ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line[1:].partition(" ")
            arg = arg.strip()
            if cmd in ("quit", "exit", "q"):
                return
            if cmd == "help":
                console.print(HELP.format(bot=escape(bot)))
            elif cmd == "as" and arg:
                speaker = arg
                console.print(f"  [dim]now speaking as {escape(speaker)}[/]")
            elif cmd == "threshold":
                try:
                    value = float(arg)
                    if not 0 <= value <= 1:
                        raise ValueError
                except ValueError:
                    console.print("  [red]usage: /threshold P with P between 0 and 1[/]")
                    continue
                engine.config.threshold = value
                console.print(f"  [dim]threshold set to {value:.2f} (messages naming {escape(bot)} keep "
                              f"{engine.config.named_threshold or value:.2f})[/]")
            elif cmd == "reset":
                engine.reset(CHANNEL)
                history.clear()
                console.print("  [dim]new conversation[/]")
            elif cmd in ("react", "delete"):
                if log is None or log.last_reply is None:
                    console.print(f"  [red]nothing to {cmd}: {escape(bot)} has not replied yet (or logging is off)[/]")
                    continue
                if cmd == "react":
                    log.chat_log.reaction(log.channel.platform_id, log.last_reply, Ref(speaker, speaker), arg or "👍")
                    console.print(f"  [dim]{escape(speaker)} reacted {escape(arg or '👍')} to {escape(bot)}'s last reply[/]")
                else:
                    log.chat_log.delete(log.channel.platform_id, log.last_reply)
                    log.last_reply = None
                    console.print(f"  [dim]{escape(bot)}'s last reply deleted[/]")
            elif cmd == "history":
                console.print("\n".join(history) or "  [dim](empty)[/]")
            else:
                console.print(f"  [red]unknown command /{escape(cmd)}; /help lists them[/]")
            continue
        name, text = speaker, line
        match = _SPEAKER_RE.match(line)
        if match:
            name, text = match.group(1).strip(), match.group(2)
            speaker = name
        try:
            d = next(iter(replay(engine, [(name, text)], log=log)))
        except ChimeError as e:
            console.print(f"  [red]error: {escape(str(e))}[/]")
            continue
        history.append(f"{name}: {text}")
        if d.decision == "respond":
            history.append(f"{bot}: {d.response or ''}")
        console.print(format_decision(d, bot))
