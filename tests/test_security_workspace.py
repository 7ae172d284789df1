"""Attacks on the agent's work copy, its patch, replay and the terminal (issue 11, items 4-7), each
played for real — real git repositories, `v4agent fix` and `replay` on scripted turns, real
subprocesses and a real pseudo-terminal — and shown refused or contained:

- a shared trajectory that says "sandbox off" is replayed under the user's sandbox and limits;
- nothing the agent did is lost at the patch step: names git refuses, nested repositories, FIFOs,
  a Latin-1 file, a copy whose .git is gone, SIGTERM;
- `--apply` and `--branch` refuse symlinks that point out of the repository;
- escape sequences from the model, a tool or the repository never reach the terminal as such.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from agent.cli.common import fail, visible
from agent.cli.fix import LiveView, fix_cmd, replay_cmd
from runtime.dsml import ContentDelta, ReasoningDelta
from agent.loop import ToolRan
from agent.settings import load_settings
from agent.workspace import NESTED_REPOSITORY, REFUSED_NAME, Workspace, WorkspaceError, apply_patch, commit_branch
from tests.fixtures_agent import BUGGY, FIXED, fix_turns, git, isolate, make_repo, write_script
from tools.base import Settings as ToolSettings
from tools.base import ToolResult
from tools.registry import call

app = typer.Typer()
app.command("fix")(fix_cmd)
app.command("replay")(replay_cmd)
runner = CliRunner()
ROOT = Path(__file__).parent.parent
ISSUE = "add(2, 3) returns -1 instead of 5"
FIX = [sys.executable, "-c", "import typer; from agent.cli.fix import fix_cmd; typer.run(fix_cmd)"]  # `v4agent fix`
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
# A line of a file that rewrites the terminal: window title, clipboard (OSC 52), cursor up and erase.
HOSTILE = "\x1b]0;owned\x07\x1b]52;c;cm0gLXJmIH4=\x07\x1b[1A\x1b[2K\x9b31m\u202eevil\n"


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate(monkeypatch, tmp_path)
    return make_repo(tmp_path / "repo")


def fix(*args: object):
    return runner.invoke(app, ["fix", *map(str, args)])


def script(tmp_path: Path, *calls: dict, name: str = "turns.json") -> Path:
    """Scripted turns, one call each, ending with submit."""
    turns = [{"tool_calls": [c]} for c in calls]
    turns.append({"tool_calls": [{"name": "submit", "arguments": {"summary": "done"}}]})
    return write_script(tmp_path / name, turns)


def run_call(command: str) -> dict:
    return {"name": "run", "arguments": {"command": command}}


def edit_call(path: str, old: str, new: str) -> dict:
    return {"name": "edit_file", "arguments": {"path": path, "old_text": old, "new_text": new}}


def the_run(tmp_path: Path) -> Path:
    [run] = sorted((tmp_path / "cache" / "runs").iterdir())
    return run


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]


# Besides the Cc and Cs categories: the bidi marks, embeddings, overrides and isolates, and the
# line and paragraph separators.
_FORMATTING = {0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def controls(text: str) -> list[str]:
    """The characters a terminal could act on, which `visible` must write out."""
    return [c for c in text if c not in "\n\t" and (unicodedata.category(c) in ("Cc", "Cs") or ord(c) in _FORMATTING)]


# ---- 4. replay takes its safety settings from the user, not from the trajectory -------------

@needs_bwrap
def test_replay_ignores_a_trajectory_that_switches_the_sandbox_off(user: Path, tmp_path: Path):
    outside = tmp_path / "outside.txt"  # not in the work tree: a sandboxed command cannot write it
    command = (f"echo owned > {outside}; echo wrote=$?; head -c 50000 /dev/zero | tr '\\0' x; echo; "
               "python3 -c 'import socket; print(\"interfaces:\", [n for _, n in socket.if_nameindex()])'")
    assert fix(ISSUE, "--repo", user, "--script", script(tmp_path, run_call(command)), "--json").exit_code == 1
    assert not outside.exists()
    run = the_run(tmp_path)
    shared = records(run)
    shared[0]["tool_settings"].update(sandbox="off", output_head_bytes=10**9, output_tail_bytes=10**9,
                                      run_timeout_s=10**6, max_run_timeout_s=10**6)
    shared[0]["config"].update(max_turns=10**6)
    poisoned = tmp_path / "shared" / "trajectory.jsonl"
    poisoned.parent.mkdir()
    poisoned.write_text("".join(json.dumps(r) + "\n" for r in shared))
    shutil.rmtree(run)

    replayed = runner.invoke(app, ["replay", str(poisoned), "--json"])
    assert not outside.exists()  # confined, as the user's own settings say
    assert replayed.exit_code == 0, replayed.output
    replay = records(Path(json.loads(replayed.stdout)["replay"]).parent)
    header, turn = [r for r in replay if r["type"] in ("run", "turn")][:2]
    defaults = ToolSettings()
    assert header["tool_settings"]["sandbox"] == load_settings().sandbox != "off"
    assert header["config"]["max_turns"] == load_settings().max_turns
    assert header["tool_settings"]["output_head_bytes"] == defaults.output_head_bytes
    assert header["tool_settings"]["max_run_timeout_s"] == defaults.max_run_timeout_s
    output = turn["results"][0]["output"]
    assert "wrote=" in output and "interfaces: ['lo']" in output  # it ran, without the host's network
    assert "bytes of output omitted" in output  # the user's output limit, not the file's


# ---- 5. the patch step cannot lose work ----------------------------------------------------------

def untakeable(root: Path) -> None:
    """What `git add --all` fails on or takes as a gitlink: a name git refuses, nested repositories
    (one without a commit)."""
    (root / ".GIT").mkdir()
    (root / ".GIT" / "config.py").write_text("x = 1\n")
    git(root, "init", "-q", "empty")
    (root / "empty" / "work.txt").write_text("in a repository with no commit\n")
    make_repo(root / "vendored")


def test_the_patch_leaves_out_what_git_cannot_hold_and_names_it(tmp_path: Path):
    repo = make_repo(tmp_path / "repo")
    ws = Workspace.create(repo, tmp_path / "work")
    (ws.root / "calc.py").write_text(FIXED)
    untakeable(ws.root)
    patch = ws.patch()  # before: WorkspaceError from `git add`, and the run deleted the copy
    assert set(patch.left_out) == {(".GIT/config.py", REFUSED_NAME), ("empty/", NESTED_REPOSITORY),
                                   ("vendored/", NESTED_REPOSITORY)}
    apply_patch(repo, patch.diff)
    assert (repo / "calc.py").read_text() == FIXED
    assert git(repo, "status", "--porcelain") == " M calc.py\n"


def test_a_checkout_with_what_git_cannot_hold_can_still_be_copied(tmp_path: Path):
    repo = make_repo(tmp_path / "repo")
    untakeable(repo)
    ws = Workspace.create(repo, tmp_path / "work")
    assert {path for path, _ in ws.left_out} == {".GIT/config.py", "empty/", "vendored/"}
    assert (ws.root / "calc.py").read_text() == BUGGY and not (ws.root / "empty").exists()


def test_a_copy_without_its_git_directory_is_an_error_and_the_repository_around_it_is_untouched(tmp_path: Path):
    outer = tmp_path / "home"  # a home directory kept in git, holding the run directories
    outer.mkdir()
    git(outer, "init", "-q")
    ws = Workspace.create(make_repo(tmp_path / "repo"), outer / "runs" / "work")
    (ws.root / "calc.py").write_text(FIXED)
    shutil.rmtree(ws.root / ".git")
    with pytest.raises(WorkspaceError, match="no longer a git repository of its own"):
        ws.patch()
    assert git(outer, "ls-files") == ""  # before: the agent's files were staged in the outer repository


def test_a_latin1_file_is_read_edited_and_patched_byte_for_byte(tmp_path: Path):
    repo = make_repo(tmp_path / "repo")
    original = b"# -*- coding: latin-1 -*-\nNAME = 'caf\xe9'  # \xa9 1999\nSIZE = 1\n\x85 stays\n"
    (repo / "legacy.py").write_bytes(original)
    git(repo, "add", "legacy.py")
    git(repo, "commit", "-qm", "legacy")
    ws = Workspace.create(repo, tmp_path / "work")

    read = call("read_file", {"path": "legacy.py"}, ws.root)
    assert read.ok and "not UTF-8: read as Latin-1" in read.output and "NAME = 'café'  # © 1999" in read.output
    assert "(lines 1-4 of 4" in read.output  # \x85 is a Latin-1 byte, not a line break
    edited = call("edit_file", {"path": "legacy.py", "old_text": "SIZE = 1", "new_text": "SIZE = 2  # ½"}, ws.root)
    assert edited.ok, edited.output
    expected = original.replace(b"SIZE = 1", b"SIZE = 2  # \xbd")
    assert (ws.root / "legacy.py").read_bytes() == expected
    refused = call("edit_file", {"path": "legacy.py", "old_text": "SIZE", "new_text": "€"}, ws.root)
    assert not refused.ok and "no Latin-1 byte" in refused.output
    assert (ws.root / "legacy.py").read_bytes() == expected
    assert call("write_file", {"path": "legacy.py", "content": "A = 'é'\n"}, ws.root).ok
    assert (ws.root / "legacy.py").read_bytes() == b"A = '\xe9'\n"  # keeps its encoding
    bad = call("write_file", {"path": "new.py", "content": "X = '\ud800'\n"}, ws.root)  # a JSON "\ud800"
    assert not bad.ok and "not valid Unicode" in bad.output
    (ws.root / "legacy.py").write_bytes(expected)

    patch = ws.patch().diff  # before: UnicodeDecodeError, and the run deleted the copy
    assert b"+SIZE = 2  # \xbd" in patch
    commit = commit_branch(repo, patch, "agent/latin", "latin")
    assert subprocess.run(["git", "show", f"{commit}:legacy.py"], cwd=repo, capture_output=True).stdout == expected
    apply_patch(repo, patch)
    assert (repo / "legacy.py").read_bytes() == expected


def test_fix_keeps_the_copy_and_reports_what_the_patch_could_not_hold(user: Path, tmp_path: Path):
    make = ("mkdir .GIT && echo x > .GIT/config.py && git init -q empty && echo w > empty/work.txt && "
            "printf 'caf\\351\\n' > latin1.txt")
    turns = script(tmp_path, edit_call("calc.py", "return a - b", "return a + b"), run_call(make))
    result = fix(ISSUE, "--repo", user, "--script", turns, "--patch-out", tmp_path / "out.diff", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {x["path"] for x in out["left_out"]} == {".GIT/config.py", "empty/"}
    kept = Path(out["work_kept"])
    assert (kept / ".GIT" / "config.py").read_text() == "x\n" and (kept / "empty" / "work.txt").is_file()
    patch = (tmp_path / "out.diff").read_bytes()
    assert patch == (the_run(tmp_path) / "patch.diff").read_bytes() == out["patch"].encode("utf-8", "surrogateescape")
    assert b"+    return a + b" in patch and b"+caf\xe9" in patch
    assert records(the_run(tmp_path))[-1]["left_out"] == out["left_out"]
    assert "left out of the patch" in fix(ISSUE, "--repo", user, "--script", turns).stderr


def test_fix_keeps_the_copy_when_no_patch_can_be_made(user: Path, tmp_path: Path):
    turns = script(tmp_path, edit_call("calc.py", "return a - b", "return a + b"),
                   run_call("rm notes.txt && mkfifo notes.txt"))  # git cannot add a tracked file turned FIFO
    result = fix(ISSUE, "--repo", user, "--script", turns, "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["patch"] == "" and "notes.txt" in out["patch_error"]
    assert (Path(out["work_kept"]) / "calc.py").read_text() == FIXED  # before: deleted with the copy


def test_sigterm_ends_a_run_like_ctrl_c(user: Path, tmp_path: Path):
    turns = script(tmp_path, edit_call("calc.py", "return a - b", "return a + b"), run_call("sleep 60"))
    process = subprocess.Popen([*FIX, ISSUE, "--repo", str(user), "--script", str(turns), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the edit is recorded, the sleep has begun
        runs = list((tmp_path / "cache" / "runs").glob("*/trajectory.jsonl"))
        if runs and sum(r["type"] == "turn" for r in records(runs[0].parent)) >= 1:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr  # before: killed at once (-15), the copy left behind, no patch
    out = json.loads(stdout)
    assert out["stop"] == "interrupted" and "+    return a + b" in out["patch"]
    run = the_run(tmp_path)
    assert (run / "patch.diff").read_text() == out["patch"]
    assert [r["type"] for r in records(run)][-2:] == ["end", "patch"] and not (run / "work").exists()


# ---- 6. symlinks out of the repository -----------------------------------------------------------

def symlinked(repo: Path, tmp_path: Path) -> bytes:
    """A patch that adds symlinks out of the repository (absolute; climbing out with ..), turns a
    file into one, and adds one that stays inside."""
    ws = Workspace.create(repo, tmp_path / "work")
    (ws.root / "sub").mkdir()
    os.symlink("/root/.bashrc", ws.root / "rc")
    os.symlink("../../../.ssh/authorized_keys", ws.root / "sub" / "keys")
    (ws.root / "notes.txt").unlink()
    os.symlink("/etc/passwd", ws.root / "notes.txt")
    os.symlink("../calc.py", ws.root / "sub" / "calc_link.py")  # stays inside: fine
    os.symlink("sub/../../repo/calc.py", ws.root / "sneaky")  # climbs out and back: outside all the same
    return ws.patch().diff


def test_apply_and_branch_refuse_symlinks_out_of_the_repository(tmp_path: Path):
    repo = make_repo(tmp_path / "repo")
    patch = symlinked(repo, tmp_path)
    named = ["rc -> /root/.bashrc", "sub/keys -> ../../../.ssh/authorized_keys", "notes.txt -> /etc/passwd",
             "sneaky -> sub/../../repo/calc.py"]
    for deliver in (lambda **kw: apply_patch(repo, patch, **kw),
                    lambda **kw: commit_branch(repo, patch, "b", "m", **kw)):
        with pytest.raises(WorkspaceError, match="symlinks that point outside") as refused:
            deliver()
        assert all(name in str(refused.value) for name in named) and "calc_link" not in str(refused.value)
        assert git(repo, "status", "--porcelain") == "" and git(repo, "branch", "--list", "b") == ""
    apply_patch(repo, patch, allow_outside_symlinks=True)
    assert os.readlink(repo / "rc") == "/root/.bashrc" and os.readlink(repo / "sub" / "calc_link.py") == "../calc.py"


def test_fix_apply_refuses_an_outside_symlink_unless_allowed(user: Path, tmp_path: Path):
    turns = script(tmp_path, run_call("ln -s \"$(printf '/root/.bashrc\\033[8m')\" rc && ln -s calc.py inside"))
    refused = fix(ISSUE, "--repo", user, "--script", turns, "--apply")
    assert refused.exit_code == 1
    assert "symlinks that point outside" in refused.stderr and "rc -> /root/.bashrc\\x1b[8m" in refused.stderr
    assert not controls(refused.stderr) and not (user / "rc").is_symlink() and not (user / "inside").exists()
    allowed = fix(ISSUE, "--repo", user, "--script", turns, "--apply", "--allow-outside-symlinks", "--json")
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["applied"] is True
    assert os.readlink(user / "rc") == "/root/.bashrc\x1b[8m"


# ---- 7. terminal escapes ---------------------------------------------------------------------------

@given(st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())))
def test_visible_never_lets_a_control_character_through(text: str):
    shown = visible(text)
    assert not controls(shown)
    shown.encode("utf-8")  # no lone surrogates either: it can always be written
    if not controls(text):
        assert shown == text


@given(st.binary())
def test_undecodable_bytes_show_as_their_value(data: bytes):
    shown = visible(data.decode("utf-8", "surrogateescape"))
    assert not controls(shown)


def test_visible_writes_controls_as_escapes():
    assert visible(HOSTILE) == ("\\x1b]0;owned\\x07\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[1A\\x1b[2K\\x9b31m\\u202eevil\n")
    assert visible("tab\tand\r\n" + b"caf\xe9".decode("utf-8", "surrogateescape")) == "tab\tand\\x0d\ncaf\\xe9"


def test_the_live_view_shows_escapes_and_never_reads_markup():
    stream = io.StringIO()
    view = LiveView(Console(file=stream, width=200, color_system=None, force_terminal=False))
    view(ReasoningDelta(HOSTILE))
    view(ContentDelta("[bold red]not markup[/] [link=https://evil.example]x[/link]\x1b[8m\n"))
    view(ToolRan(1, "call_1_0", "run\x1b]0;t\x07[/bold]", json.dumps({"command": "\x9b2J[red]"}),
                 ToolResult(False, "out\x1b[2Jput [/]\n" + HOSTILE)))
    shown = stream.getvalue()
    assert not controls(shown)
    assert "[bold red]not markup[/] [link=https://evil.example]x[/link]\\x1b[8m" in shown
    assert "→ run\\x1b]0;t\\x07[/bold](command=\"\\x9b2J[red]\")" in shown
    assert "out\\x1b[2Jput [/]" in shown and shown.count("\\x1b]52;c;cm0gLXJmIH4=\\x07") == 2


def test_errors_show_escapes(user: Path, capsys: pytest.CaptureFixture[str]):
    assert isinstance(fail("cannot read \x1b]0;x\x07"), typer.Exit)
    assert capsys.readouterr().err == "error: cannot read \\x1b]0;x\\x07\n"
    result = fix("x", "--repo", user, "--script", "\x1b[2J.json")
    assert result.exit_code == 2 and "\\x1b[2J.json" in result.stderr and not controls(result.stderr)


def fix_in_a_subprocess(user: Path, turns: Path, stdout: int) -> subprocess.Popen:
    return subprocess.Popen([*FIX, ISSUE, "--repo", str(user), "--script", str(turns)],
                            stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT)


def test_the_patch_is_raw_into_a_pipe_and_shown_safely_on_a_terminal(user: Path, tmp_path: Path):
    turns = script(tmp_path, {"name": "write_file", "arguments": {"path": "banner.txt", "content": HOSTILE}})
    piped = fix_in_a_subprocess(user, turns, subprocess.PIPE)
    stdout, stderr = piped.communicate(timeout=120)
    assert piped.returncode == 0, stderr
    # A valid patch, byte for byte (before: click stripped the CSI sequences from it).
    assert stdout == (the_run(tmp_path) / "patch.diff").read_bytes() and HOSTILE.encode() in stdout
    shutil.rmtree(tmp_path / "cache" / "runs")

    leader, follower = pty.openpty()
    on_terminal = fix_in_a_subprocess(user, turns, follower)
    os.close(follower)
    shown = b""
    while True:  # read until the child closes the terminal
        ready, _, _ = select.select([leader], [], [], 120)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # EIO: the child is gone
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert on_terminal.wait(timeout=30) == 0
    text = shown.decode()
    assert "+\\x1b]0;owned\\x07\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[1A\\x1b[2K\\x9b31m\\u202eevil" in text
    assert not controls(text.replace("\r\n", "\n"))


def test_replay_shows_mismatches_with_escapes(user: Path, tmp_path: Path):
    assert fix(ISSUE, "--repo", user, "--script", write_script(tmp_path / "fix.json", fix_turns())).exit_code == 0
    run = the_run(tmp_path)
    shared = records(run)
    turn = next(r for r in shared if r["type"] == "turn")
    turn["results"][0]["output"] = HOSTILE
    turn["results"][0]["name"] = "read_file\x1b]0;t\x07"
    next(r for r in shared if r["type"] == "end")["stop"] = "sub\x1b[8mmitted"
    (run / "trajectory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shared))
    replayed = runner.invoke(app, ["replay", str(run / "trajectory.jsonl")])
    assert replayed.exit_code == 1
    assert not controls(replayed.stdout)
    assert "read_file\\x1b]0;t\\x07" in replayed.stdout and "stop sub\\x1b[8mmitted" in replayed.stdout
