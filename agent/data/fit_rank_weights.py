"""Fit agent/rank.py's COEFFICIENTS again on the tune split of `v4agent bench localize`.

    python agent/data/fit_rank_weights.py [--repos DIR] [--work-dir DIR] [--l2 0.1]

Each tune case's snapshot is packed with its query at a budget of one token, so that every
file is ranked; its files' features and which of them the fix changed are one observation of
a conditional logit, P(file) = softmax(features @ w) over the repository's files. w maximises
the mean log-likelihood of the gold files (a case weighs 1, its gold files share it) minus
l2/2 |w|^2 (scaled by the number of cases), by Newton's method with step halving. `named` is
left out of the fit and keeps its weight: the queries name no paths. The history features
(agent/rank.py's HISTORY_FEATURES) are fitted second, on top of the others' scores held fixed,
so that a tree without history (all of them 0) ranks exactly as the first fit says. Prints
the weights in FEATURES order and the 5-fold cross-validated log-likelihood per case (which
chose l2), for each stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.bench_localize import default_dir, load_cases, repo_git_dir, snapshot  # noqa: E402
from agent.pack import pack_repository  # noqa: E402
from agent.rank import COEFFICIENTS, FEATURES, HISTORY_FEATURES  # noqa: E402

Observation = tuple[np.ndarray, list[int]]  # (files x features, the gold files' rows)
FOLDS = 5


def observations(repos: Path | None, work_dir: Path) -> list[Observation]:
    from runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    found = []
    cases = [c for c in load_cases() if c.split == "tune"]
    for i, case in enumerate(cases):
        print(f"{i + 1}/{len(cases)} {case.repo} {case.sha[:10]}", file=sys.stderr)
        work = snapshot(repo_git_dir(case.repo, repos), case.parent, work_dir / "work" / case.repo.replace("/", "+"))
        result = pack_repository(work, budget=1, issue=case.query, tokenizer=tokenizer, cache_dir=work_dir / "tokens")
        assert result.ranking is not None
        paths = list(result.ranking.paths)
        found.append((result.ranking.features, [paths.index(g) for g in case.gold]))
    return found


def _objective(data: list[Observation], w: np.ndarray, l2: float,
               offsets: list[np.ndarray] | None) -> tuple[float, np.ndarray, np.ndarray]:
    """(penalised log-likelihood, its gradient, its Hessian), summed over the cases."""
    value = -0.5 * l2 * w @ w
    gradient = -l2 * w
    hessian = -l2 * np.eye(len(w))
    for i, (x, gold) in enumerate(data):
        s = x @ w + (offsets[i] if offsets is not None else 0.0)
        p = np.exp(s - s.max())
        p /= p.sum()
        mean = p @ x
        hessian -= (x * p[:, None]).T @ x - np.outer(mean, mean)
        for g in gold:
            value += np.log(max(p[g], 1e-300)) / len(gold)
            gradient += (x[g] - mean) / len(gold)
    return value, gradient, hessian


def fit(data: list[Observation], l2: float, offsets: list[np.ndarray] | None = None) -> np.ndarray:
    """The weights; `offsets`: per case, a fixed score added to each file's (the features fitted before)."""
    w = np.zeros(data[0][0].shape[1])
    value, gradient, hessian = _objective(data, w, l2, offsets)
    for _ in range(100):
        step = np.linalg.solve(hessian, gradient)
        t = 1.0
        while True:  # halve the Newton step until it does not lose
            candidate = w - t * step
            new = _objective(data, candidate, l2, offsets)
            if new[0] >= value - 1e-12 or t < 1e-6:
                break
            t /= 2
        w, (value, gradient, hessian) = candidate, new
        if np.abs(t * step).max() < 1e-7:
            break
    return w


def log_likelihood(data: list[Observation], w: np.ndarray, offsets: list[np.ndarray] | None = None) -> float:
    total = 0.0
    for i, (x, gold) in enumerate(data):
        s = x @ w + (offsets[i] if offsets is not None else 0.0)
        log_p = s - s.max() - np.log(np.exp(s - s.max()).sum())
        total += float(np.mean(log_p[gold]))
    return total / len(data)


def cross_validated(data: list[Observation], l2: float, offsets: list[np.ndarray] | None = None) -> float:
    """The mean held-out log-likelihood per case over FOLDS folds (case i in fold i % FOLDS)."""
    held = []
    for k in range(FOLDS):
        train = [i for i in range(len(data)) if i % FOLDS != k]
        test = [i for i in range(len(data)) if i % FOLDS == k]
        w = fit([data[i] for i in train], l2, None if offsets is None else [offsets[i] for i in train])
        held.append(log_likelihood([data[i] for i in test], w, None if offsets is None else [offsets[i] for i in test]))
    return float(np.mean(held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=Path, default=None, help="Bare clones as <owner>+<name>.git.")
    parser.add_argument("--work-dir", type=Path, default=None, help="Snapshots and token cache (as bench localize).")
    parser.add_argument("--l2", type=float, default=0.1)
    args = parser.parse_args()
    found = observations(args.repos, args.work_dir or default_dir())
    history = [FEATURES.index(name) for name in HISTORY_FEATURES]
    first = [k for k, name in enumerate(FEATURES) if name != "named" and k not in history]
    data = [(x[:, first], gold) for x, gold in found]
    w = fit(data, args.l2)
    # The history features on top of the first fit's scores (with `named`'s fixed weight).
    named = FEATURES.index("named")
    offsets = [x[:, first] @ w + x[:, named] * COEFFICIENTS[named] for x, _ in found]
    later = [(x[:, history], gold) for x, gold in found]
    w_history = fit(later, args.l2, offsets)
    weights = COEFFICIENTS.copy()
    weights[first] = w
    weights[history] = w_history
    print("COEFFICIENTS = np.array([" + ", ".join(f"{v:.2f}" for v in weights) + "])")
    print(f"in FEATURES order {FEATURES}; {len(data)} cases; 5-fold log-likelihood without history "
          f"{cross_validated(data, args.l2):.3f} (in sample {log_likelihood(data, w):.3f}), the history features "
          f"on top {cross_validated(later, args.l2, offsets):.3f} (in sample "
          f"{log_likelihood(later, w_history, offsets):.3f}, without them {log_likelihood(later, 0 * w_history, offsets):.3f})")


if __name__ == "__main__":
    main()
