"""The HTTP server: a Starlette app over one `Service`, run by uvicorn (`v4agent serve`).

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/chat/completions,
POST /v1/messages (+ /v1/messages/count_tokens), POST /v1/responses. docs/serve.md lists the
fields each reads.

Every request passes `_Gate`: with an API key set, no endpoint answers without it
(`Authorization: Bearer KEY` or `x-api-key: KEY`, compared in constant time); it counts the
requests for /metrics and logs one line per request once the answer is complete (a stream
included: then with its token counts). Errors are never tracebacks: a refused request gets a
4xx, anything unexpected a 500, each with an OpenAI-shaped body — or Anthropic-shaped under
/v1/messages — and the traceback goes to the log only. A request that finds the engine's waiting
queue full is refused as those APIs refuse an overloaded one (429 rate_limit_exceeded; Anthropic's
529 overloaded_error), with Retry-After, so their SDKs back off and retry. CORS is off unless
origins are given.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.serve import anthropic_api, openai_api, responses_api
from runtime.serve.chat import ApiError, Result
from runtime.serve.engine import QueueFull
from runtime.serve.service import Generation, Service

log = logging.getLogger("v4agent.serve")
MAX_BODY_BYTES = 64 << 20  # a 1M-token conversation is ~4-10 MB of JSON
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_AFTER_S = 1  # what a refused client is told to wait: a slot frees when any running answer ends


def _anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(error: ApiError, path: str) -> JSONResponse:
    body = anthropic_api.error_body(error) if _anthropic(path) else openai_api.error_body(error)
    return JSONResponse(body, status_code=error.status)


def overloaded_response(message: str, path: str) -> JSONResponse:
    """The queue is full: what OpenAI answers past a rate limit (429, code rate_limit_exceeded,
    type "requests") or Anthropic when overloaded (529 overloaded_error); both SDKs retry these."""
    if _anthropic(path):
        body = anthropic_api.error_body(ApiError(529, message))
        body["error"]["type"] = "overloaded_error"
        status = 529
    else:
        body = openai_api.error_body(ApiError(429, message, "requests"))
        body["error"]["code"] = "rate_limit_exceeded"
        status = 429
    return JSONResponse(body, status_code=status, headers={"Retry-After": str(RETRY_AFTER_S)})


class _Gate:
    """Authentication, request counting and the per-request log line (pure ASGI, so that a
    streamed answer is logged when it ends, not when it starts)."""

    def __init__(self, app: ASGIApp, api_key: str | None, counts: Counter[tuple[str, int]]) -> None:
        self.app, self.counts = app, counts
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None:
            return True
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"")
        offered = [bearer[7:]] if bearer[:7].lower() == b"bearer " else []
        offered.append(headers.get(b"x-api-key", b""))
        # Both compared, always: the time taken says nothing about which one was close.
        return sum(hmac.compare_digest(self.key, candidate) for candidate in offered) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        info: dict[str, Any] = scope.setdefault("v4agent", {})

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, record)
            else:
                error = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                                 "authentication_error")
                await error_response(error, scope["path"])(scope, receive, record)
        finally:
            path = scope["path"]
            self.counts[(path if path in _ROUTES else "other", status)] += 1
            extra = " ".join(f"{k}={v}" for k, v in info.items())
            client = scope.get("client") or ("-", 0)
            # The path as JSON escapes it: a %0A in the URL cannot start a forged log line.
            log.info('%s "%s %s" %s %.0f ms %s', client[0], scope["method"], json.dumps(path)[1:-1], status or "-",
                     (time.perf_counter() - started) * 1000, extra)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit:,} bytes", "request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
        if b"\\ud" in raw.lower():  # a \udXXX escape: a lone surrogate is not text the tokenizer takes
            json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON text: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _note(request: Request, result: Result | None) -> None:
    """What the log line says about a generation."""
    if result is not None:
        u = result.usage
        request.scope["v4agent"].update(prompt=u.prompt_tokens, cached=u.cached_tokens,
                                        completion=u.completion_tokens, finish=result.finish)


class _EventStream(StreamingResponse):
    """An SSE answer that, however it ends, leaves no generation behind: a client gone before
    the first event was even asked for never starts the event generator, whose own cleanup
    would cancel it."""

    def __init__(self, generation: Generation, request: Request, sse: AsyncIterator[str]) -> None:
        super().__init__(sse, media_type="text/event-stream", headers=SSE_HEADERS)
        self.generation, self.request = generation, request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()
            _note(self.request, self.generation.result)


Handler = Callable[[Request, dict[str, Any]], Awaitable[Response]]


def create_app(service: Service, *, api_key: str | None = None, cors_origins: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The server's ASGI app."""
    counts: Counter[tuple[str, int]] = Counter()
    created = openai_api.now()

    def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                body = await _json_body(request, max_body_bytes)
                request.scope["v4agent"]["model"] = json.dumps(body.get("model"))[:100]
                return await handler(request, body)
            except ApiError as e:
                return error_response(e, request.url.path)
            except QueueFull as e:
                return overloaded_response(str(e), request.url.path)
            except Exception:  # never a traceback to the client, never a dead worker
                log.exception("%s failed", request.url.path)
                return error_response(ApiError(500, "internal error (see the server log)", "server_error"),
                                      request.url.path)
        return run

    def stream(generation: Generation, request: Request, sse: AsyncIterator[str]) -> StreamingResponse:
        return _EventStream(generation, request, sse)

    async def chat_completions(request: Request, body: dict[str, Any]) -> Response:
        chat = openai_api.parse_request(body)
        generation = await service.start(chat)
        if chat.stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return stream(generation, request, openai_api.stream_events(
                generation.events(), service.model_name, openai_api.now(), include_usage))
        result = await generation.result_of(request.is_disconnected)
        _note(request, result)
        if result.error:
            raise ApiError(500, result.error, "server_error")
        return JSONResponse(openai_api.response_body(result, service.model_name, openai_api.now()))

    async def messages(request: Request, body: dict[str, Any]) -> Response:
        chat = anthropic_api.parse_request(body)
        generation = await service.start(chat, anthropic_api.ID_PREFIX)
        if chat.stream:
            return stream(generation, request, anthropic_api.stream_events(generation.events(), service.model_name))
        result = await generation.result_of(request.is_disconnected)
        _note(request, result)
        if result.error:
            raise ApiError(500, result.error, "api_error")
        return JSONResponse(anthropic_api.response_body(result, service.model_name))

    async def count_tokens(request: Request, body: dict[str, Any]) -> Response:
        chat = anthropic_api.parse_request({**body, "max_tokens": 1})
        service.check_model(chat.model)
        return JSONResponse({"input_tokens": len(await asyncio.to_thread(service.encode, chat))})

    async def responses(request: Request, body: dict[str, Any]) -> Response:
        chat = responses_api.parse_request(body)
        generation = await service.start(chat)
        if chat.stream:
            return stream(generation, request, responses_api.stream_events(generation.events(), chat, body))
        result = await generation.result_of(request.is_disconnected)
        _note(request, result)
        if result.error:
            raise ApiError(500, result.error, "server_error")
        return JSONResponse(responses_api.response_body(result, chat, body))

    async def models(request: Request) -> Response:
        return JSONResponse(openai_api.models_body(service.model_name, created))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": service.model_name})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(metrics_text(service, counts), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind),
                              request.url.path)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/messages", endpoint(messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", endpoint(count_tokens), methods=["POST"]),
        Route("/v1/responses", endpoint(responses), methods=["POST"]),
    ]
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["*"]))
    middleware.append(Middleware(_Gate, api_key=api_key, counts=counts))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
           "/v1/responses"}


def metrics_text(service: Service, counts: Counter[tuple[str, int]]) -> str:
    """Prometheus text: the engine's own figures (engine.stats(), each number as
    v4agent_engine_<name>), the requests by path and status, and the tool-call history map."""
    lines = ["# TYPE v4agent_requests_total counter"]
    for (path, status), n in sorted(counts.items()):
        lines.append(f'v4agent_requests_total{{path="{path}",status="{status}"}} {n}')
    calls = service.calls
    lines += ["# HELP v4agent_tool_history_hits_total assistant turns sent back and spliced in as sampled",
              "# TYPE v4agent_tool_history_hits_total counter", f"v4agent_tool_history_hits_total {calls.hits}",
              ("# HELP v4agent_tool_history_misses_total assistant turns with tool calls rendered canonically "
               "(unknown ids, or changed since sampled)"),
              "# TYPE v4agent_tool_history_misses_total counter"]
    lines += [f'v4agent_tool_history_misses_total{{reason="{k}"}} {v}' for k, v in calls.misses.items()]
    lines += ["# TYPE v4agent_tool_history_tokens gauge", f"v4agent_tool_history_tokens {calls.held_tokens}"]
    for key, value in sorted(service.engine.stats().items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines += [f"# TYPE v4agent_engine_{key} gauge", f"v4agent_engine_{key} {value}"]
    return "\n".join(lines) + "\n"
