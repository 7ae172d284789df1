"""Git history as evidence for the ranking (agent/rank.py): the paths each of the last
HISTORY_COMMITS commits reachable from HEAD changed, newest first, read with one bounded
`git log` and cached per HEAD commit (agent/pack.py). From it, per file:

- recency: exp(-k / RECENCY_COMMITS), k the commits since the file last changed (0 when it
  did not change in those commits): code that is being worked on holds more of the bugs;
- co-change: how often it changed together with the files the issue mentions (`seeds`,
  agent/relevance.py), each commit's share split among its other files, commits of more than
  MAX_COMMIT_FILES files skipped (reformats, renames): what had to change with a file before
  often has to again.

There is no history to read in a work tree without commits, in a shallow clone (its history
ends at the graft: every file would look recently changed) or when git fails or takes longer
than HISTORY_TIMEOUT_S; then both features are 0 for every file, and the scores are what
they would be without them.
"""

from __future__ import annotations

import math
import os
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HISTORY_COMMITS = 1000
HISTORY_TIMEOUT_S = 10.0  # a git log that takes longer is given up: no history, not a slow pack
MAX_COMMIT_FILES = 50  # a commit touching more files (a reformat, a rename) says nothing about pairs
RECENCY_COMMITS = 300.0  # recency = exp(-commits since the file last changed / this)
HISTORY_VERSION = f"h1-{HISTORY_COMMITS}"


@dataclass(frozen=True)
class History:
    """The paths each commit changed, newest first (the last HISTORY_COMMITS from HEAD)."""

    commits: tuple[tuple[str, ...], ...]

    def recency(self, paths: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """exp(-k / RECENCY_COMMITS) per path, k the commits since it last changed (0 when it
        did not change in the history read), and that k (-1: not changed)."""
        last: dict[str, int] = {}
        for k, changed in enumerate(self.commits):
            for path in changed:
                last.setdefault(path, k)
        since = [last.get(p, -1) for p in paths]
        return np.array([math.exp(-k / RECENCY_COMMITS) if k >= 0 else 0.0 for k in since]), since

    def cochange(self, paths: Sequence[str], seeds: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Per path: the sum over the commits that changed it of the seeds' weight among the
        other files each changed, divided by their number; and (the seed that gave it the most,
        the commits they share) ((-1, 0): none)."""
        index = {p: i for i, p in enumerate(paths)}
        seeded = set(np.flatnonzero(seeds > 0).tolist())
        values = np.zeros(len(paths))
        gains: dict[tuple[int, int], float] = {}
        shared: Counter[tuple[int, int]] = Counter()
        for changed in self.commits:
            if len(changed) > MAX_COMMIT_FILES:
                continue
            members = [index[p] for p in changed if p in index]
            if len(members) < 2:
                continue
            for s in (m for m in members if m in seeded):
                gain = seeds[s] / (len(members) - 1)
                for f in members:
                    if f != s:
                        values[f] += gain
                        gains[f, s] = gains.get((f, s), 0.0) + gain
                        shared[f, s] += 1
        best: list[tuple[int, int]] = [(-1, 0)] * len(paths)
        for (f, s), _ in sorted(gains.items(), key=lambda item: (item[0][0], -item[1], item[0][1])):
            if best[f][0] < 0:
                best[f] = (s, shared[f, s])
        return values, best


def read_history(root: Path, git_dir: Path, head: str) -> History | None:
    """The history of `head` in the repository at `root` (module docstring), or None when it
    is shallow or git fails or takes longer than HISTORY_TIMEOUT_S."""
    if os.path.exists(os.path.join(git_dir, "shallow")):
        return None  # a shallow clone's history ends at its graft: recency and co-change would lie
    try:
        done = subprocess.run(
            # Names only: no diff text, so no external diff or textconv program of the repository's config runs.
            ["git", "-C", str(root), "-c", "core.quotePath=false", "log", f"-n{HISTORY_COMMITS}", "--no-merges",
             "--no-renames", "--no-ext-diff", "--no-textconv", "--name-only", "--format=%x00", head, "--"],
            capture_output=True, timeout=HISTORY_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    text = done.stdout.decode("utf-8", "surrogateescape")
    commits = tuple(tuple(line for line in chunk.split("\n") if line) for chunk in text.split("\0")[1:])
    return History(commits)
