"""The runtime's exactness guarantees, asserted as docs/runtime.md and docs/sessions.md state them.

The same chunks give bit-identical results however the state was reached (extend after
extend, fork, rewind and replay, a persisted prefix), in both precisions. Other chunkings
round differently: in exact precision the logits agree to fp32 rounding unless a top-k pick
is at a near-tie, which the rounding then flips; in reference precision bf16 rounding makes
1-token decoding and prefill differ outright. Speculative decoding is greedy decoding with
each accepted pair computed as one 2-token chunk, so in reference precision it can diverge
from plain greedy.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from runtime.bench_session import OracleDrafts
from runtime.kvstore import Rows
from runtime.model import Indexer
from runtime.session import SamplingParams, Session
from tests.conftest import tokens

GREEDY = SamplingParams(temperature=0)
# how far an fp32 indexer score may lie from its float64 recomputation, relative to the query's
# largest score: the slack when comparing recorded scores across runs
SCORE_ROUNDING = 1e-6





Picks = dict[tuple[Indexer, int], tuple[frozenset[int], torch.Tensor]]


@pytest.fixture
def with_picks(monkeypatch) -> Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, Picks]]:
    """`with_picks(run)` -> (run's result, every indexer selection it made): per (indexer, query
    position), the picked entries and the float64 scores of the entries the query sees."""
    active: list[Picks] = []  # the run in progress (selections outside a run are not recorded)
    select = Indexer._select

    def recording(self, q, weights, positions, rows):
        idx = select(self, q, weights, positions, rows)
        if not active:
            return idx
        per_head = torch.einsum("thd,nd->thn", q.double(), rows.dense().double()).relu()
        scores = torch.einsum("th,thn->tn", weights.double(), per_head)
        for row, position in enumerate(positions.tolist()):
            picked = frozenset(i for i in idx[row].tolist() if i >= 0)
            active[-1][(self, position)] = (picked, scores[row, :(position + 1) // self.ratio])
        return idx

    monkeypatch.setattr(Indexer, "_select", recording)

    def run(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Picks]:
        picks: Picks = {}
        active.append(picks)
        try:
            return fn(), picks
        finally:
            active.remove(picks)

    return run


def cut_gap(scores: torch.Tensor, k: int) -> float:
    """Distance from the k-th best score to the nearest different score (inf: none). Scores exactly
    equal to the k-th (entries the ReLU cut to 0 on every head) are ordered by the tie rule, the
    same way in every chunking."""
    kth = scores.topk(k).values[-1]
    others = scores[scores != kth]
    return float((others - kth).abs().min()) if others.numel() else float("inf")


def tie_margin(scores: torch.Tensor, other: torch.Tensor) -> float:
    """How close two scores must be for the runs that gave `scores` and `other` to order them
    differently: each moved by at most the largest difference, plus the scores' own rounding."""
    return float(2 * (scores - other).abs().max() + SCORE_ROUNDING * scores.abs().max())


# -- the same chunks: bit-identical ------------------------------------------------------------


@pytest.mark.parametrize("precision", ["exact", pytest.param("reference", marks=pytest.mark.slow)])  # reference: ~40 s on 2 cores
def test_the_same_chunks_give_bit_identical_results(precision, request) -> None:
    model = request.getfixturevalue(precision)
    ids = tokens(200, 1)
    one = Session(model, chunk_size=64)
    one.extend(ids[:128])  # chunks [0, 64) and [64, 128)
    two = Session(model)
    two.extend(ids[:64])
    two.extend(ids[64:128])
    assert torch.equal(one.last_logits, two.last_logits)
    turn = ids[128:160]
    expected = two.extend(turn)
    assert torch.equal(one.fork().extend(turn), expected)
    # rewind to a turn boundary restores its snapshot; replaying the turn gives it again
    two.extend(ids[160:200])
    two.rewind(128)
    assert torch.equal(two.last_logits, one.last_logits)
    assert torch.equal(two.extend(turn), expected)
    # rewind inside a turn: the tail is recomputed from the turn's snapshot as one chunk
    two.rewind(150)
    assert torch.equal(two.last_logits, one.fork().extend(ids[128:150]))


@pytest.mark.parametrize("precision", ["exact", pytest.param("reference", marks=pytest.mark.slow)])
def test_a_persisted_prefix_continues_bit_identically(precision, request, tmp_path) -> None:
    model = request.getfixturevalue(precision)
    ids = tokens(200, 2)
    writer = Session(model, persist=True, cache_root=tmp_path)
    writer.extend(ids)  # chunks [0, 128) (saved) and [128, 200)
    reader = Session(model, persist=True, cache_root=tmp_path)
    logits = reader.extend(ids)  # loads [0, 128), computes [128, 200)
    assert reader.cached_tokens == 128 and torch.equal(logits, writer.last_logits)
    assert torch.equal(reader.extend([5]), writer.extend([5]))


# -- other chunkings: rounding, and what it does at a near-tie ----------------------------------


@pytest.mark.slow  # ~2 min on 2 cores
def test_other_chunkings_agree_to_rounding_where_no_pick_is_near_a_tie(exact, with_picks) -> None:
    ids = torch.tensor([tokens(160, 1)])
    one, picks_one = with_picks(lambda: exact(ids, chunk_size=4096)[0])
    each, picks_each = with_picks(lambda: exact(ids, chunk_size=1)[0])  # 1-token decoding
    k = exact.config.index_topk
    cuts = [key for key, (_, scores) in picks_one.items() if scores.numel() > k]  # where top-k drops entries
    assert len(cuts) > 200
    for key in cuts:
        (picked, scores), (other_picked, other_scores) = picks_one[key], picks_each[key]
        assert cut_gap(scores, k) > tie_margin(scores, other_scores)  # no near-tie at this query's cut
        assert picked == other_picked
    assert not torch.equal(each, one)  # fp32 GEMMs round differently for 1 row and for 160
    torch.testing.assert_close(each, one, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spread", [1e-6, pytest.param(0.5, marks=pytest.mark.slow),
                                    pytest.param(0.0, marks=pytest.mark.slow)])  # the controls: slow
def test_a_near_tie_in_the_indexer_flips_a_pick_with_the_chunking(exact, with_picks, spread) -> None:
    """The CSA entries' indexer keys are replaced by one key plus noise of relative size `spread`:
    1e-6 puts every query's top-k cut at a near-tie, 0.5 keeps the scores apart, and 0 makes
    them exactly equal (the tie rule decides, the same way in every chunking)."""
    ids = tokens(160, 0)
    state = exact.new_state()
    exact.extend(state, torch.tensor(ids[:128]), logits="none")
    noise = torch.Generator().manual_seed(1)
    for layer in state.layers:
        if layer.indexer is not None:
            rows = layer.indexer.entries
            keys = rows.dense()[:1] * (1 + spread * torch.randn(rows.count, rows.width, generator=noise))
            layer.indexer.entries = Rows(rows.codec, rows.width, rows.dtype, rows.device)
            layer.indexer.entries.append(keys)
    tail = torch.tensor(ids[128:])
    chunk, picks_chunk = with_picks(lambda: exact.extend(state.copy(), tail, logits="all").logits)

    def one_by_one() -> torch.Tensor:
        own = state.copy()
        return torch.cat([exact.extend(own, t[None], logits="all").logits for t in tail])

    each, picks_each = with_picks(one_by_one)
    flipped = sorted((key for key in picks_chunk if picks_chunk[key][0] != picks_each[key][0]), key=lambda key: key[1])
    diff = (chunk - each).abs().amax(-1)
    if spread != 1e-6:
        k = exact.config.index_topk
        for key, (_, scores) in picks_chunk.items():  # no near-tie at any cut
            assert cut_gap(scores, k) > tie_margin(scores, picks_each[key][1])
        assert flipped == []
        torch.testing.assert_close(each, chunk, atol=1e-4, rtol=0)
        return
    assert flipped, "no pick flipped at the near-ties"
    for key in flipped:  # every flip swaps entries closer than the two runs' rounding moved them
        (mine, scores), (theirs, other_scores) = picks_chunk[key], picks_each[key]
        swapped = scores[sorted(mine ^ theirs)]
        assert float(swapped.max() - swapped.min()) <= tie_margin(scores, other_scores)
    first = flipped[0][1] - 128
    if first:
        assert float(diff[:first].max()) <= 1e-4  # before the first flip: rounding only
    assert float(diff[first:].max()) > 1e-2  # the flip itself moves the logits far beyond rounding


@pytest.mark.slow
def test_reference_decoding_is_not_bit_identical_to_prefill(reference) -> None:
    """bf16 rounding turns the different summation orders of 1-row and many-row GEMMs into
    different activations, which the layers amplify (the same run in exact precision agrees
    to fp32 rounding: test above)."""
    ids = torch.tensor([tokens(48, 1)])
    each, one = reference(ids, chunk_size=1)[0], reference(ids, chunk_size=4096)[0]
    assert float((each - one).abs().max()) > 0.1


# -- speculative decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_rejected_drafts_leave_no_trace(precision, request) -> None:
    model = request.getfixturevalue(precision)
    prompt = tokens(40, 8)
    plain = Session(model)
    plain.extend(prompt)
    expected = prompt + list(plain.generate(12, GREEDY))
    wrong = [(t + 1) % model.config.vocab_size for t in expected]  # never the model's own choice
    spec = OracleDrafts(model, expected=wrong)
    spec.extend(prompt)
    assert prompt + list(spec.generate(12, GREEDY, speculative=True)) == expected
    assert spec.spec.drafted > 0 and spec.spec.accepted == 0
    assert torch.equal(spec.extend([5]), plain.extend([5]))


@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_speculative_greedy_is_greedy_over_its_own_chunks(precision, request, monkeypatch) -> None:
    """With drafts forced to the plain greedy output, every pair the model agrees with is one
    2-token chunk. Replaying the kept chunks on a fresh state gives bit-identical logits and
    each token is their argmax; against plain greedy, the 2-token rounding diverges in
    reference precision (here on one prompt of the two), not in exact precision."""
    model = request.getfixturevalue(precision)
    diverged = 0
    for seed in (100, 101):
        prompt = tokens(40, seed)
        plain = Session(model)
        plain.extend(prompt)
        expected = prompt + list(plain.generate(16, GREEDY))
        spec = OracleDrafts(model, expected=expected)
        prompt_logits = spec.extend(prompt)
        calls: dict[int, tuple[list[int], str, torch.Tensor]] = {}  # position -> the chunk kept there
        forward = model.extend

        def recording(state, ids, logits="last", return_streams=False):
            out = forward(state, ids, logits=logits, return_streams=return_streams)
            calls[state.position - len(ids)] = (ids.tolist(), logits, out.logits)  # a redo replaces a rejected verify
            return out

        with monkeypatch.context() as patch:
            patch.setattr(model, "extend", recording)
            got = prompt + list(spec.generate(16, GREEDY, speculative=True))
        assert spec.spec.accepted > 0
        state = model.new_state()
        logits = model.extend(state, torch.tensor(prompt)).logits
        assert torch.equal(logits[0], prompt_logits)
        chained = list(prompt)
        for position in sorted(calls):
            ids, mode, recorded = calls[position]
            assert position == len(chained) and ids[0] == int(logits[-1].argmax())
            logits = model.extend(state, torch.tensor(ids), logits=mode).logits
            assert torch.equal(logits, recorded)
            if len(ids) == 2:  # an accepted pair: the draft was the model's choice in this chunk
                assert ids[1] == int(logits[0].argmax())
            chained += ids
        assert chained == got
        diverged += got != expected
    assert diverged >= 1 if precision == "reference" else diverged == 0
