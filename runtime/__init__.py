"""The in-process DeepSeek-V4 runtime (see docs/runtime.md).

    import runtime, torch
    model = runtime.load("path/to/DeepSeek-V4-Flash", precision="reference", device="cuda")
    logits = model(torch.tensor([[0, 1234, 5678]]))   # [batch, seq, vocab], fp32

`import runtime` (and `runtime.config`, `runtime.tokenizer`) does not import torch: the names
that need it (`load`, `Model`, `PRECISIONS`, `CheckpointError`) are imported on first use, so
the command line and the packer start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtime.config import ConfigError, ModelConfig, load_config, released_config

if TYPE_CHECKING:
    from runtime.checkpoint import CheckpointError
    from runtime.loader import load
    from runtime.model import PRECISIONS, Model

_LAZY = {"load": "runtime.loader", "Model": "runtime.model", "PRECISIONS": "runtime.model",
         "CheckpointError": "runtime.checkpoint"}

__all__ = ["load", "Model", "ModelConfig", "PRECISIONS", "ConfigError", "CheckpointError", "load_config",
           "released_config"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value
