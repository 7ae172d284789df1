"""The bounded waiting queue of `v4agent serve`, for real: uvicorn on 127.0.0.1, the engine on a
tiny checkpoint with one running slot and one waiting place, both taken. Past them a request is refused the
way each API refuses an overloaded one (OpenAI: 429 rate_limit_exceeded; Anthropic: 529
overloaded_error) with Retry-After, the running and queued requests go on untouched, and the
official SDKs and the agent's own HTTP backend retry until the queue drains."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agent.backends import BackendError, Request
from agent.backends.http import HttpBackend
from runtime.tokenizer import load_tokenizer
from tests.test_agent_http import serve  # noqa: F401 - the fixture: a scripted HTTP server
from tests.test_serve_http import CHAT, KEY, LIMIT, MODEL, Serving

HEADERS = {"x-api-key": KEY}


class Queued(Serving):
    """The server with max_running 1 and max_waiting 1, its engine not stepping until `drain()`:
    so the queue stays full as long as a test needs, and costs no CPU meanwhile."""

    def __init__(self, model, tokenizer) -> None:
        from runtime.serve.engine import Engine
        from runtime.serve.http import create_app
        from runtime.serve.service import Service

        self.engine = Engine(model, detokenize=tokenizer.decode, max_running=1, max_waiting=1, context_limit=LIMIT)
        super().__init__(create_app(Service(self.engine, tokenizer, MODEL, LIMIT, keepalive_s=0.05), api_key=KEY))
        self.draining = False

    def drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.engine.start()

    def close(self) -> None:
        super().close()
        self.engine.close()

    def wait_for(self, **wanted: int) -> None:
        deadline = time.monotonic() + 30
        while any(self.engine.stats()[k] != v for k, v in wanted.items()):
            assert time.monotonic() < deadline, self.engine.stats()
            time.sleep(0.02)

    def metric(self, line_start: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=HEADERS, timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.fixture(scope="module")
def tiny(tiny_v4):
    from runtime import load

    return load(tiny_v4), load_tokenizer(tiny_v4)


@pytest.fixture
def server(tiny) -> Iterator[Queued]:
    """The server with its queue full: two requests (a stream and a plain one) hold the running
    slot and the waiting place until `server.drain()`; both must then be answered in full."""
    server = Queued(*tiny)

    def ask(stream: bool) -> tuple[int, str]:
        payload = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "temperature": 0, "stream": stream}
        answer = httpx.post(server.url + "/v1/chat/completions", json=payload, headers=HEADERS, timeout=120)
        return answer.status_code, answer.text

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, True)
        server.wait_for(waiting=1)
        second = pool.submit(ask, False)
        server.wait_for(waiting=2)
        try:
            yield server
        finally:
            server.drain()
            answers = [first.result(60), second.result(60)]
            server.close()
    assert [status for status, _ in answers] == [200, 200]
    assert "data: [DONE]" in answers[0][1] and json.loads(answers[1][1])["choices"][0]["finish_reason"] == "length"


def test_a_full_queue_is_refused_in_each_apis_overload_shape(server):
    import anthropic
    import openai

    rejected = server.metric("v4agent_engine_rejected")
    with pytest.raises(openai.RateLimitError) as raised:
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30).chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=2)
    error = raised.value
    assert error.status_code == 429 and error.response.headers["retry-after"] == "1"
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests") and "busy" in error.message

    with pytest.raises(anthropic.OverloadedError) as raised:
        anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=30).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 529 and raised.value.response.headers["retry-after"] == "1"
    assert raised.value.body["error"]["type"] == "overloaded_error"

    answer = httpx.post(server.url + "/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2},
                        headers=HEADERS, timeout=30)
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "rate_limit_exceeded"
    streamed = httpx.post(server.url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": CHAT, "max_tokens": 2, "stream": True},
                          headers=HEADERS, timeout=30)
    assert streamed.status_code == 429  # refused before the stream begins

    # The refused ones are counted; the running and the waiting request are untouched.
    assert server.metric("v4agent_engine_rejected") == rejected + 4
    assert server.metric('v4agent_requests_total{path="/v1/messages",status="529"}') >= 1
    stats = server.engine.stats()
    assert (stats["waiting"], stats["requests"], stats["errors"]) == (2, 2, 0)


def test_the_sdks_and_the_agents_backend_retry_until_the_queue_drains(server):
    import anthropic
    import openai

    def refused() -> float:
        return (server.metric('v4agent_requests_total{path="/v1/chat/completions",status="429"}')
                + server.metric('v4agent_requests_total{path="/v1/messages",status="529"}'))

    before = refused()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=8, timeout=120)
    claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=8, timeout=120)
    # retries=0: a busy server does not use up the retries, only the deadline
    backend = HttpBackend(server.url + "/v1", MODEL, KEY, context_limit=LIMIT, timeout_s=120, retries=0)
    request = Request([{"role": "user", "content": "hi"}], [0, 1], 2, "none")
    with ThreadPoolExecutor(3) as pool:
        sdk = pool.submit(client.chat.completions.create, model=MODEL, messages=CHAT, max_tokens=2)
        sdk2 = pool.submit(claude.messages.create, model=MODEL, max_tokens=2,
                           messages=[{"role": "user", "content": "hi"}])
        ours = pool.submit(backend.complete, request, lambda event: None)
        deadline = time.monotonic() + 30  # all three have been refused at least once
        while refused() < before + 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.drain()
        assert sdk.result(120).choices[0].finish_reason == "length"
        assert sdk2.result(120).stop_reason == "max_tokens"
        completion = ours.result(120)
    assert completion.details["finish_reason"] == "length" and completion.details["attempts"] >= 2


def test_the_agents_backend_gives_up_at_its_deadline_not_before(server):
    backend = HttpBackend(server.url + "/v1", MODEL, KEY, context_limit=LIMIT, timeout_s=2.5, retries=0)
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"HTTP 429 Too Many Requests \(\d+ attempts; waiting 1 s for another "
                                           r"would pass timeout_s = 2.5 s\): the server is busy"):
        backend.complete(Request([{"role": "user", "content": "hi"}], [0, 1], 2, "none"), lambda event: None)
    assert 1.0 < time.monotonic() - started < 2.5


def test_the_engine_refuses_past_running_plus_waiting_and_changes_nothing_else(tiny):
    from runtime.serve.engine import Engine, Finished, GenerationRequest, QueueFull

    engine = Engine(tiny[0], max_running=1, max_waiting=0)  # stepped here, by hand
    first = engine.submit(GenerationRequest([5, 6, 7], max_tokens=1))  # a free slot is room
    with pytest.raises(QueueFull, match="1 waiting"):
        engine.submit(GenerationRequest([5, 6, 8], max_tokens=1))
    assert engine.step()  # the first runs on: admitted, prefilled
    with pytest.raises(QueueFull, match="1 requests running and 0 waiting"):
        engine.submit(GenerationRequest([5, 6, 8], max_tokens=1))
    while engine.step():
        pass
    assert isinstance(first.ready()[-1], Finished)
    engine.submit(GenerationRequest([5, 6, 9], max_tokens=1))  # its slot is free again
    stats = engine.stats()
    assert (stats["rejected"], stats["requests"], stats["errors"]) == (2, 2, 0)


def test_busy_answers_do_not_use_up_the_retries_but_a_spent_quota_fails_at_once(serve):  # noqa: F811
    from tests.test_agent_http import backend, delta, error, finish, request, sse

    answer = sse(delta(content="ok"), finish("stop"))
    busy = [lambda b: error(503, "busy"), lambda b: error(529, "overloaded"),
            lambda b: error(429, "slow down", {"Retry-After": "0"})] * 2
    server = serve(*busy, lambda b: answer)
    completion = backend(server.url, retries=1).complete(request(), lambda e: None)
    assert completion.message.content == "ok" and completion.details["attempts"] == 7

    quota = json.dumps({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                  "code": "insufficient_quota"}}).encode()
    server = serve(lambda b: (429, {"Content-Type": "application/json"}, quota))
    with pytest.raises(BackendError, match="HTTP 429 Too Many Requests: You exceeded your current quota"):
        backend(server.url, retries=3, timeout_s=5).complete(request(), lambda e: None)
    assert len(server.requests) == 1
