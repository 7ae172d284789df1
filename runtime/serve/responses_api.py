"""The OpenAI Responses API (`POST /v1/responses`), what Codex CLI speaks.

Request fields read: model, instructions, input (a string, or items: messages of role user,
system, developer or assistant with text parts; function_call; function_call_output;
reasoning with reasoning_text content or summary_text), tools (function tools, and the
functions of namespace tools, named NAMESPACE.NAME for the model; tools of other types are left
out: V4 cannot call them), tool_choice (auto or none), reasoning.effort
(none/minimal -> non-think, low/medium/high -> high, xhigh -> max; absent -> high),
max_output_tokens, temperature, top_p, stream. Nothing is stored: previous_response_id is
refused, `store` is ignored. Consecutive reasoning, assistant message and function_call items
form one assistant turn.

The answer's output items, in order: reasoning (its text as reasoning_text content), message
(output_text), function_call (call_id, name, arguments, and namespace for a namespace's). Streaming sends response.created,
response.in_progress, then per item response.output_item.added, its deltas
(response.reasoning_text.delta, response.output_text.delta with content_part added/done,
response.function_call_arguments.delta) and .done events, response.output_item.done, and
response.completed (response.incomplete when max_output_tokens cut it, response.failed on an
engine error); every event carries a sequence_number. SSE comments keep the connection alive.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from runtime.dsml import ContentDelta, ReasoningDelta
from runtime.serve.chat import (
    ApiError,
    Call,
    CallArguments,
    CallDone,
    CallStarted,
    Chat,
    Message,
    Progress,
    Result,
    function_tool,
    get,
    think_mode,
    tool_choice,
)
from runtime.serve.openai_api import max_tokens, now, sampling, text_content
from runtime.serve.toolcalls import new_call_id

_TEXT_PARTS = ("input_text", "output_text", "text")


# ---- the request ------------------------------------------------------------------------------

def _items(raw: Any) -> list[Message]:
    if isinstance(raw, str):
        return [Message("user", raw)]
    if not isinstance(raw, list):
        raise ApiError(400, "input must be a string or a list of items", param="input")
    out: list[Message] = []

    def assistant() -> Message:
        if not out or out[-1].role != "assistant":
            out.append(Message("assistant"))
        return out[-1]

    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise ApiError(400, f"{where} must be an object", param=where)
        kind = get(item, "type", str, where, "message")
        if kind == "message":
            role = get(item, "role", str, where, required=True)
            content = text_content(item.get("content"), f"{where}.content", _TEXT_PARTS)
            if role in ("system", "developer"):
                out.append(Message("system", content))
            elif role == "user":
                out.append(Message("user", content))
            elif role == "assistant":
                turn = assistant()
                if turn.calls:  # text after a call starts the next turn
                    turn = Message("assistant")
                    out.append(turn)
                turn.content += content
            else:
                raise ApiError(400, f"{where}.role must be user, system, developer or assistant", param=where)
        elif kind == "reasoning":
            parts = get(item, "content", list, where) or get(item, "summary", list, where, [])
            text = text_content(parts, f"{where}.content", ("reasoning_text", "summary_text"))
            turn = assistant()
            if turn.content or turn.calls or turn.reasoning is not None:
                turn = Message("assistant")
                out.append(turn)
            turn.reasoning = text
        elif kind == "function_call":
            arguments = get(item, "arguments", str, where, "{}")
            name, namespace = get(item, "name", str, where, required=True), get(item, "namespace", str, where)
            assistant().calls.append(Call(get(item, "call_id", str, where, required=True),
                                          f"{namespace}.{name}" if namespace else name, arguments))
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else text_content(output, f"{where}.output", _TEXT_PARTS)
            out.append(Message("tool", content, call_id=get(item, "call_id", str, where, required=True)))
        else:
            raise ApiError(400, f"{where}: items of type {kind!r} are not supported", param=where)
    return out


def _functions(body: Mapping[str, Any]) -> Iterator[tuple[str, str | None, Mapping[str, Any], str]]:
    """The function tools offered, as (the name the model sees, the namespace, the tool, where):
    a namespace's functions (Codex groups its sub-agent and MCP tools so) are named
    "NAMESPACE.NAME" for the model, and their calls go out as `name` plus `namespace`."""
    for i, tool in enumerate(get(body, "tools", list, default=[])):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ApiError(400, f"{where} must be an object", param=where)
        if tool.get("type") == "function":
            yield tool.get("name"), None, tool, where
        elif tool.get("type") == "namespace":
            namespace = get(tool, "name", str, where, required=True)
            for j, inner in enumerate(get(tool, "tools", list, where, [])):
                at = f"{where}.tools[{j}]"
                if isinstance(inner, Mapping) and inner.get("type") == "function":
                    yield f"{namespace}.{get(inner, 'name', str, at, required=True)}", namespace, inner, at


def parse_request(body: Mapping[str, Any]) -> Chat:
    """A Responses request -> Chat (ApiError 400 for what is malformed)."""
    if body.get("previous_response_id") is not None:
        raise ApiError(400, "previous_response_id is not supported: this server stores nothing; send the whole "
                            "conversation as input", param="previous_response_id")
    messages = []
    instructions = get(body, "instructions", str)
    if instructions:
        messages.append(Message("system", instructions))
    if body.get("input") is None:
        raise ApiError(400, "input is required", param="input")
    messages += _items(body["input"])
    tools = [function_tool(name, tool.get("description"), tool.get("parameters"), where)
             for name, _, tool, where in _functions(body)]
    effort = get(get(body, "reasoning", dict, default={}), "effort", str, "reasoning")
    return Chat(model=get(body, "model", str, required=True), messages=messages,
                tools=tools if tool_choice(body.get("tool_choice")) else [],
                think=think_mode(effort, "reasoning.effort") if effort else "high",
                max_tokens=max_tokens(body, "max_output_tokens"), sampling=sampling(body),
                stream=get(body, "stream", bool, default=False))


# ---- the answer -------------------------------------------------------------------------------

class _Builder:
    """The output items as the events arrive, and the stream events that say so (type, data)."""

    def __init__(self, chat: Chat, body: Mapping[str, Any]) -> None:
        self.id = new_call_id("resp_")
        self.chat, self.body = chat, body
        self.namespaces = {name: namespace for name, namespace, _, _ in _functions(body) if namespace}
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.created = now()

    def response(self, status: str, result: Result | None = None) -> dict[str, Any]:
        s = self.chat.sampling
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": None, "instructions": self.body.get("instructions"),
            "max_output_tokens": self.chat.max_tokens, "model": self.chat.model, "output": self.items,
            "parallel_tool_calls": True, "temperature": s.temperature, "top_p": s.top_p,
            "tool_choice": "auto" if self.chat.tools else "none",
            "tools": [{"type": "function", "strict": False, **t} for t in self.chat.tools],
            "reasoning": {"effort": (self.body.get("reasoning") or {}).get("effort"), "summary": None},
            "store": False, "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
            "usage": None,
        }
        if result is not None:
            u = result.usage
            out["usage"] = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                            "output_tokens": u.completion_tokens,
                            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                            "total_tokens": u.prompt_tokens + u.completion_tokens}
            if result.finish == "length":
                out["incomplete_details"] = {"reason": "max_output_tokens"}
            if result.error:
                out["error"] = {"code": "server_error", "message": result.error}
        return out

    def _close(self, status: str = "completed") -> Iterator[tuple[str, dict[str, Any]]]:
        item, self.open = self.open, None
        if item is None:
            return
        index = len(self.items) - 1
        ref = {"item_id": item["id"], "output_index": index}
        if item["type"] == "reasoning":
            yield "response.reasoning_text.done", {**ref, "content_index": 0, "text": item["content"][0]["text"]}
        elif item["type"] == "message":
            part = item["content"][0]
            yield "response.output_text.done", {**ref, "content_index": 0, "text": part["text"], "logprobs": []}
            yield "response.content_part.done", {**ref, "content_index": 0, "part": part}
        else:
            yield "response.function_call_arguments.done", {**ref, "name": item["name"], "arguments": item["arguments"]}
        item["status"] = status
        yield "response.output_item.done", {"output_index": index, "item": item}

    def _add(self, item: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from self._close()
        self.items.append(item)
        self.open = item
        added = json.loads(json.dumps(item))  # as it was then, not as it will grow
        yield "response.output_item.added", {"output_index": len(self.items) - 1, "item": added}
        if item["type"] == "message":
            yield "response.content_part.added", {"item_id": item["id"], "output_index": len(self.items) - 1,
                                                  "content_index": 0, "part": {"type": "output_text", "text": "",
                                                                               "annotations": []}}

    def feed(self, event: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        ref = lambda: {"item_id": self.open["id"], "output_index": len(self.items) - 1}
        if isinstance(event, ReasoningDelta):
            if self.open is None or self.open["type"] != "reasoning":
                yield from self._add({"type": "reasoning", "id": new_call_id("rs_"), "summary": [],
                                      "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
            self.open["content"][0]["text"] += event.text
            yield "response.reasoning_text.delta", {**ref(), "content_index": 0, "delta": event.text}
        elif isinstance(event, ContentDelta):
            if self.open is None or self.open["type"] != "message":
                yield from self._add({"type": "message", "id": new_call_id("msg_"), "status": "in_progress",
                                      "role": "assistant",
                                      "content": [{"type": "output_text", "text": "", "annotations": []}]})
            self.open["content"][0]["text"] += event.text
            yield "response.output_text.delta", {**ref(), "content_index": 0, "delta": event.text, "logprobs": []}
        elif isinstance(event, CallStarted):
            namespace = self.namespaces.get(event.name)
            name = {"name": event.name[len(namespace) + 1:], "namespace": namespace} if namespace else \
                {"name": event.name}
            yield from self._add({"type": "function_call", "id": new_call_id("fc_"), "call_id": event.id, **name,
                                  "arguments": "", "status": "in_progress"})
        elif isinstance(event, CallArguments) and self.open is not None and self.open.get("call_id") is not None:
            self.open["arguments"] += event.delta
            yield "response.function_call_arguments.delta", {**ref(), "delta": event.delta}
        elif isinstance(event, CallDone):
            yield from self._close()
        elif isinstance(event, Result):
            status = "failed" if event.error else "incomplete" if event.finish == "length" else "completed"
            yield from self._close("incomplete" if status == "incomplete" else "completed")
            yield f"response.{status}", {"response": self.response(status, event)}


def response_body(result: Result, chat: Chat, body: Mapping[str, Any]) -> dict[str, Any]:
    """The whole response, built by the same steps as the stream."""
    builder = _Builder(chat, body)
    events: list[Any] = [ReasoningDelta(result.reasoning)] if result.reasoning else []
    events += [ContentDelta(result.content)] if result.content else []
    for index, call in enumerate(result.calls):
        events += [CallStarted(index, call.id, call.name), CallArguments(index, call.arguments), CallDone(index, call)]
    for event in events:
        for _ in builder.feed(event):
            pass
    *_, (_, last) = builder.feed(result)
    return last["response"]


async def stream_events(events: AsyncIterator[Any], chat: Chat, body: Mapping[str, Any]) -> AsyncIterator[str]:
    builder = _Builder(chat, body)
    number = 0

    def sse(kind: str, data: dict[str, Any]) -> str:
        nonlocal number
        number += 1
        data = {"type": kind, "sequence_number": number - 1, **data}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield sse("response.created", {"response": builder.response("in_progress")})
    yield sse("response.in_progress", {"response": builder.response("in_progress")})
    async for event in events:
        if event is None or isinstance(event, Progress):
            yield ": keep-alive\n\n"
            continue
        text = "".join(sse(kind, data) for kind, data in builder.feed(event))
        if text:
            yield text
