"""Exact-mode logits against the transformers oracle on identical random weights.

Top-k ties are real (indexer scores exactly 0 after the ReLU), and two correct
implementations may then pick different entries; a different pick in one layer then
changes every later layer's input. So each comparison runs ours with the oracle's picks
forced layer by layer, checks in that same run that our own picks were equivalent under
our scores (the same multiset of picked scores: the only freedom is which of several
equal scores wins), and requires the logits to match to 1e-4. Lengths without ties
also match without forcing.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

import runtime.model as rm
from runtime.loader import load
from tests.conftest import CONFIGS, load_hf

# 600: 150 CSA entries, many times the tiny config's top-k of 8
LENGTHS = (1, 3, 4, 5, 127, 128, 129, 300, 600)
TOL = 1e-4


def oracle_logits_and_picks(hf, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_mod

    picks: list[torch.Tensor] = []
    original = hf_mod.DeepseekV4Indexer.forward

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        picks.append(out[0])
        return out

    hf_mod.DeepseekV4Indexer.forward = recording
    try:
        with torch.no_grad():
            logits = hf(ids, use_cache=False).logits[0]
    finally:
        hf_mod.DeepseekV4Indexer.forward = original
    return logits, picks


def our_logits(model, ids: torch.Tensor, forced: list[torch.Tensor] | None = None):
    """Our logits, plus each CSA layer's (scores, picks); `forced` replaces our picks layer by layer."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original_forward, original_topk = rm.Indexer.forward, rm.topk_indices
    scores_of_call: list[torch.Tensor] = []

    def recording_topk(scores, k):
        scores_of_call.append(scores)
        return original_topk(scores, k)

    def indexer(self, *args, **kwargs):
        scores_of_call.clear()
        mine = original_forward(self, *args, **kwargs)
        # query blocks score only the entries visible to them: pad the rows to one width
        width = max((s.shape[1] for s in scores_of_call), default=0)
        scores = [F.pad(s, (0, width - s.shape[1]), value=float("-inf")) for s in scores_of_call]
        seen.append((torch.cat(scores) if scores else None, mine))
        return forced[len(seen) - 1] if forced is not None else mine

    rm.Indexer.forward, rm.topk_indices = indexer, recording_topk
    try:
        logits = model(ids)[0]
    finally:
        rm.Indexer.forward, rm.topk_indices = original_forward, original_topk
    return logits, seen


def assert_tie_equivalent(scores: torch.Tensor, mine: torch.Tensor, theirs: torch.Tensor) -> int:
    """Our picks and the oracle's select the same multiset of scores; returns rows that differ."""
    assert mine.shape == theirs.shape
    differ = 0
    for t in range(mine.shape[0]):
        a, b = mine[t][mine[t] >= 0].sort().values, theirs[t][theirs[t] >= 0].sort().values
        assert a.numel() == b.numel(), f"query {t}: {a.numel()} picks vs oracle's {b.numel()}"
        if not torch.equal(a, b):
            differ += 1
            sa, sb = scores[t][a].sort().values, scores[t][b].sort().values
            torch.testing.assert_close(sa, sb, atol=1e-5, rtol=0,
                                       msg=f"query {t}: picks {a.tolist()} vs oracle {b.tolist()} are not a tie")
    return differ


@pytest.mark.parametrize("name,seed", [("tiny", 0), ("tiny", 1), ("released_rates", 0), ("released_rates", 2)])
def test_logits_match_transformers(checkpoint_dir, name: str, seed: int) -> None:
    path = checkpoint_dir(name, seed)
    hf, ours = load_hf(path), load(path, precision="exact")
    vocab = CONFIGS[name].vocab_size
    for S in LENGTHS:
        ids = torch.randint(2, vocab, (1, S), generator=torch.Generator().manual_seed(1000 * seed + S))
        expected, oracle_picks = oracle_logits_and_picks(hf, ids)
        logits, seen = our_logits(ours, ids, forced=oracle_picks)
        assert len(seen) == len(oracle_picks)
        ties = sum(assert_tie_equivalent(scores, mine, theirs)
                   for (scores, mine), theirs in zip(seen, oracle_picks) if scores is not None)
        if not ties:  # nothing to force: our own picks must give the oracle's logits
            logits = our_logits(ours, ids)[0]
        err = (logits - expected).abs().max().item()
        assert err <= TOL, f"{name} seed {seed} S={S}: max |logit diff| {err:.2e} ({ties} tied rows)"


def test_chunked_and_stepwise_extension_equal_one_shot(checkpoint_dir) -> None:
    """Chunk boundaries on every side of the 4- and 8-token compression windows."""
    model = load(checkpoint_dir("tiny", 0))
    ids = torch.randint(2, 512, (1, 70), generator=torch.Generator().manual_seed(7))
    full = model(ids)[0]
    for chunk in (1, 3, 4, 5, 7, 8, 9, 33):
        torch.testing.assert_close(model(ids, chunk_size=chunk)[0], full, atol=5e-5, rtol=0,
                                   msg=f"chunk size {chunk}")


def test_topk_tie_rule_prefers_lower_index() -> None:
    scores = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0], [float("-inf"), 0.0, 0.0, 2.0, 0.0]])
    assert rm.topk_indices(scores, 3).sort(-1).values.tolist() == [[0, 1, 4], [1, 2, 3]]
    assert rm.topk_indices(scores, 5).sort(-1).values.tolist() == [[0, 1, 2, 3, 4]] * 2
    # no tie at the cut: plain top-k
    assert sorted(rm.topk_indices(torch.tensor([[0.5, 0.1, 0.9, 0.0]]), 2)[0].tolist()) == [0, 2]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_topk_follows_the_tie_rule_on_any_scores(data) -> None:
    """Against the rule written as a sort: by score descending, then index ascending. Scores
    come from a few values (many ties) plus -inf (entries hidden from the query)."""
    n = data.draw(st.integers(2, 60))
    k = data.draw(st.integers(1, n - 1))
    values = st.sampled_from([float("-inf"), -1.0, 0.0, 0.0, 0.5, 2.0])
    rows = data.draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=1, max_size=6))
    scores = torch.tensor(rows)
    expected = [sorted(sorted(range(n), key=lambda j: (-row[j], j))[:k]) for row in rows]
    assert rm.topk_indices(scores, k).sort(-1).values.tolist() == expected
