"""The in-process backend: DeepSeek-V4 on the project's own runtime, one warm Session per
conversation.

Token ids are the source of truth. The session holds every token of the conversation as it was
computed — the prompt tokens and the tokens actually sampled — and each turn's prompt must start
with exactly those: the backend prefills only what was appended since (tool results, the next
generation prompt), never re-tokenizes or recomputes history.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.backends import BackendError, Completion, Listener, Prefill, Request
from runtime.dsml import DsmlParser
from runtime.encoding import EOS

if TYPE_CHECKING:
    from runtime.model import Model
    from runtime.session import SamplingParams
    from runtime.tokenizer import Tokenizer


class LocalBackend:
    """Completions from a loaded `runtime.Model`; `context_limit` is the model's own."""

    name = "local"

    def __init__(self, model: Model, tokenizer: Tokenizer, sampling: SamplingParams, *,
                 weights: str | None = None, device: str | None = None) -> None:
        from runtime.session import Session

        # persist: the packed repository's prefix is saved once and reused by every later run
        self.session = Session(model, persist=True, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.context_limit = model.config.max_position_embeddings
        self.weights, self.device = weights, device
        self.eos = tokenizer.token_to_id(EOS)

    @classmethod
    def load(cls, weights: str | Path, tokenizer: Tokenizer, sampling: SamplingParams,
             device: str | None = None) -> LocalBackend:
        """Load a V4 checkpoint directory in reference precision on `device` (default: CUDA when
        there is one)."""
        import torch

        import runtime

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = runtime.load(weights, precision="reference", device=device)
        return cls(model, tokenizer, sampling, weights=str(weights), device=device)

    def complete(self, request: Request, listener: Listener) -> Completion:
        held = self.session.tokens
        if list(request.ids[:len(held)]) != held:
            raise BackendError("the prompt does not extend the tokens the session holds: the conversation "
                               "was rewritten, which would throw away the cache")
        new = list(request.ids[len(held):])
        cached = len(held)
        start = time.perf_counter()
        listener(Prefill(0, len(new)))
        self.session.extend(new, progress=lambda done, total: listener(Prefill(done, total)))
        if not held:  # a first turn may start from a prefix an earlier run saved
            cached = self.session.cached_tokens
        prefill_s = time.perf_counter() - start

        parser = DsmlParser(think=request.think != "none", tokenizer=self.tokenizer)
        sampled: list[int] = []
        for token in self.session.generate(request.max_tokens, self.sampling, {self.eos}):
            sampled.append(token)
            for event in parser.feed_ids([token]):
                listener(event)
        for event in parser.close():
            listener(event)
        seconds = time.perf_counter() - start
        return Completion(
            self.tokenizer.decode(sampled), parser.finish(), sampled, cached,
            {"prefilled": len(new), "prefill_s": round(prefill_s, 3), "decode_s": round(seconds - prefill_s, 3)},
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights, "device": self.device,
                "context_limit": self.context_limit, "sampling": asdict(self.sampling)}
