"""The parallel layout: which rank holds which part of the model (docs/distributed.md).

Ranks form tensor-parallel groups of `tp` consecutive ranks and expert-parallel groups of
`ep` consecutive ranks; both sizes divide the world size. Activations (the mHC streams)
are replicated on every rank, so no group ever exchanges tokens: a group splits work
whose partial results one all-reduce (or, for the vocabulary head, one all-gather) puts
back together.

* tensor parallel (`tp`): attention by heads — the query up-projection `wq_b` by head,
  the per-head sink by head, the grouped output projection by group (each rank holds its
  groups' rows of `wo_a` and the matching input columns of `wo_b`), then an all-reduce;
  the embedding and the head by vocabulary.
* expert parallel (`ep`): the routed experts in contiguous ranges, the shared expert by its
  intermediate dimension; one all-reduce after the MoE sum.
* replicated: `wq_a`, `wkv` (the single latent KV, shared by every head), the compressors,
  the indexer, norms, mHC, the router and the hash tables, the MTP block's e/h projections.

`weight_slices` is the plan itself: for every stored tensor, the part this rank reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.checkpoint import TensorSpec, inventory
from runtime.config import ModelConfig

# Reference precision quantizes GEMM inputs to FP8 in blocks of 128 along the input
# dimension: a split of an input dimension must fall on those block boundaries.
FP8_ACTIVATION_BLOCK = 128


class LayoutError(ValueError):
    """A layout that does not fit the world size or the model; the message says why."""


def ranges(n: int, parts: int, align: int = 1) -> list[range]:
    """`n` split into `parts` contiguous ranges as equal as `align` allows (boundaries at
    multiples of `align`, the last range ends at `n`); some may be empty when n is small."""
    blocks = math.ceil(n / align)
    cuts = [min(n, align * (blocks * i // parts)) for i in range(parts + 1)]
    return [range(cuts[i], cuts[i + 1]) for i in range(parts)]


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    tp: int
    ep: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    def tp_group(self, rank: int | None = None) -> list[int]:
        first = (self.rank if rank is None else rank) // self.tp * self.tp
        return list(range(first, first + self.tp))

    def ep_group(self, rank: int | None = None) -> list[int]:
        first = (self.rank if rank is None else rank) // self.ep * self.ep
        return list(range(first, first + self.ep))

    def key(self) -> str:
        """What a persisted KV cache must agree on besides the weights: the summation order
        of every all-reduce follows from it."""
        return f"tp{self.tp}.ep{self.ep}.world{self.world}"

    def describe(self) -> dict[str, int]:
        return {"world": self.world, "rank": self.rank, "tp": self.tp, "ep": self.ep}


def default_sizes(world: int, config: ModelConfig, per_node: int | None = None) -> tuple[int, int]:
    """Defaults for `--tp` / `--ep`: the largest tp that divides the world size and the output groups
    and stays within a node (`per_node` ranks: an all-reduce per layer wants NVLink, not the
    network), and experts over every rank (ep = world) when it divides them."""
    most = min(world, per_node or world)
    tp = max(t for t in range(1, most + 1) if world % t == 0 and config.o_groups % t == 0)
    ep = max(e for e in range(1, world + 1) if world % e == 0 and config.n_routed_experts % e == 0)
    return tp, ep


def make_layout(world: int, rank: int, config: ModelConfig, tp: int | None = None, ep: int | None = None,
                precision: str = "exact", per_node: int | None = None) -> Layout:
    """A checked layout; a size that cannot work is refused with the reason. Unset sizes take
    :func:`default_sizes` (`per_node`: ranks per node, torchrun's LOCAL_WORLD_SIZE)."""
    dtp, dep = default_sizes(world, config, per_node)
    tp, ep = tp or dtp, ep or dep
    if not 0 <= rank < world:
        raise LayoutError(f"rank {rank} is outside a world of {world}")
    for name, size in (("tp", tp), ("ep", ep)):
        if size < 1 or world % size:
            raise LayoutError(f"--{name} {size} must divide the world size {world}")
    if config.o_groups % tp:
        raise LayoutError(f"--tp {tp} must divide the attention output groups (o_groups={config.o_groups}): "
                          f"a rank holds whole groups of heads")
    if config.n_routed_experts % ep:
        raise LayoutError(f"--ep {ep} must divide the routed experts (n_routed_experts={config.n_routed_experts})")
    if precision == "reference" and (config.o_groups // tp * config.o_lora_rank) % FP8_ACTIVATION_BLOCK:
        raise LayoutError(f"--tp {tp} leaves each rank {config.o_groups // tp * config.o_lora_rank} inputs of wo_b; "
                          f"reference precision quantizes them in blocks of {FP8_ACTIVATION_BLOCK}")
    return Layout(world, rank, tp, ep)


@dataclass(frozen=True)
class Part:
    """A rank's part of one stored tensor: `dim` None = all of it, else `span` along `dim`."""

    dim: int | None
    span: range

    @property
    def whole(self) -> bool:
        return self.dim is None


def shared_expert_ranges(layout: Layout, config: ModelConfig, precision: str) -> list[range]:
    align = FP8_ACTIVATION_BLOCK if precision == "reference" else 1
    return ranges(config.moe_intermediate_size, layout.ep, align)


def vocab_ranges(layout: Layout, config: ModelConfig) -> list[range]:
    return ranges(config.vocab_size, layout.tp)


def held_experts(layout: Layout, config: ModelConfig) -> range:
    return ranges(config.n_routed_experts, layout.ep)[layout.ep_rank]


def _logical_part(name: str, layout: Layout, config: ModelConfig, precision: str) -> Part | None:
    """The part of logical tensor `name` this rank holds: None if it holds none of it."""
    c, t = config, layout.tp_rank
    whole = Part(None, range(0))
    if name in ("embed.weight", "head.weight"):
        return Part(0, vocab_ranges(layout, c)[t])
    parts = name.split(".")
    if ".attn." in name and layout.tp > 1 and "compressor" not in name and "indexer" not in name:
        heads = c.num_attention_heads // layout.tp
        groups = c.o_groups // layout.tp
        R = c.o_lora_rank
        leaf = parts[-2] if parts[-1] == "weight" else parts[-1]
        if leaf == "attn_sink":
            return Part(0, range(t * heads, (t + 1) * heads))
        if leaf == "wq_b":
            return Part(0, range(t * heads * c.head_dim, (t + 1) * heads * c.head_dim))
        if leaf == "wo_a":
            return Part(0, range(t * groups * R, (t + 1) * groups * R))
        if leaf == "wo_b":
            return Part(1, range(t * groups * R, (t + 1) * groups * R))
        return whole
    if ".ffn.experts." in name:
        expert = int(parts[parts.index("experts") + 1])
        return whole if expert in held_experts(layout, c) else None
    if ".ffn.shared_experts." in name and layout.ep > 1:
        span = shared_expert_ranges(layout, c, precision)[layout.ep_rank]
        return Part(1 if parts[-2] == "w2" else 0, span)
    return whole


def weight_slices(layout: Layout, config: ModelConfig, precision: str = "exact") -> dict[str, Part]:
    """Every logical tensor this rank holds (a part of), by name; absent names it holds none of."""
    out = {}
    for name, spec in inventory(config).items():
        if name.endswith(".scale") and spec.dtype == "F8_E8M0":
            continue
        part = _logical_part(name, layout, config, precision)
        if part is not None:
            out[name] = part
    return out


def planned_bytes(layout: Layout, config: ModelConfig, precision: str = "exact") -> int:
    """The checkpoint bytes (as stored: FP8/FP4 plus their scales) this rank reads under the plan."""
    inv = inventory(config)
    total = 0
    for name, part in weight_slices(layout, config, precision).items():
        total += _part_bytes(inv[name], part, scale=False)
        scale = name.removesuffix("weight") + "scale"
        if name.endswith(".weight") and scale in inv:
            total += _part_bytes(inv[scale], part, scale=True)
    return total


def _part_bytes(spec: TensorSpec, part: Part, scale: bool) -> int:
    """Bytes of `part` of a stored tensor. Only FP8 weights (and BF16/F32 ones) are split, so
    a split scale is a 128x128 block scale: every block the span touches is read."""
    if part.whole:
        return spec.nbytes
    if not part.span:
        return 0
    n = len(part.span)
    if scale:
        n = (part.span.stop - 1) // 128 - part.span.start // 128 + 1
    return spec.nbytes // spec.shape[part.dim] * n


__all__ = ["Layout", "LayoutError", "Part", "default_sizes", "make_layout", "weight_slices", "planned_bytes",
           "ranges", "held_experts", "vocab_ranges", "shared_expert_ranges"]
