"""The few collectives the parallel model needs, on torch.distributed (gloo on CPUs, NCCL on GPUs).

Every collective goes through :func:`_collective`, which turns a peer's death or silence
into :class:`RankFailure` naming the operation, the group and the timeout (gloo and NCCL
both end a collective that waits longer than the process group's timeout; a dead peer
closes its connections and fails it at once), and counts the bytes each rank hands to the
collective (`traffic`) for the benchmark.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from runtime.distributed.layout import Layout

DEFAULT_TIMEOUT_S = 600.0

# payload bytes handed to collectives since the last reset, by operation
traffic: Counter[str] = Counter()
_timeout = DEFAULT_TIMEOUT_S


class RankFailure(RuntimeError):
    """A collective did not complete: a peer rank died, or did not answer within the timeout."""


def init(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
    environment); returns (rank, world size). NCCL when CUDA is available, gloo otherwise."""
    if dist.is_initialized():  # the program joined already (runtime.load under torchrun asks again)
        return dist.get_rank(), dist.get_world_size()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RankFailure(f"not launched by torchrun: {', '.join(missing)} unset (run under "
                          f"`torchrun --nproc-per-node N ...`, see docs/distributed.md)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    global _timeout
    _timeout = timeout_s
    return dist.get_rank(), dist.get_world_size()


def _collective(op: str, group_ranks: list[int], run) -> None:
    try:
        run()
    except Exception as e:  # gloo and NCCL raise several types (RuntimeError, DistBackendError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankFailure(f"{op} among ranks {group_ranks} failed on rank {dist.get_rank()}: a rank died or did "
                          f"not answer within {_timeout:g} s; the job stops ({reason})") from e


class Groups:
    """The process groups of a layout. Every rank creates every group, in the same order
    (torch.distributed requires it), and keeps the ones it belongs to."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.tp = self._mine(layout.tp, layout.tp_group())
        self.ep = self._mine(layout.ep, layout.ep_group())

    def _mine(self, size: int, members: list[int]) -> object | None:
        if size == 1:
            return None
        if size == self.layout.world:
            return dist.group.WORLD
        mine = None
        for first in range(0, self.layout.world, size):
            ranks = list(range(first, first + size))
            group = dist.new_group(ranks)
            if ranks == members:
                mine = group
        return mine


class AllReduce:
    """`x` summed over a group, accumulated in fp32 and returned in `x`'s dtype: the `reduce`
    hook of Attention (heads split) and MoE (experts split)."""

    def __init__(self, group: object, ranks: list[int], op: str) -> None:
        self.group, self.ranks, self.op = group, ranks, op

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32, copy=True).contiguous()
        traffic[self.op] += y.nbytes
        _collective(f"all-reduce ({self.op})", self.ranks, lambda: dist.all_reduce(y, group=self.group))
        return y.to(x.dtype)


def all_gather_columns(x: torch.Tensor, group: object, ranks: list[int], widths: list[int], op: str) -> torch.Tensor:
    """[T, sum(widths)]: each rank's [T, widths[i]] columns side by side, in group order
    (padded to the widest for the collective, which needs equal sizes)."""
    wide = max(widths)
    padded = torch.nn.functional.pad(x.contiguous(), (0, wide - x.shape[-1]))
    parts = [torch.empty_like(padded) for _ in widths]
    traffic[op] += padded.nbytes
    _collective(f"all-gather ({op})", ranks, lambda: dist.all_gather(parts, padded, group=group))
    return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1)


def gather_objects(obj: object, op: str) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank."""
    out: list[object] = [None] * dist.get_world_size()
    _collective(op, list(range(dist.get_world_size())), lambda: dist.all_gather_object(out, obj))
    return out


__all__ = ["init", "Groups", "AllReduce", "all_gather_columns", "gather_objects", "RankFailure",
           "traffic", "DEFAULT_TIMEOUT_S"]
