"""The conversation model every API of the server converts from and to.

A request of any API (chat completions, Anthropic messages, Responses) becomes a `Chat`: its
`Message`s (with reasoning, content, tool calls, tool results), its tools as OpenAI function
objects, the V4 thinking mode and the sampling limits. `prompt_ids` turns it into the V4 prompt
ids with runtime.encoding, splicing in the exact sampled tokens of assistant turns the
`ToolCallMap` remembers. On the way out, `Assembler` turns the sampled tokens into the parser's
events plus tool calls with fresh ids and their arguments as streamed JSON deltas, and the
`Result` every API writes its answer from.

Errors a client caused are `ApiError`s carrying the HTTP status; each API shapes the body.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from runtime.dsml import (
    ContentDelta,
    DsmlParser,
    End,
    ParameterComplete,
    ReasoningDelta,
    ToolCallComplete,
    ToolCallStarted,
)
from runtime.encoding import (
    EOS,
    THINK_CLOSE,
    EncodingError,
    PromptEncoder,
    PromptSettings,
    render_prompt,
    to_json,
)
from runtime.serve.toolcalls import (
    SampledTurn,
    ToolCallMap,
    arguments_value,
    new_call_id,
)


class ApiError(Exception):
    """A request the server refuses: `status` (4xx), a message for the client, an error type
    (OpenAI's names: invalid_request_error, authentication_error, not_found_error...) and the
    offending field when there is one."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "an object"}


def get(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "", default: Any = None,
        required: bool = False) -> Any:
    """body[key] checked to be of `kind` (null counts as absent); a wrong type is a 400 naming
    the field. Integers pass as numbers, booleans never pass as integers."""
    name = f"{where}.{key}" if where else key
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"{name} is required", param=name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"{name} must be {wanted}", param=name)
    return value


# ---- the conversation -------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """A tool call: its id, the tool's name and the arguments as JSON object text."""

    id: str
    name: str
    arguments: str


@dataclass
class Message:
    """One message: role system, developer, user, assistant or tool. An assistant message has
    `reasoning` (None when the client did not send it back) and `calls`; a tool message answers
    `call_id`."""

    role: str
    content: str = ""
    reasoning: str | None = None
    calls: list[Call] = field(default_factory=list)
    call_id: str = ""

    def encoding(self) -> dict[str, Any]:
        """The message as runtime.encoding takes it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "assistant":
            out["reasoning_content"] = self.reasoning or ""
            if self.calls:
                out["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in self.calls]
        if self.role == "tool":
            out["tool_call_id"] = self.call_id
        return out


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Chat:
    """One request, whatever API it came in: think is "none", "high" or "max"; tools are
    OpenAI function objects ({"name", "description", "parameters"}); max_tokens None means as
    many as the context leaves."""

    model: str
    messages: list[Message]
    tools: list[dict[str, Any]] = field(default_factory=list)
    think: str = "high"
    max_tokens: int | None = None
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    stream: bool = False


def think_mode(effort: str, where: str) -> str:
    """A reasoning effort as the APIs name it -> one of V4's three modes."""
    modes = {"none": "none", "minimal": "none", "low": "high", "medium": "high", "high": "high", "xhigh": "max",
             "max": "max"}
    if effort not in modes:
        raise ApiError(400, f"{where} must be one of {', '.join(modes)}, not {effort!r}", param=where)
    return modes[effort]


def function_tool(name: Any, description: Any, parameters: Any, where: str) -> dict[str, Any]:
    """A tool as the V4 tools block lists it, checked to be renderable: a name the DSML parser
    can read back, a text description, a JSON-schema object."""
    if not isinstance(name, str) or not name or any(c in name for c in '"<>\n') or "｜" in name:
        raise ApiError(400, f"{where}.name must be a non-empty name without quotes, angle brackets, newlines or ｜",
                       param=f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"{where}.description must be a string", param=f"{where}.description")
    if parameters is not None and not isinstance(parameters, dict):
        raise ApiError(400, f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
    tool: dict[str, Any] = {"name": name}
    if description is not None:
        tool["description"] = description
    tool["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
    return tool


def tool_choice(choice: Any, where: str = "tool_choice") -> bool:
    """Whether the tools are offered: "auto" yes, "none" no. Forcing a call ("required", "any",
    a named tool) is refused: V4's tool format has no way to force one."""
    kind = choice if isinstance(choice, str) else choice.get("type") if isinstance(choice, Mapping) else None
    if kind in (None, "auto"):
        return True
    if kind == "none":
        return False
    raise ApiError(400, f"{where} {kind!r} is not supported: V4 decides itself whether to call a tool; use \"auto\" "
                        "or \"none\"", param=where)


# ---- the prompt -------------------------------------------------------------------------------

def prompt_ids(chat: Chat, encoder: PromptEncoder, effort_profile: str, calls: ToolCallMap) -> list[int]:
    """The prompt's token ids. Assistant turns whose tool calls `calls` remembers become the
    tokens sampled for them (see runtime.serve.toolcalls); the rest is rendered canonically.
    Raises ApiError (400) when the conversation cannot be rendered."""
    if not chat.messages or chat.messages[-1].role not in ("user", "tool", "developer"):
        raise ApiError(400, "the conversation must end with a user message or a tool result: the answer comes "
                            "after it", param="messages")
    settings = PromptSettings(think=chat.think, effort_profile=effort_profile)
    messages = [m.encoding() for m in chat.messages]
    if chat.tools:
        if messages and messages[0]["role"] == "system":
            messages[0]["tools"] = [{"type": "function", "function": t} for t in chat.tools]
        else:
            messages.insert(0, {"role": "system", "content": "",
                                "tools": [{"type": "function", "function": t} for t in chat.tools]})
    # Without tools a thinking prompt drops earlier reasoning, so no turn renders as sampled.
    splice = bool(chat.tools) or not settings.thinking
    spliced: dict[str, array] = {}
    for index, message in enumerate(chat.messages):
        if not (splice and message.role == "assistant" and message.calls):
            continue
        tokens = calls.recall([c.id for c in message.calls], settings.thinking, message.reasoning, message.content,
                              [(c.name, arguments_value(c.arguments)) for c in message.calls])
        if tokens is not None:
            marker = f"\ue000{secrets.token_hex(16)}\ue000"  # random: no text a client sends can hold it
            spliced[marker] = tokens
            messages[index + (len(messages) - len(chat.messages))] = {"role": "assistant", "content": marker}
    try:
        text = render_prompt(messages, settings)
    except EncodingError as e:
        raise ApiError(400, f"the conversation cannot be rendered in V4's format: {e}", param="messages") from None
    ids: list[int] = []
    for marker, tokens in spliced.items():
        # The turn renders as [</think>]marker<EOS>, after the generation prompt (or the EOS of
        # an assistant turn before it): each cut is at a split token, so the pieces tokenize as
        # they do in the whole prompt.
        turn = (THINK_CLOSE if settings.thinking else "") + marker + EOS
        before, text = text.split(turn, 1)
        ids += encoder.encode_text(before)
        ids += tokens
    return ids + encoder.encode_text(text)


# ---- the answer ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """The next piece of a call's arguments JSON; the pieces concatenate to Call.arguments."""

    index: int
    delta: str


@dataclass(frozen=True)
class CallDone:
    index: int
    call: Call


@dataclass(frozen=True)
class Progress:
    """Prompt tokens computed so far (prefill)."""

    done: int
    total: int


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of the completion tokens, those up to and including </think>


@dataclass
class Result:
    """The whole answer. finish: "stop", "tool_calls", "length" (or "cancelled", "error")."""

    reasoning: str
    content: str
    calls: list[Call]
    finish: str
    usage: Usage
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass
class _OpenCall:
    id: str
    name: str
    pieces: list[str]


class Assembler:
    """Sampled token ids -> events (ReasoningDelta, ContentDelta, CallStarted, CallArguments,
    CallDone) and, at the end, the Result; remembers turns with calls in `calls`.

    Arguments are streamed a parameter at a time as JSON text (`{"path": "a.py"`, `, "n": 3`,
    `}`), written canonically (runtime.encoding.to_json); a call the parser finds broken midway
    gets no CallDone and is left out of the Result.
    """

    def __init__(self, tokenizer: Any, thinking: bool, calls: ToolCallMap, id_prefix: str = "call_",
                 stops: Sequence[str] = ()) -> None:
        self.thinking, self.stops = thinking, stops
        self._parser = DsmlParser(think=thinking, tokenizer=tokenizer)
        self._map, self._prefix = calls, id_prefix
        self._eos, self._think_close = tokenizer.token_to_id(EOS), tokenizer.token_to_id(THINK_CLOSE)
        self.tokens: list[int] = []
        self._open: dict[int, _OpenCall] = {}
        self._done: list[Call] = []

    def feed(self, token: int) -> list[Any]:
        self.tokens.append(token)
        return self._convert(self._parser.feed_ids([token]))

    def finish(self, reason: str, usage: Usage, error: str | None = None) -> tuple[list[Any], Result]:
        """The last events and the Result; `reason` is the engine's ("stop", "length", ...)."""
        events = self._convert(self._parser.close())
        message = self._parser.finish()
        if reason == "stop" and self._done:
            reason = "tool_calls"
            tokens = self.tokens if self.tokens[-1:] == [self._eos] else self.tokens + [self._eos]
            self._map.remember([c.id for c in self._done], SampledTurn(
                array("I", tokens), self.thinking, message.reasoning, message.content,
                tuple((c.name, arguments_value(c.arguments)) for c in self._done)))
        if self.thinking:
            ends = self.tokens.index(self._think_close) + 1 if self._think_close in self.tokens else len(self.tokens)
            usage = replace(usage, reasoning_tokens=min(ends, usage.completion_tokens))
        stop = None
        if reason == "stop" and self.tokens[-1:] != [self._eos]:
            # The engine stopped on a stop string: the token that completed it is the last one.
            text = message.reasoning + message.content
            stop = next((s for s in self.stops if s in text[-len(s) - 256:]), None)
        return events, Result(message.reasoning, message.content, list(self._done), reason, usage, error, stop)

    def _convert(self, events: list[Any]) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, (ReasoningDelta, ContentDelta)):
                out.append(event)
            elif isinstance(event, ToolCallStarted):
                call = self._open[event.index] = _OpenCall(new_call_id(self._prefix), event.name, [])
                out.append(CallStarted(event.index, call.id, call.name))
            elif isinstance(event, ParameterComplete):
                call = self._open[event.index]
                piece = ("{" if not call.pieces else ", ") + f"{to_json(event.name)}: {to_json(event.value)}"
                call.pieces.append(piece)
                out.append(CallArguments(event.index, piece))
            elif isinstance(event, ToolCallComplete):
                call = self._open.pop(event.index)
                piece = "}" if call.pieces else "{}"
                call.pieces.append(piece)
                done = Call(call.id, call.name, "".join(call.pieces))
                self._done.append(done)
                out += [CallArguments(event.index, piece), CallDone(event.index, done)]
            elif not isinstance(event, End):
                raise TypeError(f"unexpected parser event {event!r}")
        return out
