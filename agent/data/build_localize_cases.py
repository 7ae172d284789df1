"""Rebuild agent/data/localize_cases.jsonl, the cases of `v4agent bench localize`, from the git
history of the repositories in agent.bench_localize.REPOS.

    python agent/data/build_localize_cases.py [--repos DIR]

A case is a bug-fix commit, chosen by rule (nothing picked by hand):
- not a merge, committed since SINCE, its title says it fixes something (FIX_TITLE) and is not
  about docs, typos, CI, linting, releases or reverts (NOT_A_FIX);
- it modifies 1 to 3 existing non-test source files (the gold) and adds or deletes none;
- its message, cleaned (see `query`), is at least MIN_QUERY characters: "Fix #123" says nothing.
Commits with the same title (backports) count once. From each repository's candidates, oldest
first, PER_REPO[repo] are taken evenly spaced. The query is the commit's title and body, with
the paths of every file the commit changed removed, their file names too, and trailer lines
(Co-authored-by...) dropped; the snapshot is the commit's parent.

Held out (never used to tune the ranking): every case of HELD_OUT_REPO and every 4th case of
the other repositories.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.bench_localize import CASES, REPOS, repo_git_dir  # noqa: E402
from agent.pack_files import is_test_path  # noqa: E402
from agent.rank import is_source  # noqa: E402

SINCE = "2018-01-01"
PER_REPO = {"pytest-dev/pytest": 30, "pylint-dev/pylint": 30, "sphinx-doc/sphinx": 30, "pydata/xarray": 25,
            "pallets/flask": 10, "psf/requests": 10}
HELD_OUT_REPO = "pydata/xarray"
MIN_QUERY = 60
FIX_TITLE = re.compile(r"\b(fix(es|ed|ing)?|bug|crash(es)?|regression|error|incorrect(ly)?|wrong|broken|"
                       r"fail(s|ure|ing)?|exception)\b", re.IGNORECASE)
NOT_A_FIX = re.compile(r"\b(docs?|documentation|typos?|spelling|ci|lint(ing)?|flake8|mypy|pre-commit|pylint: disable|"
                       r"release|bump|revert|changelog|readme|test(s|ing)? only|coverage)\b", re.IGNORECASE)
_TRAILER = re.compile(r"^\s*(co-authored-by|signed-off-by|reviewed-by|acked-by|tested-by):.*$",
                      re.IGNORECASE | re.MULTILINE)


def query(message: str, changed: list[str]) -> str:
    """The commit message as an issue: trailers dropped, the changed files' paths removed (each
    full path, every shorter tail of it with a slash, and the file name), blank runs squeezed."""
    text = _TRAILER.sub("", message)
    mentions: set[str] = set()
    for path in changed:
        parts = path.split("/")
        mentions.update("/".join(parts[i:]) for i in range(len(parts)))
    for mention in sorted(mentions, key=len, reverse=True):  # longest first: a tail is part of a path
        text = re.sub(r"(?<![\w.-])(?:\.?/)?" + re.escape(mention) + r"(?![\w/])", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def candidates(git_dir: Path) -> list[dict[str, object]]:
    """The bug-fix commits of one repository, oldest first, as case records without `split`."""
    log = subprocess.run(
        ["git", "--git-dir", str(git_dir), "log", "--no-merges", "--no-renames", f"--since={SINCE}",
         "--format=%x1e%H%x1f%P%x1f%B%x1f", "--name-status", "HEAD"],
        check=True, capture_output=True, text=True, errors="replace").stdout
    found: list[dict[str, object]] = []
    titles: set[str] = set()
    for record in log.split("\x1e")[1:]:
        sha, parents, message, files = record.split("\x1f")
        title = message.strip().split("\n", 1)[0]
        if len(parents.split()) != 1 or not FIX_TITLE.search(title) or NOT_A_FIX.search(title) or title in titles:
            continue
        status = [line.split("\t", 1) for line in files.strip().splitlines() if "\t" in line]
        changed = [path for _, path in status]
        code = [(kind, path) for kind, path in status if is_source(path) and not is_test_path(path)]
        if not 1 <= len(code) <= 3 or any(kind != "M" for kind, _ in code):
            continue
        text = query(message, changed)
        if len(text) < MIN_QUERY:
            continue
        titles.add(title)
        found.append({"sha": sha, "parent": parents.strip(), "query": text, "gold": sorted(p for _, p in code)})
    found.reverse()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=Path, default=None, help="Where the bare clones are (default: the "
                        "bench's cache); missing ones are cloned from GitHub.")
    args = parser.parse_args()
    cases: list[dict[str, object]] = []
    for repo in REPOS:
        found = candidates(repo_git_dir(repo, args.repos))
        want = PER_REPO[repo]
        picked = [found[i * len(found) // want] for i in range(want)] if len(found) > want else found
        print(f"{repo}: {len(found)} candidates, {len(picked)} cases", file=sys.stderr)
        for i, case in enumerate(picked):
            held_out = repo == HELD_OUT_REPO or i % 4 == 3
            cases.append({"repo": repo, **case, "split": "held-out" if held_out else "tune"})
    with open(CASES, "w", encoding="utf-8") as out:
        for case in cases:
            out.write(json.dumps(case, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases written to {CASES}", file=sys.stderr)


if __name__ == "__main__":
    main()
