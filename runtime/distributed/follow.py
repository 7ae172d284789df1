"""Rank 0 leads, the other ranks follow: for programs in which only rank 0 decides what runs (an
agent loop, an HTTP server), every model call rank 0 makes is announced to the other ranks, which
make the same call on their own part of the model.

Rank 0 wraps its model in :class:`Leader` and uses it as it would the model (sessions, pools and
servers need no change); every other rank calls :func:`follow` and returns when the leader closes.
Under torchrun `runtime.load` does both (:func:`load_launched`), so a command that loads weights
through it runs as one program on rank 0 with the other ranks following.
The followers keep their own copy of every sequence state rank 0 still holds. States are never
written in place (runtime.model.SequenceState), so a state's contents are named by its tensors:
the main part by layer 0's window tensor, the MTP part by the MTP block's. Each new part gets the
next number on every rank (the ranks count in step), a part that rank 0 has freed is forgotten
with the next announcement, and a state rank 0 got elsewhere (the prefix cache on disk) is sent
once. Announcements travel over a gloo group with no practical timeout: a follower waits as long
as rank 0 is alive and thinking; the model's own collectives keep their timeout.
"""

from __future__ import annotations

import atexit
import io
import os
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from runtime.distributed import comm, shard
from runtime.distributed.shard import ShardedModel
from runtime.model import ExtendOutput, SequenceState

_WAIT_FOR_LEADER = timedelta(days=365)


def _control_group() -> object:
    # every rank creates it, in the same place of its program: right after loading the model
    return dist.new_group(backend="gloo", timeout=_WAIT_FOR_LEADER)


def _main_key(state: SequenceState) -> torch.Tensor:
    return state.layers[0].window


def _mtp_key(state: SequenceState) -> torch.Tensor | None:
    return state.mtp[0].window if state.mtp else None


class Leader:
    """Rank 0's model: announces each call, then makes it. Attributes pass through to the model."""

    def __init__(self, model: ShardedModel) -> None:
        self.model = model
        self._control = _control_group()
        self._known: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (the tensor, its part number)
        self._count = 0
        self._gone: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def _number(self, tensor: torch.Tensor | None) -> int | None:
        if tensor is None:
            return None
        n = self._count
        self._count += 1
        self._known[id(tensor)] = (weakref.ref(tensor), n)
        weakref.finalize(tensor, self._forget, id(tensor), n)
        return n

    def _forget(self, key: int, n: int) -> None:
        held = self._known.get(key)
        if held is not None and held[1] == n:
            del self._known[key]
        self._gone.append(n)

    def _find(self, tensor: torch.Tensor | None) -> int | None:
        held = self._known.get(id(tensor)) if tensor is not None else None
        return held[1] if held is not None and held[0]() is tensor else None

    def _ref(self, state: SequenceState) -> tuple:
        """How the followers find `state`: its parts' numbers, or the state itself (sent once)."""
        main, mtp = self._find(_main_key(state)), self._find(_mtp_key(state))
        if main is not None and (mtp is not None or not state.mtp):
            return ("parts", main, mtp)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._number(_main_key(state))
        self._number(_mtp_key(state))
        return ("state", buffer.getvalue())

    def _announce(self, op: str, *args: Any) -> None:
        gone, self._gone = self._gone, []
        box = [(gone, op, args)]
        comm._collective(f"announcement ({op})", list(range(dist.get_world_size())),
                         lambda: dist.broadcast_object_list(box, src=0, group=self._control))

    def new_state(self, cache_format: str | None = None) -> SequenceState:
        self._announce("new_state", cache_format)
        state = self.model.new_state(cache_format)
        self._number(_main_key(state))
        self._number(_mtp_key(state))
        return state

    def extend(self, state: SequenceState, ids: torch.Tensor, *, logits: str = "last",
               return_streams: bool = False) -> ExtendOutput:
        return self.extend_batch([state], [ids], logits=logits, return_streams=return_streams)[0]

    def extend_batch(self, states: list[SequenceState], ids: list[torch.Tensor], *, logits: str = "last",
                     return_streams: bool = False) -> list[ExtendOutput]:
        refs = [self._ref(st) for st in states]
        self._announce("extend_batch", refs, [t.cpu() for t in ids], logits, return_streams)
        out = self.model.extend_batch(states, ids, logits=logits, return_streams=return_streams)
        for st in states:
            self._number(_main_key(st))
        return out

    def mtp_logits(self, state: SequenceState, streams: torch.Tensor, next_ids: torch.Tensor,
                   start: int, *, logits: bool = True) -> torch.Tensor | None:
        return self.mtp_logits_batch([state], [streams], [next_ids], [start], logits=logits)[0]

    def mtp_logits_batch(self, states: list[SequenceState], streams: list[torch.Tensor],
                         next_ids: list[torch.Tensor], starts: list[int], *,
                         logits: bool = True) -> list[torch.Tensor | None]:
        refs = [self._ref(st) for st in states]
        self._announce("mtp_logits_batch", refs, [s.cpu() for s in streams], [t.cpu() for t in next_ids],
                       list(starts), logits)
        out = self.model.mtp_logits_batch(states, streams, next_ids, starts, logits=logits)
        for st in states:
            self._number(_mtp_key(st))
        return out

    def __call__(self, input_ids: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
        self._announce("forward", input_ids.cpu(), chunk_size)
        return self.model(input_ids, chunk_size)

    def live_parts(self) -> int:
        """Parts the followers must still hold (rank 0's states that are alive)."""
        return len(self._known)

    def close(self) -> None:
        """Let the followers return from :func:`follow`."""
        self._announce("close")

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow(model: ShardedModel) -> int:
    """Make rank 0's model calls on this rank's part until rank 0 closes; returns the number of
    state parts still held then (the leader's `live_parts()` at that moment)."""
    control = _control_group()
    parts: dict[int, SequenceState] = {}  # a part number -> a state holding that part
    count = 0

    def number(state: SequenceState, main: bool, mtp: bool) -> None:
        nonlocal count
        for wanted, present in ((main, True), (mtp, bool(state.mtp))):
            if wanted and present:
                parts[count] = state.copy()
                count += 1

    def find(ref: tuple) -> SequenceState:
        if ref[0] == "state":
            state = torch.load(io.BytesIO(ref[1]), map_location=model.device, weights_only=False)
            number(state, True, True)
            return state.copy()
        main = parts[ref[1]].copy()
        if ref[2] is not None:
            other = parts[ref[2]].copy()
            main.mtp, main.mtp_position = other.mtp, other.mtp_position
        return main

    while True:
        box: list[Any] = [None]
        comm._collective("waiting for rank 0", list(range(dist.get_world_size())),
                         lambda: dist.broadcast_object_list(box, src=0, group=control))
        gone, op, args = box[0]
        for n in gone:
            parts.pop(n, None)
        if op == "close":
            return len(parts)
        try:
            if op == "new_state":
                number(model.new_state(*args), True, True)
            elif op == "extend_batch":
                refs, ids, logits, streams = args
                states = [find(ref) for ref in refs]
                model.extend_batch(states, ids, logits=logits, return_streams=streams)
                for st in states:
                    number(st, True, False)
            elif op == "mtp_logits_batch":
                refs, streams, next_ids, starts, logits = args
                states = [find(ref) for ref in refs]
                model.mtp_logits_batch(states, [s.to(model.device) for s in streams], next_ids, starts,
                                       logits=logits)
                for st in states:
                    number(st, False, True)
            elif op == "forward":
                model(*args)
            else:
                raise comm.RankFailure(f"rank 0 announced an unknown operation {op!r}")
        except ValueError:
            # a call the model refuses (bad ids, a batch that does not fit) is refused on rank 0 alike,
            # before any collective: rank 0 reports it to its caller and goes on, and so does this rank
            pass


def load_launched(source: str | Path, precision: str, device: str | torch.device) -> Leader:
    """`runtime.load` under torchrun: every rank loads its part (sizes from V4AGENT_TP / V4AGENT_EP,
    defaults from the world size; a rank waits V4AGENT_DIST_TIMEOUT seconds, default 600, for
    the others). Rank 0 gets a :class:`Leader`, closed when its process exits; every other rank
    follows it, then exits: the program that called `load` goes on on rank 0 only."""
    if not Path(source).is_dir():
        raise ValueError(f"under torchrun, runtime.load needs a checkpoint directory, got {str(source)!r}")
    sizes = {}
    for name in ("V4AGENT_TP", "V4AGENT_EP"):
        value = os.environ.get(name, "")
        if value and not value.isdigit():
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        sizes[name] = int(value) if value else None
    rank, _ = comm.init(float(os.environ.get("V4AGENT_DIST_TIMEOUT", comm.DEFAULT_TIMEOUT_S)))
    if torch.device(device).type == "cuda":  # one GPU per rank, as torchrun numbers them
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    model = shard.load(source, precision, device, tp=sizes["V4AGENT_TP"], ep=sizes["V4AGENT_EP"])
    if rank:
        follow(model)
        raise SystemExit(0)
    leader = Leader(model)
    atexit.register(leader.close)
    return leader


__all__ = ["Leader", "follow", "load_launched"]
