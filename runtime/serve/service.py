"""The server's side of a generation, shared by every API: a `Chat` becomes prompt ids, a
request to the engine, and a stream of events that ends with the `Result`.

`Service.start` does everything that can refuse the request (an unknown model, a conversation
that cannot be rendered or does not fit the context, what the engine rejects) before any answer
is sent, so each API can still answer a plain 4xx. `Generation.events()` then yields the
assembler's events, `Progress` during the prefill, None whenever nothing came for
`keepalive_s` (the APIs send a keep-alive then) and finally the `Result`; leaving it early —
a client that went away — cancels the generation in the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from runtime.encoding import EOS, PromptEncoder, TokenCache
from runtime.serve.chat import (
    ApiError,
    Assembler,
    Chat,
    Progress,
    Result,
    Usage,
    prompt_ids,
)
from runtime.serve.toolcalls import ToolCallMap

if TYPE_CHECKING:
    from runtime.serve.engine import Engine, Handle
    from runtime.tokenizer import Tokenizer


class BoundedTokenCache(TokenCache):
    """The token cache of a server that runs for weeks: emptied whenever it holds more than
    `max_tokens` ids (it only saves tokenizing again)."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        super().__init__(tokenizer)
        self.max_tokens = max_tokens
        self._held = 0

    def encode_pieces(self, pieces: Sequence[str]) -> list[Sequence[int]]:
        before = len(self)
        out = super().encode_pieces(pieces)
        if len(self) != before:
            self._held = sum(len(ids) for ids in self._ids.values())
            if self._held > self.max_tokens:
                self._ids.clear()
                self._held = 0
        return out


class Service:
    """One model behind the APIs: its name, the engine, the tokenizer and the tool-call map."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, context_limit: int, *,
                 effort_profile: str = "preview", keepalive_s: float = 5.0, calls: ToolCallMap | None = None,
                 token_cache_tokens: int = 1 << 24) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.context_limit = model_name, context_limit
        self.effort_profile, self.keepalive_s = effort_profile, keepalive_s
        self.calls = calls if calls is not None else ToolCallMap()
        self._encoder = PromptEncoder(tokenizer, cache=BoundedTokenCache(tokenizer, token_cache_tokens))
        self._encoding = threading.Lock()  # the cache is shared; requests tokenize in worker threads
        self.eos = tokenizer.token_to_id(EOS)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_name!r}",
                           "not_found_error", "model")

    def encode(self, chat: Chat) -> list[int]:
        with self._encoding:
            return prompt_ids(chat, self._encoder, self.effort_profile, self.calls)

    async def start(self, chat: Chat, id_prefix: str = "call_") -> Generation:
        """Render, check and submit `chat`; ApiError when the request cannot be served."""
        from runtime.serve.engine import GenerationRequest
        from runtime.session import SamplingParams

        self.check_model(chat.model)
        ids = await asyncio.to_thread(self.encode, chat)
        room = self.context_limit - len(ids)
        if room < 1:
            raise ApiError(400, f"the conversation takes {len(ids):,} tokens; the context limit is "
                                f"{self.context_limit:,} tokens and the answer needs room too",
                           param="messages")
        max_tokens = min(chat.max_tokens or room, room)
        s = chat.sampling
        try:
            request = GenerationRequest(ids, max_tokens, SamplingParams(s.temperature, s.top_p, s.top_k, s.seed),
                                        stop_ids=frozenset({self.eos}), stop_strings=chat.stop)
            handle = self.engine.submit(request)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return Generation(handle, Assembler(self.tokenizer, chat.think != "none", self.calls, id_prefix, chat.stop),
                          self.keepalive_s)


class Generation:
    """One submitted request: `events()` streams it (once)."""

    def __init__(self, handle: Handle, assembler: Assembler, keepalive_s: float) -> None:
        self.handle, self.assembler, self.keepalive_s = handle, assembler, keepalive_s
        self.result: Result | None = None

    async def events(self) -> AsyncIterator[Any]:
        from runtime.serve.engine import Finished, PrefillProgress, Token

        source = self.handle.aevents().__aiter__()
        pending: asyncio.Future[Any] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(source.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=self.keepalive_s)
                if not done:
                    yield None
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    event = Finished("error", "the engine ended the stream without finishing", 0, 0, 0)
                pending = None
                if isinstance(event, Token):
                    for out in self.assembler.feed(event.id):
                        yield out
                elif isinstance(event, PrefillProgress):
                    yield Progress(event.done, event.total)
                elif isinstance(event, Finished):
                    usage = Usage(event.prompt_tokens, event.cached_tokens, event.completion_tokens)
                    last, self.result = self.assembler.finish(event.reason, usage, event.error)
                    for out in last:
                        yield out
                    yield self.result
                    return
        finally:
            self.cancel()  # when the client went away, or something broke
            if pending is not None:
                pending.cancel()

    def cancel(self) -> None:
        """Free the engine's slot, unless the answer is complete."""
        if self.result is None:
            self.handle.cancel()

    async def result_of(self, disconnected: Any) -> Result:
        """Run to the end for a non-streaming answer; `disconnected()` (awaitable) is asked
        at each idle wait, and a client that went away cancels the generation."""
        events = self.events()
        checked = time.monotonic()
        try:
            async for event in events:
                # Asked at most once a second: a token stream never waits idle.
                if (event is None or time.monotonic() - checked > 1.0) and self.result is None:
                    checked = time.monotonic()
                    if await disconnected():
                        break
        finally:
            await events.aclose()
            self.cancel()
        if self.result is None:
            raise ApiError(499, "the client closed the connection")
        return self.result
