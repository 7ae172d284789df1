"""`runtime.load`: a ready model from a checkpoint directory or from a config (random weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch

from runtime.checkpoint import (CheckpointError, encode_weights, inventory, logical_names, logical_tensor,
                                open_checkpoint, random_weights)
from runtime.config import RELEASED, ModelConfig, load_config
from runtime.model import Model, QLinear


class WeightSource(Protocol):
    def raw(self, name: str) -> torch.Tensor: ...
    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


class RandomWeights:
    """Random weights for a config, held as a checkpoint would store them (FP8/FP4 + scales),
    so a model built from a config runs exactly like one loaded from files."""

    def __init__(self, config: ModelConfig, seed: int) -> None:
        self._inventory = inventory(config)
        self._stored = encode_weights(config, random_weights(config, seed))

    def raw(self, name: str) -> torch.Tensor:
        return self._stored[name]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return logical_tensor(name, self._inventory, self.raw, dtype)


def load(source: str | Path | ModelConfig, precision: str = "exact", device: str | torch.device = "cpu", *,
         seed: int = 0, offload_experts: bool = False) -> Model:
    """Build a :class:`~runtime.model.Model` ready for `forward(input_ids)`.

    `source`: a checkpoint directory in the official layout (weights loaded lazily from
    memory-mapped shards, every tensor checked), or a config (a :class:`ModelConfig`, a
    config.json path, or 'flash' / 'pro') for a model with random weights.
    `precision`: "exact" (fp32, no low-precision simulation) or "reference" (bf16 with the
    reference's FP8/FP4 simulations). Routed experts stay in their FP4/FP8 checkpoint format
    and are dequantized on use; `offload_experts=True` keeps them in host memory (with a
    checkpoint, memory-mapped from disk) and moves only the experts a chunk uses to `device`.

    Under torchrun (several ranks) each rank loads its part of the checkpoint; rank 0 gets the
    model and every other rank follows its calls, then exits (runtime/distributed/follow.py).
    """
    from runtime.distributed import launched

    if launched():  # torchrun started several ranks: split the model, rank 0 leads (docs/distributed.md)
        from runtime.distributed.follow import load_launched

        if offload_experts:
            raise ValueError("offload_experts is for one process; under torchrun the experts are split instead")
        return load_launched(source, precision, device)
    device = torch.device(device)
    weights: WeightSource
    if isinstance(source, ModelConfig) or str(source) in RELEASED or Path(source).is_file():
        config = source if isinstance(source, ModelConfig) else load_config(source)
        weights = RandomWeights(config, seed)
        identity = f"random:{_digest(json.dumps(config.to_hf_dict(), sort_keys=True).encode())}:{seed}"
    else:
        weights = open_checkpoint(source)
        config = weights.config
        identity = f"checkpoint:{weights.identity()}"
    with torch.device("meta"):
        model = Model(config, precision)
    _fill(model, weights, device, offload_experts)
    model.identity = identity
    return model.eval()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fill(model: Model, weights: WeightSource, device: torch.device, offload_experts: bool) -> None:
    expected = set(logical_names(inventory(model.config)))
    names = {n for n in model.state_dict() if not n.endswith(".scale")}
    if names != expected:  # a model/inventory disagreement is a bug in this runtime, say which names
        diff = sorted(names ^ expected)
        raise CheckpointError(f"model and checkpoint inventory disagree on {len(diff)} names, e.g. {diff[:3]}")
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, QLinear) and module.fmt != "dense":
            keep = torch.device("cpu") if offload_experts else device
            for attr in ("weight", "scale"):
                module._buffers[attr] = weights.raw(dot + attr).to(keep)
            continue
        for attr, buf in module._buffers.items():
            if buf is not None:
                t = weights.tensor(dot + attr, buf.dtype) if buf.dtype != torch.long else weights.raw(dot + attr)
                module._buffers[attr] = t.to(device)
