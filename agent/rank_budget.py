"""Choosing each file's mode (full, outlined, dropped) under a token budget so that the expected
value of the prompt is largest: a multiple-choice knapsack, solved exactly by dynamic
programming over the budget cut into at most SLOTS units.

Each file offers up to three options: dropped (value 0, cost 0), outlined (`outline_value`,
its outline's tokens) and full (`full_value`, its tokens). The packer's values are the
probability that the fix needs the file (agent/rank.py), scaled down for an outline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SLOTS = 2048  # budget units: a file's cost is rounded up to a unit, so at most 1/SLOTS of waste per file


@dataclass(frozen=True)
class Option:
    """A file's options: full text always, an outline when it has one."""

    full_value: float
    full_cost: int
    outline_value: float = 0.0
    outline_cost: int | None = None


DROPPED, OUTLINED, FULL = 0, 1, 2


def choose(options: Sequence[Option], budget: int) -> list[int]:
    """DROPPED, OUTLINED or FULL for each option, the costs of the chosen ones at most `budget`,
    their values' sum the largest possible at the unit's resolution (ties: the cheaper option,
    then the earlier file keeps it). Deterministic."""
    unit = max(1, math.ceil(budget / SLOTS))
    capacity = budget // unit
    best = np.zeros(capacity + 1)
    picks = np.zeros((len(options), capacity + 1), dtype=np.int8)
    for i, option in enumerate(options):
        new = best.copy()
        for mode, value, cost in ((OUTLINED, option.outline_value, option.outline_cost),
                                  (FULL, option.full_value, option.full_cost)):
            if cost is None or value <= 0:
                continue
            units = math.ceil(cost / unit)
            if units > capacity:
                continue
            candidate = best[: capacity + 1 - units] + value
            better = candidate > new[units:]
            new[units:][better] = candidate[better]
            picks[i, units:][better] = mode
        best = new
    modes = [DROPPED] * len(options)
    left = capacity
    for i in range(len(options) - 1, -1, -1):
        mode = int(picks[i, left])
        modes[i] = mode
        if mode:
            option = options[i]
            cost = option.full_cost if mode == FULL else option.outline_cost
            assert cost is not None
            left -= math.ceil(cost / unit)
    return modes
