"""The agent's own copy of the user's repository, and getting its work back out.

The user's checkout is never the agent's work tree. `Workspace.create` records the user's state
as a git tree — HEAD plus every uncommitted change, staged or not, and untracked files that are
not ignored — built in a temporary index, so the user's index and files are not touched (only
the blobs land in the object store, as with `git stash create`). The agent then works in a
shared clone (`git clone --shared`: no objects copied) checked out at that tree, with HEAD at
the user's HEAD.

At the end `patch()` is the difference between that tree and the agent's work tree, as a binary
git patch, in bytes (files need not be UTF-8). Both the snapshot and the patch stage files with
`stage`, which leaves out what git cannot hold — nested repositories, names git refuses
(`.GIT/x`) — and names each instead of failing. `apply_patch` applies a patch
to the user's checkout — all of it or, on any conflict, nothing — and `commit_branch` commits it
on top of HEAD on a new branch (`commit_patch`: on top of any commit, with no branch), through a
temporary index again, so neither touches anything else. Both refuse symlinks that point out of
the repository unless told otherwise.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Left out of snapshots and patches: what running Python and its tests leaves behind.
JUNK = (":(exclude,glob)**/__pycache__/**", ":(exclude,glob)**/*.py[co]", ":(exclude,glob)**/.pytest_cache/**")
# Variables that would point git at another repository than the one given (a git hook's environment).
_REPO_VARIABLES = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
                   "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_PREFIX")


class WorkspaceError(Exception):
    """A git operation on the user's repository or the agent's copy failed; the message says which."""


def _git(cwd: Path, *args: str, index: Path | None = None, stdin: bytes | None = None) -> bytes:
    """Run git in `cwd` (with `index` as the index file) and return its output, as bytes."""
    env = {k: v for k, v in os.environ.items() if k not in _REPO_VARIABLES}
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, input=stdin, capture_output=True)
    except FileNotFoundError as e:
        raise WorkspaceError(f"cannot run git in {cwd}: {e.strerror}") from None
    if done.returncode:
        message = (done.stderr.strip() or done.stdout.strip()).decode("utf-8", "replace")
        raise WorkspaceError(f"git {args[0]} failed in {cwd}: {message}")
    return done.stdout


def git(cwd: Path, *args: str, index: Path | None = None) -> str:
    """Run git in `cwd` (with `index` as the index file) and return its output as text; bytes that
    are not UTF-8 become surrogate escapes, so a path read this way names the same file."""
    return _git(cwd, *args, index=index).decode("utf-8", "surrogateescape")


def shown(path: bytes) -> str:
    """A path or symlink target as text for people: bytes that are not UTF-8 written as \\xNN."""
    return path.decode("utf-8", "backslashreplace")


def toplevel(path: Path) -> Path:
    """The top of the git work tree holding `path`."""
    if not Path(path).is_dir():
        raise WorkspaceError(f"{path} is not a directory")
    try:
        return Path(git(Path(path), "rev-parse", "--show-toplevel").strip())
    except WorkspaceError:
        raise WorkspaceError(f"{path} is not inside a git work tree") from None


def _git_path(top: Path, name: str) -> Path:
    """A file of the repository's git directory (`index`, `info/exclude`), absolute."""
    return top / git(top, "rev-parse", "--git-path", name).strip()


# Why `stage` left something out.
NESTED_REPOSITORY = "a nested git repository (its files are not part of this one)"
REFUSED_NAME = "a name git refuses (such as .git in another case)"

LeftOut = tuple[str, str]  # (path as shown, why)


def stage(root: Path, index: Path | None = None) -> list[LeftOut]:
    """Record the work tree `root` in its index (or in `index`) as `git add --all` would — junk
    aside — but leave out, and name, what git cannot hold instead of failing on it: nested
    repositories and names git refuses. (Untracked FIFOs and sockets git passes over by itself.)"""
    _git(root, "add", "--update", "--", ".", *JUNK, index=index)  # changed and deleted tracked files
    untracked = _git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", ".", *JUNK, index=index)
    left_out: list[LeftOut] = []
    wanted = []
    for path in filter(None, untracked.split(b"\0")):
        if path.endswith(b"/"):  # git lists a repository inside the work tree as a directory
            left_out.append((shown(path), NESTED_REPOSITORY))
        else:
            wanted.append(path)
    if wanted:
        # update-index skips (and does not fail on) a name git refuses; what it skipped is then
        # what the index lacks.
        _git(root, "update-index", "--add", "-z", "--stdin", stdin=b"".join(p + b"\0" for p in wanted), index=index)
        staged = set(_git(root, "ls-files", "-z", "--cached", index=index).split(b"\0"))
        left_out += [(shown(p), REFUSED_NAME) for p in wanted if p not in staged]
    return left_out


def snapshot(repo: Path) -> tuple[str, str, list[LeftOut]]:
    """(HEAD commit, tree of HEAD plus the user's uncommitted changes, what that tree left out)
    of the work tree `repo`."""
    try:
        head = git(repo, "rev-parse", "--verify", "HEAD^{commit}").strip()
    except WorkspaceError:
        raise WorkspaceError(f"{repo} has no commit yet: commit once so the agent has a base") from None
    with tempfile.TemporaryDirectory(prefix="v4agent-index-") as tmp:
        index = Path(tmp) / "index"
        own = _git_path(repo, "index")
        if own.is_file():
            shutil.copyfile(own, index)  # its stat data spares hashing every unchanged file again
        else:
            git(repo, "read-tree", "HEAD", index=index)
        left_out = stage(repo, index)
        return head, git(repo, "write-tree", index=index).strip(), left_out


@dataclass(frozen=True)
class Patch:
    """diff: the agent's changes as a binary git patch (empty when there are none); left_out:
    what is in the work tree but could not go into it."""

    diff: bytes
    left_out: tuple[LeftOut, ...] = ()


@dataclass(frozen=True)
class Workspace:
    """repo: the user's work tree; root: the agent's; head: the user's HEAD commit; base: the
    tree the agent started from (HEAD plus the user's uncommitted changes); left_out: what of the
    user's work tree could not be copied (see `stage`)."""

    repo: Path
    root: Path
    head: str
    base: str
    left_out: tuple[LeftOut, ...] = ()

    @classmethod
    def create(cls, repo: Path, root: Path, *, head: str | None = None, base: str | None = None) -> Workspace:
        """A new work tree at `root` (which must not exist) holding the current state of the user's
        repository, or, given `head` and `base` (a replay), that recorded state."""
        top = toplevel(repo)
        left_out: list[LeftOut] = []
        if head is None or base is None:
            head, base, left_out = snapshot(top)
        else:
            for name, kind in ((head, "commit"), (base, "tree")):
                try:
                    git(top, "cat-file", "-e", f"{name}^{{{kind}}}")
                except WorkspaceError:
                    raise WorkspaceError(f"{top} no longer has the recorded {kind} {name}") from None
        root.parent.mkdir(parents=True, exist_ok=True)
        git(top, "clone", "--quiet", "--shared", "--no-checkout", str(top), str(root))
        git(root, "update-ref", "--no-deref", "HEAD", head)
        git(root, "read-tree", "--reset", "-u", base)
        exclude = _git_path(top, "info/exclude")
        if exclude.is_file():  # the user's private ignore rules apply to the agent's changes too
            target = _git_path(root, "info/exclude")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(exclude, target)
        return cls(top, root.resolve(), head, base, tuple(left_out))

    def patch(self) -> Patch:
        """The agent's changes, and what could not go into them."""
        try:
            own = Path(git(self.root, "rev-parse", "--show-toplevel").strip()) == self.root
        except WorkspaceError:
            own = False
        if not own:  # git would work on a repository around it, or on none
            raise WorkspaceError(f"{self.root} is no longer a git repository of its own (was its .git removed?)")
        left_out = stage(self.root)
        tree = git(self.root, "write-tree").strip()
        # Plumbing, so the user's diff settings (no prefix, colour, external tools) cannot change it.
        diff = _git(self.root, "diff-tree", "-r", "-p", "--binary", "--full-index", self.base, tree)
        return Patch(diff, tuple(left_out))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def outside_symlinks(repo: Path, patch: bytes) -> list[str]:
    """The symlinks `patch` makes — new, retargeted, or a file turned into one — that point out of
    the repository (an absolute target, or one that climbs out with `..`), as "path -> target".
    git reads the patch: it is applied to a temporary index of just the files it touches."""
    top = toplevel(repo)
    with tempfile.TemporaryDirectory(prefix="v4agent-index-") as tmp:
        index = Path(tmp) / "index"
        try:
            _git(top, "apply", f"--build-fake-ancestor={index}", "-", stdin=patch)
            _git(top, "apply", "--cached", "-", stdin=patch, index=index)
        except WorkspaceError as e:
            raise WorkspaceError(f"cannot check where the patch's symlinks point, so nothing was changed.\n{e}"
                                 ) from None
        entries = _git(top, "ls-files", "-s", "-z", index=index)
    outside = []
    for entry in filter(None, entries.split(b"\0")):
        meta, _, path = entry.partition(b"\t")
        mode, blob, _ = meta.split(b" ")
        if mode == b"120000":
            target = _git(top, "cat-file", "blob", blob.decode())
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            if target.startswith(b"/") or resolved == b".." or resolved.startswith(b"../"):
                outside.append(f"{shown(path)} -> {shown(target)}")
    return outside


def _refuse_outside_symlinks(repo: Path, patch: bytes) -> None:
    if outside := outside_symlinks(repo, patch):
        raise WorkspaceError("the patch makes symlinks that point outside the repository, so nothing was changed "
                             "(--allow-outside-symlinks accepts them): " + ", ".join(outside))


def apply_patch(repo: Path, patch: bytes, *, allow_outside_symlinks: bool = False) -> None:
    """Apply `patch` to the work tree of `repo` (not its index): all of it, or nothing at all
    (WorkspaceError) when any part conflicts with what is there now, or when it makes a symlink
    that points out of the repository and `allow_outside_symlinks` is not set."""
    top = toplevel(repo)
    if not allow_outside_symlinks:
        _refuse_outside_symlinks(top, patch)
    try:
        _git(top, "apply", "--whitespace=nowarn", "-", stdin=patch)
    except WorkspaceError as e:
        raise WorkspaceError(f"the patch does not apply to {top}; nothing was changed.\n{e}") from None


def check_new_branch(repo: Path, branch: str) -> None:
    """Refuse a branch name that git rejects or that already exists (before any work is done)."""
    top = toplevel(repo)
    try:
        git(top, "check-ref-format", "--branch", branch)
    except WorkspaceError:
        raise WorkspaceError(f"{branch!r} is not a valid branch name") from None
    if git(top, "branch", "--list", branch).strip():
        raise WorkspaceError(f"branch {branch!r} already exists in {top}")


def commit_patch(repo: Path, patch: bytes, message: str, *, parent: str = "HEAD",
                 allow_outside_symlinks: bool = False) -> str:
    """Commit `patch` on top of `parent` (a commit of `repo`); returns the new commit, which no
    branch points to yet. The user's work tree, index and branches stay as they are. Symlinks out
    of the repository are refused as by `apply_patch`."""
    top = toplevel(repo)
    if not allow_outside_symlinks:
        _refuse_outside_symlinks(top, patch)
    head = git(top, "rev-parse", "--verify", f"{parent}^{{commit}}").strip()
    with tempfile.TemporaryDirectory(prefix="v4agent-index-") as tmp:
        index = Path(tmp) / "index"
        git(top, "read-tree", head, index=index)
        try:
            _git(top, "apply", "--cached", "--whitespace=nowarn", "-", stdin=patch, index=index)
        except WorkspaceError as e:
            raise WorkspaceError(f"the patch does not apply to {parent} (it may build on uncommitted changes; "
                                 f"use --apply instead).\n{e}") from None
        tree = git(top, "write-tree", index=index).strip()
    return git(top, "commit-tree", tree, "-p", head, "-m", message).strip()


def commit_branch(repo: Path, patch: bytes, branch: str, message: str, *, allow_outside_symlinks: bool = False
                  ) -> str:
    """Commit `patch` on top of HEAD as the new branch `branch`; returns the commit (see `commit_patch`)."""
    commit = commit_patch(repo, patch, message, allow_outside_symlinks=allow_outside_symlinks)
    git(toplevel(repo), "branch", "--no-track", branch, commit)
    return commit
