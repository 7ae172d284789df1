"""The differential test: SWE-bench grading by the project and by the official package (the
pinned `swebench`), side by side, on logs of real runs; there must be no disagreement.

The logs are the harness's own test_output.txt (the eval script's whole output, markers and
exit code included) from runs in the sandbox:
- live: the installed pytest on a demo suite (pass, fail, setup and teardown errors, skip,
  xfail, xpass, strict xpass, parametrized ids with spaces, ` - `, brackets, unicode, `/`,
  tests that print report-like lines, classes) under several flag sets, a run killed
  mid-way (SIGKILL) and a run past the timeout; and Django's real runner (5.2, verbosity 2) on
  a tiny project (ok, FAIL, ERROR, skip, expected failure, unexpected success, docstrings,
  subtests, printed output, a setUpClass error, a database test);
- recorded (tests/fixtures_evals/, made by the same code: `python -m tests.test_evals_official
  NAME=VENV...`): the demo suite under pytest 6.2.5, 7.4.4 and 8.3.5, Django 3.2 on Python 3.8
  (the old id spelling the SWE-bench images produce) and Django 4.2.
Each log is graded under every official Python parser that applies and several
FAIL_TO_PASS/PASS_TO_PASS selections (every test the parser saw, the passing ones, a missing
id, a truncated parametrized id), by the project (evals.grader.graded_outcome: what a run
writes to report.json) and by swebench.harness.grading.get_eval_report, and compared field by
field. The expected official semantics are also asserted outright on the live run, so a wiring
mistake cannot hide behind both sides agreeing on nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evals.envs import EnvSpec
from evals.grader import Limits, grade, graded_outcome
from evals.instances import Instance, parse_instance
from evals.proc import EvalError, Finished, git

FIXTURES = Path(__file__).with_name("fixtures_evals")
PYTEST_FLAGS = {"rA": "-rA", "rA-tbno": "-rA --tb=no", "v": "-v", "rA-v": "-rA -v", "q-rA": "-q -rA -p no:cacheprovider"}
PYTEST_PARSERS = ("parse_log_pytest", "parse_log_pytest_options", "parse_log_pytest_v2", "parse_log_matplotlib",
                  "parse_log_seaborn")
DEMO = '''\
import pytest


def test_pass():
    pass


def test_fail():
    assert 1 == 2


@pytest.fixture
def broken():
    raise RuntimeError("setup fails")


def test_setup_error(broken):
    pass


@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown fails")


def test_teardown_error(bad_teardown):
    pass


@pytest.mark.skip(reason="skipped on purpose")
def test_skip():
    pass


@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert 0


@pytest.mark.xfail(reason="fixed already")
def test_xpass():
    pass


@pytest.mark.xfail(strict=True, reason="must fail")
def test_xpass_strict():
    pass


@pytest.mark.parametrize("value", ["a b", "x - y", "[1, 2]", "\\u00fc-\\u00f1", "path/to/file", "/abs/path", "]", "plain"])
def test_param(value):
    assert value != "x - y"


def test_prints_report_like_lines():
    print("PASSED tests/test_demo.py::test_fail")
    print("FAILED tests/test_demo.py::test_pass - fake")
    print("tests/test_demo.py::test_skip PASSED")


class TestGroup:
    def test_method(self):
        pass

    @pytest.mark.parametrize("n", [1, 2])
    def test_numbers(self, n):
        assert n == 1
'''
KILLER = "import os\nimport signal\n\n\ndef test_killed():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
HANG = "import time\n\n\ndef test_hangs():\n    time.sleep(600)\n"
DJANGO_SETTINGS = ('SECRET_KEY = "differential"\nINSTALLED_APPS = ["demo"]\n'
                   'DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}\n'
                   'USE_TZ = True\n')
DJANGO_TESTS = '''\
import unittest

from django.test import SimpleTestCase, TestCase


class Basics(SimpleTestCase):
    def test_pass(self):
        pass

    def test_fail(self):
        self.assertEqual(1, 2)

    def test_error(self):
        raise RuntimeError("boom")

    @unittest.skip("skipped on purpose")
    def test_skip(self):
        pass

    @unittest.expectedFailure
    def test_expected_failure(self):
        self.assertEqual(1, 2)

    @unittest.expectedFailure
    def test_unexpected_success(self):
        pass

    def test_docstring(self):
        """The first line of a docstring is the official id.

        Not this one."""

    def test_noisy(self):
        print("some output the test printed")

    def test_subtests(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertNotEqual(i, 1)

    def test_prints_status_like_lines(self):
        print("test_fail (demo.tests.Basics) ... ok")


class BrokenSetup(SimpleTestCase):
    @classmethod
    def setUpClass(cls):
        raise RuntimeError("setUpClass fails")

    def test_never_runs(self):
        pass


class WithDatabase(TestCase):
    def test_db(self):
        pass
'''
DJANGO_CMD = "python -m django test --settings=settings --verbosity 2 --parallel 1"


def _commit(repo: Path, message: str) -> str:
    git("add", "--all", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo).strip()


def _instance(root: Path, base: dict[str, str], tests: dict[str, str]) -> Instance:
    """A repository with `base` committed, and an instance whose test patch adds `tests`."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    for path, text in {"README.md": "demo\n", **base}.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git("init", "--quiet", cwd=repo)
    commit = _commit(repo, "base")
    for path, text in tests.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git("add", "--all", cwd=repo)
    test_patch = git("diff", "--cached", commit, cwd=repo)
    git("reset", "--quiet", "--hard", commit, cwd=repo)
    return parse_instance({"instance_id": "demo__demo-1", "repo": "demo/demo", "base_commit": commit, "patch": "",
                           "test_patch": test_patch, "problem_statement": "", "version": "1",
                           "FAIL_TO_PASS": [], "PASS_TO_PASS": []})


def harness_log(root: Path, venv: Path, test_cmd: str, tests: dict[str, str], *, base: dict[str, str] | None = None,
                directives: str = "files", pythonpath: tuple[str, ...] = (), timeout: float = 300) -> Path:
    """Run the harness's grading (sandbox, official eval script) on a demo instance with `venv`
    and return its test_output.txt; the model patch is a harmless README change."""
    instance = _instance(root, base or {}, tests)
    worktree = root / "work"
    git("clone", "--quiet", str(root / "repo"), str(worktree), cwd=root)
    spec = EnvSpec("demo/demo", ("*",), "", test_cmd=test_cmd, test_directives=directives, pythonpath=pythonpath,
                   venv=str(venv))
    patch = "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-demo\n+demo!\n"
    try:
        grade(instance, patch, worktree, spec, venv, root / "logs", Limits(timeout))
    except EvalError:
        pass  # a timeout: the log is still there
    return root / "logs" / "test_output.txt"


def _official_report(instance: Instance, parser: str, log: Path) -> dict:
    from swebench.harness.grading import get_eval_report
    from swebench.harness.utils import make_test_spec

    spec = make_test_spec({"instance_id": instance.instance_id, "image": "", "eval_script": "", "repo": instance.repo,
                           "version": instance.version, "FAIL_TO_PASS": list(instance.fail_to_pass),
                           "PASS_TO_PASS": list(instance.pass_to_pass), "log_parser": parser,
                           "eval_type": "pass_and_fail"})
    prediction = {"instance_id": instance.instance_id, "model_name_or_path": "m", "model_patch": "diff"}
    return get_eval_report(spec, prediction, str(log), include_tests_status=True)[instance.instance_id]


def _selections(statuses: dict[str, str]) -> list[tuple[list[str], list[str]]]:
    everything = sorted(statuses)
    passing = [t for t in everything if statuses[t] in ("PASSED", "XFAIL")]
    kept = [t for t in everything if statuses[t] in ("PASSED", "XFAIL", "SKIPPED")]
    truncated = [t[: t.index("[") + 2] for t in everything if "[" in t and "]" in t[t.index("[") + 2:]][:2]
    return [(everything, everything), (passing, kept), (passing[:1], kept + ["tests/test_demo.py::test_gone"]),
            (truncated, passing), ([], [])]


def disagreements(log: Path, parsers: tuple[str, ...]) -> tuple[int, list[str]]:
    """(reports compared, disagreements) for `log` under `parsers` and the selections."""
    from swebench.harness.log_parsers import PARSER_REGISTRY

    text = log.read_text()
    compared, differing = 0, []
    for parser in parsers:
        statuses = PARSER_REGISTRY[parser](text, None)
        for f2p, p2p in _selections(statuses):
            instance = parse_instance({"instance_id": "demo__demo-1", "repo": "demo/demo", "base_commit": "0" * 40,
                                       "patch": "", "test_patch": "", "problem_statement": "", "version": "1",
                                       "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p})
            ours = graded_outcome(instance, parser, Finished(0, text, 0.0, None, log))
            ours.pop("test_seconds")
            theirs = _official_report(instance, parser, log)
            compared += 1
            if ours != theirs:
                differing.append(f"{log.name} {parser} F2P={f2p} P2P={p2p}:\n ours   {ours}\n theirs {theirs}")
    return compared, differing


def _pytest_logs(root: Path, venv: Path) -> dict[str, Path]:
    """The demo suite under each flag set, and a run killed by SIGKILL half way."""
    logs = {name: harness_log(root / name, venv, f"python -m pytest {flags}", {"tests/test_demo.py": DEMO})
            for name, flags in PYTEST_FLAGS.items()}
    logs["killed"] = harness_log(root / "killed", venv, "python -m pytest -rA -v",
                                 {"tests/test_demo.py": DEMO, "tests/test_killed.py": KILLER})
    return logs


def _django_log(root: Path, venv: Path) -> Path:
    return harness_log(root, venv, DJANGO_CMD, {"tests/demo/tests.py": DJANGO_TESTS},
                       base={"tests/settings.py": DJANGO_SETTINGS, "tests/demo/__init__.py": ""},
                       directives="django", pythonpath=("tests",))


@pytest.fixture(scope="module")
def live_pytest(tmp_path_factory) -> dict[str, Path]:
    return _pytest_logs(tmp_path_factory.mktemp("pytest"), Path(sys.prefix))


def test_live_pytest_runs_are_graded_exactly_as_officially(live_pytest):
    counts, differing = zip(*(disagreements(log, PYTEST_PARSERS) for log in live_pytest.values()))
    print(f"\nlive pytest {__import__('pytest').__version__}: {len(live_pytest)} logs, {sum(counts)} reports compared")
    assert not [d for found in differing for d in found]


def test_the_official_semantics_hold_on_the_live_run(live_pytest):
    """What the official grader decides, asserted outright (so both sides cannot agree on a
    wiring mistake): XPASS is no pass, the last line for a test wins (teardown error), an id
    ends at its first space, a killed run is not graded."""
    from swebench.harness.log_parsers import PARSER_REGISTRY

    statuses = PARSER_REGISTRY["parse_log_pytest"](live_pytest["rA"].read_text(), None)
    demo = "tests/test_demo.py::"
    assert demo + "test_xpass" not in statuses and statuses[demo + "test_teardown_error"] == "ERROR"
    assert statuses[demo + "test_param[a"] == "PASSED" and demo + "test_param[a b]" not in statuses
    instance = parse_instance({"instance_id": "demo__demo-1", "repo": "demo/demo", "base_commit": "0" * 40,
                               "patch": "", "test_patch": "", "problem_statement": "", "version": "1",
                               "FAIL_TO_PASS": [demo + "test_xfail", demo + "test_xpass"],
                               "PASS_TO_PASS": [demo + "test_skip", demo + "test_pass"]})
    log = live_pytest["rA"]
    report = graded_outcome(instance, "pytest", Finished(0, log.read_text(), 0.0, None, log))
    assert report["tests_status"]["FAIL_TO_PASS"] == {"success": [demo + "test_xfail"], "failure": [demo + "test_xpass"]}
    # `SKIPPED [1] file:line: reason` names no test: a skipped PASS_TO_PASS test is not found, a failure
    assert report["tests_status"]["PASS_TO_PASS"] == {"success": [demo + "test_pass"], "failure": [demo + "test_skip"]}
    killed = live_pytest["killed"]
    assert ">>>>> Test Exit Code: 137" in killed.read_text()
    report = graded_outcome(instance, "pytest", Finished(0, killed.read_text(), 0.0, None, killed))
    assert report["patch_successfully_applied"] is False and report["resolved"] is False


def test_a_run_past_the_timeout_is_graded_like_the_official_log(tmp_path):
    log = harness_log(tmp_path, Path(sys.prefix), "python -m pytest -rA", {"tests/test_hang.py": HANG}, timeout=3)
    assert log.read_text().endswith("\n\nTimeout error: 3 seconds exceeded.")
    counts, differing = disagreements(log, ("parse_log_pytest",))
    assert counts and not differing


def test_live_django_runner_is_graded_exactly_as_officially(tmp_path):
    pytest.importorskip("django")
    log = _django_log(tmp_path, Path(sys.prefix))
    text = log.read_text()
    assert "test_pass (demo.tests.Basics" in text and "Ran 11 tests" in text, text[-3000:]
    counts, differing = disagreements(log, ("parse_log_django",))
    print(f"\nlive django: 1 log, {counts} reports compared")
    assert counts and not differing
    from swebench.harness.log_parsers import PARSER_REGISTRY

    statuses = PARSER_REGISTRY["parse_log_django"](text, None)
    skip = next(t for t in statuses if t.startswith("test_skip "))
    instance = parse_instance({"instance_id": "demo__demo-1", "repo": "demo/demo", "base_commit": "0" * 40,
                               "patch": "", "test_patch": "", "problem_statement": "", "version": "1",
                               "FAIL_TO_PASS": [], "PASS_TO_PASS": [skip]})
    report = graded_outcome(instance, "django", Finished(0, text, 0.0, None, log))
    assert report["resolved"] and report["tests_status"]["PASS_TO_PASS"]["success"] == [skip]  # 5.0.2: kept


def test_recorded_logs_of_other_versions_are_graded_exactly_as_officially():
    logs = sorted(FIXTURES.glob("*.log"))
    assert len(logs) >= 18, logs
    compared, differing = 0, []
    for log in logs:
        parsers = ("parse_log_django",) if log.name.startswith("django") else PYTEST_PARSERS
        count, found = disagreements(log, parsers)
        compared, differing = compared + count, differing + found
    print(f"\nrecorded: {len(logs)} logs, {compared} reports compared")
    assert not differing, "\n".join(differing[:5])


def test_a_row_without_an_eval_script_gets_the_script_the_4x_harness_made():
    """eval_scripts_swebench_4.1.0.json: make_eval_script_list_py of swebench 4.1.0 (the last with
    specs) for Django 3.0 (eval_commands) and 4.0, pytest and sympy, on a test patch with a data
    file and a new file. Ours is the same but for the conda lines and the `install` line."""
    from evals.grader import made_eval_script

    for case in json.loads((FIXTURES / "eval_scripts_swebench_4.1.0.json").read_text()):
        instance = parse_instance({"instance_id": "x__y-1", "repo": case["repo"], "base_commit": case["base_commit"],
                                   "patch": "", "test_patch": case["test_patch"], "problem_statement": "",
                                   "version": case["version"], "FAIL_TO_PASS": [], "PASS_TO_PASS": []})
        spec = EnvSpec(case["repo"], ("*",), "3.11", test_cmd=case["test_cmd"],
                       eval_commands=tuple(case["eval_commands"]))
        official = [line for line in case["script"] if line not in (
            "source /opt/miniconda3/bin/activate", "conda activate testbed", case["install"])]
        ours = made_eval_script(instance, spec).split("\n")
        assert ours[:2] == ["#!/bin/bash", "set -uxo pipefail"]
        assert "\n".join(ours[2:]) == "\n".join(official) + "\n", case["repo"]


def record(out: Path, venvs: dict[str, Path], scratch: Path) -> None:
    """Write the fixture logs: for each NAME=VENV, the demo suite (pytest venvs) or the Django
    project (venvs whose NAME starts with django)."""
    out.mkdir(exist_ok=True)
    for name, venv in venvs.items():
        if name.startswith("django"):
            found = {"": _django_log(scratch / name, venv)}
        else:
            found = _pytest_logs(scratch / name, venv)
        for flags, log in found.items():
            (out / f"{name}{'-' + flags if flags else ''}.log").write_text(log.read_text())


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        record(FIXTURES, {arg.split("=", 1)[0]: Path(arg.split("=", 1)[1]) for arg in sys.argv[1:]}, Path(scratch))
