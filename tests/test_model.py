"""Model behaviour beyond oracle parity: MTP, reference precision, memory growth, loading options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from runtime import load
from runtime.checkpoint import CheckpointError, inventory, logical_names, open_checkpoint
from runtime.config import released_config
from runtime.model import Model, QLinear, _picked_scores
from runtime.quant import fp4_sim, fp8_sim
from tests.conftest import CONFIGS

# ---------------------------------------------------------------------------------------------
# MTP: the spec's formula (§10), computed densely and without any of runtime.model's code
# ---------------------------------------------------------------------------------------------


def _rms(x, w=None, eps=1e-6):
    y = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _mhc_pre(X, fn, base, scale, n=4, iters=20, eps=1e-6):
    mu = _rms(X.flatten(1)) @ fn.T
    pre = torch.sigmoid(mu[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mu[:, n:2 * n] * scale[1] + base[n:2 * n])
    M = (mu[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n)
    C = torch.softmax(M, -1) + eps
    C = C / (C.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        C = C / (C.sum(-1, keepdim=True) + eps)
        C = C / (C.sum(-2, keepdim=True) + eps)
    return (pre[..., None] * X).sum(1), post, C


def _mhc_post(y, X, post, C):
    return post[..., None] * y[:, None] + torch.einsum("tik,tid->tkd", C, X)


def _rope(x, pos, theta, r=64, inverse=False):
    freqs = 1.0 / theta ** (torch.arange(0, r, 2).float() / r)
    ang = pos[:, None].float() * freqs * (-1 if inverse else 1)
    z = torch.view_as_complex(x[..., -r:].reshape(*x.shape[:-1], r // 2, 2).contiguous())
    rot = torch.polar(torch.ones_like(ang), ang).view(ang.shape[0], *([1] * (x.dim() - 2)), r // 2)
    return torch.cat((x[..., :-r], torch.view_as_real(z * rot).flatten(-2)), -1)


def _dense_swa_block(W, p, X, cfg):
    """One SWA block with learned routing, written from the spec with a dense masked softmax."""
    T, H, D = X.shape[0], cfg.num_attention_heads, cfg.head_dim
    pos = torch.arange(T)
    a, post, C = _mhc_pre(X, W[p + "hc_attn_fn"], W[p + "hc_attn_base"], W[p + "hc_attn_scale"])
    x = _rms(a, W[p + "attn_norm.weight"])
    cq = _rms(x @ W[p + "attn.wq_a.weight"].T, W[p + "attn.q_norm.weight"])
    q = _rope(_rms((cq @ W[p + "attn.wq_b.weight"].T).view(T, H, D)), pos, cfg.rope_theta)
    kv = _rope(_rms(x @ W[p + "attn.wkv.weight"].T, W[p + "attn.kv_norm.weight"]), pos, cfg.rope_theta)
    s = torch.einsum("thd,sd->ths", q, kv) / D ** 0.5
    rel = pos[:, None] - pos[None, :]
    s = s.masked_fill(((rel < 0) | (rel >= cfg.sliding_window))[:, None, :], float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    sink = torch.exp(W[p + "attn.attn_sink"][None, :] - s.amax(-1))
    o = torch.einsum("ths,sd->thd", e, kv) / (e.sum(-1) + sink)[..., None]
    o = _rope(o, pos, cfg.rope_theta, inverse=True).reshape(T, cfg.o_groups, -1)
    wo_a = W[p + "attn.wo_a.weight"].view(cfg.o_groups, cfg.o_lora_rank, -1)
    y = torch.einsum("tgi,gri->tgr", o, wo_a).flatten(1) @ W[p + "attn.wo_b.weight"].T
    X = _mhc_post(y, X, post, C)

    a, post, C = _mhc_pre(X, W[p + "hc_ffn_fn"], W[p + "hc_ffn_base"], W[p + "hc_ffn_scale"])
    u = _rms(a, W[p + "ffn_norm.weight"])
    sc = F.softplus(u @ W[p + "ffn.gate.weight"].T).sqrt()
    idx = (sc + W[p + "ffn.gate.bias"]).topk(cfg.num_experts_per_tok, -1).indices
    g = sc.gather(1, idx)
    g = g / g.sum(-1, keepdim=True) * cfg.routed_scaling_factor

    def expert(name, v):
        L = cfg.swiglu_limit
        h = F.silu((v @ W[name + "w1.weight"].T).clamp(max=L)) * (v @ W[name + "w3.weight"].T).clamp(-L, L)
        return h @ W[name + "w2.weight"].T

    y = expert(p + "ffn.shared_experts.", u)
    for t in range(T):
        for j in range(idx.shape[1]):
            y[t] += g[t, j] * expert(f"{p}ffn.experts.{int(idx[t, j])}.", u[t:t + 1])[0]
    return _mhc_post(y, X, post, C)


def test_mtp_block_follows_the_spec_formula(checkpoint_dir) -> None:
    path = checkpoint_dir("tiny", 0)
    cfg = CONFIGS["tiny"]
    model = load(path)
    with open_checkpoint(path) as ck:
        W = {n: ck.tensor(n) for n in ck.names() if n.startswith(("mtp.", "embed.", "head."))}
    ids = torch.randint(2, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(5))
    state = model.new_state()
    streams = model.extend(state, ids[:-1], logits="none", return_streams=True).streams  # X^L at 0..22
    ours = model.mtp_logits(state, streams, ids[1:], start=0)  # predicts tokens 2..24

    p = "mtp.0."
    e = _rms(W["embed.weight"][ids[1:]], W[p + "enorm.weight"])
    Y = _rms(streams, W[p + "hnorm.weight"]) @ W[p + "h_proj.weight"].T + (e @ W[p + "e_proj.weight"].T)[:, None]
    Y = _dense_swa_block(W, p, Y, cfg)
    mu = _rms(Y.flatten(1)) @ W[p + "hc_head_fn"].T
    pre = torch.sigmoid(mu * W[p + "hc_head_scale"] + W[p + "hc_head_base"]) + 1e-6
    expected = _rms((pre[..., None] * Y).sum(1), W[p + "norm.weight"]) @ W["head.weight"].T
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_mtp_incremental_equals_one_shot(checkpoint_dir) -> None:
    model = load(checkpoint_dir("tiny", 0))
    ids = torch.randint(2, 512, (30,), generator=torch.Generator().manual_seed(6))
    state = model.new_state()
    streams = model.extend(state, ids[:-1], logits="none", return_streams=True).streams
    whole = model.mtp_logits(state, streams, ids[1:], start=0)
    state = model.new_state()
    parts = []
    for s, e in ((0, 11), (11, 12), (12, 29)):
        streams = model.extend(state, ids[s:e], logits="none", return_streams=True).streams
        parts.append(model.mtp_logits(state, streams, ids[s + 1:e + 1], start=s))
    torch.testing.assert_close(torch.cat(parts), whole, atol=5e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Reference precision: the reference's low-precision steps are really applied
# ---------------------------------------------------------------------------------------------


def test_reference_mode_stores_kv_in_native_formats(checkpoint_dir) -> None:
    model = load(checkpoint_dir("tiny", 0), precision="reference")
    state = model.new_state()
    out = model.extend(state, torch.randint(2, 512, (45,), generator=torch.Generator().manual_seed(1)), logits="all")
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    nope = CONFIGS["tiny"].head_dim - CONFIGS["tiny"].rope_head_dim
    for st in state.layers:
        assert st.window.dtype == torch.bfloat16
        kv = [st.window] + ([st.compressor.entries.dense()] if st.compressor else [])
        for t in kv:  # FP8 e4m3 per 64 on the non-rope dims: rounding again changes nothing
            assert t.shape[0] > 0
            torch.testing.assert_close(fp8_sim(t[:, :nope], 64), t[:, :nope], atol=0, rtol=0)
        if st.indexer is not None:  # FP4 e2m1 per 32 (after the Hadamard rotation)
            keys = st.indexer.entries.dense()
            torch.testing.assert_close(fp4_sim(keys, 32), keys, atol=0, rtol=0)


def test_reference_linear_quantizes_activations_to_fp8() -> None:
    torch.manual_seed(0)
    layer = QLinear(256, 256, exact=False)
    layer.weight = torch.randn(256, 256).to(torch.bfloat16)
    x = torch.randn(3, 256).to(torch.bfloat16)
    expected = (fp8_sim(x.float(), 128) @ layer.weight.float().T).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert not torch.equal(layer(x), (x.float() @ layer.weight.float().T).to(torch.bfloat16))


def test_reference_mode_keeps_experts_in_checkpoint_format(checkpoint_dir) -> None:
    model = load(checkpoint_dir("tiny", 0), precision="reference")
    expert = model.layers[1].ffn.experts[0].w1
    assert expert.fmt == "fp4" and expert.weight.dtype == torch.int8
    assert load(checkpoint_dir("tiny", 0)).layers[1].ffn.experts[0].w1.fmt == "dense"


# ---------------------------------------------------------------------------------------------
# Size, memory, loading
# ---------------------------------------------------------------------------------------------


# Pro builds 70K expert modules on the meta device (~15 s); Flash runs the same code by default
@pytest.mark.parametrize("name,total,with_mtp", [("flash", 284.33e9, 290.94e9),
                                                 pytest.param("pro", 1573.00e9, 1598.84e9, marks=pytest.mark.slow)])
def test_parameter_counts_on_meta_device(name: str, total: float, with_mtp: float) -> None:
    config = released_config(name)
    with torch.device("meta"):
        model = Model(config, precision="reference")
    assert model.parameter_count() == pytest.approx(total, abs=0.005e9)
    assert model.parameter_count(include_mtp=True) == pytest.approx(with_mtp, abs=0.005e9)
    assert {n for n in model.state_dict() if not n.endswith(".scale")} == set(logical_names(inventory(config)))


class _PeakTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


def test_attention_memory_grows_linearly(checkpoint_dir) -> None:
    """No [S, S] tensor: the largest intermediate grows like S, not S² (dense would be 4x here)."""
    model = load(checkpoint_dir("tiny", 0))
    peaks = []
    for S in (1024, 2048):
        state = model.new_state()
        ids = torch.randint(2, 512, (S,), generator=torch.Generator().manual_seed(S))
        with _PeakTensor() as probe:
            model.extend(state, ids, logits="none")
        peaks.append(probe.peak)
    assert peaks[1] / peaks[0] < 2.2, peaks
    assert peaks[1] < 2048 * 2048, peaks


def test_picked_scores_equal_the_gathered_dot_products() -> None:
    """The CPU's sampled GEMM against the gather the GPU path uses: repeated picks (a query
    with fewer causal entries than k repeats entry 0) and a single pick included."""
    g = torch.Generator().manual_seed(0)
    for T, H, D, N, k in ((5, 3, 16, 40, 7), (1, 2, 8, 1, 1), (9, 4, 32, 100, 30)):
        q, entries = torch.randn(T, H, D, generator=g), torch.randn(N, D, generator=g)
        picks = torch.randint(0, N, (T, k), generator=g)
        picks[0, k // 2:] = 0
        expected = torch.einsum("thd,tkd->thk", q, entries[picks])
        bags = picks[:, None, :].expand(-1, H, -1).reshape(T * H, k)
        torch.testing.assert_close(_picked_scores(q, entries, bags), expected, atol=1e-5, rtol=1e-5)


def test_offloaded_experts_give_identical_logits(checkpoint_dir) -> None:
    path = checkpoint_dir("tiny", 0)
    ids = torch.randint(2, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    a = load(path, precision="reference")(ids)
    b = load(path, precision="reference", offload_experts=True)(ids)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_inputs_give_clear_errors(checkpoint_dir, tmp_path) -> None:
    model = load(checkpoint_dir("tiny", 0))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="precision"):
        load(CONFIGS["tiny"], precision="fp16")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load(tmp_path / "nowhere")
