"""Tools: schemas from functions, strict validation, bounded execution, the built-ins against the corpus."""

from __future__ import annotations

import glob
import re
import time
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.conversation import ToolCall, read_conversations
from model.tools import Tool, ToolRegistry, builtin_tools, calculator, coerce, current_time, tool_from_function

REG = ToolRegistry(builtin_tools())


def run(name: str, **arguments):
    return REG.execute(ToolCall(name, arguments))


def test_builtins_reproduce_every_result_in_the_corpus():
    """The corpus was written against these tools: every calculator and conversion result matches exactly."""
    checked = 0
    for path in sorted(glob.glob("conversations/*/batch_*.jsonl")):
        for conv in read_conversations(path):
            for i, msg in enumerate(conv.messages):
                for k, call in enumerate(msg.tool_calls):
                    if call.name == "current_time":
                        continue
                    result = REG.execute(call)
                    assert result.ok and result.content == conv.messages[i + 1 + k].content, (conv.id, call)
                    checked += 1
    assert checked > 300


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("84.5*1.15/3", "32.39166667"), ("30-21", "9"), ("2**10", "1024"), ("sqrt(16)", "4"), ("round(2.675, 1)", "2.7"),
     ("10 // 3", "3"), ("-(3)", "-3"), ("2^3", "8"), ("pi*2", "6.283185307"), ("factorial(5)", "120"),
     ("5050²", "25502500"), ("(1+1)³", "8"), ("3×4÷2", "6"), ("2¹⁰", "1024")],
)
def test_calculator(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize(
    ("expression", "reason"),
    [("__import__('os').system('ls')", "unsupported"), ("9**9**9", "too large"), ("10**400", "too large"), ("1/0", "division by zero"),
     ("open('x')", "unsupported"), ("[1]*10", "unsupported"), ("x+1", "unsupported"), ("", "empty"), ("1+" * 200 + "1", "longer than"),
     ("sqrt(-1)", "sqrt"), ("factorial(1000)", "factorial"), ("(1).__class__", "unsupported"), ("2 +", "not an arithmetic")],
)
def test_calculator_rejects(expression, reason):
    result = run("calculator", expression=expression)
    assert not result.ok and reason in result.content


def test_convert_units_and_current_time():
    assert run("convert_units", value=26.2, from_unit="mile", to_unit="km").content == "42.1648 km"
    assert run("convert_units", value="100", from_unit="degF", to_unit="degC").content == "37.7778 degC"
    assert "different kinds" in run("convert_units", value=1, from_unit="kg", to_unit="km").content
    assert "unknown unit" in run("convert_units", value=1, from_unit="florps", to_unit="km").content
    text = current_time("Asia/Tokyo")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d \(\w+day\), Asia/Tokyo, UTC\+09:00", text)
    assert "unknown time zone" in run("current_time", timezone="Mars/Olympus").content
    assert "unknown time zone" in run("current_time", timezone="../../etc/passwd").content


@pytest.mark.parametrize("written, key", [("Asia/ Seoul", "Asia/Seoul"), (" america/new york ", "America/New_York"),
                                          ("EUROPE / BERLIN", "Europe/Berlin"), ("utc", "UTC")])
def test_current_time_reads_zone_names_leniently(written, key):
    assert f", {key}, UTC" in run("current_time", timezone=written).content


@pytest.mark.parametrize("written", ["Asia/Seoul/..", "/etc/localtime", "Asia", "Europe/Berlin; rm", "x" * 80])
def test_current_time_looks_up_only_zone_names(written):
    assert "unknown time zone" in run("current_time", timezone=written).content


def test_validation_coerces_losslessly_and_rejects_with_reasons():
    assert coerce("12", {"type": "integer"}, "x") == 12 and coerce(3.0, {"type": "integer"}, "x") == 3
    assert coerce("1.5e3", {"type": "number"}, "x") == 1500.0 and coerce(12, {"type": "string"}, "x") == "12"
    assert coerce("true", {"type": "boolean"}, "x") is True
    for value, schema in [("sqrt of 3342398", {"type": "number"}), (3.5, {"type": "integer"}), (True, {"type": "integer"}),
                          ("nan", {"type": "number"}), ("inf", {"type": "number"}), ({"a": 1}, {"type": "string"}),
                          ("yes please", {"type": "boolean"}), ("c", {"enum": ["a", "b"]})]:
        with pytest.raises(Exception, match="must"):
            coerce(value, schema, "x")
    bad = run("convert_units", value="sqrt of 3342398", from_unit="m", to_unit="km")
    assert not bad.ok and "must be a number" in bad.content
    assert "unknown argument" in run("calculator", expression="1", extra=1).content
    assert "missing argument" in run("convert_units", value=1, from_unit="m").content
    assert "unknown tool" in run("rm_rf", path="/").content


def test_tool_from_function_schema_and_limits():
    calls = []

    def weather(city: str, days: int = 1, units: Literal["metric", "imperial"] = "metric") -> str:
        """Forecast for a city.

        Args:
            city: the city name
            days: how many days ahead
        """
        calls.append((city, days, units))
        return f"{city}: sunny for {days} day(s)"

    tool = tool_from_function(weather)
    assert tool.description == "Forecast for a city."
    assert tool.parameters["required"] == ["city"]
    assert tool.parameters["properties"]["days"] == {"type": "integer", "description": "how many days ahead"}
    assert tool.parameters["properties"]["units"]["enum"] == ["metric", "imperial"]
    reg = ToolRegistry([tool])
    assert reg.execute(ToolCall("weather", {"city": "Oslo", "days": "3"})).content == "Oslo: sunny for 3 day(s)"
    assert not reg.execute(ToolCall("weather", {"city": "Oslo", "units": "kelvin"})).ok
    assert calls == [("Oslo", 3, "metric")]

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="docstring"):
        tool_from_function(undocumented)

    def slow() -> str:
        """Sleeps."""
        time.sleep(1.0)
        return "late"

    def broken() -> str:
        """Fails."""
        raise RuntimeError("boom")

    reg = ToolRegistry([Tool("slow", "Sleeps.", {"type": "object", "properties": {}}, slow, timeout_s=0.1), tool_from_function(broken)])
    assert "timed out" in reg.execute(ToolCall("slow", {})).content
    assert reg.execute(ToolCall("broken", {})).content == "error: broken failed: RuntimeError: boom"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["calculator", "convert_units", "current_time", "rm", ""]) | st.text(max_size=20),
       arguments=st.dictionaries(st.sampled_from(["expression", "value", "from_unit", "to_unit", "timezone", "x"]) | st.text(max_size=8),
                                 json_values, max_size=4))
def test_fuzz_execute_never_raises_and_runs_only_listed_tools(name, arguments):
    result = REG.execute(ToolCall(name, arguments))
    assert isinstance(result.content, str)
    if result.ok:
        assert result.name in REG.names()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/%.() ^e", max_size=40))
def test_fuzz_calculator_expressions(expression):
    result = run("calculator", expression=expression)
    assert result.ok or result.content.startswith("error: ")


def _scripted(engine, replies):
    from model.engine import Reply

    queue = list(replies)
    seen_before = []

    def generate(channel_id, max_new_tokens=None, min_new_tokens=0):
        seen_before.append(engine.channel(channel_id).turns[-1].kind)
        text, calls = queue.pop(0)
        return Reply(text=text, tool_calls=calls, errors=[], n_tokens=5, ms=1.0)

    engine.generate = generate
    return seen_before


def test_engine_tool_loop_runs_listed_tools_and_answers(tiny_engine_factory):
    from model.engine import IncomingMessage

    engine = tiny_engine_factory(threshold=0.0)
    seen = _scripted(engine, [("", [ToolCall("calculator", {"expression": "84.5*1.15/3"}), ToolCall("rm_rf", {"path": "/"})]),
                              ("That's 32.39 each.", [])])
    d = engine.handle("c", IncomingMessage("ana", "what's a 15% tip on 84.50 split three ways?"))
    assert d.decision == "respond" and d.response == "That's 32.39 each."
    assert [(r.name, r.ok, r.content) for r in d.tool_results] == [
        ("calculator", True, "32.39166667"), ("rm_rf", False, "error: unknown tool 'rm_rf'; available: calculator, convert_units, current_time")]
    assert seen == ["human", "tool"]  # the second generation sees the tool results
    kinds = [t.kind for t in engine.channel("c").turns]
    assert kinds[-4:] == ["bot", "tool", "tool", "bot"]
    assert d.to_json()["tool_results"][0]["content"] == "32.39166667"


def test_engine_tool_rounds_are_bounded_and_tools_can_be_off(tiny_engine_factory):
    from model.engine import IncomingMessage

    engine = tiny_engine_factory(threshold=0.0, max_tool_rounds=2)
    loop = ("", [ToolCall("calculator", {"expression": "1+1"})])
    _scripted(engine, [loop, loop, loop])
    d = engine.handle("c", IncomingMessage("ana", "spin"))
    assert len(d.tool_results) == 2 and d.response == ""
    off = tiny_engine_factory(threshold=0.0, tools=[])
    _scripted(off, [loop])
    d = off.handle("c", IncomingMessage("ana", "1+1?"))
    assert off.tools is None and d.tool_results == [] and d.tool_calls == loop[1]
    with pytest.raises(Exception, match="tools"):
        tiny_engine_factory(tools=["os:system"])


def test_tool_calls_match_by_result():
    from training.evaluate import count_matching_calls, count_matching_results

    registry = ToolRegistry(builtin_tools())
    expected = [ToolCall("calculator", {"expression": "84.5*1.15/3"}), ToolCall("convert_units", {"value": 5, "from_unit": "mile", "to_unit": "km"})]
    predicted = [ToolCall("convert_units", {"value": "5", "from_unit": "mile", "to_unit": "km"}),
                 ToolCall("calculator", {"expression": "84.5 * 1.15 / 3"})]  # fmt: skip
    assert count_matching_calls(expected, predicted) == 0  # neither is the same text: "5" for 5, spaces
    assert count_matching_results(expected, predicted, registry) == 2
    assert count_matching_results(expected, [ToolCall("calculator", {"expression": "84.5*1.15"})], registry) == 0
    assert count_matching_results([ToolCall("own", {"a": 1})], [ToolCall("own", {"a": 1.0})], registry) == 1  # unregistered: exact
    assert count_matching_results(expected, predicted, None) == 0
