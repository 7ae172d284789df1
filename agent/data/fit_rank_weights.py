"""Fit agent/rank.py's COEFFICIENTS again on the tune split of `v4agent bench localize`.

    python agent/data/fit_rank_weights.py [--repos DIR] [--work-dir DIR] [--l2 0.1]

Each tune case's snapshot is packed with its query at a budget of one token, so that every
file is ranked; its files' features and which of them the fix changed are one observation of
a conditional logit, P(file) = softmax(features @ w) over the repository's files. w maximises
the mean log-likelihood of the gold files (a case weighs 1, its gold files share it) minus
l2/2 |w|^2 (scaled by the number of cases), by Newton's method with step halving. `named` is
left out of the fit and keeps its weight: the queries name no paths. Prints the weights in
FEATURES order and the 5-fold cross-validated log-likelihood per case, which chose l2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.bench_localize import default_dir, load_cases, repo_git_dir, snapshot  # noqa: E402
from agent.pack import pack_repository  # noqa: E402
from agent.rank import COEFFICIENTS, FEATURES  # noqa: E402

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


def _objective(data: list[Observation], w: np.ndarray, l2: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(penalised log-likelihood, its gradient, its Hessian), summed over the cases."""
    value = -0.5 * l2 * w @ w
    gradient = -l2 * w
    hessian = -l2 * np.eye(len(w))
    for x, gold in data:
        s = x @ w
        p = np.exp(s - s.max())
        p /= p.sum()
        mean = p @ x
        hessian -= (x * p[:, None]).T @ x - np.outer(mean, mean)
        for g in gold:
            value += np.log(max(p[g], 1e-300)) / len(gold)
            gradient += (x[g] - mean) / len(gold)
    return value, gradient, hessian


def fit(data: list[Observation], l2: float) -> np.ndarray:
    w = np.zeros(data[0][0].shape[1])
    value, gradient, hessian = _objective(data, w, l2)
    for _ in range(100):
        step = np.linalg.solve(hessian, gradient)
        t = 1.0
        while True:  # halve the Newton step until it does not lose
            candidate = w - t * step
            new = _objective(data, candidate, l2)
            if new[0] >= value - 1e-12 or t < 1e-6:
                break
            t /= 2
        w, (value, gradient, hessian) = candidate, new
        if np.abs(t * step).max() < 1e-7:
            break
    return w


def log_likelihood(data: list[Observation], w: np.ndarray) -> float:
    total = 0.0
    for x, gold in data:
        s = x @ w
        log_p = s - s.max() - np.log(np.exp(s - s.max()).sum())
        total += float(np.mean(log_p[gold]))
    return total / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=Path, default=None, help="Bare clones as <owner>+<name>.git.")
    parser.add_argument("--work-dir", type=Path, default=None, help="Snapshots and token cache (as bench localize).")
    parser.add_argument("--l2", type=float, default=0.1)
    args = parser.parse_args()
    named = FEATURES.index("named")
    keep = [k for k in range(len(FEATURES)) if k != named]
    data = [(x[:, keep], gold) for x, gold in observations(args.repos, args.work_dir or default_dir())]
    held = [log_likelihood([d for i, d in enumerate(data) if i % FOLDS == k],
                           fit([d for i, d in enumerate(data) if i % FOLDS != k], args.l2)) for k in range(FOLDS)]
    w = fit(data, args.l2)
    weights = np.insert(w, named, COEFFICIENTS[named])
    print("COEFFICIENTS = np.array([" + ", ".join(f"{v:.2f}" for v in weights) + "])")
    print(f"in FEATURES order {FEATURES}; 5-fold log-likelihood {np.mean(held):.3f}, "
          f"in sample {log_likelihood(data, w):.3f}, {len(data)} cases")


if __name__ == "__main__":
    main()
