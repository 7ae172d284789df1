"""`v4agent fix` and `v4agent replay` end to end on a fixture repository with a real failing
test: the scripted fix is applied (the user's other work survives), committed on a branch,
refused on conflict, saved on Ctrl-C, replayed; usage errors exit 2; settings precedence."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent.cli.fix import fix_cmd, replay_cmd
from agent.settings import SettingsError, load_settings
from tests.fixtures_agent import BUGGY, FIXED, PYTEST, fix_turns, git, isolate, make_repo, write_script

app = typer.Typer()
app.command("fix")(fix_cmd)
app.command("replay")(replay_cmd)
runner = CliRunner()
ISSUE = "add(2, 3) returns -1 instead of 5"
JSON_KEYS = {"patch", "stop", "turns", "tokens_in", "tokens_out", "cached_tokens", "context_tokens", "context_limit",
             "summary", "error", "seconds", "trajectory", "patch_file", "applied", "branch", "commit", "refused",
             "patch_error", "left_out", "work_kept"}


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's repository, with unrelated uncommitted work in it."""
    isolate(monkeypatch, tmp_path)
    repo = make_repo(tmp_path / "repo")
    (repo / "notes.txt").write_text("notes\nunsaved user work\n")
    (repo / "scratch.txt").write_text("untracked user work\n")
    return repo


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return write_script(tmp_path / "fix.json", fix_turns())


def fix(*args: str):
    return runner.invoke(app, ["fix", *map(str, args)])


def runs(cache: Path) -> list[Path]:
    return sorted((cache / "runs").iterdir())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]


def test_fix_apply_passes_the_test_and_keeps_the_users_work(user: Path, script: Path, tmp_path: Path):
    assert subprocess.run(PYTEST.split(), cwd=user, capture_output=True).returncode == 1
    result = fix(ISSUE, "--repo", user, "--script", script, "--apply", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == JSON_KEYS
    assert (out["stop"], out["turns"], out["applied"], out["refused"]) == ("submitted", 4, True, None)
    assert (out["patch_error"], out["left_out"], out["work_kept"]) == (None, [], None)
    assert out["tokens_in"] > out["tokens_out"] > 0 and out["summary"] == "add adds; tests pass"
    assert "calc.py" in out["patch"] and "notes.txt" not in out["patch"] and "scratch" not in out["patch"]

    assert (user / "calc.py").read_text() == FIXED
    assert subprocess.run(PYTEST.split(), cwd=user, capture_output=True).returncode == 0
    assert (user / "notes.txt").read_text() == "notes\nunsaved user work\n"
    assert (user / "scratch.txt").read_text() == "untracked user work\n"
    assert git(user, "diff", "--cached") == ""  # the index is not touched

    [run] = runs(tmp_path / "cache")
    assert Path(out["trajectory"]) == run / "trajectory.jsonl" and (run / "patch.diff").read_text() == out["patch"]
    assert not (run / "work").exists()  # the agent's copy is gone, its work saved
    kinds = [r["type"] for r in records(run)]
    assert kinds == ["run", "pack", "turn", "turn", "turn", "turn", "end", "patch"]
    assert records(run)[0]["issue"] == ISSUE and records(run)[-1]["applied"] is True

    replayed = runner.invoke(app, ["replay", str(run / "trajectory.jsonl"), "--json"])
    assert replayed.exit_code == 0, replayed.output
    report = json.loads(replayed.stdout)
    assert (report["results"], report["matched"], report["mismatches"]) == (4, 4, [])
    assert report["stop"] == {"recorded": "submitted", "replayed": "submitted"} and report["patch_matches"] is True


def test_fix_branch_commits_on_a_new_branch_and_prints_the_patch(user: Path, script: Path):
    head = git(user, "rev-parse", "HEAD").strip()
    result = fix(ISSUE, "--repo", user, "--script", script, "--branch", "agent/fix-add")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("diff --git a/calc.py b/calc.py")
    assert "committed" in result.stderr and "trajectory:" in result.stderr
    commit = git(user, "rev-parse", "agent/fix-add").strip()
    assert git(user, "rev-parse", f"{commit}^").strip() == head
    assert git(user, "show", f"{commit}:calc.py") == FIXED
    assert git(user, "log", "-1", "--format=%s", commit).strip() == f"v4agent: {ISSUE}"
    # The checkout itself is as it was: same branch, bug and user work still there.
    assert git(user, "branch", "--show-current").strip() == "main"
    assert (user / "calc.py").read_text() == BUGGY
    assert (user / "notes.txt").read_text() == "notes\nunsaved user work\n"


def test_a_conflicting_apply_is_refused_and_touches_nothing(user: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("V4AGENT_SANDBOX", "off")  # so the script can play the user editing meanwhile
    theirs = "def add(a, b):\n    return b - a\n"
    turns = fix_turns(f"printf 'def add(a, b):\\n    return b - a\\n' > {user}/calc.py")
    result = fix(ISSUE, "--repo", user, "--script", write_script(tmp_path / "s.json", turns), "--apply", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["applied"] is False and "does not apply" in out["refused"] and "calc.py" in out["patch"]
    assert (user / "calc.py").read_text() == theirs
    assert (user / "notes.txt").read_text() == "notes\nunsaved user work\n"
    assert git(user, "status", "--porcelain").split("\n")[:3] == [" M calc.py", " M notes.txt", "?? scratch.txt"]
    assert Path(out["patch_file"]).read_text() == out["patch"]  # the work is kept for later


def test_no_change_means_exit_1(user: Path, tmp_path: Path):
    turns = [{"tool_calls": [{"name": "submit", "arguments": {"summary": "nothing to do"}}]}]
    result = fix(ISSUE, "--repo", user, "--script", write_script(tmp_path / "s.json", turns), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["patch"] == ""


@pytest.mark.parametrize("args, message", [
    ([], "no issue"),
    (["x"], "--weights DIR"),
    (["x", "--endpoint", "http://127.0.0.1:9/v1"], "--model NAME"),
    (["x", "--script", "{script}", "--apply", "--branch", "b"], "exclude each other"),
    (["x", "--script", "{script}", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"], "one backend at a time"),
    (["x", "--script", "{script}", "--think", "ultra"], "think must be one of none, high, max"),
    (["x", "--script", "{script}", "--branch", "main"], "already exists"),
    (["x", "--script", "{missing}"], "cannot read script"),
    (["x", "--script", "{script}", "--repo", "{outside}"], "not inside a git work tree"),
])
def test_usage_errors_exit_2(user: Path, script: Path, tmp_path: Path, args: list[str], message: str):
    (tmp_path / "outside").mkdir()
    names = {"script": script, "missing": tmp_path / "missing.json", "outside": tmp_path / "outside"}
    args = [a.format(**names) for a in args]
    result = fix(*args, *(["--repo", user] if "--repo" not in args else []))
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.startswith("error: ")
    assert not (tmp_path / "cache" / "runs").exists()  # nothing was started


def test_settings_come_from_file_then_environment_then_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    user: Path, script: Path):
    config = tmp_path / "config.toml"
    config.write_text('think = "max"\nmax_turns = 7\nendpoint = "http://127.0.0.1:9/v1"\nmodel = "m"\n')
    monkeypatch.setenv("V4AGENT_CONFIG", str(config))
    assert (load_settings().think, load_settings().max_turns) == ("max", 7)
    monkeypatch.setenv("V4AGENT_THINK", "none")
    assert load_settings().think == "none"
    assert load_settings({"think": "high", "max_turns": None}).think == "high"
    monkeypatch.setenv("V4AGENT_MAX_TURNS", "seven")
    with pytest.raises(SettingsError, match="V4AGENT_MAX_TURNS must be an int"):
        load_settings()
    monkeypatch.delenv("V4AGENT_MAX_TURNS")
    # A backend on the command line replaces the configured one.
    result = fix(ISSUE, "--repo", user, "--script", script, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["stop"] == "submitted"

    config.write_text("colour = 'blue'\n")
    result = fix(ISSUE, "--repo", user, "--script", script)
    assert result.exit_code == 2 and "unknown setting 'colour'" in result.stderr


def test_ctrl_c_saves_the_trajectory_and_the_patch_so_far(user: Path, tmp_path: Path):
    turns = fix_turns()[:2] + [{"tool_calls": [{"name": "run", "arguments": {"command": "sleep 60"}}]}]
    script = write_script(tmp_path / "s.json", turns)
    main = tmp_path / "v4agent_fix.py"
    main.write_text("import typer\nfrom agent.cli.fix import fix_cmd\ntyper.run(fix_cmd)\n")
    process = subprocess.Popen([sys.executable, str(main), ISSUE, "--repo", str(user), "--script", str(script),
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parent.parent)
    cache = tmp_path / "cache"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for the edit to be recorded, then press Ctrl-C
        done = [r for r in (runs(cache) if (cache / "runs").exists() else []) if (r / "trajectory.jsonl").exists()]
        if done and sum(r["type"] == "turn" for r in records(done[0])) >= 2:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # into the sleeping command
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    out = json.loads(stdout)
    assert out["stop"] == "interrupted" and "return a + b" in out["patch"]
    [run] = runs(cache)
    assert (run / "patch.diff").read_text() == out["patch"]
    assert [r["type"] for r in records(run)][-2:] == ["end", "patch"]
    assert not (run / "work").exists()
    assert (user / "calc.py").read_text() == BUGGY  # nothing delivered without --apply
