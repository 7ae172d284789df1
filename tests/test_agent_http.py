"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 speaking chat
completions with SSE streaming: a tool-call round trip through the agent (the server checks the
reasoning comes back), errors with the server's message, bounded retries."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from agent.backends import BackendError, Request
from agent.backends.http import HttpBackend, reasoning_fields
from runtime.encoding import PromptEncoder
from agent.loop import SUBMITTED, Agent, AgentConfig
from agent.trajectory import Trajectory
from runtime.tokenizer import load_tokenizer
from tests.fixtures_agent import isolate, make_repo
from tests.fixtures_http import endpoints

LIMIT = 1_048_576
Answer = Callable[[dict], tuple[int, dict, bytes]]


def sse(*chunks: dict) -> tuple[int, dict, bytes]:
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b": keep-alive\n\ndata: [DONE]\n\n"
    return 200, {"Content-Type": "text/event-stream"}, body


def delta(**fields) -> dict:
    return {"choices": [{"index": 0, "delta": fields}]}


def finish(reason: str, usage: dict | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}], **({"usage": usage} if usage else {})}


def error(status: int, message: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    body = json.dumps({"error": {"message": message}}).encode()
    return status, {"Content-Type": "application/json", **(headers or {})}, body


@pytest.fixture
def serve():
    """`serve(*answers)`: the n-th POST gets answers[n](body) (the last one from then on), streamed
    in pieces that cut through events."""
    with endpoints() as start:
        def scripted(*answers: Answer):
            calls = itertools.count(1)

            def answer(handler: BaseHTTPRequestHandler) -> None:
                body = endpoint.requests[-1]["body"]
                status, headers, payload = answers[min(next(calls), len(answers)) - 1](body)
                handler.send_response(status)
                for key, value in headers.items():
                    handler.send_header(key, value)
                handler.end_headers()
                for start_at in range(0, len(payload), 97):
                    handler.wfile.write(payload[start_at:start_at + 97])
                    handler.wfile.flush()

            endpoint = start(answer)
            return endpoint

        yield scripted


def backend(url: str, **options) -> HttpBackend:
    return HttpBackend(url, "deepseek-v4-flash", "sk-test", context_limit=LIMIT, backoff_s=0.001, **options)


def request(think: str = "high") -> Request:
    messages = [{"role": "system", "content": "s", "tools": []}, {"role": "user", "content": "hi"}]
    return Request(messages, [0, 1], 64, think)


def test_a_tool_call_round_trip_sends_the_reasoning_back(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, tmp_path)
    repo = make_repo(tmp_path / "repo")
    first = sse(
        delta(role="assistant", reasoning_content="I should read "), delta(reasoning_content="calc.py first."),
        delta(tool_calls=[{"index": 0, "id": "srv_1", "type": "function",
                           "function": {"name": "read_file", "arguments": ""}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"path": '}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '"calc.py"}'}}]),
        finish("tool_calls"), {"choices": [], "usage": {"prompt_tokens": 1400, "prompt_cache_hit_tokens": 1024}})

    def second(body: dict):
        assistant, tool = body["messages"][-2:]
        if assistant.get("reasoning_content") != "I should read calc.py first.":
            return error(400, "reasoning_content of the tool-call turn was not sent back")
        if tool.get("tool_call_id") != assistant["tool_calls"][0]["id"] or "return a - b" not in tool["content"]:
            return error(400, "the tool result does not answer the call")
        return sse(delta(reasoning_content="Subtracts."), delta(content="Found it."),
                   delta(tool_calls=[{"index": 0, "id": "srv_2", "type": "function",
                                      "function": {"name": "submit", "arguments": '{"summary": "seen"}'}}]),
                   finish("tool_calls", {"prompt_tokens": 1500, "prompt_tokens_details": {"cached_tokens": 1400}}))

    server = serve(lambda body: first, second)
    tokenizer = load_tokenizer()
    agent = Agent(backend(server.url), tokenizer, repo, config=AgentConfig(max_turn_tokens=2048),
                  trajectory=Trajectory(tmp_path / "t.jsonl"))
    result = agent.run("add is wrong")
    assert (result.stop, result.turns, result.summary, result.error) == (SUBMITTED, 2, "seen", None)
    assert result.cached_tokens == 1024 + 1400

    call = server.requests[0]
    assert call["path"] == "/v1/chat/completions"
    assert call["headers"]["Authorization"] == "Bearer sk-test"
    body = call["body"]
    assert body["stream"] is True and body["model"] == "deepseek-v4-flash" and body["max_tokens"] == 2048
    assert body["chat_template_kwargs"] == {"thinking": True, "reasoning_effort": "high"}
    assert "tools" not in body["messages"][0] and "submit" in [t["function"]["name"] for t in body["tools"]]
    # What the server said, written in V4's format, is what the context count holds.
    assert agent.conversation.ids == PromptEncoder(tokenizer).encode(agent.conversation.messages)


def test_a_reply_cut_at_max_tokens_is_a_cut_off_turn(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, tmp_path)
    server = serve(lambda body: sse(delta(reasoning_content="Long thoughts"), finish("length")),
                   lambda body: sse(delta(tool_calls=[{"index": 0, "id": "x", "function": {
                       "name": "submit", "arguments": '{"summary": "s"}'}}]), finish("tool_calls")))
    agent = Agent(backend(server.url), load_tokenizer(), make_repo(tmp_path / "repo"),
                  trajectory=Trajectory(tmp_path / "t.jsonl"))
    assert agent.run("x").stop == SUBMITTED
    told = server.requests[1]["body"]["messages"][-1]
    assert told["role"] == "user" and "cut off" in told["content"]


def test_errors_carry_status_and_server_message(serve):
    server = serve(lambda body: error(400, "Model Not Exist"))
    with pytest.raises(BackendError, match=r"answered HTTP 400 Bad Request: Model Not Exist"):
        backend(server.url).complete(request(), lambda e: None)
    assert len(server.requests) == 1  # a client error is not retried

    server = serve(lambda body: (200, {"Content-Type": "application/json"}, b'{"choices": []}'))
    with pytest.raises(BackendError, match="instead of an event stream"):
        backend(server.url).complete(request(), lambda e: None)


def test_overload_and_server_errors_are_retried_a_bounded_number_of_times(serve):
    answer = sse(delta(content="ok"), finish("stop"))
    server = serve(lambda b: error(503, "busy"), lambda b: error(429, "slow down", {"Retry-After": "0"}),
                   lambda b: answer)
    completion = backend(server.url).complete(request(), lambda e: None)
    assert completion.message.content == "ok" and completion.details["attempts"] == 3

    server = serve(lambda b: error(500, "kaput"))
    with pytest.raises(BackendError, match=r"HTTP 500 Internal Server Error \(3 attempts\): kaput"):
        backend(server.url, retries=2).complete(request(), lambda e: None)
    assert len(server.requests) == 3

    closed = serve(lambda b: answer)
    closed.close()
    with pytest.raises(BackendError, match=r"cannot reach .*\(2 attempts\)"):
        backend(closed.url, retries=1).complete(request(), lambda e: None)


def test_thinking_fields_per_server_kind(serve):
    assert reasoning_fields("deepseek", "max") == {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}
    assert reasoning_fields("deepseek", "none") == {"thinking": {"type": "disabled"}}
    assert reasoning_fields("chat_template_kwargs", "none") == {"chat_template_kwargs": {"thinking": False}}
    assert reasoning_fields("none", "max") == {}
    assert HttpBackend("https://api.deepseek.com/v1", "m", context_limit=LIMIT).reasoning == "deepseek"
    assert HttpBackend("http://localhost:8000/v1", "m", context_limit=LIMIT).reasoning == "chat_template_kwargs"
    with pytest.raises(BackendError, match="http"):
        HttpBackend("localhost:8000", "m", context_limit=LIMIT)
