"""The chat format: how a multi-party conversation becomes model input, loss mask, and back.

This is the one place where Chime's prompt is defined; training, the engine and evaluation import it.

Structure (rendered through the tokenizer's own chat template):

    system     a short header: the bot's name (per conversation) and, when present, tool schemas
    user       "Name: text"                       one turn per human message
    assistant  "(silence)"                        the bot stays quiet, or
    assistant  "(response) text"                  the bot speaks, or
    assistant  "(response) <tool_call>{...}</tool_call>"   the bot calls tools (one tag per call)
    tool       "name: result"                     one turn per tool result

Every human message is followed by exactly one bot turn (an implicit "(silence)" where a conversation
file has two human messages in a row), so the engine can decide after each message with one forward
pass: the decision prompt ends with the assistant header plus the tokens the two markers share
("("), and P(respond) is read from the next-token logits of "response" against "silence".

Token ids are the concatenation of per-turn tokenizations (a turn's text is tokenized alone), so a
turn boundary and the decision point are token boundaries by construction, and training and inference
see identical ids. The text of the concatenated turns equals the template's rendering of the whole
conversation (tested).

Loss mask: only the bot's own tokens are supervised: the body of each assistant turn (marker, reply
text or tool calls) and its end-of-turn token. The system header, human turns, tool results and the
assistant header are context only. `show_loss_mask` prints a rendered example with trained tokens
marked.

Untrusted text is neutralised before rendering, so a human cannot forge a bot turn: template and
special tokens are broken apart, the markers "(silence)"/"(response)" and tool-call tags written by a
human become bracketed look-alikes, invisible format characters (zero-width, bidirectional controls,
Unicode tags) are removed, names lose colons and line breaks, and long messages are truncated with a
marker. The bot's own text and tool-call arguments get their template tokens broken apart too: a model
can spell "<|im_end|>" out of ordinary tokens (repeating what someone wrote, say), and rendered as text
that would become the real token, ending the bot's turn early and forging the turns after it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from model.conversation import Conversation, Message, ToolCall
from model.errors import ChatTemplateError
from model.tool_format import (
    ParsedReply,
    ToolFormat,
    get_tool_format,
    normalize_schema,
)

_PLAIN = ToolFormat()

log = logging.getLogger(__name__)

SILENCE_MARKER = "(silence)"
RESPONSE_MARKER = "(response)"
MAX_NAME_CHARS = 48

# Private-use characters: templates leave them alone, people practically never type them.
_SLOT = "\ue000chime-slot\ue001"
_SLOT2 = "\ue000chime-body\ue001"

# The original group-chat recipe prompted untuned chat models with instructions like these; Chime uses
# them for the untuned baseline (`--prompt instructed`). Trained adapters use the short prompt.
INSTRUCTED_PROMPT = (
    "You are {bot}, an AI assistant taking part in a group chat with several people. Each user turn is "
    "one chat message, written as 'Name: text'. After EVERY message you must decide whether to speak. "
    "Most of the time you should stay quiet: people are talking to each other, not to you. "
    "Answer exactly {silence} to stay quiet. Answer {response} followed by your message only when: "
    "someone addresses you by name or @-mentions you; someone asks the group a factual question that "
    "nobody has answered and you know the answer; or the group needs a calculation, conversion or the "
    "time. Stay quiet for greetings, jokes, small talk, questions meant for another person, questions "
    "already answered, thanks right after you spoke, and when people tell you to be quiet. Never imitate "
    "the other people. Keep replies short."
)

_MARKER_RE = re.compile(r"\(\s*(silence|response)\s*\)", re.IGNORECASE)
_TOOL_TAG_RE = re.compile(r"<\s*(/?)\s*(tool_call|tool_response|tool_result|tools)\s*>", re.IGNORECASE)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_TEMPLATE_TOKEN_RE = re.compile(r"<\|([^|<>\n]{0,40})\|>")


def strip_invisible(text: str) -> str:
    """Remove format (Cf) and control (Cc) characters except newline and tab; normalise newlines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cf", "Cc", "Cs", "Co"))


@dataclass(frozen=True)
class BotTurn:
    """What the bot did after a message: stay silent, speak, or call tools."""

    kind: Literal["silence", "response"]
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def from_message(cls, msg: Message) -> BotTurn:
        assert msg.role == "assistant", f"not a bot message: {msg.role}"
        return cls(kind="response", text=msg.content.strip(), tool_calls=tuple(msg.tool_calls))

    def rest_text(self, tool_format: ToolFormat = _PLAIN) -> str:
        """The body after the marker: the reply text and/or the tool calls in `tool_format`."""
        if self.kind == "silence":
            return ""
        parts = []
        if self.text:
            parts.append(self.text)
        if self.tool_calls:
            parts.append(tool_format.render_calls(self.tool_calls))
        return (" " + " ".join(parts)) if parts else ""

    def body(self, tool_format: ToolFormat = _PLAIN) -> str:
        marker = SILENCE_MARKER if self.kind == "silence" else RESPONSE_MARKER
        return marker + self.rest_text(tool_format)


def parse_reply(generated: str, tool_format: ToolFormat = _PLAIN) -> ParsedReply:
    """Parse what the model generated after "(response)": reply text and tool calls.

    Calls that do not parse are reported in `errors`, never raised: a broken call is data.
    """
    return tool_format.parse(generated)


def parse_bot_body(body: str, tool_format: ToolFormat = _PLAIN) -> BotTurn:
    """Parse a whole bot turn body ("(silence)" or "(response) ..."); anything else counts as a response."""
    stripped = body.strip()
    if stripped.lower().startswith(SILENCE_MARKER):
        return BotTurn(kind="silence")
    if stripped.lower().startswith(RESPONSE_MARKER):
        stripped = stripped[len(RESPONSE_MARKER) :]
    parsed = parse_reply(stripped, tool_format)
    return BotTurn(kind="response", text=parsed.text, tool_calls=parsed.tool_calls)


@dataclass(frozen=True)
class TurnSpan:
    """Where a bot turn's trained tokens (body + end) sit in a rendering.

    `after` is the index of the message the turn follows: a human message for a decision, a tool result
    for the answer after tool calls (`decision` is then False).
    """

    start: int
    end: int
    kind: Literal["silence", "response"]
    after: int
    decision: bool


@dataclass
class RenderedConversation:
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    turns: list[TurnSpan] = field(default_factory=list)

    def extend(self, ids: Sequence[int], trained: bool | Sequence[bool]) -> None:
        self.input_ids.extend(ids)
        if isinstance(trained, bool):
            self.loss_mask.extend([trained] * len(ids))
        else:
            assert len(trained) == len(ids), "mask and ids differ in length"
            self.loss_mask.extend(trained)


@dataclass(frozen=True)
class BotTurnIds:
    """A bot turn as token ids: header (context), body and end (trained), trailer (context)."""

    header: list[int]  # the assistant header, e.g. "<|im_start|>assistant\n"
    body: list[int]  # marker + reply/tool calls
    end: list[int]  # end-of-turn token(s), trained
    trailer: list[int]  # what follows the end-of-turn token, e.g. "\n"

    @property
    def ids(self) -> list[int]:
        return self.header + self.body + self.end + self.trailer


class ChatFormat:
    """Renders conversations with a tokenizer's chat template. Build once per tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        max_message_chars: int = 2000,
        prompt: Literal["short", "instructed"] = "short",
        tool_format: str = "auto",
    ):
        self.tokenizer = tokenizer
        self.max_message_chars = max_message_chars
        self.prompt = prompt
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ChatTemplateError("the tokenizer has no chat template; Chime needs one to render turns")
        try:
            self.tool_format: ToolFormat = get_tool_format(tool_format, template if isinstance(template, str) else None)
        except ValueError as e:
            raise ChatTemplateError(str(e)) from e
        self._special_strings = self._collect_special_strings(tokenizer)
        self._template_tools_cache: dict[str, str | None] = {}
        self._probe_template()
        self._probe_markers()
        self.call_open_ids: list[int] = self._probe_call_opening()
        # what the call gate writes to open a call: those tokens, then the rest of the opening when a token
        # straddles its end (a tag completed, so the constrained decoder takes over at once)
        rest = (" " + (self.tool_format.call_opening() or ""))[len(self.decode(self.call_open_ids)) :]
        self.call_force_ids: list[int] = self.call_open_ids + (self.encode(rest) if self.call_open_ids and rest else [])

    # ------------------------------------------------------------------ template probing

    @staticmethod
    def _collect_special_strings(tokenizer: Any) -> list[str]:
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            content = getattr(tok, "content", None)
            if content and len(content) > 1:
                specials.add(content)
        return sorted((s for s in specials if s and len(s) > 1), key=len, reverse=True)

    def _render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools: list[dict[str, Any]] | None = None
    ) -> str:
        try:
            out = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
            )
        except Exception as e:  # templates raise all sorts of jinja errors
            raise ChatTemplateError(f"the chat template cannot render {[m['role'] for m in messages]}: {e}") from e
        if not isinstance(out, str):
            raise ChatTemplateError("apply_chat_template(tokenize=False) did not return text")
        return out

    def _diff(self, longer: str, shorter: str, what: str) -> str:
        if not longer.startswith(shorter):
            raise ChatTemplateError(f"the chat template is not prefix-stable when adding {what}")
        return longer[len(shorter) :]

    def _probe_template(self) -> None:
        system = [{"role": "system", "content": _SLOT2}]
        base = self._render(system)
        self._system_template = base
        with_user = self._render(system + [{"role": "user", "content": _SLOT}])
        user_seg = self._diff(with_user, base, "a user turn")
        if user_seg.count(_SLOT) != 1:
            raise ChatTemplateError("the chat template does not render user content verbatim")
        self._user_pre, self._user_post = user_seg.split(_SLOT)
        with_prompt = self._render(system + [{"role": "user", "content": _SLOT}], add_generation_prompt=True)
        self._gen_prompt = self._diff(with_prompt, with_user, "the generation prompt")
        with_bot = self._render(
            system + [{"role": "user", "content": _SLOT}, {"role": "assistant", "content": _SLOT2}]
        )
        bot_seg = self._diff(with_bot, with_user, "an assistant turn")
        if not bot_seg.startswith(self._gen_prompt) or bot_seg.count(_SLOT2) != 1:
            raise ChatTemplateError("the assistant turn does not start with the generation prompt")
        self._bot_pre_body, self._bot_post = bot_seg[len(self._gen_prompt) :].split(_SLOT2)
        # Tool results: the template's own "tool" role where it renders one turn per result
        # verbatim; otherwise a user turn that says it is a tool result.
        self._tool_pre: str | None = None
        self._tool_post = ""
        try:
            msgs = system + [{"role": "user", "content": _SLOT}, {"role": "assistant", "content": _SLOT2}]
            with_tool = self._render(msgs + [{"role": "tool", "content": _SLOT, "name": "t"}])
            tool_seg = self._diff(with_tool, with_bot, "a tool turn")
            if tool_seg.count(_SLOT) == 1:
                self._tool_pre, self._tool_post = tool_seg.split(_SLOT)
        except ChatTemplateError:
            log.info("chat template has no plain tool role; tool results render as user turns")
        if self._bot_post:
            post_ids = self.encode(self._bot_post)
        else:
            post_ids = []
        eos = {i for i in [getattr(self.tokenizer, "eos_token_id", None)] if i is not None}
        special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        cut = next((k + 1 for k, t in enumerate(post_ids) if t in eos or t in special_ids), len(post_ids))
        self._end_ids, self._trailer_ids = post_ids[:cut], post_ids[cut:]
        self.stop_ids: frozenset[int] = frozenset(eos | set(self._end_ids[:1]))
        if not self.stop_ids:
            raise ChatTemplateError("cannot tell which token ends an assistant turn")
        self._gen_prompt_ids = self.encode(self._gen_prompt)

    def _probe_markers(self) -> None:
        silence = self.encode(self._bot_pre_body + SILENCE_MARKER)
        response = self.encode(self._bot_pre_body + RESPONSE_MARKER)
        c = 0
        while c < min(len(silence), len(response)) and silence[c] == response[c]:
            c += 1
        if c >= min(len(silence), len(response)):
            raise ChatTemplateError("the tokenizer cannot tell (silence) from (response) by one token")
        self.decision_prefix_ids: list[int] = silence[:c]
        self.silence_token_id: int = silence[c]
        self.response_token_id: int = response[c]
        self._silence_ids = silence
        self._response_ids = response

    def _probe_call_opening(self) -> list[int]:
        """The tokens a reply that calls a tool starts with after "(response)" (the tool format's opening, as
        `bot_turn_ids` tokenizes a call turn), or [] when the format has no opening or it shares no whole
        token with a call. A prefix of the opening when a token straddles its end."""
        opening = self.tool_format.call_opening()
        if not opening:
            return []
        ids = self.encode(BotTurn(kind="response", tool_calls=(ToolCall("f", {}),)).rest_text(self.tool_format))
        target = " " + opening
        k = 0
        while k < len(ids) and target.startswith(self.decode(ids[: k + 1])):
            k += 1
        return ids[:k]

    # ------------------------------------------------------------------ text hygiene

    def encode(self, text: str) -> list[int]:
        if _SURROGATE_RE.search(text):
            # a lone surrogate (a "\ud83d" escape in a file or a request) is not text a tokenizer takes: U+FFFD
            # (a pair written as two escapes joins into its character)
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _break_special(self, text: str) -> str:
        for s in self._special_strings:
            if s in text:
                text = text.replace(s, s[0] + " " + s[1:])
        return _TEMPLATE_TOKEN_RE.sub(lambda m: "< |" + m.group(1) + "| >", text)

    def clean_text(self, text: str) -> str:
        """Neutralise a human's message text so it cannot forge turns or template tokens."""
        text = strip_invisible(text or "")
        if len(text) > self.max_message_chars:
            cut = len(text) - self.max_message_chars
            text = text[: self.max_message_chars] + f" … [{cut} more characters cut]"
        text = _MARKER_RE.sub(lambda m: f"[{m.group(1).lower()}]", text)
        text = _TOOL_TAG_RE.sub(lambda m: f"[{m.group(1)}{m.group(2).lower()}]", text)
        text = self._break_special(text)  # last: a replaced tag can join "<|" and "|>" around it
        text = text.strip()
        return text if text else "[empty message]"

    def clean_name(self, name: str) -> str:
        """A display name that cannot be confused with message text or a bot turn."""
        name = strip_invisible(name or "")
        name = " ".join(name.split())  # newlines and tabs become single spaces
        name = name.replace(":", "\ua789")  # modifier letter colon: looks alike, never splits
        name = _MARKER_RE.sub(lambda m: f"[{m.group(1).lower()}]", name)
        name = _TOOL_TAG_RE.sub(lambda m: f"[{m.group(1)}{m.group(2).lower()}]", name)
        name = self._break_special(name)  # last, as in clean_text
        name = name[:MAX_NAME_CHARS].strip()
        return name or "someone"

    def clean_bot_name(self, name: str) -> str:
        return self.clean_name(name)

    def _own_turn(self, turn: BotTurn) -> BotTurn:
        """The bot's turn as rendered: template tokens in its text and tool calls broken apart (module docstring)."""
        if not turn.text and not turn.tool_calls:
            return turn
        calls = tuple(ToolCall(self._break_special(c.name), _map_strings(c.arguments, self._break_special))
                      for c in turn.tool_calls)
        return replace(turn, text=self._break_special(turn.text), tool_calls=calls)

    # ------------------------------------------------------------------ turns as text

    def system_text(self, bot_name: str, tools: Sequence[dict[str, Any]] = ()) -> str:
        bot = self.clean_bot_name(bot_name)
        text = (
            f"You are {bot}, a member of a group chat. Each user turn is one message, written as "
            f"'Name: text'. After every message, answer {SILENCE_MARKER} to stay quiet, or "
            f"{RESPONSE_MARKER} followed by your reply when you are addressed or can help the group."
        )
        if self.prompt == "instructed":
            text = INSTRUCTED_PROMPT.format(bot=bot, silence=SILENCE_MARKER, response=RESPONSE_MARKER)
        if tools and self._template_tools(tools) is None:
            text += self.tool_format.system_section(tools, RESPONSE_MARKER)
        return text

    def _template_tools(self, tools: Sequence[dict[str, Any]]) -> str | None:
        """The system turn as the chat template itself renders it with `tools=`, or None.

        Used for families whose template lists tools (Qwen2.5, Hermes, ...); None where the template
        ignores `tools` (SmolLM2), fails, or is not prefix-stable, and for the plain format.
        """
        if self.tool_format.name == "plain" or not tools:
            return None
        key = json.dumps(list(tools), sort_keys=True)
        if key not in self._template_tools_cache:
            wrapped = [{"type": "function", "function": normalize_schema(dict(t))} for t in tools]
            result: str | None = None
            try:
                system = [{"role": "system", "content": _SLOT2}]
                with_tools = self._render(system, tools=wrapped)
                both = self._render(system + [{"role": "user", "content": _SLOT}], tools=wrapped)
                if with_tools != self._system_template and both.startswith(with_tools) and with_tools.count(_SLOT2) == 1:
                    result = with_tools
            except ChatTemplateError:
                result = None
            if len(self._template_tools_cache) > 256:
                self._template_tools_cache.clear()
            self._template_tools_cache[key] = result
        return self._template_tools_cache[key]

    def system_segment(self, bot_name: str, tools: Sequence[dict[str, Any]] = ()) -> str:
        template = self._template_tools(tools) or self._system_template
        return template.replace(_SLOT2, self.system_text(bot_name, tools))

    def parse_reply(self, generated: str) -> ParsedReply:
        """Reply text and tool calls from what the model generated after "(response)", in this model's format."""
        return self.tool_format.parse(generated)

    def human_segment(self, name: str, text: str) -> str:
        return f"{self._user_pre}{self.clean_name(name)}: {self.clean_text(text)}{self._user_post}"

    def tool_segment(self, name: str, content: str) -> str:
        tool = self.clean_name(name or "tool")
        result = self.clean_text(content)
        if self._tool_pre is not None:
            return f"{self._tool_pre}{tool}: {result}{self._tool_post}"
        return f"{self._user_pre}[tool result] {tool}: {result}{self._user_post}"

    def bot_segment(self, turn: BotTurn) -> str:
        return self._gen_prompt + self._bot_pre_body + self._own_turn(turn).body(self.tool_format) + self._bot_post

    # ------------------------------------------------------------------ turns as ids

    def system_ids(self, bot_name: str, tools: Sequence[dict[str, Any]] = ()) -> list[int]:
        return self.encode(self.system_segment(bot_name, tools))

    def human_ids(self, name: str, text: str) -> list[int]:
        return self.encode(self.human_segment(name, text))

    def tool_ids(self, name: str, content: str) -> list[int]:
        return self.encode(self.tool_segment(name, content))

    @functools.cached_property
    def human_header_ids(self) -> list[int]:
        """The fixed start of every human turn (e.g. "<|im_start|>user\n"), for idle-time prefill."""
        probe = self.encode(self._user_pre + "x: y" + self._user_post)
        head = self.encode(self._user_pre)
        return head if probe[: len(head)] == head else []

    @property
    def bot_header_ids(self) -> list[int]:
        return list(self._gen_prompt_ids)

    def bot_turn_ids(self, turn: BotTurn) -> BotTurnIds:
        marker = self._silence_ids if turn.kind == "silence" else self._response_ids
        rest = self._own_turn(turn).rest_text(self.tool_format)
        body = list(marker) + (self.encode(rest) if rest else [])
        return BotTurnIds(list(self._gen_prompt_ids), body, list(self._end_ids), list(self._trailer_ids))

    def response_marker_rest_ids(self) -> list[int]:
        """The tokens of "(response)" after the shared decision prefix."""
        return self._response_ids[len(self.decision_prefix_ids) :]

    # ------------------------------------------------------------------ whole conversations

    def bot_turns(self, conv: Conversation) -> list[tuple[Message, BotTurn | None]]:
        """Pair each message with the implicit silence that follows it (for humans not answered)."""
        out: list[tuple[Message, BotTurn | None]] = []
        for i, msg in enumerate(conv.messages):
            nxt = conv.messages[i + 1] if i + 1 < len(conv.messages) else None
            implicit = msg.is_human and (nxt is None or nxt.role != "assistant")
            out.append((msg, BotTurn(kind="silence") if implicit else None))
        return out

    def render_text(self, conv: Conversation, bot_name: str = "Chime") -> str:
        """The conversation as template text (what `render_conversation` tokenizes turn by turn)."""
        parts = [self.system_segment(conv.bot_name or bot_name, conv.tools)]
        for msg, implicit in self.bot_turns(conv):
            parts.append(self._message_segment(msg))
            if implicit is not None:
                parts.append(self.bot_segment(implicit))
        return "".join(parts)

    def _message_segment(self, msg: Message) -> str:
        if msg.role == "user":
            return self.human_segment(msg.name or "", msg.content)
        if msg.role == "tool":
            return self.tool_segment(msg.name or "tool", msg.content)
        return self.bot_segment(BotTurn.from_message(msg))

    def template_messages(self, conv: Conversation, bot_name: str = "Chime") -> list[dict[str, Any]]:
        """The same conversation as plain template messages, to check rendering against the template."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system_text(conv.bot_name or bot_name, conv.tools)}]
        for msg, implicit in self.bot_turns(conv):
            if msg.role == "user":
                out.append({"role": "user", "content": f"{self.clean_name(msg.name or '')}: {self.clean_text(msg.content)}"})
            elif msg.role == "tool":
                out.append({"role": "tool", "name": msg.name, "content": f"{self.clean_name(msg.name or 'tool')}: {self.clean_text(msg.content)}"})
            else:
                out.append({"role": "assistant", "content": self._own_turn(BotTurn.from_message(msg)).body(self.tool_format)})
            if implicit is not None:
                out.append({"role": "assistant", "content": implicit.body()})
        return out

    def render_conversation(self, conv: Conversation, bot_name: str = "Chime") -> RenderedConversation:
        """Token ids and loss mask for training: only the bot's body and end-of-turn tokens are trained."""
        out = RenderedConversation()
        out.extend(self.system_ids(conv.bot_name or bot_name, conv.tools), False)
        for i, (msg, implicit) in enumerate(self.bot_turns(conv)):
            if msg.role == "assistant":
                prev = conv.messages[i - 1] if i else None
                self._extend_bot(out, BotTurn.from_message(msg), i - 1, decision=prev is not None and prev.is_human)
            elif msg.role == "tool":
                out.extend(self.tool_ids(msg.name or "tool", msg.content), False)
            else:
                out.extend(self.human_ids(msg.name or "", msg.content), False)
            if implicit is not None:
                self._extend_bot(out, implicit, i, decision=True)
        return out

    def _extend_bot(self, out: RenderedConversation, turn: BotTurn, after: int = -1, decision: bool = False) -> None:
        ids = self.bot_turn_ids(turn)
        out.extend(ids.header, False)
        start = len(out.input_ids)
        out.extend(ids.body + ids.end, True)
        out.turns.append(TurnSpan(start, len(out.input_ids), turn.kind, after, decision))
        out.extend(ids.trailer, False)


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` (parsed JSON) with `change` applied to every string in it, keys included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {change(k) if isinstance(k, str) else k: _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, change) for v in value]
    return value


def show_loss_mask(fmt: ChatFormat, rendered: RenderedConversation) -> str:
    """Render ids as text with trained spans wrapped in ⟦ ⟧ (special tokens shown as text)."""
    pieces: list[str] = []
    run: list[int] = []
    trained_run = False
    for tok, trained in zip(rendered.input_ids + [-1], rendered.loss_mask + [not trained_run], strict=True):
        if tok != -1 and trained == trained_run:
            run.append(tok)
            continue
        if run:
            text = str(fmt.tokenizer.decode(run, skip_special_tokens=False))
            pieces.append(f"⟦{text}⟧" if trained_run else text)
        run = [tok]
        trained_run = trained
    return "".join(pieces)
