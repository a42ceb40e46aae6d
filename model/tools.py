"""Tools: a registry of allowed functions, strict argument validation, bounded execution, built-ins.

A deployer adds a tool by writing a typed Python function with a docstring; `tool_from_function`
derives its JSON schema from the signature (the first docstring paragraph is the description, and
`name: text` lines under "Args:" describe the parameters). Only registered tools can ever run.

A tool that acts for someone (sends a reminder, reads *their* settings) declares a parameter named
`caller`: it is not in the schema, the model cannot set it (an argument of that name is rejected as
unknown), and the registry fills it with the platform's id of the person whose message led to the call.
So "Chime, set a reminder for bob" runs as the person who asked, whatever the text or the model says.

Every call goes through `ToolRegistry.execute`: the tool must be registered, the arguments must fit
the schema (lossless coercion only: "12" for an integer, 3.0 for an integer, 12 for a number; never
"sqrt of 3342398" for a number), unknown or missing arguments are rejected, and the function runs
with a timeout. Whatever goes wrong comes back as a `ToolResult` with `ok=False` and a reason, for
the conversation to carry as the tool's result: a bad call is never an exception to the caller.

Built-ins (the names and argument shapes the training corpus uses, `training/corpus.py`):
    calculator(expression)                   exact arithmetic from an `ast` whitelist, never `eval`
    convert_units(value, from_unit, to_unit)  through pint's unit registry
    current_time(timezone)                    the current time in an IANA zone (zoneinfo)
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import datetime as dt
import functools
import inspect
import math
import operator
import re
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from model.conversation import ToolCall

DEFAULT_TIMEOUT_S = 2.0
CALLER_PARAM = "caller"  # filled by the registry with the asking person's id; never from the model
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="chime-tool")


class ToolError(Exception):
    """A rejected call or a failed tool; the message is shown to the model as the tool's result."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of an object
    func: Callable[..., Any]
    timeout_s: float = DEFAULT_TIMEOUT_S
    takes_caller: bool = False  # the function has a `caller` parameter (see the module docstring)

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolResult:
    name: str
    ok: bool
    content: str  # the result, or "error: <reason>"
    arguments: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- schemas from functions


def _json_type(hint: Any, where: str) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if origin is Literal:
        values = list(typing.get_args(hint))
        kinds = {type(v) for v in values}
        base = _json_type(kinds.pop(), where) if len(kinds) == 1 else {}
        return {**base, "enum": values}
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        return {"type": "array", "items": _json_type(item, where)}
    raise TypeError(f"{where}: unsupported parameter type {hint!r} (use int, float, str, bool, Literal or list)")


def _param_docs(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"(\w+)\s*(?:\([^)]*\))?:\s*(.+)", stripped)
            if m:
                out[m.group(1)] = m.group(2)
            elif not stripped:
                in_args = False
    return out


def tool_from_function(func: Callable[..., Any], name: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tool:
    """A Tool whose JSON schema comes from the function's type hints and docstring."""
    doc = inspect.getdoc(func) or ""
    if not doc:
        raise TypeError(f"tool {func.__name__}: a docstring is required (it is the description the model reads)")
    hints = typing.get_type_hints(func)
    docs = _param_docs(doc)
    props: dict[str, Any] = {}
    required: list[str] = []
    takes_caller = False
    for pname, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {func.__name__}: *args/**kwargs are not allowed")
        if pname == CALLER_PARAM:
            takes_caller = True  # the registry's to fill, not the model's: kept out of the schema
            continue
        if pname not in hints:
            raise TypeError(f"tool {func.__name__}: parameter {pname!r} needs a type hint")
        prop = _json_type(hints[pname], f"{func.__name__}.{pname}")
        if pname in docs:
            prop["description"] = docs[pname]
        props[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    parameters = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return Tool(name or func.__name__, description, parameters, func, timeout_s, takes_caller)


# ---------------------------------------------------------------------------- validation

_INT_RE = re.compile(r"[+-]?\d{1,30}")
_NUM_RE = re.compile(r"[+-]?(\d{1,30}(\.\d{0,30})?|\.\d{1,30})([eE][+-]?\d{1,3})?")


def coerce(value: Any, schema: dict[str, Any], where: str) -> Any:
    """`value` as the schema's type where that is lossless; otherwise ToolError with the reason."""
    kind = schema.get("type")
    if "enum" in schema:
        candidates = schema["enum"]
        for c in candidates:
            if value == c or (isinstance(value, str) and str(c) == value.strip()):
                return c
        raise ToolError(f"{where} must be one of {candidates}, got {value!r}")
    if kind == "integer":
        if isinstance(value, bool):
            raise ToolError(f"{where} must be an integer, got a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
            return int(value.strip())
        raise ToolError(f"{where} must be an integer, got {value!r}")
    if kind == "number":
        if isinstance(value, bool):
            raise ToolError(f"{where} must be a number, got a boolean")
        if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
            return value  # an int past float's range is still a JSON number (isfinite would overflow on it)
        if isinstance(value, str) and _NUM_RE.fullmatch(value.strip()):
            number = float(value.strip())
            if math.isfinite(number):
                return number
        raise ToolError(f"{where} must be a number, got {value!r}")
    if kind == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ToolError(f"{where} must be a string, got {type(value).__name__}")
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ToolError(f"{where} must be true or false, got {value!r}")
    if kind == "array":
        if not isinstance(value, list):
            raise ToolError(f"{where} must be a list, got {type(value).__name__}")
        return [coerce(v, schema.get("items", {}), f"{where}[{i}]") for i, v in enumerate(value)]
    if kind == "object":
        if not isinstance(value, dict):
            raise ToolError(f"{where} must be an object, got {type(value).__name__}")
        return value
    return value  # schema without a type: anything JSON


def validate_arguments(tool: Tool, arguments: Any) -> dict[str, Any]:
    if not isinstance(arguments, dict):
        raise ToolError(f"{tool.name}: arguments must be an object")
    props = tool.parameters.get("properties", {})
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        raise ToolError(f"{tool.name}: unknown argument(s) {', '.join(map(str, unknown))}")
    missing = [p for p in tool.parameters.get("required", []) if p not in arguments]
    if missing:
        raise ToolError(f"{tool.name}: missing argument(s) {', '.join(missing)}")
    return {k: coerce(v, props[k], f"{tool.name}.{k}") for k, v in arguments.items()}


def validate_against_schema(name: str, schema: dict[str, Any], arguments: Any) -> dict[str, Any]:
    """`validate_arguments` for a schema with no function behind it (corpus checks, benchmark calls)."""
    return validate_arguments(Tool(name, str(schema.get("description", "")), schema.get("parameters") or {}, func=_never_run), arguments)


def _never_run(**_: Any) -> None:
    raise ToolError("a schema-only tool cannot run")


class ToolRegistry:
    """The allowlist: only tools registered here can run."""

    def __init__(self, tools: list[Tool] | None = None):
        self._tools: dict[str, Tool] = {}
        for t in tools or []:
            self.register(t)

    def register(self, tool: Tool | Callable[..., Any]) -> Tool:
        if not isinstance(tool, Tool):
            tool = tool_from_function(tool)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", tool.name):
            raise ValueError(f"invalid tool name {tool.name!r}")
        self._tools[tool.name] = tool
        return tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._tools.values()]

    def validate(self, call: ToolCall) -> tuple[Tool, dict[str, Any]]:
        tool = self._tools.get(call.name) if isinstance(call.name, str) else None
        if tool is None:
            raise ToolError(f"unknown tool {str(call.name)[:64]!r}; available: {', '.join(self._tools) or 'none'}")
        return tool, validate_arguments(tool, call.arguments)

    def execute(self, call: ToolCall, caller: str | None = None) -> ToolResult:
        """Validate and run one call for `caller` (the asking person's platform id); every failure is a
        result with ok=False, never an exception."""
        try:
            tool, args = self.validate(call)
            if tool.takes_caller and not caller:
                raise ToolError(f"{tool.name} acts for the person who asked, and who asked is not known")
        except ToolError as e:
            return ToolResult(str(call.name)[:64], False, f"error: {e}", {})
        run_args = {**args, CALLER_PARAM: caller} if tool.takes_caller else args
        future = _POOL.submit(tool.func, **run_args)
        try:
            value = future.result(timeout=tool.timeout_s)
            content = str(value)  # can fail too: an int past str's digit limit, a broken __str__
        except concurrent.futures.TimeoutError:
            future.cancel()
            return ToolResult(tool.name, False, f"error: {tool.name} timed out after {tool.timeout_s:g} s", args)
        except ToolError as e:
            return ToolResult(tool.name, False, f"error: {e}", args)
        except Exception as e:  # a deployer's tool failed: report it, keep serving
            return ToolResult(tool.name, False, f"error: {tool.name} failed: {type(e).__name__}: {str(e)[:200]}", args)
        return ToolResult(tool.name, True, content, args)


class ToolBudget:
    """Sliding-window limits on tool calls per person (across channels: asking elsewhere does not reset
    it) and per channel (None: no limit).

    `take` records a call and returns None when both budgets allow it, or the reason it is refused;
    a refused call is not run and counts against nothing.
    """

    def __init__(
        self,
        per_user: int | None,
        per_channel: int | None,
        window_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_user, self.per_channel, self.window_s, self.clock = per_user, per_channel, window_s, clock
        self._users: dict[str, collections.deque[float]] = {}
        self._channels: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, book: dict[Any, collections.deque[float]], key: Any, now: float) -> collections.deque[float]:
        times = book.setdefault(key, collections.deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def take(self, user: str, channel: str) -> str | None:
        with self._lock:
            now = self.clock()
            mine = self._recent(self._users, user, now)  # one budget per person, whichever channel they ask in
            here = self._recent(self._channels, channel, now)
            window = f"{self.window_s / 60:g} minutes"
            if self.per_user is not None and len(mine) >= self.per_user:
                return f"tool-call budget used up: {user[:40]} may trigger {self.per_user} calls per {window}"
            if self.per_channel is not None and len(here) >= self.per_channel:
                return f"tool-call budget used up: this channel allows {self.per_channel} calls per {window}"
            mine.append(now)
            here.append(now)
            return None


# ---------------------------------------------------------------------------- built-ins

MAX_EXPRESSION_CHARS = 300
MAX_EXPONENT = 10_000
MAX_ABS_RESULT = 1e100
MAX_INT_DIGITS = 100

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
    "log": math.log, "log10": math.log10, "log2": math.log2, "exp": math.exp,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "min": min, "max": max, "factorial": math.factorial, "radians": math.radians, "degrees": math.degrees,
}  # fmt: skip
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _check_size(value: Any) -> Any:
    if isinstance(value, bool):
        raise ToolError("booleans are not numbers here")
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_DIGITS * 3.33:
            raise ToolError(f"result too large (more than {MAX_INT_DIGITS} digits)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_ABS_RESULT:
            raise ToolError("result too large or not a finite number")
        return value
    raise ToolError(f"unsupported value {type(value).__name__}")


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _check_size(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check_size(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ToolError(f"exponent too large (limit {MAX_EXPONENT})")
            if abs(left) > 1 and abs(right) * math.log10(abs(left)) > MAX_INT_DIGITS:
                raise ToolError(f"result too large (more than {MAX_INT_DIGITS} digits)")
        try:
            return _check_size(_BINOPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("result too large") from None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial" and (len(args) != 1 or not isinstance(args[0], int) or not 0 <= args[0] <= 70):
            raise ToolError("factorial takes one whole number from 0 to 70")
        try:
            return _check_size(_FUNCS[node.func.id](*args))
        except (ValueError, TypeError) as e:
            raise ToolError(f"{node.func.id}: {e}") from None
        except OverflowError:
            raise ToolError("result too large") from None
    allowed = "numbers, + - * / // % **, parentheses, " + ", ".join(sorted(_FUNCS)) + ", pi, e"
    raise ToolError(f"unsupported expression element {type(node).__name__}; allowed: {allowed}")


def format_number(value: float | int, digits: int = 10) -> str:
    """Integers plainly; other numbers to `digits` significant digits without trailing zeros."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.{digits}g}"
    if "e" in text:
        return text
    return text.rstrip("0").rstrip(".") if "." in text else text


# signs people (and models) write for operators: 2^3, 3×4, 8÷2, and powers as superscripts (5050², 10²³)
_OPERATOR_SIGNS = str.maketrans({"^": "**", "×": "*", "÷": "/"})
_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹"
_SUPERSCRIPT_RE = re.compile(f"[{_SUPERSCRIPTS}]+")


def _plain_operators(expression: str) -> str:
    expression = _SUPERSCRIPT_RE.sub(lambda m: "**" + "".join(str(_SUPERSCRIPTS.index(c)) for c in m.group()), expression)
    return expression.translate(_OPERATOR_SIGNS)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (+ - * / ** %, parentheses, sqrt, round, ...).

    Args:
        expression: e.g. 84.5*1.15/3
    """
    expression = expression.strip()
    if not expression:
        raise ToolError("empty expression")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(_plain_operators(expression), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression[:80]!r}") from None
    return format_number(_eval(tree))


_UNITS: Any = None


def _unit_registry() -> Any:
    global _UNITS
    if _UNITS is None:
        import pint

        _UNITS = pint.UnitRegistry(autoconvert_offset_to_baseunit=True)
    return _UNITS


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units (length, mass, volume, temperature, speed, ...).

    Args:
        value: the quantity to convert
        from_unit: e.g. mile, kg, degF
        to_unit: e.g. km, lb, degC
    """
    import pint

    ureg = _unit_registry()
    for unit in (from_unit, to_unit):
        if len(unit) > 40 or not re.fullmatch(r"[A-Za-z°µ/ _*^0-9.-]+", unit):
            raise ToolError(f"not a unit: {unit[:40]!r}")
    try:
        converted = ureg.Quantity(value, from_unit.replace("°", "deg")).to(to_unit.replace("°", "deg")).magnitude
    except pint.errors.DimensionalityError:
        raise ToolError(f"cannot convert {from_unit} to {to_unit}: different kinds of quantity") from None
    except (pint.errors.UndefinedUnitError, AttributeError, ValueError, TypeError):
        raise ToolError(f"unknown unit in {from_unit!r} or {to_unit!r}") from None
    return f"{format_number(float(converted), 6)} {to_unit}"


def current_time(timezone: str) -> str:
    """The current date and time in an IANA time zone.

    Args:
        timezone: IANA zone, e.g. Europe/Berlin
    """
    zone = _zone(timezone)
    now = dt.datetime.now(zone)
    offset = now.strftime("%z")
    return f"{now:%Y-%m-%d %H:%M} ({now:%A}), {zone.key}, UTC{offset[:3]}:{offset[3:]}"


@functools.cache
def _zone_keys() -> dict[str, str]:
    import zoneinfo

    return {key.lower(): key for key in zoneinfo.available_timezones()}


def _zone(name: str) -> Any:
    """The IANA zone a name means, read leniently: spaces around "/" dropped, other spaces as "_", any case.

    "Asia/ Seoul", "america/new york" and "America/New_York" are the same zone; only names in the
    system's zone database are looked up (never a path).
    """
    import zoneinfo

    key = _zone_keys().get(re.sub(r"\s+", "_", re.sub(r"\s*/\s*", "/", name.strip())).lower())
    if key is None:
        raise ToolError(f"unknown time zone {name[:60]!r}; use an IANA name like Europe/Berlin")
    return zoneinfo.ZoneInfo(key)


def builtin_tools() -> list[Tool]:
    return [tool_from_function(calculator), tool_from_function(convert_units), tool_from_function(current_time)]


def registry_from_names(names: list[str]) -> ToolRegistry:
    """Built-ins by name, and deployer functions as "package.module:function"."""
    import importlib

    builtins = {t.name: t for t in builtin_tools()}
    registry = ToolRegistry()
    for name in names:
        if name in builtins:
            registry.register(builtins[name])
            continue
        module, sep, attr = name.partition(":")
        if not sep:
            raise ValueError(f"unknown tool {name!r}: built-ins are {', '.join(builtins)}; others are 'package.module:function'")
        try:
            func = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import tool {name!r}: {e}") from e
        registry.register(tool_from_function(func))
    return registry
