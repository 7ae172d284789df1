"""Grading cannot be gamed, and the agent cannot peek (SWE-bench side):

- a prediction whose conftest.py writes outside the work tree, reaches a server on the host's
  127.0.0.1 and forces every test to pass: the tests run in the hardened sandbox, so it neither
  writes nor reaches; the forced passes fool the official harness too, so the grade stays the
  official one, but the prediction is flagged `suspicious`, and `--strict` drops the conftest;
- a row in the 5.x format (its own eval_script) and a prediction that only rewrites the
  FAIL_TO_PASS test: the script's git commands work in the sandbox, so the test file is reset
  and the real test patch applied, and the rewrite does not count;
- the v4 agent (the real `v4agent fix`, scripted) cannot read the gold patches of evals/data
  even where its sandbox shows the installation that holds them (as site-packages would)."""

from __future__ import annotations

import json
import shlex
import socket
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from evals import swebench
from evals.agents import OracleAgent, V4Agent
from tests.test_evals_swebench import F2P, TESTS, calc  # noqa: F401 - the fixture

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
