"""Grading cannot be gamed, and the agent cannot peek (SWE-bench side):

- a prediction whose conftest.py writes outside the work tree, reaches a server on the host's
  127.0.0.1 and forces every test to pass: the tests run in the hardened sandbox, so it neither
  writes nor reaches; the forced passes fool the official harness too, so the grade stays the
  official one, but the prediction is flagged `suspicious`, and `--strict` drops the conftest;
- a row in the 5.x format (its own eval_script) and a prediction that only rewrites the
  FAIL_TO_PASS test: the script's git commands work in the sandbox, so the test file is reset
  and the real test patch applied, and the rewrite does not count;
- the v4 agent (the real `v4agent fix`, scripted) cannot read the gold patches of evals/data
  even where its sandbox shows the installation that holds them (as site-packages would);
- the agent cannot see the future: in its tree, in the copy `v4agent fix` makes of it, and in the
  sandbox the model's commands run in, git lists and reads the base commit's history only (not
  the fix, a later tag or branch, or a later base's shared packs), and `git log` works there; the
  grading tree, where a prediction's code runs, holds no more."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from agent.workspace import Workspace
from evals import repos, swebench
from evals.agents import OracleAgent, V4Agent
from evals.instances import parse_instance
from evals.proc import git
from evals.sandbox import Bind
from evals.sandbox import run as run_sandboxed
from tests.test_evals_swebench import F2P, TESTS, calc  # noqa: F401 - the fixture
from tools import sandbox

REPO = Path(__file__).resolve().parents[1]

CONFTEST = '''
import pathlib, socket, pytest

for target in {targets!r}:
    try:
        pathlib.Path(target).write_text("planted")
    except OSError:
        pass
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"reached")
except OSError:
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome, report.longrepr = "passed", None
'''


@pytest.fixture
def server():
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    yield listening
    listening.close()


def _reached(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_a_conftest_cannot_write_or_reach_out_and_is_flagged(calc, server, tmp_path):  # noqa: F811
    targets = [tmp_path / "planted", Path(sys.prefix) / f"planted-{uuid.uuid4().hex}"]  # hidden; shown read-only
    cheat = calc.diff({"tests/conftest.py": CONFTEST.format(targets=[str(t) for t in targets],
                                                           port=server.getsockname()[1])})
    try:
        record = swebench.run_instance(calc.instance(patch=cheat), calc.config(OracleAgent()))
        assert not any(t.exists() for t in targets)
        assert not _reached(server)
        # the official harness is fooled by forced passes too: the grade stays official, and flagged
        assert record["outcome"] == "resolved" and record["suspicious"] == ["tests/conftest.py"]
        strict = swebench.run_instance(calc.instance(patch=cheat), calc.config(OracleAgent(), "strict", strict=True))
        assert strict["outcome"] == "unresolved" and strict["strict_dropped"] == ["tests/conftest.py"]
        assert strict["tests_status"]["FAIL_TO_PASS"]["failure"] == [F2P]
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_an_eval_script_resets_the_tests_a_prediction_rewrote(calc):  # noqa: F811
    instance = calc.instance()
    script = textwrap.dedent(f"""\
        #!/bin/bash
        set -uxo pipefail
        cd /testbed
        git checkout {instance.base_commit} tests/test_calc.py
        git apply -v - <<'EOF_114329324912'
        {{patch}}
        EOF_114329324912
        : '>>>>> Start Test Output'
        python -m pytest -rA -p no:cacheprovider tests/test_calc.py
        : '>>>>> End Test Output'
        git checkout {instance.base_commit} tests/test_calc.py
        """).replace("{patch}", instance.test_patch)
    fake_test = TESTS + textwrap.dedent("""
        import pytest


        @pytest.mark.parametrize("a,b,c", [(1, 2, 3)], ids=["one-plus-two"])
        def test_add(a, b, c):
            assert True
        """)
    cheat = calc.diff({"tests/test_calc.py": fake_test})  # calc.py left broken
    record = swebench.run_instance(calc.instance(patch=cheat, eval_script=script, log_parser="parse_log_pytest"),
                                   calc.config(OracleAgent()))
    assert record["outcome"] == "unresolved", record
    assert record["tests_status"]["FAIL_TO_PASS"]["failure"] == [F2P]
    assert record["suspicious"] == ["tests/test_calc.py"]
    log = (calc.config(OracleAgent()).out / "instances" / "acme__calc-1" / "test_output.txt").read_text()
    assert "bad object" not in log and "Applied patch tests/test_calc.py cleanly." in log


def test_the_agent_cannot_read_the_gold_patches(calc, tmp_path, monkeypatch):  # noqa: F811
    """The checkout is shown to the agent's sandbox on purpose (V4AGENT_SANDBOX_PATHS), as an
    installed package is inside the venv the sandbox shows: its evals/data must stay hidden."""
    pytest.importorskip("agent.cli.fix")
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("V4AGENT_SANDBOX_PATHS", str(REPO))
    data = REPO / "evals" / "data"
    probe = (f"head -c 300 {data}/mini_swebench.jsonl > leak.txt 2>&1; ls {data} >> leak.txt 2>&1; "
             f"head -1 {REPO}/evals/sandbox.py >> leak.txt; true")
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps([
        {"content": "", "tool_calls": [{"name": "run", "arguments": {"command": probe}}]},
        {"content": "", "tool_calls": [{"name": "submit", "arguments": {"summary": "looked around"}}]}]))
    fix = f"{shlex.quote(sys.executable)} -c 'import typer; from agent.cli.fix import fix_cmd; typer.run(fix_cmd)'"
    agent = V4Agent(f"{fix} --repo {{repo}} --issue-file {{issue_file}} --patch-out {{patch_out}} --json "
                    f"--script {turns}")
    swebench.run_instance(calc.instance(), calc.config(agent))
    patch = json.loads((calc.config(agent).out / "instances" / "acme__calc-1" / "prediction.json").read_text())
    leak = patch["model_patch"]
    assert '+"""Sandboxed runs for the eval harnesses.' in leak  # the checkout was shown...
    assert "No such file or directory" in leak  # ...but not its data
    assert '"instance_id"' not in leak and "build_mini_swebench.py" not in leak


def test_what_counts_as_test_infrastructure(tmp_path):
    """conftest.py, pytest/tox files, the pytest/tox sections of setup.cfg and pyproject.toml (not
    their other sections), files of the test patch, the runner the test command names; and
    --strict drops exactly those files' changes."""
    from evals.envs import EnvSpec
    from evals.grader import suspicious_files, without_files
    from evals.instances import parse_instance
    from evals.proc import git

    repo = tmp_path / "repo"
    repo.mkdir()
    base = {"setup.cfg": "[metadata]\nname = x\n\n[tool:pytest]\naddopts = -q\n",
            "pyproject.toml": '[project]\nname = "x"\nversion = "1"\n\n[tool.pytest.ini_options]\naddopts = "-q"\n',
            "tests/runtests.py": "print('run')\n", "tests/test_a.py": "def test_a():\n    pass\n", "x.py": "x = 1\n"}
    for path, text in base.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git("init", "--quiet", cwd=repo)
    git("add", "--all", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "base", cwd=repo)
    commit = git("rev-parse", "HEAD", cwd=repo).strip()

    def diff(edits: dict[str, str]) -> str:
        for path, text in edits.items():
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_text(text)
        git("add", "--all", cwd=repo)
        patch = git("diff", "--cached", commit, cwd=repo)
        git("reset", "--quiet", "--hard", commit, cwd=repo)
        git("clean", "--quiet", "-fd", cwd=repo)
        return patch

    instance = parse_instance({"instance_id": "a__b-1", "repo": "a/b", "base_commit": commit, "patch": "",
                               "test_patch": diff({"tests/test_a.py": "def test_a():\n    assert 1\n"}),
                               "problem_statement": "", "version": "1", "FAIL_TO_PASS": [], "PASS_TO_PASS": []})
    spec = EnvSpec("a/b", ("*",), "3.11", test_cmd="./tests/runtests.py --verbosity 2")
    innocent = diff({"x.py": "x = 2\n", "setup.cfg": base["setup.cfg"].replace("name = x", "name = y"),
                     "pyproject.toml": base["pyproject.toml"].replace('version = "1"', 'version = "2"')})
    assert suspicious_files(innocent, instance, spec, repo) == []
    cheat = diff({"x.py": "x = 2\n", "setup.cfg": base["setup.cfg"].replace("-q", "-p cheat"),
                  "pyproject.toml": base["pyproject.toml"] + 'python_files = ["nothing"]\n',
                  "sub/conftest.py": "", "tox.ini": "[tox]\n", "tests/runtests.py": "print('all ok')\n",
                  "tests/test_a.py": "", "sitecustomize.py": ""})
    flagged = suspicious_files(cheat, instance, spec, repo)
    assert sorted(flagged) == ["pyproject.toml", "setup.cfg", "sitecustomize.py", "sub/conftest.py",
                               "tests/runtests.py", "tests/test_a.py", "tox.ini"]
    kept = without_files(cheat, flagged)
    assert "diff --git a/x.py b/x.py" in kept and "conftest" not in kept and "setup.cfg" not in kept


# --- the future is out of the agent's reach -------------------------------------------------------

_IDENTITY = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
             "GIT_COMMITTER_EMAIL": "t@t"}
# Every way git lists or reads what it holds: refs, reflogs, every object and its contents, dangling ones.
PROBES = ("git log --all --reflog --format='%H %B'; git rev-list --all --objects; "
          "git cat-file --batch-all-objects --batch; git for-each-ref; git fsck --unreachable --no-reflogs; "
          "git fsck --lost-found; git tag -n9; git branch -a; git stash list")


def _commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
    git("add", "--all", cwd=repo)
    git("commit", "--quiet", "-m", message, cwd=repo, env=_IDENTITY)
    return git("rev-parse", "HEAD", cwd=repo).strip()


@pytest.fixture
def future(tmp_path: Path, monkeypatch):
    """A mirror whose history goes on after the base: the fix (a secret in a new file, the commit
    message, a tag and a branch), then a later base. First-parent depth of the base: 7, with a
    merged side branch; shared packs every 4 and 2 commits (4, 6 for the base; 4, 8 for the later
    one: the pack at 8 holds the fix)."""
    monkeypatch.setattr(repos, "HISTORY_STEPS", (4, 2))
    work = tmp_path / "upstream"
    work.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    _commit(work, {"a.py": "a = 1\n"}, "one")
    git("tag", "-a", "v0.1", "-m", "first release", cwd=work, env=_IDENTITY)
    git("checkout", "--quiet", "-b", "side", cwd=work)
    _commit(work, {"side.py": "side = 1\n"}, "side work")
    git("checkout", "--quiet", "main", cwd=work)
    _commit(work, {"a.py": "a = 2\n"}, "two")
    git("merge", "--quiet", "--no-ff", "-m", "merge side", "side", cwd=work, env=_IDENTITY)
    for n in range(4, 8):
        base = _commit(work, {"a.py": f"a = {n}\n"}, f"commit {n}")
    fix = _commit(work, {"secret.py": "ANSWER = 'FUTURE-BLOB'\n", "a.py": "a = 'fixed'\n"}, "FUTURE-MESSAGE")
    git("tag", "-a", "v1.0", "-m", "FUTURE-TAG", cwd=work, env=_IDENTITY)
    later = _commit(work, {"b.py": "b = 1\n"}, "after the fix")
    git("checkout", "--quiet", "-b", "feature", fix, cwd=work)
    branch = _commit(work, {"c.py": "c = 'FUTURE-BRANCH'\n"}, "a branch after the base")
    source = tmp_path / "source"
    git("clone", "--quiet", "--mirror", str(work), str(source / "acme__hist.git"), cwd=tmp_path)
    secrets = [fix, later, branch, "FUTURE", git("rev-parse", f"{fix}:secret.py", cwd=work).strip(),
               git("rev-parse", "v1.0", cwd=work).strip()]

    def instance(commit: str):
        return parse_instance({"instance_id": f"acme__hist-{commit[:7]}", "repo": "acme/hist", "base_commit": commit,
                               "patch": "", "test_patch": "", "problem_statement": "", "version": "1",
                               "FAIL_TO_PASS": [], "PASS_TO_PASS": []})

    store = repos.RepoStore(source, tmp_path / "cache")
    store.checkout(instance(later), tmp_path / "later")  # the pack that holds the fix is in the cache now
    history = git("rev-list", base, cwd=work).split()
    line = git("rev-list", "--first-parent", base, cwd=work).split()
    assert len(line) == 7 and len(history) == 8
    shared = [line[-4], line[-6], fix]  # the tops at depths 4 and 6 (the base's), 8 (the later base's)
    return store, instance(base), history, secrets, shared


def _assert_past_only(output: str, secrets: list[str]) -> None:
    assert "refs/tags/v0.1" in output and "first release" in output  # the probes did run
    for secret in secrets:
        assert secret not in output


@pytest.mark.parametrize("self_contained", [True, False], ids=["agent", "grading"])
def test_a_work_tree_holds_the_base_history_only(future, tmp_path, self_contained):
    store, instance, history, secrets, shared = future
    tree = store.checkout(instance, tmp_path / "tree", self_contained=self_contained)
    done = subprocess.run(["bash", "-c", PROBES], cwd=tree, capture_output=True, text=True, errors="replace",
                          check=False)
    _assert_past_only(done.stdout + done.stderr, secrets)
    assert "error" not in done.stderr and "missing" not in done.stdout  # every object of the history is there
    assert git("log", "--format=%H", cwd=tree).split() == history
    assert git("for-each-ref", "--format=%(refname)", cwd=tree).split() == ["refs/tags/v0.1"]
    assert subprocess.run(["git", "cat-file", "-e", secrets[0]], cwd=tree, check=False).returncode != 0
    assert (tmp_path / "tree" / ".git" / "objects" / "info" / "alternates").exists() != self_contained
    packs = (store.cache / "history" / "acme__hist").iterdir()
    assert sorted(p.name for p in packs if p.is_dir()) == sorted(shared)  # the one at 4 is shared


@pytest.mark.skipif(not sandbox.available(), reason="bubblewrap is not installed or cannot sandbox here")
def test_the_models_commands_see_the_base_history_only(future, tmp_path):
    """As the model's commands run: in the sandbox, on the copy `v4agent fix` makes of the
    agent's tree (which borrows that tree's objects). Before, the copy borrowed a tree that
    borrowed the mirror: the future was listed on the host, and inside git failed outright."""
    store, instance, history, secrets, _ = future
    tree = store.checkout(instance, tmp_path / "agent", self_contained=True)
    copy = Workspace.create(tree, tmp_path / "run" / "work")
    command = sandbox.command(copy.root, ["bash", "-c", PROBES + "; echo LOG; git log --format=%H"],
                              {"PATH": "/usr/bin:/bin"})
    try:
        done = subprocess.run(command.argv, env=command.env, pass_fds=command.pass_fds, capture_output=True,
                              text=True, errors="replace", timeout=120, check=False)
    finally:
        command.close()
    _assert_past_only(done.stdout + done.stderr, secrets)
    assert done.stdout.split("LOG\n")[1].split() == history, done.stderr
    off = subprocess.run(["bash", "-c", PROBES], cwd=copy.root, capture_output=True, text=True,
                         errors="replace", check=False)  # as with --sandbox off
    _assert_past_only(off.stdout + off.stderr, secrets)


@pytest.mark.skipif(not sandbox.available(), reason="bubblewrap is not installed or cannot sandbox here")
def test_a_predictions_code_sees_the_base_history_only_when_graded(future, tmp_path):
    """The grader's sandbox (its .git writable, the shared packs read-only): a prediction that
    looked for the fix in git while its tests run would find nothing."""
    store, instance, history, secrets, _ = future
    tree = store.checkout(instance, tmp_path / "eval")
    done = run_sandboxed(Bind(tree, "/testbed"), ["bash", "-c", PROBES + "; echo LOG; git log --format=%H"],
                         env={"PATH": "/usr/bin:/bin"}, timeout=120, writable_git=True)
    _assert_past_only(done.output, secrets)
    assert done.output.split("LOG\n")[1].split() == history, done.output


def test_the_agents_tree_stands_alone_whichever_file_system_the_cache_is_on(future, tmp_path):
    """Its packs are hard links into the cache, or copies when the cache is on another file system
    (/dev/shm here): never alternates, which the copy `fix` makes would borrow at second hand."""
    store, instance, history, _, _ = future
    same = store.checkout(instance, tmp_path / "same", self_contained=True)
    linked = [p.stat().st_nlink > 1 for p in (same / ".git" / "objects" / "pack").glob("*.pack")]
    assert sorted(linked) == [False, True, True]  # its own pack, and the two shared ones
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("no other file system to put the cache on")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
        apart = repos.RepoStore(store.repo_source, Path(elsewhere))
        tree = apart.checkout(instance, tmp_path / "apart", self_contained=True)
        assert len(list(Path(elsewhere, "history", "acme__hist").glob("*/pack/*.pack"))) == 2
    packs = list((tree / ".git" / "objects" / "pack").glob("*.pack"))
    assert len(packs) == 3 and all(p.stat().st_nlink == 1 for p in packs)
    assert git("log", "--format=%H", cwd=tree).split() == history
