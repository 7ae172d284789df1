"""The server of `v4agent serve`.

Converter level, on real DSML written by runtime.encoding and tokenized by the V4 tokenizer:
tool calls parsed back with ids and streamed argument deltas; history re-rendered as the exact
sampled tokens (misses counted); each API's request checks and its stream events.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.dsml import ContentDelta, ReasoningDelta
from runtime.encoding import EOS, PromptEncoder, PromptSettings, render_completion
from runtime.serve import anthropic_api, openai_api, responses_api
from runtime.serve.chat import (
    ApiError,
    Assembler,
    CallArguments,
    CallDone,
    CallStarted,
    Result,
    Usage,
    prompt_ids,
)
from runtime.serve.toolcalls import ToolCallMap
from runtime.tokenizer import load_tokenizer

READ_FILE = {"name": "read_file", "description": "Read a file.",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": READ_FILE},
         {"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}]
ANSWER = {"role": "assistant", "reasoning_content": "Look at calc.py first.", "content": "Reading.",
          "tool_calls": [{"function": {"name": "read_file", "arguments": '{"path": "calc.py"}'}},
                         {"function": {"name": "run", "arguments": '{"command": "pytest -q", "timeout": 30}'}}]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def body(*messages: dict, **fields) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": "You fix bugs."}, *messages], "tools": TOOLS,
            **fields}


def sample(tokenizer, calls: ToolCallMap, completion_ids: list[int]) -> tuple[list, Result]:
    """What the server does with sampled tokens: feed them one at a time, then finish."""
    assembler = Assembler(tokenizer, True, calls)
    events = [e for token in completion_ids for e in assembler.feed(token)]
    last, result = assembler.finish("stop", Usage(10, 0, len(completion_ids)))
    return events + last, result


def test_tool_calls_come_back_with_ids_and_argument_deltas(tokenizer):
    text = render_completion(ANSWER)
    events, result = sample(tokenizer, ToolCallMap(), tokenizer.encode(text))
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Look at calc.py first."
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Reading."
    started = [e for e in events if isinstance(e, CallStarted)]
    assert [(e.index, e.name) for e in started] == [(0, "read_file"), (1, "run")]
    assert started[0].id.startswith("call_") and len(started[0].id) == 5 + 24 and started[0].id != started[1].id
    for index, call in enumerate(result.calls):
        deltas = [e.delta for e in events if isinstance(e, CallArguments) and e.index == index]
        assert len(deltas) == (2 if index == 0 else 3)  # one per parameter, then the closing brace
        assert "".join(deltas) == call.arguments and call.id == started[index].id
    assert [json.loads(c.arguments) for c in result.calls] == [{"path": "calc.py"}, {"command": "pytest -q",
                                                                                      "timeout": 30}]
    assert [e.call for e in events if isinstance(e, CallDone)] == result.calls
    assert (result.finish, result.reasoning, result.content) == ("tool_calls", "Look at calc.py first.", "Reading.")


def test_history_renders_as_the_sampled_tokens(tokenizer):
    calls = ToolCallMap()
    encoder = PromptEncoder(tokenizer)
    chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}))
    first = prompt_ids(chat, encoder, "preview", calls)
    text = render_completion(ANSWER)
    # Sampled as the model might: the same text in other tokens than the tokenizer's own split.
    cut = text.index("calc.py\"}") if "calc.py\"}" in text else text.index("calc.py")
    split = [tokenizer.token_to_id(c) for c in "calc"]
    sampled = tokenizer.encode(text[:cut]) + split + tokenizer.encode(text[cut + 4:])
    assert tokenizer.decode(sampled) == text and sampled != tokenizer.encode(text)
    _, result = sample(tokenizer, calls, sampled)

    # The client sends the turn back as JSON, spaced its own way, reasoning included or not.
    for reasoning in ("Look at calc.py first.", None):
        back = {"role": "assistant", "content": result.content, "reasoning_content": reasoning,
                "tool_calls": [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": json.dumps(json.loads(c.arguments),
                                                                                     separators=(",", ":"))}}
                               for c in result.calls]}
        results = [{"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(result.calls)]
        chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}, back, *results))
        second = prompt_ids(chat, encoder, "preview", calls)
        assert second[:len(first) + len(sampled)] == first + sampled
    assert (calls.hits, calls.misses) == (2, {"unknown": 0, "changed": 0})

    # An id the server never gave out renders canonically, and counts as a miss.
    back["tool_calls"][0]["id"] = "call_forged"
    chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}, back, *results))
    messages = [m.encoding() for m in chat.messages]
    messages[0]["tools"] = TOOLS
    assert prompt_ids(chat, encoder, "preview", calls) == PromptEncoder(tokenizer).encode(messages)
    assert calls.misses == {"unknown": 1, "changed": 0}

    # A known id whose call was changed is not spliced either.
    back["tool_calls"][0]["id"] = result.calls[0].id
    back["tool_calls"][0]["function"]["arguments"] = '{"path": "other.py"}'
    chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}, back, *results))
    second = prompt_ids(chat, encoder, "preview", calls)
    assert second[:len(first) + len(sampled)] != first + sampled and calls.misses["changed"] == 1

    # A known turn right after another assistant message (no generation prompt before it).
    back["tool_calls"][0]["function"]["arguments"] = '{"path": "calc.py"}'
    chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"},
                                         {"role": "assistant", "content": "Let me look."}, back, *results))
    ids = prompt_ids(chat, encoder, "preview", calls)
    start = next(i for i in range(len(ids)) if ids[i:i + len(sampled)] == sampled)
    assert tokenizer.decode(ids[start - 1:start]) == EOS and calls.hits == 3


def test_the_map_is_bounded_by_tokens_and_forgets_the_oldest(tokenizer):
    calls = ToolCallMap(max_tokens=3 * len(tokenizer.encode(render_completion(ANSWER))))
    ids = [sample(tokenizer, calls, tokenizer.encode(render_completion(ANSWER)))[1].calls for _ in range(4)]
    assert len(calls) == 3 and calls.held_tokens <= calls.max_tokens
    settings = (True, None, "Reading.", [("read_file", {"path": "calc.py"}),
                                         ("run", {"command": "pytest -q", "timeout": 30})])
    assert calls.recall([c.id for c in ids[0]], *settings) is None  # the oldest went first
    assert calls.recall([c.id for c in ids[3]], *settings) is not None


def test_the_token_cache_of_a_long_running_server_stays_bounded(tokenizer):
    from runtime.serve.service import BoundedTokenCache

    cache = BoundedTokenCache(tokenizer, max_tokens=50)
    encoder = PromptEncoder(tokenizer, cache=cache)
    for n in range(20):
        assert encoder.encode_text(f"file {n}: " + "x = 1\n" * 5) == tokenizer.encode(f"file {n}: " + "x = 1\n" * 5)
        assert sum(len(ids) for ids in cache._ids.values()) <= 50


@pytest.mark.parametrize("fields, message", [
    ({"messages": "hi"}, "messages must be a list"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be"),
    ({"messages": [{"role": "user", "content": ["text"]}]}, "must be a content part object"),
    ({"max_tokens": "10"}, "max_tokens must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"temperature": 3}, "temperature must be between 0 and 2"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort must be one of"),
    ({"tools": [{"type": "function", "function": {"name": 'a"b'}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "JSON schema object"),
    ({"tool_choice": "required"}, "not supported"),
    ({"n": 2}, "n must be 1"),
])
def test_chat_request_errors_name_the_field(fields: dict, message: str):
    with pytest.raises(ApiError) as caught:
        openai_api.parse_request({**body({"role": "user", "content": "hi"}), **fields})
    assert caught.value.status == 400 and message in caught.value.message


def test_parts_v4_cannot_read_are_named_in_the_text():
    chat = openai_api.parse_request(body({"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}))
    assert chat.messages[-1].content == "what is this?\n\n[Unsupported image_url]"  # as the reference encoder


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
VALID = {
    "chat": (openai_api, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS[:1],
                          "max_tokens": 5, "stream": True}),
    "messages": (anthropic_api, {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                                 "tools": [{"name": "f", "input_schema": {}}], "thinking": {"type": "enabled"}}),
    "responses": (responses_api, {"model": "m", "input": [{"role": "user", "content": "hi"}],
                                  "tools": [{"type": "function", "name": "f"}], "reasoning": {"effort": "high"}}),
}


@given(st.sampled_from(sorted(VALID)), st.data())
@settings(max_examples=300, deadline=None)
def test_any_json_in_any_field_is_a_chat_or_a_400(tokenizer, api: str, data):
    """Whatever value lands in whichever field (nested ones too), the request becomes a
    conversation or a 400 naming the problem: never another exception, which would be a 500."""
    module, valid = VALID[api]
    request = json.loads(json.dumps(valid))
    path = data.draw(st.sampled_from(_paths(request)))
    value = data.draw(JSON)
    _put(request, path, value)
    try:
        chat = module.parse_request(request)
        prompt_ids(chat, PromptEncoder(tokenizer), "preview", ToolCallMap())
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message


def _paths(value, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, inner in items:
        out += _paths(inner, (*prefix, key))
    return out + ([(*prefix, "extra")] if isinstance(value, dict) else [])


def _put(request, path: tuple, value) -> None:
    for key in path[:-1]:
        request = request[key]
    request[path[-1]] = value


@pytest.mark.parametrize("fields, think", [
    ({}, "high"), ({"reasoning_effort": "max"}, "max"), ({"reasoning_effort": "low"}, "high"),
    ({"thinking": {"type": "disabled"}}, "none"), ({"reasoning_effort": "none"}, "none"),
    ({"chat_template_kwargs": {"thinking": False}}, "none"),
    ({"chat_template_kwargs": {"thinking": True, "reasoning_effort": "max"}}, "max"),
])
def test_thinking_switches_map_to_the_three_modes(fields: dict, think: str):
    assert openai_api.parse_request({**body({"role": "user", "content": "hi"}), **fields}).think == think


def test_anthropic_request_becomes_the_same_conversation():
    chat = anthropic_api.parse_request({
        "model": "m", "max_tokens": 100, "system": [{"type": "text", "text": "You fix bugs."}],
        "thinking": {"type": "enabled", "budget_tokens": 4096},
        "tools": [{"name": "read_file", "description": "Read a file.", "input_schema": {"type": "object"}},
                  {"type": "web_search_20250305", "name": "web_search"}],
        "messages": [
            {"role": "user", "content": "add is wrong"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Look.", "signature": ""},
                                              {"type": "text", "text": "Reading."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "read_file",
                                               "input": {"path": "calc.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "def add"},
                                         {"type": "text", "text": "go on"}]}]})
    assert chat.think == "high" and chat.max_tokens == 100 and [t["name"] for t in chat.tools] == ["read_file"]
    assert [m.encoding() for m in chat.messages] == [
        {"role": "system", "content": "You fix bugs."}, {"role": "user", "content": "add is wrong"},
        {"role": "assistant", "content": "Reading.", "reasoning_content": "Look.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "read_file", "arguments": '{"path": "calc.py"}'}}]},
        {"role": "tool", "content": "def add", "tool_call_id": "toolu_1"}, {"role": "user", "content": "go on"}]
    with pytest.raises(ApiError, match="max_tokens is required"):
        anthropic_api.parse_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    image = anthropic_api.parse_request({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image", "source": {}}]}]})
    assert [m.encoding() for m in image.messages] == [{"role": "user", "content": "see\n\n[Unsupported image]"}]


def test_responses_input_items_group_into_turns():
    chat = responses_api.parse_request({
        "model": "m", "instructions": "You fix bugs.", "reasoning": {"effort": "xhigh"},
        "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}, {"type": "web_search"}],
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "add is wrong"}]},
                  {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Look."}]},
                  {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": '{"cmd": "ls"}'},
                  {"type": "function_call", "call_id": "call_2", "name": "shell", "arguments": '{"cmd": "pwd"}'},
                  {"type": "function_call_output", "call_id": "call_1", "output": "a.py"},
                  {"type": "function_call_output", "call_id": "call_2", "output": "/"}]})
    assert chat.think == "max" and [t["name"] for t in chat.tools] == ["shell"]
    roles = [(m.role, m.reasoning, [c.id for c in m.calls]) for m in chat.messages]
    assert roles == [("system", None, []), ("user", None, []), ("assistant", "Look.", ["call_1", "call_2"]),
                     ("tool", None, []), ("tool", None, [])]
    with pytest.raises(ApiError, match="previous_response_id"):
        responses_api.parse_request({"model": "m", "input": "x", "previous_response_id": "resp_1"})


async def _collect(stream) -> list[str]:
    return [chunk async for chunk in stream]


def _events(tokenizer) -> tuple[list, Result]:
    events, result = sample(tokenizer, ToolCallMap(), tokenizer.encode(render_completion(ANSWER)))

    async def source():
        for event in [*events, result]:
            yield event
    return source, result


def test_the_chat_stream_reads_back_in_the_agents_own_client(tokenizer):
    from agent.backends.http import read_stream

    source, result = _events(tokenizer)
    text = "".join(asyncio.run(_collect(openai_api.stream_events(source(), "m", 0, include_usage=True))))
    seen: list = []
    answer = read_stream([text.encode()], 100, seen.append, "test")
    assert (answer.reasoning, answer.content, answer.finish) == (result.reasoning, result.content, "tool_calls")
    assert [(c.name, c.arguments) for c in answer.tool_calls] == [(c.name, c.arguments) for c in result.calls]
    assert answer.usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert [e.name for e in seen if type(e).__name__ == "ToolCallStarted"] == ["read_file", "run"]

    # The OpenAI SDK's own accumulator of streamed chunks agrees.
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for line in text.splitlines():
        if line.startswith("data: {"):
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(line[6:])))
    message = state.get_final_completion().choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        (c.id, c.name, c.arguments) for c in result.calls]


def test_anthropic_stream_is_the_documented_event_sequence(tokenizer):
    source, result = _events(tokenizer)
    text = "".join(asyncio.run(_collect(anthropic_api.stream_events(source(), "m"))))
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names == [e["type"] for e in events]
    from anthropic.types import RawMessageStreamEvent
    from pydantic import TypeAdapter

    typed = TypeAdapter(RawMessageStreamEvent)
    for event in events:  # each one is what the Anthropic SDK expects, field by field
        assert typed.validate_python(event).type == event["type"]
    blocks = [(e["index"], e["content_block"]["type"]) for e in events if e["type"] == "content_block_start"]
    assert blocks == [(0, "thinking"), (1, "text"), (2, "tool_use"), (3, "tool_use")]
    compact = []
    for name in names:  # runs of deltas folded into one
        if not (compact and compact[-1] == name == "content_block_delta"):
            compact.append(name)
    assert compact == ["message_start"] + ["content_block_start", "content_block_delta", "content_block_stop"] * 4 + [
        "message_delta", "message_stop"]
    tool_input = "".join(e["delta"]["partial_json"] for e in events
                         if e["type"] == "content_block_delta" and e["index"] == 3)
    assert json.loads(tool_input) == {"command": "pytest -q", "timeout": 30}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    body = anthropic_api.response_body(result, "m")
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert body["content"][3]["id"] == result.calls[1].id and body["stop_reason"] == "tool_use"


def test_responses_stream_items_match_the_whole_response(tokenizer):
    source, result = _events(tokenizer)
    chat = responses_api.parse_request({"model": "m", "input": "x", "stream": True})
    text = "".join(asyncio.run(_collect(responses_api.stream_events(source(), chat, {}))))
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    final = events[-1]["response"]["output"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final and [i["type"] for i in final] == ["reasoning", "message", "function_call", "function_call"]
    whole = responses_api.response_body(result, chat, {})["output"]
    strip = lambda items: [{k: v for k, v in i.items() if k != "id"} for i in items]
    assert strip(whole) == strip(final)
    assert final[3]["call_id"] == result.calls[1].id and json.loads(final[3]["arguments"])["timeout"] == 30


# ---- the server, for real: uvicorn on 127.0.0.1, the engine on a tiny checkpoint ---------------
KEY = "sk-serve-test"
MODEL = "tiny-v4"
LIMIT = 4096


class Serving:
    """An ASGI app under uvicorn in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Running(Serving):
    """The server on the engine on a tiny checkpoint: its URL, engine and service."""

    def __init__(self, checkpoint, tokenizer, **app_options) -> None:
        from runtime import load
        from runtime.serve.engine import Engine
        from runtime.serve.http import create_app
        from runtime.serve.service import Service

        self.engine = Engine(load(checkpoint), detokenize=tokenizer.decode, max_running=4, context_limit=LIMIT)
        self.engine.start()
        self.service = Service(self.engine, tokenizer, MODEL, LIMIT, keepalive_s=0.05)
        super().__init__(create_app(self.service, **app_options))

    def close(self) -> None:
        super().close()
        self.engine.close()


@pytest.fixture(scope="module")
def tiny(tiny_v4):
    return tiny_v4


@pytest.fixture(scope="module")
def server(tiny):
    running = Running(tiny, load_tokenizer(tiny), api_key=KEY)
    yield running
    running.close()


def openai_client(server, key: str = KEY):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def anthropic_client(server, key: str = KEY):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def http(server, method: str, path: str, **kwargs):
    import httpx

    return httpx.request(method, server.url + path, timeout=120, **kwargs)


CHAT = [{"role": "system", "content": "You fix bugs."}, {"role": "user", "content": "add(2, 3) returns -1"}]


def test_models_health_and_the_api_key_on_every_endpoint(server):
    assert [m.id for m in openai_client(server).models.list()] == [MODEL]
    for path in ("/health", "/metrics", "/v1/models"):
        assert http(server, "GET", path, headers={"x-api-key": KEY}).status_code == 200
        refused = http(server, "GET", path, headers={"Authorization": "Bearer sk-wrong"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    refused = http(server, "POST", "/v1/messages", json={})
    assert refused.status_code == 401 and refused.json()["type"] == "error"  # Anthropic's shape
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(server, "sk-wrong").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert "access-control-allow-origin" not in http(server, "GET", "/health", headers={
        "x-api-key": KEY, "Origin": "https://evil.example"}).headers  # CORS is off

    metrics = http(server, "GET", "/metrics", headers={"x-api-key": KEY}).text
    assert 'v4agent_requests_total{path="/v1/models",status="401"}' in metrics
    assert "v4agent_engine_running 0" in metrics and "v4agent_engine_tokens_per_s" in metrics


def test_cors_only_for_the_origins_asked_for_and_bodies_are_capped(server):
    from runtime.serve.http import create_app

    other = Serving(create_app(server.service, api_key=KEY, cors_origins=["https://app.example"], max_body_bytes=4096))
    try:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
        allowed = http(other, "OPTIONS", "/v1/chat/completions", headers={"Origin": "https://app.example", **preflight})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        denied = http(other, "OPTIONS", "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in denied.headers
        assert http(other, "GET", "/v1/models", headers={"Origin": "https://app.example"}).status_code == 401
        big = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 5000}]}
        refused = http(other, "POST", "/v1/messages", json=big, headers={"x-api-key": KEY})
        assert refused.status_code == 413 and refused.json()["error"]["type"] == "request_too_large"
    finally:
        other.close()


@pytest.mark.parametrize("path, payload, status, message", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/chat/completions", b'{"model": "tiny-v4", "messages": [{"role": "user", "content": "a\\ud800"}]}', 400,
     "not valid JSON text"),
    ("/v1/chat/completions", b"[" * 100000, 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT[:1]}, 400, "must end with a user message"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": "many"}, 400, "max_tokens must be"),
    ("/v1/chat/completions", {"model": "gpt-5", "messages": CHAT}, 404, "not served here"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}, 400,
     "context limit"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "not a schema"}}]}, 400, "JSON schema object"),
    ("/v1/messages", {"model": MODEL, "messages": CHAT[1:]}, 400, "max_tokens is required"),
    ("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": CHAT[1:]}, 404, "not served here"),
    ("/v1/responses", {"model": MODEL, "input": 5}, 400, "input must be"),
    ("/v1/nowhere", {}, 404, "Not Found"),
    ("/v1/forged%0A127.0.0.1 \"GET /admin\" 200", {}, 404, "Not Found"),
])
def test_bad_input_is_a_shaped_4xx_and_the_server_lives_on(server, path: str, payload, status: int, message: str,
                                                          caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="v4agent.serve")
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    answer = http(server, "POST", path, content=content, headers={"x-api-key": KEY, "Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and "Traceback" not in answer.text
    if path == "/v1/messages":
        assert answer.json()["type"] == "error" and error["type"] in ("invalid_request_error", "not_found_error")
    assert http(server, "GET", "/health", headers={"x-api-key": KEY}).status_code == 200
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_chat_completions_streamed_and_not_agree(server, tiny, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="v4agent.serve")
    client = openai_client(server)
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, tools=tools, max_tokens=6, temperature=0,
                                           extra_body={"thinking": {"type": "disabled"}})
    messages = [m.encoding() for m in openai_api.parse_request({"model": MODEL, "messages": CHAT}).messages]
    messages[0]["tools"] = tools
    prompt = PromptEncoder(load_tokenizer(tiny), PromptSettings(think="none")).encode(messages)
    usage = whole.usage
    assert usage.prompt_tokens == len(prompt) and 1 <= usage.completion_tokens <= 6
    assert usage.prompt_tokens_details.cached_tokens >= 0
    choice = whole.choices[0]
    assert choice.finish_reason in ("length", "stop", "tool_calls")

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, tools=tools, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"thinking": {"type": "disabled"}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (choice.message.content or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    # one line per request; a stream's is written once the server has sent its end, which the
    # client may have read already
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if '"POST /v1/chat/completions" 200' in r.getMessage()]
        if len(lines) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 2 and all(f"prompt={len(prompt)} " in line for line in lines)

    # Think-high: what the model writes first is reasoning.
    thought = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                             reasoning_effort="high")
    assert thought.choices[0].message.model_extra.get("reasoning_content") or thought.choices[0].message.content


def test_anthropic_messages_streamed_and_not_agree(server):
    client = anthropic_client(server)
    request = dict(model=MODEL, max_tokens=6, system="You fix bugs.", extra_body={"temperature": 0.0},
                   thinking={"type": "enabled", "budget_tokens": 1024},
                   messages=[{"role": "user", "content": "add(2, 3) returns -1"}],
                   tools=[{"name": "read_file", "input_schema": {"type": "object"}}])
    whole = client.messages.create(**request)
    assert whole.usage.output_tokens >= 1 and whole.stop_reason in ("max_tokens", "end_turn", "tool_use")
    with client.messages.stream(**request) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens

    # Greedy again with a stop string from that answer: it ends there, and says so.
    written = whole.content[0].thinking if whole.content[0].type == "thinking" else whole.content[0].text
    stop = written.strip()[1:4]
    stopped = client.messages.create(**request, stop_sequences=[stop])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    assert stopped.usage.output_tokens < whole.usage.output_tokens or written.strip().endswith(stop)
    counted = client.messages.count_tokens(model=MODEL, system="You fix bugs.", messages=request["messages"],
                                           thinking=request["thinking"], tools=request["tools"])
    assert counted.input_tokens == whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_responses_streamed_and_not_agree(server):
    client = openai_client(server)
    request = dict(model=MODEL, instructions="You fix bugs.", input="add(2, 3) returns -1", max_output_tokens=6,
                   temperature=0, reasoning={"effort": "high"},
                   tools=[{"type": "function", "name": "shell", "parameters": {"type": "object"}}])
    whole = client.responses.create(**request)
    assert whole.status in ("completed", "incomplete") and whole.usage.output_tokens >= 1
    with client.responses.stream(**request) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    # A cut-off answer ends with response.incomplete, as OpenAI's does (the SDK's final response
    # is only for response.completed): the terminal event carries it either way.
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == f"response.{whole.status}"
    final = events[-1].response
    strip = lambda items: [{k: v for k, v in i.model_dump().items() if k != "id"} for i in items]
    assert strip(final.output) == strip(whole.output)


def test_an_unknown_tool_call_id_is_a_counted_miss(server):
    def misses() -> int:
        text = http(server, "GET", "/metrics", headers={"x-api-key": KEY}).text
        return int(next(line for line in text.splitlines()
                        if line.startswith('v4agent_tool_history_misses_total{reason="unknown"}')).split()[-1])

    before = misses()
    history = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_made_up", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a"}'}}]},
        {"role": "tool", "tool_call_id": "call_made_up", "content": "def add(a, b): return a - b"}]
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    openai_client(server).chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=1)
    assert misses() == before + 1
    # The same history in the other two APIs.
    anthropic_client(server).messages.create(
        model=MODEL, max_tokens=1, system="You fix bugs.", tools=[{"name": "read_file", "input_schema": {}}],
        messages=[{"role": "user", "content": "add(2, 3) returns -1"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_made_up", "name": "read_file",
                                                     "input": {"path": "a"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_made_up",
                                                "content": "def add(a, b): return a - b"}]}])
    openai_client(server).responses.create(
        model=MODEL, max_output_tokens=1, instructions="You fix bugs.",
        tools=[{"type": "function", "name": "read_file", "parameters": {"type": "object"}}],
        input=[{"role": "user", "content": "add(2, 3) returns -1"},
               {"type": "function_call", "call_id": "call_made_up", "name": "read_file", "arguments": '{"path": "a"}'},
               {"type": "function_call_output", "call_id": "call_made_up", "output": "def add(a, b): return a - b"}])
    assert misses() == before + 3


def test_prefill_keeps_the_stream_alive(server):
    import httpx

    long_chat = [{"role": "user", "content": "word " * 300}]
    for path, payload, alive in [
        ("/v1/chat/completions", {"model": MODEL, "messages": long_chat, "max_tokens": 1, "stream": True}, ": "),
        ("/v1/messages", {"model": MODEL, "messages": long_chat, "max_tokens": 1, "stream": True}, "event: ping"),
        ("/v1/responses", {"model": MODEL, "input": long_chat, "max_output_tokens": 1, "stream": True}, ": "),
    ]:
        with httpx.stream("POST", server.url + path, json=payload, headers={"x-api-key": KEY}, timeout=120) as answer:
            lines = list(answer.iter_lines())
        assert answer.status_code == 200 and any(line.startswith(alive) for line in lines), lines[:5]


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server):

    import httpx

    payload = {"model": MODEL, "messages": CHAT, "max_tokens": 2000, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=payload, headers={"x-api-key": KEY},
                      timeout=120) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: ") and "content" in line:
                break  # the generation runs; now hang up
    deadline = time.monotonic() + 20
    while server.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.stats()["running"] == 0  # long before 2000 tokens

    # Not streamed: the server notices within a second that nobody waits any more.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**payload, "stream": False}, headers={"x-api-key": KEY},
                   timeout=httpx.Timeout(120, read=1.5))
    assert server.engine.stats()["running"] == 1
    deadline = time.monotonic() + 20
    while server.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.stats()["running"] == 0


def test_fix_runs_end_to_end_against_the_server(server, tmp_path, monkeypatch: pytest.MonkeyPatch):
    import typer
    from typer.testing import CliRunner

    from agent.cli.fix import fix_cmd
    from tests.fixtures_agent import isolate, make_repo

    isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("V4AGENT_API_KEY", KEY)
    app = typer.Typer()
    app.command()(fix_cmd)
    result = CliRunner().invoke(app, ["add is wrong", "--repo", str(make_repo(tmp_path / "repo")), "--endpoint",
                                      server.url + "/v1", "--model", MODEL, "--context-limit", str(LIMIT),
                                      "--max-turns", "2", "--max-turn-tokens", "8", "--json"])
    out = json.loads(result.stdout)
    assert (out["stop"], out["turns"], out["error"]) == ("max_turns", 2, None), result.stderr
    assert out["context_limit"] == LIMIT
    records = [json.loads(line) for line in Path(out["trajectory"]).read_text().splitlines()]
    usage = [r["details"]["usage"] for r in records if r["type"] == "turn"]
    assert [r["details"]["finish_reason"] for r in records if r["type"] == "turn"] == ["length", "length"]
    assert [u["completion_tokens"] for u in usage] == [8, 8]
    # Turn 2 holds turn 1 and what the agent said after it.
    assert usage[1]["prompt_tokens"] > usage[0]["prompt_tokens"] + 8
    # ... and the engine continued the conversation instead of computing turn 1 again.
    assert usage[1]["prompt_tokens_details"]["cached_tokens"] >= usage[0]["prompt_tokens"]


def serve_command(*args: str):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "from agent.cli import main; main()", "serve", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)


def test_v4agent_serve_starts_on_loopback_and_stops_on_ctrl_c(tiny, monkeypatch: pytest.MonkeyPatch):
    """... and a generation still streaming when the signal comes ends at once: the server does
    not wait for it to run out (it would take minutes here)."""
    import signal
    import subprocess
    import threading

    monkeypatch.setenv("V4AGENT_API_KEY", "sk-from-env")
    process = serve_command("--weights", str(tiny), "--port", "0", "--device", "cpu", "--precision", "exact",
                            "--kv-budget-mb", "0")
    try:
        line = process.stderr.readline()
        assert line.startswith(f"serving {tiny.name} on http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" on ")[1].split()[0]
        import httpx

        assert httpx.get(url + "/models", timeout=30).status_code == 401  # the key from the environment holds
        key = {"Authorization": "Bearer sk-from-env"}
        answer = httpx.get(url + "/models", headers=key, timeout=30)
        assert answer.json()["data"][0]["id"] == tiny.name
        chat = {"model": tiny.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(url + "/chat/completions", json=chat, headers=key, timeout=60).status_code == 200
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers=key, timeout=30).text
        assert "v4agent_engine_evictions 1" in metrics, metrics  # no room to keep the conversation
        streaming, lines = threading.Event(), []

        def stream() -> None:
            long = {**chat, "max_tokens": 1_000_000, "stream": True, "temperature": 1.0}
            with httpx.stream("POST", url + "/chat/completions", json=long, headers=key, timeout=60) as answer:
                for line in answer.iter_lines():
                    lines.append(line)
                    streaming.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert streaming.wait(60)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0
    reader.join(10)
    assert not reader.is_alive() and "data: [DONE]" in lines[-3:], lines[-3:]


@pytest.mark.parametrize("args, message", [
    (["--weights", "/nonexistent"], "no such directory"),
    (["--weights", ".", "--device", "tpu"], "--device must be"),
    (["--weights", ".", "--precision", "fp4"], "--precision must be"),
    (["--weights", ".", "--host", "203.0.113.1"], "cannot listen on 203.0.113.1"),
    (["--weights", ".", "--kv-budget-mb", "-1"], "--kv-budget-mb must be"),
])
def test_serve_usage_errors_exit_2(args: list[str], message: str):
    process = serve_command(*args)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and stderr.startswith("error: ") and message in stderr


def test_concurrent_clients_get_their_solo_answers(server):
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(server)

    def ask(n: int, stream: bool) -> str:
        messages = [{"role": "user", "content": f"question {n}: " + "why " * n}]
        fields = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, "reasoning_effort": "none"}
        if not stream:
            return client.chat.completions.create(**fields).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**fields, stream=True))

    solo = [ask(n, False) for n in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4), [n % 2 == 0 for n in range(4)]))
    assert together == solo and len(set(solo)) > 1


def test_a_stream_whose_client_left_before_it_began_cancels_too(server, tiny):
    """The client is gone while the answer's headers are still being sent: the event generator
    never starts, so its own cleanup cannot cancel the generation; the response's does."""

    from starlette.requests import Request

    from runtime.serve.http import _EventStream

    async def leave() -> None:
        chat = openai_api.parse_request({"model": MODEL, "messages": CHAT, "max_tokens": 2000, "temperature": 0})
        generation = await server.service.start(chat)
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "v4agent": {}}

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await asyncio.sleep(0.5)  # a slow network: the disconnect is noticed first

        sse = openai_api.stream_events(generation.events(), MODEL, 0, False)
        await _EventStream(generation, Request(scope), sse)(scope, receive, send)

    asyncio.run(leave())
    deadline = time.monotonic() + 20
    while server.engine.stats()["running"] + server.engine.stats()["waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.stats()["running"] + server.engine.stats()["waiting"] == 0


def test_every_interface_without_a_key_is_warned_about(tmp_path):
    process = serve_command("--weights", str(tmp_path), "--host", "0.0.0.0", "--port", "0", "--device", "cpu")
    _, stderr = process.communicate(timeout=120)
    assert stderr.startswith("warning: listening on 0.0.0.0 without --api-key: anyone who can reach it")
    assert process.returncode == 2 and "\nerror: " in stderr  # an empty directory is no checkpoint


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow  # 64 clients x 2 rounds x 2 requests on the CPU: ~3 min on 2 busy cores
def test_64_concurrent_clients_no_errors_bounded_memory_solo_answers(server):
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(server)
    prompts = [f"case {n}: " + "edge " * n for n in range(8)]

    def ask(prompt: str, stream: bool) -> str:
        fields = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 3,
                  "temperature": 0, "reasoning_effort": "none"}
        if not stream:
            return client.chat.completions.create(**fields).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**fields, stream=True))

    solo = {prompt: ask(prompt, False) for prompt in prompts}

    def loop(n: int) -> list[tuple[str, str]]:
        return [(prompts[(n + k) % 8], ask(prompts[(n + k) % 8], (n + k) % 2 == 0)) for k in range(2)]

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(loop, range(64)))  # a warm-up round: connection pools, caches
        before = _rss_bytes()
        answers = [pair for pairs in pool.map(loop, range(64)) for pair in pairs]
    assert len(answers) == 128 and all(answer == solo[prompt] for prompt, answer in answers)
    assert _rss_bytes() - before < 256 << 20
    assert server.engine.stats()["errors"] == 0
