"""Terminal-Bench graded exactly as the official packages grade it, and not gameable.

Differential: the same reward files, task folders, reward lists, trajectories and pytest outputs
given to the project and to harbor 0.26.0 / terminal-bench 0.2.18 themselves (tests/harbor_driver.py),
which need Python >= 3.12: they run in a Debian trixie root (Python 3.13) made once with
mmdebstrap and kept in the test cache (about a minute cold, needs Debian's mirror and PyPI;
seconds warm). Every case must agree.

Then Harbor's run semantics end to end (shebang, [solution.env], the Dockerfile's WORKDIR,
rewards past the verifier's timeout, a broken task among good ones), and the attacks: a reward
planted by the agent's phase, by a process it leaves behind, and the agent reading the task's
tests from a checkout or the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.pack_cache import cache_root
from evals import atif, tbench
from evals.proc import EvalError
from evals.tbench_tasks import load_task, load_tasks

# The official code and what it imports, pinned (wheels for CPython 3.13; --no-deps).
PINS = ("harbor==0.26.0", "terminal-bench==0.2.18", "pydantic==2.14.4", "pydantic-core==2.50.5",
        "annotated-types==0.8.0", "typing-extensions==4.16.0", "typing-inspection==0.4.5", "shortuuid==1.0.13",
        "pathspec==1.1.1", "platformdirs==4.14.8", "toml==0.10.2")
SUITE, MIRROR = "trixie", "http://deb.debian.org/debian"
DRIVER = Path(__file__).with_name("harbor_driver.py")


def _check(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({shlex.join(argv[:4])} ...):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _official_root() -> Path:
    """A Debian root with Python 3.13 and the official packages in /opt/venv, built once (into a
    folder of its own, renamed into place when complete: a parallel build loses the race cleanly)."""
    key = hashlib.sha256(" ".join((SUITE, *PINS)).encode()).hexdigest()[:12]
    root = cache_root() / "evals" / "official" / key
    if root.is_dir():
        return root
    if shutil.which("mmdebstrap") is None:
        pytest.fail("the differential tests need mmdebstrap to make their Python 3.13 root: apt-get install mmdebstrap")
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root.parent))
    try:
        _check(["mmdebstrap", "--quiet", "--variant=essential", "--include=python3,python3-venv", SUITE,
                str(building), MIRROR], "mmdebstrap")
        for folder in ("wheels", "venv", "work"):
            (building / "opt" / folder).mkdir(parents=True, exist_ok=True)
        _check([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--python-version", "3.13",
                "--platform", "manylinux2014_x86_64", "--only-binary=:all:", "-d", str(building / "opt" / "wheels"),
                *PINS], "pip download")
        _check(["bwrap", "--bind", str(building), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                "--unshare-all", "--die-with-parent", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--", "sh",
                "-c", "python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-index --no-deps "
                "/opt/wheels/*.whl"], "installing the official packages")
        building.rename(root)
    except OSError:
        if not root.is_dir():
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """`official(cases, work)`: what the official packages make of `cases` (paths in them are
    relative to `work`)."""
    root = _official_root()

    def ask(cases: list[dict], work: Path) -> list[dict]:
        shutil.copy(DRIVER, work / DRIVER.name)
        done = subprocess.run(
            ["bwrap", "--ro-bind", str(root), "/", "--bind", str(work), "/opt/work", "--dev", "/dev", "--proc",
             "/proc", "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent", "--clearenv", "--setenv", "PATH",
             "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--", "/opt/venv/bin/python", "-W", "ignore",
             f"/opt/work/{DRIVER.name}"], input=json.dumps(cases), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    return ask


# ---- rewards ----

REWARD_FILES = [
    {"reward.txt": b"1"}, {"reward.txt": b"0"}, {"reward.txt": b"1\n"}, {"reward.txt": b" 0.5 \n"},
    {"reward.txt": b"0.25"}, {"reward.txt": b"-1"}, {"reward.txt": b"+1"}, {"reward.txt": b"1e0"},
    {"reward.txt": b"1_0"}, {"reward.txt": b""}, {"reward.txt": b"\n"}, {"reward.txt": b"inf"},
    {"reward.txt": b"-inf"}, {"reward.txt": b"nan"}, {"reward.txt": b"1e309"}, {"reward.txt": b"one"},
    {"reward.txt": b"1 0"}, {"reward.txt": b"0x1"}, {"reward.txt": b"\xff1"}, {"reward.txt": b"1\r\n"},
    {"reward.json": b'{"reward": 1}'}, {"reward.json": b'{"reward": 1.0}'}, {"reward.json": b'{"reward": "1"}'},
    {"reward.json": b'{"reward": true}'}, {"reward.json": b'{"reward": false}'}, {"reward.json": b'{"reward": null}'},
    {"reward.json": b'{"reward": Infinity}'}, {"reward.json": b'{"reward": NaN}'}, {"reward.json": b'{"reward": 1e309}'},
    {"reward.json": b'{"odd": 1, "even": 0.5}'}, {"reward.json": b'{"a": 1, "reward": 0}'}, {"reward.json": b"{}"},
    {"reward.json": b"[]"}, {"reward.json": b"[1]"}, {"reward.json": b"1"}, {"reward.json": b"0.5"},
    {"reward.json": b'"1"'}, {"reward.json": b"null"}, {"reward.json": b""}, {"reward.json": b"{"},
    {"reward.json": b'{"r": {"nested": 1}}'}, {"reward.json": b'{"r": [1]}'}, {"reward.json": b'{"r": 1, "r": 0}'},
    {"reward.json": b'\xef\xbb\xbf{"reward": 1}'}, {"reward.json": b'{"reward": 12345678901234567890123}'},
    {"reward.json": b'{"reward": 1}', "reward.txt": b"0"}, {"reward.json": b"nope", "reward.txt": b"1"},
    {"reward.json": b"", "reward.txt": b"1"}, {"reward.txt": b"1", "other.txt": b"2"}, {},
]


def test_rewards_are_read_as_harbor_reads_them(official, tmp_path):
    cases, ours = [], []
    for i, files in enumerate(REWARD_FILES):
        verifier = tmp_path / f"r{i}" / "verifier"
        verifier.mkdir(parents=True)
        for name, data in files.items():
            (verifier / name).write_bytes(data)
        cases.append({"kind": "rewards", "dir": f"r{i}"})
        try:
            found = tbench.read_rewards(verifier)
            ours.append({"rewards": found, "valid": bool(found)})
        except tbench.TrialError as e:
            ours.append({"error": e.kind, "valid": False})
    theirs = official(cases, tmp_path)
    disagree = [(files, mine, their) for files, mine, their in zip(REWARD_FILES, ours, theirs) if mine != their]
    print(f"rewards: {len(REWARD_FILES)} cases, {len(disagree)} disagreements")
    assert not disagree
    # what the issue named: no file, inf, a string reward are errors, not scores
    assert {"error": "RewardFileNotFoundError", "valid": False} in theirs
    assert theirs[REWARD_FILES.index({"reward.txt": b"inf"})]["error"] == "VerifierOutputParseError"
    assert theirs[REWARD_FILES.index({"reward.json": b'{"reward": "1"}'})]["error"] == "VerifierOutputParseError"


def test_the_run_metric_is_harbors_mean(official, tmp_path):
    lists = [[{"reward": 1}], [{"reward": 1}, {"reward": 0.0}, {"reward": 0.5}], [{"score": 0.25}, {"reward": 1}],
             [{"odd": 1, "even": 0}, {"odd": 1, "even": 1}], [{"a": 1, "b": 0.5}, {"a": 0}], [{"reward": True}],
             [{"reward": 1}, {"reward": 1}, {"reward": 0}]]
    theirs = official([{"kind": "mean", "rewards": rewards} for rewards in lists], tmp_path)
    ours = [tbench.harbor_mean(rewards) for rewards in lists]
    assert ours == theirs, list(zip(lists, ours, theirs))
    policies = ["AgentTimeoutError", "NonZeroAgentExitCodeError", "VerifierTimeoutError", "RewardFileNotFoundError",
                "ApiError", "ValidationError"]
    valid = official([{"kind": "policy", "type": name} for name in policies], tmp_path)
    # the agent's timeout still grades; a verifier's timeout or a backend's failure leaves no reward
    assert [v["valid"] for v in valid] == [True, True, False, False, False, True]


# ---- task folders ----

def _task_dir(root: Path, toml: str, *, instruction: str | None = "Do it.\n", test_sh: bool = True) -> Path:
    (root / "environment").mkdir(parents=True)
    (root / "environment" / "Dockerfile").write_text("FROM debian\nWORKDIR /app\n")
    (root / "task.toml").write_text(toml)
    if instruction is not None:
        (root / "instruction.md").write_text(instruction)
    if test_sh:
        (root / "tests").mkdir()
        (root / "tests" / "test.sh").write_text("#!/bin/bash\necho 1 > /logs/verifier/reward.txt\n")
    return root


TASKS = [
    ('version = "1.0"\n', {}),
    ("[agent]\ntimeout_sec = 120\n[verifier]\ntimeout_sec = 30.5\n[environment]\nbuild_timeout_sec = 60\n", {}),
    ('[agent]\ntimeout_sec = "90"\n[verifier]\ntimeout_sec = true\n', {}),
    ('[agent]\ntimeout_sec = "soon"\n', {}),
    ("[agent]\ntimeout_sec = 0\n", {}),
    ('[environment]\nworkdir = "/srv/work"\ndocker_image = "ghcr.io/x/y:1"\n', {}),
    ("[environment]\nworkdir = 5\n", {}),
    ('[verifier.env]\nA = "1"\nB = "${HOME}"\nC = "${NOT_SET_ANYWHERE:-d}"\n[solution.env]\nS = "x"\n'
     '[environment.env]\nE = "y"\n', {}),
    ("[verifier.env]\nA = 1\n", {}),
    ("[solution]\nenv = true\n", {}),
    ("[agent\n", {}),
    ('version = "1.0"\n', {"instruction": None}),
    ('version = "1.0"\n', {"test_sh": False}),
    ('version = "1.0"\n', {"instruction": "<!-- harbor-canary GUID 1234 -->\n# canary: do not train\n\nReal task.\n"}),
    ('version = "1.0"\n', {"instruction": "# Title\ncanary in the middle\n"}),
    ('[metadata]\nauthor = "x"\n[unknown_section]\nkey = 1\n', {}),
]


def test_task_folders_are_read_as_harbor_reads_them(official, tmp_path):
    cases, ours = [], []
    for i, (toml, extra) in enumerate(TASKS):
        path = _task_dir(tmp_path / f"t{i}", toml, **extra)
        cases.append({"kind": "task", "dir": f"t{i}"})
        task = load_task(path)
        ours.append(task.invalid and "error" or {
            "instruction": task.instruction, "agent_timeout": task.agent_timeout,
            "verifier_timeout": task.verifier_timeout, "build_timeout": task.build_timeout, "workdir": task.workdir,
            "docker_image": task.docker_image, "environment_env": task.environment_env,
            "verifier_env": task.verifier_env, "solution_env": task.solution_env})
    theirs = [("error" if "error" in t else t) for t in official(cases, tmp_path)]
    disagree = [(toml, mine, their) for (toml, _), mine, their in zip(TASKS, ours, theirs) if mine != their]
    print(f"task folders: {len(TASKS)} cases, {len(disagree)} disagreements")
    assert not disagree
    assert theirs[0]["agent_timeout"] is None and theirs[0]["workdir"] is None  # no invented 600 s, no /app


# ---- ATIF ----

CALL = {"id": "a", "function": {"name": "run", "arguments": '{"command": "ls"}'}}
CONVERSATIONS = [
    [{"role": "user", "content": "Fix it."}],
    [{"role": "system", "content": "You fix bugs."}, {"role": "user", "content": "Fix add()."},
     {"role": "assistant", "content": "Looking.", "reasoning_content": "a sign", "tool_calls": [CALL],
      "usage": {"prompt_tokens": 50, "completion_tokens": 9, "cached_tokens": 40}},
     {"role": "tool", "tool_call_id": "a", "content": "calc.py"}, {"role": "assistant", "content": "Done."}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "zzz", "content": "answered a call never made"}],
    [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "a", "content": "no agent step before"}],
    [{"role": "tool", "tool_call_id": "a", "content": "before any step"}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                        "tool_calls": [{"function": {"name": "run", "arguments": "not json"}}]},
     {"role": "tool", "content": "a result without an id"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                        "tool_calls": [{"id": 7, "function": {"name": None, "arguments": "[1]"}}]},
     {"role": "tool", "tool_call_id": 7, "content": ["not", "parts"]}],
    [{"role": "developer", "content": "rules"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
     {"role": "assistant", "content": {"odd": "content"}, "usage": {"prompt_tokens": True, "completion_tokens": 3}},
     {"role": "function", "content": "legacy"}],
    [{"role": "user", "content": "x", "timestamp": "2024-05-01T10:00:00Z"},
     {"role": "assistant", "content": "y", "timestamp": "not a time"}],
]


def test_atif_export_is_valid_for_harbors_validator(official, tmp_path):
    trajectories = [atif.trajectory(messages, session_id="s", agent="v4agent", version="0.1.0", model="m")
                    for messages in CONVERSATIONS]
    answers = official([{"kind": "atif", "trajectory": t} for t in trajectories], tmp_path)
    invalid = [(m, a["errors"]) for m, a in zip(CONVERSATIONS, answers) if not a["valid"]]
    print(f"ATIF: {len(CONVERSATIONS)} conversations, {len(invalid)} invalid")
    assert not invalid
    # the two the issue named, as the old export wrote them, are what the validator refuses
    old = [{**trajectories[0], "steps": [], "final_metrics": {"total_steps": 0}},
           {**trajectories[2], "steps": [*trajectories[2]["steps"][:1], {
               **trajectories[2]["steps"][1], "observation": {"results": [{"source_call_id": "zzz", "content": ""}]}}]}]
    assert [a["valid"] for a in official([{"kind": "atif", "trajectory": t} for t in old], tmp_path)] == [False, False]
    with pytest.raises(ValueError, match="at least one step"):
        atif.trajectory([], session_id="s", agent="a", version="1")
    assert trajectories[2]["steps"][1]["observation"]["results"] == [{"content": "answered a call never made"}]


# ---- Terminal-Bench 1.0 ----

TB1_TESTS = '''
import pytest

def test_pass():
    pass

def test_fail():
    assert 1 == 2, "one - two"

@pytest.mark.skip(reason="not here")
def test_skip():
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="known")
def test_xpass():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("setup")

def test_error(broken):
    pass

@pytest.mark.parametrize("value", ["a - b", "x::y", "ü", "sp ace"])
def test_param(value):
    assert value != "x::y"

def test_prints():
    print("PASSED test_fake.py::test_imaginary")
    print("FAILED test_fake.py::test_other - boom")
'''
# (flags, selection): every status at once, then runs where all that ran passed by one rule or the other
TB1_RUNS = [("-rA", ""), ("-rA -v", ""), ("", ""), ("-rA", "-k 'pass and not xpass'"), ("-rA -q", "-k skip"),
            ("-rA", "-k xfail"), ("-rA", "-k xpass"), ("-rA -v", "-k 'param and not y'"), ("-rA", "-k prints"),
            ("-rA", "-k nothing_matches"), ("-ra", "-k error")]


def _pytest_outputs(folder: Path) -> list[str]:
    folder.mkdir()
    (folder / "test_outputs.py").write_text(TB1_TESTS)
    runs = [subprocess.Popen(f"{shlex.quote(sys.executable)} -m pytest -p no:cacheprovider {flags} {selection} "
                             "test_outputs.py", shell=True, cwd=folder, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})  # as in a task's image
            for flags, selection in TB1_RUNS]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    outputs.append(outputs[0][: len(outputs[0]) // 2])  # a run killed half-way
    outputs.append(outputs[0] + "\n=== short test summary info ===\nPASSED a::b\n")  # a second summary
    return outputs


def test_terminal_bench_1_results_match_its_own_parser(official, tmp_path):
    outputs = _pytest_outputs(tmp_path / "run")
    theirs = official([{"kind": "tb1", "output": output} for output in outputs], tmp_path)
    ours = []
    for output in outputs:
        results = tbench.tb1_results(output)
        ours.append({"results": results, "resolved": results is not None and all(results.values())})
    mismatches = [i for i, (mine, their) in enumerate(zip(ours, theirs))
                  if (mine["results"], mine["resolved"]) != (their["results"], their["resolved"])]
    print(f"terminal-bench 1.0: {len(outputs)} pytest outputs, {len(mismatches)} disagreements")
    assert not mismatches, [(outputs[i][-600:], ours[i], theirs[i]) for i in mismatches]
    # XPASS fails, officially (its line keeps the reason in the name); a run that skipped all passes
    assert theirs[TB1_RUNS.index(("-rA", "-k xpass"))] == {"results": {"test_xpass - known": False}, "resolved": False}
    assert theirs[TB1_RUNS.index(("-rA -q", "-k skip"))]["resolved"]
    assert theirs[-2] == {"results": None, "error": "ValueError", "resolved": False}  # killed: no summary


# ---- end to end: Harbor's run semantics, and the attacks ----

def _task(root: Path, *, toml: str = 'version = "1.0"\n[verifier]\ntimeout_sec = 30.0\n',
          dockerfile: str = "FROM debian\nWORKDIR /app\n", solve: str = "#!/bin/bash\ntouch /app/done\n",
          test: str = "#!/bin/bash\n[ -f /app/done ] && echo 1 > /logs/verifier/reward.txt || echo 0 > "
                      "/logs/verifier/reward.txt\n") -> Path:
    for folder in ("environment", "solution", "tests"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "task.toml").write_text(toml)
    (root / "instruction.md").write_text("Make /app/done.\n")
    (root / "environment" / "Dockerfile").write_text(dockerfile)
    (root / "solution" / "solve.sh").write_text(solve)
    (root / "tests" / "test.sh").write_text(test)
    return root


def _oracle(task: Path, out: Path) -> dict:
    return tbench.run_task(load_task(task), tbench.TbenchConfig(out=out, agent="oracle"))


def test_test_sh_runs_by_its_shebang_and_the_solution_gets_its_env(tmp_path):
    python_test = ("#!/usr/bin/env python3\nimport os\nopen('/logs/verifier/reward.txt', 'w')"
                   ".write('1' if os.path.exists('/app/done') else '0')\n")
    record = _oracle(_task(tmp_path / "t", toml='[solution.env]\nNAME = "done"\n',
                           solve='#!/bin/bash\ntouch "/app/$NAME"\n', test=python_test), tmp_path / "out")
    assert record["outcome"] == "resolved" and record["rewards"] == {"reward": 1.0}, record


def test_the_workdir_is_the_dockerfiles_when_the_task_sets_none(tmp_path):
    task = _task(tmp_path / "t", dockerfile="FROM debian\nWORKDIR /srv/work\nCOPY data.txt .\n",
                 solve="#!/bin/bash\ncp data.txt copied.txt\n",
                 test="#!/bin/bash\n[ \"$(pwd)\" = /srv/work ] && cmp data.txt copied.txt && echo 1 > "
                      "/logs/verifier/reward.txt\n")
    (task / "environment" / "data.txt").write_text("payload\n")
    assert load_task(task).workdir is None and load_task(task).agent_timeout is None
    record = _oracle(task, tmp_path / "out")
    assert record["outcome"] == "resolved", json.dumps(record)[-3000:]


def test_no_reward_or_one_written_before_the_verifiers_timeout_is_an_error(tmp_path):
    quiet = _oracle(_task(tmp_path / "quiet", test="#!/bin/bash\necho tests ran\n"), tmp_path / "out")
    assert quiet["outcome"] == "error" and quiet["error"].startswith("RewardFileNotFoundError"), quiet
    late = _oracle(_task(tmp_path / "late", toml="[verifier]\ntimeout_sec = 1\n",
                         test="#!/bin/bash\necho 1 > /logs/verifier/reward.txt\nsleep 30\n"), tmp_path / "out")
    assert late["outcome"] == "error" and late["error"].startswith("VerifierTimeoutError"), late
    summary = tbench.run_tasks([load_task(tmp_path / "quiet"), load_task(tmp_path / "late")],
                               tbench.TbenchConfig(out=tmp_path / "out", agent="oracle"))
    assert (summary["errors"], summary["resolved"], summary["metrics"]) == (2, 0, {}), summary


def test_a_broken_task_is_one_error_and_the_run_goes_on(tmp_path):
    _task(tmp_path / "tasks" / "good")
    (_task(tmp_path / "tasks" / "no-instruction") / "instruction.md").unlink()
    (_task(tmp_path / "tasks" / "bad-toml") / "task.toml").write_text("[agent\n")
    summary = tbench.run_tasks(load_tasks(tmp_path / "tasks"), tbench.TbenchConfig(out=tmp_path / "out",
                                                                                   agent="oracle"))
    assert summary["resolved_ids"] == ["good"] and summary["error_ids"] == ["bad-toml", "no-instruction"], summary
    record = json.loads((tmp_path / "out" / "tasks" / "no-instruction" / "result.json").read_text())
    assert "instruction.md" in record["no-instruction"]["error"]
    assert summary["metrics"] == {"mean": 1.0}


def test_a_reward_planted_by_the_agents_phase_does_not_count(tmp_path):
    """The solution (standing in for any agent) writes the verifier's reward itself, directly and
    through a process it leaves running; the verifier writes none."""
    planted = _oracle(_task(tmp_path / "planted", solve="#!/bin/bash\nmkdir -p /logs/verifier\n"
                                                         "echo 1 > /logs/verifier/reward.txt\n",
                            test="#!/bin/bash\necho no reward from me\n"), tmp_path / "out")
    assert planted["outcome"] == "error" and planted["error"].startswith("RewardFileNotFoundError"), planted
    later = _oracle(_task(tmp_path / "later", solve="#!/bin/bash\n(sleep 2; mkdir -p /logs/verifier; "
                                                     "echo 1 > /logs/verifier/reward.txt) &\n",
                          test="#!/bin/bash\nsleep 4\n"), tmp_path / "out")
    assert later["outcome"] == "error" and later["error"].startswith("RewardFileNotFoundError"), later


@pytest.fixture
def system_folder():
    """A fresh folder under /opt, which every sandbox shows read-only (tasks installed system-wide)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="v4agent-test-", dir="/opt"))
    except OSError:
        pytest.skip("cannot write to /opt here")
    folder.chmod(0o755)  # as an installation would be: readable by all
    yield folder
    shutil.rmtree(folder)


def _scripted_v4(tmp_path: Path, monkeypatch, calls: list[dict]) -> tbench.TbenchConfig:
    """A run config for the v4 agent: the real `v4agent fix` with scripted turns (each of
    `calls`, then submit), the script named in the user's config file, which the scratch root
    does not show: it must get there."""
    script = tmp_path / "cache" / "turns.json"
    script.parent.mkdir()
    turns = [*calls, {"name": "submit", "arguments": {"summary": "x"}}]
    script.write_text(json.dumps([{"content": "", "tool_calls": [call]} for call in turns]))
    (tmp_path / "config" / "v4agent").mkdir(parents=True)
    (tmp_path / "config" / "v4agent" / "config.toml").write_text(f"script = {json.dumps(str(script))}\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("V4AGENT_CONFIG", raising=False)
    fix = f"{shlex.quote(sys.executable)} -c 'import typer; from agent.cli.fix import fix_cmd; typer.run(fix_cmd)'"
    return tbench.TbenchConfig(out=tmp_path / "out", agent="v4",
                               v4_cmd=f"{fix} --repo {{repo}} --issue-file {{issue_file}} --apply --json")


def test_the_agent_cannot_read_the_tasks_tests_or_solution(tmp_path, monkeypatch, system_folder):
    """The v4 agent (scripted turns through the real `v4agent fix`, the script named in the
    user's config file) copies whatever it can read
    of the task's tests and solution, from a task folder under /opt and from this checkout's
    bundled tasks, into /app; the verifier rewards any of it."""
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    task = _task(system_folder / "secret", solve="#!/bin/bash\necho SOLUTION\n",
                 test="#!/bin/bash\ngrep -rqs -e SOLUTION -e count.txt -e TESTS /app && r=1 || r=0\n"
                      "echo $r > /logs/verifier/reward.txt\n")
    (task / "tests" / "notes.txt").write_text("TESTS\n")
    bundled = Path(tbench.__file__).resolve().parent / "data" / "tbench" / "count-words"
    steal = (f"cat {task}/tests/* {task}/solution/* {bundled}/tests/* {bundled}/solution/* > stolen.txt 2>&1; "
             f"ls -R {task} {bundled} >> stolen.txt 2>&1; true")
    cfg = _scripted_v4(tmp_path, monkeypatch, [{"name": "run", "arguments": {"command": steal}}])
    record = tbench.run_task(load_task(task), cfg)
    stolen = (tmp_path / "out" / "tasks" / "secret" / "app" / "stolen.txt").read_text()
    assert "SOLUTION" not in stolen and "TESTS" not in stolen and "wc -w" not in stolen, stolen
    assert record["outcome"] == "unresolved", record


def test_the_v4_agent_leaves_a_tasks_own_git_repository_as_it_was(tmp_path, monkeypatch):
    """`fix` needs a git work tree, so the harness makes a throwaway one in /app; a task whose /app
    is a repository of its own (its Dockerfile made it) keeps it, history and all, for the
    verifier, with the agent's edit applied to its work tree."""
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    git_id = "git -c user.name=t -c user.email=t@t"
    task = _task(tmp_path / "tasks" / "repo",
                 dockerfile=f"FROM debian\nWORKDIR /app\nRUN git init -q && {git_id} commit -q --allow-empty -m theirs\n",
                 test="#!/bin/bash\ncd /app && [ \"$(git log --format=%s)\" = theirs ] && [ -f done ] "
                      "&& r=1 || r=0\necho $r > /logs/verifier/reward.txt\n")
    cfg = _scripted_v4(tmp_path, monkeypatch, [{"name": "run", "arguments": {"command": "touch done"}}])
    record = tbench.run_task(load_task(task), cfg)
    assert record["outcome"] == "resolved", json.dumps(record)[-3000:]


def _cli(args: list[str]):
    from agent.cli.eval import app

    return CliRunner().invoke(app, args)


def test_v4_without_a_backend_refuses_to_start_and_a_broken_agent_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no config file there
    for name in ("V4AGENT_CONFIG", "V4AGENT_WEIGHTS", "V4AGENT_ENDPOINT", "V4AGENT_MODEL", "V4AGENT_SCRIPT"):
        monkeypatch.delenv(name, raising=False)
    _task(tmp_path / "tasks" / "t")
    result = _cli(["tbench", str(tmp_path / "tasks"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no model to talk to" in result.output, result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvalError, match="no model"):
        tbench.backend_access("v4agent fix --repo {repo}", environ={"XDG_CONFIG_HOME": str(tmp_path / "config")})
    # an agent that cannot start (exit 2: its usage or configuration) is a harness error, not a failure
    cfg = tbench.TbenchConfig(out=tmp_path / "out", agent="v4", v4_cmd="sh -c 'exit 2' --script {repo}")
    record = tbench.run_task(load_task(tmp_path / "tasks" / "t"), cfg)
    assert record["outcome"] == "error" and "could not start" in record["error"], record


def test_cli_names_an_unknown_task(tmp_path):
    result = _cli(["tbench", "mini", "--agent", "oracle", "--tasks", "count-words,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nope" in result.output and "count-words" in result.output, result.output
