"""Where completions come from: the protocol every backend implements, and the backends side by
side — `local` (the in-process runtime on a V4 checkpoint), `http` (an OpenAI-compatible chat
completions server) and `scripted` (turns written in a file, for tests, demos and replay).

A backend gets the whole conversation twice over, as OpenAI-style messages and as V4 token ids
(ending with the generation prompt), and uses whichever it speaks. It streams what it produces
to a listener as the parser's events (`ReasoningDelta`, `ContentDelta`, `ToolCallStarted`,
`ToolCallComplete`, `End` from runtime.dsml) plus `Prefill` progress, and returns the
`Completion`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.dsml import ParsedMessage

Listener = Callable[[object], None]


class BackendError(Exception):
    """A completion could not be had (server error, bad configuration, exhausted script): ends the run."""


@dataclass(frozen=True)
class Prefill:
    """Prompt tokens processed so far in this turn (in-process backend)."""

    done: int
    total: int


@dataclass(frozen=True)
class Request:
    """One turn to complete.

    messages: the conversation in OpenAI form, the system message carrying the tools;
    ids: the same conversation as V4 token ids, ending with the generation prompt;
    max_tokens: the most the completion may take; think: "none", "high" or "max".
    Both sequences are the agent's own and grow after the call: copy what is to be kept.
    """

    messages: Sequence[Mapping[str, Any]]
    ids: Sequence[int]
    max_tokens: int
    think: str


@dataclass
class Completion:
    """What the model wrote.

    text: the completion in V4 wire form, EOS included when it ended by itself;
    message: it parsed (tool calls, and the format errors to send back);
    ids: the tokens actually sampled, or None when the backend does not see tokens (the loop
        then tokenizes `text`); cached_tokens: prompt tokens the backend did not recompute;
    details: backend-specific facts for the trajectory (server usage, finish reason).
    """

    text: str
    message: ParsedMessage
    ids: list[int] | None = None
    cached_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A model the agent can talk to."""

    name: str
    context_limit: int  # tokens a conversation may hold, prompt and completion together

    def complete(self, request: Request, listener: Listener) -> Completion:
        """The next assistant turn; raises BackendError when none can be had."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the trajectory records of it (name, model, where it runs; never a key)."""
        ...
