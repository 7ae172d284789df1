"""The serving engine: requests checked before queueing, continuous batching with at most one
prefill chunk per step, prefix reuse (forks, finished turns, the on-disk cache), eviction,
cancellation, per-request errors, and greedy outputs equal to each request run alone through
random interleavings."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from runtime.serve.engine import Engine, Finished, GenerationRequest, PrefillProgress, Token
from runtime.session import SamplingParams, Session
from tests.conftest import tokens

CHUNK = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and on a loaded machine two threads wait on
    each other at every op (~20x slower per token here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def solo(model, request: GenerationRequest, detokenize=None) -> list[int]:
    """The request's output computed alone, on a plain session with the engine's chunk size."""
    session = Session(model, chunk_size=CHUNK)
    session.extend(request.prompt)
    return list(session.generate(request.max_tokens, request.sampling, request.stop_ids, request.speculative,
                                 request.stop_strings, detokenize))


def drain(engine: Engine) -> None:
    while engine.step():
        pass


def outcome(handle) -> tuple[list[int], Finished, list]:
    events = list(handle.events(timeout=0))
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    kinds = [type(e) for e in events]
    assert kinds == sorted(kinds, key=[PrefillProgress, Token, Finished].index)  # progress, tokens, then the end
    return [e.id for e in events if isinstance(e, Token)], events[-1], events


def test_bad_requests_are_refused_before_queueing(exact) -> None:
    engine = Engine(exact, context_limit=64)
    bad = [GenerationRequest([], 4), GenerationRequest([1, 2, 512], 4), GenerationRequest([-1], 4),
           GenerationRequest(tokens(64), 4), GenerationRequest([5], -1),
           GenerationRequest([5], 4, SamplingParams(temperature=1.0), speculative=True),
           GenerationRequest([5], 4, stop_strings=("x",))]  # no detokenize function
    for request in bad:
        with pytest.raises(ValueError):
            engine.submit(request)
    assert engine.stats()["waiting"] == 0 and engine.stats()["requests"] == 0
    # the generation stops at the context limit, reported as "length"
    out, end, _ = run_one(engine, GenerationRequest(tokens(60), 10))
    assert len(out) == 4 and end.reason == "length" and end.completion_tokens == 4


def run_one(engine: Engine, request: GenerationRequest):
    handle = engine.submit(request)
    drain(engine)
    return outcome(handle)


def test_a_long_prefill_delays_decoders_by_one_chunk_per_step(exact) -> None:
    engine = Engine(exact, chunk_size=CHUNK)
    decoder = engine.submit(GenerationRequest(tokens(20, 1), 40))
    engine.step()
    engine.step()  # its prompt: chunks of 16 and 4 tokens
    assert [e.done for e in decoder.ready()] == [16, 20]
    long = engine.submit(GenerationRequest(tokens(100, 2), 1))
    events, steps = [], 0
    while not long.finished:
        engine.step()
        steps += 1
        assert [type(e) for e in decoder.ready()] == [Token]  # the decoder gets a token every step
        events += long.ready()
    progress = [e.done for e in events if isinstance(e, PrefillProgress)]
    assert progress == list(range(CHUNK, 100, CHUNK)) + [100] and steps == len(progress) + 1
    assert [e.id for e in events if isinstance(e, Token)] == solo(exact, GenerationRequest(tokens(100, 2), 1))
    assert events[-1].reason == "length"


def test_concurrent_greedy_outputs_equal_each_alone(exact, tmp_path) -> None:
    """Seeded random schedules of submits, cancels and steps over requests that share prefixes,
    continue finished turns and speculate, with a memory budget small enough to evict and the
    on-disk cache on: every request that was not cancelled gets its solo output."""
    base = tokens(150, 3)
    first = GenerationRequest(base[:140], 12)
    first_out = solo(exact, first)
    requests = [
        first,
        GenerationRequest(base[:100] + tokens(30, 4), 10),  # shares 100 tokens with the first
        GenerationRequest(base[:140], 8, speculative=True),  # the first's prompt again
        GenerationRequest(base[:140] + first_out + tokens(20, 5), 10),  # the next turn of the first
        GenerationRequest(tokens(60, 6), 10, stop_ids=frozenset({0})),
        GenerationRequest(tokens(45, 7), 6, speculative=True),
        GenerationRequest(base[:140] + first_out[:5], 7),  # a prefix of the first's conversation
    ]
    expected = [solo(exact, r) for r in requests]
    # no budget: everything stays warm; a budget of 1 byte: each finished sequence is evicted at
    # once, and with persist its next use reloads the saved prefix from disk
    for seed, (budget, persist) in enumerate([(None, False), (1, False), (1, True)]):
        rng = random.Random(seed)
        engine = Engine(exact, chunk_size=CHUNK, max_running=rng.choice([2, 3, 8]), budget_bytes=budget,
                        persist=persist, cache_root=tmp_path / f"cache-{seed}")
        order = rng.sample(range(len(requests)), len(requests))
        cancel = rng.choice(order)
        handles = {}
        while order or engine.step():
            if order and rng.random() < 0.4:
                i = order.pop()
                handles[i] = engine.submit(requests[i])
            if cancel in handles and rng.random() < 0.1:
                handles[cancel].cancel()
            engine.step()
        for i, handle in handles.items():
            out, end, _ = outcome(handle)
            if end.reason == "cancelled":
                assert i == cancel and out == expected[i][:len(out)]
                continue
            assert out == expected[i], f"seed {seed}, request {i}"
            assert end.reason == ("stop" if expected[i][-1] in requests[i].stop_ids else "length")
            assert end.completion_tokens == len(out) and end.prompt_tokens == len(requests[i].prompt)
        stats = engine.stats()
        assert stats["running"] == stats["waiting"] == 0 and stats["cache_hit_tokens"] > 0
        assert (stats["evictions"] > 0) == (budget is not None)


def test_a_next_turn_continues_the_finished_conversation_and_pass_at_k_shares_it(exact) -> None:
    engine = Engine(exact, chunk_size=CHUNK)
    prompt = tokens(80, 8)
    out, end, _ = run_one(engine, GenerationRequest(prompt, 5))
    assert end.cached_tokens == 0
    turn = prompt + out + tokens(10, 9)
    again, end, events = run_one(engine, GenerationRequest(turn, 5))
    assert end.cached_tokens == 85 and [e.done for e in events if isinstance(e, PrefillProgress)] == [95]
    assert again == solo(exact, GenerationRequest(turn, 5))
    # two samples of the same prompt continue the conversation without computing anything
    sampled = SamplingParams(temperature=1.0, seed=1)
    handles = [engine.submit(GenerationRequest(turn + again, 3, sampled)) for _ in range(2)]
    drain(engine)
    results = [outcome(h) for h in handles]
    assert all(end.cached_tokens == len(turn + again) and len(events) == 4 for _, end, events in results)
    assert results[0][0] == results[1][0]  # the same seed on the same state: the same sample


def test_eviction_to_disk_and_reload_on_the_next_turn(exact, tmp_path) -> None:
    engine = Engine(exact, chunk_size=CHUNK, budget_bytes=1, persist=True, cache_root=tmp_path)
    prompt = tokens(300, 10)
    out, end, _ = run_one(engine, GenerationRequest(prompt, 4))
    assert engine.stats()["evictions"] == 1 and engine.stats()["kept"] == 0  # over budget: dropped at once
    turn = prompt + out + tokens(20, 11)
    again, end, _ = run_one(engine, GenerationRequest(turn, 4))
    assert end.cached_tokens == 256  # the prompt's block-aligned prefix, saved during its prefill
    assert again == solo(exact, GenerationRequest(turn, 4))


def test_cancel_frees_the_slot_and_an_error_ends_only_its_request(exact) -> None:
    prompt, bad_prompt = tokens(30, 12), tokens(30, 13)
    expected = solo(exact, GenerationRequest(prompt, 8))
    bad_first = solo(exact, GenerationRequest(bad_prompt, 1))[0]

    def detokenize(ids: list[int]) -> str:
        if bad_first in ids:
            raise ValueError(f"no text for token {bad_first}")
        return " ".join(map(str, ids))

    engine = Engine(exact, chunk_size=CHUNK, max_running=2, detokenize=detokenize)
    engine.start()
    try:
        # checking a stop string meets a token whose text cannot be made: that request alone fails
        failing = GenerationRequest(bad_prompt, 8, stop_strings=("never",))
        endless = engine.submit(GenerationRequest(tokens(25, 14), 10_000))
        bad = engine.submit(failing)
        good = engine.submit(GenerationRequest(prompt, 8))  # waits for a slot
        out, end, _ = outcome_blocking(bad)
        assert end.reason == "error" and "no text for token" in end.error and out == []
        for event in endless.events(timeout=60):
            if isinstance(event, Token):
                break
        endless.cancel()
        out, end, _ = outcome_blocking(endless)
        assert end.reason == "cancelled" and 0 < end.completion_tokens == len(out) + 1
        out, end, _ = outcome_blocking(good)
        assert out == expected and end.reason == "length"

        async def stream() -> list[int]:
            handle = engine.submit(GenerationRequest(prompt, 8))
            return [e.id async for e in handle.aevents() if isinstance(e, Token)]

        assert asyncio.run(stream()) == expected
        results: dict[int, list[int]] = {}

        def client(i: int) -> None:
            handle = engine.submit(GenerationRequest(prompt, 8))
            results[i] = [e.id for e in handle.events(timeout=60) if isinstance(e, Token)]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: expected for i in range(4)}
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(GenerationRequest(prompt, 1))


def outcome_blocking(handle):
    events = list(handle.events(timeout=60))
    return [e.id for e in events if isinstance(e, Token)], events[-1], events


def test_accepted_drafts_in_a_batch_equal_each_alone(exact, monkeypatch) -> None:
    """Drafts forced to the plain greedy continuation, so that pairs are accepted (random MTP
    weights never draft the model's choice): speculative outputs in a batch equal each alone."""
    prompts = [tokens(40, 20), tokens(50, 21), tokens(30, 22)]
    continuations = [p + solo(exact, GenerationRequest(p, 10)) for p in prompts]
    mtp_draft = Session._draft

    def oracle(self: Session, token: int) -> int:
        mtp_draft(self, token)  # the MTP block's window advances as with its own drafts
        at = len(self.tokens) + 1
        held = self.tokens + [token]
        return next((c[at] for c in continuations if c[:at] == held and at < len(c)), 0)

    monkeypatch.setattr(Session, "_draft", oracle)
    requests = [GenerationRequest(p, 10, speculative=True) for p in prompts]
    alone = [solo(exact, r) for r in requests]
    engine = Engine(exact, chunk_size=CHUNK)
    handles = [engine.submit(r) for r in requests]
    drain(engine)
    assert [outcome(h)[0] for h in handles] == alone
    assert sum(s.spec.accepted for s in engine._kept) >= 6


def test_moving_sessions_keeps_what_they_share_shared(exact) -> None:
    """What eviction to host memory does on a GPU, onto the meta device here (no GPU in the tests):
    everything a session holds moves, and sessions moved together still share their prefix."""
    parent = Session(exact)
    parent.extend(tokens(40, 30))
    child = parent.fork()
    child.extend(tokens(5, 31))  # its snapshot at 40 is the parent's state
    memo: dict = {}
    for session in (parent, child):
        session.to(torch.device("meta"), memo)
    held = [st for s in (parent, child) for st in s.held_states()]
    tensors = [t for st in held for layer in st.layers + st.mtp for t in
               [layer.window] + [x for c in (layer.compressor, layer.indexer) if c is not None
                                 for chunk in c.entries.chunks for x in chunk]]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert parent.last_logits.device.type == "meta" and child.last_logits.device.type == "meta"
    shared = child.held_states()[1]
    assert shared.position == 40 and shared.layers[0].window is parent.state.layers[0].window


def test_at_most_max_kept_finished_sequences_stay_warm(exact) -> None:
    engine = Engine(exact, chunk_size=CHUNK, max_kept=1)
    for seed in (40, 41):
        run_one(engine, GenerationRequest(tokens(20, seed), 2))
    assert engine.stats()["kept"] == 1 and engine.stats()["evictions"] == 1
    assert run_one(engine, GenerationRequest(tokens(20, 41) + [5], 1))[1].cached_tokens == 20
    assert run_one(engine, GenerationRequest(tokens(20, 40) + [5], 1))[1].cached_tokens == 0  # the older: gone
