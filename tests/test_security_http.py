"""A hostile or broken endpoint against the HTTP backend, on real servers on 127.0.0.1: a trickle
that would hold the agent forever, answers big enough to exhaust memory, streams that are not
what they claim to be, and secrets (URL userinfo, the API key, secret-looking environment
variables) that must never be shown or written."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from agent.backends import BackendError, Request
from agent.backends.http import HttpBackend, read_stream
from agent.cli.fix import fix_cmd, replay_cmd
from agent.trajectory import Trajectory, redact, secret_values
from tests.fixtures_agent import isolate, make_repo
from tests.fixtures_http import Answer, Endpoint, endpoints

MAX_TURN_TOKENS = 32_768  # the default max_turn_tokens
MB = 1_000_000


@pytest.fixture
def serve():
    with endpoints() as start:
        yield start


def begin(handler: BaseHTTPRequestHandler, status: int = 200, kind: str = "text/event-stream",
          headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Transfer-Encoding", "chunked")
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()


def send(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    """One chunk of the body (an empty one ends it)."""
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


def streaming(parts: Callable[[], Iterator[bytes]], status: int = 200, kind: str = "text/event-stream",
              headers: dict[str, str] | None = None) -> Answer:
    """An answer whose body is `parts()`, each sent as it comes, then ended."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        begin(handler, status, kind, headers)
        for part in parts():
            send(handler, part)
        send(handler, b"")
    return answer


def body(data: bytes, status: int = 200, kind: str = "text/event-stream", headers: dict[str, str] | None = None
         ) -> Answer:
    return streaming(lambda: iter([data]), status, kind, headers)


def event(chunk: object) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def delta(**fields) -> dict:
    return {"choices": [{"index": 0, "delta": fields}]}


FINISH = event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n"


def backend(url: str, **options) -> HttpBackend:
    return HttpBackend(url, "deepseek-v4-flash", options.pop("api_key", "sk-test"), context_limit=1 << 20,
                       backoff_s=0.001, **options)


def request(max_tokens: int = 64) -> Request:
    return Request([{"role": "user", "content": "hi"}], [0, 1], max_tokens, "high")


def deadline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "v4agent-http-deadline"]


# ---- a total deadline ------------------------------------------------------------------------

def trickle(piece: bytes, before: bytes = b"") -> Answer:
    """200, then `before`, then `piece` every 50 ms for as long as the client listens."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        begin(handler)
        if before:
            send(handler, before)
        while True:
            send(handler, piece)
            time.sleep(0.05)
    return answer


def trickled_header(handler: BaseHTTPRequestHandler) -> None:
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while True:
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.05)


TRICKLES = {
    "keep-alive comments forever": trickle(b": keep-alive\n\n"),
    "empty events forever": trickle(event(delta())),
    "one event line that never ends": trickle(b"x", before=b"data: "),
    "a header that never ends": trickled_header,
}


@pytest.mark.parametrize("answer", TRICKLES.values(), ids=TRICKLES.keys())
def test_a_trickling_server_is_cut_at_the_deadline(serve, answer: Answer):
    server = serve(answer)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"did not finish its answer within timeout_s = 1 s \(the whole request"):
        backend(server.url, timeout_s=1.0).complete(request(), lambda e: None)
    assert time.monotonic() - start < 3.0


def test_a_server_that_accepts_and_never_answers_is_cut_at_the_deadline():
    with socket.create_server(("127.0.0.1", 0)) as listening:  # the kernel accepts; nobody answers
        start = time.monotonic()
        with pytest.raises(BackendError, match=r"within timeout_s = 0.5 s"):
            backend(f"http://127.0.0.1:{listening.getsockname()[1]}/v1", timeout_s=0.5).complete(
                request(), lambda e: None)
        assert time.monotonic() - start < 2.5


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_the_deadline_holds_over_tls(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client's default context trusts it
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = serve(trickle(b": keep-alive\n\n"), tls=context)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"https://127.0.0.1:\d+/v1/chat/completions did not finish"):
        backend(server.url, timeout_s=1.0).complete(request(), lambda e: None)
    assert time.monotonic() - start < 3.0


def test_keep_alives_within_the_deadline_are_fine_and_no_watchdog_is_left(serve):
    def slow_start() -> Iterator[bytes]:
        for _ in range(6):
            yield b": keep-alive\n\n"
            time.sleep(0.05)
        yield event(delta(content="ok")) + FINISH

    server = serve(streaming(slow_start))
    completion = backend(server.url, timeout_s=10.0).complete(request(), lambda e: None)
    assert completion.message.content == "ok"
    for _ in range(40):
        if not deadline_threads():
            break
        time.sleep(0.025)
    assert not deadline_threads()


def test_retries_never_wait_past_the_deadline(serve):
    overloaded = body(json.dumps({"error": {"message": "busy"}}).encode(), 503, "application/json",
                      {"Retry-After": "30"})
    server = serve(overloaded)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"HTTP 503 .*\(1 attempts; waiting 30 s for another would pass "
                                           r"timeout_s = 2 s\): busy"):
        backend(server.url, timeout_s=2.0).complete(request(), lambda e: None)
    assert time.monotonic() - start < 1.5


# ---- caps on the answer's size ----------------------------------------------------------------

def text_deltas(size: int) -> Iterator[bytes]:
    piece = event(delta(content="x" * 40))
    for _ in range(size // len(piece)):
        yield piece
    yield FINISH


def one_event(size: int) -> Iterator[bytes]:
    yield b'data: {"choices": [{"index": 0, "delta": {"content": "'
    for _ in range(size // 65536):
        yield b"x" * 65536
    yield b'"}}]}\n\n' + FINISH


def tool_calls(size: int) -> Iterator[bytes]:
    for index in range(size // 60):
        yield event(delta(tool_calls=[{"index": index}]))
    yield FINISH


def argument_pieces(size: int) -> Iterator[bytes]:
    yield event(delta(tool_calls=[{"index": 0, "function": {"name": "read_file", "arguments": ""}}]))
    piece = event(delta(tool_calls=[{"index": 0, "function": {"arguments": "x" * 20}}]))
    for _ in range(size // len(piece)):
        yield piece
    yield FINISH


def empty_events(size: int) -> Iterator[bytes]:
    piece = event(delta()) * 100
    for _ in range(size // len(piece)):
        yield piece


def lines(size: int) -> Iterator[bytes]:
    """One event of a million short data lines (per-line objects were the old blow-up)."""
    for _ in range(size // 65536):
        yield b"data: x\n" * 8192
    yield b"\n" + FINISH


SHAPES = {"text deltas": text_deltas, "one event": one_event, "tool calls": tool_calls,
          "argument pieces": argument_pieces, "data lines": lines}


def peak_bytes(run: Callable[[], object]) -> tuple[object, int]:
    """What run() returned or raised, and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        outcome = run()
    except BackendError as e:
        outcome = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return outcome, peak


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_a_30_mb_answer_stops_at_the_cap_in_bounded_memory(serve, shape: Callable[[int], Iterator[bytes]]):
    server = serve(streaming(lambda: shape(30 * MB)))
    outcome, peak = peak_bytes(lambda: backend(server.url).complete(request(MAX_TURN_TOKENS), lambda e: None))
    assert isinstance(outcome, BackendError), outcome
    assert "over its cap for max_tokens = 32,768" in str(outcome)
    assert peak < 12 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_long_answer_within_its_caps_completes(serve):
    pieces = [event(delta(reasoning_content="abcd")) for _ in range(30_000)] + [FINISH]
    server = serve(streaming(lambda: iter(pieces)))
    completion = backend(server.url).complete(request(MAX_TURN_TOKENS), lambda e: None)
    assert completion.message.reasoning == "abcd" * 30_000


def test_bytes_past_the_cap_are_refused(serve):
    server = serve(streaming(lambda: empty_events(MB)))
    with pytest.raises(BackendError, match=r"over its cap for max_tokens = 64 \(it is over 327,680 bytes; at most "
                                           r"320 tokens, 5,120 characters, 327,680 bytes\): the server does not "
                                           r"respect max_tokens"):
        backend(server.url).complete(request(64), lambda e: None)


def test_a_server_counting_more_tokens_than_asked_is_refused(serve):
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1_000_000}}
    server = serve(body(event(delta(content="hi")) + event(usage) + FINISH))
    with pytest.raises(BackendError, match="the server counts 1,000,000 completion tokens"):
        backend(server.url).complete(request(64), lambda e: None)


AGENT_RUN = """
import json, resource, sys
from pathlib import Path
from agent.backends.http import HttpBackend
from agent.loop import Agent, AgentConfig
from agent.trajectory import Trajectory
from runtime.tokenizer import load_tokenizer

url, root = sys.argv[1], Path(sys.argv[2])
agent = Agent(HttpBackend(url, "m", context_limit=1 << 20), load_tokenizer(), root / "repo",
              config=AgentConfig(max_turns=1), trajectory=Trajectory(root / "t.jsonl"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = agent.run("x")
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"stop": result.stop, "error": result.error, "grown_kib": grown}))
"""


def agent_memory(serve, tmp_path: Path, size: int) -> dict:
    """A whole agent turn in a fresh process against an answer of `size` bytes: how it ended
    and how far its peak RSS grew (the tokenizer is native code: only RSS sees it)."""
    make_repo(tmp_path / "repo")
    server = serve(streaming(lambda: one_event(size)))
    done = subprocess.run([sys.executable, "-c", AGENT_RUN, server.url, str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_agent_survives_a_30_mb_answer_in_bounded_memory(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Before the caps the agent tokenized all 30 MB of it: 2.4 GB of RSS.
    isolate(monkeypatch, tmp_path)
    outcome = agent_memory(serve, tmp_path, 30 * MB)
    assert outcome["stop"] == "backend_error" and "over its cap" in outcome["error"]
    assert outcome["grown_kib"] < 64 * 1024, outcome


@pytest.mark.slow
def test_the_agent_survives_a_300_mb_answer_in_bounded_memory(serve, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, tmp_path)
    outcome = agent_memory(serve, tmp_path, 300 * MB)
    assert outcome["stop"] == "backend_error" and "over its cap" in outcome["error"]
    assert outcome["grown_kib"] < 64 * 1024, outcome


# ---- malformed streams -------------------------------------------------------------------------

NOT_A_STREAM = "is not an OpenAI-style chat completions stream: "
MALFORMED = {
    "invalid UTF-8": (b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}\n\n', r"event 1 is not UTF-8 text"),
    "a JSON list": (b"data: [1, 2]\n\n", NOT_A_STREAM + "event 1 is a list, not an object"),
    "a JSON number": (b"data: 42\n\n", NOT_A_STREAM + "event 1 is a number, not an object"),
    "a JSON string": (b'data: "hello"\n\n', NOT_A_STREAM + "event 1 is a string, not an object"),
    "null": (b"data: null\n\n", NOT_A_STREAM + "event 1 is null, not an object"),
    "not JSON": (b"data: {nope\n\n", NOT_A_STREAM + "event 1 is not JSON: '{nope'"),
    "nested too deep": (b"data: " + b"[" * 200_000 + b"\n\n", NOT_A_STREAM + "event 1 is not JSON"),
    "content a number": (event(delta(content=5)), r"event 1: choices\[0\].delta.content is a number, not a string"),
    "delta a list": (event({"choices": [{"delta": ["a"]}]}), r"choices\[0\].delta is a list, not an object"),
    "choices an object": (event({"choices": {"0": {}}}), r"event 1.choices is an object, not a list"),
    "a choice a string": (event({"choices": ["x"]}), r"choices\[0\] is a string, not an object"),
    "two choices": (event({"choices": [{}, {}]}), r"event 1 has 2 choices; one was asked for"),
    "tool_calls an object": (event(delta(tool_calls={"index": 0})), r"delta.tool_calls is an object, not a list"),
    "index a string": (event(delta(tool_calls=[{"index": "0"}])), r"tool_calls\[0\].index is a string, not a number"),
    "index true": (event(delta(tool_calls=[{"index": True}])), r"tool_calls\[0\].index is true or false"),
    "name a number": (event(delta(tool_calls=[{"function": {"name": 7}}])), r"function.name is a number"),
    "finish_reason a number": (event({"choices": [{"delta": {}, "finish_reason": 1}]}), r"finish_reason is a number"),
    "usage a list": (event({"choices": [], "usage": [1]}), r"event 1.usage is a list, not an object"),
    "a lone surrogate": (b'data: {"choices": [{"delta": {"content": "\\ud800"}}]}\n\n', r"a lone surrogate"),
    "no fields at all": (event({}) + b"data: [DONE]\n\n", r"ended after 1 events without a finish reason: "),
    "a truncated event": (b'data: {"choices": [{"delta": {"content": "hal',
                          r"ended after 0 events without a finish reason \(its last event cut off\)"),
    "an HTML page as the stream": (b"<html><body>502 Bad Gateway</body></html>\n",
                                   r"held no events \(it began b'<html><body>502 Bad Gateway"),
    "no data at all": (b"", r"held no events \(it was empty\): is this an OpenAI-compatible"),
    "an error mid-stream": (event(delta(content="a")) + event({"error": {"message": "overloaded"}}),
                            r"reported an error mid-stream: overloaded"),
}


@pytest.mark.parametrize(("data", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_stream_is_a_clear_backend_error(serve, data: bytes, message: str):
    server = serve(body(data))
    with pytest.raises(BackendError, match=message):
        backend(server.url).complete(request(), lambda e: None)


def test_an_html_page_with_200_is_a_clear_backend_error(serve):
    server = serve(body(b"<html><body>Welcome to nginx!</body></html>", kind="text/html"))
    with pytest.raises(BackendError, match=r"answered text/html instead of an event stream \(is http://127.0.0.1:\d+/v1 "
                                           r"the API base, such as https://host/v1\?\): <html><body>Welcome"):
        backend(server.url).complete(request(), lambda e: None)


def test_a_connection_cut_mid_chunk_is_a_clear_backend_error(serve):
    def cut(handler: BaseHTTPRequestHandler) -> None:
        begin(handler)
        handler.wfile.write(b"400\r\n" + event(delta(content="half")))  # promises 1 KiB, sends less, hangs up
    server = serve(cut)
    with pytest.raises(BackendError, match="the stream from .* broke off: "):
        backend(server.url).complete(request(), lambda e: None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """A field as it should be, or any JSON value at all."""
    return strategy | json_values


chunks_like_openai = st.fixed_dictionaries({}, optional={
    "choices": maybe(st.lists(st.fixed_dictionaries({}, optional={
        "delta": maybe(st.fixed_dictionaries({}, optional={
            "content": maybe(st.text(max_size=20)),
            "reasoning_content": maybe(st.text(max_size=20)),
            "tool_calls": maybe(st.lists(st.fixed_dictionaries({}, optional={
                "index": maybe(st.integers(-3, 3)),
                "function": maybe(st.fixed_dictionaries({}, optional={
                    "name": maybe(st.sampled_from(["read_file", "submit", ""])),
                    "arguments": maybe(st.text(max_size=20))}))}), max_size=2))})),
        "finish_reason": maybe(st.sampled_from(["stop", "length", "tool_calls"]))}), max_size=2)),
    "usage": maybe(st.fixed_dictionaries({}, optional={"completion_tokens": maybe(st.integers(0, 10**6)),
                                                       "prompt_cache_hit_tokens": maybe(st.integers())})),
    "error": maybe(st.just({"message": "boom"}))})

sse_events = st.one_of(
    chunks_like_openai.map(event),
    json_values.map(lambda value: b"data: " + json.dumps(value).encode() + b"\n\n"),
    st.binary(max_size=40),
    st.sampled_from([b": keep-alive\n\n", b"data: [DONE]\n\n", b"event: x\nid: 1\n\n", b"\r\n", b"data:", FINISH]))


@st.composite
def streams(draw) -> list[bytes]:
    """Events (well formed, half formed or junk) as bytes, cut into arbitrary chunks."""
    data = b"".join(draw(st.lists(sse_events, max_size=8)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@settings(max_examples=400, deadline=None)
@given(streams(), st.integers(1, 64))
def test_any_stream_parses_or_is_a_backend_error(chunks: list[bytes], max_tokens: int):
    try:
        answer = read_stream(chunks, max_tokens, lambda e: None, "http://test/v1")
    except BackendError:
        return
    assert answer.finish and isinstance(answer.content, str) and isinstance(answer.usage, dict)


@pytest.fixture(scope="module")
def mutable_endpoint():
    """One server for many examples: it answers whatever `endpoint.body` holds."""
    holder: dict[str, list[bytes]] = {"chunks": []}

    def answer(handler: BaseHTTPRequestHandler) -> None:
        begin(handler)
        for chunk in holder["chunks"]:
            if chunk:
                send(handler, chunk)
        send(handler, b"")

    endpoint = Endpoint(answer)
    yield endpoint, holder
    endpoint.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams())
def test_any_stream_from_a_real_server_completes_or_is_a_backend_error(mutable_endpoint, chunks: list[bytes]):
    endpoint, holder = mutable_endpoint
    holder["chunks"] = chunks
    try:
        completion = backend(endpoint.url).complete(request(), lambda e: None)
    except BackendError:
        return
    assert completion.details["finish_reason"]


# ---- secrets ---------------------------------------------------------------------------------

def test_credentials_in_the_endpoint_url_are_never_shown(serve):
    server = serve(body(json.dumps({"error": {"message": "Model Not Exist"}}).encode(), 400, "application/json"))
    url = server.url.replace("http://", "http://alice:s3cr3t-pass@")
    described = backend(url).describe()
    assert described["endpoint"] == server.url.replace("http://", "http://***@")
    with pytest.raises(BackendError) as caught:
        backend(url).complete(request(), lambda e: None)
    assert "***@127.0.0.1" in str(caught.value) and "s3cr3t" not in str(caught.value)
    with pytest.raises(BackendError) as caught:  # nothing listens there
        backend("http://alice:s3cr3t-pass@127.0.0.1:9/v1", retries=0).complete(request(), lambda e: None)
    assert "cannot reach http://***@127.0.0.1:9/v1" in str(caught.value) and "s3cr3t" not in str(caught.value)
    with pytest.raises(BackendError) as caught:
        backend("ftp://alice:s3cr3t-pass@host/v1")
    assert "s3cr3t" not in str(caught.value)


def test_the_api_key_is_never_in_an_error(serve):
    def echo(handler: BaseHTTPRequestHandler) -> None:  # a proxy that shows what it was sent
        message = json.dumps({"error": {"message": f"bad request, headers: {handler.headers['Authorization']}"}})
        body(message.encode(), 400, "application/json")(handler)
    server = serve(echo)
    with pytest.raises(BackendError) as caught:
        backend(server.url, api_key="sk-live-0123456789abcdef").complete(request(), lambda e: None)
    assert "Bearer ***" in str(caught.value) and "0123456789abcdef" not in str(caught.value)


def test_a_refused_key_names_the_variable_it_came_from(serve, monkeypatch: pytest.MonkeyPatch):
    refused = body(json.dumps({"error": {"message": "Authentication Fails"}}).encode(), 401, "application/json")
    server = serve(refused)
    monkeypatch.delenv("V4AGENT_API_KEY", raising=False)
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-from-deepseek-variable")
    with pytest.raises(BackendError, match=r"HTTP 401 Unauthorized: Authentication Fails\nCheck the API key: the key "
                                           r"sent is DEEPSEEK_API_KEY's; the first of V4AGENT_API_KEY, "):
        backend(server.url, api_key="sk-from-deepseek-variable").complete(request(), lambda e: None)
    with pytest.raises(BackendError, match=r"No API key was sent: put it in V4AGENT_API_KEY \(or DEEPSEEK_API_KEY"):
        backend(server.url, api_key=None).complete(request(), lambda e: None)


def test_redaction_masks_secret_values_and_userinfo_and_leaves_the_rest():
    environ = {"V4AGENT_API_KEY": "sk-live-abcdefgh", "GITHUB_TOKEN": "ghp_abcdefgh12345678",
               "PGPASSWORD": "correct horse", "AWS_SECRET_ACCESS_KEY": "aws/secret+value",
               "TOKENIZERS_PARALLELISM": "false", "HOME": "/root/verylongpath", "PATH": "/usr/bin:/bin"}
    hidden = secret_values(environ)
    assert set(hidden) == {"sk-live-abcdefgh", "ghp_abcdefgh12345678", "correct horse", "aws/secret+value"}
    record = {"type": "turn", "output": ["key sk-live-abcdefgh, pw correct horse", {"false": "/root/verylongpath"}],
              "url": "git clone https://x-access-token:ghp_zz@github.com/o/r and ssh://git@host:22/r",
              "ghp_abcdefgh12345678": 3, "plain": "http://host/a@b"}
    assert redact(record, hidden) == {
        "type": "turn", "output": ["key ***, pw ***", {"false": "/root/verylongpath"}],
        "url": "git clone https://***@github.com/o/r and ssh://***@host:22/r", "***": 3, "plain": "http://host/a@b"}


def test_the_trajectory_on_disk_holds_no_secret(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = isolate(monkeypatch, tmp_path)
    repo = make_repo(tmp_path / "repo")
    key, token = "sk-live-9f8e7d6c5b4a", "ghp_0123456789abcdefABCDEF"
    monkeypatch.setenv("V4AGENT_API_KEY", key)
    monkeypatch.setenv("GITHUB_TOKEN", token)
    said = f"The key is {key}, the token {token}, see https://bob:hunter22@example.com/x."
    turns = iter([event(delta(reasoning_content=said, content=said))
                  + event(delta(tool_calls=[{"index": 0, "id": "a", "function": {
                      "name": "read_file", "arguments": json.dumps({"path": f"{key}.txt"})}}]))
                  + event({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
                  event(delta(tool_calls=[{"index": 0, "id": "b", "function": {
                      "name": "submit", "arguments": json.dumps({"summary": said})}}]))
                  + event({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})])
    server = serve(lambda handler: body(next(turns))(handler))
    app = typer.Typer()
    app.command("fix")(fix_cmd)
    app.command("replay")(replay_cmd)
    endpoint = server.url.replace("http://", "http://alice:s3cr3t-pass@")
    result = CliRunner().invoke(app, ["fix", "x", "--repo", str(repo), "--endpoint", endpoint, "--model", "m",
                                      "--json"])
    assert json.loads(result.stdout)["stop"] == "submitted", result.output
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {key}"  # the key did go to the server
    [run] = (cache / "runs").iterdir()
    written = (run / "trajectory.jsonl").read_text()
    for secret in (key, token, "s3cr3t-pass", "hunter22"):
        assert secret not in written
    assert "http://***@127.0.0.1" in written and "The key is ***, the token ***" in written
    assert "https://***@example.com/x" in written


def test_a_lone_surrogate_round_trips_through_the_trajectory(tmp_path: Path):
    """A model's JSON can spell \\ud800, which UTF-8 cannot hold: the record is still written, and
    read back as the same string."""
    from agent.trajectory import read_trajectory

    trajectory = Trajectory(tmp_path / "trajectory.jsonl")
    trajectory.write({"type": "run", "issue": "x"})
    trajectory.write({"type": "turn", "arguments": "{\"path\": \"a\ud800b\"}", "name\udcff": "é"})
    assert read_trajectory(trajectory.path)[1] == {"type": "turn", "arguments": "{\"path\": \"a\ud800b\"}",
                                                   "name\udcff": "é"}
