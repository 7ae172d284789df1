"""The serving engine: many conversations on one model, advanced together one step at a time.

Each step runs, in one forward, the next token of every running decoder (two for a
speculative verify) and at most one prefill chunk of `chunk_size` tokens, so a long prompt
delays the decoders by one chunk per step, never by its whole prefill (continuous batching:
requests join and leave between steps). Every sequence is a `runtime.session.Session`
driven through its `Prefill` and `Decoding` steppers, so the engine computes exactly the
chunks a session alone would, and sampling, stops and speculation are the session's own.

A request starts from the longest prefix that a running or recently finished sequence holds
(a fork: the states share every tensor) or, with `persist`, that the on-disk prefix cache
holds. Finished sequences stay warm for the next turn, least recently used first out beyond
`budget_bytes`: to host memory when the model is on a GPU (on a CPU the model's memory is
host memory, so that tier is skipped), then dropped; with `persist`, prefills save their
block-aligned prefixes as they go (docs/sessions.md), so a dropped conversation is reloaded
from disk on its next turn. docs/serve.md ("The engine") says what is exact and what is not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.model import ExtendOutput, Model
from runtime.prefix_cache import PrefixCache
from runtime.session import Decoding, MtpFeeds, Prefill, SamplingParams, Session, check_decoding, run_feeds, state_bytes

RATE_WINDOW_S = 10.0  # tokens_per_s in stats() is measured over this many recent seconds


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]  # the whole conversation as token ids
    max_tokens: int
    sampling: SamplingParams = SamplingParams(temperature=0)
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    speculative: bool = False


@dataclass(frozen=True)
class PrefillProgress:
    done: int  # prompt tokens held so far (reused ones included)
    total: int  # the prompt's length


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    error: str | None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused instead of computed
    completion_tokens: int


Event = PrefillProgress | Token | Finished


class QueueFull(RuntimeError):
    """The waiting queue is at `max_waiting`: the request was not queued (a server answers 429/529)."""


class Handle:
    """One submitted request: its events, in order, then `Finished` exactly once."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.cancelled = False
        self.finished = False

    def _push(self, event: Event) -> None:
        with self._cond:
            if self.finished:
                return
            self.finished = isinstance(event, Finished)
            self._events.append(event)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:
                pass  # that loop is closed: nobody waits there any more

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking, for threads; TimeoutError if no event comes within `timeout` seconds."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._events, timeout):
                    raise TimeoutError(f"no event within {timeout} s")
                event = self._events.popleft()
            yield event
            if isinstance(event, Finished):
                return

    def ready(self) -> list[Event]:
        """The events held now, without waiting (for callers that drive `Engine.step` themselves)."""
        with self._cond:
            events, self._events = list(self._events), deque()
        return events

    async def aevents(self) -> AsyncIterator[Event]:
        """For asyncio: each event as it comes, waiting on a future the engine's thread resolves."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                event = self._events.popleft() if self._events else None
                if event is None:
                    future = loop.create_future()
                    self._waiters.append((loop, future))
            if event is None:
                await future
                continue
            yield event
            if isinstance(event, Finished):
                return

    def cancel(self) -> None:
        """Stop generating: a waiting request ends at once, a running one at the next step."""
        self._engine._cancel(self)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(eq=False)
class _Sequence:
    """A request the engine serves, and where it stands."""

    request: GenerationRequest
    handle: Handle
    max_tokens: int  # the request's, cut to the room left under the context limit
    session: Session | None = None
    prefill: Prefill | None = None
    decoding: Decoding | None = None
    cached: int = 0


class Engine:
    """Serves `GenerationRequest`s on `model` (see the module docstring).

    `detokenize` turns ids into text for stop strings; `max_running` bounds the sequences
    stepped together; `max_waiting` the requests queued beyond them (None: no bound; a submit
    past it raises QueueFull and leaves the others as they are); `max_kept` the finished ones kept warm; `budget_bytes` the memory of
    running and kept sequences on the model's device (None: no byte limit; kept ones go first),
    `host_budget_bytes` that of those moved to host memory (default the same);
    `persist`/`cache_root` as for a Session; `context_limit` defaults to the model's maximum
    position. Drive it with `start()` (a background thread) or by calling
    `step()` yourself.
    """

    def __init__(self, model: Model, *, detokenize: Callable[[list[int]], str] | None = None, max_running: int = 8,
                 max_waiting: int | None = None, chunk_size: int = 512, max_kept: int = 64, budget_bytes: int | None = None,
                 host_budget_bytes: int | None = None, persist: bool = False, cache_root: str | Path | None = None,
                 context_limit: int | None = None, warn: Callable[[str], None] = lambda _: None) -> None:
        if max_running < 1 or chunk_size < 1 or max_kept < 0 or (max_waiting is not None and max_waiting < 0):
            raise ValueError("max_running and chunk_size must be at least 1, max_kept and max_waiting at least 0")
        self.model, self.detokenize, self.max_running, self.chunk_size = model, detokenize, max_running, chunk_size
        self.max_waiting = max_waiting
        self.max_kept, self.budget_bytes = max_kept, budget_bytes
        self.host_budget_bytes = host_budget_bytes if host_budget_bytes is not None else budget_bytes
        self.persist, self.cache_root, self.warn = persist, cache_root, warn
        self.context_limit = context_limit or model.config.max_position_embeddings
        self._disk = PrefixCache(model, model.default_cache_format(), cache_root, warn) if persist else None
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._kept: list[Session] = []  # finished sequences kept for reuse, least recently used first
        self._thread: threading.Thread | None = None
        self._closed = False
        self._totals = {"prompt_tokens": 0, "generated_tokens": 0, "cache_hit_tokens": 0, "evictions": 0,
                        "requests": 0, "errors": 0, "rejected": 0}
        self._running_peak = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    # -- the public side (any thread) -----------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._loop, name="v4agent-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel every request and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            gone, self._waiting = list(self._waiting) + self._running, deque()
            self._running = []
        for seq in gone:
            self._end(seq, "cancelled")

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue `request`; ValueError if it cannot be served (checked here, before queueing),
        QueueFull if `max_waiting` requests already wait."""
        self._check(request)
        handle = Handle(self)
        seq = _Sequence(request, handle, min(request.max_tokens, self.context_limit - len(request.prompt)))
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            # Free running slots count as room too: a request waits for the next step to take one.
            if (self.max_waiting is not None
                    and len(self._waiting) + len(self._running) >= self.max_running + self.max_waiting):
                self._totals["rejected"] += 1
                raise QueueFull(f"the server is busy: {len(self._running)} requests running and "
                                f"{len(self._waiting)} waiting, the most it queues; retry later")
            self._waiting.append(seq)
            self._totals["requests"] += 1
            self._cond.notify_all()
        return handle

    def stats(self) -> dict:
        now = time.monotonic()
        with self._cond:
            recent = [(t, n) for t, n in self._recent if t >= now - RATE_WINDOW_S]
            out = {"running": len(self._running), "running_peak": self._running_peak, "waiting": len(self._waiting),
                   "kept": len(self._kept), **self._totals}
        span = now - recent[0][0] if recent else 0.0
        out["tokens_per_s"] = round(sum(n for _, n in recent) / span, 3) if span > 0 else 0.0
        return out

    def _check(self, request: GenerationRequest) -> None:
        prompt, vocab = request.prompt, self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt) >= self.context_limit:
            raise ValueError(f"the prompt takes {len(prompt):,} tokens; the context limit is "
                             f"{self.context_limit:,} and the answer needs room too")
        if request.max_tokens < 0:
            raise ValueError(f"max_tokens must be at least 0, got {request.max_tokens}")
        check_decoding(self.model, request.sampling, request.speculative, request.stop_strings, self.detokenize)

    def _cancel(self, handle: Handle) -> None:
        with self._cond:
            handle.cancelled = True
            waiting = next((s for s in self._waiting if s.handle is handle), None)
            if waiting is not None:
                self._waiting.remove(waiting)
            self._cond.notify_all()
        if waiting is not None:
            self._end(waiting, "cancelled")

    # -- the loop (one thread) --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting or self._running)
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # a bug of the engine's own: end what ran, keep serving the rest
                self.warn(f"engine step failed: {type(e).__name__}: {e}")
                for seq in list(self._running):
                    self._running.remove(seq)
                    self._end(seq, "error", e)

    def step(self) -> bool:
        """One step: admit waiting requests, run one forward, hand out its events. Returns
        whether there was anything to do."""
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._finish(seq, "cancelled")
        self._admit()
        work: list[tuple[_Sequence, list[int], str]] = []
        for seq in [s for s in self._running if s.decoding is not None]:
            try:
                ids = seq.decoding.next_ids()
            except Exception as e:  # e.g. sampling from logits that are not finite
                self._finish(seq, "error", e)
                continue
            work.append((seq, ids, seq.decoding.logits_mode))
        prefilling = next((s for s in self._running if s.prefill is not None), None)
        if prefilling is not None:
            work.append((prefilling, prefilling.prefill.next_chunk(), "last"))
        if not work:
            return bool(self._running)
        outs = self._forward([(seq.session, ids, mode) for seq, ids, mode in work])
        # The decoders take their outputs first; their MTP feeds then run as one batch, before
        # anything (a finished sequence kept or saved, a snapshot) reads their states.
        feeds: MtpFeeds = []
        fed: list[_Sequence] = []
        taken: list[tuple[_Sequence, list[int]]] = []
        for (seq, _, _), out in zip(work, outs):
            try:
                if isinstance(out, Exception):
                    raise out
                if seq.prefill is not None:
                    self._prefilled(seq, out)
                else:
                    before = len(feeds)
                    taken.append((seq, seq.decoding.finish(out, feeds)))
                    fed += [seq] * (len(feeds) - before)
            except Exception as e:
                self._finish(seq, "error", e)
        failed = self._run_feeds(feeds, fed)
        generated = 0
        for seq, new in taken:
            if seq in failed:
                self._finish(seq, "error", failed[seq])
                continue
            generated += len(new)
            for t in new:
                seq.handle._push(Token(t))
            if seq.decoding.finished:
                produced = seq.decoding.produced
                self._finish(seq, "stop" if produced and seq.decoding.ends(produced) else "length")
        with self._cond:
            self._totals["generated_tokens"] += generated
            now = time.monotonic()
            self._recent.append((now, generated))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
        return True

    def _forward(self, work: list[tuple[Session, list[int], str]]) -> list[ExtendOutput | Exception]:
        """One batched forward of every sequence's ids, each with its own logits mode (a verify
        needs both its rows', a prefill chunk only its last row's); an exception in place of the
        output of a sequence that failed."""
        sessions = [s for s, _, _ in work]
        before = [s.state.copy() for s in sessions]  # free: states share their tensors
        try:
            return self.model.extend_batch([s.state for s in sessions], [torch.tensor(ids) for _, ids, _ in work],
                                           logits=[mode for _, _, mode in work],
                                           return_streams=bool(self.model.mtp))
        except Exception as e:
            if len(work) == 1:
                return [e]
        # one of them failed: find which, each from its state before the batch
        for session, state in zip(sessions, before):
            session.state = state
        return [out for item in work for out in self._forward([item])]

    def _run_feeds(self, feeds: MtpFeeds, owners: list[_Sequence]) -> dict[_Sequence, Exception]:
        """Run the decoders' MTP feeds in one forward. When it fails, every sequence in it ends
        with the error: a failed forward may have advanced some of their states part way."""
        try:
            run_feeds(self.model, feeds)
        except Exception as e:
            return dict.fromkeys(owners, e)
        return {}

    def _prefilled(self, seq: _Sequence, out: ExtendOutput) -> None:
        seq.prefill.finish(out)
        seq.handle._push(PrefillProgress(seq.session.position, len(seq.request.prompt)))
        if seq.prefill.finished:
            self._decode(seq)

    def _decode(self, seq: _Sequence) -> None:
        seq.prefill = None
        r = seq.request
        seq.decoding = Decoding(seq.session, seq.max_tokens, r.sampling, r.stop_ids, r.speculative,
                                r.stop_strings, self.detokenize)
        if seq.decoding.finished:  # max_tokens 0: a prefill only
            self._finish(seq, "length")

    def _admit(self) -> None:
        while len(self._running) < self.max_running:
            with self._cond:  # moved under the lock: submit counts both to bound the queue
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
                self._running.append(seq)
                self._running_peak = max(self._running_peak, len(self._running))
            try:
                self._place(seq)
            except Exception as e:
                self._finish(seq, "error", e)

    def _place(self, seq: _Sequence) -> None:
        """Give `seq` a session holding the longest prefix of its prompt anything here holds."""
        prompt = seq.request.prompt
        live = [s.session for s in self._running if s.session is not None] + self._kept
        best = max(live, key=lambda s: s.reusable(prompt), default=None)
        reuse = best.reusable(prompt) if best is not None else 0
        on_disk = self._disk.longest_prefix(prompt[:-1]) if self._disk is not None else 0
        if reuse and reuse >= on_disk:
            if reuse == best.position and _drop(self._kept, best):
                session = best  # the next turn of a finished conversation: it continues it
            else:
                session = best.fork()
                session.restore(reuse)
            if self._on_host(session):
                session.to(self.model.device)
        else:
            session = Session(self.model, chunk_size=self.chunk_size, persist=self.persist,
                              cache_root=self.cache_root, warn=self.warn)
        seq.session = session
        seq.cached = session.position
        tail = prompt[session.position:]
        if tail:
            seq.prefill = Prefill(session, tail)
            seq.cached += seq.prefill.done  # what the on-disk cache gave
        with self._cond:
            self._totals["prompt_tokens"] += len(prompt)
            self._totals["cache_hit_tokens"] += seq.cached
        if not tail or seq.prefill.finished:
            self._decode(seq)

    def _on_host(self, session: Session) -> bool:
        return session.state.layers[0].window.device != self.model.device

    def _finish(self, seq: _Sequence, reason: str, error: Exception | None = None) -> None:
        """End `seq`; its session is kept warm unless it failed (its state may be half-updated)."""
        if seq in self._running:
            self._running.remove(seq)
        if error is None and seq.session is not None:
            self._kept.append(seq.session)
            self._evict()
        elif error is not None:
            with self._cond:
                self._totals["errors"] += 1
        self._end(seq, reason, error)

    def _end(self, seq: _Sequence, reason: str, error: Exception | None = None) -> None:
        message = None if error is None else f"{type(error).__name__}: {error}"
        produced = len(seq.decoding.produced) if seq.decoding is not None else 0
        seq.handle._push(Finished(reason, message, len(seq.request.prompt), seq.cached, produced))

    def _evict(self) -> None:
        """Least recently used kept sessions out beyond the budgets: to host memory, then dropped."""
        while len(self._kept) > self.max_kept:
            self._kept.pop(0)
            with self._cond:
                self._totals["evictions"] += 1
        if self.budget_bytes is None:
            return
        gpu = self.model.device.type != "cpu"
        on_device = [s for s in self._kept if not self._on_host(s)]
        running = [s.session for s in self._running if s.session is not None]
        memo: dict = {}  # sessions moved together keep sharing their common tensors on the host
        while on_device and _held(running + on_device) > self.budget_bytes:
            victim = on_device.pop(0)
            if gpu:
                victim.to(torch.device("cpu"), memo)
            else:
                _drop(self._kept, victim)
            with self._cond:
                self._totals["evictions"] += 1
        on_host = [s for s in self._kept if self._on_host(s)]
        while on_host and _held(on_host) > self.host_budget_bytes:
            _drop(self._kept, on_host.pop(0))


def _drop(sessions: list[Session], session: Session) -> bool:
    """Remove `session` itself (sessions compare by identity here) from `sessions`; whether it was there."""
    for i, s in enumerate(sessions):
        if s is session:
            del sessions[i]
            return True
    return False


def _held(sessions: list[Session]) -> int:
    return state_bytes([st for s in sessions for st in s.held_states()])
