"""The exact tokens behind the tool calls the server handed out.

Clients send a conversation back as JSON; rendering that JSON canonically need not give the
tokens the model sampled (another spacing inside a JSON value, another split of the same text
into tokens), and then the engine cannot reuse the cached prefix. So every assistant turn with
tool calls is remembered under its call ids — unguessable (`secrets.token_urlsafe`), so one
client cannot steer another's prompt — with the tokens it was sampled as and what it said.
When the history comes back, a turn whose ids are known and whose calls and text are unchanged
is spliced in as those tokens; any other turn is rendered canonically and counted as a miss.

The map is bounded by the tokens it holds and forgets the least recently used turns first.
"""

from __future__ import annotations

import json
import secrets
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ID_BYTES = 18  # 24 URL-safe characters, 144 random bits


def new_call_id(prefix: str) -> str:
    """A fresh tool-call id: `prefix` + 144 random bits (`call_…`, `toolu_…`)."""
    return prefix + secrets.token_urlsafe(ID_BYTES)


def arguments_value(arguments: str) -> Any:
    """A call's arguments as a JSON value, for comparing two writings of the same arguments."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


@dataclass(frozen=True)
class SampledTurn:
    """An assistant turn as the model wrote it: its tokens (EOS last), whether it was sampled
    in a thinking mode (the prompt ended with `<think>`), and what it said, to check that the
    history sent back still says that."""

    tokens: array
    thinking: bool
    reasoning: str
    content: str
    calls: tuple[tuple[str, Any], ...]  # (name, arguments as a JSON value) per call, in order


class ToolCallMap:
    """Call id -> SampledTurn, at most `max_tokens` tokens held (least recently used go first)."""

    def __init__(self, max_tokens: int = 1 << 24) -> None:
        self.max_tokens = max_tokens
        self._turns: OrderedDict[tuple[str, ...], SampledTurn] = OrderedDict()
        self._by_id: dict[str, tuple[str, ...]] = {}
        self._held = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = {"unknown": 0, "changed": 0}

    def __len__(self) -> int:
        return len(self._turns)

    @property
    def held_tokens(self) -> int:
        return self._held

    def remember(self, ids: Sequence[str], turn: SampledTurn) -> None:
        key = tuple(ids)
        with self._lock:
            self._turns[key] = turn
            self._held += len(turn.tokens)
            for call_id in key:
                self._by_id[call_id] = key
            while self._held > self.max_tokens and self._turns:
                old_key, old = self._turns.popitem(last=False)
                self._held -= len(old.tokens)
                for call_id in old_key:
                    self._by_id.pop(call_id, None)

    def recall(self, ids: Sequence[str], thinking: bool, reasoning: str | None, content: str,
               calls: Sequence[tuple[str, Any]]) -> array | None:
        """The sampled tokens of the turn that handed out exactly `ids`, if it is remembered,
        was sampled in the same mode and still says the same (a reasoning not sent back is
        restored); None otherwise, counted as a miss."""
        with self._lock:
            key = self._by_id.get(ids[0]) if ids else None
            if key is None or key != tuple(ids):
                self.misses["unknown"] += 1
                return None
            turn = self._turns[key]
            same = (turn.thinking == thinking and turn.content == content and turn.calls == tuple(calls)
                    and (not reasoning or reasoning == turn.reasoning))
            if not same:
                self.misses["changed"] += 1
                return None
            self._turns.move_to_end(key)
            self.hits += 1
            return turn.tokens
