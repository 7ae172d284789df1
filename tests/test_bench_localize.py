"""`v4agent bench localize` on a small real repository with a history: which commits become
cases and what their queries keep, snapshots with their history, the baselines, and one run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from agent.bench_localize import CASES, REPOS, bm25_order, fill, load_cases, run, snapshot

BUILDER = CASES.parent / "build_localize_cases.py"


def builder():
    spec = importlib.util.spec_from_file_location("build_localize_cases", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def commit(root: Path, message: str, files: dict[str, str]) -> str:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


CORE = "def frobnicate(items):\n    return items[0]\n"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A repository `acme/widgets` (bare clone in repos/) with one bug fix that makes a case
    and commits that must not."""
    root = tmp_path_factory.mktemp("widgets")
    git(root, "init", "-q")
    shas = {"init": commit(root, "Initial", {
        "widgets/__init__.py": "", "widgets/core.py": CORE, "widgets/util.py": "def helper():\n    return 1\n",
        "tests/test_core.py": "from widgets.core import frobnicate\n", "README.md": "# Widgets\n"})}
    shas["fix"] = commit(root, "Fix crash in frobnicate when the list is empty\n\n"
                               "widgets/core.py raised IndexError; see core.py and widgets/util.py.\n\n"
                               "Co-authored-by: Someone <someone@example.com>\n",
                         {"widgets/core.py": "def frobnicate(items):\n    return items[0] if items else None\n",
                          "tests/test_core.py": "from widgets.core import frobnicate\n\nfrobnicate([])\n"})
    shas["docs"] = commit(root, "Docs: fix a typo in the readme of the widgets", {"README.md": "# Widgets!\n"})
    shas["new"] = commit(root, "Fix the missing parser by adding a brand new module for it",
                         {"widgets/parser.py": "def parse():\n    pass\n", "widgets/util.py": "def helper():\n    return 2\n"})
    shas["short"] = commit(root, "Fix #12", {"widgets/util.py": "def helper():\n    return 3\n"})
    repos = tmp_path_factory.mktemp("repos")
    subprocess.run(["git", "clone", "-q", "--bare", str(root), str(repos / "acme+widgets.git")], check=True)
    return repos, shas


def test_cases_are_bug_fixes_of_existing_source_files_with_paths_removed(history):
    repos, shas = history
    found = builder().candidates(repos / "acme+widgets.git")
    assert [case["sha"] for case in found] == [shas["fix"]]  # docs, an added file, a bare "Fix #12": none
    case = found[0]
    assert case["parent"] == shas["init"] and case["gold"] == ["widgets/core.py"]
    assert case["query"] == ("Fix crash in frobnicate when the list is empty\n\n"
                             " raised IndexError; see  and widgets/util.py.")
    assert "Co-authored-by" not in case["query"]


def test_snapshot_is_the_parent_with_its_history(history, tmp_path: Path):
    repos, shas = history
    work = snapshot(repos / "acme+widgets.git", shas["init"], tmp_path / "work")
    assert (work / "widgets" / "core.py").read_text() == CORE
    assert git(work, "rev-parse", "HEAD") == shas["init"] and git(work, "status", "--porcelain") == ""
    # The same work tree moves to another commit: files it no longer has are gone, the history
    # up to that commit is there (and nothing after it).
    snapshot(repos / "acme+widgets.git", shas["new"], work)
    assert (work / "widgets" / "parser.py").is_file() and git(work, "rev-parse", "HEAD") == shas["new"]
    assert git(work, "rev-list", "--count", "HEAD") == "4" and git(work, "status", "--porcelain") == ""
    snapshot(repos / "acme+widgets.git", shas["init"], work)
    assert not (work / "widgets" / "parser.py").exists() and git(work, "status", "--porcelain") == ""
    # A directory that is not one of its work trees is never cleared.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="no snapshot work tree"):
        snapshot(repos / "acme+widgets.git", shas["init"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_baselines(tmp_path: Path):
    (tmp_path / "a.py").write_text("ledger balance ledger\n")
    (tmp_path / "b.py").write_text("nothing here\n")
    (tmp_path / "c.py").write_text("balance\n")
    paths = ["a.py", "b.py", "c.py"]
    assert bm25_order(tmp_path, paths, "the ledger balance", {}, ["1", "2", "3"]) == ["a.py", "c.py", "b.py"]
    assert fill(["a.py", "b.py", "c.py"], {"a.py": 5, "b.py": 9, "c.py": 4}, 10) == {"a.py", "c.py"}


def test_run_reports_every_method_and_budget(history, tmp_path: Path):
    repos, shas = history
    [case] = builder().candidates(repos / "acme+widgets.git")
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"repo": "acme/widgets", **case, "split": "tune"}) + "\n")
    result = run(repos, tmp_path / "work", cases_file=cases)
    assert result["cases"] == 1 and result["gold_files"] == 1
    for prefix in ("", "bm25_", "random_"):
        for budget in ("32k", "128k", "512k"):
            assert result[f"{prefix}recall_full_{budget}"] == 1.0  # the repository fits: all of it is full
    assert set(result["by_split"]) == {"tune"} and result["pack_cold_s"] > 0
    with pytest.raises(ValueError, match="no cases"):
        run(repos, tmp_path / "work", cases_file=cases, split="held-out")


def test_the_case_list():
    cases = load_cases()
    assert len(cases) >= 100 and {c.repo for c in cases} == set(REPOS)
    assert all(1 <= len(c.gold) <= 3 and c.split in ("tune", "held-out") for c in cases)
    held_out = [c for c in cases if c.split == "held-out"]
    assert {c.repo for c in held_out} == set(REPOS) and len(held_out) >= len(cases) // 4
    for c in cases:
        for gold in c.gold:
            assert gold not in c.query  # paths are removed from the queries
