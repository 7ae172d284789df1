"""The model's tools on real work trees (git repositories made in tmp dirs) and real
subprocesses: confinement to the work tree, timeouts, bounded output, precise edit errors,
search caps, and bad calls turned into error results."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tools import sandbox
from tools.base import Settings
from tools.registry import call, default_tools, schemas
from tools.shell import scrubbed_env

NO_SANDBOX = Settings(sandbox="off")
needs_bwrap = pytest.mark.skipif(not sandbox.available(), reason="bubblewrap is not installed or cannot run here")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("import os\n\n\ndef alpha(x):\n    return x + 1\n\n\n"
                                         "def beta(y):\n    return y * 2\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "README.md").write_text("# Demo\n")
    (root / ".gitignore").write_text("ignored/\n")
    (root / "ignored").mkdir()
    (root / "ignored" / "junk.py").write_text("def alpha(): pass\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def test_schemas_are_openai_functions():
    names = [s["function"]["name"] for s in schemas()]
    assert names == ["read_file", "list_dir", "search", "edit_file", "write_file", "run", "submit"]
    for schema in schemas():
        assert schema["type"] == "function"
        function = schema["function"]
        assert function["description"] and function["parameters"]["type"] == "object"
        assert set(function["parameters"]["required"]) <= set(function["parameters"]["properties"])
        json.dumps(schema)  # serializable as is
    assert len(default_tools()) == 7


def test_read_file_numbers_lines_and_pages(repo: Path):
    result = call("read_file", {"path": "pkg/mod.py", "start_line": 4, "end_line": 5}, repo)
    assert result.ok
    assert result.output == ("pkg/mod.py (lines 4-5 of 9)\n4\tdef alpha(x):\n5\t    return x + 1\n"
                             "[… 4 more lines; read again with start_line=6]")
    (repo / "big.txt").write_text("".join(f"line {i}\n" for i in range(1, 3001)))
    paged = call("read_file", {"path": "big.txt"}, repo)
    assert "(lines 1-2000 of 3000)" in paged.output and "start_line=2001" in paged.output
    assert not call("read_file", {"path": "pkg/mod.py", "start_line": 50}, repo).ok


def test_bad_calls_become_error_results(repo: Path):
    cases = {
        ("nope", "{}"): "unknown tool 'nope'",
        ("read_file", "{not json"): "arguments are not valid JSON",
        ("read_file", "{}"): "missing required argument 'path'",
        ("read_file", '{"path": "README.md", "bogus": 1}'): "unexpected argument 'bogus'",
        ("read_file", '{"path": 3}'): "argument 'path' must be a string",
        ("read_file", '{"path": "README.md", "start_line": 0}'): "must be at least 1",
        ("read_file", '["README.md"]'): "arguments must be a JSON object",
        ("read_file", '{"path": "missing.txt"}'): "missing.txt does not exist",
        ("read_file", '{"path": "pkg"}'): "is a directory; use list_dir",
        ("submit", '{"summary": " "}'): "summary is empty",
    }
    for (name, arguments), expected in cases.items():
        result = call(name, arguments, repo)
        assert not result.ok and result.output.startswith("error: ") and expected in result.output, result.output
    # Numbers written as strings are accepted as numbers.
    assert call("read_file", {"path": "pkg/mod.py", "start_line": "4", "end_line": "4"}, repo).output.endswith(
        "4\tdef alpha(x):\n[… 5 more lines; read again with start_line=5]")


def test_paths_outside_the_work_tree_are_refused(repo: Path, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    (repo / "link").symlink_to(secret)
    (repo / "dirlink").symlink_to(tmp_path)
    attempts = [
        ("read_file", {"path": "../secret.txt"}),
        ("read_file", {"path": str(secret)}),
        ("read_file", {"path": "/etc/passwd"}),
        ("read_file", {"path": "link"}),
        ("read_file", {"path": "dirlink/secret.txt"}),
        ("list_dir", {"path": ".."}),
        ("write_file", {"path": "../evil.txt", "content": "x"}),
        ("write_file", {"path": "link", "content": "x"}),
        ("edit_file", {"path": "link", "old_text": "top", "new_text": "bottom"}),
        ("search", {"pattern": "secret", "path": "dirlink"}),
    ]
    for name, arguments in attempts:
        result = call(name, arguments, repo)
        assert not result.ok and "outside the work tree" in result.output, (name, arguments, result.output)
    assert secret.read_text() == "top secret\n" and not (tmp_path / "evil.txt").exists()
    refused = call("write_file", {"path": ".git/hooks/post-commit", "content": "#!/bin/sh\n"}, repo)
    assert not refused.ok and "inside .git" in refused.output
    # An absolute path inside the work tree is fine.
    assert call("read_file", {"path": str(repo / "README.md")}, repo).ok


def test_edit_file_replaces_exactly_one_match(repo: Path):
    result = call("edit_file", {"path": "pkg/mod.py", "old_text": "    return x + 1\n",
                                "new_text": "    return x + 100\n"}, repo)
    assert result.ok and "at line 5" in result.output and "5\t    return x + 100" in result.output
    assert "return x + 100" in (repo / "pkg/mod.py").read_text()


def test_edit_file_errors_are_precise(repo: Path):
    (repo / "dup.py").write_text("x = 1\ny = 2\nx = 1\n")
    twice = call("edit_file", {"path": "dup.py", "old_text": "x = 1", "new_text": "x = 3"}, repo)
    assert not twice.ok and "occurs 2 times" in twice.output and "lines 1, 3" in twice.output
    absent = call("edit_file", {"path": "pkg/mod.py", "old_text": "def alpha(z):\n    return z + 1",
                                "new_text": "pass"}, repo)
    assert not absent.ok and "not found" in absent.output and "line 4:\n4\tdef alpha(x):" in absent.output
    spaces = call("edit_file", {"path": "pkg/mod.py", "old_text": "def beta(y):\n  return y * 2",
                                "new_text": "pass"}, repo)
    assert not spaces.ok and "whitespace is ignored" in spaces.output
    assert (repo / "dup.py").read_text() == "x = 1\ny = 2\nx = 1\n"


def test_write_file_and_list_dir(repo: Path):
    assert call("write_file", {"path": "new/dir/f.txt", "content": "a\nb\n"}, repo).output == (
        "Created new/dir/f.txt (2 lines, 4 bytes)")
    listing = call("list_dir", {}, repo).output
    assert listing.splitlines()[:4] == ["./ (5 entries)", "ignored/", "new/", "pkg/"]
    assert ".git/" not in listing and "README.md  (7 bytes)" in listing


def test_search_hits_caps_and_globs(repo: Path):
    hits = call("search", {"pattern": r"def \w+\("}, repo).output
    assert hits.splitlines() == ["2 matching lines in 1 files", "pkg/mod.py:4: def alpha(x):",
                                 "pkg/mod.py:8: def beta(y):"]  # gitignored files are skipped
    (repo / "many.txt").write_text("needle\n" * 250)
    capped = call("search", {"pattern": "needle"}, repo, settings=Settings(search_max_results=100))
    lines = capped.output.splitlines()
    assert lines[0].startswith("250 matching lines in 1 files (showing the first 100")
    assert len(lines) == 101 and lines[-1] == "many.txt:100: needle"
    assert "No matches" in call("search", {"pattern": "needle", "glob": "*.py"}, repo).output
    assert call("search", {"pattern": "ALPHA", "ignore_case": True, "path": "pkg"}, repo).output.startswith(
        "1 matching lines")
    assert "invalid regular expression" in call("search", {"pattern": "("}, repo).output


def test_run_reports_exit_code_and_output(repo: Path):
    result = call("run", {"command": "echo out; echo err >&2; exit 3"}, repo, settings=NO_SANDBOX)
    assert result.ok and result.output == "[exit code 3]\nout\nerr\n"
    assert call("run", {"command": "pwd"}, repo, settings=NO_SANDBOX).output == f"[exit code 0]\n{repo}\n"


def test_run_kills_a_hanging_command_and_its_children(repo: Path):
    start = time.monotonic()
    result = call("run", {"command": "echo started; (sleep 60; echo child) & sleep 60", "timeout": 1}, repo,
                  settings=NO_SANDBOX)
    assert time.monotonic() - start < 10
    assert not result.ok and result.output.startswith("[timed out after 1 s") and "started" in result.output
    # A background job left behind after a normal exit is killed too and does not block.
    start = time.monotonic()
    assert call("run", {"command": "sleep 60 & echo done"}, repo, settings=NO_SANDBOX).ok
    assert time.monotonic() - start < 10


def test_run_keeps_head_and_tail_of_huge_output(repo: Path):
    settings = Settings(sandbox="off", output_head_bytes=1000, output_tail_bytes=1000)
    result = call("run", {"command": "echo FIRST; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo LAST"}, repo,
                  settings=settings)
    assert result.ok and result.output.startswith("[exit code 0]\nFIRST\n") and result.output.endswith("x\nLAST\n")
    assert "bytes of output omitted" in result.output and len(result.output) < 3000


def test_run_environment_is_scrubbed(repo: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-secret")
    assert "OPENAI_API_KEY" not in scrubbed_env()
    result = call("run", {"command": "env"}, repo, settings=NO_SANDBOX)
    assert "secret" not in result.output and "PATH=" in result.output


def test_submit_ends_the_task(repo: Path):
    result = call("submit", {"summary": "Fixed alpha."}, repo)
    assert result.ok and result.done and result.summary == "Fixed alpha."


@needs_bwrap
def test_sandbox_confines_commands(repo: Path, tmp_path: Path):
    sandbox = Settings()  # on by default
    outside = tmp_path / "outside.txt"  # under /tmp, which is private in the sandbox
    outside.write_text("untouched\n")
    probe = Path("/v4agent-sandbox-probe")
    command = (f"echo hi > inside.txt; echo bad > {outside}; touch .git/x {probe}; "
               "python3 -c 'import socket; print(\"interfaces:\", [n for _, n in socket.if_nameindex()])'")
    try:
        result = call("run", {"command": command}, repo, settings=sandbox)
        assert not probe.exists()
    finally:
        probe.unlink(missing_ok=True)
    assert (repo / "inside.txt").read_text() == "hi\n"
    assert outside.read_text() == "untouched\n" and not (repo / ".git" / "x").exists()
    assert result.output.count("Read-only file system") == 2
    assert "interfaces: ['lo']" in result.output  # a network namespace of its own, loopback only
    start = time.monotonic()
    timed_out = call("run", {"command": "sleep 60", "timeout": 1}, repo, settings=sandbox)
    assert not timed_out.ok and time.monotonic() - start < 10
