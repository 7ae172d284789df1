"""OpenAI chat completions (`POST /v1/chat/completions`) and `GET /v1/models`.

Request fields read: model, messages (system, developer, user, assistant with
`reasoning_content` or `reasoning` and `tool_calls`, tool), tools, tool_choice ("auto" or
"none"), stream, stream_options.include_usage, max_tokens / max_completion_tokens, temperature,
top_p, top_k, seed, stop, n (1 only), and the thinking switches: `reasoning_effort`
(none/minimal -> non-think, low/medium/high -> high, xhigh/max -> max), DeepSeek's
`thinking: {"type": "enabled"|"disabled"}` and vLLM's `chat_template_kwargs: {"thinking",
"reasoning_effort"}`; without any, think-high. Other fields are ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from runtime.dsml import ContentDelta, ReasoningDelta
from runtime.serve.chat import (
    ApiError,
    Call,
    CallArguments,
    CallStarted,
    Chat,
    Message,
    Progress,
    Result,
    Sampling,
    function_tool,
    get,
    think_mode,
    tool_choice,
)
from runtime.serve.toolcalls import new_call_id


def error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}


def models_body(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "v4agent"}]}


# ---- the request ------------------------------------------------------------------------------

def text_content(content: Any, where: str, part_types: tuple[str, ...] = ("text",)) -> str:
    """A message's content as text: a string, or a list of parts joined by blank lines. V4
    reads text only: any other part (an image, a file) becomes `[Unsupported TYPE]`, as in the
    reference encoder, so the model knows something was there and the conversation goes on."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = get(part, "type", str, f"{where}[{i}]", required=True) if isinstance(part, Mapping) else None
        if kind is None:
            raise ApiError(400, f"{where}[{i}] must be a content part object", param=where)
        texts.append(get(part, "text", str, f"{where}[{i}]", required=True) if kind in part_types
                     else f"[Unsupported {kind}]")
    return "\n\n".join(texts)


def _message(raw: Any, where: str) -> Message:
    if not isinstance(raw, Mapping):
        raise ApiError(400, f"{where} must be an object", param=where)
    role = get(raw, "role", str, where, required=True)
    content = text_content(raw.get("content"), f"{where}.content")
    if role in ("system", "developer"):  # OpenAI's developer role is its system role
        return Message("system", content)
    if role == "user":
        return Message("user", content)
    if role == "tool":
        return Message("tool", content, call_id=get(raw, "tool_call_id", str, where, required=True))
    if role != "assistant":
        raise ApiError(400, f"{where}.role must be system, developer, user, assistant or tool, not {role!r}",
                       param=f"{where}.role")
    reasoning = get(raw, "reasoning_content", str, where) or get(raw, "reasoning", str, where)
    calls = []
    for j, call in enumerate(get(raw, "tool_calls", list, where, [])):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, Mapping):
            raise ApiError(400, f"{at} must be an object", param=at)
        function = get(call, "function", dict, at, required=True)
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(Call(get(call, "id", str, at, ""), get(function, "name", str, f"{at}.function", required=True),
                          arguments))
    return Message("assistant", content, reasoning, calls)


def _think(body: Mapping[str, Any]) -> str:
    kwargs = get(body, "chat_template_kwargs", dict, default={})
    effort = get(body, "reasoning_effort", str) or get(kwargs, "reasoning_effort", str, "chat_template_kwargs")
    thinking = get(body, "thinking", dict)
    enabled = get(thinking, "type", str, "thinking") if thinking else None
    if enabled is not None and enabled not in ("enabled", "disabled"):
        raise ApiError(400, "thinking.type must be enabled or disabled", param="thinking.type")
    on = get(kwargs, "thinking", bool, "chat_template_kwargs")
    if enabled == "disabled" or on is False:
        return "none"
    return think_mode(effort, "reasoning_effort") if effort else "high"


def sampling(body: Mapping[str, Any]) -> Sampling:
    temperature = get(body, "temperature", float, default=1.0)
    top_p = get(body, "top_p", float, default=1.0)
    top_k = get(body, "top_k", int, default=0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    if top_k < 0:
        raise ApiError(400, "top_k must be 0 (off) or more", param="top_k")
    return Sampling(temperature, top_p, top_k, get(body, "seed", int))


def max_tokens(body: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = get(body, key, int)
        if value is not None:
            if value < 1:
                raise ApiError(400, f"{key} must be at least 1", param=key)
            return value
    return None


def stop_strings(value: Any, key: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ApiError(400, f"{key} must be a string or a list of non-empty strings", param=key)
    return tuple(value)


def parse_request(body: Mapping[str, Any]) -> Chat:
    """A chat completions request -> Chat (ApiError 400 for what is malformed)."""
    raw_messages = get(body, "messages", list, required=True)
    if not raw_messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    if get(body, "n", int, default=1) != 1:
        raise ApiError(400, "n must be 1", param="n")
    tools = []
    offered = tool_choice(body.get("tool_choice"))
    for i, tool in enumerate(get(body, "tools", list, default=[])):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ApiError(400, f"{where} must be a function tool", param=where)
        function = get(tool, "function", dict, where, required=True)
        tools.append(function_tool(function.get("name"), function.get("description"), function.get("parameters"),
                                   f"{where}.function"))
    options = get(body, "stream_options", dict, default={})
    get(options, "include_usage", bool, "stream_options")
    return Chat(
        model=get(body, "model", str, required=True),
        messages=[_message(m, f"messages[{i}]") for i, m in enumerate(raw_messages)],
        tools=tools if offered else [],
        think=_think(body),
        max_tokens=max_tokens(body, "max_completion_tokens", "max_tokens"),
        sampling=sampling(body),
        stop=stop_strings(body.get("stop")),
        stream=get(body, "stream", bool, default=False),
    )


# ---- the answer -------------------------------------------------------------------------------

def _usage(result: Result) -> dict[str, Any]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def _finish(result: Result) -> str:
    return {"cancelled": "stop", "error": "stop"}.get(result.finish, result.finish)


def response_body(result: Result, model: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.content or None,
                               "reasoning_content": result.reasoning or None}
    if result.calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in result.calls]
    return {"id": new_call_id("chatcmpl-"), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish(result), "logprobs": None}],
            "usage": _usage(result)}


async def stream_events(events: AsyncIterator[Any], model: str, created: int, include_usage: bool,
                        ) -> AsyncIterator[str]:
    """The chat completions SSE stream for the service's events (see runtime.serve.service);
    prefill progress and idle waits become SSE comment lines, which keep the connection alive."""
    chunk_id = new_call_id("chatcmpl-")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for event in events:
        if isinstance(event, ReasoningDelta):
            yield chunk({"reasoning_content": event.text})
        elif isinstance(event, ContentDelta):
            yield chunk({"content": event.text})
        elif isinstance(event, CallStarted):
            yield chunk({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                         "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, CallArguments):
            yield chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.delta}}]})
        elif isinstance(event, Progress):
            yield f": prefill {event.done}/{event.total}\n\n"
        elif isinstance(event, Result):
            if event.error:
                error = ApiError(500, event.error, "server_error")
                yield f"data: {json.dumps(error_body(error))}\n\n"
            yield chunk({}, _finish(event))
            if include_usage:
                body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(event)}
                yield f"data: {json.dumps(body)}\n\n"
        elif event is None:  # nothing happened for a while
            yield ": keep-alive\n\n"
    yield "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
