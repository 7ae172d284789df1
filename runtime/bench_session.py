"""`v4agent bench session`: what keeping the KV cache warm buys, measured side by side in one run.

The model keeps the released Flash layer schedule (43 layers: 2 SWA, 21 CSA, 20 HCA; 3
hash-routed), the 128-token window, compression rates 4 and 128 and top-k 512, at small
widths so it runs on a CPU: hidden 512, 4 heads of 128 (64 rope), q' 256, 2 indexer heads
of 64, 4 experts (2 active) of width 512, vocabulary 1,024. The widths keep roughly the real
model's mix of per-token work (projections and experts) against the indexer's per-entry
scoring, which grows with the context: at hidden 128 the indexer alone would dominate. Reference precision, native
cache. Its weights are random, so the MTP block's drafts are noise: the speculative figures
measure the mechanism's cost at that acceptance, not what trained weights reach. How often
speculative and plain greedy outputs diverge is measured with drafts forced to the plain
greedy continuation (`OracleDrafts`), so that accepted pairs, the only source of divergence,
actually occur.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.config import ModelConfig, released_config, replace
from runtime.kvstore import bytes_per_token
from runtime.loader import load
from runtime.model import Model
from runtime.session import SamplingParams, Session

V32_BYTES_PER_TOKEN = 48_068  # DeepSeek-V3.2, FP8 latent (656 B) + FP8 indexer key (132 B), 61 layers
GREEDY = SamplingParams(temperature=0)
# the fixed prompt set on which speculative and plain greedy outputs are compared
SPEC_PROMPTS, SPEC_PROMPT_TOKENS, SPEC_TOKENS = 8, 64, 16


@dataclass
class OracleDrafts(Session):
    """A session whose drafts are taken from `expected` (the prompt and its plain greedy
    continuation) instead of the MTP block's guess, so that a model with random MTP weights
    still gets drafts it accepts and the 2-token verify path runs."""

    expected: list[int] = field(default_factory=list)

    def _draft(self, token: int) -> int:
        super()._draft(token)  # the MTP block's window advances as it does with real drafts
        at = len(self.tokens) + 1  # `token` goes to position len(tokens), the draft after it
        return self.expected[at] if at < len(self.expected) else 0


def bench_config() -> ModelConfig:
    return replace(released_config("flash"), hidden_size=512, num_attention_heads=4, head_dim=128, q_lora_rank=256,
                   o_groups=2, o_lora_rank=128, index_n_heads=2, index_head_dim=64, n_routed_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=512, vocab_size=1024)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _decode_ms(session: Session, n: int, speculative: bool = False) -> tuple[float, list[int]]:
    dt, out = _timed(lambda: list(session.generate(n, GREEDY, speculative=speculative)))
    return 1000 * dt / len(out), out


def spec_divergence(model: Model, prompts: list[list[int]], n: int) -> dict:
    """On each prompt: `n` tokens of plain greedy decoding, and speculative greedy decoding with
    drafts forced to that output. Counts the prompts whose outputs differ (docs/sessions.md says
    why they can in reference precision)."""
    diverged, drafted, accepted = 0, 0, 0
    for prompt in prompts:
        plain = Session(model)
        plain.extend(prompt)
        expected = prompt + list(plain.generate(n, GREEDY))
        spec = OracleDrafts(model, expected=expected)
        spec.extend(prompt)
        diverged += prompt + list(spec.generate(n, GREEDY, speculative=True)) != expected
        drafted, accepted = drafted + spec.spec.drafted, accepted + spec.spec.accepted
    return {"spec_vs_plain_prompts": len(prompts), "spec_vs_plain_diverged": diverged,
            "spec_oracle_acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0}


def bench_session(prefix: int = 16384, small: int = 4096, append: int = 256, decode_tokens: int = 16,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    config = bench_config()
    model = load(config, precision="reference")
    ids = torch.randint(2, config.vocab_size, (prefix + append,), generator=torch.Generator().manual_seed(0)).tolist()
    result: dict = {"config": "Flash schedule at small widths (see runtime/bench_session.py)",
                    "precision": "reference", "cache_format": "native", "threads": torch.get_num_threads()}

    progress(f"prefill {small} tokens")
    t_before, _ = _timed(lambda: Session(model).extend(ids[:small]))
    progress(f"prefill {prefix} tokens")
    # persisting: the prefix is saved as it is reached (its write time counts in the prefill)
    warm = Session(model, persist=True, cache_root=tempfile.mkdtemp(prefix="v4agent-bench-"))
    t_prefix, _ = _timed(lambda: warm.extend(ids[:prefix]))
    progress(f"prefill {small} tokens again")
    t_after, _ = _timed(lambda: Session(model).extend(ids[:small]))
    t_small = (t_before + t_after) / 2  # around the long run, so drift hits both sides
    progress(f"append {append} tokens to the warm session")
    turn = warm.fork()
    t_append, _ = _timed(lambda: turn.extend(ids[prefix:]))
    # a cold turn computes the same chunks: the whole prefix, then the appended tokens
    result["ttft_cold_s"] = round(t_prefix + t_append, 3)
    result["ttft_warm_s"] = round(t_append, 3)
    result["ttft_cold_over_warm"] = round((t_prefix + t_append) / t_append, 2)
    result[f"prefill_{small // 1024}k_s"] = round(t_small, 3)
    result[f"prefill_{prefix // 1024}k_s"] = round(t_prefix, 3)
    result["prefill_16k_over_4k"] = round(t_prefix / t_small, 3)

    progress("decode at the long context and at 1K")
    long_ms, _ = _decode_ms(warm.fork(), decode_tokens)
    short = Session(model)
    short.extend(ids[:1024])
    short_ms, _ = _decode_ms(short.fork(), decode_tokens)
    result["decode_ms_per_token_16k"], result["decode_ms_per_token_1k"] = round(long_ms, 2), round(short_ms, 2)
    result["decode_16k_over_1k"] = round(long_ms / short_ms, 3)

    progress("load the persisted prefix")
    t_load, found = _timed(lambda: warm.cache.load(ids[:prefix + 1]))
    if found is None or found[0].position != prefix:
        raise RuntimeError("the persisted prefix was not found again")
    result["load_prefix_s"] = round(t_load, 4)
    result["load_over_recompute_speedup"] = round(t_prefix / t_load, 1)

    progress("speculative vs plain decoding")
    plain_ms, plain_out = _decode_ms(short.fork(), 2 * decode_tokens)
    spec_session = short.fork()
    spec_ms, spec_out = _decode_ms(spec_session, 2 * decode_tokens, speculative=True)
    result["spec_acceptance_rate"] = round(spec_session.spec.acceptance_rate, 3)
    result["spec_speedup"] = round(plain_ms / spec_ms, 3)
    # rejected drafts are recomputed alone, so without an accepted pair the outputs must agree
    if spec_session.spec.accepted == 0 and spec_out != plain_out:
        raise RuntimeError("speculative greedy output differs from plain greedy output with every draft rejected")
    progress("speculative vs plain greedy outputs on a fixed prompt set")
    prompts = [torch.randint(2, config.vocab_size, (SPEC_PROMPT_TOKENS,), generator=torch.Generator().manual_seed(seed))
               .tolist() for seed in range(1, SPEC_PROMPTS + 1)]
    result.update(spec_divergence(model, prompts, SPEC_TOKENS))

    for name in ("flash", "pro"):
        native = bytes_per_token(released_config(name), "native")
        result[f"kv_bytes_per_token_{name}_native"] = round(native, 2)
        result[f"kv_bytes_ratio_{name}_vs_v32"] = round(native / V32_BYTES_PER_TOKEN, 4)
    return result
