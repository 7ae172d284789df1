"""Shared fixtures: tiny real checkpoints in the official layout, written by our own writer."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

# One torch thread, here and in every process a test starts (they inherit the environment): on
# 2 cores, OpenMP's threads spin-wait for each other, and when anything else runs beside them
# (the engine's thread next to an HTTP client, a server subprocess, another job on the machine)
# the tiny models' steps got 10-15x slower (test_parity and test_exactness: 735 s at a load of
# 3.5 with 2 threads, 82 s with one). Thread counts change only summation order, which every
# comparison here already tolerates or pins (see tests/test_kernels.py's one_thread).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch  # after OMP_NUM_THREADS, which torch reads when it loads

torch.set_num_threads(1)

from runtime.checkpoint import random_weights, write_checkpoint
from runtime.config import CSA, HCA, SWA, ModelConfig, tiny_config

# Tests never write into the user's caches (~/.cache/v4agent): token caches, saved prefixes,
# runs and eval environments go to a test-only root, kept between runs for speed.
os.environ.setdefault("V4AGENT_CACHE", str(Path.home() / ".cache" / "v4agent-tests"))

# Two schedules: the default tiny one (SWA, CSA, HCA with rate 8, CSA; one hash layer) and one
# with the released rates and window (CSA 4, HCA 128, W = 128) so lengths cross 128 boundaries.
CONFIGS: dict[str, ModelConfig] = {
    "tiny": tiny_config(vocab_size=512),
    "released_rates": tiny_config(
        vocab_size=512, num_hidden_layers=3, layer_types=(CSA, HCA, SWA), compress_rates={CSA: 4, HCA: 128},
        sliding_window=128, num_hash_layers=2, index_topk=8, rope_original_max_position=65536,
    ),
}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    """`checkpoint_dir(name, seed)` -> a written checkpoint directory (cached per session)."""
    cache: dict[tuple[str, int], Path] = {}

    def make(name: str = "tiny", seed: int = 0) -> Path:
        if (name, seed) not in cache:
            cfg = CONFIGS[name]
            path = tmp_path_factory.mktemp(f"ckpt-{name}-{seed}")
            cache[(name, seed)] = write_checkpoint(path, cfg, random_weights(cfg, seed), overwrite=True)
        return cache[(name, seed)]

    return make


@pytest.fixture(scope="session")
def tiny_v4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`v4agent model make-tiny`'s checkpoint (the real V4 vocabulary, so text tokenizes as it
    would on the released model), written once per session at `.../tiny-v4` (its name is the
    model name a server gives it). Shared: tests read it and never write into it."""
    from runtime.checkpoint import make_tiny

    return make_tiny(tmp_path_factory.mktemp("shared") / "tiny-v4")


def tokens(n: int, seed: int = 0) -> list[int]:
    """`n` random token ids of the tiny vocabulary (ids 0 and 1 are special), by `seed`."""
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def exact(checkpoint_dir):
    """The tiny checkpoint in exact precision (fp32)."""
    from runtime import load

    return load(checkpoint_dir("tiny", 0))


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """The tiny checkpoint in reference precision (bf16, FP8 activations, native cache)."""
    from runtime import load

    return load(checkpoint_dir("tiny", 0), precision="reference")


def load_hf(path: Path):
    """transformers' DeepseekV4ForCausalLM on the same files, in fp32 (the oracle)."""
    from transformers import DeepseekV4ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.float().eval()  # BF16-on-disk tensors stay bf16 otherwise


def pytest_sessionstart(session: pytest.Session) -> None:
    """The agent runs every command of the model in the sandbox and refuses to run without it, so
    do its tests: say so once, plainly, instead of failing a test at a time."""
    from tools import sandbox

    if not sandbox.available():
        try:
            sandbox.check()
        except sandbox.SandboxUnavailable as e:
            raise pytest.UsageError(f"the tests need the sandbox: {e}") from None
