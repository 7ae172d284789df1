"""An OpenAI-compatible chat completions server over HTTP(S), streamed as server-sent events;
standard library only (http.client).

`endpoint` is the API base as OpenAI clients take it (`https://api.deepseek.com/v1`,
`http://localhost:8000/v1`); requests go to `endpoint/chat/completions` with the tools and
`stream: true`. Reasoning comes back as `reasoning_content` (or vLLM's newer `reasoning`) and is
sent back on every assistant message, so the server renders thinking interleaved with the tool
calls, as V4 was trained.

Thinking mode and effort, by `reasoning_fields`:
- "deepseek" (the default for *.deepseek.com): `thinking: {"type": "enabled" | "disabled"}` and
  top-level `reasoning_effort: "high" | "max"`, as the DeepSeek API documents;
- "chat_template_kwargs" (the default elsewhere: vLLM, SGLang):
  `chat_template_kwargs: {"thinking": true | false, "reasoning_effort": "high" | "max"}`, what
  their DeepSeek-V4 chat templates read;
- "none": no field at all (the server's defaults).

Errors: a busy server (429, 503, Anthropic-style 529: a full queue, a rate limit) is asked again
with exponential backoff (or after its Retry-After) for as long as `timeout_s` allows — a shared
server whose queue is full drains, and the run should wait for it, not fail; OpenAI's
`insufficient_quota` 429 does not drain and fails at once. Other 5xx answers and connection
failures are retried the same way at most `retries` times; any other status fails at once. Every
failure is a BackendError naming the URL, the status and the server's own message.

A hostile or broken server cannot hold or exhaust the agent: `timeout_s` is the whole
completion, connect to last byte, retries included (a watchdog cuts the connection then, so a
server trickling keep-alives or a header byte by byte cannot stretch it); the answer may take at
most (max_tokens + TOKEN_SLACK) × BYTES_PER_TOKEN bytes on the wire and × CHARS_PER_TOKEN
characters of text (a tool call counts as a token at least), one event at most MAX_EVENT_BYTES;
the stream is read in bounded chunks and held once, so memory follows those caps and not the
answer. Anything that is not the OpenAI streaming format (bytes that are not UTF-8, an event that is not
a JSON object, a field of the wrong type, no finish reason) is a BackendError saying what was
wrong. Credentials in the endpoint URL are never shown (`https://***@host/v1`), the API key and
headers never leave the request.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.backends import BackendError, Completion, Listener, Request
from runtime.dsml import (ContentDelta, End, ParsedMessage, ReasoningDelta, ToolCall, ToolCallComplete,
                        ToolCallStarted)
from runtime.encoding import EOS, EncodingError, PromptSettings, render_completion
from agent.trajectory import redact_text

API_KEY_VARIABLES = ("V4AGENT_API_KEY", "DEEPSEEK_API_KEY", "OPENAI_API_KEY")
REASONING_FIELDS = ("auto", "deepseek", "chat_template_kwargs", "none")
MAX_BACKOFF_S = 30.0
BUSY = (429, 503, 529)  # retried until the deadline
MAX_RETRY_AFTER_S = 60.0
# The caps on one answer, per token it may have (max_tokens plus TOKEN_SLACK, for servers that
# count a few tokens more than they were asked for). V4's longest token is 128 characters, text
# averages about 4, so 16 on average is far beyond any real answer; a streamed token costs one
# event of a few hundred bytes of JSON.
TOKEN_SLACK = 256
CHARS_PER_TOKEN = 16
BYTES_PER_TOKEN = 1024
# One event (or line) at most: far more than one streamed delta, even a whole tool call's
# arguments at once, and small enough that parsing hostile JSON ([{},{},…]: ~20 bytes of
# objects per byte) stays bounded whatever max_tokens is.
MAX_EVENT_BYTES = 1 << 20
MAX_ERROR_BYTES = 65536  # of an error answer, read for its message
READ_BYTES = 65536


def api_key_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The first of API_KEY_VARIABLES that is set."""
    return next((environ[name] for name in API_KEY_VARIABLES if environ.get(name)), None)


def reasoning_fields(style: str, think: str) -> dict[str, Any]:
    """The request fields that choose thinking mode and effort (see the module docstring)."""
    if style == "deepseek":
        if think == "none":
            return {"thinking": {"type": "disabled"}}
        return {"thinking": {"type": "enabled"}, "reasoning_effort": think}
    if style == "chat_template_kwargs":
        if think == "none":
            return {"chat_template_kwargs": {"thinking": False}}
        return {"chat_template_kwargs": {"thinking": True, "reasoning_effort": think}}
    return {}


def wire_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages, tools) for the request body: the tools move from the system message to the
    top level, and empty tool-call lists are left out (OpenAI rejects them)."""
    tools: list[Any] = []
    wire = []
    for message in messages:
        tools += message.get("tools") or []
        wire.append({k: v for k, v in message.items() if k != "tools" and not (k == "tool_calls" and not v)})
    return wire, tools


def server_message(payload: bytes) -> str:
    """The error message in a server's answer: OpenAI's {"error": {"message"}}, FastAPI's
    {"detail"}, or the text itself."""
    text = payload.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text[:500] or "(empty body)"
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping):
            found = error.get("message") or error.get("detail")
            if found:
                return str(found)[:500]
        elif error:
            return str(error)[:500]
    return text[:500]


class HttpBackend:
    """Chat completions from `endpoint` for `model`."""

    name = "http"

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, *, context_limit: int,
                 timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 1.0, temperature: float = 1.0,
                 top_p: float = 1.0, reasoning: str = "auto") -> None:
        parts = urllib.parse.urlsplit(endpoint)
        shown = redact_text(endpoint)  # the URL as written anywhere: without its userinfo
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"endpoint must be an http(s) URL such as http://localhost:8000/v1, not {shown!r}")
        if reasoning not in REASONING_FIELDS:
            raise BackendError(f"reasoning_fields must be one of {', '.join(REASONING_FIELDS)}, not {reasoning!r}")
        self.endpoint, self.model, self.context_limit = shown, model, context_limit
        self.url = shown.rstrip("/") + "/chat/completions"
        self._parts = parts
        self._path = parts.path.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.temperature, self.top_p = temperature, top_p
        if reasoning == "auto":
            reasoning = "deepseek" if parts.hostname.endswith("deepseek.com") else "chat_template_kwargs"
        self.reasoning = reasoning

    def complete(self, request: Request, listener: Listener) -> Completion:
        messages, tools = wire_messages(request.messages)
        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": request.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                **reasoning_fields(self.reasoning, request.think)}
        if tools:
            body["tools"] = tools
        deadline = Deadline(self.timeout_s)
        try:
            connection, response, attempts = self._post(json.dumps(body, ensure_ascii=False).encode(), deadline)
            try:
                completion = self._read(response, request, listener, deadline)
            finally:
                connection.close()
        except BackendError as e:
            if deadline.expired:  # whatever broke when the watchdog cut the connection
                raise BackendError(f"{self.url} did not finish its answer within timeout_s = {self.timeout_s:g} s "
                                   "(the whole request, connect to last byte): the server is overloaded, stuck, "
                                   "or sending only keep-alives; raise timeout_s for long answers") from None
            raise BackendError(redact_text(str(e), [self._api_key] if self._api_key else [])) from None
        finally:
            deadline.cancel()
        completion.details["attempts"] = attempts
        return completion

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "model": self.model, "context_limit": self.context_limit,
                "reasoning_fields": self.reasoning, "temperature": self.temperature, "top_p": self.top_p}

    # -- the request ---------------------------------------------------------------------

    def _post(self, data: bytes, deadline: Deadline) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, int]:
        """An open 200 response, after retrying what is worth retrying while time is left."""
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", "User-Agent": "v4agent"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        attempts = failures = 0
        while True:
            attempts += 1
            connection = kind(self._parts.hostname, self._parts.port, timeout=max(deadline.left(), 0.001))
            deadline.connection = connection
            retry_after, busy = None, False
            try:
                connection.request("POST", self._path, body=data, headers=headers)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                failure, message = f"cannot reach {self.url}", str(e) or type(e).__name__
            else:
                if response.status == 200:
                    return connection, response, attempts
                payload = self._error_payload(response)
                message = server_message(payload)
                retry_after = response.getheader("Retry-After")
                connection.close()
                failure = f"{self.url} answered HTTP {response.status} {response.reason}".rstrip()
                if response.status in (401, 403):
                    raise BackendError(f"{failure}: {message}\n{self._key_hint()}")
                busy = response.status in BUSY and b"insufficient_quota" not in payload
                if not busy and response.status < 500:
                    raise BackendError(f"{failure}: {message}")
            wait = self._backoff(attempts, retry_after)
            failures += not busy
            if failures > self.retries:
                raise BackendError(f"{failure} ({attempts} attempts): {message}")
            if wait >= deadline.left():
                raise BackendError(f"{failure} ({attempts} attempts; waiting {wait:g} s for another would pass "
                                   f"timeout_s = {self.timeout_s:g} s): {message}")
            time.sleep(wait)

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), MAX_RETRY_AFTER_S)
        return min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)

    @staticmethod
    def _error_payload(response: http.client.HTTPResponse) -> bytes:
        """The first MAX_ERROR_BYTES of an answer that is not the stream."""
        try:
            return response.read(MAX_ERROR_BYTES)
        except (OSError, http.client.HTTPException) as e:
            return f"(the answer broke off: {e or type(e).__name__})".encode()

    @classmethod
    def _error_text(cls, response: http.client.HTTPResponse) -> str:
        """The server's message in an answer that is not the stream."""
        return server_message(cls._error_payload(response))

    def _key_hint(self) -> str:
        """What to check when the server refuses the key: where it came from, or that none was sent."""
        if self._api_key is None:
            return f"No API key was sent: put it in {API_KEY_VARIABLES[0]} (or {', '.join(API_KEY_VARIABLES[1:])})."
        source = next((name for name in API_KEY_VARIABLES if os.environ.get(name) == self._api_key), None)
        where = f"the key sent is {source}'s" if source else "the key sent was given directly"
        return (f"Check the API key: {where}; the first of {', '.join(API_KEY_VARIABLES)} that is set is the one "
                "used.")

    # -- the stream ----------------------------------------------------------------------

    def _read(self, response: http.client.HTTPResponse, request: Request, listener: Listener,
              deadline: Deadline) -> Completion:
        kind = response.getheader("Content-Type", "")
        if "text/event-stream" not in kind:
            raise BackendError(f"{self.url} answered {kind or 'no content type'} instead of an event stream "
                               f"(is {self.endpoint} the API base, such as https://host/v1?): "
                               f"{self._error_text(response)}")
        answer = read_stream(self._chunks(response, deadline), request.max_tokens, listener, self.url)
        tool_calls = answer.tool_calls
        for index, call in enumerate(tool_calls):
            listener(ToolCallComplete(index, call))
        message = ParsedMessage(answer.reasoning, answer.content, tool_calls)
        listener(End(message))
        try:
            text = render_completion(message.to_openai(), PromptSettings(think=request.think))
        except EncodingError as e:
            raise BackendError(f"the answer of {self.url} cannot be written in V4's format: {e}") from None
        if answer.finish == "length":  # cut off: no EOS, as a local model would have written it
            text = text.removesuffix(EOS)
        usage = answer.usage
        cached = usage.get("prompt_cache_hit_tokens")  # DeepSeek; OpenAI and vLLM: prompt_tokens_details
        if cached is None and isinstance(usage.get("prompt_tokens_details"), Mapping):
            cached = usage["prompt_tokens_details"].get("cached_tokens")
        cached = cached if isinstance(cached, int) and not isinstance(cached, bool) and cached > 0 else 0
        return Completion(text, message, None, cached, {"finish_reason": answer.finish, "usage": usage})

    def _chunks(self, response: http.client.HTTPResponse, deadline: Deadline) -> Iterator[bytes]:
        """The body as it arrives (read1: whatever is there, not a fixed size that a trickle
        would make wait), until it ends or the deadline passes."""
        try:
            while not deadline.expired and (chunk := response.read1(READ_BYTES)):
                yield chunk
        except (OSError, http.client.HTTPException) as e:
            raise BackendError(f"the stream from {self.url} broke off: {e or type(e).__name__}") from None


class Deadline:
    """The end of one completion, `seconds` from now. Then a watchdog shuts down the socket of
    `connection` (and of any opened after), so whatever http.client is blocked in — connecting,
    a status line, a header or a chunk trickled byte by byte — ends at once: per-read socket
    timeouts alone let a trickling server hold the agent forever."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.connection: http.client.HTTPConnection | None = None
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="v4agent-http-deadline", daemon=True).start()

    def left(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.left() <= 0

    def cancel(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        # After the deadline, again every 50 ms until the request gives up: a socket created in
        # that same instant is cut too.
        while not self._done.wait(0.05 if self.expired else self.left()):
            sock = self.connection.sock if self.expired and self.connection is not None else None
            if sock is not None:
                try:  # the plain socket's shutdown, under TLS too: it wakes a blocked read
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass  # closed already


# ---- the stream's format --------------------------------------------------------------------

@dataclass
class Answer:
    """One streamed answer, checked: the texts, the tool calls in index order, why it ended
    and the server's usage object ({} when it sent none)."""

    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    finish: str
    usage: dict[str, Any]


def read_stream(chunks: Iterable[bytes], max_tokens: int, listener: Listener, source: str) -> Answer:
    """The answer in a chat completions event stream arriving as `chunks` of bytes (cut
    anywhere); deltas go to `listener` as they come. Anything malformed, a stream without a
    finish reason, and an answer past the caps for `max_tokens` are BackendErrors."""
    return _Reader(max_tokens, listener, source).read(chunks)


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
          bool: "true or false", type(None): "null"}


class _Reader:
    """read_stream's state: the caps, what came so far."""

    def __init__(self, max_tokens: int, listener: Listener, source: str) -> None:
        self.max_tokens, self.listener, self.source = max_tokens, listener, source
        self.max_bytes = (max_tokens + TOKEN_SLACK) * BYTES_PER_TOKEN
        self.max_chars = (max_tokens + TOKEN_SLACK) * CHARS_PER_TOKEN
        self.chars = 0
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, tuple[list[str], list[str]]] = {}  # index: (name, argument pieces)
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None

    def read(self, chunks: Iterable[bytes]) -> Answer:
        data = bytearray()  # the data lines of the event being received
        first = None  # the stream's first line, shown when no event came
        events = 0
        for line in self._lines(chunks):
            first = line[:100] if first is None else first
            if line.startswith(b"data:"):
                data += line[6:] if line.startswith(b"data: ") else line[5:]
                data += b"\n"
                if len(data) > MAX_EVENT_BYTES:
                    raise self._too_big(f"an event is over {MAX_EVENT_BYTES:,} bytes")
                continue
            if line or not data:
                continue  # comments (keep-alives), event names and ids carry nothing we use
            try:
                text = data[:-1].decode("utf-8")
            except UnicodeDecodeError as e:
                raise self._malformed(f"event {events + 1} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            data.clear()
            if text.strip() == "[DONE]":
                break
            events += 1
            try:
                chunk = json.loads(text)
            except (ValueError, RecursionError):
                raise self._malformed(f"event {events} is not JSON: {text[:200]!r}") from None
            self._add(chunk, events)
        if self.finish is None:
            if not events and not data:
                raise BackendError(f"the stream from {self.source} held no events"
                                   f"{f' (it began {bytes(first)!r})' if first else ' (it was empty)'}: is this "
                                   "an OpenAI-compatible chat completions server?")
            raise BackendError(f"the stream from {self.source} ended after {events} events without a finish "
                               f"reason{' (its last event cut off)' if data else ''}: the server or the connection "
                               "broke off mid-answer")
        completion = self.usage.get("completion_tokens")
        if isinstance(completion, int) and completion > self.max_tokens + TOKEN_SLACK:
            raise self._too_big(f"the server counts {completion:,} completion tokens")
        calls = [ToolCall("".join(name), "".join(arguments) or "{}") for _, (name, arguments) in sorted(self.calls.items())]
        return Answer("".join(self.reasoning), "".join(self.content), calls, self.finish, self.usage)

    def _lines(self, chunks: Iterable[bytes]) -> Iterator[bytearray]:
        """The stream's lines without their ends; the last one even when unterminated."""
        received = 0
        line = bytearray()
        for chunk in chunks:
            received += len(chunk)
            if received > self.max_bytes:
                raise self._too_big(f"it is over {self.max_bytes:,} bytes")
            first, *rest = chunk.split(b"\n")
            line += first
            for piece in rest:
                yield line.removesuffix(b"\r")
                line = bytearray(piece)
            if len(line) > MAX_EVENT_BYTES:
                raise self._too_big(f"a line is over {MAX_EVENT_BYTES:,} bytes")
        if line:
            yield line

    def _add(self, chunk: Any, number: int) -> None:
        """Fold in one event's JSON, checking every field used has the type it must have."""
        where = f"event {number}"
        if not isinstance(chunk, dict):
            raise self._malformed(f"{where} is {_KINDS.get(type(chunk), 'a value')}, not an object")
        if chunk.get("error"):
            raise BackendError(f"{self.source} reported an error mid-stream: "
                               f"{server_message(json.dumps(chunk).encode())}")
        self.usage = self._field(chunk, "usage", dict, where) or self.usage
        choices = self._field(chunk, "choices", list, where) or []
        if len(choices) > 1:
            raise self._malformed(f"{where} has {len(choices)} choices; one was asked for")
        for choice in choices:
            at = f"{where}: choices[0]"
            if not isinstance(choice, dict):
                raise self._malformed(f"{at} is {_KINDS.get(type(choice), 'a value')}, not an object")
            delta = self._field(choice, "delta", dict, at) or {}
            at += ".delta"
            thought = self._field(delta, "reasoning_content", str, at) or self._field(delta, "reasoning", str, at)
            if thought:
                self._text(thought, self.reasoning)
                self.listener(ReasoningDelta(thought))
            content = self._field(delta, "content", str, at)
            if content:
                self._text(content, self.content)
                self.listener(ContentDelta(content))
            for j, part in enumerate(self._field(delta, "tool_calls", list, at) or []):
                self._call(part, f"{at}.tool_calls[{j}]")
            self.finish = self._field(choice, "finish_reason", str, f"{where}: choices[0]") or self.finish

    def _call(self, part: Any, at: str) -> None:
        """Fold in one streamed tool-call fragment: the name comes once, the arguments in pieces."""
        if not isinstance(part, dict):
            raise self._malformed(f"{at} is {_KINDS.get(type(part), 'a value')}, not an object")
        index = self._field(part, "index", int, at)
        index = len(self.calls) if index is None else index
        if index not in self.calls:
            self._count(CHARS_PER_TOKEN)  # a call takes a token at least: calls are capped like text
            self.calls[index] = ([], [])
        name, arguments = self.calls[index]
        function = self._field(part, "function", dict, at) or {}
        new_name = self._field(function, "name", str, f"{at}.function")
        if new_name and not name:
            self._text(new_name, name)
            self.listener(ToolCallStarted(index, new_name))
        piece = self._field(function, "arguments", str, f"{at}.function")
        if piece:
            self._text(piece, arguments)

    def _field(self, mapping: dict[str, Any], key: str, kind: type, at: str) -> Any:
        """mapping[key] when it is a `kind`, None when absent or null; another type is malformed."""
        value = mapping.get(key)
        if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
            return value
        raise self._malformed(f"{at}.{key} is {_KINDS.get(type(value), 'a value')}, not {_KINDS[kind]}")

    def _count(self, chars: int) -> None:
        self.chars += chars
        if self.chars > self.max_chars:
            raise self._too_big(f"it is over {self.max_chars:,} characters")

    def _text(self, piece: str, into: list[str]) -> None:
        """Keep a piece of text, within the character cap and only if it is real Unicode."""
        self._count(len(piece))
        try:
            piece.encode("utf-8")
        except UnicodeEncodeError:
            raise self._malformed(f"its text holds a lone surrogate ({piece[:100]!r}), which is not Unicode") from None
        into.append(piece)

    def _malformed(self, what: str) -> BackendError:
        return BackendError(f"the stream from {self.source} is not an OpenAI-style chat completions stream: {what}")

    def _too_big(self, what: str) -> BackendError:
        return BackendError(f"the answer from {self.source} is over its cap for max_tokens = {self.max_tokens:,} "
                            f"({what}; at most {self.max_tokens + TOKEN_SLACK:,} tokens, {self.max_chars:,} "
                            f"characters, {self.max_bytes:,} bytes): the server does not respect max_tokens")
