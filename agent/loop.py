"""The agent core: one model, one work tree, one conversation that only grows.

    agent = Agent(backend, tokenizer, workdir, config=AgentConfig(max_turns=30), trajectory=t, listener=show)
    result = agent.run(issue, repository=pack_repository(workdir, budget=agent.repository_budget(issue)))

The conversation: the system prompt (instructions and the tools block), the packed repository
and the issue, then model turns — reasoning interleaved with tool calls — each followed by the
tool results. It is held twice, as OpenAI-style messages (what an HTTP server takes) and as V4
token ids (what the in-process runtime and the context count take), and it only ever grows:
every prompt's ids start with the previous prompt's ids plus the completion's ids, which is
checked each turn, so a warm cache only ever computes what was appended. The completion's ids
are the tokens actually sampled when the backend has them, never a re-tokenization.

Recoverable problems become messages to the model and the loop goes on: malformed tool calls
(the parser's issues), a reply without any tool call, a reply cut off at the turn's token limit,
a failing tool (an error result). The run ends on submit, at a limit (turns, output tokens,
context), when the model repeats the same calls `repeat_limit` turns in a row, on Ctrl-C, or
when the backend fails. Each turn is written to the trajectory as soon as it is over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.backends import Backend, BackendError, Request
from runtime.dsml import ParsedMessage
from runtime.encoding import (ASSISTANT, BOS, EOS, FILE_BEGIN, FILE_END, FILE_NAME_BEGIN, FILE_NAME_END,
                            LATEST_REMINDER, USER, PromptEncoder, PromptSettings, render_prompt)
from agent.prompts import Prompts
from agent.trajectory import Trajectory
from tools.base import Settings as ToolSettings
from tools.base import Tool, ToolResult
from tools.registry import call as call_tool
from tools.registry import default_tools, schemas

if TYPE_CHECKING:
    from runtime.tokenizer import Tokenizer

# Why a run ended.
SUBMITTED = "submitted"
MAX_TURNS = "max_turns"
MAX_TOKENS = "max_tokens"
CONTEXT_FULL = "context_full"
REPEATED_CALL = "repeated_call"
INTERRUPTED = "interrupted"
BACKEND_ERROR = "backend_error"
CRASHED = "crashed"

# Structural tokens that text written into a user turn must not contain as such (the tokenizer
# would turn them into the real tokens): shown with ASCII bars instead.
_STRUCTURAL = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, FILE_NAME_BEGIN, FILE_NAME_END, FILE_BEGIN, FILE_END)


class ConversationError(RuntimeError):
    """The conversation stopped being append-only: a bug, never the model's doing."""


@dataclass(frozen=True)
class AgentConfig:
    """Limits and modes of one run.

    max_turn_tokens: the most one completion may take; max_total_tokens: all completions
    together (0: no limit); repeat_limit: the run stops when a turn's tool calls are the same
    as in the turns before it, this many turns in a row; conversation_reserve: tokens kept free
    for the conversation when the repository is packed (at most a quarter of the context).
    """

    think: str = "high"
    effort_profile: str = "preview"
    max_turns: int = 50
    max_turn_tokens: int = 32_768
    max_total_tokens: int = 0
    repeat_limit: int = 2
    conversation_reserve: int = 131_072

    @property
    def prompt_settings(self) -> PromptSettings:
        return PromptSettings(think=self.think, effort_profile=self.effort_profile)


class Packed(Protocol):
    """A packed repository (agent.pack.PackResult): its text, and the same as token ids. The text
    must begin and end with a split token (the file markers do), so its ids are its own."""

    def text(self) -> str: ...

    def ids(self) -> list[int]: ...


# ---- events for a live view (the backend's events come through the same listener) --------
@dataclass(frozen=True)
class TurnStarted:
    turn: int
    prompt_tokens: int
    context_limit: int


@dataclass(frozen=True)
class ToolRan:
    turn: int
    call_id: str
    name: str
    arguments: str
    result: ToolResult


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    seconds: float


@dataclass(frozen=True)
class TurnFinished:
    turn: int
    stats: TurnStats


@dataclass
class RunResult:
    stop: str
    turns: int
    tokens_in: int
    tokens_out: int
    cached_tokens: int
    context_tokens: int
    context_limit: int
    seconds: float
    summary: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Conversation:
    """The messages and their token ids, kept in step; both only grow.

    `packed` is (text, ids) of a piece of the first prompt whose ids are already known (the
    packed repository): the text is found in the prompt and its ids are used as they are.
    """

    def __init__(self, encoder: PromptEncoder, messages: Sequence[Mapping[str, Any]],
                 packed: tuple[str, list[int]] | None = None) -> None:
        self.encoder = encoder
        self.messages: list[Mapping[str, Any]] = list(messages)
        text = render_prompt(self.messages, encoder.settings)
        if packed and packed[0]:
            start = text.index(packed[0])
            end = start + len(packed[0])
            self.ids = encoder.encode_text(text[:start]) + list(packed[1]) + encoder.encode_text(text[end:])
        else:
            self.ids = encoder.encode_text(text)

    def add_completion(self, message: Mapping[str, Any], ids: Sequence[int]) -> None:
        """The assistant's turn: its message, and the ids the model produced (ending with EOS)."""
        self.messages.append(message)
        self.ids.extend(ids)

    def add_turn(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Tool results and user messages after an assistant turn, up to the next generation prompt."""
        before = render_prompt(self.messages, self.encoder.settings)
        after = render_prompt([*self.messages, *messages], self.encoder.settings)
        if not after.startswith(before):
            raise ConversationError("adding a turn changed the earlier prompt")
        # The earlier prompt ends with EOS, a split token: the new text tokenizes on its own.
        self.ids.extend(self.encoder.encode_text(after[len(before):]))
        self.messages.extend(messages)


class Agent:
    """Runs one issue to the end. `listener` gets the live events (TurnStarted, the backend's
    stream, ToolRan, TurnFinished); `trajectory` gets a record per turn and one at the end."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, workdir: Path, *, config: AgentConfig = AgentConfig(),
                 prompts: Prompts = Prompts(), tools: Sequence[Tool] | None = None,
                 tool_settings: ToolSettings = ToolSettings(), trajectory: Trajectory | None = None,
                 listener: Callable[[object], None] | None = None) -> None:
        self.backend, self.workdir, self.config, self.prompts = backend, Path(workdir), config, prompts
        self.tools = default_tools() if tools is None else list(tools)
        self.tool_settings, self.trajectory = tool_settings, trajectory
        self.listener = listener or (lambda event: None)
        self.encoder = PromptEncoder(tokenizer, config.prompt_settings)
        self.eos = tokenizer.token_to_id(EOS)
        self.conversation: Conversation | None = None
        self.turns = self.tokens_in = self.tokens_out = self.cached_tokens = 0
        self.summary: str | None = None
        self._sent: list[int] = []  # the last prompt and its completion: the next prompt must start with them
        self._last_calls: tuple = ()
        self._repeats = 0
        self._pending: dict[str, Any] | None = None  # the turn under way, written even if it is cut short

    # -- the first prompt ---------------------------------------------------------------------

    def messages(self, issue: str, packed_text: str = "") -> list[dict[str, Any]]:
        """The first two messages: instructions with the tools, then the repository and the issue."""
        task = self.prompts.issue.replace("{issue}", issue)
        content = self.prompts.repository + packed_text + task if packed_text else task.lstrip()
        return [{"role": "system", "content": self.prompts.system, "tools": schemas(self.tools)},
                {"role": "user", "content": content}]

    def repository_budget(self, issue: str) -> int:
        """Tokens the packed repository may take: the context, less the instructions and the issue,
        less room for the conversation."""
        limit = self.backend.context_limit
        overhead = len(Conversation(self.encoder, self.messages(issue)).ids)
        return limit - overhead - min(self.config.conversation_reserve, limit // 4)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, issue: str, repository: Packed | None = None) -> RunResult:
        start = time.perf_counter()
        packed = (repository.text(), repository.ids()) if repository is not None else None
        self.conversation = Conversation(self.encoder, self.messages(issue, packed[0] if packed else ""), packed)
        stop, error = None, None
        try:
            while stop is None:
                stop = self._limit() or self.step()
        except KeyboardInterrupt:
            stop = INTERRUPTED
        except BackendError as e:
            stop, error = BACKEND_ERROR, str(e)
        except Exception as e:
            stop, error = CRASHED, f"{type(e).__name__}: {e}"
            raise
        finally:
            if self._pending is not None:
                self._record({**self._pending, "incomplete": True})
            result = RunResult(stop or CRASHED, self.turns, self.tokens_in, self.tokens_out, self.cached_tokens,
                               len(self.conversation.ids), self.backend.context_limit,
                               round(time.perf_counter() - start, 3), self.summary, error)
            self._record({"type": "end", **result.to_dict()})
        return result

    def step(self) -> str | None:
        """One turn: a completion, its tool calls run, the replies appended. Returns the stop
        reason when the run is over."""
        conversation = self.conversation
        assert conversation is not None, "run() starts the conversation"
        prompt = conversation.ids
        if prompt[:len(self._sent)] != self._sent:
            raise ConversationError("the prompt does not start with the previous prompt and its completion")
        turn = self.turns + 1
        prompt_tokens = len(prompt)  # the list grows with this turn
        max_tokens = self._turn_tokens()
        self.listener(TurnStarted(turn, prompt_tokens, self.backend.context_limit))
        start = time.perf_counter()
        completion = self.backend.complete(Request(conversation.messages, prompt, max_tokens, self.config.think),
                                           self.listener)
        self.turns = turn
        sampled = completion.ids if completion.ids is not None else self.encoder.encode_text(completion.text)
        cut_off = not sampled or sampled[-1] != self.eos
        calls = [{"id": f"call_{turn}_{i}", "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments}}
                 for i, c in enumerate(completion.message.tool_calls)]
        assistant = {"role": "assistant", "content": completion.message.content,
                     "reasoning_content": completion.message.reasoning, "tool_calls": calls}
        # A cut-off turn is closed with EOS, so that the conversation stays well-formed.
        conversation.add_completion(assistant, [*sampled, self.eos] if cut_off else sampled)
        self._sent = list(conversation.ids)
        stats = TurnStats(prompt_tokens, completion.cached_tokens, len(sampled), round(time.perf_counter() - start, 3))
        self.tokens_in += stats.prompt_tokens
        self.tokens_out += stats.output_tokens
        self.cached_tokens += stats.cached_tokens
        self._pending = {"type": "turn", "turn": turn, "completion": completion.text, "assistant": assistant,
                         "cut_off": cut_off, "errors": [issue.to_dict() for issue in completion.message.errors],
                         "results": [], "stats": asdict(stats), "details": completion.details}

        stop = REPEATED_CALL if self._repeated(calls) else None
        replies: list[dict[str, Any]] = []
        for call in calls if stop is None else []:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            result = call_tool(name, arguments, self.workdir, tools=self.tools, settings=self.tool_settings)
            self._pending["results"].append({"id": call["id"], "name": name, "arguments": arguments,
                                             "ok": result.ok, "output": result.output})
            self.listener(ToolRan(turn, call["id"], name, arguments, result))
            replies.append({"role": "tool", "tool_call_id": call["id"], "content": result.output})
            if result.done:  # calls after submit are not run
                stop, self.summary = SUBMITTED, result.summary
                break
        if stop is None:
            feedback = self._feedback(completion.message, cut_off, max_tokens)
            if feedback:
                replies.append({"role": "user", "content": feedback})
                self._pending["feedback"] = feedback
            conversation.add_turn(replies)
        self._record(self._pending)
        self._pending = None
        self.listener(TurnFinished(turn, stats))
        return stop

    # -- helpers ------------------------------------------------------------------------------

    def _turn_tokens(self) -> int:
        if self.config.max_total_tokens:
            return min(self.config.max_turn_tokens, self.config.max_total_tokens - self.tokens_out)
        return self.config.max_turn_tokens

    def _limit(self) -> str | None:
        """The limit reached before the next turn, if any."""
        assert self.conversation is not None
        if self.turns >= self.config.max_turns:
            return MAX_TURNS
        if self.config.max_total_tokens and self.tokens_out >= self.config.max_total_tokens:
            return MAX_TOKENS
        if len(self.conversation.ids) + self._turn_tokens() > self.backend.context_limit:
            return CONTEXT_FULL
        return None

    def _repeated(self, calls: list[dict[str, Any]]) -> bool:
        """Whether these calls make `repeat_limit` turns in a row with the same calls."""
        key = tuple((c["function"]["name"], _canonical(c["function"]["arguments"])) for c in calls)
        self._repeats = self._repeats + 1 if key and key == self._last_calls else int(bool(key))
        self._last_calls = key
        return self._repeats >= self.config.repeat_limit

    def _feedback(self, message: ParsedMessage, cut_off: bool, max_tokens: int) -> str | None:
        """What the model is told about a turn it cannot go on from as is (None: nothing)."""
        if cut_off:  # the format issues at the cut follow from it
            return self.prompts.cut_off.replace("{max_tokens}", str(max_tokens))
        if message.errors:
            errors = "\n".join(f"- {_readable(str(issue))}" for issue in message.errors)
            return self.prompts.format_error.replace("{errors}", errors)
        if not message.tool_calls:
            return self.prompts.no_tool_call
        return None

    def _record(self, record: dict[str, Any]) -> None:
        if self.trajectory is not None:
            self.trajectory.write(record)


def _canonical(arguments: str) -> str:
    """Arguments in one spelling (key order and spacing do not make a call different)."""
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except json.JSONDecodeError:
        return arguments


def _readable(text: str) -> str:
    for token in _STRUCTURAL:
        text = text.replace(token, token.replace("｜", "|"))
    return text
