"""Tensor and expert parallelism on torch.distributed, launched by torchrun (docs/distributed.md).

`layout` plans which rank holds what, `shard` loads a rank's parts of a checkpoint into a
:class:`~runtime.distributed.shard.ShardedModel`, `comm` holds the collectives, `bench` the
`v4agent bench distributed` measurements; `python -m runtime.distributed` (under torchrun) is a
greedy smoke run. The modules need torch; this package's `launched` / `follower` do not.
"""

import os


def launched() -> bool:
    """Whether torchrun started this process as one rank of several (no torch needed to ask)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def follower() -> bool:
    """Whether this process is a rank other than 0 of a torchrun launch: under `runtime.load` it
    follows rank 0's model calls and never returns (runtime/distributed/follow.py)."""
    return launched() and os.environ["RANK"] != "0"
