"""Tool formats per model family, retrieval of tools for the prompt, and tool-call budgets."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.chat_format import BotTurn, ChatFormat
from model.conversation import Conversation, Message, ToolCall
from model.tool_format import FORMATS, detect_tool_format, get_tool_format, normalize_schema
from model.tool_retrieval import ToolRetriever
from model.tools import ToolBudget

WEATHER = {
    "name": "weather.get",
    "description": "Current weather for a city.",
    "parameters": {"type": "dict", "properties": {"city": {"type": "string", "description": "City, country"},
                                                  "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]},
}  # fmt: skip
STOCK = {"name": "get_stock_price", "description": "Latest price of a stock ticker.",
         "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]}}  # fmt: skip
FLIGHTS = {"name": "searchFlights", "description": "Search flights between two airports on a date.",
           "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"},
                                                           "date": {"type": "string"}}, "required": ["origin", "destination"]}}  # fmt: skip
AREA = {"name": "geometry.circle_area", "description": "Area of a circle from its radius.",
        "parameters": {"type": "object", "properties": {"radius": {"type": "number"}}, "required": ["radius"]}}  # fmt: skip

CALLS = (ToolCall("weather.get", {"city": "Oslo, Norway"}), ToolCall("get_stock_price", {"ticker": "NVDA"}))

# A Qwen2.5-style template (Hermes tool calling): tools rendered into the system turn.
HERMES_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_parses_back_what_it_renders(name: str) -> None:
    fmt = FORMATS[name]()
    rendered = fmt.render_calls(CALLS)
    parsed = fmt.parse("Checking both. " + rendered)
    assert parsed.tool_calls == CALLS and parsed.errors == ()
    assert parsed.text == "Checking both."
    assert fmt.parse("just words").tool_calls == () and fmt.parse("just words").text == "just words"


def test_family_call_syntax() -> None:
    assert FORMATS["plain"]().render_calls(CALLS[:1]) == '<tool_call>{"name": "weather.get", "arguments": {"city": "Oslo, Norway"}}</tool_call>'
    assert FORMATS["hermes"]().render_calls(CALLS[:1]) == (
        '<tool_call>\n{"name": "weather.get", "arguments": {"city": "Oslo, Norway"}}\n</tool_call>')
    assert FORMATS["llama3"]().render_calls(CALLS) == (
        '{"name": "weather.get", "parameters": {"city": "Oslo, Norway"}}; {"name": "get_stock_price", "parameters": {"ticker": "NVDA"}}')
    assert FORMATS["glm4"]().render_calls(CALLS[:1]) == '\nweather.get\n{"city": "Oslo, Norway"}'
    # Llama's <|python_tag|> prefix and bare JSON; an object that is not a call is an error, not a call
    llama = FORMATS["llama3"]()
    assert llama.parse('<|python_tag|>{"name": "get_stock_price", "parameters": {"ticker": "X"}}').tool_calls == (
        ToolCall("get_stock_price", {"ticker": "X"}),)
    assert llama.parse('{"city": "Oslo"}').errors == ("a JSON object that is not a tool call",)
    assert llama.parse('{"name": "f", "parameters": {').errors == ("tool call is not valid JSON",)
    glm = FORMATS["glm4"]()
    assert glm.parse("weather.get\n{not json").errors and glm.parse("weather.get\n{not json").tool_calls == ()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_system_sections_list_every_tool(name: str) -> None:
    section = FORMATS[name]().system_section([WEATHER, {"type": "function", "function": STOCK}], "(response)")
    assert "weather.get" in section and "get_stock_price" in section and "(response)" in section
    assert '"dict"' not in section  # BFCL-style type names are normalised


def test_plain_signatures_are_compact() -> None:
    line = FORMATS["plain"]().signature(normalize_schema(WEATHER))
    assert line == 'weather.get(city: string, unit?: "C"|"F"): Current weather for a city. [city: City, country]'


def test_normalize_schema() -> None:
    schema = normalize_schema({"type": "dict", "properties": {"x": {"type": "float"}, "xs": {"type": "tuple", "items": {"type": "integer"}},
                                                             "y": {"type": "any"}}})  # fmt: skip
    assert schema == {"type": "object", "properties": {"x": {"type": "number"}, "xs": {"type": "array", "items": {"type": "integer"}}, "y": {}}}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (HERMES_TEMPLATE, "hermes"),
        ("{{ '<|python_tag|>' }}{{ 'Environment: ipython' }}", "llama3"),
        ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>{% endfor %}<|observation|>", "glm4"),
        ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", "plain"),
        (None, "plain"),
    ],
)
def test_detect_tool_format(template: str | None, expected: str) -> None:
    assert detect_tool_format(template) == expected
    assert get_tool_format("auto", template).name == expected


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown tool format"):
        get_tool_format("xml")


NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,20}", fullmatch=True)
VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=3), max_leaves=5)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(fmt=st.sampled_from(sorted(FORMATS)), calls=st.lists(
    st.builds(ToolCall, NAMES, st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), VALUES, max_size=3)),
    min_size=1, max_size=3))  # fmt: skip
def test_fuzz_round_trip(fmt: str, calls: list[ToolCall]) -> None:
    f = FORMATS[fmt]()
    assert f.parse(f.render_calls(calls)).tool_calls == tuple(calls)


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(sorted(FORMATS)), text=st.text(alphabet=st.sampled_from(list('{}[]":;, \nab<>/_tool_call|1')), max_size=80))
def test_fuzz_parsers_never_raise(fmt: str, text: str) -> None:
    parsed = FORMATS[fmt]().parse(text)
    assert all(isinstance(c.name, str) and isinstance(c.arguments, dict) for c in parsed.tool_calls)
    assert len(parsed.tool_calls) <= 16


# ---------------------------------------------------------------------------------------------- templates


@pytest.fixture()
def hermes_format(tiny_tokenizer) -> ChatFormat:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = HERMES_TEMPLATE
    return ChatFormat(tok)


def test_template_with_tools_renders_the_system_turn(hermes_format: ChatFormat) -> None:
    fmt = hermes_format
    assert fmt.tool_format.name == "hermes"
    conv = Conversation(
        messages=[Message("user", "Chime, weather in Oslo?", name="ana"),
                  Message("assistant", tool_calls=[CALLS[0]]), Message("tool", '{"temp": 3}', name="weather.get"),
                  Message("assistant", "3 degrees."), Message("user", "brr", name="ben")],
        tools=[WEATHER, STOCK],
    )  # fmt: skip
    text = fmt.render_text(conv)
    tools = [{"type": "function", "function": normalize_schema(t)} for t in conv.tools]
    assert text == fmt.tokenizer.apply_chat_template(fmt.template_messages(conv), tokenize=False, tools=tools)
    system = fmt.system_segment("Chime", conv.tools)
    assert system.startswith("<|im_start|>system\nYou are Chime,") and "# Tools" in system
    assert json.dumps(tools[0]) in system and "Tools you can call" not in system  # the template's, not ours
    assert '(response) <tool_call>\n{"name": "weather.get"' in text
    assert "<tool_response>\nweather.get: {\"temp\": 3}\n</tool_response>" in text
    assert fmt.parse_reply(fmt.tool_format.render_calls(CALLS)).tool_calls == CALLS
    # the ids are still the concatenation of per-turn ids (the loss mask relies on it)
    rendered = fmt.render_conversation(conv)
    assert fmt.tokenizer.decode(rendered.input_ids) == text


def test_templates_without_tool_support_get_the_plain_section(tiny_format: ChatFormat) -> None:
    assert tiny_format.tool_format.name == "plain"
    system = tiny_format.system_segment("Chime", [WEATHER])
    assert "Tools you can call:\n- weather.get(city: string" in system
    assert BotTurn("response", "", CALLS[:1]).body(tiny_format.tool_format) == (
        '(response) <tool_call>{"name": "weather.get", "arguments": {"city": "Oslo, Norway"}}</tool_call>')


# ---------------------------------------------------------------------------------------------- retrieval


def test_retriever_ranks_by_name_and_description() -> None:
    tools = [WEATHER, STOCK, FLIGHTS, AREA]
    r = ToolRetriever(tools)
    assert [t["name"] for t in r.select("what's the weather like in Oslo", 1)] == ["weather.get"]
    assert [t["name"] for t in r.select("any cheap flights from LHR to JFK?", 1)] == ["searchFlights"]
    assert [t["name"] for t in r.select("area of a circle with radius 3", 1)] == ["geometry.circle_area"]
    assert [t["name"] for t in r.select("NVDA stock price", 2)][0] in ("weather.get", "get_stock_price")
    assert "get_stock_price" in [t["name"] for t in r.select("NVDA stock price", 2)]
    assert r.select("anything", 10) == tools  # everything fits: all, in order
    picked = r.select("flights and weather", 2)
    assert [t["name"] for t in picked] == ["weather.get", "searchFlights"]  # registry order


def test_training_retrieval_keeps_called_tools() -> None:
    from training.dataset import with_prompt_tools

    conv = Conversation(
        messages=[Message("user", "ugh what a week", name="a"), Message("user", "Chime, NVDA price?", name="b"),
                  Message("assistant", tool_calls=[ToolCall("get_stock_price", {"ticker": "NVDA"})]),
                  Message("tool", "120", name="get_stock_price"), Message("assistant", "120 dollars.")],
    )  # fmt: skip
    shown = with_prompt_tools(conv, [WEATHER, FLIGHTS, AREA, STOCK], max_prompt_tools=1).tools
    assert [t["name"] for t in shown] == ["get_stock_price"]
    assert with_prompt_tools(conv, [WEATHER], 8).tools == [WEATHER]  # default tools when the file has none
    own = Conversation(messages=conv.messages, tools=[STOCK])
    assert with_prompt_tools(own, [WEATHER], 8).tools == [STOCK]  # the file's own tools win


def test_engine_retrieves_tools_per_message_when_many_are_registered(tiny_engine_factory) -> None:
    from model.engine import IncomingMessage

    engine = tiny_engine_factory(max_prompt_tools=1)  # three built-ins, one fits
    engine.decide("c", IncomingMessage("ana", "what time is it in Tokyo right now?"))
    ch = engine.channel("c")
    assert [t["name"] for t in ch.tools] == ["current_time"]
    assert "current_time(timezone: string)" in engine.fmt.decode(ch.system_ids)
    engine.decide("c", IncomingMessage("ben", "and how many km is 26.2 miles? convert it"))
    engine.decide("c", IncomingMessage("ana", "convert 5 miles to km too"))
    engine.decide("c", IncomingMessage("ben", "miles to km, convert the units"))
    assert [t["name"] for t in engine.channel("c").tools] == ["convert_units"]
    # a file's own tools are never re-chosen
    engine.channel("own", tools=[WEATHER])
    engine.decide("own", IncomingMessage("ana", "what time is it in Tokyo?"))
    assert engine.channel("own").tools == [WEATHER]


# ---------------------------------------------------------------------------------------------- budgets


def test_budget_per_user_and_channel_with_a_sliding_window() -> None:
    now = [0.0]
    budget = ToolBudget(per_user=2, per_channel=3, window_s=60, clock=lambda: now[0])
    assert budget.take("ana", "c") is None and budget.take("ana", "c") is None
    assert "ana may trigger 2 calls per 1 minutes" in (budget.take("ana", "c") or "")
    assert "ana may trigger" in (budget.take("ana", "other") or "")  # a person's budget spans channels
    assert budget.take("ben", "c") is None
    assert "this channel allows 3 calls" in (budget.take("cy", "c") or "")
    now[0] = 61.0
    assert budget.take("ana", "c") is None  # the window slid
    assert ToolBudget(None, None).take("x", "y") is None


def test_engine_refuses_calls_over_budget_without_running_them(tiny_engine_factory) -> None:
    from model.engine import IncomingMessage, Reply

    engine = tiny_engine_factory(threshold=0.0, tool_calls_per_user_per_hour=1, max_tool_rounds=1)
    ran: list[str] = []
    original = engine.tools.execute
    engine.tools.execute = lambda call, caller=None: ran.append(call.name) or original(call, caller)
    replies = [("", [ToolCall("calculator", {"expression": "1+1"}), ToolCall("calculator", {"expression": "2+2"})]), ("2", [])]

    def generate(channel_id, max_new_tokens=None, min_new_tokens=0):
        text, calls = replies.pop(0)
        return Reply(text=text, tool_calls=calls, errors=[], n_tokens=3, ms=1.0)

    engine.generate = generate
    d = engine.handle("c", IncomingMessage("mallory", "compute two things", user_id="u1"))
    assert [r.ok for r in d.tool_results] == [True, False] and ran == ["calculator"]
    assert d.tool_results[1].content.startswith("error: tool-call budget used up: u1 may trigger 1 calls")
