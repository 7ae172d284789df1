"""What batching decoders buys: aggregate decode tokens/s of 8 sequences together over 1 alone.

`Model.extend_batch` runs the per-token work of every sequence (projections, router and
experts, shared expert, head) as one GEMM over their rows, so a step reads the weights
once for all of them; the decoders' attention runs in one padded computation over their
own histories. On a CPU a 1-token step is bound by reading the weights, so that is where
a batch gets its throughput. :func:`decode_throughput` measures it two ways on the same
prompts, alternated run by run: through the serving engine (`throughput_8_over_1`, what
`v4agent bench serve` reports) and the model alone (`model_throughput_8_over_1`: one
`extend_batch` per step, no engine), so the engine's own cost per step shows as their gap.

The model (random weights, exact precision, fp32, on the CPU) is wide enough that the
weight reads dominate a decode step: hidden 1024, 4 layers (SWA, CSA, HCA, CSA at the
released rates 4 and 128, window 128, top-k 128), 8 heads of 128 (64 rope), q' 512, 4
output groups of rank 256, 4 indexer heads of 64, 16 routed experts of width 512 with 2
active plus the shared one, one hash-routed layer, vocabulary 16,384: a token reads 48.6M
weights (194 MB in fp32; the head is 16.8M of them) of the model's 153M (MTP block aside).
How much of the routed experts a batch shares depends on how many of them its tokens pick:
8 tokens choosing 2 of 16 use ~10.4 distinct experts, so the routed experts batch ~1.5x
here, the rest of the weights 8x. (Flash's 6 of 256 would share almost no expert
between 8 tokens: there the gain comes from attention projections, shared expert and head.)
"""

from __future__ import annotations

import statistics
import time

import torch

from runtime.config import CSA, HCA, SWA, ModelConfig, tiny_config
from runtime.model import Model, SequenceState
from runtime.serve.engine import Engine, GenerationRequest, Token


def bench_batch_config() -> ModelConfig:
    return tiny_config(
        vocab_size=16384, hidden_size=1024, num_hidden_layers=4, layer_types=(SWA, CSA, HCA, CSA),
        compress_rates={CSA: 4, HCA: 128}, sliding_window=128, index_topk=128, num_attention_heads=8,
        head_dim=128, rope_head_dim=64, q_lora_rank=512, o_groups=4, o_lora_rank=256, index_n_heads=4,
        index_head_dim=64, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=512,
        num_hash_layers=1, max_position_embeddings=65536, rope_original_max_position=65536,
    )


def _model_rate(model: Model, states: list[SequenceState], first: list[int], steps: int) -> float:
    """Aggregate tokens/s of `steps` greedy steps of every sequence together, one token each per step."""
    tokens = [torch.tensor([t]) for t in first]
    start = time.perf_counter()
    for _ in range(steps):
        outs = model.extend_batch(states, tokens)
        tokens = [o.logits[0].argmax().reshape(1) for o in outs]
    return len(states) * steps / (time.perf_counter() - start)


def _engine_rate(engine: Engine, prompts: list[list[int]], steps: int) -> float:
    """Aggregate tokens/s of `prompts` decoding together through `engine` (their prefills, and
    each first token, not timed); the engine is stepped here, so no thread scheduling enters."""
    handles = [engine.submit(GenerationRequest(p, steps + 1)) for p in prompts]
    started = [False] * len(handles)
    while not all(started):
        engine.step()
        started = [s or any(isinstance(e, Token) for e in h.ready()) for s, h in zip(started, handles)]
    start, tokens = time.perf_counter(), 0
    while not all(h.finished for h in handles):
        engine.step()
        tokens += sum(isinstance(e, Token) for h in handles for e in h.ready())
    return tokens / (time.perf_counter() - start)


def decode_throughput(model: Model, batch: int = 8, context: int = 256, steps: int = 16, runs: int = 5,
                      seed: int = 0) -> dict:
    """Aggregate decode tokens/s of `batch` sequences decoding together over one alone, after
    `context`-token random prompts, through the engine and through the model alone.

    Every run measures the four rates (engine and model, 1 and `batch` sequences) one after
    the other, run after run, so that the drifting load of a shared machine falls on all of
    them; the figures are medians over `runs` (short runs, several of them)."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (context,), generator=generator).tolist() for _ in range(batch)]
    engine = Engine(model, chunk_size=max(context, 1), max_running=batch)
    states = [model.new_state() for _ in range(batch)]
    first = [int(out.logits[0].argmax()) for out in model.extend_batch(states, [torch.tensor(p) for p in prompts])]
    # warm-up: allocator, thread pool, the engine's kept prefixes
    _engine_rate(engine, prompts, 1)
    _model_rate(model, [s.copy() for s in states], first, 1)
    rates: dict[str, list[float]] = {"engine_1": [], "engine_n": [], "model_1": [], "model_n": []}
    for _ in range(runs):
        rates["engine_1"].append(_engine_rate(engine, prompts[:1], steps))
        rates["engine_n"].append(_engine_rate(engine, prompts, steps))
        rates["model_1"].append(_model_rate(model, [states[0].copy()], first[:1], steps))
        rates["model_n"].append(_model_rate(model, [s.copy() for s in states], first, steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "batch": batch, "context": context, "steps": steps, "runs": runs, "threads": torch.get_num_threads(),
        "decode_tokens_per_s_1": round(med["engine_1"], 2), f"decode_tokens_per_s_{batch}": round(med["engine_n"], 2),
        f"throughput_{batch}_over_1": round(med["engine_n"] / med["engine_1"], 3),
        "model_decode_tokens_per_s_1": round(med["model_1"], 2),
        f"model_decode_tokens_per_s_{batch}": round(med["model_n"], 2),
        f"model_throughput_{batch}_over_1": round(med["model_n"] / med["model_1"], 3),
    }
