"""Grounded optional arguments (model/grounding.py): values nobody said do not reach a tool."""

from __future__ import annotations

from typing import Any

import pytest

from model.conversation import ToolCall
from model.engine import IncomingMessage
from model.grounding import (
    GroundingContext,
    drop_ungrounded_optional,
    drop_unsaid_items,
    percent_as_described,
    said_choices,
    said_direction,
    said_flags,
    said_sides,
    said_whole,
    withdraw_unsaid_required,
)
from model.tool_format import ParsedReply

EMISSIONS = {
    "name": "calculate_emissions",
    "description": "CO2 a car produces in a year.",
    "parameters": {
        "type": "object",
        "properties": {
            "distance": {"type": "integer", "description": "miles driven per year"},
            "fuel_type": {"type": "string", "description": "gas or diesel"},
            "efficiency": {"type": "number", "description": "miles per gallon"},
            "reduction": {"type": "integer", "description": "yearly efficiency loss in percent. Default 0."},
            "units": {"type": "string", "description": "result units. Default 'kilograms'."},
            "rates": {"type": "array", "items": {"type": "number"}, "description": "monthly rates"},
            "detailed": {"type": "boolean", "description": "a breakdown. Default false."},
        },
        "required": ["distance", "fuel_type"],
    },
}


def _drop(text: str, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    calls, notes = drop_ungrounded_optional([ToolCall("calculate_emissions", arguments)], [EMISSIONS], GroundingContext(text))
    return calls[0].arguments, notes


def test_invented_optional_values_are_dropped_and_said_values_kept() -> None:
    text = "Ann: how much CO2 does my gas car make at 12,000 miles a year doing 25 MPG?"
    args, notes = _drop(text, {"distance": 12000, "fuel_type": "gas", "efficiency": 25, "reduction": 25,
                               "units": "tonnes"})
    assert args == {"distance": 12000, "fuel_type": "gas", "efficiency": 25, "reduction": 25}  # 25 was said
    assert len(notes) == 1 and "units='tonnes'" in notes[0]
    args, notes = _drop(text, {"distance": 12000, "fuel_type": "gas", "efficiency": 31.5, "reduction": 3})
    assert args == {"distance": 12000, "fuel_type": "gas"} and len(notes) == 2


def test_required_arguments_are_never_dropped() -> None:
    args, notes = _drop("Ann: what about my car?", {"distance": 500, "fuel_type": "diesel"})
    assert args == {"distance": 500, "fuel_type": "diesel"} and notes == []


@pytest.mark.parametrize(("text", "value"), [
    ("Bo: a 5% loss each year", 0.05),          # percentages either way
    ("Bo: it loses 0.05 a year", 5),
    ("Bo: about 1.5k a month", 1500),           # thousands
    ("Bo: the trip is 90 minutes", 1.5),        # minutes and hours
    ("Bo: -3 degrees", -3),
    ("Bo: for the next three days", 3),         # common number words
    ("Bo: a dozen of them", 12),
    ("Bo: charges of 1e-9 and 2E-9", 2e-9),    # scientific notation
])
def test_numbers_are_grounded_through_common_scales(text: str, value: float) -> None:
    args, notes = _drop(text, {"distance": 1, "fuel_type": "gas", "efficiency": value})
    assert args["efficiency"] == value and notes == []


@pytest.mark.parametrize(("text", "value", "kept"), [
    ("Cy: give it in meters", "meters", True),
    ("Cy: give it in meter", "meters", True),   # the first five characters match
    ("Cy: in METRIC TONNES please", "metric_tonnes", True),
    ("Cy: the time in 24 hour format", "24h", True),  # runs of letters and of digits
    ("Cy: a radius of 4 inches", "inch", True),  # a shorter word that starts a said one
    ("Cy: a radius of 4 inches", "in", False),  # ... of three letters at least
    ("Cy: it took days", "day", True),
    ("Cy: what does it make?", "m", False),
    ("Cy: what does it make?", "kilograms", False),
])
def test_strings_are_grounded_by_their_words(text: str, value: str, kept: bool) -> None:
    args, _ = _drop(text, {"distance": 1, "fuel_type": "gas", "units": value})
    assert ("units" in args) is kept


def test_arrays_need_every_element_and_booleans_always_stay() -> None:
    text = "Di: rates were 2.5 and 3.1, show me the breakdown"
    assert _drop(text, {"distance": 1, "fuel_type": "gas", "rates": [2.5, 3.1], "detailed": True})[0] == {
        "distance": 1, "fuel_type": "gas", "rates": [2.5, 3.1], "detailed": True}
    assert "rates" not in _drop(text, {"distance": 1, "fuel_type": "gas", "rates": [2.5, 4.0]})[0]


def test_unlisted_tools_and_unknown_arguments_are_left_for_validation() -> None:
    context = GroundingContext("Ed: hi")
    calls, notes = drop_ungrounded_optional(
        [ToolCall("shell", {"cmd": "rm -rf /"}), ToolCall("calculate_emissions", {"distance": 1, "bogus": 7})],
        [EMISSIONS], context,
    )  # fmt: skip
    assert calls[0].arguments == {"cmd": "rm -rf /"} and calls[1].arguments == {"distance": 1, "bogus": 7}
    assert notes == []


@pytest.mark.parametrize("ground", [True, False])
def test_the_engine_drops_them_from_the_reply_unless_turned_off(tiny_engine_factory, monkeypatch, ground: bool) -> None:
    engine = tiny_engine_factory(threshold=0.0, ground_optional_arguments=ground)
    engine.channel("c", bot_name="Chime", tools=[EMISSIONS])
    engine.decide("c", IncomingMessage("Fay", "Chime: CO2 for 8000 miles of diesel?", addressed=True))
    call = ToolCall("calculate_emissions", {"distance": 8000, "fuel_type": "diesel", "reduction": 40})
    monkeypatch.setattr(engine.fmt, "parse_reply", lambda text: ParsedReply("", (call,)))
    reply = engine.generate("c", max_new_tokens=2)
    if ground:
        assert reply.tool_calls == [ToolCall("calculate_emissions", {"distance": 8000, "fuel_type": "diesel"})]
        assert reply.errors == ["calculate_emissions: dropped optional argument reduction=40: nobody said it"]
    else:
        assert reply.tool_calls == [call] and reply.errors == []


def test_calls_whose_required_numbers_nobody_said_are_withdrawn() -> None:
    context = GroundingContext("Gil: how much CO2 does my diesel van make at 12,000 miles a year since 2019?")
    said = ToolCall("calculate_emissions", {"distance": 12000, "fuel_type": "diesel"})
    guessed = ToolCall("calculate_emissions", {"distance": 15000, "fuel_type": "diesel"})  # a number from elsewhere
    named = ToolCall("calculate_emissions", {"distance": 12000, "fuel_type": "petrol"})  # letters: a normal form
    dated = ToolCall("calculate_emissions", {"distance": 12000, "fuel_type": "2022-01-01"})  # digits nobody said
    since = ToolCall("calculate_emissions", {"distance": 12000, "fuel_type": "2019-01-01"})  # one of them said
    unlisted = ToolCall("shell", {"cmd": "ls 42"})
    calls, notes = withdraw_unsaid_required([said, guessed, named, dated, since, unlisted], [EMISSIONS], context)
    assert calls == [said, named, since, unlisted]
    assert notes == ["calculate_emissions: withdrawn: nobody said its required distance=15000",
                     "calculate_emissions: withdrawn: nobody said its required fuel_type='2022-01-01'"]
    # optional values are not this rule's business, and a missing required argument is validation's
    calls, notes = withdraw_unsaid_required(
        [ToolCall("calculate_emissions", {"distance": 12000, "fuel_type": "diesel", "reduction": 40}),
         ToolCall("calculate_emissions", {"distance": 12000})], [EMISSIONS], context)
    assert len(calls) == 2 and notes == []


PRICE = {
    "name": "final_price",
    "description": "Price after a discount and sales tax.",
    "parameters": {
        "type": "object",
        "properties": {
            "price": {"type": "number"},
            "discount_rate": {"type": "number"},
            "sales_tax": {"type": "number"},
            "history": {"type": "array", "items": {"type": "number"}},
            "rounding": {"type": "integer"},
        },
        "required": ["price", "discount_rate", "sales_tax"],
    },
}


def _price(text: str, **arguments: Any) -> tuple[list[ToolCall], list[str]]:
    return withdraw_unsaid_required([ToolCall("final_price", arguments)], [PRICE], GroundingContext(text))


def test_a_number_said_once_fills_one_required_value() -> None:
    text = "Ida: the price after a 25% discount and 10% sales tax?"
    calls, notes = _price(text, price=10, discount_rate=25, sales_tax=10)  # the price was never given
    assert calls == [] and notes == ["final_price: withdrawn: 10 fills 2 required values but was said 1"]
    # inside lists too
    calls, notes = _price(text, price=[25], discount_rate=25, sales_tax=10)
    assert calls == [] and notes == ["final_price: withdrawn: 25 fills 2 required values but was said 1"]
    # a string that is a number is that number; digits inside a longer string are not counted
    assert _price(text, price="10", discount_rate=25, sales_tax=10)[0] == []
    assert _price(text, price="10 units", discount_rate=25, sales_tax=10)[1] == []
    # said twice, it may fill two; said once but used once more by an optional argument, it is not this rule's
    assert _price("Ida: it's 10 dollars with a 25% discount and 10% tax", price=10, discount_rate=25, sales_tax=10)[1] == []
    assert _price("Ida: 80 dollars, 25% off, 10% tax", price=80, discount_rate=25, sales_tax=10, rounding=10)[1] == []


def test_times_said_counts_every_mention_under_the_same_scales() -> None:
    context = GroundingContext("Jo: 5 apples, five pears and 500 cents, 0.05 of it and 6 more")
    assert context.times_said(5) == 4  # 5, five, 500 / 100, 0.05 x 100
    assert context.times_said(6) == 1 and context.times_said(7) == 0


@pytest.mark.parametrize("ground", [True, False])
def test_the_engine_answers_in_words_when_every_call_was_a_guess(tiny_engine_factory, monkeypatch, ground: bool) -> None:
    """A withdrawn call leaves no call in the reply: the engine decodes again with the call opening banned."""
    engine = tiny_engine_factory(threshold=0.0, ground_required_arguments=ground)
    engine.channel("c", bot_name="Chime", tools=[EMISSIONS])
    engine.decide("c", IncomingMessage("Fay", "Chime: how much CO2 does my car make?", addressed=True))
    call = ToolCall("calculate_emissions", {"distance": 8000, "fuel_type": "diesel"})
    real_parse = engine.fmt.parse_reply
    parses: list[str] = []

    def parse(text: str) -> ParsedReply:
        parses.append(text)
        return ParsedReply("", (call,)) if len(parses) == 1 else real_parse(text)

    monkeypatch.setattr(engine.fmt, "parse_reply", parse)
    decoded: list[list[int]] = []
    real_decode = engine._decode

    def spy(*args, **kwargs):
        decoded.append(real_decode(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(engine, "_decode", spy)
    reply = engine.generate("c", max_new_tokens=4)
    if ground:
        assert reply.tool_calls == [] and len(parses) == len(decoded) == 2
        assert reply.errors[0] == "calculate_emissions: withdrawn: nobody said its required distance=8000"
        first, second = decoded
        assert first and second
        assert second[:1] != engine.fmt.call_open_ids[:1]  # the call opening is banned the second time
        cache = engine.channel("c").cache_ids
        assert cache[len(cache) - len(second):] == second and reply.n_tokens == len(first) + len(second)
    else:
        assert reply.tool_calls == [call] and reply.errors == [] and len(parses) == 1


RECORD = {
    "name": "player_record",
    "description": "A player's record in a season.",
    "parameters": {
        "type": "object",
        "properties": {
            "player_name": {"type": "string", "description": "the player"},
            "sport": {"type": "string", "description": "the sport. Default 'football'."},
            "team": {"type": "string", "description": "the team. Default: all teams."},
            "note": {"type": "string", "description": "a note"},
        },
        "required": ["player_name"],
    },
}


def _record(text: str, **arguments: Any) -> tuple[dict[str, Any], list[str]]:
    calls, notes = drop_ungrounded_optional([ToolCall("player_record", arguments)], [RECORD], GroundingContext(text))
    return calls[0].arguments, notes


def test_an_optional_string_that_only_repeats_another_argument_is_dropped() -> None:
    text = "Kai: Chime, find me the record of Tom Brady in basketball"
    args, notes = _record(text, player_name="Tom Brady", team="Brady")
    assert args == {"player_name": "Tom Brady"}
    assert notes == ["player_record: dropped optional argument team='Brady': it repeats player_name"]
    # of two optional copies of one said word, the first stays
    assert _record(text, player_name="Tom Brady", sport="basketball", team="Basketball")[0] == {
        "player_name": "Tom Brady", "sport": "basketball"}
    # words said as often as the values use them may fill both, and a value with words of its own stays
    assert _record("Kai: Brady's record with the Brady Bunch", player_name="Brady", team="Brady")[1] == []
    assert _record(text, player_name="Tom Brady", team="Tom Brady basketball")[1] == []
    # required arguments are never dropped, whatever they repeat
    assert _record(text, team="Brady", player_name="Brady")[0] == {"player_name": "Brady"}
    assert _record(text, player_name="Tom Brady", note="")[0] == {"player_name": "Tom Brady", "note": ""}


def test_a_list_of_strings_keeps_the_items_somebody_said() -> None:
    nursery = {"name": "nursery", "parameters": {"type": "object", "required": ["plants"], "properties": {
        "plants": {"type": "array", "items": {"type": "string"}}, "bases": {"type": "array"},
        "codes": {"type": "array"}}}}  # fmt: skip

    def trim(text: str, **arguments: Any) -> tuple[dict[str, Any], list[str]]:
        calls, notes = drop_unsaid_items([ToolCall("nursery", arguments)], [nursery], GroundingContext(text))
        return calls[0].arguments, notes

    args, notes = trim("Ola: nurseries with annual plants and shrubs, heavy on G and C",
                       plants=["Annual", "Perennial", "Shrub", "Tree"], bases=["G", "C", "G", "C", "C"])  # fmt: skip
    assert args == {"plants": ["Annual", "Shrub"], "bases": ["G", "C"]}
    assert notes[0] == ("nursery: plants=['Annual', 'Perennial', 'Shrub', 'Tree'] passed as ['Annual', 'Shrub']: "
                        "only the items somebody said, as often as they said them")  # fmt: skip
    # said twice, listed twice; nothing said is left to the other rules; numbers are not items here
    assert trim("Ola: a and b, then a again", plants=["a", "b", "a"])[1] == []
    assert trim("Ola: tickers please", codes=["AAPL", "MSFT"])[0] == {"codes": ["AAPL", "MSFT"]}
    assert trim("Ola: 3 and 4", bases=[3, 4, 5])[1] == []


LOAN = {
    "name": "loan",
    "description": "Monthly payment of a loan.",
    "parameters": {
        "type": "object",
        "properties": {
            "rate": {"type": "number", "description": "Annual interest rate as a decimal, e.g. 0.05 for 5%"},
            "fee_pct": {"type": "number", "description": "Arrangement fee"},
            "tax": {"type": "number", "description": "Tax in percent"},
            "growth": {"type": "number", "description": "Expected growth rate"},
            "places": {"type": "number", "description": "Decimal places to round to"},
            "years": {"type": "integer", "description": "Term in years, as a decimal fraction of 100"},
            "cap_percent": {"type": "number", "description": "Rate cap, e.g. 0.5 = 0.5% (as a decimal: 0.005)"},
        },
        "required": ["rate"],
    },
}


def _loan(text: str, **arguments: Any) -> tuple[dict[str, Any], list[str]]:
    calls, notes = percent_as_described([ToolCall("loan", arguments)], [LOAN], GroundingContext(text))
    return calls[0].arguments, notes


def test_a_said_percentage_takes_the_form_its_parameter_asks_for() -> None:
    text = "Lu: 200k at 5% with a 1 percent fee, 20% tax, growth 3%, round to 2, over 25 years"
    args, notes = _loan(text, rate=5, fee_pct=0.01, tax=0.2, growth=3, places=2, years=25)
    assert args == {"rate": 0.05, "fee_pct": 1, "tax": 20, "growth": 3, "places": 2, "years": 25}
    assert notes[0] == "loan: rate=5 passed as 0.05: the percentage said, in the form its description asks for"
    assert len(notes) == 3
    # already in the asked form, not a said percentage, or a string: left alone
    assert _loan(text, rate=0.05, tax=20)[1] == []
    assert _loan(text, rate=7, tax=0.07)[1] == []
    assert _loan(text, rate="5")[0] == {"rate": "5"}
    # a name that says percent decides before the description's examples
    assert _loan("Lu: capped at 3%", rate=0.03, cap_percent=0.03)[0] == {"rate": 0.03, "cap_percent": 3}
    assert _loan("Lu: 200k over 25 years at five", rate=5)[1] == []  # no percentage was said


FORECAST = {
    "name": "forecast",
    "description": "A weather forecast.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city"},
            "include_humidity": {"type": "boolean", "description": "add humidity"},
            "withVerdict": {"type": "boolean", "description": "a verdict"},
            "detailed": {"type": "boolean", "description": "more detail"},
        },
        "required": ["city"],
    },
}


def _flags(text: str, **arguments: Any) -> tuple[dict[str, Any], list[str]]:
    calls, notes = said_flags([ToolCall("forecast", arguments)], [FORECAST], text)
    return calls[0].arguments, notes


def test_a_flag_the_message_names_is_passed_true() -> None:
    args, notes = _flags("Chime, weather in Oslo including humidity, with a verdict", city="Oslo",
                         include_humidity=False, withVerdict=False, detailed=False)  # fmt: skip
    assert args == {"city": "Oslo", "include_humidity": True, "withVerdict": True, "detailed": False}
    assert notes == ["forecast: include_humidity=false passed as true: the message asks for humidity",
                     "forecast: withVerdict=false passed as true: the message asks for verdict"]  # fmt: skip
    # a negated mention, a true the message does not name, or a flag nobody named: left alone
    assert _flags("Chime, weather in Oslo without the humidity", city="Oslo", include_humidity=False)[1] == []
    assert _flags("Chime, Oslo but don't show me humidity", city="Oslo", include_humidity=False)[1] == []
    assert _flags("Chime, weather in Oslo", city="Oslo", detailed=True)[0]["detailed"] is True
    assert _flags("Chime, weather in Oslo", city="Oslo", include_humidity=False)[1] == []


CONVERT = {
    "name": "convert_units",
    "parameters": {
        "type": "object",
        "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
        "required": ["value", "from_unit", "to_unit"],
    },
}
FLIGHTS = {
    "name": "flights",
    "parameters": {
        "type": "object",
        "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}, "day": {"type": "string"}},
        "required": ["origin", "destination"],
    },
}
EXCHANGE = {
    "name": "exchange",
    "parameters": {
        "type": "object",
        "properties": {"amount": {"type": "number"}, "base_currency": {"type": "string"},
                       "target_currency": {"type": "string"}},
    },
}  # fmt: skip


def _direction(tool: dict[str, Any], text: str, **arguments: Any) -> dict[str, Any]:
    calls, notes = said_direction([ToolCall(tool["name"], arguments)], [tool], text)
    assert len(notes) == (calls[0].arguments != arguments)
    return calls[0].arguments


@pytest.mark.parametrize(
    ("text", "value", "written", "said"),
    [
        ("Chime, convert 20, 25 and 30 celsius to fahrenheit", 20, ("degF", "degC"), ("degC", "degF")),
        ("Nova what's 102.4 F in celsius?", 102.4, ("degC", "degF"), ("degF", "degC")),
        ("Kit convert 30 C to F", 30, ("degF", "degC"), ("degC", "degF")),
        ("my recipe says 350°F, what is that in Celsius?", 350, ("degC", "degF"), ("degF", "degC")),
        ("Chime how many km is 100 miles?", 100, ("km", "mile"), ("mile", "km")),
        ("chime what's 16 mph in km/h", 16, ("km/h", "mph"), ("mph", "km/h")),
        ("what's 8.5 by 11 inches in cm?", 8.5, ("cm", "inch"), ("inch", "cm")),
        # the model's order agrees with the message, or the message says both ways: left alone
        ("Chime how many km is 100 miles?", 100, ("mile", "km"), ("mile", "km")),
        ("it needs 1 kg. the store sells it in 1 lb tubs, how many tubs", 1, ("lb", "kg"), ("lb", "kg")),
        # nothing said names either unit ("16 in" is not 16 inches; "from Chicago" is no unit)
        ("new here from Chicago, what's 16 in my money", 16, ("degF", "degC"), ("degF", "degC")),
    ],
)
def test_a_source_and_target_pair_follows_the_message(
    text: str, value: float, written: tuple[str, str], said: tuple[str, str]
) -> None:
    args = _direction(CONVERT, text, value=value, from_unit=written[0], to_unit=written[1])
    assert args == {"value": value, "from_unit": said[0], "to_unit": said[1]}


def test_any_pair_of_parameters_named_for_a_source_and_a_target_is_read() -> None:
    assert _direction(FLIGHTS, "any flights from New York to Boston on friday", origin="Boston",
                      destination="New York", day="friday") == {"origin": "New York", "destination": "Boston",
                                                                "day": "friday"}  # fmt: skip
    assert _direction(EXCHANGE, "Convert 150 Euros to Canadian dollars", amount=150, base_currency="CAD",
                      target_currency="EUR") == {"amount": 150, "base_currency": "EUR", "target_currency": "CAD"}
    # values the message does not name, equal values, or a number that is not the call's: left alone
    assert _direction(FLIGHTS, "flights to anywhere warm", origin="Oslo", destination="Rome")["origin"] == "Oslo"
    assert _direction(EXCHANGE, "150 euros please", amount=150, base_currency="EUR", target_currency="eur") == {
        "amount": 150, "base_currency": "EUR", "target_currency": "eur"}
    assert _direction(EXCHANGE, "I paid 20 dollars, convert 150 to euros", amount=150, base_currency="EUR",
                      target_currency="USD")["base_currency"] == "USD"  # "to euros" is the target
    assert _direction(EXCHANGE, "I paid 20 dollars, what is 150 worth", amount=150, base_currency="EUR",
                      target_currency="USD")["base_currency"] == "EUR"  # 20 is not the call's number


CASES = {
    "name": "case_info",
    "parameters": {
        "type": "object",
        "properties": {"docket": {"type": "string"}, "to": {"type": "string"}, "path": {"type": "string"},
                       "key": {"type": "string"}, "year": {"type": "string"}, "unit": {"type": "string"},
                       "pair": {"type": "string"}, "court": {"type": "string", "enum": ["AL", "CA"]}},
    },
}  # fmt: skip


def _whole(text: str, **arguments: Any) -> dict[str, Any]:
    calls, notes = said_whole([ToolCall("case_info", arguments)], [CASES], text)
    assert len(notes) == sum(calls[0].arguments[k] != v for k, v in arguments.items())
    return calls[0].arguments


FRIDGE = {
    "name": "fridge.set_temperature",
    "parameters": {
        "type": "object",
        "properties": {"compartment": {"type": "string", "enum": ["fridge", "freezer"]}, "celsius": {"type": "number"},
                       "mode": {"type": "string", "enum": ["eco", "normal", "fast"]}, "unit": {"type": "string",
                       "enum": ["mi", "km"]}},
        "required": ["compartment", "celsius"],
    },
}  # fmt: skip


def _choices(text: str, **arguments: Any) -> tuple[dict[str, Any], list[str]]:
    calls, notes = said_choices([ToolCall(FRIDGE["name"], arguments)], [FRIDGE], text)
    return calls[0].arguments, notes


def test_the_one_choice_the_message_says_replaces_one_it_does_not() -> None:
    args, notes = _choices("Otto set the freezer to -20", compartment="fridge", celsius=-20)
    assert args == {"compartment": "freezer", "celsius": -20}
    assert notes == ["fridge.set_temperature: compartment='fridge' passed as 'freezer': the one choice the message says"]
    assert _choices("5 miles please", unit="km")[0] == {"unit": "mi"}  # "miles" names "mi" (pint)
    # a choice the message says, none or two others said, or no enum: left alone
    assert _choices("the fridge and the freezer", compartment="fridge")[1] == []
    assert _choices("set it to -20", compartment="fridge")[1] == []
    assert _choices("freezer on eco or fast", mode="normal")[1] == []
    assert said_choices([ToolCall("case_info", {"docket": "X"})], [CASES], "freezer")[1] == []


DOCUMENTED = {
    "name": "convert_units",
    "description": "Convert a quantity between units.",
    "parameters": {
        "type": "object",
        "properties": {"value": {"type": "number"}, "from_unit": {"type": "string", "description": "e.g. mile, degF"},
                       "to_unit": {"type": "string", "description": "e.g. km, degC"}},
    },
}  # fmt: skip


def _sides(tool: dict[str, Any], text: str, value: float, written: tuple[str, str]) -> tuple[tuple[str, str], list[str]]:
    calls, notes = said_sides([ToolCall(tool["name"], {"value": value, "from_unit": written[0], "to_unit": written[1]})],
                              [tool], text)  # fmt: skip
    return (calls[0].arguments["from_unit"], calls[0].arguments["to_unit"]), notes


@pytest.mark.parametrize(
    ("text", "value", "written", "said"),
    [
        # one unit on both sides: the side the message names otherwise takes that unit, as the tool writes it
        ("Chime how much is 4200 feet in metres?", 4200, ("metre", "m"), ("foot", "m")),
        ("how far is 26.2 miles in km, Chime?", 26.2, ("km", "km"), ("mile", "km")),
        ("Chime how many km is 100 miles?", 100, ("kilometer", "km"), ("mile", "km")),
        ("autoclave at 121 C, what's that in F?", 121, ("C", "degC"), ("degC", "degF")),
        ("what is 30 celsius in fahrenheit", 30, ("degF", "degF"), ("degC", "degF")),
        # "C" and "F" are coulomb and farad to pint: a temperature pair is written as the tool documents it
        ("what is 30 C in F", 30, ("C", "F"), ("degC", "degF")),
        # left alone: the other side's unit is not said, is said on both sides, or more than one is said
        ("I'm doing the 1650 in May. what's that in metres?", 1650, ("m", "metres"), ("m", "metres")),
        ("convert 5 kg to kg", 5, ("kg", "kg"), ("kg", "kg")),
        ("how many km is 100 miles or 100 yards", 100, ("km", "km"), ("km", "km")),
        # another kind of quantity is what the message asks for ("2.5 cups of flour to grams")
        ("convert 2.5 cups of flour to grams", 2.5, ("cup", "cup"), ("cup", "gram")),
        ("chime what's 14000 feet in meters", 14000, ("foot", "meter"), ("foot", "meter")),
    ],
)
def test_a_pair_naming_one_unit_on_both_sides_takes_the_unit_the_message_says(
    text: str, value: float, written: tuple[str, str], said: tuple[str, str]
) -> None:
    got, notes = _sides(DOCUMENTED, text, value, written)
    assert got == said
    assert bool(notes) == (got != written)


def test_a_said_unit_is_written_as_the_enum_has_it_else_by_pint_s_name() -> None:
    enum = {"name": "convert", "parameters": {"type": "object", "properties": {
        "value": {"type": "number"}, "from_unit": {"type": "string", "enum": ["feet", "meters"]},
        "to_unit": {"type": "string", "enum": ["feet", "meters"]}}}}  # fmt: skip
    assert _sides(enum, "4200 feet in meters", 4200, ("meters", "meters"))[0] == ("feet", "meters")
    assert _sides(enum, "4200 yards in meters", 4200, ("meters", "meters"))[0] == ("meters", "meters")  # none fits
    assert _sides(CONVERT, "4200 feet in metres", 4200, ("m", "m"))[0] == ("foot", "m")  # undocumented: pint's name
    # undocumented, a temperature letter stays as the model wrote it: another tool may want "C"
    assert _sides(CONVERT, "what is 30 C in F", 30, ("C", "F"))[0] == ("C", "F")


def test_a_path_address_or_id_cut_short_is_passed_whole() -> None:
    assert _whole("Chime, the victim in docket 2022/AL2562? mail john.doe@example.com, data in '~/data/f.nii'.",
                  docket="AL2562", to="example.com", path="f.nii") == {
        "docket": "2022/AL2562", "to": "john.doe@example.com", "path": "~/data/f.nii"}  # fmt: skip
    assert _whole("What key signature does C# major have? and C++?", key="C") == {"key": "C"}  # two tokens
    assert _whole("What key signature does C# major have?", key="C") == {"key": "C#"}
    # a longer word, words joined by "/" alone, a number, a value also said alone, an enum: left alone
    assert _whole("a 4 inches wide, 16 km/h, USD/EUR rate", unit="inch", pair="USD") == {"unit": "inch", "pair": "USD"}
    assert _whole("a 4 inches wide, 16 km/h", unit="km") == {"unit": "km"}
    assert _whole("filed 2022/03/11", year="2022") == {"year": "2022"}
    assert _whole("docket AL2562, also known as 2022/AL2562", docket="AL2562") == {"docket": "AL2562"}
    assert _whole("docket 2022/AL2562", court="AL") == {"court": "AL"}
    # an id's digits without its capital letters: the whole id; not a number of a word, a date or two ids
    assert _whole("nope. Chime track order A77312", docket="77312") == {"docket": "A77312"}
    assert _whole("Nova details for booking HX-55920", docket="55920") == {"docket": "HX-55920"}
    assert _whole("Chime how does A5 compare to A4, and model Pro700?", docket="5", to="700") == {"docket": "5", "to": "700"}
    assert _whole("orders A77312 and B77312", docket="77312") == {"docket": "77312"}
    assert _whole("order A77312, or just 77312", docket="77312") == {"docket": "77312"}


def test_a_name_cut_short_is_passed_whole() -> None:
    calls, notes = said_whole([ToolCall("case_info", {"docket": "Jokic", "to": "Cornbread", "path": "Shoreditch"})],
                              [CASES], "fine, Otto Nikola Jokic per-game stats, Skillet Cornbread and Dishoom Shoreditch",
                              bot_name="Otto")  # fmt: skip
    assert calls[0].arguments == {"docket": "Nikola Jokic", "to": "Skillet Cornbread", "path": "Dishoom Shoreditch"}
    assert notes[0] == "case_info: docket='Jokic' passed as 'Nikola Jokic': the whole name the message says"
    # a sentence's first word and the bot's name are no part of a name; a name said alone, a word in lower
    # case, a name in two runs and an enum are left alone
    assert _whole("Find Tesla stock price", docket="Tesla") == {"docket": "Tesla"}
    assert said_whole([ToolCall("case_info", {"docket": "Sevilla"})], [CASES], "ok Bix Sevilla fixtures",
                      bot_name="Bix")[0][0].arguments == {"docket": "Sevilla"}  # fmt: skip
    assert _whole("book Dishoom Shoreditch, or just Shoreditch", docket="Shoreditch") == {"docket": "Shoreditch"}
    assert _whole("book Dishoom Shoreditch", docket="shoreditch") == {"docket": "shoreditch"}
    assert _whole("Chime, New York or New Jersey?", docket="New") == {"docket": "New"}
    assert _whole("the court of Alabama Middle District", court="AL") == {"court": "AL"}
    # a bracket ends a run; the rest of a name another argument holds is that argument's
    assert _whole("the weight of Glucose (C6H12O6) in grams", docket="C6H12O6") == {"docket": "C6H12O6"}
    assert _whole("the price of a Fender American Professional II Stratocaster", to="Fender",
                  path="American Professional II Stratocaster") == {"to": "Fender",
                                                                    "path": "American Professional II Stratocaster"}  # fmt: skip


@pytest.mark.parametrize("read", [True, False])
def test_the_engine_reads_arguments_off_the_message_unless_turned_off(tiny_engine_factory, monkeypatch, read: bool) -> None:
    engine = tiny_engine_factory(threshold=0.0, read_arguments=read)
    engine.channel("c", bot_name="Chime", tools=[LOAN, FORECAST, CONVERT, CASES, FRIDGE])
    engine.add_human("c", "Mo", "Chime: payment at 4.5%? the Oslo forecast including humidity, 20 C in F, case "
                                "2022/AL25, and 4200 feet in metres; freezer to -20")
    calls = (ToolCall("loan", {"rate": 4.5}), ToolCall("forecast", {"city": "Oslo", "include_humidity": False}),
             ToolCall("convert_units", {"value": 20, "from_unit": "degF", "to_unit": "degC"}),
             ToolCall("case_info", {"docket": "AL25"}),
             ToolCall("convert_units", {"value": 4200, "from_unit": "metre", "to_unit": "m"}),
             ToolCall("fridge.set_temperature", {"compartment": "fridge", "celsius": -20}))
    monkeypatch.setattr(engine.fmt, "parse_reply", lambda text: ParsedReply("", calls))
    reply = engine.generate("c", max_new_tokens=2)
    if read:
        assert reply.tool_calls == [ToolCall("loan", {"rate": 0.045}),
                                    ToolCall("forecast", {"city": "Oslo", "include_humidity": True}),
                                    ToolCall("convert_units", {"value": 20, "from_unit": "degC", "to_unit": "degF"}),
                                    ToolCall("case_info", {"docket": "2022/AL25"}),
                                    ToolCall("convert_units", {"value": 4200, "from_unit": "foot", "to_unit": "m"}),
                                    ToolCall("fridge.set_temperature", {"compartment": "freezer", "celsius": -20})]  # fmt: skip
    else:
        assert reply.tool_calls == list(calls)
