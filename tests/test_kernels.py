"""Triton kernels against the torch code they replace (runtime/kernels, docs/kernels.md).

Everything runs on the CPU under Triton's interpreter: each kernel is compared with the
torch method of its dispatch point on the same inputs (`kernels.use("triton", only=...)`
switches one kernel and leaves the torch code around it unchanged), then the whole model
with every kernel on. The interpreter pays per program and per op, so shapes are small
and blocks large; the shapes still cross masking, partial blocks, chunk boundaries of the
cache, compression windows split between chunks and the sequence start.

Tolerances: fp32 (exact precision) to ~1e-5; bf16 results (reference precision) to two
bf16 ulps of the output's scale, since summation orders differ.

`pytest -m gpu` runs this module again in a subprocess, natively on a CUDA device.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("V4AGENT_KERNEL_TEST_DEVICE", "cpu"))
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from runtime import kernels, load  # noqa: E402
from runtime.config import SWA, tiny_config  # noqa: E402
from runtime.kvstore import RowCodec, Rows  # noqa: E402
from runtime.model import sinkhorn  # noqa: E402
from tests.conftest import CONFIGS  # noqa: E402

ALL = kernels.KERNELS
BF16_ULP = 2.0 ** -8  # relative spacing of bf16 values


def _model(name: str, precision: str, **overrides):
    config = CONFIGS[name] if not overrides else tiny_config(vocab_size=512, **overrides)
    return load(config, precision=precision, device=DEVICE)


def _randn(*shape: int) -> torch.Tensor:
    """Seeded the same way whatever the device."""
    return torch.randn(*shape).to(DEVICE)


def _close_bf16(got: torch.Tensor, want: torch.Tensor, ulps: float = 2) -> None:
    """Equal up to `ulps` bf16 ulps of the largest magnitude (summation orders differ)."""
    scale = want.float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=ulps * BF16_ULP * float(scale))


def _close(got: torch.Tensor, want: torch.Tensor, precision: str) -> None:
    if precision == "exact":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        _close_bf16(got, want)


# --------------------------------------------------------------------------------------------------
# the switch
# --------------------------------------------------------------------------------------------------


def test_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("V4AGENT_KERNELS", raising=False)
    assert not kernels.enabled(cpu, "attention")  # default: torch (kernels are opt-in)
    monkeypatch.setenv("V4AGENT_KERNELS", "triton")
    assert kernels.enabled(cpu, "attention")  # under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.enabled(cpu, "attention")
    monkeypatch.setenv("V4AGENT_KERNELS", "torch")
    assert not kernels.enabled(cpu, "attention")
    monkeypatch.setenv("V4AGENT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="V4AGENT_KERNELS"):
        kernels.backend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.use("triton", only=("moe",)):
        assert kernels.enabled(cpu, "moe") and not kernels.enabled(cpu, "attention")
        with kernels.use("torch"):
            assert not kernels.enabled(cpu, "moe")
        assert kernels.enabled(cpu, "moe")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.enabled(cpu, "softmax")
    with pytest.raises(ValueError):
        with kernels.use("triton", only=("softmax",)):
            pass


def test_cpu_runtime_never_imports_triton():
    """Default CPU use must not touch triton (no '0 active drivers'); asking for it says how."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "V4AGENT_KERNELS")}
    script = ("import sys, torch, runtime; from tests.conftest import CONFIGS\n"
              "m = runtime.load(CONFIGS['tiny'], precision='reference')\n"
              "m(torch.arange(2, 30)[None])\n"
              "assert 'triton' not in sys.modules, 'triton imported'\n"
              "import os; os.environ['V4AGENT_KERNELS'] = 'triton'\n"
              "try:\n    m(torch.arange(2, 30)[None])\nexcept RuntimeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert "TRITON_INTERPRET=1" in done.stdout


# --------------------------------------------------------------------------------------------------
# mHC Sinkhorn
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 3])  # 3: lanes padded to a power of two
def test_sinkhorn(n):
    torch.manual_seed(0)
    logits = _randn(67, n, n) * 4  # 67: a partial block of tokens
    want = sinkhorn(logits, 20, 1e-6)
    with kernels.use("triton", only=("sinkhorn",)):
        got = sinkhorn(logits, 20, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Compressor pooling + norm + RoPE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_compressor(precision):
    """CSA (overlapping), HCA (m = 128) and the indexer's compressor, fed in chunks that split
    windows (open windows and the previous window's halves carried in the state)."""
    model = _model("released_rates", precision)
    csa, hca = model.layers[0].attn, model.layers[1].attn
    dtype = model.act_dtype
    torch.manual_seed(1)
    x = _randn(300, model.config.hidden_size).to(dtype)
    cuts = [0, 3, 10, 11, 140, 297, 300]
    for comp, kind in ((csa.compressor, "main"), (csa.indexer.compressor, "index"), (hca.compressor, "main")):
        results = []
        for backend in ("torch", "triton"):
            st = comp.new_state(DEVICE, dtype, RowCodec("fp32", kind, 64))  # an exact cache
            with kernels.use(backend, only=("compressor",)):
                for s, e in zip(cuts[:-1], cuts[1:]):
                    comp(x[s:e], s, st)
            results.append(st.entries.dense())
        assert results[0].shape[0] == 300 // comp.ratio
        _close(results[1], results[0], precision)


# --------------------------------------------------------------------------------------------------
# Sparse attention
# --------------------------------------------------------------------------------------------------


def _cache(attn, dtype, fmt: str, n: int, sizes=(5, 17)) -> Rows:
    """n random compressed entries in `fmt`, stored as several chunks (the last the largest)."""
    codec = RowCodec(fmt, "main", attn.head_dim - attn.nope)
    rows = _randn(n, attn.head_dim).to(dtype)
    bounds = [0, *[b for b in sizes if b < n], n]
    chunks = tuple(codec.encode(rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    return Rows(codec, attn.head_dim, dtype, DEVICE, chunks)


def _attention_inputs(attn, dtype, fmt, start: int, T: int, picks: str):
    torch.manual_seed(start + T)
    positions = torch.arange(start, start + T, device=DEVICE)
    q = _randn(T, attn.n_heads, attn.head_dim).to(dtype)
    keys = _randn(min(start, attn.window - 1) + T, attn.head_dim).to(dtype)
    if attn.kind == SWA:
        return q, positions, keys, None, None
    n = (start + T) // attn.ratio
    rows = _cache(attn, dtype, fmt, n)
    if picks == "all":
        return q, positions, keys, rows, None
    k = 8 if T > 1 else 150  # decode: enough picks to split the list over programs
    visible = ((positions + 1) // attn.ratio).tolist()
    chosen = torch.full((T, k), -1)
    for t in range(T):  # distinct causal entries; fewer than k early in the sequence (rest -1)
        pick = torch.randperm(visible[t])[:k]
        chosen[t, :pick.numel()] = pick
    return q, positions, keys, rows, chosen[:, torch.randperm(k)].to(DEVICE)


ATTENTION_CASES = [  # layer, picks, start, T: decode and prefill, with and without history
    (2, "all", 700, 1),  # SWA decode
    (2, "all", 0, 45),  # SWA prefill from the sequence start (window shorter than W)
    (0, "top-k", 900, 1),  # CSA decode with the indexer's picks
    (0, "top-k", 20, 40),  # CSA prefill: early queries see fewer than k entries
    (0, "all", 30, 7),  # CSA while every causal entry is read
    (1, "all", 40000, 1),  # HCA decode
    (1, "all", 250, 20),  # HCA prefill crossing an entry boundary (256)
]


@pytest.mark.parametrize("precision,fmt", [("reference", "native"), ("exact", "fp32")])
@pytest.mark.parametrize("layer,picks,start,T", ATTENTION_CASES)
def test_attention(precision, fmt, layer, picks, start, T, request):
    model = request.getfixturevalue("_released_" + precision)
    attn = model.layers[layer].attn
    args = _attention_inputs(attn, model.act_dtype, fmt, start, T, picks)
    want = attn._attend_chunk(*args)
    got = kernels.attention.sparse_attention(attn, *args)
    _close(got, want, precision)
    if args[3] is not None and T == 1:  # decode: the compressed list split over programs, then merged
        _close(kernels.attention.sparse_attention(attn, *args, splits=3), want, precision)


@pytest.mark.parametrize("layer,picks,start,T", [ATTENTION_CASES[2], ATTENTION_CASES[6]])
def test_attention_bf16_cache(layer, picks, start, T, _released_reference):
    """Reference precision with the reference code's own cache format (bf16 rows)."""
    attn = _released_reference.layers[layer].attn
    args = _attention_inputs(attn, torch.bfloat16, "bf16", start, T, picks)
    _close_bf16(kernels.attention.sparse_attention(attn, *args), attn._attend_chunk(*args))


@pytest.fixture(scope="module")
def _released_reference():
    return _model("released_rates", "reference")


@pytest.fixture(scope="module")
def _released_exact():
    return _model("released_rates", "exact")


def test_attention_reads_views_of_rewound_cache(_released_reference):
    """A rewound session's cache ends in a view of a chunk (the first rows of a longer one)."""
    attn = _released_reference.layers[1].attn
    q, positions, keys, _, _ = _attention_inputs(attn, torch.bfloat16, "native", 11 * 128 - 1, 1, "all")
    rows = _cache(attn, torch.bfloat16, "native", 14, sizes=(5, 9)).prefix(11)
    assert rows.chunks[-1][0].shape[0] == 2 and rows.chunks[-1][0]._base is not None
    _close_bf16(kernels.attention.sparse_attention(attn, q, positions, keys, rows, None),
                attn._attend_chunk(q, positions, keys, rows, None))


# --------------------------------------------------------------------------------------------------
# Lightning Indexer top-k
# --------------------------------------------------------------------------------------------------


def _index_rows(indexer, keys: torch.Tensor, fmt: str, sizes=(9, 40)) -> Rows:
    codec = RowCodec(fmt, "index", 64)
    bounds = [0, *[b for b in sizes if b < keys.shape[0]], keys.shape[0]]
    chunks = tuple(codec.encode(keys[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    return Rows(codec, indexer.head_dim, keys.dtype, DEVICE, chunks)


def test_indexer_tie_rule(_released_reference):
    """Scores exact in any summation order (dyadic values) with many exact ties, most of them
    the ReLU's zeros: the kernel picks exactly the entries of the documented rule (higher score
    first, lower index among equals), best first."""
    indexer = _released_reference.layers[0].attn.indexer
    torch.manual_seed(2)
    T, n, k = 9, 90, 16
    q = torch.randint(-2, 3, (T, indexer.n_heads, indexer.head_dim)).float().to(DEVICE)
    keys = torch.randint(-1, 2, (n, indexer.head_dim)).float() * (torch.rand(n, 1) < 0.3)  # many all-zero rows
    keys[10] = keys[50]  # equal non-zero scores
    keys = keys.to(DEVICE)
    weights = torch.tensor([1.0, 0.5, -0.25, 2.0], device=DEVICE)[None].expand(T, -1).contiguous()
    positions = torch.arange(300, 300 + T, device=DEVICE) + 4 * torch.arange(T, device=DEVICE)
    rows = _index_rows(indexer, keys.bfloat16(), "native")
    configured, indexer.topk = indexer.topk, k
    try:
        want = indexer._select(q.bfloat16(), weights, positions, rows)
        for splits in (1, 3):
            got = kernels.indexer.select(indexer, q.bfloat16(), weights, positions, rows, splits=splits)
            assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    finally:
        indexer.topk = configured
    scores = torch.einsum("th,thn->tn", weights, torch.einsum("thd,nd->thn", q, keys).relu())
    visible = ((positions + 1) // indexer.ratio).tolist()
    order = [sorted(range(visible[t]), key=lambda j: (-scores[t, j].item(), j))[:k] for t in range(T)]
    assert got.tolist() == order


@pytest.mark.parametrize("precision,fmt", [("reference", "native"), ("reference", "bf16"), ("exact", "fp32")])
def test_indexer(precision, fmt, request):
    """Random inputs: the same picks up to rounding (equal multisets of reference scores)."""
    model = request.getfixturevalue("_released_" + precision)
    indexer = model.layers[0].attn.indexer
    torch.manual_seed(3)
    T, n = 12, 100
    dtype = model.act_dtype
    q = indexer.round_keys(_randn(T, indexer.n_heads, indexer.head_dim).to(dtype))
    weights = _randn(T, indexer.n_heads)
    positions = torch.arange(400 - T, 400, device=DEVICE)
    rows = _index_rows(indexer, indexer.round_keys(_randn(n, indexer.head_dim).to(dtype)), fmt)
    want = indexer._select(q, weights, positions, rows)
    scores = torch.einsum("th,thn->tn", weights.double(),
                          torch.einsum("thd,nd->thn", q.double(), rows.dense().double()).relu())
    for splits in (None, 2):
        got = kernels.indexer.select(indexer, q, weights, positions, rows, splits=splits)
        for t in range(T):
            torch.testing.assert_close(scores[t, got[t]].sort().values, scores[t, want[t]].sort().values,
                                       rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Routed experts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision,expert_dtype", [("reference", "fp4"), ("reference", "fp8"), ("exact", "fp4")])
@pytest.mark.parametrize("T", [1, 50])
def test_moe(precision, expert_dtype, T):
    model = _model("tiny", precision, expert_dtype=expert_dtype)
    torch.manual_seed(4)
    for layer in (0, 1):  # hash routing, learned routing
        moe = model.layers[layer].ffn
        u = _randn(T, model.config.hidden_size).to(model.act_dtype)
        ids = torch.randint(0, 512, (T,)).to(DEVICE)
        want = moe(u, ids)
        with kernels.use("triton", only=("moe",)):
            got = moe(u, ids)
        _close(got, want, precision)


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------


def _logits(model, ids: torch.Tensor, cuts) -> torch.Tensor:
    """Chunked prefill then decode steps, as a session runs it."""
    st = model.new_state()
    return torch.cat([model.extend(st, ids[a:b], logits="all").logits for a, b in zip(cuts[:-1], cuts[1:])])


def test_model_exact_logits():
    """Every kernel on: fp32 logits equal to the torch path's (the parity tolerance, 1e-4)."""
    model = _model("tiny", "exact")
    ids = torch.randint(2, 512, (40,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cuts = [0, 17, 30, 37, 38, 39, 40]
    want = _logits(model, ids, cuts)
    with kernels.use("triton"):
        got = _logits(model, ids, cuts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_model_exact_logits_released_rates():
    model = _model("released_rates", "exact")
    ids = torch.randint(2, 512, (300,), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    cuts = [0, 133, 290, 299, 300]
    want = _logits(model, ids, cuts)
    with kernels.use("triton"):
        got = _logits(model, ids, cuts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_model_reference_in_situ(monkeypatch, one_thread):
    """Reference precision, every kernel on: each kernel call, on the inputs the run gives it,
    matches its torch method; the logits move no more than the torch path's own rounding noise.

    Logits cannot be held to a bf16 tolerance here: a one-ulp difference anywhere (even in
    Sinkhorn's fp32 output) sometimes flips a bf16 rounding of the residual streams, FP8
    activation rounding turns that into a step of an FP8 value, and routing and top-k are
    discrete. So the bound is measured: the torch path itself, with one fp32 ulp of random
    noise on the Sinkhorn matrices, moves the logits by ~10% (relative norm) on this random
    tiny model (docs/kernels.md). One thread: how many cores the machine has changes torch's
    summation order, and with it which roundings flip (on 2 threads the floor measured 5%)."""
    import runtime.model as rm

    seen: dict[str, int] = {}

    def shadow(name, kernel, reference, compare):
        def run(*args):
            copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # MoE adds in place
            got = kernel(*args)
            with kernels.use("torch"):
                compare(got, reference(*copies), copies)
            seen[name] = seen.get(name, 0) + 1
            return got
        return run

    def picks_equivalent(got, want, args):
        indexer, q, weights, positions, rows = args
        scores = torch.einsum("th,thn->tn", weights.double(),
                              torch.einsum("thd,nd->thn", q.double(), rows.dense().double()).relu())
        for t in range(got.shape[0]):
            torch.testing.assert_close(scores[t, got[t]].sort().values, scores[t, want[t]].sort().values,
                                       rtol=1e-5, atol=1e-6)

    bf16 = lambda got, want, args: _close_bf16(got, want)  # noqa: E731
    monkeypatch.setattr(kernels.attention, "sparse_attention",
                        shadow("attention", kernels.attention.sparse_attention, rm.Attention._attend_chunk, bf16))
    monkeypatch.setattr(kernels.indexer, "select",
                        shadow("indexer", kernels.indexer.select, rm.Indexer._select, picks_equivalent))
    monkeypatch.setattr(kernels.compressor, "pool", shadow("compressor", kernels.compressor.pool,
                                                           rm.Compressor._pool, bf16))
    monkeypatch.setattr(kernels.moe, "add_routed", shadow("moe", kernels.moe.add_routed, rm.MoE._add_routed, bf16))
    monkeypatch.setattr(kernels.sinkhorn, "sinkhorn", shadow(
        "sinkhorn", kernels.sinkhorn.sinkhorn, rm.sinkhorn,
        lambda got, want, args: torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)))

    model = _model("tiny", "reference")
    ids = torch.randint(2, 512, (40,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    cuts = [0, 17, 30, 37, 38, 39, 40]
    want = _logits(model, ids, cuts)
    with kernels.use("triton"):
        got = _logits(model, ids, cuts)
    assert set(seen) == set(ALL), seen

    def relative(logits):
        return float((logits - want).norm() / want.norm())

    noise = torch.Generator().manual_seed(0)
    exact_sinkhorn = rm.sinkhorn
    monkeypatch.setattr(rm, "sinkhorn", lambda *a: exact_sinkhorn(*a) * (
        1 + 2.0 ** -23 * torch.randint(-1, 2, a[0].shape, generator=noise).to(DEVICE)))
    floor = max(relative(_logits(model, ids, cuts)) for _ in range(3))
    assert 0 < relative(got) < 2 * floor, (relative(got), floor)


@pytest.mark.gpu
def test_native_gpu():
    """This module again in a fresh process, its tensors and kernels on the GPU (no interpreter)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"V4AGENT_KERNEL_TEST_DEVICE": "cuda"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                           os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
