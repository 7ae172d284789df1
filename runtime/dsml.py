"""Streaming parser for V4 completions: reasoning, content and DSML tool calls.

Feed it text deltas (or token ids) as they arrive; it returns events as soon as they are
certain, ending with `End(message)` at EOS; `close()` marks the end of input (reporting a
cut-off completion) and `finish()` returns the message. Each character is examined once,
apart from a tail shorter than the longest tag, held back while it could still become one.

Two modes. Strict rejects the first deviation from the format with `DsmlError`, like the
reference parser. Recovering (the default) records a `DsmlIssue` per malformed place — which
tool call and parameter, what was expected, what was found — drops only the tool call it
breaks, and keeps everything well-formed; the issue text is meant to be sent back to the
model so it can correct itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Union

from runtime.encoding import (
    BOS, DSML, EOS, INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN, THINK_CLOSE, THINK_OPEN,
    TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN, VALUE_END, to_json,
)


# ---- results -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    """One tool call; `arguments` is the JSON object text, as in the OpenAI format."""

    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class DsmlIssue:
    """One place where a completion leaves the format.

    section: "reasoning", "content", "tool_calls" or "end"; call: 0-based position of the
    invoke in the tool-calls block (None outside one); tool and parameter: names, when known.
    """

    section: str
    expected: str
    found: str
    call: int | None = None
    tool: str | None = None
    parameter: str | None = None

    def __str__(self) -> str:
        if self.call is None:
            where = {"end": "At the end of the completion", "tool_calls": "In the tool calls block"}.get(
                self.section, f"In the {self.section}")
        else:
            where = f"Tool call {self.call + 1}" + (f" ({self.tool})" if self.tool else "")
            where += f', parameter "{self.parameter}"' if self.parameter else ""
        return f"{where}: expected {self.expected}, found {self.found}."

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": str(self)}


class DsmlError(ValueError):
    """A completion rejected by the strict parser; `issue` says where and why."""

    def __init__(self, issue: DsmlIssue) -> None:
        super().__init__(str(issue))
        self.issue = issue


@dataclass
class ParsedMessage:
    """An assistant message parsed from a completion. `errors` is empty for a well-formed one."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[DsmlIssue] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        """The message in OpenAI form (with `reasoning_content`), as the encoder takes it back."""
        return {
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning,
            "tool_calls": [call.to_openai() for call in self.tool_calls],
        }


# ---- events ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    """An invoke's name is known; `index` is its position in the block (as in DsmlIssue.call)."""

    index: int
    name: str


@dataclass(frozen=True)
class ParameterComplete:
    index: int
    name: str
    value: Any  # the string, or the decoded JSON value for string="false"


@dataclass(frozen=True)
class ToolCallComplete:
    index: int
    call: ToolCall


@dataclass(frozen=True)
class End:
    message: ParsedMessage


Event = Union[ReasoningDelta, ContentDelta, ToolCallStarted, ParameterComplete, ToolCallComplete, End]


# ---- the state machine -------------------------------------------------------------------
# Parser states; each waits for its own set of tags (markers).
REASONING, CONTENT, TOOLS, INVOKE, PARAMS, VALUE, TRAILER, END = range(8)
_BLOCK_TAGS = (INVOKE_OPEN, INVOKE_CLOSE, PARAM_OPEN, PARAM_CLOSE, TOOL_CALLS_CLOSE, EOS)
_MARKERS = {
    REASONING: (THINK_CLOSE, TOOL_CALLS_OPEN, EOS, DSML, THINK_OPEN, BOS),
    CONTENT: (TOOL_CALLS_OPEN, EOS, DSML, THINK_OPEN, THINK_CLOSE, BOS),
    TOOLS: _BLOCK_TAGS,
    INVOKE: _BLOCK_TAGS,
    PARAMS: _BLOCK_TAGS,
    VALUE: (VALUE_END, EOS),  # raw values may hold any other tag
    TRAILER: (EOS,),
}


@dataclass(frozen=True)
class _Scan:
    """What one state searches for: its markers, and the proper prefixes of them that a
    text tail may be (to be held back until the next delta decides)."""

    pattern: re.Pattern[str]
    prefixes: frozenset[str]
    longest: int
    firsts: str  # the characters markers start with


def _scan(markers: tuple[str, ...]) -> _Scan:
    # Longest first: at one position the regex takes the first alternative that matches.
    pattern = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))
    prefixes = frozenset(m[:k] for m in markers for k in range(1, len(m)))
    return _Scan(pattern, prefixes, max(map(len, markers)), "".join(sorted({m[0] for m in markers})))


_SCANS = {state: _scan(markers) for state, markers in _MARKERS.items()}

# Names never contain a quote (the reference would let a lazy match run across tags).
_INVOKE_HEADER = re.compile(r'\s*name="([^"]*)">\n\n?')
_PARAM_HEADER = re.compile(r' name="([^"]*)" string="(true|false)">')
_END_OF_TEXT = "the end of the completion"


def _quote(text: str, limit: int = 80) -> str:
    """An excerpt of model output as a JSON string, newlines visible."""
    return to_json(text if len(text) <= limit else text[:limit] + "…")


@dataclass
class _Invoke:
    index: int
    name: str | None = None
    params: dict[str, tuple[str, bool]] = field(default_factory=dict)  # name -> (raw text, is string)
    broken: bool = False


class DsmlParser:
    """Incremental parser of one completion.

    think: the prompt ended with `<think>`, so the completion starts with reasoning.
    strict: raise DsmlError at the first deviation instead of recording it and going on.
    tokenizer: used by `feed_ids` to turn ids into text (loaded on first use when None).
    """

    def __init__(self, think: bool = True, strict: bool = False, tokenizer: Any = None) -> None:
        self.strict = strict
        self._state = REASONING if think else CONTENT
        self._tokenizer = tokenizer
        self._decode: Callable[[int], str] | None = None
        self._buf = ""  # unexamined or held-back text; always short between calls
        self._after_end = ""  # text after EOS, reported by close()
        self._gap: list[str] = []  # text of the current gap between tags, or of a parameter
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._issues: list[DsmlIssue] = []
        self._invokes = 0
        self._invoke: _Invoke | None = None
        self._events: list[Event] = []
        self._message: ParsedMessage | None = None

    @property
    def done(self) -> bool:
        """EOS has been seen: generation can stop."""
        return self._state == END

    def feed(self, text: str) -> list[Event]:
        """Parse the next piece of the completion; returns the events it completes."""
        if self._state == END:
            self._after_end += text
            return []
        self._buf += text
        while self._state != END and self._step():
            pass
        if self._state == END:
            self._after_end, self._buf = self._buf, ""
        events, self._events = self._events, []
        return events

    def feed_ids(self, ids: Iterable[int]) -> list[Event]:
        """Like `feed`, for token ids (multi-byte characters split across ids are joined)."""
        if self._decode is None:
            if self._tokenizer is None:
                from runtime.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer()
            self._decode = self._tokenizer.stream_decoder()
        return self.feed("".join(map(self._decode, ids)))

    def close(self) -> list[Event]:
        """The input is over: flush what was held back and report a missing EOS (a cut-off
        completion) or text after it. Returns the last events, End included if not seen yet."""
        events = []
        if self._state != END:
            self._issue("end", EOS, "the output stopping without it")
            events = self.feed(EOS)
        if self._after_end:
            self._issue("end", f"nothing after {EOS}", _quote(self._after_end))
            self._after_end = ""
        return events

    def finish(self) -> ParsedMessage:
        """`close()`, then the parsed message."""
        self.close()
        assert self._message is not None
        return self._message

    # -- scanning --
    def _step(self) -> bool:
        """Handle the next marker in the buffer, or release what no marker can claim."""
        scan = _SCANS[self._state]
        hold = self._partial_start(scan)
        found = scan.pattern.search(self._buf)
        # A marker found inside a possible longer one (｜DSML｜ in "<｜DSML｜tool_c") must wait.
        if found and found.start() < hold:
            gap = "".join(self._gap) + self._buf[: found.start()]
            self._gap.clear()
            self._buf = self._buf[found.end():]
            self._on_marker(gap, found.group())
            return True
        if self._state in (REASONING, CONTENT):
            # Keep up to two newlines before the held tail: they are not text if a tool-calls
            # block follows.
            for _ in range(2):
                if hold and self._buf[hold - 1] == "\n":
                    hold -= 1
        if hold:
            self._release(self._buf[:hold])
            self._buf = self._buf[hold:]
        return False

    def _partial_start(self, scan: _Scan) -> int:
        """Where the buffer's tail starts that could still grow into a marker (its length
        when none can)."""
        buf, n = self._buf, len(self._buf)
        i = max(0, n - scan.longest + 1)
        while i < n:
            candidates = [p for p in (buf.find(c, i) for c in scan.firsts) if p >= 0]
            if not candidates:
                break
            i = min(candidates)
            if buf[i:] in scan.prefixes:
                return i
            i += 1
        return n

    def _release(self, text: str) -> None:
        if not text:
            return
        if self._state == REASONING:
            self._reasoning.append(text)
            self._events.append(ReasoningDelta(text))
        elif self._state == CONTENT:
            self._content.append(text)
            self._events.append(ContentDelta(text))
        else:
            self._gap.append(text)

    # -- issues --
    def _issue(self, section: str, expected: str, found: str, parameter: str | None = None) -> None:
        invoke = self._invoke if section == "tool_calls" else None
        issue = DsmlIssue(section, expected, found, invoke.index if invoke else None,
                          invoke.name if invoke else None, parameter)
        if self.strict:
            raise DsmlError(issue)
        if invoke is not None:
            invoke.broken = True
        # The first issue per place is the cause; what follows from it would only be noise.
        if all((i.section, i.call) != (issue.section, issue.call) for i in self._issues):
            self._issues.append(issue)

    # -- transitions --
    def _on_marker(self, gap: str, marker: str) -> None:
        state = self._state
        if state in (REASONING, CONTENT):
            self._on_text_marker(gap, marker)
        elif state == TOOLS:
            if marker == EOS:
                self._issue("tool_calls", f"{TOOL_CALLS_CLOSE} before the end", _END_OF_TEXT)
                self._end()
                return
            if gap != "\n":
                self._issue("tool_calls", f'a newline, then {INVOKE_OPEN} or {TOOL_CALLS_CLOSE}', _quote(gap))
            if marker == INVOKE_OPEN:
                self._begin_invoke()
            elif marker == TOOL_CALLS_CLOSE:
                self._state = TRAILER
            else:
                self._issue("tool_calls", f"{INVOKE_OPEN} or {TOOL_CALLS_CLOSE}", _quote(marker))
        elif state == INVOKE:
            header = _INVOKE_HEADER.fullmatch(gap)
            if header:
                assert self._invoke is not None
                self._invoke.name = header.group(1)
                self._events.append(ToolCallStarted(self._invoke.index, header.group(1)))
            else:
                self._issue("tool_calls", f' name="TOOL_NAME"> and a newline after {INVOKE_OPEN}', _quote(gap))
            self._in_invoke(marker)
        elif state == PARAMS:
            if gap != ">\n":
                self._issue("tool_calls", f"{PARAM_CLOSE} and a newline", _quote("<" + VALUE_END + gap))
            self._in_invoke(marker)
        elif state == VALUE:
            if marker == VALUE_END:
                if gap.endswith("<"):
                    self._parameter(gap[:-1])
                else:
                    self._issue("tool_calls", f"{PARAM_CLOSE} to end the parameter", _quote(gap[-20:] + VALUE_END))
                self._state = PARAMS
            else:
                self._issue("tool_calls", f"{PARAM_CLOSE} to end the parameter", _END_OF_TEXT)
                self._end()
        else:  # TRAILER: the marker is EOS
            if gap:
                self._issue("end", f"{EOS} right after {TOOL_CALLS_CLOSE}", _quote(gap))
            self._end()

    def _on_text_marker(self, gap: str, marker: str) -> None:
        section = "reasoning" if self._state == REASONING else "content"
        if marker == THINK_CLOSE and self._state == REASONING:
            self._release(gap)
            self._state = CONTENT
        elif marker == TOOL_CALLS_OPEN:
            if self._state == REASONING:
                self._issue("reasoning", f"{THINK_CLOSE} to end the reasoning before the tool calls", _quote(marker))
            if gap.endswith("\n\n"):
                gap = gap[:-2]
            else:
                sink = self._reasoning if self._state == REASONING else self._content
                # Parts are never empty, so the last 20 hold at least 20 characters.
                self._issue(section, f"a blank line before {TOOL_CALLS_OPEN}", _quote(("".join(sink[-20:]) + gap)[-20:]))
                gap = gap.rstrip("\n")
            self._release(gap)
            self._state = TOOLS
        elif marker == EOS:
            if self._state == REASONING:
                self._issue("reasoning", f"{THINK_CLOSE} to end the reasoning", _END_OF_TEXT)
            self._release(gap)
            self._end()
        else:
            if marker == DSML:
                expected = f"tool calls only inside a block opened by a blank line and {TOOL_CALLS_OPEN}"
            else:
                expected = "plain text"
            self._issue(section, expected, _quote(marker))
            self._release(gap + marker)

    def _begin_invoke(self) -> None:
        self._invoke = _Invoke(self._invokes)
        self._invokes += 1
        self._state = INVOKE

    def _in_invoke(self, marker: str) -> None:
        """Inside an invoke after its header or a parameter: the next tag decides."""
        if marker == PARAM_OPEN:
            self._state = VALUE
            return
        if marker == INVOKE_CLOSE:
            self._close_invoke()
            return
        found = _END_OF_TEXT if marker == EOS else _quote(marker)
        self._issue("tool_calls", f"{PARAM_OPEN} or {INVOKE_CLOSE}", found)
        if marker == PARAM_CLOSE:  # a stray closing tag; the invoke goes on
            self._state = PARAMS
            return
        self._invoke = None
        if marker == INVOKE_OPEN:
            self._begin_invoke()
        elif marker == TOOL_CALLS_CLOSE:
            self._state = TRAILER
        else:
            self._end()

    def _parameter(self, text: str) -> None:
        invoke = self._invoke
        assert invoke is not None
        header = _PARAM_HEADER.match(text)
        if not header:
            self._issue("tool_calls", f' name="NAME" string="true" or string="false"> after {PARAM_OPEN}',
                        _quote(text[:60]))
            return
        name, is_string, raw = header.group(1), header.group(2) == "true", text[header.end():]
        if name in invoke.params:
            self._issue("tool_calls", "each parameter at most once", "a second value", name)
            return
        try:
            value = raw if is_string else json.loads(raw)
        except json.JSONDecodeError as err:
            self._issue("tool_calls", f'a JSON value since string="false" ({err.msg}, char {err.pos})', _quote(raw), name)
            return
        invoke.params[name] = (raw, is_string)
        if not invoke.broken:
            self._events.append(ParameterComplete(invoke.index, name, value))

    def _close_invoke(self) -> None:
        invoke = self._invoke
        assert invoke is not None
        if not invoke.broken:  # then its header was read, so it has a name
            # String values become JSON strings; JSON values are kept as written, like the reference.
            arguments = ", ".join(
                f"{to_json(key)}: {to_json(raw) if is_string else raw}" for key, (raw, is_string) in invoke.params.items()
            )
            call = ToolCall(invoke.name, "{" + arguments + "}")
            self._calls.append(call)
            self._events.append(ToolCallComplete(invoke.index, call))
        self._invoke = None
        self._state = TOOLS

    def _end(self) -> None:
        self._state = END
        # The issue list is shared: text arriving after EOS still gets reported in the message.
        self._message = ParsedMessage("".join(self._reasoning), "".join(self._content), list(self._calls),
                                      self._issues)
        self._events.append(End(self._message))


def parse_completion(text: str, think: bool = True, strict: bool = False) -> ParsedMessage:
    """Parse a whole completion at once (the same parser, fed one delta)."""
    parser = DsmlParser(think=think, strict=strict)
    parser.feed(text)
    return parser.finish()
