"""Sharded loading: each rank builds the model on the meta device and reads only its parts of
the memory-mapped safetensors shards (`Checkpoint.raw_slice`), never a whole split tensor.

The result, :class:`ShardedModel`, is a :class:`runtime.model.Model` whose attention holds its
heads, whose MoE layers hold their experts and shared-expert slice, and whose embedding and
head hold their vocabulary range; the all-reduces sit in the model's `reduce` hooks. Every
rank then runs the same program (sessions, generation) and gets the same logits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.checkpoint import Checkpoint, open_checkpoint
from runtime.config import ModelConfig
from runtime.distributed import comm
from runtime.distributed.layout import (Layout, LayoutError, Part, held_experts, make_layout, planned_bytes,
                                        vocab_ranges, weight_slices)
from runtime.model import Attention, Model, MoE, QLinear
from runtime.quant import FP8_WEIGHT_BLOCK, e8m0_to_float


@dataclass
class ShardReport:
    """What one rank loaded: checkpoint bytes read (as stored) against the plan, bytes held in memory."""

    rank: int
    read_bytes: int
    planned_bytes: int
    held_bytes: int
    planned_held_bytes: int
    checkpoint_bytes: int


class ShardedModel(Model):
    """A Model whose vocabulary, heads and experts are split across ranks (runtime.distributed.layout)."""

    layout: Layout
    groups: comm.Groups
    report: ShardReport

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V}); got min {int(ids.min())}, max {int(ids.max())}")
        if self.groups.tp is None:
            return super().embed_tokens(ids)
        # masked lookup: a rank contributes the rows of its vocabulary range, zeros elsewhere
        span = vocab_ranges(self.layout, self.config)[self.layout.tp_rank]
        mine = (ids >= span.start) & (ids < span.stop)
        rows = self.embed.weight[(ids - span.start).clamp(0, len(span) - 1)]
        rows = torch.where(mine[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        return comm.AllReduce(self.groups.tp, self.layout.tp_group(), "embedding")(rows).to(self.act_dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.head(hidden)
        if self.groups.tp is None:
            return local
        widths = [len(r) for r in vocab_ranges(self.layout, self.config)]
        return comm.all_gather_columns(local, self.groups.tp, self.layout.tp_group(), widths, "head")


def load(path: str | Path, precision: str = "exact", device: str | torch.device = "cpu", *,
         tp: int | None = None, ep: int | None = None) -> ShardedModel:
    """This rank's part of the checkpoint at `path` (the process group must be up: comm.init).

    Every rank must be given the same checkpoint, precision and sizes: they are compared
    across ranks first and a mismatch is refused with what differs.
    """
    import torch.distributed as dist

    device = torch.device(device)
    ck = open_checkpoint(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # set by torchrun
    layout = make_layout(world, rank, ck.config, tp, ep, precision, per_node)
    identity = ck.identity()
    mine = {"identity": identity, "precision": precision, "tp": layout.tp, "ep": layout.ep, "world": world}
    everyone = comm.gather_objects(mine, "layout agreement")
    for other, theirs in enumerate(everyone):
        differ = {k: (mine[k], theirs[k]) for k in mine if theirs[k] != mine[k]}
        if differ:
            what = ", ".join(f"{k}: {a!r} here, {b!r} on rank {other}" for k, (a, b) in differ.items())
            raise LayoutError(f"rank {rank} and rank {other} were started differently ({what}); every rank needs "
                              f"the same checkpoint, precision, --tp and --ep")
    groups = comm.Groups(layout)
    with torch.device("meta"):
        model = ShardedModel(ck.config, precision)
    model.layout, model.groups = layout, groups
    planned_held = planned_held_bytes(model.state_dict(), ck.config, precision, layout)  # before it is filled
    read = _fill(model, ck, layout, precision, device)
    planned = planned_bytes(layout, ck.config, precision)
    held = sum(t.nbytes for t in model.state_dict().values())
    if (read, held) != (planned, planned_held):  # the plan and the load disagree: a bug here, not the user's
        raise LayoutError(f"rank {rank} read {read} checkpoint bytes and holds {held}; the plan says {planned} "
                          f"and {planned_held}")
    total = sum(spec.nbytes for spec in ck.inventory.values())
    model.report = ShardReport(rank, read, planned, held, planned_held, total)
    model.identity = f"checkpoint:{identity}:layout={layout.key()}"
    _wire(model, layout, groups)
    return model.eval()


def planned_held_bytes(buffers: Mapping[str, torch.Tensor], config: ModelConfig, precision: str,
                       layout: Layout) -> int:
    """The bytes this layout's rank will hold, from the `state_dict()` of a whole model on the meta
    device (its buffers say how each tensor is held: dequantized in which dtype, or as stored)."""
    plan = weight_slices(layout, config, precision)
    total = 0
    for name, buf in buffers.items():
        # a quantization scale goes with its weight (packed FP4/FP8 experts, held whole or not at all)
        logical = name.removesuffix("scale") + "weight" if buf.dtype == torch.float8_e8m0fnu else name
        part = plan.get(logical)
        if part is not None:
            total += buf.nbytes if part.whole else buf.nbytes // buf.shape[part.dim] * len(part.span)
    return total


def _wire(model: ShardedModel, layout: Layout, groups: comm.Groups) -> None:
    """Local head and expert counts, and the all-reduces, on every attention and MoE module."""
    heads = model.config.num_attention_heads // layout.tp
    for name, module in model.named_modules():
        if isinstance(module, Attention) and groups.tp is not None:
            module.n_heads, module.groups = heads, model.config.o_groups // layout.tp
            module.reduce = comm.AllReduce(groups.tp, layout.tp_group(), "attention")
        elif isinstance(module, MoE) and groups.ep is not None:
            module.held = held_experts(layout, model.config)
            module.reduce = comm.AllReduce(groups.ep, layout.ep_group(), "moe")


def _fill(model: ShardedModel, ck: Checkpoint, layout: Layout, precision: str, device: torch.device) -> int:
    """Put this rank's parts into the meta model's buffers; returns the checkpoint bytes read."""
    plan = weight_slices(layout, ck.config, precision)
    read = 0
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        quantized = isinstance(module, QLinear) and module.fmt != "dense"
        for attr, buf in list(module._buffers.items()):
            if buf is None or (attr == "scale" and isinstance(module, QLinear)):
                continue
            name = dot + attr
            part = plan.get(name)
            if part is None:  # another rank's expert: nothing held
                for a, b in module._buffers.items():
                    module._buffers[a] = torch.empty((0,) * b.dim(), dtype=b.dtype, device=device)
                break
            if quantized:  # routed experts stay in their checkpoint format (reference precision), whole
                for a in ("weight", "scale"):
                    raw = ck.raw(dot + a)
                    read += raw.nbytes
                    module._buffers[a] = raw.to(device)
                break
            t, nbytes = _read(ck, name, part, buf.dtype)
            read += nbytes
            module._buffers[attr] = t.to(device)
            if isinstance(module, QLinear):
                module.shape = tuple(t.shape)
    return read


def _read(ck: Checkpoint, name: str, part: Part, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The logical (dequantized) part of `name` in `dtype` and the stored bytes read for it."""
    spec = ck.inventory[name]
    scale_name = name.removesuffix("weight") + "scale"
    has_scale = name.endswith(".weight") and scale_name in ck.inventory
    if part.whole:
        t = ck.tensor(name, dtype) if spec.dtype != "I64" else ck.raw(name)
        return t, spec.nbytes + (ck.inventory[scale_name].nbytes if has_scale else 0)
    lo, hi = part.span.start, part.span.stop
    raw = ck.raw_slice(name, part.dim, lo, hi)
    if spec.dtype != "F8_E4M3":
        return raw.to(dtype), raw.nbytes
    # FP8 with 128x128 block scales: read the blocks the span touches, expand them to elements
    b = FP8_WEIGHT_BLOCK
    first = lo // b
    scales = ck.raw_slice(scale_name, part.dim, first, (hi - 1) // b + 1)
    full = e8m0_to_float(scales).repeat_interleave(b, 0).repeat_interleave(b, 1)
    full = full.narrow(part.dim, lo - first * b, hi - lo)
    other = 1 - part.dim
    full = full.narrow(other, 0, raw.shape[other])
    return (raw.float() * full).to(dtype), raw.nbytes + scales.nbytes


__all__ = ["ShardedModel", "ShardReport", "load"]
