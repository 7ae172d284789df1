"""A scripted policy: the model's turns written in a file, played back in order.

A turn is either structured,

    {"reasoning": "...", "content": "...", "tool_calls": [{"name": "read_file", "arguments": {"path": "a.py"}}]}

or the raw completion text, `{"completion": "...</think>...<｜end▁of▁sentence｜>"}`, which may be
malformed on purpose. Either way the text goes through the same streaming parser as a real
model's output, so the loop cannot tell a script from a model. The file is JSON (a list of turns,
or {"turns": [...]}) or, when its name ends in .jsonl, one turn per line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.backends import BackendError, Completion, Listener, Request
from runtime.dsml import DsmlParser
from runtime.encoding import EncodingError, PromptSettings, render_completion

STRUCTURED_KEYS = frozenset({"reasoning", "content", "tool_calls"})


class ScriptError(ValueError):
    """A script file that cannot be read as turns."""


def load_script(path: str | Path) -> list[dict[str, Any]]:
    """The turns of a script file (checked)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ScriptError(f"cannot read script {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".jsonl":
            turns = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            turns = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScriptError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(turns, Mapping):
        turns = turns.get("turns")
    if not isinstance(turns, list):
        raise ScriptError(f'{path}: expected a list of turns or {{"turns": [...]}}')
    for number, turn in enumerate(turns, 1):
        problem = _check_turn(turn)
        if problem:
            raise ScriptError(f"{path}: turn {number}: {problem}")
    return turns


def _check_turn(turn: Any) -> str | None:
    if not isinstance(turn, Mapping):
        return "a turn must be a JSON object"
    if "completion" in turn:
        return None if set(turn) == {"completion"} and isinstance(turn["completion"], str) else \
            '"completion" must be a string and stand alone'
    unknown = set(turn) - STRUCTURED_KEYS
    if unknown:
        return f"unknown key {sorted(unknown)[0]!r} (a turn has reasoning, content, tool_calls, or completion)"
    if not all(isinstance(turn.get(key, ""), str) for key in ("reasoning", "content")):
        return "reasoning and content must be strings"
    calls = turn.get("tool_calls", [])
    if not isinstance(calls, list) or not all(
            isinstance(c, Mapping) and isinstance(c.get("name"), str)
            and isinstance(c.get("arguments", {}), (Mapping, str)) for c in calls):
        return 'tool_calls must be a list of {"name": ..., "arguments": {...}}'
    return None


def turn_text(turn: Mapping[str, Any], think: str) -> str:
    """The completion a model would have written for `turn`."""
    if "completion" in turn:
        return turn["completion"]
    message = {
        "reasoning_content": turn.get("reasoning", ""),
        "content": turn.get("content", ""),
        "tool_calls": [{"function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                       for c in turn.get("tool_calls", [])],
    }
    return render_completion(message, PromptSettings(think=think))


class ScriptedBackend:
    """Plays `turns` back one per request; running out of turns ends the run (BackendError)."""

    name = "scripted"

    def __init__(self, turns: Sequence[Mapping[str, Any]], context_limit: int, source: str | None = None) -> None:
        self.turns = list(turns)
        self.context_limit = context_limit
        self.source = source
        self.played = 0

    def complete(self, request: Request, listener: Listener) -> Completion:
        if self.played >= len(self.turns):
            raise BackendError(f"the script has no more turns (it has {len(self.turns)})")
        try:
            text = turn_text(self.turns[self.played], request.think)
        except EncodingError as e:
            raise BackendError(f"script turn {self.played + 1}: {e}") from None
        self.played += 1
        parser = DsmlParser(think=request.think != "none")
        for event in parser.feed(text) + parser.close():
            listener(event)
        return Completion(text, parser.finish())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "script": self.source, "turns": len(self.turns)}
