"""The localization benchmark behind `v4agent bench localize`: does packing put the files a real
bug fix changed into the prompt in full?

Cases (agent/data/localize_cases.jsonl, rebuilt by agent/data/build_localize_cases.py): real
bug-fix commits of open-source Python repositories; query = the commit message with the paths
removed, gold = the non-test source files the fix changed, snapshot = a work tree of the parent
commit whose HEAD is that commit, with its history (the ranking reads the last commits before
it: agent/rank_graph.py). Each case is packed with the query as the issue at 32K, 128K and 512K tokens, and
side by side two baselines choose full files from the same candidates at the same costs:
BM25 over file contents (plain words) and random order, each taking files in its order while
they fit. Recall is the share of all gold files (of the split) packed in full, or outlined or
better; the baselines outline nothing.

Repositories are bare clones in `repos` (`<owner>+<name>.git`, cloned from GitHub when
missing); snapshots share their objects (git alternates), so a case costs a checkout.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.pack import PackedFile, pack_repository
from agent.pack_cache import cache_root

CASES = Path(__file__).parent / "data" / "localize_cases.jsonl"
# Four repositories of 1.1-2.5 M tokens (one held out whole) and two smaller ones.
REPOS = ("pytest-dev/pytest", "pylint-dev/pylint", "sphinx-doc/sphinx", "pydata/xarray", "pallets/flask",
         "psf/requests")
BUDGETS = {"32k": 32_768, "128k": 131_072, "512k": 524_288}
SPLITS = ("tune", "held-out")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Case:
    """A bug fix: `query` asks for it, `gold` are the files it changed, `parent` is the snapshot."""

    repo: str
    sha: str
    parent: str
    query: str
    gold: tuple[str, ...]
    split: str


def load_cases(path: Path = CASES) -> list[Case]:
    cases = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            cases.append(Case(record["repo"], record["sha"], record["parent"], record["query"],
                              tuple(record["gold"]), record["split"]))
    return cases


def default_dir() -> Path:
    return cache_root() / "localize"


def repo_git_dir(repo: str, repos: Path | None = None) -> Path:
    """The bare clone of GitHub repository `repo` ("owner/name") in `repos`, as
    `<owner>+<name>.git`: cloned from GitHub when it is not there yet."""
    path = (repos or default_dir() / "repos") / (repo.replace("/", "+") + ".git")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--bare", f"https://github.com/{repo}.git", str(path)],
                       check=True, capture_output=True)
    return path


def _git(work: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(work), *args], check=True, capture_output=True, text=True).stdout.strip()


def snapshot(git_dir: Path, commit: str, work: Path) -> Path:
    """`work` as a work tree of `commit` whose HEAD is `commit`, its history read from `git_dir`
    (git alternates). The work tree is reused from case to case: only the files that differ
    are written."""
    if not (work / ".git").is_dir():
        if work.exists() and any(work.iterdir()):
            raise ValueError(f"{work} exists and is no snapshot work tree; move it away or pick another --work-dir")
        work.mkdir(parents=True, exist_ok=True)
        _git(work, "init", "-q")
    alternates = work / ".git" / "objects" / "info" / "alternates"
    alternates.write_text(str((git_dir / "objects").resolve()) + "\n")
    _git(work, "read-tree", "--reset", "-u", f"{commit}^{{tree}}")
    _git(work, "clean", "-q", "-f", "-d", "-x")
    _git(work, "update-ref", "--no-deref", "HEAD", _git(work, "rev-parse", f"{commit}^{{commit}}"))
    return work


def bm25_order(root: Path, paths: Sequence[str], query: str, cache: dict[str, Counter[str]],
               blobs: Sequence[str], k1: float = 1.2, b: float = 0.75) -> list[str]:
    """The baseline: `paths` by BM25 of their contents (lower-cased \\w+ words) for `query`,
    best first, ties by path. `cache` keeps word counts by blob between calls."""
    counts = []
    for path, blob in zip(paths, blobs):
        if blob not in cache:
            text = (root / path).read_text(encoding="utf-8", errors="replace").lower()
            cache[blob] = Counter(_WORD.findall(text))
        counts.append(cache[blob])
    terms = set(_WORD.findall(query.lower()))
    n = len(counts)
    average = sum(sum(c.values()) for c in counts) / max(n, 1)
    df = {t: sum(1 for c in counts if t in c) for t in terms}
    scores = []
    for path, c in zip(paths, counts):
        length = sum(c.values())
        score = 0.0
        for t in terms:
            tf = c.get(t, 0)
            if tf:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average))
        scores.append((-score, path))
    return [path for _, path in sorted(scores)]


def fill(order: Sequence[str], cost: dict[str, int], budget: int) -> set[str]:
    """The files of `order` taken in full, each when it still fits."""
    taken: set[str] = set()
    spent = 0
    for path in order:
        if spent + cost[path] <= budget:
            taken.add(path)
            spent += cost[path]
    return taken


Progress = Callable[[str], None]


def run(repos: Path | None = None, work_dir: Path | None = None, *, split: str | None = None,
        repo: str | None = None, limit: int | None = None, progress: Progress | None = None,
        cases_file: Path = CASES) -> dict[str, Any]:
    """Recall of the packer and of the baselines on the cases of `cases_file` (of `split`/`repo`,
    the first `limit` of each repository), and the cold time of packing the first snapshot of
    the largest repository."""
    from runtime.tokenizer import load_tokenizer

    report = progress or (lambda message: None)
    work_dir = work_dir or default_dir()
    cases = [c for c in load_cases(cases_file) if split in (None, c.split) and repo in (None, c.repo)]
    if limit is not None:
        seen: Counter[str] = Counter()
        cases = [c for c in cases if (seen.update([c.repo]) or seen[c.repo] <= limit)]
    if not cases:
        raise ValueError("no cases match")
    tokenizer = load_tokenizer()
    token_cache = work_dir / "tokens"
    methods = ("pack", "bm25", "random")
    # per (method, budget, split): [gold full, gold outlined or better, gold files]
    tally: dict[tuple[str, str, str], list[int]] = {}
    pack_seconds: list[float] = []
    largest: tuple[int, Case] | None = None
    words: dict[str, Counter[str]] = {}  # the baseline's word counts by blob, for one repository
    for i, case in enumerate(cases):
        report(f"{i + 1}/{len(cases)} {case.repo} {case.sha[:10]}")
        if i and case.repo != cases[i - 1].repo:
            words.clear()
        work = snapshot(repo_git_dir(case.repo, repos), case.parent, work_dir / "work" / case.repo.replace("/", "+"))
        for name, budget in BUDGETS.items():
            start = time.perf_counter()
            result = pack_repository(work, budget=budget, issue=case.query, tokenizer=tokenizer,
                                     cache_dir=token_cache)
            pack_seconds.append(time.perf_counter() - start)
            files = {f.path: f for f in result.files}
            missing = [g for g in case.gold if g not in files]
            if missing:
                raise ValueError(f"{case.repo} {case.sha}: gold files not packable: {missing}")
            repo_tokens = sum(f.full_tokens for f in result.files)
            if largest is None or repo_tokens > largest[0]:
                largest = (repo_tokens, case)
            candidates = sorted(files)
            cost = {f.path: f.full_tokens for f in result.files}
            orders = {"bm25": bm25_order(work, candidates, case.query, words, [files[p].blob for p in candidates]),
                      "random": random.Random(case.sha).sample(candidates, len(candidates))}
            chosen: dict[str, tuple[set[str], set[str]]] = {"pack": _modes(result.files)}
            for method, order in orders.items():
                full = fill(order, cost, budget)
                chosen[method] = (full, full)
            for method in methods:
                full, seen_at_all = chosen[method]
                for key in ((method, name, case.split), (method, name, "all")):
                    counts = tally.setdefault(key, [0, 0, 0])
                    counts[0] += sum(g in full for g in case.gold)
                    counts[1] += sum(g in seen_at_all for g in case.gold)
                    counts[2] += len(case.gold)
    assert largest is not None
    report(f"cold pack of {largest[1].repo} {largest[1].parent[:10]}")
    work = snapshot(repo_git_dir(largest[1].repo, repos), largest[1].parent,
                    work_dir / "work" / largest[1].repo.replace("/", "+"))
    with tempfile.TemporaryDirectory(prefix="v4agent-localize-") as empty:
        start = time.perf_counter()
        cold = pack_repository(work, budget=BUDGETS["128k"], issue=largest[1].query, tokenizer=tokenizer,
                               cache_dir=Path(empty))
        cold.ids()
        cold_s = time.perf_counter() - start

    def recalls(split_name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for method in methods:
            prefix = "" if method == "pack" else f"{method}_"
            for name in BUDGETS:
                full, seen_at_all, total = tally.get((method, name, split_name), [0, 0, 0])
                out[f"{prefix}recall_full_{name}"] = round(full / total, 3) if total else None
                out[f"{prefix}recall_outline_{name}"] = round(seen_at_all / total, 3) if total else None
        return out

    by_split = {s: recalls(s) for s in SPLITS if any(c.split == s for c in cases)}
    return {
        "cases": len(cases),
        "gold_files": tally[("pack", "32k", "all")][2],
        **recalls("all"),
        "by_split": {s: {"cases": sum(c.split == s for c in cases), **values} for s, values in by_split.items()},
        "pack_warm_s": round(sorted(pack_seconds)[len(pack_seconds) // 2], 3),
        "pack_cold_s": round(cold_s, 2),
        "pack_cold_repo": f"{largest[1].repo}@{largest[1].parent[:10]} ({largest[0]:,} tokens)",
    }


def _modes(files: Sequence[PackedFile]) -> tuple[set[str], set[str]]:
    """(paths packed in full, paths packed in full or outlined)."""
    return ({f.path for f in files if f.mode == "full"}, {f.path for f in files if f.mode != "dropped"})
