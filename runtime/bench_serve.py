"""`v4agent bench serve`: what the serving engine does for many conversations, measured through it.

The model is runtime/bench_batch.py's (exact precision, fp32, random weights, 4 layers at
hidden 1024 with the released rates and window, vocabulary 16,384): wide enough that a
decode step is bound by reading the weights, as on a real model, and small enough that a
16K prefill takes seconds on 2 CPU cores. The engine is stepped here, one `step()` after
another, so every time is a step's end and no thread scheduling enters the figures.

* `throughput_8_over_1`: aggregate decode tokens/s of 8 requests decoding together over 1
  (256-token prompts, 16 tokens timed; medians of 5 alternated runs), and beside it
  `model_throughput_8_over_1`, the same through `Model.extend_batch` alone, measured in the
  same runs by the same function (runtime.bench_batch.decode_throughput).
* `followup_ttft_warm_over_cold`: time to the first token of a follow-up turn (16K prompt,
  its answer, 256 new tokens) on the engine that served the first turn, over the same prompt
  on an engine that holds nothing.
* `decode_stall_ratio`: while a 16K prompt prefills, the worst gap between two tokens of the
  4 running decoders over their median gap in the same period (a prefill run whole would
  make the worst gap the whole prefill). `decode_slowdown_during_prefill` says what the
  interleaved chunks cost them: their median gap then over their median gap before.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from runtime.bench_batch import bench_batch_config, decode_throughput
from runtime.loader import load
from runtime.serve.engine import Engine, Finished, GenerationRequest, Handle, Token

NEW_TURN_TOKENS = 256


def _until_first_token(engine: Engine, request: GenerationRequest) -> tuple[float, Finished]:
    """Seconds from submitting `request` to its first token; its end, once run out."""
    events: list = []
    start = time.perf_counter()
    handle = engine.submit(request)
    while not any(isinstance(e, Token) for e in events):
        engine.step()
        events += handle.ready()
    seconds = time.perf_counter() - start
    while not handle.finished:
        engine.step()
    return seconds, (events + handle.ready())[-1]


def _run_out(engine: Engine, handles: list[Handle]) -> list[list[int]]:
    """Step until every handle finished; their tokens."""
    out: list[list[int]] = [[] for _ in handles]
    done = [False] * len(handles)
    while not all(done):
        engine.step()
        for i, h in enumerate(handles):
            for e in h.ready():
                if isinstance(e, Token):
                    out[i].append(e.id)
                done[i] = done[i] or isinstance(e, Finished)
    return out


def bench_serve(context: int = 16384, decoders: int = 4, batch: int = 8, chunk_size: int = 512,
                progress: Callable[[str], None] = lambda _: None) -> dict:
    config = bench_batch_config()
    model = load(config, precision="exact")
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(2, config.vocab_size, (n,), generator=gen).tolist()

    result: dict = {"config": "runtime/bench_batch.py's model (see runtime/bench_serve.py)", "precision": "exact",
                    "threads": torch.get_num_threads(), "chunk_size": chunk_size, "context": context}

    progress(f"decode: 1 request, then {batch} together, through the engine and the model alone")
    decode = decode_throughput(model, batch)
    for key in ("context", "steps", "runs"):  # the short prompts' own, beside the long prompt's context
        result[f"decode_{key}"] = decode.pop(key)
    result.update({k: v for k, v in decode.items() if k not in ("batch", "threads")})

    progress(f"first turn: a {context}-token prompt")
    first = GenerationRequest(prompt(context), 16)
    engine = Engine(model, chunk_size=chunk_size)
    answer = _run_out(engine, [engine.submit(first)])[0]
    follow = GenerationRequest(first.prompt + answer + prompt(NEW_TURN_TOKENS), 1)
    progress("follow-up turn, warm")
    warm, end = _until_first_token(engine, follow)
    progress("the same prompt, cold")
    cold, _ = _until_first_token(Engine(model, chunk_size=chunk_size), follow)
    result["followup_prompt_tokens"], result["followup_cached_tokens"] = len(follow.prompt), end.cached_tokens
    result["ttft_warm_s"], result["ttft_cold_s"] = round(warm, 3), round(cold, 3)
    result["followup_ttft_warm_over_cold"] = round(cold / warm, 2)

    progress(f"{decoders} decoders while a {context}-token prompt prefills")
    engine = Engine(model, chunk_size=chunk_size)
    running = [engine.submit(GenerationRequest(prompt(64), 1 << 20)) for _ in range(decoders)]
    times: list[list[float]] = [[] for _ in running]

    def step() -> None:
        engine.step()
        now = time.perf_counter()
        for i, h in enumerate(running):
            times[i] += [now] * sum(isinstance(e, Token) for e in h.ready())

    while min(len(t) for t in times) < 16:
        step()
    before = [b - a for t in times for a, b in zip(t[-12:], t[-11:])]
    long = engine.submit(GenerationRequest(prompt(context), 1))
    marks = [len(t) for t in times]
    while not long.finished:
        step()
    during = [b - a for t, m in zip(times, marks) for a, b in zip(t[m - 1:], t[m:])]
    for h in running:
        h.cancel()
    engine.step()
    result["decode_gap_ms_before_median"] = round(1000 * statistics.median(before), 1)
    result["decode_gap_ms_during_median"] = round(1000 * statistics.median(during), 1)
    result["decode_gap_ms_during_worst"] = round(1000 * max(during), 1)
    result["decode_stall_ratio"] = round(max(during) / statistics.median(during), 3)
    result["decode_slowdown_during_prefill"] = round(statistics.median(during) / statistics.median(before), 2)
    return result
