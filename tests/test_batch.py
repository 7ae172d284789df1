"""Several sequences in one forward (`Model.extend_batch`, `Model.mtp_logits_batch`).

The batched rows go through GEMMs with more rows than each sequence alone, which round
differently (docs/runtime.md, "What is exact"): in exact precision a batched sequence
agrees with its solo run to fp32 rounding and greedy picks the same tokens; in reference
precision bf16 amplifies that rounding, and batched decoding is only reproducible, not
equal to solo decoding. Positions and row counts are always exact.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import load
from runtime.model import SequenceState
from tests.conftest import tokens

TOL = 1e-4  # measured up to 5.4e-6 (greedy, both tiny configs); the same bound as other chunkings


@pytest.fixture(scope="module")
def released(checkpoint_dir):
    """The released-rates schedule (CSA 4, HCA 128, window 128), both precisions."""
    path = checkpoint_dir("released_rates", 0)
    return {"exact": load(path), "reference": load(path, precision="reference")}


def state_tensors(state: SequenceState) -> dict[str, torch.Tensor]:
    """Every tensor of a state by a name, row counts included (compared exactly)."""
    out = {"position": torch.tensor(state.position), "mtp_position": torch.tensor(state.mtp_position)}
    for tag, layers in (("layer", state.layers), ("mtp", state.mtp)):
        for i, ls in enumerate(layers):
            out[f"{tag}{i}.window"] = ls.window
            for kind, c in (("compressor", ls.compressor), ("indexer", ls.indexer)):
                if c is None:
                    continue
                out[f"{tag}{i}.{kind}.count"] = torch.tensor(c.entries.count)
                out[f"{tag}{i}.{kind}.entries"] = c.entries.dense()
                out[f"{tag}{i}.{kind}.open_kv"], out[f"{tag}{i}.{kind}.open_gate"] = c.open_kv, c.open_gate
                if c.prev_kv is not None:
                    out[f"{tag}{i}.{kind}.prev_kv"], out[f"{tag}{i}.{kind}.prev_gate"] = c.prev_kv, c.prev_gate
    return out


def assert_states_close(a: SequenceState, b: SequenceState, tol: float | None = TOL) -> None:
    """Same names, shapes, dtypes, positions and row counts; values within `tol` (None: bit-identical)."""
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        x, y = ta[name], tb[name]
        assert (x.shape, x.dtype) == (y.shape, y.dtype), name
        if tol is None or x.dtype == torch.long or not x.numel():
            assert torch.equal(x, y), name
        else:  # -inf gate logits (the missing window before the first) must match as such
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol, msg=name)


def greedy_alone(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    state = model.new_state()
    logits = [model.extend(state, torch.tensor(prompt)).logits[0]]
    ids = []
    for _ in range(steps):
        ids.append(int(logits[-1].argmax()))
        logits.append(model.extend(state, torch.tensor(ids[-1:])).logits[0])
    return ids, logits


def greedy_batched(model, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """The prompts prefilled in one ragged forward, then decoded together one token per step."""
    states = [model.new_state() for _ in prompts]
    outs = model.extend_batch(states, [torch.tensor(p) for p in prompts])
    logits = [[o.logits[0]] for o in outs]
    ids: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        for i, seq in enumerate(logits):
            ids[i].append(int(seq[-1].argmax()))
        outs = model.extend_batch(states, [torch.tensor(seq[-1:]) for seq in ids])
        for seq, out in zip(logits, outs):
            assert out.logits.shape == (1, model.config.vocab_size)
            seq.append(out.logits[0])
    for state, prompt in zip(states, prompts):
        assert state.position == len(prompt) + steps
    return ids, logits


# prompt lengths: for "tiny" (window 8, CSA 4 with top-4, HCA 8) they cross windows and
# switch on indexer scoring; for "released_rates" two decodes cross the 128 boundary (HCA, window)
CASES = {"tiny": (1, 6, 13, 31, 50), "released_rates": (3, 60, 124, 127)}
STEPS = 8


@pytest.mark.parametrize("config", CASES)
def test_batched_greedy_is_solo_greedy_exact(config, exact, released):
    model = exact if config == "tiny" else released["exact"]
    prompts = [tokens(n, seed=10 + i) for i, n in enumerate(CASES[config])]
    batch_ids, batch_logits = greedy_batched(model, prompts, STEPS)
    for prompt, ids, logits in zip(prompts, batch_ids, batch_logits):
        solo_ids, solo_logits = greedy_alone(model, prompt, STEPS)
        assert ids == solo_ids
        for got, want in zip(logits, solo_logits):
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("config", CASES)
def test_batched_greedy_reference_is_reproducible(config, reference, released):
    """Reference precision: batched decoding is greedy over its own batched calls (replayed on
    fresh states: bit-identical); it is not solo decoding (bf16 amplifies the GEMM rounding)."""
    model = reference if config == "tiny" else released["reference"]
    prompts = [tokens(n, seed=10 + i) for i, n in enumerate(CASES[config])]
    first = greedy_batched(model, prompts, STEPS)
    again = greedy_batched(model, prompts, STEPS)
    assert first[0] == again[0]
    for a, b in zip(first[1], again[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_ragged_step_is_separate_steps(precision, exact, reference):
    """One forward mixing a prefill chunk with 1-token decodes (and a 2-token verify) leaves each
    sequence where running it alone does: positions and row counts exact, values to rounding
    (exact precision); the same batch on copies of the states is bit-identical."""
    model = exact if precision == "exact" else reference
    states = [model.new_state() for _ in range(4)]
    for i, n in enumerate((30, 7, 19, 0)):
        if n:
            model.extend(states[i], torch.tensor(tokens(n, seed=20 + i)))
    chunks = [torch.tensor(tokens(n, seed=30 + i)) for i, n in enumerate((1, 25, 2, 12))]
    copies = [s.copy() for s in states]
    solo = [s.copy() for s in states]
    outs = model.extend_batch(states, chunks, logits="all", return_streams=True)
    again = model.extend_batch(copies, chunks, logits="all", return_streams=True)
    for i, (state, chunk) in enumerate(zip(solo, chunks)):
        want = model.extend(state, chunk, logits="all", return_streams=True)
        assert outs[i].logits.shape == want.logits.shape and outs[i].streams.shape == want.streams.shape
        assert torch.equal(again[i].logits, outs[i].logits) and torch.equal(again[i].streams, outs[i].streams)
        assert_states_close(copies[i], states[i], tol=None)
        if precision == "exact":
            torch.testing.assert_close(outs[i].logits, want.logits, rtol=0, atol=TOL)
            assert_states_close(states[i], state)
        else:  # bf16 values may differ; the structure may not
            assert {k: (v.shape, v.dtype) for k, v in state_tensors(states[i]).items()} == \
                   {k: (v.shape, v.dtype) for k, v in state_tensors(state).items()}
            assert (states[i].position, states[i].mtp_position) == (state.position, state.mtp_position)


def test_logits_mode_per_sequence(exact):
    """A verify's "all" beside a prefill chunk's "last" and a "none" in one forward: each sequence
    gets the rows its mode asks for, as a batch with that mode for everyone gives them."""
    chunks = [torch.tensor(tokens(n, seed=60 + i)) for i, n in enumerate((2, 11, 1, 5))]
    modes = ["all", "last", "none", "all"]
    mixed = exact.extend_batch([exact.new_state() for _ in chunks], chunks, logits=modes)
    every = exact.extend_batch([exact.new_state() for _ in chunks], chunks, logits="all")
    for mode, got, full in zip(modes, mixed, every):
        if mode == "none":
            assert got.logits is None
        else:
            want = full.logits if mode == "all" else full.logits[-1:]
            assert got.logits.shape == want.shape
            torch.testing.assert_close(got.logits, want, rtol=0, atol=TOL)


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_random_interleavings(exact, data):
    """Sequences join at random steps, take random chunk sizes and leave when done: each one's
    logits and final state match running its own chunks alone (exact precision)."""
    n = data.draw(st.integers(2, 4), label="sequences")
    joins = [data.draw(st.integers(0, 3), label=f"join{i}") for i in range(n)]
    lengths = [data.draw(st.integers(1, 40), label=f"length{i}") for i in range(n)]
    seqs = [tokens(length, seed=40 + i) for i, length in enumerate(lengths)]
    states = [exact.new_state() for _ in range(n)]
    chunks: list[list[int]] = [[] for _ in range(n)]
    logits: list[list[torch.Tensor]] = [[] for _ in range(n)]
    step = 0
    while any(states[i].position < lengths[i] for i in range(n)):
        active = [i for i in range(n) if joins[i] <= step and states[i].position < lengths[i]]
        step += 1
        if not active:
            continue
        sizes = [min(data.draw(st.sampled_from((1, 1, 1, 2, 3, 8, 17))), lengths[i] - states[i].position)
                 for i in active]
        ids = [torch.tensor(seqs[i][states[i].position:states[i].position + k]) for i, k in zip(active, sizes)]
        for i, out in zip(active, exact.extend_batch([states[i] for i in active], ids, logits="all")):
            chunks[i].append(out.logits.shape[0])
            logits[i].append(out.logits)
    for i in range(n):
        solo, at = exact.new_state(), 0
        for k, got in zip(chunks[i], logits[i]):
            want = exact.extend(solo, torch.tensor(seqs[i][at:at + k]), logits="all").logits
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)
            at += k
        assert_states_close(states[i], solo)


def test_mtp_batch_and_batched_verify(exact):
    """Drafts for several sequences in one MTP forward, then their 2-token verifies in one ragged
    forward: each matches its solo computation to rounding, positions exact."""
    prompts = [tokens(n, seed=50 + i) for i, n in enumerate((5, 17, 33))]
    states = [exact.new_state() for _ in prompts]
    outs = exact.extend_batch(states, [torch.tensor(p) for p in prompts], return_streams=True)
    solo = [exact.new_state() for _ in prompts]
    solo_outs = [exact.extend(s, torch.tensor(p), return_streams=True) for s, p in zip(solo, prompts)]
    # the MTP block catches up on the prompt (it lags by one), as a session does
    feeds = [(o.streams[:-1], torch.tensor(p[1:])) for o, p in zip(outs, prompts)]
    got = exact.mtp_logits_batch(states, [f[0] for f in feeds], [f[1] for f in feeds], [0] * len(prompts))
    for i, (s, o, p) in enumerate(zip(solo, solo_outs, prompts)):
        want = exact.mtp_logits(s, o.streams[:-1], torch.tensor(p[1:]), start=0)
        torch.testing.assert_close(got[i], want, rtol=0, atol=TOL)
        assert states[i].mtp_position == s.mtp_position == len(p) - 1
    # draft from each last position: next token t+1 is the main model's greedy choice
    nxt = [int(o.logits[0].argmax()) for o in outs]
    drafts = exact.mtp_logits_batch(states, [o.streams[-1:] for o in outs], [torch.tensor([t]) for t in nxt],
                                     [s.mtp_position for s in states])
    pairs = [torch.tensor([t, int(d[0].argmax())]) for t, d in zip(nxt, drafts)]
    verify = exact.extend_batch(states, pairs, logits="all", return_streams=True)
    for i, (s, o) in enumerate(zip(solo, solo_outs)):
        want_draft = exact.mtp_logits(s, o.streams[-1:], torch.tensor([nxt[i]]), start=s.mtp_position)
        torch.testing.assert_close(drafts[i], want_draft, rtol=0, atol=TOL)
        want = exact.extend(s, pairs[i], logits="all", return_streams=True)
        torch.testing.assert_close(verify[i].logits, want.logits, rtol=0, atol=TOL)
        torch.testing.assert_close(verify[i].streams, want.streams, rtol=0, atol=TOL)
        assert_states_close(states[i], s)


def test_bad_batches_are_refused_and_change_nothing(exact):
    a, b = exact.new_state(), exact.new_state()
    exact.extend(a, torch.tensor(tokens(3)))
    one = torch.tensor([5])
    bad = [
        (([a, b], [one]), "one ids tensor per state"),
        (([], []), "at least one"),
        (([a, a], [one, one]), "appears twice"),
        (([a, b], [one, torch.tensor([], dtype=torch.long)]), "non-empty 1-d"),
        (([a, b], [one, torch.tensor([[5]])]), "non-empty 1-d"),
    ]
    for (states, ids), message in bad:
        with pytest.raises(ValueError, match=message):
            exact.extend_batch(states, ids)
    with pytest.raises(ValueError, match="logits must be"):
        exact.extend_batch([a, b], [one, one], logits="first")
    with pytest.raises(ValueError, match="1 logits modes for 2 sequences"):
        exact.extend_batch([a, b], [one, one], logits=["all"])
    with pytest.raises(ValueError, match="token ids must lie"):
        exact.extend_batch([a, b], [one, torch.tensor([exact.config.vocab_size])])
    with pytest.raises(ValueError, match="continues at position 0, not 1"):
        exact.mtp_logits_batch([a, b], [torch.zeros(1, 4, 256)] * 2, [one, one], [0, 1])
    assert (a.position, b.position, a.mtp_position, b.mtp_position) == (3, 0, 0, 0)


def aten_ops(fn) -> Counter:
    """How many times `fn()` calls each aten operation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return count.calls


def test_decoders_attend_and_dispatch_experts_once_per_layer(exact):
    """A step of 8 decoders runs each layer's attention core and routed-expert scatter once for
    all of them (one padded softmax, one index_add_), not once per sequence or expert: that
    per-operation cost is what kept 8 decoders from batching (docs/runtime.md)."""
    prompts = [tokens(n, seed=70 + i) for i, n in enumerate((3, 9, 17, 30, 40, 12, 5, 26))]
    states = [exact.new_state() for _ in prompts]
    outs = exact.extend_batch(states, [torch.tensor(p) for p in prompts])
    nxt = [torch.tensor([int(o.logits[0].argmax())]) for o in outs]
    one = aten_ops(lambda: exact.extend_batch([states[0].copy()], nxt[:1]))
    eight = aten_ops(lambda: exact.extend_batch([s.copy() for s in states], nxt))
    layers = exact.config.num_hidden_layers
    assert one["aten.exp"] == eight["aten.exp"] == 2 * layers  # the softmax and its sink, per layer
    assert eight["aten.index_add_"] == layers  # every routed expert's rows in one scatter per layer


def test_decode_throughput_reports_engine_and_model_ratios(exact):
    """The decode figures of `v4agent bench serve` on the tiny model: through the engine and the
    model alone, measured by one function; JSON-able, each ratio the ratio of its two rates."""
    import json

    from runtime.bench_batch import decode_throughput

    report = json.loads(json.dumps(decode_throughput(exact, batch=2, context=5, steps=1, runs=1)))
    for prefix in ("", "model_"):
        one, many = report[f"{prefix}decode_tokens_per_s_1"], report[f"{prefix}decode_tokens_per_s_2"]
        assert one > 0 and many > 0
        assert report[f"{prefix}throughput_2_over_1"] == pytest.approx(many / one, rel=0.01)


def test_session_feeds_the_mtp_block_without_the_head(exact):
    """A session keeps the MTP window current at every step; the draft logits of that feed are
    never read, so it skips the head (the widest GEMM, once per sequence and step in the
    engine): the head's weight is read once per decode step, and the MTP state comes out
    bit-identical to a feed that computes the logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from runtime.session import Session

    vocab, head = exact.config.vocab_size, exact.head.weight.data_ptr()

    class HeadProducts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func.overloadpacket) == "aten.linear" and args[1].data_ptr() == head:
                HeadProducts.count += 1
            return out

    prompt = tokens(12, seed=80)
    session = Session(exact)
    session.extend(prompt)
    with HeadProducts():
        session.extend([int(session.last_logits.argmax())])
    assert HeadProducts.count == 1
    a, b = exact.new_state(), exact.new_state()
    for st in (a, b):
        out = exact.extend(st, torch.tensor(prompt), return_streams=True)
    got = exact.mtp_logits(a, out.streams[:-1], torch.tensor(prompt[1:]), start=0, logits=False)
    want = exact.mtp_logits(b, out.streams[:-1], torch.tensor(prompt[1:]), start=0)
    assert got is None and want.shape == (len(prompt) - 1, vocab)
    assert_states_close(a, b, tol=None)


def test_the_engines_decoders_feed_the_mtp_block_together(exact, monkeypatch):
    """After a step of several decoders, the engine runs their MTP feeds (which keep each
    window current for speculation) as one forward of the block, not one per sequence: per
    sequence, the feed was a quarter of an 8-decoder step (docs/runtime.md)."""
    from runtime.serve.engine import Engine, GenerationRequest, Token

    engine = Engine(exact, max_running=4)
    handles = [engine.submit(GenerationRequest(tokens(n, seed=90 + n), 50)) for n in (5, 11, 17, 23)]
    started = [False] * 4
    while not all(started):  # the prefills, one chunk per step, up to every first token
        engine.step()
        started = [s or any(isinstance(e, Token) for e in h.ready()) for s, h in zip(started, handles)]
    block, calls = exact.mtp[0], []
    forward = block.forward
    monkeypatch.setattr(block, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    for _ in range(3):
        engine.step()
    assert len(calls) == 3
    for h in handles:
        h.cancel()
    engine.step()
