"""The agent's private copy of a repository: made from HEAD plus the user's uncommitted work,
its patch, applying it (all or nothing) and committing it on a new branch — on real git
repositories, never touching anything the user did not ask for."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.workspace import Workspace, WorkspaceError, apply_patch, check_new_branch, commit_branch
from tests.fixtures_agent import BUGGY, FIXED, git, make_repo


def state(repo: Path) -> dict:
    """Everything a user could notice: files (outside .git), index, status, branches, HEAD."""
    files = {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*"))
             if p.is_file() and ".git" not in p.relative_to(repo).parts}
    return {"files": files, "index": git(repo, "ls-files", "-s"), "status": git(repo, "status", "--porcelain"),
            "branches": git(repo, "branch", "-a"), "head": git(repo, "rev-parse", "HEAD"),
            "worktrees": git(repo, "worktree", "list")}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = make_repo(tmp_path / "repo")
    (repo / "notes.txt").write_text("notes\nthe user's unsaved thought\n")  # unstaged
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")  # staged
    (repo / "scratch.py").write_text("print('scratch')\n")  # untracked
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "calc.cpython-311.pyc").write_bytes(b"\0junk")
    return repo


def test_workspace_holds_head_plus_uncommitted_work_and_leaves_the_user_alone(repo: Path, tmp_path: Path):
    (repo / "sub").mkdir()
    (repo / "sub" / "more.txt").write_text("more\n")
    before = state(repo)
    ws = Workspace.create(repo / "sub", tmp_path / "run" / "work")  # any directory of the work tree will do
    assert state(repo) == before
    assert ws.repo == repo.resolve()
    assert (ws.root / "sub" / "more.txt").read_text() == "more\n"
    assert (ws.root / "notes.txt").read_text() == "notes\nthe user's unsaved thought\n"
    assert (ws.root / "staged.txt").read_text() == "staged\n"
    assert (ws.root / "scratch.py").is_file()
    assert not (ws.root / "__pycache__").exists()  # junk is not the user's work
    assert (ws.root / ".git").is_dir()  # its own repository: the sandbox can make it read-only
    assert git(ws.root, "rev-parse", "HEAD") == before["head"]
    assert ws.patch().diff == b"" and ws.left_out == ()
    ws.remove()
    assert not ws.root.exists()


def test_patch_has_the_agents_changes_only_and_applies_all_or_nothing(repo: Path, tmp_path: Path):
    ws = Workspace.create(repo, tmp_path / "work")
    (ws.root / "calc.py").write_text(FIXED)
    (ws.root / "new_module.py").write_text("VALUE = 1\n")
    (ws.root / "scratch.py").unlink()
    (ws.root / "data.bin").write_bytes(bytes(range(256)))
    subprocess.run(["python", "-c", "import calc"], cwd=ws.root, check=True)  # leaves __pycache__ behind
    patch = ws.patch().diff
    assert b"calc.py" in patch and b"new_module.py" in patch and b"scratch.py" in patch and b"GIT binary patch" in patch
    assert b"notes.txt" not in patch and b"__pycache__" not in patch

    # The user edits the same line meanwhile: refused, and nothing at all changes.
    (repo / "calc.py").write_text("def add(a, b):\n    return b - a\n")
    before = state(repo)
    with pytest.raises(WorkspaceError, match="does not apply"):
        apply_patch(repo, patch)
    assert state(repo) == before

    # Back as it was: every part applies; the user's other work stays.
    (repo / "calc.py").write_text(BUGGY)
    index = git(repo, "ls-files", "-s")
    apply_patch(repo, patch)
    assert (repo / "calc.py").read_text() == FIXED
    assert (repo / "new_module.py").read_text() == "VALUE = 1\n"
    assert (repo / "data.bin").read_bytes() == bytes(range(256))
    assert not (repo / "scratch.py").exists()
    assert (repo / "notes.txt").read_text() == "notes\nthe user's unsaved thought\n"
    assert git(repo, "ls-files", "-s") == index  # the index is not touched


def test_commit_branch_puts_the_patch_on_head_and_nothing_else(repo: Path, tmp_path: Path):
    ws = Workspace.create(repo, tmp_path / "work")
    (ws.root / "calc.py").write_text(FIXED)
    patch = ws.patch().diff
    before = state(repo)
    commit = commit_branch(repo, patch, "agent/fix-add", "Fix add\n\nIt subtracted.\n")
    after = state(repo)
    assert after["branches"] != before["branches"]
    assert {k: v for k, v in after.items() if k != "branches"} == {k: v for k, v in before.items() if k != "branches"}
    assert git(repo, "rev-parse", "agent/fix-add").strip() == commit
    assert git(repo, "rev-parse", f"{commit}^").strip() == before["head"].strip()
    assert git(repo, "diff", "--name-only", "HEAD", commit).split() == ["calc.py"]
    assert git(repo, "show", f"{commit}:calc.py") == FIXED
    assert git(repo, "log", "-1", "--format=%s", commit).strip() == "Fix add"
    with pytest.raises(WorkspaceError, match="already exists"):
        check_new_branch(repo, "agent/fix-add")
    with pytest.raises(WorkspaceError, match="not a valid branch name"):
        check_new_branch(repo, "bad..name")


def test_a_patch_on_uncommitted_work_cannot_become_a_branch(repo: Path, tmp_path: Path):
    ws = Workspace.create(repo, tmp_path / "work")
    (ws.root / "notes.txt").write_text("notes\nthe user's unsaved thought, finished\n")
    before = state(repo)
    with pytest.raises(WorkspaceError, match="does not apply to HEAD"):
        commit_branch(repo, ws.patch().diff, "agent/notes", "notes")
    assert state(repo) == before


def test_a_recorded_base_is_recreated_exactly(repo: Path, tmp_path: Path):
    first = Workspace.create(repo, tmp_path / "one")
    (repo / "notes.txt").write_text("changed after the run\n")
    again = Workspace.create(repo, tmp_path / "two", head=first.head, base=first.base)
    assert (again.root / "notes.txt").read_text() == "notes\nthe user's unsaved thought\n"
    with pytest.raises(WorkspaceError, match="no longer has the recorded tree"):
        Workspace.create(repo, tmp_path / "three", head=first.head, base="0" * 40)


def test_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(WorkspaceError, match="not inside a git work tree"):
        Workspace.create(tmp_path, tmp_path / "work")
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(WorkspaceError, match="no commit yet"):
        Workspace.create(empty, tmp_path / "work")
