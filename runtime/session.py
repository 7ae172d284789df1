"""Sessions: one live sequence on a loaded model, kept warm across an agent's turns.

An agent's conversation only grows, so each turn prefills only what was appended
(`extend`). `generate` streams tokens. `rewind` goes back to any earlier position:
snapshots taken at turn boundaries and every `snapshot_every` tokens share all KV with
the live state (states are never written in place), so rewinding restores the nearest
earlier snapshot and recomputes only the tail. `fork` starts an independent session on
the same prefix without copying it. Speculative decoding drafts with the MTP block and
verifies in one forward. What comes out bit-identical to what: docs/sessions.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.kvstore import Rows
from runtime.model import CompressorState, ExtendOutput, LayerState, Model, SequenceState
from runtime.prefix_cache import PrefixCache, row_counts

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; seed makes sampling repeatable."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters {self}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from fp32 logits [V]."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class _Snapshot:
    state: SequenceState
    logits: torch.Tensor | None  # next-token logits at that position
    streams: torch.Tensor | None  # final streams of the last position (MTP input)


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Session:
    """One sequence. `chunk_size` bounds prefill memory; `snapshot_every` bounds rewind cost."""

    model: Model
    cache_format: str | None = None
    chunk_size: int = 2048
    snapshot_every: int = 4096
    max_snapshots: int = 32
    tokens: list[int] = field(default_factory=list)
    spec: SpecStats = field(default_factory=SpecStats)
    persist: bool = False  # save block-aligned prefixes to the on-disk prefix cache (and reuse them)
    cache_root: str | Path | None = None  # the prefix cache directory (default ~/.cache/v4agent/prefix)
    warn: Callable[[str], None] = lambda _: None

    def __post_init__(self) -> None:
        self.cache_format = self.cache_format or self.model.default_cache_format()
        self.state = self.model.new_state(self.cache_format)
        self._logits: torch.Tensor | None = None
        self._streams: torch.Tensor | None = None
        self._snapshots: dict[int, _Snapshot] = {}
        self.cache = PrefixCache(self.model, self.cache_format, self.cache_root, self.warn) if self.persist else None
        self._saved: dict[int, list] = {}  # persisted positions -> row counts (what the next segment extends)
        self.cached_tokens = 0  # tokens taken from the prefix cache instead of computed

    @property
    def position(self) -> int:
        return self.state.position

    @property
    def last_logits(self) -> torch.Tensor | None:
        """fp32 logits [V] for the token after `tokens` (None before the first extend)."""
        return self._logits

    # -- prefill --------------------------------------------------------------------------

    def extend(self, ids: list[int] | torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Prefill only these new tokens; returns the next-token logits [V]."""
        ids = [int(i) for i in ids]
        if not ids:
            if self._logits is None:
                raise ValueError("extend needs at least one token on an empty session")
            return self._logits
        prefill = Prefill(self, ids)
        while not prefill.finished:
            chunk = prefill.next_chunk()
            prefill.finish(self._forward(chunk))
            if progress is not None:
                progress(prefill.done, len(ids))
        return self._logits

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Start from the longest persisted prefix of `ids` (at least one token is left to compute,
        so that the tail's logits come from this run); returns how many tokens it covered."""
        found = self.cache.load(ids[:-1])
        if found is None:
            return 0
        self.state, self._logits, self._streams = found
        n = self.state.position
        self.tokens = list(ids[:n])
        self._saved = {n: row_counts(self.state)}
        self.cached_tokens = n
        return n

    def _forward(self, ids: list[int], logits: str = "last") -> ExtendOutput:
        """One forward of `ids` on this session's state (what the serving engine batches)."""
        return self.model.extend(self.state, torch.tensor(ids, dtype=torch.long), logits=logits,
                                 return_streams=bool(self.model.mtp))

    def _apply(self, ids: list[int], out: ExtendOutput, feeds: MtpFeeds | None = None) -> None:
        """Take the output of the forward of `ids` (run on `self.state`) into the session (its
        MTP feed into `feeds` when given, else run now)."""
        self._feed_mtp(out.streams, ids, feeds)
        self.tokens.extend(ids)
        self._logits, self._streams = out.logits[-1], (out.streams[-1:] if out.streams is not None else None)

    def _feed_mtp(self, streams: torch.Tensor | None, ids: list[int], feeds: MtpFeeds | None = None) -> None:
        """Keep the MTP block's window current: position t needs token t+1, so it lags by one."""
        if streams is None:
            return
        if self._streams is None:  # the very first position
            rows, nxt = streams[:-1], ids[1:]
        else:  # the previous chunk's last position gets its next token only now
            rows, nxt = torch.cat((self._streams, streams[:-1])), ids
        if rows.shape[0]:
            _feed(self.model, self.state, rows, nxt, feeds)

    # -- snapshots, rewind, fork ----------------------------------------------------------

    def _snapshot(self) -> None:
        if not self.position or self.position in self._snapshots:
            return
        self._snapshots[self.position] = _Snapshot(self.state.copy(), self._logits, self._streams)
        if len(self._snapshots) > self.max_snapshots:
            # thin out where snapshots are densest; the newest (most likely rewind target) stays
            order = sorted(self._snapshots)
            gaps = [(order[i] - order[i - 1] if i else order[0], order[i]) for i in range(len(order) - 1)]
            del self._snapshots[min(gaps)[1]]

    def rewind(self, position: int) -> None:
        """Go back to `position` (keep that many tokens). A snapshot (a turn boundary) comes back
        bit-identical; the tokens after the nearest one are recomputed as one extend, which is
        bit-identical to the first time only if that used the same chunks."""
        tail = self.tokens[:position]
        base = self.restore(position)
        if position > base:
            self.extend(tail[base:])

    def restore(self, position: int) -> int:
        """Go back to the latest snapshot at or before `position` without computing anything
        (staying put if `position` is the current one); returns the position now held."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: the session holds {self.position} tokens")
        if position == self.position:
            return position
        base = max((p for p in self._snapshots if p <= position), default=0)
        self._snapshots = {p: s for p, s in self._snapshots.items() if p <= position}
        self._saved = {p: c for p, c in self._saved.items() if p <= position}
        if base:
            snap = self._snapshots[base]
            self.state, self._logits, self._streams = snap.state.copy(), snap.logits, snap.streams
        else:
            self.state, self._logits, self._streams = self.model.new_state(self.cache_format), None, None
        self.tokens = self.tokens[:base]
        return base

    def reusable(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` a fork of this session holds without computing
        anything: all of them if `prompt` extends (or equals) its tokens, else those up to the
        latest snapshot within the common prefix (one token left to compute the prompt's logits)."""
        n = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            n += 1
        if n == self.position:
            return n
        n = min(n, len(prompt) - 1)
        return max((p for p in self._snapshots if p <= n), default=0)

    def held_states(self) -> list[SequenceState]:
        """The live state and every snapshot's: what this session keeps in memory."""
        return [self.state] + [snap.state for snap in self._snapshots.values()]

    def to(self, device: torch.device, memo: dict | None = None) -> None:
        """Move everything the session holds to `device` (host memory for an idle session, back
        to the model's device to use it). Tensors shared within the session, or with another
        session moved with the same `memo`, stay shared."""
        memo = {} if memo is None else memo
        self.state = move_state(self.state, device, memo)
        for snap in self._snapshots.values():
            snap.state = move_state(snap.state, device, memo)
            snap.logits, snap.streams = _move(snap.logits, device, memo), _move(snap.streams, device, memo)
        self._logits, self._streams = _move(self._logits, device, memo), _move(self._streams, device, memo)

    def fork(self) -> Session:
        """An independent session on the same tokens; shares every KV tensor, copies none."""
        other = Session(self.model, self.cache_format, self.chunk_size, self.snapshot_every, self.max_snapshots,
                        list(self.tokens), persist=self.persist, cache_root=self.cache_root, warn=self.warn)
        other.state = self.state.copy()
        other._logits, other._streams = self._logits, self._streams
        other._snapshots, other._saved = dict(self._snapshots), dict(self._saved)
        return other

    # -- decoding -------------------------------------------------------------------------

    def generate(self, max_tokens: int, sampling: SamplingParams = SamplingParams(),
                 stop_ids: set[int] | frozenset[int] = frozenset(), speculative: bool = False,
                 stop_strings: Sequence[str] = (), detokenize: Callable[[list[int]], str] | None = None,
                 ) -> Iterator[int]:
        """Stream up to `max_tokens` ids; each is appended to the session as it is yielded.

        Stops after a token in `stop_ids`, or after the token whose text completes one of
        `stop_strings` in the generated text (`detokenize` turns ids into text); that token
        is kept, as the conversation needs it. `speculative` drafts one token with the MTP
        block and verifies it in the same forward as the next one; greedy only. A rejected
        draft leaves no trace; an accepted pair was computed as one 2-token chunk, whose
        rounding can change the output from plain greedy's (in reference precision; in exact
        precision only at a near-tie).
        """
        decoding = Decoding(self, max_tokens, sampling, stop_ids, speculative, stop_strings, detokenize)
        while not decoding.finished:
            ids = decoding.next_ids()
            yield from decoding.finish(self._forward(ids, decoding.logits_mode))

    def _draft(self, token: int) -> int:
        """The MTP block's guess for the token after `token`. It advances the MTP block by the
        position it would be fed next anyway, so it is called once per verify."""
        logits = self.model.mtp_logits(self.state, self._streams, torch.tensor([token]), start=self.state.mtp_position)
        return int(logits[0].argmax())


class Prefill:
    """One `extend` advanced a chunk at a time: `next_chunk()` says which tokens the next
    forward runs, `finish(out)` takes its output. `Session.extend` runs it to the end; the
    serving engine runs one chunk per step, batched with other sequences' decoding."""

    def __init__(self, session: Session, ids: list[int]) -> None:
        self.session, self.ids = session, ids
        # tokens taken from the on-disk prefix cache instead of computed
        self.done = session._reuse_prefix(ids) if session.cache is not None and session.position == 0 else 0
        session._snapshot()  # a turn boundary: the natural place to come back to
        # with persistence, a chunk ends at the last aligned boundary so that it can be saved
        align = session.cache.align if session.cache else 0
        self.boundary = (session.position + len(ids) - self.done) // align * align if align else 0
        self._chunk: list[int] = []

    @property
    def finished(self) -> bool:
        return self.done >= len(self.ids)

    def next_chunk(self) -> list[int]:
        s = self.session
        # chunks end at multiples of snapshot_every, so long prefills leave snapshots behind
        room = s.snapshot_every - s.position % s.snapshot_every
        if self.boundary > s.position:
            room = min(room, self.boundary - s.position)
        self._chunk = self.ids[self.done:self.done + min(s.chunk_size, room, len(self.ids) - self.done)]
        return self._chunk

    def finish(self, out: ExtendOutput) -> None:
        s = self.session
        s._apply(self._chunk, out)
        self.done += len(self._chunk)
        if s.position % s.snapshot_every == 0:
            s._snapshot()
        if s.position == self.boundary and self.boundary not in s._saved:
            since = max(s._saved.items(), default=None)
            end, counts = s.cache.save(s.tokens, s.state, s._logits, s._streams, since)
            s._saved[end] = counts


class Decoding:
    """One `generate` advanced a step at a time: `next_ids()` samples the next token (and drafts
    one after it when speculative) and says what the next forward runs, with `logits_mode`;
    `finish(out)` takes its output and returns the tokens it completed. `Session.generate`
    runs it to the end; the serving engine runs one step per engine step."""

    def __init__(self, session: Session, max_tokens: int, sampling: SamplingParams = SamplingParams(),
                 stop_ids: set[int] | frozenset[int] = frozenset(), speculative: bool = False,
                 stop_strings: Sequence[str] = (), detokenize: Callable[[list[int]], str] | None = None) -> None:
        if session._logits is None:
            raise ValueError("generate needs a prompt: call extend first")
        check_decoding(session.model, sampling, speculative, stop_strings, detokenize)
        session._snapshot()
        self.session, self.max_tokens, self.sampling, self.speculative = session, max_tokens, sampling, speculative
        self.stop_ids, self.stop_strings, self.detokenize = stop_ids, stop_strings, detokenize
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.produced: list[int] = []
        self.finished = max_tokens <= 0
        # a token is at least one byte, so a stop string of n characters lies within the last 4n tokens
        self._tail = 4 * max((len(s) for s in stop_strings), default=0)
        self._ids: list[int] = []  # what the forward in flight runs
        self._before: _Snapshot | None = None  # the state before a verify, restored if the draft is rejected
        self._redo: int | None = None  # a token whose draft was rejected: run alone next

    @property
    def logits_mode(self) -> str:
        return "all" if len(self._ids) == 2 else "last"

    def ends(self, ids: list[int]) -> bool:
        """Whether generated `ids` end with a stop: checked after every token."""
        if ids[-1] in self.stop_ids:
            return True
        return bool(self.stop_strings) and any(s in self.detokenize(ids[-self._tail:]) for s in self.stop_strings)

    def next_ids(self) -> list[int]:
        s = self.session
        if self._redo is not None:
            self._ids, self._redo = [self._redo], None
            return self._ids
        token = sample(s._logits, self.sampling, self.generator)
        # a pair is drafted only when its first token does not stop: the draft then never
        # enters the session behind a stop
        if self.speculative and len(self.produced) + 2 <= self.max_tokens and not self.ends(self.produced + [token]):
            self._before = _Snapshot(s.state.copy(), s._logits, s._streams)
            self._ids = [token, s._draft(token)]
        else:
            self._ids = [token]
        return self._ids

    def finish(self, out: ExtendOutput, feeds: MtpFeeds | None = None) -> list[int]:
        """Take the forward's output; returns the tokens now part of the session (none when a
        draft was rejected: its token is recomputed alone by the next step). With `feeds`, the
        MTP block's feed (at most one) is put there for the caller to run (`run_feeds`) before
        anything else uses the session, else it runs now."""
        s, ids = self.session, self._ids
        if len(ids) == 2:
            s.spec.drafted += 1
            if int(out.logits[0].argmax()) != ids[1]:
                s.state, s._logits, s._streams = self._before.state, self._before.logits, self._before.streams
                self._redo = ids[0]
                return []
            s.spec.accepted += 1
            _feed(s.model, s.state, out.streams[:1], ids[1:], feeds)
            s.tokens.extend(ids)
            s._logits, s._streams = out.logits[1], out.streams[-1:]
        else:
            s._apply(ids, out, feeds)
        self.produced += ids
        self.finished = len(self.produced) >= self.max_tokens or self.ends(self.produced)
        return ids


# MTP feeds waiting to run: (state, main-stream rows, the tokens that follow them)
MtpFeeds = list[tuple[SequenceState, torch.Tensor, list[int]]]


def _feed(model: Model, state: SequenceState, rows: torch.Tensor, nxt: list[int], feeds: MtpFeeds | None) -> None:
    """Advance `state`'s MTP block over `rows` (no logits: nothing reads them), now or, with
    `feeds`, when the caller runs them."""
    if feeds is None:
        model.mtp_logits(state, rows, torch.tensor(nxt), start=state.mtp_position, logits=False)
    else:
        feeds.append((state, rows, nxt))


def run_feeds(model: Model, feeds: MtpFeeds) -> None:
    """The MTP feeds of several sequences in one forward of the block (the serving engine's
    decoders, whose feeds would otherwise run one by one after their batched step)."""
    if feeds:
        model.mtp_logits_batch([st for st, _, _ in feeds], [rows for _, rows, _ in feeds],
                               [torch.tensor(nxt) for _, _, nxt in feeds], [st.mtp_position for st, _, _ in feeds],
                               logits=False)


def check_decoding(model: Model, sampling: SamplingParams, speculative: bool, stop_strings: Sequence[str],
                   detokenize: Callable[[list[int]], str] | None) -> None:
    """ValueError for options that cannot be decoded together."""
    if speculative and (sampling.temperature != 0 or not model.mtp):
        raise ValueError("speculative decoding needs greedy sampling and a model with an MTP block")
    if stop_strings and (detokenize is None or not all(stop_strings)):
        raise ValueError("stop strings must be non-empty and need a detokenize function")


def _move(t: torch.Tensor | None, device: torch.device, memo: dict) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    if key not in memo:
        memo[key] = t.to(device)
    return memo[key]


def move_state(state: SequenceState, device: torch.device, memo: dict) -> SequenceState:
    """A copy of `state` on `device`; tensors already moved under `memo` are reused, not copied again."""
    def comp(c: CompressorState | None) -> CompressorState | None:
        if c is None:
            return None
        rows = Rows(c.entries.codec, c.entries.width, c.entries.dtype, device,
                    tuple(tuple(_move(t, device, memo) for t in chunk) for chunk in c.entries.chunks))
        moved = (_move(t, device, memo) for t in (c.open_kv, c.open_gate, c.prev_kv, c.prev_gate))
        return CompressorState(rows, *moved)

    def layer(st: LayerState) -> LayerState:
        return LayerState(_move(st.window, device, memo), comp(st.compressor), comp(st.indexer))

    return SequenceState(state.position, [layer(s) for s in state.layers], [layer(s) for s in state.mtp],
                         state.mtp_position)


def state_bytes(states: list[SequenceState]) -> int:
    """Device bytes the states hold together, shared tensors counted once."""
    seen: dict[int, int] = {}
    for state in states:
        for st in state.layers + state.mtp:
            tensors = [st.window]
            for c in (st.compressor, st.indexer):
                if c is not None:
                    tensors += [t for chunk in c.entries.chunks for t in chunk] + [c.open_kv, c.open_gate]
            for t in tensors:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SessionPool:
    """Live sessions within a memory budget; a new prompt starts from the longest prefix any
    live session (or, with `persist`, the on-disk cache) already holds."""

    def __init__(self, model: Model, budget_bytes: int, **session_options) -> None:
        self.model, self.budget_bytes, self.options = model, budget_bytes, session_options
        self.sessions: list[Session] = []  # least recently used first

    def open(self, prompt: list[int], progress: Progress | None = None) -> Session:
        """A session holding `prompt`, its `cached_tokens` saying how much was reused."""
        def common(s: Session) -> int:
            n = 0
            for a, b in zip(s.tokens, prompt):
                if a != b:
                    break
                n += 1
            return min(n, len(prompt) - 1)  # leave one token to compute this prompt's logits

        best = max(self.sessions, key=common, default=None)
        shared = common(best) if best is not None else 0
        disk = Session(self.model, **self.options)
        on_disk = disk.cache.longest_prefix(prompt[:-1]) if disk.cache is not None else 0
        if best is not None and shared > 0 and shared >= on_disk:
            session = best.fork()
            session.rewind(shared)
            session.extend(prompt[shared:], progress)
            session.cached_tokens = shared
            self.sessions.remove(best)
            self.sessions.append(best)
        else:
            session = disk
            session.extend(prompt, progress)
        self.sessions.append(session)
        self._evict(keep=session)
        return session

    def touch(self, session: Session) -> None:
        self.sessions.remove(session)
        self.sessions.append(session)

    def _evict(self, keep: Session) -> None:
        while state_bytes([s.state for s in self.sessions]) > self.budget_bytes and len(self.sessions) > 1:
            victim = next(s for s in self.sessions if s is not keep)
            self.sessions.remove(victim)
