"""Anthropic Messages (`POST /v1/messages`), what Claude Code speaks.

Request fields read: model, max_tokens (required), system (a string or text blocks, less
Claude Code's billing header), messages (user: text and tool_result blocks; assistant:
thinking, redacted_thinking, text and tool_use blocks, consecutive ones merged into one turn;
system, mid-conversation: text, rendered as V4's developer turn), tools (name,
description, input_schema; server tools such as web search are left out), tool_choice (auto or
none), thinking ({"type": "enabled"|"adaptive"} -> think-high, or think-max with
output_config.effort xhigh or max, or without an effort a budget_tokens of 32,768 and more;
"disabled" or absent -> non-think), stop_sequences, temperature, top_p, top_k, stream.
Image and document blocks become "[Unsupported image]" text (V4 reads text only). Other fields
are ignored.

The answer: thinking block, text block, tool_use blocks, in the order the model writes them;
stop_reason end_turn, tool_use, max_tokens or stop_sequence; usage with input_tokens (not
cached), cache_read_input_tokens and output_tokens. Streaming sends Anthropic's event sequence:
message_start, then per block content_block_start / content_block_delta... / content_block_stop,
message_delta (stop_reason, usage), message_stop; `ping` events keep the connection alive and
mark prefill progress.
"""

from __future__ import annotations

import json
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
from runtime.serve.openai_api import stop_strings, text_content
from runtime.serve.toolcalls import new_call_id

ID_PREFIX = "toolu_"
MAX_BUDGET = 32768  # a thinking budget_tokens from here on asks for think-max
BILLING_HEADER = "x-anthropic-billing-header:"
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def error_body(error: ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(error.status, "api_error"), "message": error.message}}


# ---- the request ------------------------------------------------------------------------------

def _tool_result(block: Mapping[str, Any], where: str) -> Message:
    content = text_content(block.get("content"), f"{where}.content")
    if get(block, "is_error", bool, where):
        content = f"Error: {content}"
    return Message("tool", content, call_id=get(block, "tool_use_id", str, where, required=True))


def _turn(raw: Any, where: str) -> list[Message]:
    """One Anthropic message -> messages: a user turn's tool results become tool messages (in
    their order, text blocks between them as user messages); an assistant turn is one message."""
    if not isinstance(raw, Mapping):
        raise ApiError(400, f"{where} must be an object", param=where)
    role = get(raw, "role", str, where, required=True)
    if role == "system":
        # A mid-conversation system message (Claude Code sends one after the user's prompt, beta
        # mid-conversation-system-2026-04-07). V4's system text has no tag of its own, so in
        # mid-conversation it is V4's developer turn: instructions under a user tag, answered after.
        text = text_content(raw.get("content"), f"{where}.content")
        return [Message("developer", text)] if text else []
    if role not in ("user", "assistant"):
        raise ApiError(400, f"{where}.role must be user, assistant or system, not {role!r}", param=f"{where}.role")
    content = raw.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(blocks, list):
        raise ApiError(400, f"{where}.content must be a string or a list of blocks", param=f"{where}.content")
    out: list[Message] = []
    reasoning, texts, calls = [], [], []
    for i, block in enumerate(blocks):
        at = f"{where}.content[{i}]"
        kind = get(block, "type", str, at, required=True) if isinstance(block, Mapping) else None
        if kind is None:
            raise ApiError(400, f"{at} must be a content block", param=at)
        if role == "user" and kind == "text":
            out.append(Message("user", get(block, "text", str, at, required=True)))
        elif role == "user" and kind in ("image", "document"):
            out.append(Message("user", text_content([block], at)))
        elif role == "user" and kind == "tool_result":
            out.append(_tool_result(block, at))
        elif role == "assistant" and kind == "thinking":
            reasoning.append(get(block, "thinking", str, at, ""))
        elif role == "assistant" and kind == "redacted_thinking":
            continue
        elif role == "assistant" and kind == "text":
            texts.append(get(block, "text", str, at, ""))
        elif role == "assistant" and kind == "tool_use":
            arguments = get(block, "input", dict, at, {})
            calls.append(Call(get(block, "id", str, at, ""), get(block, "name", str, at, required=True),
                              json.dumps(arguments, ensure_ascii=False)))
        else:
            raise ApiError(400, f"{at}: a {role} block of type {kind!r} is not supported", param=at)
    if role == "assistant":
        out.append(Message("assistant", "".join(texts), "".join(reasoning) if reasoning else None, calls))
    # Consecutive user blocks are one user message, as in the encoder's user turns.
    merged: list[Message] = []
    for message in out:
        if merged and message.role == merged[-1].role == "user":
            merged[-1].content += "\n\n" + message.content
        else:
            merged.append(message)
    return merged


def _think(body: Mapping[str, Any]) -> str:
    thinking = get(body, "thinking", dict)
    if not thinking:
        return "none"
    kind = get(thinking, "type", str, "thinking", required=True)
    if kind == "disabled":
        return "none"
    if kind not in ("enabled", "adaptive"):
        raise ApiError(400, "thinking.type must be enabled, adaptive or disabled", param="thinking.type")
    effort = get(get(body, "output_config", dict, default={}), "effort", str, "output_config")
    if effort:
        return "max" if think_mode(effort, "output_config.effort") == "max" else "high"
    budget = get(thinking, "budget_tokens", int, "thinking", 0)
    return "max" if budget >= MAX_BUDGET else "high"


def parse_request(body: Mapping[str, Any]) -> Chat:
    """A Messages request -> Chat (ApiError 400 for what is malformed)."""
    limit = get(body, "max_tokens", int, required=True)
    if limit < 1:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    raw = get(body, "messages", list, required=True)
    if not raw:
        raise ApiError(400, "messages must not be empty", param="messages")
    system = body.get("system")
    if isinstance(system, list):
        # Claude Code's first system block is a billing header whose hash changes with each new
        # conversation: it is for Anthropic, not the model, and at the top of the prompt it
        # would keep one conversation from reusing another's ~19K-token prefix.
        system = [b for b in system if not (isinstance(b, Mapping) and isinstance(b.get("text"), str)
                                            and b["text"].startswith(BILLING_HEADER))]
    messages = [Message("system", text_content(system, "system"))] if system else []
    for i, turn in enumerate(raw):
        for message in _turn(turn, f"messages[{i}]"):
            last = messages[-1] if messages else None
            if last is not None and message.role == last.role == "assistant":
                # Consecutive assistant turns are one turn, as Anthropic combines them (Claude Code
                # sends them after a retry); V4 would render the second without its tag.
                last.content += message.content
                last.reasoning = None if last.reasoning is message.reasoning is None else \
                    (last.reasoning or "") + (message.reasoning or "")
                last.calls += message.calls
            else:
                messages.append(message)
    offered = tool_choice(body.get("tool_choice"))
    tools = []
    for i, tool in enumerate(get(body, "tools", list, default=[])):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ApiError(400, f"{where} must be an object", param=where)
        if tool.get("type") not in (None, "custom"):
            continue  # a server tool (web search...): Anthropic runs those, V4 cannot call them
        tools.append(function_tool(tool.get("name"), tool.get("description"), tool.get("input_schema"), where))
    temperature = get(body, "temperature", float, default=1.0)
    if not 0 <= temperature <= 1:
        raise ApiError(400, "temperature must be between 0 and 1", param="temperature")
    top_p = get(body, "top_p", float, default=1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    top_k = get(body, "top_k", int, default=0)
    if top_k < 0:
        raise ApiError(400, "top_k must be 0 (off) or more", param="top_k")
    return Chat(model=get(body, "model", str, required=True), messages=messages, tools=tools if offered else [],
                think=_think(body), max_tokens=limit, sampling=Sampling(temperature, top_p, top_k),
                stop=stop_strings(body.get("stop_sequences"), "stop_sequences"),
                stream=get(body, "stream", bool, default=False))


# ---- the answer -------------------------------------------------------------------------------

def _stop(result: Result) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence)."""
    if result.finish == "tool_calls":
        return "tool_use", None
    if result.finish == "length":
        return "max_tokens", None
    return ("stop_sequence", result.stop_sequence) if result.stop_sequence else ("end_turn", None)


def _usage(result: Result) -> dict[str, Any]:
    u = result.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0, "output_tokens": u.completion_tokens}


def response_body(result: Result, model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if result.reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
    if result.content:
        content.append({"type": "text", "text": result.content})
    for call in result.calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)})
    reason, sequence = _stop(result)
    return {"id": new_call_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(result)}


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


async def stream_events(events: AsyncIterator[Any], model: str) -> AsyncIterator[str]:
    """Anthropic's SSE sequence for the service's events. A block opens at its first delta and
    closes when another kind begins; a tool_use block streams its input as input_json_delta."""
    message = {"id": new_call_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 0, "output_tokens": 0}}
    yield _event("message_start", {"message": message})
    index, open_kind = -1, None  # the open block and its kind ("thinking", "text", or a call's index)

    def close() -> list[str]:
        out = []
        if open_kind == "thinking":
            out.append(_event("content_block_delta", {"index": index,
                                                      "delta": {"type": "signature_delta", "signature": ""}}))
        if open_kind is not None:
            out.append(_event("content_block_stop", {"index": index}))
        return out

    def start(kind: Any, block: dict[str, Any]) -> list[str]:
        nonlocal index, open_kind
        out = close()
        index, open_kind = index + 1, kind
        return out + [_event("content_block_start", {"index": index, "content_block": block})]

    async for event in events:
        out: list[str] = []
        if isinstance(event, ReasoningDelta):
            if open_kind != "thinking":
                out += start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(_event("content_block_delta", {"index": index,
                                                      "delta": {"type": "thinking_delta", "thinking": event.text}}))
        elif isinstance(event, ContentDelta):
            if open_kind != "text":
                out += start("text", {"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": event.text}
            out.append(_event("content_block_delta", {"index": index, "delta": delta}))
        elif isinstance(event, CallStarted):
            out += start(("call", event.index), {"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
        elif isinstance(event, CallArguments) and open_kind == ("call", event.index):
            out.append(_event("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                                "partial_json": event.delta}}))
        elif isinstance(event, Progress) or event is None:
            out.append(_event("ping", {}))
        elif isinstance(event, Result):
            out += close()
            open_kind = None
            if event.error:
                yield "".join(out)
                yield _event("error", error_body(ApiError(500, event.error)))
                return
            reason, sequence = _stop(event)
            out.append(_event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                                "usage": _usage(event)}))
            out.append(_event("message_stop", {}))
        if out:
            yield "".join(out)
