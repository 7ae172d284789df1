"""Tensor and expert parallelism on torch.distributed, launched by torchrun (docs/distributed.md).

`layout` plans which rank holds what, `shard` loads a rank's parts of a checkpoint into a
:class:`~runtime.distributed.shard.ShardedModel`, `comm` holds the collectives, `bench` the
`v4agent bench distributed` measurements; `python -m runtime.distributed` (under torchrun) is a
greedy smoke run. Imported only when used: it needs torch.
"""
