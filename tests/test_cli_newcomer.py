"""A newcomer's first hour with `v4agent` (issue 18): the command line answers at once and
imports torch only to run the model; every bad argument, setting or file is one `error:` line
with exit code 2, never a traceback (a battery over every command, run in a fresh interpreter
that must not meet torch); Ctrl-C at any moment ends cleanly; limits fit the model; `config
show`, `runs ls/show/prune`, `--version`, `-h`; pack's report; model info validates a
checkpoint as runtime.load does; make-tiny refuses what --force must not replace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from tests.fixtures_agent import fix_turns, git, isolate, make_repo, write_script

ROOT = Path(__file__).parent.parent
V4AGENT = Path(sys.executable).with_name("v4agent")
runner = CliRunner()

# Runs in a fresh interpreter: every case through the real app, in order; after each, whether
# torch has been imported. A case "raises" when anything but an exit escapes the command (what
# a user would see as a traceback).
BATTERY = r"""
import json, sys
import typer.main
from typer.testing import CliRunner
from agent.cli import app

def walk(cmd, path):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from walk(sub, path + [name])

cases = json.load(sys.stdin)
cases = [{"args": [*p, "--help"], "env": {}} for p in walk(typer.main.get_command(app), [])] + cases
out = []
for case in cases:
    result = CliRunner().invoke(app, case["args"], env=case["env"])
    raised = result.exception is not None and not isinstance(result.exception, SystemExit)
    out.append({"args": case["args"], "code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                "raised": repr(result.exception) if raised else None, "torch": "torch" in sys.modules})
print(json.dumps(out))
"""


def run_battery(cases: list[dict], env: dict[str, str]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", BATTERY], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("V4AGENT_") and k not in ("DEEPSEEK_API_KEY", "OPENAI_API_KEY")}
    return {**env, "V4AGENT_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "no-config"),
            "COLUMNS": "200"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small checkpoint written under umask 027, and copies with a truncated, an empty and a
    missing shard."""
    from runtime.checkpoint import make_tiny
    from runtime.config import tiny_config

    root = tmp_path_factory.mktemp("checkpoints")
    previous = os.umask(0o027)
    try:
        good = make_tiny(root / "good", tiny_config(vocab_size=512))
    finally:
        os.umask(previous)
    shards = sorted(good.glob("*.safetensors"))
    broken = {}
    for kind in ("truncated", "empty", "missing"):
        copy = broken[kind] = root / kind
        shutil.copytree(good, copy)
        shard = copy / shards[-1].name
        if kind == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:-100] if kind == "truncated" else b"")
    return {"good": good, **broken}


def test_the_umask_decides_every_file_mode_of_make_tiny(checkpoints: dict[str, Path]):
    modes = {f.name: f.stat().st_mode & 0o777 for f in checkpoints["good"].iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o640}, modes


def test_importing_the_cli_and_the_tokenizer_leaves_torch_out():
    code = ("import sys; from agent.cli import app; import runtime, runtime.tokenizer, agent.settings, agent.pack; "
            "print(sorted(m for m in ('torch', 'triton', 'safetensors') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
    code = "import runtime, sys; runtime.load; print('torch' in sys.modules)"  # the public entry point stays
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout.strip() == "True"


def test_no_traceback_and_no_torch_for_any_bad_argument(tmp_path: Path, checkpoints: dict[str, Path]):
    repo = make_repo(tmp_path / "repo")
    empty_repo = tmp_path / "empty-repo"
    empty_repo.mkdir()
    git(empty_repo, "init", "-q")
    script = write_script(tmp_path / "s.json", fix_turns())
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "empty").write_text("")
    (tmp_path / "bad.toml").write_text("think = \n")
    (tmp_path / "colour.toml").write_text("colour = 'blue'\n")
    (tmp_path / "bad.jsonl").write_text("{bad\n")
    (tmp_path / "not-run.jsonl").write_text('{"type": "turn"}\n')
    (tmp_path / "messages.json").write_text('[{"role": "user", "content": "hi"}]')
    (tmp_path / "a-file").write_text("keep me\n")
    (tmp_path / "holds-git" / ".git").mkdir(parents=True)
    (tmp_path / "not-empty").mkdir()
    (tmp_path / "not-empty" / "x").write_text("x")
    t = str(tmp_path)
    fix = ["fix", "x", "--repo", str(repo), "--script", str(script)]
    error, usage = "error", "usage"  # one `error:` line of ours / the parser's usage message
    light = [  # (args, environment, exit code, kind, text in stderr)
        (["--version"], {}, 0, None, None),
        (["-h"], {}, 0, None, None),
        (["frobnicate"], {}, 2, usage, "No such command"),
        (["fix"], {}, 2, error, "no issue"),
        (["fix", "x", "--repo", str(repo)], {}, 2, error, "--weights DIR"),
        ([*fix, "--device", "banana"], {}, 2, error, "--device must be cpu, cuda or cuda:N"),
        ([*fix, "--think", "ultra"], {}, 2, error, "--think must be one of none, high, max, not 'ultra'"),
        ([*fix, "--think", "MAX", "--max-turns", "0"], {}, 2, error, "--max-turns must be positive"),
        ([*fix, "--max-turns", "many"], {}, 2, usage, "--max-turns"),
        ([*fix, "--temperature", "-1"], {}, 2, error, "--temperature must be at least 0"),
        ([*fix, "--max-turn-tokens", "0"], {}, 2, error, "--max-turn-tokens must be positive"),
        ([*fix, "--sandbox", "maybe"], {}, 2, error, "--sandbox must be one of on, off"),
        ([*fix, "--patch-out", "/nonexistent/dir/p.diff"], {}, 2, error, "/nonexistent/dir does not exist"),
        ([*fix, "--patch-out", t], {}, 2, error, "is a directory"),
        ([*fix, "--apply", "--branch", "b"], {}, 2, error, "exclude each other"),
        ([*fix, "--branch", "bad..name"], {}, 2, error, "not a valid branch name"),
        (["fix", "--issue-file", f"{t}/missing.md", "--script", str(script)], {}, 2, error, "cannot read"),
        (["fix", "--issue-file", f"{t}/binary", "--script", str(script)], {}, 2, error, "not UTF-8"),
        (["fix", "--issue-file", f"{t}/empty", "--script", str(script)], {}, 2, error, "the issue is empty"),
        (["fix", "x", "--repo", t, "--script", str(script)], {}, 2, error, "not inside a git work tree"),
        (["fix", "x", "--repo", f"{t}/missing", "--script", str(script)], {}, 2, error, "is not a directory"),
        (["fix", "x", "--repo", str(repo), "--script", f"{t}/missing.json"], {}, 2, error, "cannot read script"),
        (["fix", "x", "--repo", str(repo), "--weights", f"{t}/missing"], {}, 2, error, "no such directory"),
        (["fix", "x", "--repo", str(repo), "--endpoint", "ftp://x", "--model", "m"], {}, 2, error, "http(s) URL"),
        (["fix", "x", "--repo", str(repo), "--endpoint", "http://127.0.0.1:9/v1"], {}, 2, error, "--model NAME"),
        ([*fix, "--config", "/nonexistent.toml"], {}, 2, error, "--config names /nonexistent.toml, which does not"),
        (fix, {"V4AGENT_CONFIG": "/nonexistent.toml"}, 2, error, "V4AGENT_CONFIG names /nonexistent.toml"),
        (fix, {"V4AGENT_MAX_TURNS": "x"}, 2, error, "V4AGENT_MAX_TURNS must be an int, not 'x'"),
        (fix, {"V4AGENT_THINK": "ultra"}, 2, error, "V4AGENT_THINK must be one of"),
        (fix, {"V4AGENT_TIMEOUT_S": "inf"}, 2, error, "V4AGENT_TIMEOUT_S must be a finite number"),
        ([*fix, "--config", f"{t}/bad.toml"], {}, 2, error, "not valid TOML"),
        ([*fix, "--config", f"{t}/colour.toml"], {}, 2, error, "unknown setting 'colour'"),
        ([*fix, "--config", t], {}, 2, error, "is a directory"),
        (["fix", "x", "--repo", str(empty_repo), "--script", str(script)], {}, 2, error, "has no commit yet"),
        (["replay", f"{t}/missing.jsonl"], {}, 2, error, "cannot read"),
        (["replay", f"{t}/bad.jsonl"], {}, 2, error, "line 1 is not JSON"),
        (["replay", f"{t}/empty"], {}, 2, error, "is empty"),
        (["replay", f"{t}/binary"], {}, 2, error, "not UTF-8"),
        (["replay", f"{t}/not-run.jsonl"], {}, 2, error, "starts with a run record"),
        (["replay", t], {}, 2, error, "cannot read"),
        (["pack", f"{t}/missing"], {}, 2, error, None),
        (["pack", t], {}, 2, error, None),
        (["pack", str(repo), "--budget", "0"], {}, 2, usage, None),
        (["pack", str(repo), "--limit", "0"], {}, 0, None, None),
        (["prompt", "render", f"{t}/missing.json"], {}, 2, error, "cannot read"),
        (["prompt", "render", f"{t}/bad.jsonl"], {}, 2, error, "is not JSON"),
        (["prompt", "render", str(script), "--think", "ultra"], {}, 2, usage, "--think"),
        (["prompt", "render", f"{t}/messages.json", "--think", "MAX", "--effort-profile", "V2"], {}, 0, None, None),
        (["prompt", "parse", f"{t}/missing.txt"], {}, 2, error, "cannot read"),
        (["model", "info", "banana"], {}, 2, error, "neither 'flash' nor 'pro' nor an existing config.json"),
        (["model", "make-tiny", f"{t}/a-file", "--force"], {}, 2, error, "is a file, not a directory"),
        (["model", "make-tiny", f"{t}/holds-git", "--force"], {}, 2, error, "holds a git repository"),
        (["model", "make-tiny", f"{t}/not-empty"], {}, 2, error, "not empty; --force replaces it"),
        (["model", "make-tiny", "/proc/forbidden/x"], {}, 2, error, "/proc/forbidden"),
        (["config", "show", "--config", "/nonexistent.toml"], {}, 2, error, "does not exist"),
        (["config", "show"], {"V4AGENT_SANDBOX": "maybe"}, 2, error, "V4AGENT_SANDBOX must be one of on, off"),
        (["runs", "show", "nope"], {}, 2, error, "no run 'nope'"),
        (["runs", "prune"], {}, 2, error, "--keep N"),
        (["runs", "prune", "--older-than", "soon"], {}, 2, error, "--older-than must be an age"),
        (["runs", "ls"], {}, 0, None, None),
        (["cache", "prune", "--max-size", "lots"], {}, 2, error, "not a size"),
        (["cache", "ls", "--root", f"{t}/missing"], {}, 2, error, "no such directory"),
        (["cache", "stats", "--root", f"{t}/missing"], {}, 2, error, "no such directory"),
        (["bench", "model", "--lengths", "x"], {}, 2, error, "--lengths must be"),
        (["bench", "kernels", "--sizes", "0"], {}, 2, error, "--sizes must be positive"),
        (["eval", "swebench", f"{t}/missing.jsonl"], {}, 2, error, None),
        (["eval", "tbench", f"{t}/missing"], {}, 2, error, None),
        (["eval", "swebench", "mini", "--agent", "banana"], {}, 2, error, "banana"),
        (["eval", "swebench", "mini", "--predictions", f"{t}/missing.jsonl"], {}, 2, error, "no such file"),
        (["eval", "swebench", "mini", "--predictions", f"{t}/bad.jsonl"], {}, 2, error, "not valid JSON"),
        (["eval", "tbench", "mini", "--tasks", "nope"], {}, 2, error, "nope"),
    ]
    if not (shutil.which("docker") or shutil.which("podman")):
        light.append((["eval", "tbench", "mini", "--agent", "oracle", "--container"], {}, 2, error,
                      "neither docker nor podman"))
    heavy = [  # these need torch, after the arguments are checked
        (["cache", "ls"], {}, 0, None, None),  # reads the cache with the runtime's own code
        (["model", "info", str(checkpoints["good"])], {}, 0, None, None),
        *[(["model", "info", str(checkpoints[kind])], {}, 2, error, "runtime.load would refuse")
          for kind in ("truncated", "empty", "missing")],
        (["model", "make-tiny", f"{t}/new", "--config", f"{t}/missing.json"], {}, 2, error, "missing.json"),
    ]
    import torch

    if not torch.cuda.is_available():
        heavy.append(([*fix[:4], "--weights", str(checkpoints["good"]), "--device", "cuda"], {}, 2, error,
                      "device cuda: this machine has no CUDA device"))
    cases = light + heavy
    results = run_battery([{"args": args, "env": env} for args, env, *_ in cases], clean_env(tmp_path))
    helps, results = results[:-len(cases)], results[-len(cases):]

    for got in helps:
        assert got["code"] == 0 and not got["raised"] and "Usage:" in got["stdout"], got
        assert not got["torch"], f"{got['args']} imported torch"
        assert "<bool>" not in got["stdout"], f"{got['args']}: a flag shown with a value type"
    wrong = []  # every case that fails, at once
    for (args, _, code, kind, text), got in zip(cases, results):
        checks = {"no traceback": not got["raised"] and "Traceback" not in got["stdout"] + got["stderr"],
                  f"exit {code}": got["code"] == code,
                  "one error line": kind != error or (got["stderr"].startswith("error: ")
                                                      and got["stderr"].count("\n") == 1),
                  f"says {text!r}": text is None or text in got["stderr"],
                  "no torch": not got["torch"] or (args, _, code, kind, text) not in light}
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            wrong.append(f"{args[:2]} {failed}: exit {got['code']}, {got['raised'] or got['stderr'][-300:]!r}")
    assert not wrong, "\n".join(wrong)
    assert (tmp_path / "a-file").read_text() == "keep me\n" and (tmp_path / "holds-git" / ".git").is_dir()
    # Nothing was started by a refusal: no run directory, not even for the repository without a commit.
    assert not (tmp_path / "cache" / "runs").exists() or not any((tmp_path / "cache" / "runs").iterdir())


def test_ctrl_c_while_the_command_line_imports_exits_130():
    # A real SIGINT, sent the moment `from agent.cli import main` (what the v4agent script runs
    # first) starts importing typer: Python raises KeyboardInterrupt in the middle of the import.
    code = ("import os, signal, sys\n"
            "class CtrlC:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'typer':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, CtrlC())\n"
            "from agent.cli import main\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stderr) == (130, "")


def test_ctrl_c_at_any_moment_of_fix_ends_cleanly(tmp_path: Path):
    repo = make_repo(tmp_path / "repo")
    sleep = {"tool_calls": [{"name": "run", "arguments": {"command": "sleep 30"}}]}
    script = write_script(tmp_path / "s.json", [sleep])
    for delay in (0.2, 0.5, 1.0, 2.0, 4.0):
        process = subprocess.Popen([str(V4AGENT), "fix", "x", "--repo", str(repo), "--script", str(script)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        if "init_import_site" in stderr:
            continue  # still in the interpreter's own start, before any line of v4agent
        # 130 before the run starts; within it, the run stops `interrupted` (exit 1: no patch)
        assert process.returncode in (130, 1), (delay, process.returncode, stderr)
        assert "Traceback" not in stderr and "terminate called" not in stderr, (delay, stderr)


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate(monkeypatch, tmp_path)
    return make_repo(tmp_path / "repo")


def test_max_turn_tokens_is_lowered_to_fit_a_small_context(user: Path, tmp_path: Path):
    script = write_script(tmp_path / "s.json", fix_turns())
    result = runner.invoke(app, ["fix", "x", "--repo", str(user), "--script", str(script), "--context-limit", "4096",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["stop"], out["turns"]) == ("submitted", 4)
    assert "max_turn_tokens 32,768 lowered to 1,024: the model's context is 4,096 tokens" in result.stderr
    [run] = (tmp_path / "cache" / "runs").iterdir()
    header = json.loads((run / "trajectory.jsonl").read_text().splitlines()[0])
    assert header["config"]["max_turn_tokens"] == 1024


def test_a_stop_at_a_limit_says_which_and_how_to_change_it(user: Path, tmp_path: Path):
    script = write_script(tmp_path / "s.json", fix_turns())
    result = runner.invoke(app, ["fix", "x", "--repo", str(user), "--script", str(script), "--max-turns", "1"])
    assert result.exit_code == 1
    assert "stopped: max_turns after 1 turns: the turn limit (1): raise it with --max-turns N" in result.stderr


class Refusing(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        body = json.dumps({"error": {"message": "Authentication Fails"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_a_401_without_a_key_names_the_variable_to_set(user: Path, refusing_server: str):
    result = runner.invoke(app, ["fix", "x", "--repo", str(user), "--endpoint", refusing_server, "--model", "m"])
    assert result.exit_code == 1
    assert "HTTP 401" in result.stderr and "put it in V4AGENT_API_KEY" in result.stderr


def test_config_show_says_where_each_setting_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, tmp_path)
    config = tmp_path / "config.toml"
    config.write_text('think = "MAX"\nmax_turns = 7\n')
    monkeypatch.setenv("V4AGENT_MAX_TURNS", "9")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-secret-value")
    result = runner.invoke(app, ["config", "show", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    settings = out["settings"]
    assert settings["think"] == {"value": "max", "source": str(config)}
    assert settings["max_turns"] == {"value": 9, "source": "V4AGENT_MAX_TURNS"}
    assert settings["sandbox"] == {"value": "on", "source": "default"}
    assert (out["config_file"], out["api_key_variable"]) == (str(config), "DEEPSEEK_API_KEY")
    table = runner.invoke(app, ["config", "show", "--config", str(config)]).stdout
    assert "sk-secret-value" not in table + result.stdout
    assert any(line.split() == ["max_turns", "9", "V4AGENT_MAX_TURNS"] for line in table.splitlines())


def test_runs_ls_show_prune(user: Path, tmp_path: Path):
    script = write_script(tmp_path / "s.json", fix_turns())
    for _ in range(2):
        assert runner.invoke(app, ["fix", "add(2, 3) is -1", "--repo", str(user), "--script", str(script)]
                             ).exit_code == 0
        time.sleep(1.1)  # run names are per second
    runs = tmp_path / "cache" / "runs"
    damaged = runs / "20200101-000000-abcdef"
    damaged.mkdir()
    (damaged / "trajectory.jsonl").write_text("{bad\n")
    (runs / "not-a-run").mkdir()

    listing = runner.invoke(app, ["runs", "ls"]).stdout.splitlines()
    assert listing[0].split()[:4] == ["run", "stop", "turns", "patch"]
    assert [line.split()[1] for line in listing[1:3]] == ["submitted", "submitted"]
    assert "add(2, 3) is -1" in listing[1] and listing[3].startswith(damaged.name) and "is not JSON" in listing[3]
    newest = sorted(p.name for p in runs.iterdir() if p.name[0].isdigit())[-1]
    shown = runner.invoke(app, ["runs", "show", newest[:17], "--json"])
    assert shown.exit_code == 0, shown.output
    details = json.loads(shown.stdout)
    assert details["stop"] == "submitted" and [t["calls"] for t in details["turn_calls"]] == [
        ["read_file"], ["edit_file"], ["run"], ["submit"]]
    assert runner.invoke(app, ["runs", "show", str(damaged)]).exit_code == 2

    dry = json.loads(runner.invoke(app, ["runs", "prune", "--keep", "1", "--dry-run", "--json"]).stdout)
    assert len(dry["removed"]) == 2 and len(list(runs.iterdir())) == 4
    pruned = runner.invoke(app, ["runs", "prune", "--older-than", "365d"])
    assert pruned.exit_code == 0 and damaged.name in pruned.stdout and not damaged.exists()
    assert sorted(p.name for p in runs.iterdir()) == sorted([*(p for p in dry["removed"] if p != damaged.name),
                                                             newest, "not-a-run"])


def test_pack_report_counts_agree_and_lists_what_it_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, tmp_path)
    repo = make_repo(tmp_path / "repo")
    for i in range(3):
        (repo / f"blob{i}.bin").write_bytes(bytes(range(256)) * 8)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "binaries")
    result = runner.invoke(app, ["pack", str(repo), "--limit", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "; 3 files in full, 0 outlined, 0 dropped, 3 skipped" in lines[0]
    assert "full: 3 files" in result.stdout
    at = next(i for i, line in enumerate(lines) if line.startswith("skipped: 3 files"))
    assert lines[at + 1].startswith("  blob0.bin  (") and lines[at + 2] == "  … 2 more (--limit 0 lists all)"
    everything = runner.invoke(app, ["pack", str(repo), "--limit", "0"]).stdout.splitlines()
    at = next(i for i, line in enumerate(everything) if line.startswith("skipped: 3 files"))
    assert [line.split()[0] for line in everything[at + 1:at + 4]] == ["blob0.bin", "blob1.bin", "blob2.bin"]


def test_cache_ls_and_stats_of_an_empty_cache_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, tmp_path)
    listed = runner.invoke(app, ["cache", "ls"])
    assert (listed.exit_code, listed.stdout) == (0, f"no persisted prefixes in {tmp_path / 'cache' / 'prefix'}\n")
    stats = runner.invoke(app, ["cache", "stats"]).stdout.splitlines()
    assert [line.split()[0] for line in stats] == ["root", "segments", "bytes", "unreadable"]
    assert json.loads(runner.invoke(app, ["cache", "stats", "--json"]).stdout)["keys"] == []
