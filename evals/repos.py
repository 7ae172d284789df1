"""Getting an instance's repository at its base commit, without network when possible.

Where a repository comes from, first that has the commit:
1. `--repo-source DIR`: `DIR/owner__name` (a clone) or `DIR/owner__name.git` (a bare mirror);
2. the cache, `$V4AGENT_CACHE/evals/repos/owner__name.git`;
3. an instance with an `sdist` field ("name==version", `sdist_sha256` beside it) is rebuilt from
   that release on PyPI as one deterministic commit (fixed author, date and message: the same
   files always give the same hash), which is how the bundled mini set ships without repos;
4. otherwise a mirror clone from GitHub into the cache.

Work trees hold the base commit's history and nothing else, as the official harness's images do
since SWE-bench issue #465 (agents ran `git log --all` and found the fix): HEAD detached at the
base commit, the tags that point into its history, no remote, no branch; `git log` and
`git blame` work, and no object a later commit added can be listed or read. A fresh repository
per instance, filled without copying a whole history each time: a repository's history is cut
along the base's first-parent line into shared packs, cached and reused by every instance whose
base lies above them (`history_packs`), and only the last few commits are packed per instance.
A shared pack is named by its top commit, the first-parent ancestor of the base at a depth p that
a step divides, and holds what that commit has and the one a step below it has not: so it holds
nothing that is not in the history of every base that uses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from evals.cache import evals_cache, locked
from evals.instances import Instance
from evals.proc import EvalError, git

# Fixed identity and time of sdist commits: part of what makes their hashes reproducible.
_SDIST_COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "v4agent evals", "GIT_AUTHOR_EMAIL": "evals@v4agent.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000", "GIT_COMMITTER_NAME": "v4agent evals",
    "GIT_COMMITTER_EMAIL": "evals@v4agent.invalid", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}
# First-parent commits per shared history pack: large ones, then smaller ones up to the base, so an
# instance packs fewer than 100 commits itself and has at most depth/4000 + 13 packs (git starts
# repacking at 50).
HISTORY_STEPS = (4000, 1000, 100)  # each divides the one before: a top's depth says its step
_NO_CONVERSION = ["-c", "core.autocrlf=false", "-c", "core.safecrlf=false", "-c", "core.filemode=true",
                  "-c", "commit.gpgsign=false"]


def has_commit(repo: Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo,
                          capture_output=True).returncode == 0


def download_sdist(requirement: str, sha256: str | None = None, cache: Path | None = None) -> Path:
    """The sdist archive of `name==version`, from the cache or `pip download` (checked against
    `sha256` when given)."""
    folder = (cache or evals_cache()) / "sdists" / requirement.replace("==", "-")
    with locked(folder):
        found = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
        if not found:
            with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
                done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                       ":all:", requirement, "-d", tmp], capture_output=True, text=True)
                if done.returncode != 0:
                    raise EvalError(f"pip download {requirement} failed: {done.stderr.strip()[-1500:]}")
                folder.mkdir(parents=True, exist_ok=True)
                for file in Path(tmp).iterdir():
                    file.rename(folder / file.name)
            found = list(folder.iterdir())
    archive = found[0]
    if sha256 and hashlib.sha256(archive.read_bytes()).hexdigest() != sha256:
        raise EvalError(f"{archive}: sha256 differs from the instance's sdist_sha256 (a different release file?)")
    return archive


def sdist_commit(repo: Path, archive: Path, ref: str) -> str:
    """Commit the files of `archive` (its top folder stripped) as one root commit in the git
    repository `repo`, deterministically (the message is the archive's name); returns the
    commit and points `ref` at it."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.unpack_archive(archive, tmp, filter="data")
        entries = list(Path(tmp).iterdir())
        tree_root = entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(tmp)
        env = {**os.environ, **_SDIST_COMMIT_ENV, "GIT_INDEX_FILE": str(Path(tmp) / ".index")}
        base = ["--git-dir", str(repo), "--work-tree", str(tree_root), *_NO_CONVERSION]
        git(*base, "add", "--all", "--force", ".", cwd=tree_root, env=env)
        tree = git(*base, "write-tree", cwd=tree_root, env=env).strip()
        commit = git(*base, "commit-tree", tree, "-m", f"sdist {archive.name}", cwd=tree_root, env=env).strip()
    git("update-ref", ref, commit, cwd=repo)
    return commit


def history_tops(source: Path, commit: str, steps: Sequence[int]) -> list[tuple[str, str | None]]:
    """The (top, bottom) commits of the shared packs `commit`'s history is cut into, oldest first:
    first-parent ancestors of `commit` at depths that are multiples of a step, each pack the
    objects of top not reachable from bottom (None: the first pack, from the root)."""
    line = git("rev-list", "--first-parent", commit, cwd=source).split()  # newest first
    depths: list[int] = []
    for step in steps:
        at = depths[-1] if depths else 0
        while at + step <= len(line):
            at += step
            depths.append(at)
    tops = [line[len(line) - depth] for depth in depths]
    return list(zip(tops, [None, *tops]))  # each pack starts where the one before it ends


def _git_stdin(*args: str, lines: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(["git", *args], cwd=cwd, input="".join(line + "\n" for line in lines), capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise EvalError(f"git {args[0]} failed in {cwd}: {done.stderr.strip()[-2000:]}")


def write_pack(source: Path, revisions: Sequence[str], into: Path) -> None:
    """Pack the objects of `revisions` (rev-list arguments: `top`, `^bottom`, tag objects) from
    the repository `source` into the object folder `into` (a .pack and its .idx)."""
    (into / "pack").mkdir(parents=True, exist_ok=True)
    objects = (source / git("rev-parse", "--git-common-dir", cwd=source).strip()).resolve() / "objects"
    # git writes the pack in its object folder first, then renames it: `into` is that folder (the
    # source's objects read as alternates), so the rename never crosses file systems
    env = {**os.environ, "GIT_OBJECT_DIRECTORY": str(into), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects)}
    _git_stdin("pack-objects", "--revs", "--quiet", str(into / "pack" / "pack"), lines=revisions, cwd=source, env=env)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system (the cache and --out apart)
        shutil.copyfile(source, target)


class RepoStore:
    """Finds or makes a git repository holding an instance's base commit."""

    def __init__(self, repo_source: Path | None = None, cache: Path | None = None) -> None:
        self.repo_source = repo_source
        self.cache = cache or evals_cache()

    def _mirror(self, instance: Instance) -> Path:
        return self.cache / "repos" / f"{instance.repo_key}.git"

    def source(self, instance: Instance) -> Path:
        """A repository that has `instance.base_commit`."""
        candidates = []
        if self.repo_source:
            candidates += [self.repo_source / instance.repo_key, self.repo_source / f"{instance.repo_key}.git"]
        candidates.append(self._mirror(instance))
        for repo in candidates:
            if repo.is_dir() and has_commit(repo, instance.base_commit):
                return repo
        mirror = self._mirror(instance)
        with locked(mirror):
            if not mirror.is_dir():
                mirror.parent.mkdir(parents=True, exist_ok=True)
                if "sdist" in instance.extra:
                    git("init", "--quiet", "--bare", str(mirror), cwd=mirror.parent)
                else:
                    git("clone", "--quiet", "--mirror", f"https://github.com/{instance.repo}.git", str(mirror),
                        cwd=mirror.parent)
            if not has_commit(mirror, instance.base_commit):
                self._fetch(instance, mirror)
        return mirror

    def _fetch(self, instance: Instance, mirror: Path) -> None:
        requirement = instance.extra.get("sdist")
        if requirement:
            archive = download_sdist(requirement, instance.extra.get("sdist_sha256"), self.cache)
            made = sdist_commit(mirror, archive, f"refs/heads/sdist/{requirement.replace('==', '-')}")
            if made != instance.base_commit:
                raise EvalError(f"{instance.instance_id}: rebuilding {requirement} gave commit {made}, "
                                f"not the base_commit {instance.base_commit}")
            return
        git("fetch", "--quiet", "origin", instance.base_commit, cwd=mirror)
        if not has_commit(mirror, instance.base_commit):
            raise EvalError(f"{instance.instance_id}: commit {instance.base_commit} not found in {instance.repo}")

    def history_packs(self, instance: Instance, source: Path) -> tuple[list[Path], str | None]:
        """The object folders of the shared packs below the base commit (built once, under a lock,
        then only read) and the top of the last one (None: there is none)."""
        folders = []
        chain = history_tops(source, instance.base_commit, HISTORY_STEPS)
        for top, bottom in chain:
            folder = self.cache / "history" / instance.repo_key / top
            if not folder.is_dir():
                with locked(folder):
                    if not folder.is_dir():  # a finished pack appears at once, by a rename
                        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
                            write_pack(source, [top, *([f"^{bottom}"] if bottom else [])], Path(tmp) / "objects")
                            (Path(tmp) / "objects").rename(folder)
            folders.append(folder)
        return folders, chain[-1][0] if chain else None

    def checkout(self, instance: Instance, dest: Path, *, self_contained: bool = False) -> Path:
        """A fresh work tree at the base commit, at `dest`, with the base's history only.

        The shared packs are borrowed (git alternates: the sandbox and the grading container
        show them read-only), or with `self_contained` hard-linked (copied across file systems)
        into the tree's own object folder: the agent's tree, which `v4agent fix` clones in turn
        and whose sandbox shows only the objects that copy borrows directly. Never hard-linked
        for grading: handing that tree's .git to the sandbox's uid would hand it the cache's
        files too."""
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = self.source(instance)
        git("init", "--quiet", str(dest), cwd=dest.parent)
        objects = dest / ".git" / "objects"
        shared, last = self.history_packs(instance, source)
        if self_contained:
            for folder in shared:
                for file in (folder / "pack").iterdir():
                    _link_or_copy(file, objects / "pack" / file.name)
        elif shared:
            (objects / "info" / "alternates").write_text("".join(f"{folder}\n" for folder in shared))
        # the tags of the base's history (as the official images keep them: versions from git describe)
        listed = git("for-each-ref", f"--merged={instance.base_commit}", "--format=%(objectname) %(refname)",
                     "refs/tags", cwd=source)
        tags = [line.split(" ", 1) for line in listed.splitlines()]
        write_pack(source, [instance.base_commit, *([f"^{last}"] if last else []), *(name for name, _ in tags)],
                   objects)
        _git_stdin("update-ref", "--stdin", lines=[f"create {ref} {name}" for name, ref in tags], cwd=dest)
        git("checkout", "--quiet", "--detach", instance.base_commit, cwd=dest)
        return dest
