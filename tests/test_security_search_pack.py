"""Attacks on `search` and on what the packer sends to an endpoint, on real git repositories,
the real ripgrep and real subprocesses: a catastrophic pattern, Ctrl-C, the time limit, escapes
through symlinks; secret files left out of the prompt unless asked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tools.search
from tools.registry import call


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("def alpha(x):\n    return x + 1\n")
    git(root, "init", "-q")
    return root


def slow_files(root: Path, count: int) -> None:
    """Files that take rg about 1.8 s each for SLOW_PATTERN (2-core machine): Unicode word
    boundaries on non-ASCII text keep rg off its fast engines; linear, but slow."""
    line = "αλφα βήτα γάμμα δέλτα x1 ζήτα έψιλον αλφα βήτα γάμμα\n"
    for i in range(count):
        (root / f"slow{i}.txt").write_text(line * 40_000)  # 3.7 MB, under the 5 MB file limit


SLOW_PATTERN = r"(?:\b\w+\b\s*){5}\d$"


def test_catastrophic_pattern_is_linear(repo: Path):
    # `(a+)+$` backtracks exponentially in Python's re on a run of a's that ends in a non-match;
    # in a subprocess, so the test fails instead of hanging where the engine is a backtracking one.
    (repo / "data.txt").write_text("a" * 50_000 + "b\n" + "aaaa\n")
    script = ("import sys; from pathlib import Path; from tools.registry import call; "
              "print(call('search', {'pattern': '(a+)+$'}, Path(sys.argv[1])).output)")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, str(repo)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert time.monotonic() - start < 30, "the search took exponential time"
    assert done.stdout.splitlines() == ["1 matching lines in 1 files", "data.txt:2: aaaa"], done.stderr


def test_time_limit_kills_the_search(repo: Path, monkeypatch: pytest.MonkeyPatch):
    slow_files(repo, 4)
    monkeypatch.setattr(tools.search, "TIME_LIMIT_S", 0.3)
    start = time.monotonic()
    result = call("search", {"pattern": SLOW_PATTERN}, repo)
    assert time.monotonic() - start < 5
    assert not result.ok and "search took longer than 0.3 s; narrow the pattern" in result.output


def test_ctrl_c_stops_a_search_and_its_rg(repo: Path):
    # The first file is catastrophic for a backtracking engine (which then ignores Ctrl-C);
    # the others are slow for rg.
    (repo / "a.txt").write_text("a" * 40 + "b\n")
    slow_files(repo, 8)
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from tools.search import search
        from tools.base import Context, Settings
        print("searching", flush=True)
        try:
            search(Context(Path(sys.argv[1]).resolve(), Settings()), sys.argv[2])
        except KeyboardInterrupt:
            try:
                os.waitpid(-1, os.WNOHANG)
                print("a child is left")
            except ChildProcessError:
                print("interrupted, no child left")
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(repo), SLOW_PATTERN + "|(a+)+$"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert child.stdout is not None and child.stdout.readline() == "searching\n"
        time.sleep(0.5)  # into the search: the listing is done, rg is running
        start = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
        assert time.monotonic() - start < 3, "Ctrl-C was not acted on"
        assert out == "interrupted, no child left\n"
    finally:
        child.kill()
        child.wait()


def test_symlinked_parent_directory_does_not_lead_out(repo: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("top secret\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "notes.txt").write_text("nothing here\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    # The model replaces a tracked directory by a symlink out of the work tree: git's index still
    # names sub/notes.txt, which now opens the file outside.
    (repo / "sub" / "notes.txt").unlink()
    (repo / "sub").rmdir()
    (repo / "sub").symlink_to(outside)
    assert "No matches" in call("search", {"pattern": "secret"}, repo).output
    refused = call("search", {"pattern": "secret", "path": "sub"}, repo)
    assert not refused.ok and "outside the work tree" in refused.output
    assert not call("read_file", {"path": "sub/notes.txt"}, repo).ok  # the same rule as read_file


@pytest.mark.parametrize("is_git", [True, False])
def test_symlinks_to_outside_are_not_searched(tmp_path: Path, is_git: bool):
    root = tmp_path / "tree"
    root.mkdir()
    if is_git:
        git(root, "init", "-q")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.txt").write_text("top secret\n")
    (root / "link.txt").symlink_to(outside / "key.txt")
    (root / "linkdir").symlink_to(outside)
    (root / "own.txt").write_text("no secret here\n")
    assert call("search", {"pattern": "secret"}, root).output.splitlines() == [
        "1 matching lines in 1 files", "own.txt:1: no secret here"]


def test_file_set_hidden_git_binary_and_encoding(repo: Path):
    (repo / ".github").mkdir()
    (repo / ".github" / "ci.yml").write_text("run: needle\n")
    (repo / ".gitignore").write_text("build/\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.txt").write_text("needle\n")
    (repo / "blob.bin").write_bytes(b"needle\0\1\2")
    (repo / "latin.txt").write_bytes("caf\xe9 needle\n".encode("latin-1"))
    (repo / "-dash.txt").write_text("needle\n")
    assert call("search", {"pattern": "needle"}, repo).output.splitlines() == [
        "3 matching lines in 3 files", "-dash.txt:1: needle", ".github/ci.yml:1: run: needle",
        "latin.txt:1: caf\N{REPLACEMENT CHARACTER} needle"]  # not .git, build/ (ignored) or the binary file
    assert "No matches" in call("search", {"pattern": r"\[core\]"}, repo).output  # .git/config


def test_rust_regex_syntax_errors_are_clear(repo: Path):
    for pattern, expected in [(r"(?<=a)b", "look-around"), (r"(a)\1", "backreferences"), ("(", "unclosed group"),
                              (r"a\nb", r"\n")]:
        result = call("search", {"pattern": pattern}, repo)
        assert not result.ok and "invalid regular expression" in result.output and expected in result.output, (
            pattern, result.output)
        assert "--multiline" not in result.output
    # A pattern that looks like a flag is a pattern.
    (repo / "flags.txt").write_text("--files\n")
    assert call("search", {"pattern": "--files"}, repo).output.endswith("flags.txt:1: --files")


def test_rg_is_installed_with_the_package():
    assert os.access(tools.search.ripgrep(), os.X_OK)
    assert Path(tools.search.ripgrep()).parent == Path(sys.executable).parent
