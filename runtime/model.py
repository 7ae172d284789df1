"""The DeepSeek-V4 model, one class per concept of the spec (docs/runtime.md maps sections to classes).

Module and buffer names are the official checkpoint names (`layers.3.attn.wq_a.weight`,
`layers.3.ffn.experts.7.w1.scale`, `mtp.0.e_proj.weight`, ...), so `state_dict()`
lines up with the files on disk one to one.

Every sequence lives in a :class:`SequenceState`: a forward pass over a prompt is "extend
an empty state chunk by chunk", the same code path that incremental decoding uses. One
forward can extend several sequences at once (:meth:`Model.extend_batch`, a
:class:`RaggedBatch` of their new rows): what is per token (embedding, mHC, projections,
router and experts, head) runs once over all their rows, so the weights are read once
per step; what depends on a sequence's history (its KV window, compressors, indexer,
attention) runs on its own rows and state. Attention is sparse as the architecture
intends: a query reads its sliding window, its top-k CSA entries or the causal HCA
entries, never a dense [S, S] matrix, so memory grows linearly with the sequence.

Two precision modes:
* ``exact``: fp32 everything, no low-precision simulation (what the oracle computes);
* ``reference``: bf16 activations and the FP8/FP4 simulations of the official
  reference code (spec §2.2, §12): FP8 activation quantization before FP8/FP4 GEMMs,
  FP8 rounding of KV (per 64, rope dims kept), Hadamard + FP4 rounding in the indexer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime import kernels
from runtime.config import CSA, SWA, ModelConfig
from runtime.kvstore import FORMATS, RowCodec, Rows
from runtime.quant import dequantize_fp4_rows, dequantize_fp8_blocks, fp4_sim, fp8_sim, hadamard
from runtime.rope import apply_rope, inv_freq

PRECISIONS = ("exact", "reference")

# Queries processed together in one attention step; bounds the [block, heads, keys]
# score tensor whatever the chunk size.
ATTENTION_QUERY_BLOCK = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lowp_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with bf16 operands, fp32 accumulation and a bf16 result.

    On the CPU bf16 GEMMs are ~15x slower than fp32; bf16 values are exact in fp32,
    so an fp32 GEMM followed by rounding gives the same result up to summation order.
    """
    if x.is_cuda:
        return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16))
    return F.linear(x.float(), w.float()).to(torch.bfloat16)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [rows, k] of the k largest scores per row (in no particular order).

    Tie rule (documented, deterministic): higher score first; among equal scores the
    lower index wins. Exact ties are real (an indexer entry whose every head term is
    cut by the ReLU scores exactly 0), and neither torch.topk nor numpy's argpartition
    says which of them it keeps, so rows where equal scores straddle the cut are redone
    with the rule.
    """
    if k == scores.shape[-1]:
        return torch.arange(k, device=scores.device).expand(scores.shape[0], k)
    if scores.device.type == "cpu":
        # numpy's introselect is ~2.5x faster than torch.topk on the CPU at [256, 4096], k=512
        picked = torch.from_numpy(np.ascontiguousarray(np.argpartition(scores.numpy(), -k, axis=-1)[:, -k:]))
        values = scores.gather(-1, picked)
    else:
        values, picked = scores.topk(k, dim=-1, sorted=False)
    kth = values.amin(-1, keepdim=True)
    straddle = ((scores == kth).sum(-1) > (values == kth).sum(-1)).nonzero()[:, 0]
    if straddle.numel():
        sub = scores[straddle]
        greater = sub > kth[straddle]
        equal = sub == kth[straddle]
        chosen = greater | (equal & (equal.cumsum(-1) <= k - greater.sum(-1, keepdim=True)))
        picked = picked.clone()
        picked[straddle] = chosen.nonzero()[:, 1].view(-1, k)
    return picked


def _picked_scores(q: torch.Tensor, entries: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """scores[t, h, j] = q[t, h] · entries[bags[t * H + h, j]] for q [T, H, D], entries [N, D] and
    `bags` [T * H, k]: each query's picks, repeated for each of its heads (as P·V reads them).

    On the CPU a sampled GEMM (one dot product per query, head and pick), whose cost and
    memory follow k, not N, and which gathers nothing. On a GPU the picked rows are gathered
    ([T, k, D] moves at HBM speed), rather than relying on cuSPARSE's SDDMM for unsorted and
    repeated column indices.
    """
    T, H, _ = q.shape
    k = bags.shape[1]
    if q.is_cuda:
        return torch.einsum("thd,tkd->thk", q, entries[bags.view(T, H, k)[:, 0]])
    with warnings.catch_warnings():  # the CSR constructor announces its beta status; we use one stable op
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(torch.arange(T * H + 1, device=q.device) * k, bags.reshape(-1),
                                          q.new_zeros(T * H * k), size=(T * H, entries.shape[0]),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, q.reshape(T * H, -1), entries.t(), beta=0.0).values().view(T, H, k)


class QLinear(nn.Module):
    """A bias-free linear layer with its weight in the form it is held in memory.

    `fmt` is how the weight is stored: "dense" (a float tensor), "fp8" (e4m3 with
    128x128 ue8m0 block scales) or "fp4" (e2m1 packed two per byte, ue8m0 per 32
    inputs). In reference mode routed experts stay in their checkpoint format and are
    dequantized on use; everything else is dequantized once at load.

    `compute` is how the reference runs it: "fp8" (FP8-quantized activations, bf16
    result), "bf16" (bf16 GEMM) or "fp32" (fp32 input and result).
    """

    def __init__(self, out_features: int, in_features: int, *, fmt: str = "dense", compute: str = "fp8",
                 exact: bool = True) -> None:
        super().__init__()
        self.fmt, self.compute, self.exact = fmt, compute, exact
        self.shape = (out_features, in_features)
        if fmt == "dense":
            held = torch.float32 if (exact or compute == "fp32") else torch.bfloat16
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=held))
        elif fmt == "fp8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
            self.register_buffer("scale", torch.empty(_cdiv(out_features, 128), _cdiv(in_features, 128),
                                                      dtype=torch.float8_e8m0fnu))
        elif fmt == "fp4":
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(out_features, in_features // 32, dtype=torch.float8_e8m0fnu))
        else:
            raise ValueError(f"unknown weight format {fmt!r}")

    def dense(self, device: torch.device) -> torch.Tensor:
        """The weight as a float tensor on `device` (dequantized if held quantized)."""
        w = self.weight.to(device, non_blocking=True)
        if self.fmt == "fp8":
            return dequantize_fp8_blocks(w, self.scale.to(device))
        if self.fmt == "fp4":
            return dequantize_fp4_rows(w, self.scale.to(device))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense(x.device)
        if self.exact or self.compute == "fp32":
            return F.linear(x.float(), w.float())
        if self.compute == "fp8":
            x = fp8_sim(x, 128)
        return lowp_matmul(x, w)


class RMSNorm(nn.Module):
    """w * x / rms(x), computed in fp32, returned in the input's dtype (weight held fp32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def local_sum(x: torch.Tensor) -> torch.Tensor:
    """The default `reduce` of Attention and MoE: one process holds the whole sum. runtime.distributed
    puts its all-reduce there when heads, the shared expert and routed experts are split across ranks."""
    return x


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


# --------------------------------------------------------------------------------------
# Decoding state (spec §11): what one sequence keeps between chunks
# --------------------------------------------------------------------------------------


@dataclass
class CompressorState:
    """Emitted entries plus the open window's projections (and, for the overlapping
    CSA compressor, the first halves of the last closed window)."""

    entries: Rows  # emitted entries, final form (normed, rotated, rounded)
    open_kv: torch.Tensor  # [n_open < m, c*width] projections of the open window's tokens
    open_gate: torch.Tensor  # [n_open, c*width] gate logits, position bias added
    prev_kv: torch.Tensor | None = None  # [m, width] A-halves of the last closed window (CSA)
    prev_gate: torch.Tensor | None = None


@dataclass
class LayerState:
    window: torch.Tensor  # [<= W-1, head_dim] newest KV vectors, oldest first
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


@dataclass
class SequenceState:
    """Everything one sequence needs to continue: position, per-layer state, MTP window.

    Tensors in a state are never written in place (every update rebinds), so a copy
    that shares them (:meth:`copy`) is an independent state: that is how sessions fork
    and keep snapshots without copying KV.
    """

    position: int
    layers: list[LayerState]
    mtp: list[LayerState] = field(default_factory=list)
    mtp_position: int = 0  # the MTP block lags the main model: it needs token t+1 for position t

    def copy(self) -> SequenceState:
        def layer(st: LayerState) -> LayerState:
            return LayerState(st.window, comp(st.compressor), comp(st.indexer))

        def comp(c: CompressorState | None) -> CompressorState | None:
            if c is None:
                return None
            return CompressorState(c.entries.prefix(c.entries.count), c.open_kv, c.open_gate, c.prev_kv, c.prev_gate)

        return SequenceState(self.position, [layer(s) for s in self.layers], [layer(s) for s in self.mtp],
                             self.mtp_position)

    def kv_bytes(self) -> int:
        """Bytes of compressed rows held (the part that grows with the sequence)."""
        return sum(c.entries.nbytes() for s in self.layers for c in (s.compressor, s.indexer) if c is not None)


@dataclass
class RaggedBatch:
    """The new rows of several sequences, concatenated: sequence i owns rows
    `bounds[i]:bounds[i + 1]`, at positions `starts[i]`.. of its own sequence."""

    ids: torch.Tensor  # [R] token ids (hash routing reads them)
    positions: torch.Tensor  # [R] each row's position in its sequence
    starts: list[int]
    bounds: list[int]  # len(starts) + 1 row offsets, from 0 to R

    @staticmethod
    def of(starts: list[int], ids: list[torch.Tensor]) -> RaggedBatch:
        lengths = [t.shape[0] for t in ids]
        bounds = np.cumsum([0] + lengths).tolist()
        device = ids[0].device
        positions = [torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)]
        # one sequence: its tensors as they are (a batch of one is exactly a single extend)
        cat = (lambda ts: ts[0]) if len(ids) == 1 else torch.cat
        return RaggedBatch(cat(ids), cat(positions), list(starts), bounds)

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))

    def lengths(self) -> list[int]:
        return [hi - lo for lo, hi in self.spans()]


# --------------------------------------------------------------------------------------
# Compressor (§7) and Lightning Indexer (§8)
# --------------------------------------------------------------------------------------


class Compressor(nn.Module):
    """Softmax-gated pooling of m tokens into one entry; `overlap` pools 2m slots (CSA)."""

    def __init__(self, config: ModelConfig, ratio: int, width: int, overlap: bool, exact: bool) -> None:
        super().__init__()
        c = 2 if overlap else 1
        self.ratio, self.width, self.overlap = ratio, width, overlap
        self.register_buffer("ape", torch.empty(ratio, c * width, dtype=torch.float32))
        self.wkv = QLinear(c * width, config.hidden_size, compute="fp32", exact=exact)
        self.wgate = QLinear(c * width, config.hidden_size, compute="fp32", exact=exact)
        self.norm = RMSNorm(width, config.rms_norm_eps)
        self.freqs = inv_freq(config, compress=True)

    def new_state(self, device: torch.device, dtype: torch.dtype, codec: RowCodec) -> CompressorState:
        c = 2 if self.overlap else 1
        empty = torch.empty(0, c * self.width, device=device)
        return CompressorState(Rows(codec, self.width, dtype, device), empty, empty)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token projections of rows `x` at `positions`: kv and gate logits (position bias added)."""
        return self.wkv(x), self.wgate(x) + self.ape[positions % self.ratio]

    def forward(self, x: torch.Tensor, start: int, st: CompressorState) -> None:
        """Feed one sequence's tokens `x` at positions start.. into its state (see :meth:`feed`)."""
        self.feed(*self.project(x, torch.arange(start, start + x.shape[0], device=x.device)), start, st)

    def feed(self, kv: torch.Tensor, gate: torch.Tensor, start: int, st: CompressorState) -> None:
        """Feed one sequence's projected tokens (:meth:`project`) at positions start.. into its
        state; emit every window they close."""
        m, w = self.ratio, self.width
        first = start - st.open_kv.shape[0]  # windows are aligned to absolute positions
        kv, gate = torch.cat((st.open_kv, kv)), torch.cat((st.open_gate, gate))
        n = kv.shape[0] // m
        # clones: a state must not pin the whole chunk's projections through a view
        st.open_kv, st.open_gate = kv[n * m:].clone(), gate[n * m:].clone()
        if n == 0:
            return
        kv, gate = kv[: n * m].view(n, m, -1), gate[: n * m].view(n, m, -1)
        if self.overlap:
            # entry j pools the A-halves of window j-1 and the B-halves of window j
            if st.prev_kv is None:  # window -1 does not exist: weight 0
                prev_kv = kv.new_zeros(1, m, w)
                prev_gate = gate.new_full((1, m, w), float("-inf"))
            else:
                prev_kv, prev_gate = st.prev_kv[None], st.prev_gate[None]
            slots_kv = torch.cat((torch.cat((prev_kv, kv[:-1, :, :w])), kv[:, :, w:]), dim=1)
            slots_gate = torch.cat((torch.cat((prev_gate, gate[:-1, :, :w])), gate[:, :, w:]), dim=1)
            st.prev_kv, st.prev_gate = kv[-1, :, :w].clone(), gate[-1, :, :w].clone()
        else:
            slots_kv, slots_gate = kv, gate
        pool = kernels.compressor.pool if kernels.enabled(kv.device, "compressor") else Compressor._pool
        st.entries.append(self.finish(pool(self, slots_kv, slots_gate, first, st.entries.dtype)))

    def _pool(self, slots_kv: torch.Tensor, slots_gate: torch.Tensor, first: int, dtype: torch.dtype) -> torch.Tensor:
        """Entries [n, width] in `dtype` from slots [n, S, width]: softmax-gated sum, norm, RoPE
        at each window's first position (`first` + m * entry)."""
        pooled = (slots_kv * slots_gate.softmax(dim=1)).sum(dim=1)
        entries = self.norm(pooled.to(dtype))
        window_starts = first + self.ratio * torch.arange(slots_kv.shape[0], device=slots_kv.device)
        return apply_rope(entries, window_starts, self.freqs)

    def finish(self, entries: torch.Tensor) -> torch.Tensor:
        """Low-precision rounding of emitted entries; set by the owner (KV or indexer keys)."""
        return entries


class Indexer(nn.Module):
    """Lightning Indexer: picks, per query, the top-k causal CSA entries (§8)."""

    def __init__(self, config: ModelConfig, ratio: int, exact: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.ratio, self.exact = ratio, exact
        self.wq_b = QLinear(self.n_heads * self.head_dim, config.q_lora_rank, exact=exact)
        self.weights_proj = QLinear(self.n_heads, config.hidden_size, compute="bf16", exact=exact)
        self.compressor = Compressor(config, ratio, self.head_dim, overlap=True, exact=exact)
        self.compressor.finish = self.round_keys
        self.freqs = inv_freq(config, compress=True)

    def round_keys(self, v: torch.Tensor) -> torch.Tensor:
        # reference: FP4 storage of indexer q/k after an orthonormal Hadamard rotation
        return v if self.exact else fp4_sim(hadamard(v), 32)

    def queries(self, x: torch.Tensor, cq: torch.Tensor,
                batch: RaggedBatch) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per sequence of the batch: its queries [T, heads, dim] and head weights [T, heads]
        (fp32), or None when none of its queries sees more than k entries: then top-k selects
        every causal entry, attention reads them all, and nothing is scored. Projected in one
        GEMM over the rows of the sequences that score."""
        spans = batch.spans()
        scoring = [(start + hi - lo) // self.ratio > self.topk for start, (lo, hi) in zip(batch.starts, spans)]
        if not any(scoring):
            return [None] * len(scoring)
        positions = batch.positions
        if not all(scoring):  # only the scoring sequences' rows, packed
            rows = torch.cat([torch.arange(lo, hi, device=x.device) for (lo, hi), s in zip(spans, scoring) if s])
            x, cq, positions = x[rows], cq[rows], positions[rows]
        q = self.wq_b(cq).view(x.shape[0], self.n_heads, self.head_dim)
        q = self.round_keys(apply_rope(q, positions, self.freqs))
        weights = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        out, at = [], 0
        for (lo, hi), s in zip(spans, scoring):
            out.append((q[at:at + hi - lo], weights[at:at + hi - lo]) if s else None)
            at += hi - lo if s else 0
        return out

    def forward(self, kv: torch.Tensor, gate: torch.Tensor, queries: tuple[torch.Tensor, torch.Tensor] | None,
                positions: torch.Tensor, st: CompressorState) -> torch.Tensor | None:
        """One sequence: feed its compressor projections (`Compressor.project`), then its entry
        indices [T, k] per query, -1 where a query has fewer than k causal entries; None when
        it scores nothing (`queries` None: see :meth:`queries`)."""
        self.compressor.feed(kv, gate, int(positions[0]), st)
        if queries is None:
            return None
        select = kernels.indexer.select if kernels.enabled(kv.device, "indexer") else Indexer._select
        return select(self, *queries, positions, st.entries)

    def _select(self, q: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Top-k entry indices [T, k] (-1 past a query's causal entries) from queries [T, heads, dim],
        head weights [T, heads] (fp32) and the indexer keys `rows`."""
        keys = rows.dense()
        n = keys.shape[0]
        k = self.topk
        visible = (positions + 1) // self.ratio  # entries closed at or before each query
        out = []
        keys_t = keys.float().t()
        entry = torch.arange(n, device=q.device)
        for s in range(0, q.shape[0], ATTENTION_QUERY_BLOCK):
            e = min(s + ATTENTION_QUERY_BLOCK, q.shape[0])
            # entries the chunk emitted after the block's last query are nobody's in the block
            m = max(int(visible[e - 1]), k)
            qb = q[s:e].float()
            # one GEMM for all heads, then the ReLU and the head weighting as a batched GEMV
            per_head = (qb.reshape(-1, self.head_dim) @ keys_t[:, :m]).view(e - s, self.n_heads, m).relu_()
            scores = torch.bmm(weights[s:e, None, :], per_head)[:, 0]
            # every query of the block sees the entries before its first query's
            v0 = int(visible[s])
            scores[:, v0:].masked_fill_(entry[None, v0:m] >= visible[s:e, None], float("-inf"))
            idx = topk_indices(scores, k)
            out.append(torch.where(idx < visible[s:e, None], idx, -1))
        return torch.cat(out)


# --------------------------------------------------------------------------------------
# Attention (§5, §6) with the sparse core
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, kind: str, ratio: int, exact: bool) -> None:
        super().__init__()
        H, D, d = config.num_attention_heads, config.head_dim, config.hidden_size
        self.kind, self.ratio, self.exact = kind, ratio, exact
        self.n_heads, self.head_dim, self.window = H, D, config.sliding_window
        self.groups, self.eps = config.o_groups, config.rms_norm_eps
        self.nope = D - config.rope_head_dim
        self.register_buffer("attn_sink", torch.empty(H, dtype=torch.float32))
        self.wq_a = QLinear(config.q_lora_rank, d, exact=exact)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = QLinear(H * D, config.q_lora_rank, exact=exact)
        self.wkv = QLinear(D, d, exact=exact)
        self.kv_norm = RMSNorm(D, config.rms_norm_eps)
        self.wo_a = QLinear(config.o_groups * config.o_lora_rank, H * D // config.o_groups, compute="bf16", exact=exact)
        self.wo_b = QLinear(d, config.o_groups * config.o_lora_rank, exact=exact)
        self.freqs = inv_freq(config, compress=kind != SWA)
        self.reduce = local_sum  # over the ranks that hold the other heads (runtime.distributed)
        if kind != SWA:
            self.compressor = Compressor(config, ratio, D, overlap=kind == CSA, exact=exact)
            self.compressor.finish = self.round_kv
        if kind == CSA:
            self.indexer = Indexer(config, ratio, exact)

    def round_kv(self, kv: torch.Tensor) -> torch.Tensor:
        # reference: FP8 storage of the non-rope dims, blocks of 64 (rope dims stay bf16)
        if self.exact:
            return kv
        return torch.cat((fp8_sim(kv[..., : self.nope], 64), kv[..., self.nope:]), dim=-1)

    def new_state(self, device: torch.device, dtype: torch.dtype, cache_format: str) -> LayerState:
        st = LayerState(window=torch.empty(0, self.head_dim, device=device, dtype=dtype))
        rope = self.head_dim - self.nope
        if self.kind != SWA:
            st.compressor = self.compressor.new_state(device, dtype, RowCodec(cache_format, "main", rope))
        if self.kind == CSA:
            st.indexer = self.indexer.compressor.new_state(device, dtype, RowCodec(cache_format, "index", rope))
        return st

    def forward(self, x: torch.Tensor, batch: RaggedBatch, states: list[LayerState]) -> torch.Tensor:
        """Attention outputs [R, d] for the batch's rows `x` [R, d]; `states[i]` is sequence i's."""
        T, H, D = x.shape[0], self.n_heads, self.head_dim
        positions = batch.positions
        # per token, over every sequence's rows at once
        cq = self.q_norm(self.wq_a(x))
        q = unit_rms(self.wq_b(cq).view(T, H, D), self.eps)
        q = apply_rope(q, positions, self.freqs)
        kv = self.round_kv(apply_rope(self.kv_norm(self.wkv(x)), positions, self.freqs))
        if self.kind != SWA:
            comp_kv, comp_gate = self.compressor.project(x, positions)
        if self.kind == CSA:
            index_kv, index_gate = self.indexer.compressor.project(x, positions)
            queries = self.indexer.queries(x, cq, batch)
        attend = (kernels.attention.sparse_attention if kernels.enabled(x.device, "attention")
                  else Attention._attend_chunk)
        # per sequence, on its own rows and history; the sequences that add one token each (decoders)
        # attend together in one padded computation when there are several of them
        spans = batch.spans()
        together = [hi - lo == 1 for lo, hi in spans]
        if sum(together) < 2 or kernels.enabled(x.device, "attention"):
            together = [False] * len(spans)
        outs: list[torch.Tensor | None] = []
        decoders: list[tuple[int, torch.Tensor, Rows | None, torch.Tensor | None]] = []
        for i, ((lo, hi), st) in enumerate(zip(spans, states)):
            # raw window: the W-1 newest vectors before these rows, then the rows themselves
            keys = torch.cat((st.window, kv[lo:hi]))
            st.window = keys[max(keys.shape[0] - (self.window - 1), 0):].clone()
            picks = None
            if self.kind != SWA:
                self.compressor.feed(comp_kv[lo:hi], comp_gate[lo:hi], batch.starts[i], st.compressor)
            if self.kind == CSA:
                picks = self.indexer(index_kv[lo:hi], index_gate[lo:hi], queries[i], positions[lo:hi], st.indexer)
            entries = st.compressor.entries if self.kind != SWA else None
            if together[i]:
                decoders.append((lo, keys, entries, picks))
                outs.append(None)
            else:
                outs.append(attend(self, q[lo:hi], positions[lo:hi], keys, entries, picks))
        if decoders:
            rows = [lo for lo, *_ in decoders]
            done = iter(self._attend_decoders(q[rows], positions[rows], *zip(*(d[1:] for d in decoders))))
            outs = [o if o is not None else next(done)[None] for o in outs]
        out = apply_rope(outs[0] if len(outs) == 1 else torch.cat(outs), positions, self.freqs, inverse=True)
        # grouped output projection: consecutive head groups, each to its own rank-R slice
        grouped = out.reshape(T, self.groups, -1)
        wo_a = self.wo_a.dense(x.device).view(self.groups, -1, grouped.shape[-1])
        z = torch.einsum("tgi,gri->tgr", grouped.float(), wo_a.float()).flatten(1)
        return self.reduce(self.wo_b(z if self.exact else z.to(torch.bfloat16)))

    def _attend_chunk(self, q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, rows: Rows | None,
                      picks: torch.Tensor | None) -> torch.Tensor:
        """Attention outputs [T, H, D] of a chunk's queries [T, H, D] at `positions`. `keys` [L, D]
        holds the window's raw KV, the chunk's last; `rows` the compressed entries (None: SWA);
        `picks` [T, k] the indexer's choices (None: every causal entry)."""
        T = q.shape[0]
        # left-padded so that chunk row r's window is padded rows [r, r+W-1] (pad rows hold positions < 0)
        padded = F.pad(keys, (0, 0, self.window - 1 - (keys.shape[0] - T), 0))
        # decoded once per chunk: each entry is read by many queries of the chunk
        entries = rows.dense() if rows is not None else None
        return torch.cat([
            self._attend(q[s:s + ATTENTION_QUERY_BLOCK], positions[s:s + ATTENTION_QUERY_BLOCK],
                         padded[s:s + ATTENTION_QUERY_BLOCK + self.window - 1], entries,
                         None if picks is None else picks[s:s + ATTENTION_QUERY_BLOCK])
            for s in range(0, T, ATTENTION_QUERY_BLOCK)
        ])

    def _softmax_with_sink(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised probabilities [.., H, K] over the score blocks `logits` (window, entries)
        and their denominators [.., H] counting the head's sink; in reference mode the
        probabilities are rounded to bf16 before P·V, as the reference does."""
        scores = torch.cat(logits, dim=-1) * self.head_dim ** -0.5
        sink = self.attn_sink.float()[None, :]
        top = torch.maximum(scores.amax(dim=-1), sink)  # finite: the window holds the query itself
        probs = torch.exp(scores - top[..., None])
        denom = probs.sum(dim=-1) + torch.exp(sink - top)
        if not self.exact:
            probs = probs.to(torch.bfloat16).float()
        return probs, denom

    def _attend_decoders(self, q: torch.Tensor, positions: torch.Tensor, keys: tuple[torch.Tensor, ...],
                         rows: tuple[Rows | None, ...], picks: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """Attention outputs [B, H, D] of B sequences' one query each (q [B, H, D] at `positions`
        [B]), as :meth:`_attend_chunk` computes them one by one (the same softmax over window,
        entries and sink, to fp32 rounding), in one padded computation: each sequence's window
        is left-padded to W rows and its entries (the indexer's picks, else every causal entry)
        padded to the longest, the pads masked out. `keys[i]` [<= W, D] ends with the query's
        own KV; `rows[i]` and `picks[i]` [1, k] as in :meth:`_attend_chunk`."""
        W = self.window
        qf = q.float()
        # pads: zero rows, masked by position (a pad row stands where position < 0)
        window = torch.stack([F.pad(k.float(), (0, 0, W - k.shape[0], 0)) for k in keys])  # [B, W, D]
        key_pos = positions[:, None] - (W - 1) + torch.arange(W, device=q.device)
        logits = [torch.bmm(qf, window.transpose(1, 2)).masked_fill((key_pos < 0)[:, None, :], float("-inf"))]
        chosen = None
        if rows[0] is not None:  # every sequence of a layer has the same kind
            picked, valid = [], []
            for r, p, pos in zip(rows, picks, positions.tolist()):
                comp = r.dense().float()
                if p is None:  # HCA, or CSA while top-k keeps every causal entry
                    picked.append(comp)
                    valid.append(torch.arange(comp.shape[0], device=q.device) < (pos + 1) // self.ratio)
                else:
                    picked.append(comp[p[0].clamp(min=0)])
                    valid.append(p[0] >= 0)
            if max(v.shape[0] for v in valid):
                chosen = torch.nn.utils.rnn.pad_sequence(picked, batch_first=True)  # [B, K, D]
                hidden = ~torch.nn.utils.rnn.pad_sequence(valid, batch_first=True)
                logits.append(torch.bmm(qf, chosen.transpose(1, 2)).masked_fill(hidden[:, None, :], float("-inf")))
        probs, denom = self._softmax_with_sink(logits)
        out = torch.bmm(probs[..., :W], window)
        if chosen is not None:
            out = out + torch.bmm(probs[..., W:], chosen)
        return (out / denom[..., None]).to(q.dtype)

    def _attend(self, q: torch.Tensor, positions: torch.Tensor, window_keys: torch.Tensor,
                entries: torch.Tensor | None, picks: torch.Tensor | None) -> torch.Tensor:
        """One block of queries [Tb, H, D]: one softmax over window, compressed entries and sink.

        `window_keys` [Tb+W-1, D] holds every window position of the block (left-padded at
        the sequence start). K = V: the same vectors are keys and values. `entries` [N, D]
        are the decoded compressed entries: with `picks` [Tb, k] only the indexer's picks
        are read, else every causal entry. Scores and softmax in fp32; in reference mode
        probabilities are rounded to bf16 before P·V, as the reference does.
        """
        W = self.window
        Tb, H = q.shape[0], q.shape[1]
        L = window_keys.shape[0]
        qf, keys = q.float(), window_keys.float()
        # window scores: one GEMM against the block's keys, then the band where
        # query t reads keys t..t+W-1 (a strided view, no copy)
        band = (Tb, H, W), (H * L + 1, L, 1)
        scores_w = torch.einsum("thd,ld->thl", qf, keys).as_strided(*band)
        key_pos = positions[:, None] - (W - 1) + torch.arange(W, device=q.device)
        logits = [scores_w.masked_fill((key_pos < 0)[:, None, :], float("-inf"))]
        if picks is not None and picks.shape[1] == 0:
            entries = None  # k = 0: nothing picked
        if entries is not None:
            comp = entries.float()
            if picks is None:  # HCA, or CSA while top-k keeps every causal entry
                hidden = torch.arange(comp.shape[0], device=q.device)[None, :] >= ((positions + 1) // self.ratio)[:, None]
                logits.append(torch.einsum("thd,kd->thk", qf, comp).masked_fill(hidden[:, None, :], float("-inf")))
            else:
                # only the k picks enter the softmax; no [Tb, H, N] scores over every entry
                bags = picks.clamp(min=0)[:, None, :].expand(-1, H, -1).reshape(Tb * H, -1)
                logits.append(_picked_scores(qf, comp, bags).masked_fill((picks < 0)[:, None, :], float("-inf")))
        probs, denom = self._softmax_with_sink(logits)
        spread = probs.new_zeros(Tb, H, L)
        spread.as_strided(*band).copy_(probs[..., :W])
        out = torch.einsum("thl,ld->thd", spread, keys)
        if entries is not None and picks is None:
            out = out + torch.einsum("thk,kd->thd", probs[..., W:], comp)
        elif entries is not None:
            # P·V over the picks as a weighted sum of entry rows per (query, head), without
            # gathering them (a hidden pick has probability 0)
            weights = probs[..., W:].reshape(Tb * H, -1)
            out = out + F.embedding_bag(bags, comp, per_sample_weights=weights, mode="sum").view(Tb, H, -1)
        return (out / denom[..., None]).to(q.dtype)


# --------------------------------------------------------------------------------------
# DeepSeekMoE (§9)
# --------------------------------------------------------------------------------------


class Expert(nn.Module):
    """SwiGLU with the V4 clamp: silu(min(W1 u, L)) * clamp(W3 u, -L, L), then W2."""

    def __init__(self, dim: int, inter: int, fmt: str, limit: float, exact: bool) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = QLinear(inter, dim, fmt=fmt, exact=exact)
        self.w2 = QLinear(dim, inter, fmt=fmt, exact=exact)
        self.w3 = QLinear(inter, dim, fmt=fmt, exact=exact)

    def forward(self, u: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.w1(u).float().clamp(max=self.limit)) * self.w3(u).float().clamp(-self.limit, self.limit)
        if weight is not None:  # the reference scales before W2 (same math, its rounding)
            h = h * weight[:, None]
        return self.w2(h if self.w2.exact else h.to(torch.bfloat16)).float()


class Gate(nn.Module):
    """Router: sqrt-softplus scores; learned top-k with a selection-only bias, or a fixed hash table."""

    def __init__(self, config: ModelConfig, hashed: bool) -> None:
        super().__init__()
        self.k, self.scale, self.hashed = config.num_experts_per_tok, config.routed_scaling_factor, hashed
        self.register_buffer("weight", torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        if hashed:
            self.register_buffer("tid2eid", torch.empty(config.vocab_size, self.k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.empty(config.n_routed_experts, dtype=torch.float32))

    def forward(self, u: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(F.linear(u.float(), self.weight)).sqrt()
        idx = self.tid2eid[ids] if self.hashed else topk_indices(scores + self.bias, self.k)
        g = scores.gather(1, idx)
        return idx, g / (g.sum(dim=-1, keepdim=True) + 1e-20) * self.scale


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, hashed: bool, exact: bool) -> None:
        super().__init__()
        d, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = Gate(config, hashed)
        self.experts = nn.ModuleList(
            # exact mode is the fp32 verification model: experts dequantized once at load, like the rest
            Expert(d, inter, "dense" if exact else config.expert_dtype, config.swiglu_limit, exact)
            for _ in range(config.n_routed_experts)
        )
        self.shared_experts = Expert(d, inter, "dense", config.swiglu_limit, exact)
        # expert parallel (runtime.distributed): the routed experts this rank computes, and the sum
        # over the ranks that compute the others (and hold the other slices of the shared expert)
        self.held = range(config.n_routed_experts)
        self.reduce = local_sum

    def forward(self, u: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        idx, g = self.gate(u, ids)
        all_held = len(self.held) == len(self.experts)
        routed = kernels.moe.add_routed if all_held and kernels.enabled(u.device, "moe") else MoE._add_routed
        return self.reduce(routed(self, u, idx, g, self.shared_experts(u))).to(u.dtype)

    def _add_routed(self, u: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, d] fp32 plus each token's routed experts `idx` [T, k] weighted by `g` (in place).

        The (token, expert) pairs are sorted by expert once, each held expert runs on its
        contiguous slice, and one index_add_ (serial over its index on the CPU) adds the outputs
        in that order: each row still gets its experts in ascending id order, as one
        index_add_ per expert gave them, so the sums are the same bits with fewer operations
        per expert (a batch of decoders calls ~10 experts per layer)."""
        k = idx.shape[1]
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        rows, weights = order // k, g.flatten()[order]
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        outs, picked, at = [], [], 0
        for e, n in enumerate(counts):
            if n and e in self.held:
                outs.append(self.experts[e](u[rows[at:at + n]], weights[at:at + n]))
                picked.append(rows[at:at + n])
            at += n
        if outs:
            y.index_add_(0, torch.cat(picked) if len(picked) > 1 else picked[0],
                         torch.cat(outs) if len(outs) > 1 else outs[0])
        return y


# --------------------------------------------------------------------------------------
# Manifold-constrained hyper-connections (§4)
# --------------------------------------------------------------------------------------


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits onto (nearly) doubly-stochastic matrices, exactly as §4.1."""
    if kernels.enabled(logits.device, "sinkhorn"):
        return kernels.sinkhorn.sinkhorn(logits, iters, eps)
    c = logits.softmax(dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def _register_hc(module: nn.Module, prefix: str, rows: int, config: ModelConfig) -> None:
    """mHC parameters live on their owner under the official names (`hc_attn_fn`, `hc_head_base`, ...)."""
    n = config.hc_mult
    module.register_buffer(f"{prefix}_fn", torch.empty(rows, n * config.hidden_size, dtype=torch.float32))
    module.register_buffer(f"{prefix}_base", torch.empty(rows, dtype=torch.float32))
    module.register_buffer(f"{prefix}_scale", torch.empty(3 if rows > n else 1, dtype=torch.float32))


def _hc_mix(X: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """(flatten(X) / rms) · fnᵀ, in fp32: the mixing logits of every mHC site."""
    flat = X.flatten(1).float()
    return F.linear(flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps), fn)


def hc_collapse(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HCPre (§4.1): n streams [T, n, d] -> sublayer input a [T, d], plus post [T, n] and comb [T, n, n]."""
    n = config.hc_mult
    mu = _hc_mix(X, fn, config.rms_norm_eps)
    pre = torch.sigmoid(mu[:, :n] * scale[0] + base[:n]) + config.hc_eps
    post = 2 * torch.sigmoid(mu[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = sinkhorn((mu[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n), config.hc_sinkhorn_iters, config.hc_eps)
    a = (pre[..., None] * X.float()).sum(dim=1).to(X.dtype)
    return a, post, comb


def hc_expand(y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """HCPost (§4.2): X'_k = post_k y + sum_i comb[i, k] X_i (the sum runs over comb's first index)."""
    mixed = post[..., None] * y.float()[:, None, :] + torch.einsum("tik,tid->tkd", comb, X.float())
    return mixed.to(X.dtype)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            config: ModelConfig) -> torch.Tensor:
    """HCHead (§4.3): final collapse with sigmoid weights, no Sinkhorn."""
    pre = torch.sigmoid(_hc_mix(X, fn, config.rms_norm_eps) * scale + base) + config.hc_eps
    return (pre[..., None] * X.float()).sum(dim=1).to(X.dtype)


# --------------------------------------------------------------------------------------
# Blocks, MTP, the model (§3, §10)
# --------------------------------------------------------------------------------------


class Block(nn.Module):
    """One layer: mHC around attention, then mHC around the MoE."""

    def __init__(self, config: ModelConfig, kind: str, ratio: int, hashed: bool, exact: bool) -> None:
        super().__init__()
        self.config = config
        rows = (2 + config.hc_mult) * config.hc_mult
        _register_hc(self, "hc_attn", rows, config)
        _register_hc(self, "hc_ffn", rows, config)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, kind, ratio, exact)
        self.ffn = MoE(config, hashed, exact)

    def forward(self, X: torch.Tensor, batch: RaggedBatch, states: list[LayerState]) -> torch.Tensor:
        """Streams [R, n, d] of the batch's rows through the layer; `states[i]` is sequence i's."""
        a, post, comb = hc_collapse(X, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.config)
        X = hc_expand(self.attn(self.attn_norm(a), batch, states), X, post, comb)
        a, post, comb = hc_collapse(X, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.config)
        return hc_expand(self.ffn(self.ffn_norm(a), batch.ids), X, post, comb)


class MTPBlock(Block):
    """Multi-token prediction (§10): from position t's final streams and token t+1, predict token t+2.

    A full SWA block with learned routing and its own window, its own mHC head and
    norm; it shares the main model's embedding and output head.
    """

    def __init__(self, config: ModelConfig, exact: bool) -> None:
        super().__init__(config, SWA, 0, hashed=False, exact=exact)
        d = config.hidden_size
        self.e_proj = QLinear(d, d, exact=exact)
        self.h_proj = QLinear(d, d, exact=exact)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        _register_hc(self, "hc_head", config.hc_mult, config)

    def forward(self, streams: torch.Tensor, next_embed: torch.Tensor, batch: RaggedBatch,
                states: list[LayerState]) -> torch.Tensor:
        """Final hidden state [R, d] (before the shared head) for predicting t+2, from the streams of
        positions t and the embeddings of tokens t+1 (`batch.ids`), rows of several sequences."""
        e = self.e_proj(self.enorm(next_embed))
        Y = (self.h_proj(self.hnorm(streams).flatten(0, 1)).view_as(streams).float() + e.float()[:, None, :])
        Y = super().forward(Y.to(streams.dtype), batch, states)
        return self.norm(hc_head(Y, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.config))


@dataclass
class ExtendOutput:
    logits: torch.Tensor | None  # [T, V] fp32 (all positions) or [1, V] (last), None if not asked
    streams: torch.Tensor | None  # [T, n, d] final streams before the head collapse (for MTP)


class Model(nn.Module):
    """DeepSeek-V4 for causal LM. Build with :func:`runtime.load`; see docs/runtime.md."""

    def __init__(self, config: ModelConfig, precision: str = "exact") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        exact = precision == "exact"
        if not exact:  # FP8 activation quantization works on blocks of 128 inputs
            for key, width in (("hidden_size", config.hidden_size), ("q_lora_rank", config.q_lora_rank),
                               ("moe_intermediate_size", config.moe_intermediate_size),
                               ("o_lora_rank", config.o_groups * config.o_lora_rank)):
                if width % 128:
                    raise ValueError(f"reference precision needs multiples of 128 for GEMM inputs; "
                                     f"config key '{key}' gives {width}")
        self.config, self.precision = config, precision
        self.identity = "unloaded"  # set by runtime.load: which weights these are (cache compatibility)
        self.act_dtype = torch.float32 if exact else torch.bfloat16
        d = config.hidden_size
        self.embed = QLinear(config.vocab_size, d, compute="bf16", exact=exact)
        self.layers = nn.ModuleList(
            Block(config, kind, config.compress_ratio(i), config.is_hash_layer(i), exact)
            for i, kind in enumerate(config.layer_types)
        )
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = QLinear(config.vocab_size, d, compute="fp32", exact=exact)
        _register_hc(self, "hc_head", config.hc_mult, config)
        self.mtp = nn.ModuleList(MTPBlock(config, exact) for _ in range(config.num_nextn_predict_layers))

    def parameter_count(self, include_mtp: bool = False) -> int:
        """Logical parameters (packed FP4 counts two per byte; quantization scales and the
        hash routing table are not parameters). Works on the meta device."""
        total = 0
        for name, t in self.state_dict().items():
            if name.endswith(".scale") and t.dtype == torch.float8_e8m0fnu or name.endswith("tid2eid"):
                continue
            if name.startswith("mtp.") and not include_mtp:
                continue
            total += t.numel() * (2 if t.dtype == torch.int8 else 1)
        return total

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def default_cache_format(self) -> str:
        return "fp32" if self.precision == "exact" else "native"

    def new_state(self, cache_format: str | None = None) -> SequenceState:
        """An empty sequence. `cache_format`: "native" (default in reference mode), "bf16", or
        "fp32" (the only one `exact` mode accepts: any rounding would break exactness)."""
        fmt = cache_format or self.default_cache_format()
        if fmt not in FORMATS:
            raise ValueError(f"cache format must be one of {FORMATS}, got {fmt!r}")
        if self.precision == "exact" and fmt != "fp32":
            raise ValueError(f"exact precision keeps its cache in fp32; {fmt!r} would round it")
        dev = self.device
        return SequenceState(
            position=0,
            layers=[layer.attn.new_state(dev, self.act_dtype, fmt) for layer in self.layers],
            mtp=[block.attn.new_state(dev, self.act_dtype, fmt) for block in self.mtp],
        )

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V}); got min {int(ids.min())}, max {int(ids.max())}")
        return self.embed.weight[ids].to(self.act_dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def extend(self, state: SequenceState, ids: torch.Tensor, *, logits: str = "last",
               return_streams: bool = False) -> ExtendOutput:
        """Run the tokens `ids` [T] after `state.position`, updating `state` in place: a batch of one.

        `logits`: "last" (the last position only), "all" or "none".
        """
        return self.extend_batch([state], [ids], logits=logits, return_streams=return_streams)[0]

    @torch.inference_mode()
    def extend_batch(self, states: list[SequenceState], ids: list[torch.Tensor], *,
                     logits: str | list[str] = "last", return_streams: bool = False) -> list[ExtendOutput]:
        """Extend several sequences in one forward: `ids[i]` [T_i >= 1] runs after `states[i].position`,
        updating each state in place; one output per sequence (`logits` and `return_streams` as in
        :meth:`extend`; `logits` may also be one mode per sequence, e.g. "all" for a 2-token verify
        beside "last" for a prefill chunk). The per-token work runs once over all the rows
        (docs/runtime.md)."""
        modes = [logits] * len(states) if isinstance(logits, str) else list(logits)
        for mode in modes:
            if mode not in ("last", "all", "none"):
                raise ValueError(f"logits must be 'last', 'all' or 'none', got {mode!r}")
        if len(modes) != len(states):
            raise ValueError(f"{len(modes)} logits modes for {len(states)} sequences")
        self._check_batch(states, ids)
        batch = RaggedBatch.of([st.position for st in states], [t.to(self.device) for t in ids])
        X = self.embed_tokens(batch.ids)[:, None, :].expand(-1, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            X = layer(X, batch, [st.layers[i] for st in states])
        for st, n in zip(states, batch.lengths()):
            st.position += n
        # the rows whose logits are asked for, through the head in one GEMM
        counts = [{"all": hi - lo, "last": 1, "none": 0}[mode] for mode, (lo, hi) in zip(modes, batch.spans())]
        per_sequence: list[torch.Tensor | None] = [None] * len(states)
        if any(counts):
            rows = X if all(mode == "all" for mode in modes) else X[torch.cat([
                torch.arange(hi - n, hi, device=self.device) for n, (_, hi) in zip(counts, batch.spans())])]
            out = self.logits(self.norm(hc_head(rows, self.hc_head_fn, self.hc_head_base, self.hc_head_scale,
                                                 self.config)))
            per_sequence = [part if n else None for part, n in zip(out.split(counts), counts)]
        return [ExtendOutput(out, X[lo:hi] if return_streams else None)
                for out, (lo, hi) in zip(per_sequence, batch.spans())]

    @staticmethod
    def _check_batch(states: list[SequenceState], ids: list[torch.Tensor]) -> None:
        if len(states) != len(ids) or not states:
            raise ValueError(f"a batch needs one ids tensor per state, at least one; got {len(states)} states "
                             f"and {len(ids)} ids tensors")
        if len({id(st) for st in states}) != len(states):
            raise ValueError("a state appears twice in one batch")
        for t in ids:
            if t.dim() != 1 or t.shape[0] == 0:
                raise ValueError(f"each sequence's ids must be a non-empty 1-d tensor, got shape {tuple(t.shape)}")

    def mtp_logits(self, state: SequenceState, streams: torch.Tensor, next_ids: torch.Tensor,
                   start: int, *, logits: bool = True) -> torch.Tensor | None:
        """Draft logits [T, V] for positions start+2.. from main streams at start.. and tokens start+1..
        (a batch of one). `logits=False` only advances the MTP block's state and returns None: a
        session keeps that window current at every step, and the head (the widest GEMM) would
        compute logits nobody reads."""
        return self.mtp_logits_batch([state], [streams], [next_ids], [start], logits=logits)[0]

    @torch.inference_mode()
    def mtp_logits_batch(self, states: list[SequenceState], streams: list[torch.Tensor],
                         next_ids: list[torch.Tensor], starts: list[int], *,
                         logits: bool = True) -> list[torch.Tensor | None]:
        """:meth:`mtp_logits` for several sequences in one forward of the MTP block."""
        self._check_batch(states, next_ids)
        for st, rows, nxt, start in zip(states, streams, next_ids, starts, strict=True):
            if start != st.mtp_position:
                raise ValueError(f"the MTP block continues at position {st.mtp_position}, not {start}")
            if rows.shape[0] != nxt.shape[0]:
                raise ValueError(f"{rows.shape[0]} stream rows for {nxt.shape[0]} next tokens")
        batch = RaggedBatch.of(starts, [t.to(self.device) for t in next_ids])
        X = streams[0] if len(streams) == 1 else torch.cat(streams)
        hidden = self.mtp[0](X, self.embed_tokens(batch.ids), batch, [st.mtp[0] for st in states])
        for st, n in zip(states, batch.lengths()):
            st.mtp_position += n
        if not logits:
            return [None] * len(states)
        return list(self.logits(hidden).split(batch.lengths()))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
        """Logits [batch, seq, vocab] (fp32) for a LongTensor [batch, seq]; each row runs on its own state,
        in chunks of `chunk_size` tokens, so memory grows linearly with the sequence."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        rows = []
        for seq in input_ids:
            state = self.new_state()
            rows.append(torch.cat([self.extend(state, seq[s:s + chunk_size], logits="all").logits
                                   for s in range(0, seq.shape[0], chunk_size)]))
        return torch.stack(rows)
