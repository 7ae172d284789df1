"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 speaking chat
completions with SSE streaming: a tool-call round trip through the agent (the server checks the
reasoning comes back), errors with the server's message, bounded retries."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.backends import BackendError, Request
from agent.backends.http import HttpBackend, reasoning_fields
from runtime.encoding import PromptEncoder
from agent.loop import SUBMITTED, Agent, AgentConfig
from agent.trajectory import Trajectory
from runtime.tokenizer import load_tokenizer
from tests.fixtures_agent import isolate, make_repo

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


class Server:
    """Answers the n-th POST with answers[n] (the last one from then on); keeps every request."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = answers
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, payload = server.answers[min(len(server.requests), len(server.answers)) - 1](body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                for start in range(0, len(payload), 97):  # streamed in pieces that cut through events
                    self.wfile.write(payload[start:start + 97])
                    self.wfile.flush()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(*answers: Answer) -> Server:
        servers.append(Server(*answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


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
