"""The sandbox under attack, as root (CI runs as root) and as an unprivileged user: every attack
of tests/sandbox_attacks.py is refused; resource hogs end as tool results; without a working
sandbox nothing runs; unconfined commands leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent.workspace import Workspace
from tests.fixtures_agent import git
from tools import sandbox
from tools.base import Settings
from tools.registry import call

ATTACKS = Path(__file__).with_name("sandbox_attacks.py")
UNPRIVILEGED_UID = 65001


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """The agent's copy (a shared clone, as `fix` makes) of a user's repository."""
    user = tmp_path / "user-checkout"
    user.mkdir()
    (user / "app.py").write_text("print('hi')\n")
    git(user, "init", "-q")
    git(user, "add", ".")
    git(user, "commit", "-qm", "first")
    return Workspace.create(user, tmp_path / "runs" / "work")


@pytest.fixture
def host() -> dict:
    """Things on the host the sandbox must not reach: a process, a TCP server, an abstract socket."""
    sleeper = subprocess.Popen(["sleep", "300"])
    server = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    name = f"v4agent-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract.bind("\0" + name)
    abstract.listen()
    yield {"host_pid": sleeper.pid, "tcp_port": server.getsockname()[1], "abstract": name}
    sleeper.kill()
    sleeper.wait()
    server.close()
    abstract.close()


def attack(root: Path, facts: dict, python: str = sys.executable, settings: Settings = Settings()) -> dict:
    shutil.copy(ATTACKS, root / "attacks.py")  # the model would write it there
    result = call("run", {"command": f"{python} attacks.py '{json.dumps(facts)}'"}, root, settings=settings)
    assert result.ok, result.output
    return json.loads(result.output.splitlines()[-1])


def breaches(report: dict) -> dict:
    return {name: outcome for name, outcome in report.items() if outcome != "refused"}


def test_root_gets_no_privilege_and_sees_only_the_work_tree(workspace: Workspace, host: dict, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("this case is about v4agent started by root")
    other_repo = tmp_path / "other-repo"
    other_repo.mkdir()
    home = Path.home()
    home_entries = [str(p) for p in home.iterdir() if not any(
        d.is_relative_to(p) for d in sandbox.interpreter_dirs() + [workspace.root])] if home.is_dir() else []
    facts = {**host, "uid": Settings().sandbox_uid, "outside": str(workspace.root.parent),
             "hidden": [str(workspace.repo), str(other_repo), str(tmp_path / "runs" / "trajectory.jsonl"),
                        *home_entries]}
    (tmp_path / "runs" / "trajectory.jsonl").write_text("{}\n")
    report = attack(workspace.root, facts)
    assert len(report) > 30 and not breaches(report)
    assert not (workspace.root.parent / "planted").exists()


def test_git_works_inside_without_showing_the_users_checkout(workspace: Workspace):
    (workspace.root / "app.py").write_text("print('changed')\n")
    result = call("run", {"command": "git log --oneline && git diff --stat && cat .git/objects/info/alternates"},
                  workspace.root)
    assert "first" in result.output and "app.py | 2 +-" in result.output, result.output
    assert str(workspace.repo) not in result.output and sandbox.OBJECTS_MOUNT in result.output


def test_git_works_inside_when_the_users_repository_borrows_at_second_hand(tmp_path: Path):
    """The user's checkout is itself a `clone --shared` of a shared clone: the agent's copy then
    reads objects through two levels of alternates, and every level must be shown (none of the
    host paths named)."""
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "app.py").write_text("print('hi')\n")
    git(origin, "init", "-q")
    git(origin, "add", ".")
    git(origin, "commit", "-qm", "first")
    middle, user = tmp_path / "middle", tmp_path / "user-checkout"
    git(tmp_path, "clone", "-q", "--shared", str(origin), str(middle))
    git(tmp_path, "clone", "-q", "--shared", str(middle), str(user))
    work = Workspace.create(user, tmp_path / "runs" / "work").root
    result = call("run", {"command": "git log --oneline && git show --stat HEAD && "
                          "cat .git/objects/info/alternates " + sandbox.OBJECTS_MOUNT + "/*/info/alternates"},
                  work)
    assert "first" in result.output and "app.py" in result.output and "error" not in result.output, result.output
    assert str(origin) not in result.output and str(middle) not in result.output, result.output


def test_the_work_tree_stays_usable_by_both_sides(workspace: Workspace):
    """Root hands the tree to the sandbox's uid; files v4agent writes afterwards are handed over too."""
    call("write_file", {"path": "pkg/new.py", "content": "x = 1\n"}, workspace.root)
    result = call("run", {"command": "echo 'y = 2' >> pkg/new.py && mkdir -p out && touch out/f && cat pkg/new.py"},
                  workspace.root)
    assert result.output.endswith("x = 1\ny = 2\n"), result.output
    assert b"pkg/new.py" in workspace.patch().diff


def test_unprivileged_user_gets_the_same_confinement(host: dict):
    """The same attacks, from v4agent started by an unprivileged user (bubblewrap then builds the
    sandbox in a user namespace). Runs the tools package under the system Python as that user."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or python is None or shutil.which("setpriv") is None:
        pytest.skip("needs root (to switch user), setpriv and a system python3")
    import pyseccomp

    base = Path(tempfile.mkdtemp(prefix="v4agent-unprivileged-"))  # pytest's own tmp is private to root
    try:
        code, root, outside = base / "code", base / "work", base / "outside"
        shutil.copytree(Path(sandbox.__file__).parent, code / "tools", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(pyseccomp.__file__, code)
        shutil.copy(ATTACKS, root.parent / "attacks.py")
        root.mkdir()
        outside.mkdir()
        for folder, dirs, files in os.walk(base):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.chown(name, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        facts = {**host, "uid": UNPRIVILEGED_UID, "outside": str(outside), "hidden": [str(Path.home())]}
        driver = ("import json, shutil, sys; from tools.registry import call; "
                  f"shutil.copy({str(base / 'attacks.py')!r}, {str(root / 'attacks.py')!r}); "
                  f"r = call('run', {{'command': sys.executable + ' attacks.py ' + {repr(repr(json.dumps(facts)))}}}, "
                  f"{str(root)!r}); print(r.output)")
        done = subprocess.run(["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}",
                               "--clear-groups", python, "-c", driver], cwd=code, capture_output=True, text=True,
                              timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(code), "HOME": str(base)})
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(report) > 30 and not breaches(report)
        assert not (outside / "planted").exists()
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_hogs_end_as_tool_results_and_the_agent_goes_on(workspace: Workspace, mode: str):
    tight = Settings(sandbox=mode, memory_mb=256, max_processes=64, max_file_mb=4, tmp_mb=8)
    root = workspace.root
    memory = call("run", {"command": "python3 -c 'bytearray(1 << 30)'"}, root, settings=tight)
    assert "MemoryError" in memory.output
    big = call("run", {"command": "head -c 20000000 /dev/zero > big.bin"}, root, settings=tight)
    assert "4 MB limit" in big.output and (root / "big.bin").stat().st_size <= 4 << 20
    if mode == "on":  # unconfined, root is exempt from RLIMIT_NPROC: no fork bomb there
        fill = "for i in 1 2 3 4; do head -c 3000000 /dev/zero > /tmp/f$i || break; done"  # files under 4 MB each
        tmp = call("run", {"command": fill}, root, settings=tight)
        assert "No space left on device" in tmp.output
        started = time.monotonic()
        bomb = call("run", {"command": "bomb() { bomb | bomb & }; bomb; sleep 30", "timeout": 5}, root,
                    settings=tight)
        assert time.monotonic() - started < 30
        assert "Resource temporarily unavailable" in bomb.output or "timed out" in bomb.output
        deadline = time.monotonic() + 10  # the kernel tears the pid namespace down asynchronously
        while subprocess.run(["pgrep", "-u", str(tight.sandbox_uid)], capture_output=True).stdout:
            assert time.monotonic() < deadline, "processes of the sandbox outlived it"
            time.sleep(0.1)
    after = call("run", {"command": "echo still here"}, root, settings=tight)
    assert after.ok and "still here" in after.output


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode", ["on", "off"])
def test_nothing_a_command_starts_outlives_it(workspace: Workspace, mode: str, tmp_path: Path):
    """A daemon that double-forks into its own session is gone when the command returns, and on a timeout."""
    pid_file = workspace.root / "daemon.pid"
    daemon = f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 600' > /dev/null 2>&1 < /dev/null &"
    for command, timeout in ((f"{daemon} sleep 0.5; echo started", 30), (f"{daemon} sleep 60", 2)):
        pid_file.unlink(missing_ok=True)
        call("run", {"command": command, "timeout": timeout}, workspace.root, settings=Settings(sandbox=mode))
        if mode == "off":  # in the sandbox the pid is the namespace's; its death is the namespace's
            pid = int(pid_file.read_text())
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pid)
    leftovers = subprocess.run(["pgrep", "-f", "exec sleep 600"], capture_output=True, text=True).stdout.split()
    assert not leftovers


def test_secrets_stay_out_of_commands(workspace: Workspace, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("V4AGENT_API_KEY", "sk-test-secret-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-2")
    for mode in ("on", "off"):
        result = call("run", {"command": "env; cat /proc/$PPID/environ | tr '\\0' '\\n'"}, workspace.root,
                      settings=Settings(sandbox=mode))
        assert "sk-test-secret-1" not in result.output and "aws-secret-2" not in result.output


def test_without_a_working_sandbox_nothing_runs(workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The run tool refuses and says how to fix it; the check `fix` makes before starting says the same."""
    _broken_bwrap(tmp_path, monkeypatch)
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap.*--sandbox off"):
            sandbox.check()
        marker = workspace.root / "ran"
        refused = call("run", {"command": f"touch {marker}"}, workspace.root)
        assert not refused.ok and "No permissions to create new namespace" in refused.output
        assert not marker.exists()
    finally:
        sandbox._probe.cache_clear()


def test_seccomp_filter_is_built_for_this_machine():
    program = sandbox.seccomp_filter()
    assert len(program) % 8 == 0 and len(program) > 8 * len(sandbox.BLOCKED_SYSCALLS)


def test_signal_names_in_results(workspace: Workspace):
    result = call("run", {"command": "kill -SEGV $$"}, workspace.root, settings=Settings(sandbox="off"))
    assert f"exit code {128 + signal.SIGSEGV}: killed by SIGSEGV" in result.output


def _broken_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bubblewrap that cannot create namespaces, first on PATH (as in many containers)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    (fake / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    sandbox._probe.cache_clear()


def test_fix_refuses_to_start_without_a_sandbox_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No working sandbox: `fix` exits 2 before any work, saying how to install bubblewrap or opt
    out; with --sandbox off it runs, says loudly that it is unconfined, and still scrubs secrets."""
    from typer.testing import CliRunner

    from agent.cli import app
    from tests.fixtures_agent import fix_turns, isolate, make_repo, write_script

    cache = isolate(monkeypatch, tmp_path)
    repo = make_repo(tmp_path / "repo")
    leak = [{"tool_calls": [{"name": "run", "arguments": {"command": "env > env.txt"}}]}]
    script = write_script(tmp_path / "turns.json", leak + fix_turns())
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-should-not-leak-0123456789")
    _broken_bwrap(tmp_path, monkeypatch)
    try:
        runner = CliRunner()
        refused = runner.invoke(app, ["fix", "add is wrong", "--repo", str(repo), "--script", str(script)])
        assert refused.exit_code == 2, refused.output
        assert "apt-get install bubblewrap" in refused.output and "--sandbox off" in refused.output
        assert not (cache / "runs").exists()  # nothing started
        unconfined = runner.invoke(app, ["fix", "add is wrong", "--repo", str(repo), "--script", str(script),
                                         "--sandbox", "off", "--json"])
        assert unconfined.exit_code == 0, unconfined.output
        assert "UNCONFINED" in unconfined.output
        result = json.loads(unconfined.output.splitlines()[-1])
        assert "env.txt" in result["patch"] and "sk-should-not-leak" not in result["patch"]
        bad = runner.invoke(app, ["fix", "x", "--repo", str(repo), "--script", str(script), "--sandbox", "auto"])
        assert bad.exit_code == 2 and "sandbox must be one of on, off" in bad.output
    finally:
        sandbox._probe.cache_clear()


@pytest.mark.parametrize("name, arguments", [
    ("read_file", {"path": "\ud800"}), ("write_file", {"path": "a\udcff", "content": "x"}),
    ("run", {"command": "echo \ud800", "timeout": 5}), ("edit_file", {"path": "x", "old_text": "\udc80", "new_text": "y"}),
])
def test_lone_surrogates_in_arguments_are_tool_errors(workspace: Workspace, name: str, arguments: dict):
    """JSON can spell a lone surrogate (\\ud800) that no file name, file or command can hold: an
    error the model reads, not a crash of the run."""
    result = call(name, json.dumps(arguments), workspace.root)
    assert not result.ok and "not valid Unicode" in result.output


def test_fix_leaves_secrets_out_of_the_prompt_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An untracked .env with a token never reaches the model's prompt; --include-secrets sends it."""
    from typer.testing import CliRunner

    from agent.cli import app
    from tests.fixtures_agent import fix_turns, isolate, make_repo, write_script

    cache = isolate(monkeypatch, tmp_path)
    repo = make_repo(tmp_path / "repo")
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    (repo / ".env").write_text(f"GITHUB_TOKEN={token}\n")
    script = write_script(tmp_path / "turns.json", fix_turns())
    runner = CliRunner()
    first_prompt, seen = {}, set()
    for flags, sent in (([], False), (["--include-secrets"], True)):
        done = runner.invoke(app, ["fix", "add is wrong", "--repo", str(repo), "--script", str(script), "--sandbox",
                                   "off", *flags])
        assert done.exit_code == 0, done.output
        (run,) = set((cache / "runs").iterdir()) - seen  # names sort by second, then at random
        seen.add(run)
        lines = [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]
        pack = next(r for r in lines if r["type"] == "pack")
        assert pack["secrets"] and pack["secrets"][0]["path"] == ".env" and pack["secrets_included"] is sent
        first_prompt[sent] = next(r for r in lines if r["type"] == "turn")["stats"]["prompt_tokens"]
        assert ".env" in done.output
    assert first_prompt[True] > first_prompt[False]  # the file went into the prompt only when asked
