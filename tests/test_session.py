"""Sessions: extension in any chunking agrees with one forward (and the oracle), rewind,
copy-free forks, persistence across processes, speculative decoding, KV bytes. What is
bit-identical to what is asserted in test_exactness.py."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

import runtime.kvstore as kvstore
from runtime import load
from runtime.config import released_config
from runtime.kvstore import bytes_per_token
from runtime.prefix_cache import PrefixCache, prune, segments, stats
from runtime.session import SamplingParams, Session, SessionPool, state_bytes
from tests.conftest import CONFIGS, load_hf, tokens

GREEDY = SamplingParams(temperature=0)





@pytest.mark.slow  # minutes on 2 cores; test_parity holds chunked prefill to the oracle by default
def test_random_chunkings_equal_one_forward_and_the_oracle(checkpoint_dir, exact) -> None:
    ids = tokens(140, 1)
    full = exact(torch.tensor([ids]))[0]
    rng = random.Random(0)
    # cuts on every side of the 4- and 8-token windows and the 128 boundary, plus random ones
    fixed = [3, 4, 5, 7, 8, 9, 127, 128, 129]
    for trial in range(4):
        cuts = sorted(set(fixed[trial::4] + rng.sample(range(1, 140), 5)))
        session = Session(exact, chunk_size=rng.choice([1, 3, 16, 64]))
        for a, b in zip([0] + cuts, cuts + [140]):
            logits = session.extend(ids[a:b])
            torch.testing.assert_close(logits, full[b - 1], atol=5e-5, rtol=0, msg=f"cuts {cuts} at {b}")
    with torch.no_grad():  # the oracle, where no indexer top-k tie can differ (<= top-k entries)
        oracle = load_hf(checkpoint_dir("tiny", 0))(torch.tensor([ids[:16]]), use_cache=False).logits[0]
    torch.testing.assert_close(Session(exact).extend(ids[:16]), oracle[-1], atol=1e-4, rtol=0)


def test_rewind_then_extend_equals_a_fresh_session(exact) -> None:
    ids = tokens(200, 2)
    session = Session(exact, chunk_size=16, snapshot_every=32)
    for a, b in ((0, 50), (50, 51), (51, 130), (130, 200)):
        session.extend(ids[a:b])
    rng = random.Random(1)
    for position in sorted(rng.sample(range(1, 200), 6), reverse=True) + [1]:
        session.rewind(position)
        assert session.tokens == ids[:position] and session.position == position
        fresh = Session(exact).extend(ids[:position])
        torch.testing.assert_close(session.last_logits, fresh, atol=5e-5, rtol=0)
    session.extend(ids[1:120])
    torch.testing.assert_close(session.last_logits, Session(exact).extend(ids[:120]), atol=5e-5, rtol=0)


def test_fork_shares_the_prefix_and_leaves_the_parent_alone(exact, monkeypatch) -> None:
    monkeypatch.setattr(kvstore, "MERGE_BELOW_ROWS", 4)  # keep chunks immutable at this small size
    ids = tokens(160, 3)
    parent = Session(exact, snapshot_every=64)
    parent.extend(ids[:128])
    before = parent.last_logits.clone()
    child = parent.fork()
    alone = state_bytes([parent.state])
    child.extend(tokens(20, 4))
    assert state_bytes([parent.state, child.state]) < 1.5 * alone  # the prefix is held once
    torch.testing.assert_close(parent.last_logits, before, atol=0, rtol=0)
    torch.testing.assert_close(parent.extend(ids[128:]), Session(exact).extend(ids), atol=5e-5, rtol=0)
    torch.testing.assert_close(child.last_logits, Session(exact).extend(ids[:128] + tokens(20, 4)),
                               atol=5e-5, rtol=0)


def test_pool_reuses_the_longest_live_prefix_and_evicts_over_budget(reference) -> None:
    ids = tokens(300, 5)
    pool = SessionPool(reference, budget_bytes=10**9, snapshot_every=64)
    first = pool.open(ids[:260])
    second = pool.open(ids[:200] + [7, 8, 9])
    assert second.cached_tokens == 200
    # bit-identical to a session computing the same chunks: the pool recomputes from the snapshot at 192
    same_chunks = Session(reference, snapshot_every=64)
    same_chunks.extend(ids[:200])
    assert torch.equal(second.last_logits, same_chunks.extend([7, 8, 9]))
    pool.budget_bytes = state_bytes([second.state])
    pool.open(tokens(50, 6))
    assert first not in pool.sessions and len(pool.sessions) == 1


def test_generate_streams_stops_and_is_seeded(reference) -> None:
    prompt = tokens(30, 7)
    a, b = Session(reference), Session(reference)
    a.extend(prompt)
    b.extend(prompt)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3)
    out_a, out_b = list(a.generate(12, params)), list(b.generate(12, params))
    assert out_a == out_b and len(out_a) == 12 and a.tokens == prompt + out_a
    greedy = Session(reference)
    greedy.extend(prompt)
    first = list(greedy.generate(5, GREEDY))
    stop = Session(reference)
    stop.extend(prompt)
    assert list(stop.generate(20, GREEDY, stop_ids={first[2]})) == first[:3]
    # a stop string spanning two tokens' text ends the stream at the token completing it
    text = Session(reference)
    text.extend(prompt)
    spanning = f"{first[2]}><{first[3]}"
    expected = until(first, spanning)
    assert list(text.generate(20, GREEDY, stop_strings=[spanning], detokenize=spell)) == expected
    assert text.tokens == prompt + expected
    with pytest.raises(ValueError, match="detokenize"):
        list(text.generate(3, GREEDY, stop_strings=["x"]))
    with pytest.raises(ValueError, match="non-empty"):
        list(text.generate(3, GREEDY, stop_strings=[""], detokenize=spell))


def spell(ids: list[int]) -> str:
    """A stand-in detokenizer: each id as its own bracketed text."""
    return "".join(f"<{i}>" for i in ids)


def until(ids: list[int], stop: str) -> list[int]:
    """The shortest head of `ids` whose text contains `stop`."""
    return next(ids[:n] for n in range(1, len(ids) + 1) if stop in spell(ids[:n]))


@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_speculative_greedy_equals_plain_greedy(exact, reference, precision) -> None:
    model = exact if precision == "exact" else reference
    for seed in (8, 9):
        prompt = tokens(40, seed)
        plain, spec = Session(model), Session(model)
        plain.extend(prompt)
        spec.extend(prompt)
        assert list(spec.generate(24, GREEDY, speculative=True)) == list(plain.generate(24, GREEDY))
        assert spec.tokens == plain.tokens and spec.spec.drafted > 0
        # the state after speculation (accepted and rejected drafts) continues like plain decoding
        torch.testing.assert_close(spec.extend([5]), plain.extend([5]), atol=5e-5, rtol=0)


def test_speculative_state_after_forced_acceptance(exact, monkeypatch) -> None:
    """Force every draft to be the model's own greedy choice, so the accept path runs too,
    also when a stop string ends the stream on either token of an accepted pair."""
    prompt = tokens(40, 10)
    plain = Session(exact)
    plain.extend(prompt)
    expected = list(plain.generate(10, GREEDY))
    original = exact.mtp_logits

    def forced_session() -> Session:
        spec = Session(exact)
        spec.extend(prompt)

        def oracle_draft(state, streams, next_ids, start, **kwargs):
            logits = original(state, streams, next_ids, start, **kwargs)
            if logits is None:  # the session only feeding the MTP block's window
                return None
            if next_ids.numel() == 1 and start == state.mtp_position - 1 and len(spec.tokens) >= len(prompt):
                # a draft for position start + 2: the token plain decoding chose there
                at = start + 2 - len(prompt)
                forced = torch.full_like(logits, -1e9)
                forced[0, expected[at] if at < len(expected) else 0] = 0
                return forced
            return logits

        monkeypatch.setattr(exact, "mtp_logits", oracle_draft)
        return spec

    spec = forced_session()
    got = list(spec.generate(10, GREEDY, speculative=True))
    assert got == expected and spec.spec.acceptance_rate > 0.5
    for last in (2, 3):  # the first token of the second pair, then its draft
        stop = f"<{expected[last]}>"
        spec = forced_session()
        got = list(spec.generate(10, GREEDY, speculative=True, stop_strings=[stop], detokenize=spell))
        assert got == until(expected, stop) and spec.tokens == prompt + got


# -- persistence -----------------------------------------------------------------------------

_CHILD = """
import json, sys, torch
from runtime import load
from runtime.session import Session, SamplingParams
model = load(sys.argv[1], precision="reference")
ids = json.loads(sys.argv[3])
session = Session(model, persist=True, cache_root=sys.argv[2])
logits = session.extend(ids)
out = list(session.generate(6, SamplingParams(temperature=0)))
print(json.dumps({"cached": session.cached_tokens, "logits": logits[:8].tolist(), "out": out}))
"""


def test_save_load_in_a_new_process_continues_identically(checkpoint_dir, reference, tmp_path) -> None:
    ids = tokens(420, 11)
    writer = Session(reference, persist=True, cache_root=tmp_path)
    writer.extend(ids[:200])
    writer.extend(ids[200:400])
    # Bit-identity holds for the same chunks (docs/sessions.md): the state saved at 384, then
    # one chunk to 420 — what an in-process reader of a copy of the cache computes.
    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    plain = Session(reference, persist=True, cache_root=tmp_path.parent / "copy")
    expected_logits = plain.extend(ids)
    assert plain.cached_tokens == 384
    expected_out = list(plain.generate(6, GREEDY))
    run = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint_dir("tiny", 0)), str(tmp_path),
                          json.dumps(ids)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    child = json.loads(run.stdout)
    assert child["cached"] == 384
    assert child["out"] == expected_out
    torch.testing.assert_close(torch.tensor(child["logits"]), expected_logits[:8], atol=0, rtol=0)
    # append-only: the second turn wrote one new segment on top of the first turn's
    spans = sorted((s.start, s.end) for s in segments(tmp_path) if s.key["precision"] == "reference")
    assert spans == [(0, 128), (128, 384)]


def test_foreign_caches_are_refused_never_used(checkpoint_dir, exact, reference, tmp_path) -> None:
    ids = tokens(300, 12)
    Session(reference, persist=True, cache_root=tmp_path).extend(ids)
    warnings: list[str] = []
    other_precision = Session(exact, persist=True, cache_root=tmp_path, warn=warnings.append)
    other_precision.extend(ids)
    assert other_precision.cached_tokens == 0 and any("another compatibility key" in w for w in warnings)
    # same config and layout, other weights (seed 1): nothing of seed 0's prefix may be used
    other_weights = load(checkpoint_dir("tiny", 1), precision="reference")
    warnings.clear()
    reader = Session(other_weights, persist=True, cache_root=tmp_path, warn=warnings.append)
    logits = reader.extend(ids)
    assert reader.cached_tokens == 0 and any("another compatibility key" in w for w in warnings)
    torch.testing.assert_close(logits, Session(other_weights).extend(ids), atol=0, rtol=0)
    # a segment file renamed to another key's name is reported once, removed and recomputed
    victim = next(s.path for s in segments(tmp_path) if s.key["precision"] == "reference"
                  and s.key["model"] == reference.identity)
    forged = victim.with_name(victim.name.rsplit("-", 1)[0] + "-" + PrefixCache(exact, "fp32", tmp_path).digest
                              + ".safetensors")
    victim.rename(forged)
    warnings.clear()
    assert PrefixCache(exact, "fp32", tmp_path, warnings.append).load(ids) is None
    assert not forged.exists() and [w for w in warnings if forged.name in w and "removed" in w] != []
    assert PrefixCache(reference, "native", tmp_path).longest_prefix(ids) < 256


def test_torn_segment_is_ignored_and_the_rest_still_used(reference, tmp_path) -> None:
    ids = tokens(420, 13)
    writer = Session(reference, persist=True, cache_root=tmp_path)
    writer.extend(ids[:200])
    writer.extend(ids[200:400])
    last = max(segments(tmp_path), key=lambda s: s.end)
    last.path.write_bytes(last.path.read_bytes()[: last.nbytes // 2])  # a crash mid-write
    warnings: list[str] = []
    reader = Session(reference, persist=True, cache_root=tmp_path, warn=warnings.append)
    logits = reader.extend(ids)
    assert reader.cached_tokens == 128 and any("unreadable" in w for w in warnings)
    fresh = Session(reference, persist=True, cache_root=tmp_path / "fresh")  # the same chunks, computed anew
    fresh.extend(ids[:128])
    assert torch.equal(logits, fresh.extend(ids[128:]))
    assert stats(tmp_path)["unreadable"] == 0  # the reader rewrote the segment it recomputed


def test_prune_removes_lru_leaves_first(reference, tmp_path) -> None:
    ids = tokens(520, 14)
    session = Session(reference, persist=True, cache_root=tmp_path)
    for end in (130, 260, 390, 520):
        session.extend(ids[session.position:end])
    by_end = {s.end: s for s in segments(tmp_path)}
    assert sorted(by_end) == [128, 256, 384, 512]
    keep = sum(s.nbytes for e, s in by_end.items() if e <= 256)
    removed = prune(keep, tmp_path)
    assert sorted(p.name for p in removed) == sorted(by_end[e].path.name for e in (384, 512))
    assert sorted(s.end for s in segments(tmp_path)) == [128, 256]


# -- bytes per token -------------------------------------------------------------------------


@pytest.mark.parametrize("name,native,with_scales,bf16", [("flash", 3450, 3509, 6880), ("pro", 4940, 5024, 9848)])
def test_kv_bytes_per_token_match_the_spec(name, native, with_scales, bf16) -> None:
    config = released_config(name)
    assert bytes_per_token(config, "native") == pytest.approx(with_scales, abs=1)
    assert bytes_per_token(config, "bf16") == pytest.approx(bf16, abs=1)
    scale_bytes = bytes_per_token(config, "native") - native
    assert 0 < scale_bytes < 0.03 * native  # 7 ue8m0 per main entry, 4 per indexer key


def test_cache_cli_lists_stats_and_prunes(reference, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from agent.cli import app

    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path))
    Session(reference, persist=True).extend(tokens(300, 15))  # default root: $V4AGENT_CACHE/prefix
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "ls", "--json"])
    assert listed.exit_code == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["start"], r["end"], r["precision"]) for r in rows] == [(0, 256, "reference")]
    summary = json.loads(runner.invoke(app, ["cache", "stats", "--json"]).stdout)
    assert summary["segments"] == 1 and summary["keys"][0]["longest_prefix"] == 256
    pruned = runner.invoke(app, ["cache", "prune", "--max-size", "0", "--json"])
    assert json.loads(pruned.stdout) == {"removed": 1, "bytes_left": 0}
    bad = runner.invoke(app, ["cache", "prune", "--max-size", "lots"])
    assert bad.exit_code == 2 and "not a size" in bad.stderr
