"""One call per item of a said list (model/said_lists.py): "5, 10 and 15" asks for three calls, not one."""

from __future__ import annotations

from typing import Any

import pytest

from model.conversation import ToolCall
from model.said_lists import one_call_per_said_item
from model.tool_format import ParsedReply


def _tool(name: str, required: str = "", **types: Any) -> dict[str, Any]:
    properties = {k: v if isinstance(v, dict) else {"type": v} for k, v in types.items()}
    return {"name": name, "parameters": {"type": "object", "properties": properties,
                                         "required": required.split() or list(properties)}}  # fmt: skip


FACTORIAL = _tool("factorial", number="integer")
WEATHER = _tool("weather", "location", location="string", hours="integer", units={"type": "string", "enum": ["C", "F"]})
RESISTANCE = _tool("resistance", length="number", area="number", material="string")
DISTANCE = _tool("distance", origin="string", destination="string")
TAX = _tool("tax", amount="number", city="string", state="string")
PYTHAGORAS = _tool("pythagoras", a="integer", b="integer")
CASE = _tool("case", case_number="string")


def _calls(message: str, tool: dict[str, Any], *arguments: dict[str, Any]) -> list[dict[str, Any]]:
    calls, notes = one_call_per_said_item([ToolCall(tool["name"], a) for a in arguments], [tool], message)
    assert len(notes) == len(calls) - len(arguments)
    assert all(c.name == tool["name"] for c in calls)
    return [c.arguments for c in calls]


def test_a_call_for_one_said_number_is_made_for_each_number_of_its_list() -> None:
    assert _calls("Find the factorial of 5,10 and 15.", FACTORIAL, {"number": 5}) == [
        {"number": 5}, {"number": 10}, {"number": 15}]  # fmt: skip
    # the item the model picked may be anywhere in the list; units and currency signs may follow or lead
    assert _calls("factorials of 4, 6, or 8 please", FACTORIAL, {"number": 6}) == [
        {"number": 6}, {"number": 4}, {"number": 8}]  # fmt: skip
    assert _calls("wires of 5m and 10m, copper", RESISTANCE, {"length": 5, "area": 0.5, "material": "copper"})[1] == {
        "length": 10, "area": 0.5, "material": "copper"}  # fmt: skip
    # a unit after a space joins numbers only when each has it: "42.195 km and 21.1 km", not "3 km and 5 miles"
    assert _calls("wires of 4.5 mm and 6 mm, copper", RESISTANCE, {"length": 4.5, "area": 1, "material": "copper"})[
        1] == {"length": 6, "area": 1, "material": "copper"}  # fmt: skip
    assert len(_calls("wires of 3 km and 5 miles, copper", RESISTANCE, {"length": 3, "material": "copper"})) == 1
    # commas alone join numbers; a number the schema cannot take (2.5 for an integer) is not copied
    assert _calls("case numbers '67813', '71249'", CASE, {"case_number": "67813"}) == [
        {"case_number": "67813"}, {"case_number": "71249"}]  # fmt: skip
    assert _calls("factorial of 3 and 2.5", FACTORIAL, {"number": 3}) == [{"number": 3}]
    # numbers with words between them are no list: "6 feet and weighs 80"
    assert _calls("the factorial of 6 feet and then 80", FACTORIAL, {"number": 6}) == [{"number": 6}]


def test_a_call_for_one_said_name_or_word_is_made_for_each_item_of_its_list() -> None:
    message = "What is the temperature for the next three hours in Seattle and Los Angeles?"
    assert _calls(message, WEATHER, {"location": "Seattle", "hours": 3}) == [
        {"location": "Seattle", "hours": 3}, {"location": "Los Angeles", "hours": 3}]  # fmt: skip
    assert _calls("Chime weather in Oslo, Bergen & Tromsø", WEATHER, {"location": "bergen"}) == [
        {"location": "bergen"}, {"location": "Oslo"}, {"location": "Tromsø"}]  # fmt: skip
    message = "a wire of 5m, area 0.01 with resistivity of copper and aluminum"
    assert _calls(message, RESISTANCE, {"length": 5, "area": 0.01, "material": "copper"})[1:] == [
        {"length": 5, "area": 0.01, "material": "aluminum"}]  # fmt: skip
    # an item the parameter's enum does not allow is not copied
    assert _calls("weather in Oslo in C and K", WEATHER, {"location": "Oslo", "units": "C"}) == [
        {"location": "Oslo", "units": "C"}]  # fmt: skip


def test_no_copy_when_the_call_already_uses_the_lists_other_items() -> None:
    # both places of "New York and Boston" are in the call: one call, not two
    trip = {"origin": "New York", "destination": "Boston"}
    assert _calls("distance between New York and Boston", DISTANCE, trip) == [trip]
    # "3 and 4, 5 and 12" is a list of pairs: the call holds 4 as well, so 5 and 12 are not copied into a alone
    # (the next group of numbers makes the second call: below)
    assert _calls("Pythagoras of 3 and 4, 5 and 12", PYTHAGORAS, {"a": 3, "b": 4})[:2] == [{"a": 3, "b": 4},
                                                                                          {"a": 5, "b": 12}]  # fmt: skip
    # commas alone do not join words: "Chicago, Illinois" is one place
    message = "sales tax on $30.45 in Chicago, Illinois, $52.33 in Sacramento, California"
    assert _calls(message, TAX, {"amount": 30.45, "city": "Chicago", "state": "IL"}) == [
        {"amount": 30.45, "city": "Chicago", "state": "IL"}]  # fmt: skip
    # articles are not items, pronouns and verbs begin none, and ", and" between two words joins clauses
    similar = _tool("similarity", first="string", second="string", unit="string")
    assert _calls("how alike are a cat and a lion", similar, {"first": "cat", "second": "lion"}) == [
        {"first": "cat", "second": "lion"}]  # fmt: skip
    assert _calls("go by bus and you can change", similar, {"first": "x", "second": "y", "unit": "bus"}) == [
        {"first": "x", "second": "y", "unit": "bus"}]  # fmt: skip
    assert _calls("a dish that is spicy, and takes an hour", similar, {"first": "spicy", "second": "y"}) == [
        {"first": "spicy", "second": "y"}]  # fmt: skip
    # a value that is not one whole item, or no list at all
    assert _calls("weather in Los Angeles and Seattle", WEATHER, {"location": "Los"}) == [{"location": "Los"}]
    assert _calls("factorial of 5", FACTORIAL, {"number": 5}) == [{"number": 5}]


def test_items_another_call_already_passes_are_not_copied_again() -> None:
    assert _calls("factorials of 5, 10 and 15", FACTORIAL, {"number": 5}, {"number": 10}) == [
        {"number": 5}, {"number": 15}, {"number": 10}]  # fmt: skip
    assert _calls("factorials of 5, 10 and 15", FACTORIAL, {"number": 5}, {"number": 10}, {"number": 15}) == [
        {"number": 5}, {"number": 10}, {"number": 15}]  # fmt: skip


def test_an_item_any_call_holds_is_not_copied_and_capitals_make_their_own_list() -> None:
    # the model's second call invented "London": "Sydney", which the first call holds, is not copied into it
    zones = _tool("zone_difference", city_a="string", city_b="string")
    calls = _calls("time difference between Sydney and Vancouver?", zones, {"city_a": "Sydney", "city_b": "Vancouver"},
                   {"city_a": "London", "city_b": "Vancouver"})  # fmt: skip
    assert len(calls) == 2
    # "NO" is no item of a list with "Vantor GmbH"; "NY and CA" is a list
    lookup = _tool("lookup", "company", company="string", country="string")
    assert _calls("look up Nordlys AS in NO and Vantor GmbH in DE", lookup, {"company": "Vantor GmbH"}) == [
        {"company": "Vantor GmbH"}]  # fmt: skip
    assert _calls("companies in NY and CA", lookup, {"company": "x", "country": "NY"})[1:] == [
        {"company": "x", "country": "CA"}]  # fmt: skip


def test_calls_to_unlisted_tools_and_odd_arguments_are_left_alone() -> None:
    calls = [ToolCall("unlisted", {"number": 5}), ToolCall("factorial", {"number": True}),
             ToolCall("factorial", {"number": [5]})]  # fmt: skip
    assert one_call_per_said_item(calls, [FACTORIAL], "factorials of 5, 10 and 15") == (calls, [])


@pytest.mark.parametrize("on", [True, False])
def test_the_engine_makes_one_call_per_said_item_unless_turned_off(tiny_engine_factory, monkeypatch, on: bool) -> None:
    engine = tiny_engine_factory(threshold=0.0, one_call_per_item=on)
    engine.channel("c", bot_name="Chime", tools=[FACTORIAL])
    engine.add_human("c", "Mo", "Chime: factorials of 5, 10 and 15?")
    monkeypatch.setattr(
        engine.fmt, "parse_reply", lambda text: ParsedReply("", (ToolCall("factorial", {"number": 5}),))
    )
    reply = engine.generate("c", max_new_tokens=2)
    if on:
        assert [c.arguments["number"] for c in reply.tool_calls] == [5, 10, 15]
        assert "factorial: one call per item said: number=10 as well" in reply.errors
    else:
        assert reply.tool_calls == [ToolCall("factorial", {"number": 5})]


BMI = _tool("bmi", height="number", weight="integer")
CIRCLE = _tool("circle_area", "radius", radius="number", unit="string")
LOAN = _tool("present_value", present_value="number", annual_interest_rate="number", years="integer")


def test_a_call_for_one_group_of_said_numbers_is_made_for_each_further_group() -> None:
    message = "BMI for someone 6 feet tall weighing 80 kg, also for one who is 5.6 feet and weighs 60 kg"
    assert _calls(message, BMI, {"height": 6, "weight": 80}) == [{"height": 6, "weight": 80},
                                                                 {"height": 5.6, "weight": 60}]  # fmt: skip
    assert _calls("GCD of (45, 60), (81, 27) and (9, 12)", _tool("gcd", a="integer", b="integer"), {"a": 45, "b": 60})[1:] == [
        {"a": 81, "b": 27}, {"a": 9, "b": 12}]  # fmt: skip
    # numbers left over that are no whole group, a number that does not fit, numbers inside a date: no copy
    assert _calls("BMI of 6 feet and 80 kg, and 5.6 feet", BMI, {"height": 6, "weight": 80}) == [
        {"height": 6, "weight": 80}
    ]
    assert _calls("BMI of 6 feet and 80 kg, and 5 feet and 60.5 kg", BMI, {"height": 6, "weight": 80}) == [
        {"height": 6, "weight": 80}]  # fmt: skip
    assert _calls("BMI of 6 ft, 80 kg on May 1, 2022", BMI, {"height": 6, "weight": 80}) == [
        {"height": 6, "weight": 80}
    ]
    assert _calls("factorial of my 10k time, 52:30", FACTORIAL, {"number": 10}) == [{"number": 10}]


def test_a_number_said_after_a_parameters_name_makes_a_call_with_it() -> None:
    message = "area of a circle with a radius of 5 meters, another with a radius of 10 meters and one of radius 15"
    assert _calls(message, CIRCLE, {"radius": 5, "unit": "meters"}) == [
        {"radius": 5, "unit": "meters"}, {"radius": 10, "unit": "meters"}, {"radius": 15, "unit": "meters"}]  # fmt: skip
    # a run of numbers naming different parameters is one call; a percentage keeps the form the call used
    message = "present value of $5000 at an annual interest rate of 5% for 3 years, and a present value of $7000 at an interest rate of 4%"
    assert _calls(message, LOAN, {"present_value": 5000, "annual_interest_rate": 0.05, "years": 3})[1:] == [
        {"present_value": 7000, "annual_interest_rate": 0.04, "years": 3}]  # fmt: skip
    # a number after no parameter's name, or after the names of two, is left alone
    assert _calls("circle area for radius 5 in 2 decimals", CIRCLE, {"radius": 5}) == [{"radius": 5}]
    both = _tool("box", width="number", height="number")
    assert _calls("box of width 2 height 3, width and height 4", both, {"width": 2, "height": 3})[1:] == []
