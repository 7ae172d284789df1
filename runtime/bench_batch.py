"""What batching decoders buys: aggregate decode tokens/s of 8 sequences in one forward over 1.

`Model.extend_batch` runs the per-token work of every sequence (projections, router and
experts, shared expert, head) as one GEMM over their rows, so a step reads the weights
once for all of them; each sequence's attention still runs on its own history. On a CPU a
1-token step is bound by reading the weights, so that is where a batch gets its throughput.

The model (random weights, exact precision, fp32, on the CPU) is wide enough that the
weight reads dominate a decode step: hidden 1024, 4 layers (SWA, CSA, HCA, CSA at the
released rates 4 and 128, window 128, top-k 128), 8 heads of 128 (64 rope), q' 512, 4
output groups of rank 256, 4 indexer heads of 64, 16 routed experts of width 512 with 2
active plus the shared one, one hash-routed layer, vocabulary 16,384: a token reads 48.6M
weights (194 MB in fp32; the head is 16.8M of them) of the model's 153M (MTP block aside).
How much of the routed experts a batch shares depends on how many of them its tokens pick:
8 tokens choosing 2 of 16 use ~10.5 distinct experts, so the routed experts batch ~1.5x
here, the rest of the weights 8x. (Flash's 6 of 256 would share almost no expert
between 8 tokens: there the gain comes from attention projections, shared expert and head.)
"""

from __future__ import annotations

import statistics
import time

import torch

from runtime.config import CSA, HCA, SWA, ModelConfig, tiny_config
from runtime.loader import load
from runtime.model import Model, SequenceState


def bench_batch_config() -> ModelConfig:
    return tiny_config(
        vocab_size=16384, hidden_size=1024, num_hidden_layers=4, layer_types=(SWA, CSA, HCA, CSA),
        compress_rates={CSA: 4, HCA: 128}, sliding_window=128, index_topk=128, num_attention_heads=8,
        head_dim=128, rope_head_dim=64, q_lora_rank=512, o_groups=4, o_lora_rank=256, index_n_heads=4,
        index_head_dim=64, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=512,
        num_hash_layers=1, max_position_embeddings=65536, rope_original_max_position=65536,
    )


def _decode(model: Model, states: list[SequenceState], first: list[int], steps: int) -> float:
    """Seconds for `steps` greedy steps of every sequence together, one token each per step."""
    tokens = [torch.tensor([t]) for t in first]
    start = time.perf_counter()
    for _ in range(steps):
        outs = model.extend_batch(states, tokens)
        tokens = [o.logits[0].argmax().reshape(1) for o in outs]
    return time.perf_counter() - start


def bench_batch(batch: int = 8, context: int = 256, steps: int = 8, runs: int = 7, seed: int = 0,
                model: Model | None = None) -> dict:
    """Aggregate decode tokens/s with `batch` sequences decoding together against one alone.

    Each sequence first prefills `context` random tokens (not timed); every run then decodes
    `steps` tokens from copies of those states, one alone and `batch` together, alternated run
    by run (short runs, many of them: the load of a shared machine drifts within seconds) so
    that the machine's noise falls on both; the medians are reported.
    """
    if model is None:
        model = load(bench_batch_config(), precision="exact", seed=seed)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (context,), generator=generator) for _ in range(batch)]
    states = [model.new_state() for _ in range(batch)]
    first = [int(out.logits[0].argmax()) for out in model.extend_batch(states, prompts)]
    _decode(model, [s.copy() for s in states], first, 1)  # warm-up: allocator, thread pool
    alone, together = [], []
    for _ in range(runs):
        alone.append(steps / _decode(model, [states[0].copy()], first[:1], steps))
        together.append(batch * steps / _decode(model, [s.copy() for s in states], first, steps))
    one, many = statistics.median(alone), statistics.median(together)
    return {
        "batch": batch, "context": context, "steps": steps, "runs": runs, "threads": torch.get_num_threads(),
        "decode_tokens_per_s_1": round(one, 2), f"decode_tokens_per_s_{batch}": round(many, 2),
        f"throughput_{batch}_over_1": round(many / one, 3),
    }
