"""`chime serve`: the OpenAI-compatible API, driven by the official openai client against a real server.

A uvicorn server runs the app on a free loopback port in a background thread, over the tiny random
model; tool calls, which a random model does not write on cue, come from a stand-in `Engine.generate`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from bot.api import ContentStream, create_app
from model.conversation import ToolCall
from model.engine import Engine, Reply, _TextStream

CHAT = [
    {"role": "system", "content": "ignored: Chime renders its own header"},
    {"role": "user", "name": "alice", "content": "who's up for pizza tonight?"},
    {"role": "user", "name": "bob", "content": "me! 7pm works"},
    {"role": "user", "name": "carol", "content": "what's 15% of 84.50?"},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port; yields the base URL of its /v1."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    from model.config import EngineConfig

    return Engine.from_config(EngineConfig(model=str(tiny_model_dir), dtype="float32", seed=0, temperature=0.0,
                                           max_new_tokens=24))


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    with serving(create_app(engine)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=20)


def _post(url: str, body: bytes, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_list_names_the_served_model(client: openai.OpenAI, engine: Engine) -> None:
    models = list(client.models.list())
    assert len(models) == 1
    assert models[0].id == f"chime/{Path(engine.model_name).name}/{engine.adapter_version}"
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat_completion_with_named_users(client: openai.OpenAI, engine: Engine) -> None:
    r = client.chat.completions.create(model="anything", messages=CHAT, temperature=0, max_tokens=12)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model.startswith("chime/")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert "chime" not in (choice.model_extra or {})  # chat mode: a plain OpenAI response
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 30
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert engine.channels() == []  # the request's channel is gone
    # Greedy is greedy: the same request gives the same reply; a seed makes sampling repeatable.
    again = client.chat.completions.create(model="x", messages=CHAT, temperature=0, max_tokens=12)
    assert again.choices[0].message.content == choice.message.content
    sampled = [client.chat.completions.create(model="x", messages=CHAT, temperature=1.0, seed=7, max_tokens=12)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_group_mode_stays_silent_unless_mentioned(client: openai.OpenAI) -> None:
    quiet = client.chat.completions.create(model="chime", messages=CHAT, extra_body={"chime": {"mode": "group", "threshold": 1.0}})
    choice = quiet.choices[0]
    assert choice.message.content == "" and choice.finish_reason == "stop"
    assert choice.model_extra["chime"]["decision"] == "silence"
    assert 0.0 <= choice.model_extra["chime"]["p_respond"] < 1.0
    assert quiet.usage.completion_tokens == 0

    mention = CHAT[:-1] + [{"role": "user", "name": "carol", "content": "@Chime what's 15% of 84.50?"}]
    loud = client.chat.completions.create(model="chime", messages=mention, temperature=0, max_tokens=8,
                                          extra_body={"chime": {"mode": "group", "threshold": 1.0}})
    choice = loud.choices[0]
    assert choice.model_extra["chime"]["decision"] == "respond" and choice.model_extra["chime"]["addressed"] is True
    assert choice.message.content and loud.usage.completion_tokens > 0
    # The bot's own name comes from the extension: @Chime does not address a bot called Pip.
    renamed = client.chat.completions.create(model="chime", messages=mention,
                                             extra_body={"chime": {"mode": "group", "threshold": 1.0, "bot_name": "Pip"}})
    assert renamed.choices[0].model_extra["chime"]["decision"] == "silence"


def test_tools_in_tool_calls_out(client: openai.OpenAI, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_generate(channel_id: str, max_new_tokens: int | None = None, min_new_tokens: int = 0, on_text=None) -> Reply:
        ch = engine.channel(channel_id)
        seen["tools"] = [t["name"] for t in ch.tools]
        seen["prompt"] = engine.fmt.decode(ch.window_ids())
        return Reply(text="", tool_calls=[ToolCall("get_weather", {"city": "Paris", "days": 2})], errors=[], n_tokens=9, ms=1.0)

    monkeypatch.setattr(engine, "generate", fake_generate)
    messages = [{"role": "user", "name": "alice", "content": "weather in Paris?"}]
    r = client.chat.completions.create(model="chime", messages=messages, tools=[WEATHER])
    choice = r.choices[0]
    assert seen["tools"] == ["get_weather"] and "get_weather" in seen["prompt"]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

    # The client runs the tool and sends the result back: the call and its result are in the history.
    followup = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24°C"},
    ]
    client.chat.completions.create(model="chime", messages=followup, tools=[WEATHER])
    assert '"city": "Paris"' in seen["prompt"] and "get_weather: sunny, 24°C" in seen["prompt"]

    # Without tools in the request, the prompt lists none (not the engine's own) and calls are dropped.
    plain = client.chat.completions.create(model="chime", messages=messages)
    assert seen["tools"] == [] and plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls


def test_streamed_tool_call_holds_back_the_markup(client: openai.OpenAI, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = ['Let', ' me', ' check', '. <', 'tool_', 'call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']

    def fake_generate(channel_id: str, max_new_tokens: int | None = None, min_new_tokens: int = 0, on_text=None) -> Reply:
        for piece in raw:
            on_text(piece)
        parsed = engine.fmt.parse_reply("".join(raw))
        return Reply(parsed.text, list(parsed.tool_calls), list(parsed.errors), 20, 1.0)

    monkeypatch.setattr(engine, "generate", fake_generate)
    chunks = list(client.chat.completions.create(model="chime", messages=CHAT, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert text == "Let me check."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [("get_weather", {"city": "Oslo"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stream_equals_the_greedy_reply(client: openai.OpenAI) -> None:
    expected = client.chat.completions.create(model="chime", messages=CHAT, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(model="chime", messages=CHAT, temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # tokens came as they were generated, not as one block
    assert "".join(pieces) == expected.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [expected.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


def test_streamed_silence_in_group_mode(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="chime", messages=CHAT, stream=True,
                                                 extra_body={"chime": {"mode": "group", "threshold": 1.0}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[0].choices[0].model_extra["chime"]["decision"] == "silence"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].model_extra["chime"]["decision"] == "silence"


def test_a_client_that_disconnects_stops_its_generation(client: openai.OpenAI, engine: Engine,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    stopped, started = threading.Event(), threading.Event()
    real_generate = engine.generate

    def endless_generate(channel_id: str, max_new_tokens: int | None = None, min_new_tokens: int = 0, on_text=None) -> Reply:
        try:
            for _ in range(20000):
                on_text("word ")
                started.set()
                time.sleep(0.005)
        except Exception:
            stopped.set()
            raise
        raise AssertionError("generation was not stopped")

    monkeypatch.setattr(engine, "generate", endless_generate)
    stream = client.chat.completions.create(model="chime", messages=CHAT, stream=True)
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    # the role chunk goes out before the worker starts: close only once it is generating (under load a
    # close before that cancels the queued job, and generation rightly never starts)
    assert started.wait(30)
    stream.close()
    assert stopped.wait(30), "the worker kept generating for a client that left"
    monkeypatch.setattr(engine, "generate", real_generate)
    r = client.chat.completions.create(model="chime", messages=CHAT, temperature=0, max_tokens=4)
    assert r.choices[0].message.content is not None
    assert engine.channels() == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "chime"}, "messages"),
        ({"model": "chime", "messages": []}, "messages"),
        ({"model": "chime", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "chime", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
        ({"model": "chime", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "1"}]}, "messages[0].tool_call_id"),
        ({"model": "chime", "messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function":
          {"name": "f", "arguments": "{not json"}}]}, {"role": "tool", "tool_call_id": "a", "content": "1"}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"model": "chime", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": "chime", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"model": "chime", "messages": [{"role": "user", "content": "hi"}], "chime": {"mode": "loud"}}, "chime.mode"),
        ({"model": "chime", "messages": [{"role": "user", "content": "hi"}], "chime": {"treshold": 1}}, "chime.treshold"),
        ({"model": "chime", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0]"),
    ],
)
def test_bad_requests_get_openai_errors(base_url: str, body: dict[str, Any], param: str) -> None:
    status, answer = _post(base_url, json.dumps(body).encode())
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert answer["error"]["message"]


def test_bad_json_and_the_openai_client_error(base_url: str, client: openai.OpenAI) -> None:
    status, answer = _post(base_url, b"{not json")
    assert status == 400 and "JSON" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chime", messages=[{"role": "user", "content": "hi"}], tool_choice="required",
                                       tools=[WEATHER])
    assert e.value.status_code == 400 and e.value.body["param"] == "tool_choice"


def test_api_key_is_required_when_set(engine: Engine) -> None:
    with serving(create_app(engine, api_key="s3cret")) as url:
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=20)
        bad = openai.OpenAI(base_url=url, api_key="guess", max_retries=0, timeout=20)
        assert len(list(good.models.list())) == 1
        assert good.chat.completions.create(model="chime", messages=CHAT, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="chime", messages=CHAT)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        status, answer = _post(url, json.dumps({"messages": CHAT}).encode())  # no Authorization header
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        for page in ("/docs", "/redoc", "/openapi.json"):  # nothing answers without the key
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url.removesuffix("/v1") + page, timeout=20)
            assert err.value.code in (401, 404)


def test_text_stream_decodes_multibyte_pieces(engine: Engine) -> None:
    """The streaming hook's pieces concatenate to the full decode and never carry a half character."""
    text = "héllo 😀 wörld ✓ 東京 — done"
    ids = engine.fmt.encode(text)
    pieces: list[str] = []
    stream = _TextStream(engine.fmt.decode, pieces.append)
    for n in range(1, len(ids) + 1):
        stream.push(ids[:n])
    stream.flush(ids)
    assert "".join(pieces) == engine.fmt.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5


def test_content_stream_matches_the_parsed_reply() -> None:
    """Held-back whitespace and possible tool-call openers come out right in every format."""
    from model.tool_format import get_tool_format

    cases = {
        "plain": ("  hi <to", 'ol> there <tool_call>{"name": "f", "arguments": {}}</tool_call>  '),
        "hermes": ("ok", ' <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),
        "llama3": ("sure ", 'thing {"name": "f", "parameters": {}}'),
        "glm4": ("one\ntwo\n", "f\n{}"),
    }
    for fmt, (first, second) in cases.items():
        final = get_tool_format(fmt).parse(first + second).text
        stream = ContentStream(fmt)
        sent = stream.feed(first) + stream.feed(second)
        assert final.startswith(sent), fmt
        assert sent + stream.finish(final) == final, fmt
