"""SWE-bench harness on a small local repository: grading (patches, data files, hung tests, test
files a model edited), the official run-level outcomes (empty patch, no prediction, a patch that
does not apply, a timeout), the run (resume, a crashing instance, parallel workers), the v4
adapter, file formats, and deterministic sdist commits. Tests run in this interpreter's own
environment (spec `venv`), in the sandbox, so nothing is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from evals import swebench
from evals.agents import EmptyAgent, OracleAgent, PredictionsAgent, V4Agent, make_agent
from evals.envs import SpecTable
from evals.grader import Limits
from evals.instances import load_instances, load_predictions, parse_instance
from evals.proc import git
from evals.repos import RepoStore, sdist_commit
from tools import sandbox

CALC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
TESTS = "from calc import mul\n\n\ndef test_mul():\n    assert mul(2, 3) == 6\n"
F2P = "tests/test_calc.py::test_add[one-plus-two]"
P2P = "tests/test_calc.py::test_mul"


def _diff(repo: Path, edits: dict[str, str]) -> str:
    """The git diff that makes `edits` (path -> new content) at HEAD; the tree is left clean."""
    for path, content in edits.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(content)
    git("add", "--all", cwd=repo)
    patch = git("diff", "--cached", "HEAD", cwd=repo)
    git("reset", "--quiet", "--hard", "HEAD", cwd=repo)
    git("clean", "--quiet", "-fd", cwd=repo)
    return patch


@pytest.fixture()
def calc(tmp_path: Path):
    """A repo source folder with acme__calc, its instance record, a spec file, and a workdir."""
    repo = tmp_path / "source" / "acme__calc"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    (repo / "tests" / "test_calc.py").write_text(TESTS)
    git("init", "--quiet", cwd=repo)
    git("add", "--all", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "base", cwd=repo)
    fixed = CALC.replace("a - b", "a + b")
    test_patch = _diff(repo, {
        "tests/test_calc.py": TESTS.replace("import mul", "import add, mul") + textwrap.dedent("""
            import json, pathlib, pytest

            CASES = json.loads((pathlib.Path(__file__).parent / "data" / "cases.json").read_text())


            @pytest.mark.parametrize("a,b,c", CASES, ids=["one-plus-two"])
            def test_add(a, b, c):
                assert add(a, b) == c
            """),
        "tests/data/cases.json": "[[1, 2, 3]]\n"})
    record = {"instance_id": "acme__calc-1", "repo": "acme/calc",
              "base_commit": git("rev-parse", "HEAD", cwd=repo).strip(), "patch": _diff(repo, {"calc.py": fixed}),
              "test_patch": test_patch, "problem_statement": "add() subtracts",
              "FAIL_TO_PASS": json.dumps([F2P]), "PASS_TO_PASS": [P2P], "version": "1.0",
              "environment_setup_commit": None}
    spec = tmp_path / "specs.json"
    spec.write_text(json.dumps({"spec": [{"repo": "acme/calc", "versions": ["1.0"], "python": "3.11",
                                          "venv": sys.prefix, "pythonpath": ["."],
                                          "test_cmd": "python -m pytest -rA -p no:cacheprovider"}]}))

    class Calc:
        source, spec_file, fixed_calc = tmp_path / "source", spec, fixed

        @staticmethod
        def instance(**changes):
            return parse_instance({**record, **changes})

        @staticmethod
        def config(agent, out="out", **kwargs):
            store = RepoStore(tmp_path / "source", tmp_path / "cache")
            return swebench.RunConfig(out=tmp_path / out, agent=agent, store=store,
                                      specs=SpecTable(spec), **kwargs)

        @staticmethod
        def diff(edits):
            return _diff(repo, edits)

    return Calc


def _one(calc, agent, **changes):
    return swebench.run_instance(calc.instance(**changes), calc.config(agent))


def test_oracle_resolves_and_empty_or_missing_patches_are_not_run(calc):
    resolved = _one(calc, OracleAgent())
    assert resolved["outcome"] == "resolved" and resolved["patch_successfully_applied"]
    assert resolved["tests_status"]["FAIL_TO_PASS"]["success"] == [F2P]  # the data file was applied
    assert resolved["suspicious"] == [] and resolved["infra_failure"] is False
    empty = swebench.run_instance(calc.instance(), calc.config(EmptyAgent(), "out2"))
    assert (empty["outcome"], empty["patch_exists"], empty["patch_successfully_applied"]) == ("empty_patch", False, False)
    assert "tests_status" not in empty  # officially not run
    missing = swebench.run_instance(calc.instance(), calc.config(PredictionsAgent({}), "out3"))
    assert (missing["outcome"], missing["patch_is_None"], missing["patch_successfully_applied"]) == (
        "incomplete", True, False)
    assert not (calc.config(EmptyAgent(), "out3").out / "instances" / "acme__calc-1" / "prediction.json").exists()


def test_data_files_are_applied_but_not_given_to_the_runner(calc):
    _one(calc, OracleAgent())
    folder = calc.config(OracleAgent()).out / "instances" / "acme__calc-1"
    command = next(line for line in (folder / "eval.sh").read_text().splitlines() if line.startswith("python -m"))
    assert command == "python -m pytest -rA -p no:cacheprovider tests/test_calc.py"  # no cases.json
    report = json.loads((folder / "report.json").read_text())
    assert set(report["acme__calc-1"]) >= {"patch_is_None", "patch_exists", "patch_successfully_applied", "resolved",
                                           "infra_failure", "tests_status", "timings", "tokens", "cache_hits"}


def test_a_test_run_past_the_timeout_is_an_error_as_officially(calc):
    hang = calc.diff({"calc.py": CALC.replace("return a - b", "while True:\n        pass")})
    started = time.monotonic()
    cfg = calc.config(OracleAgent(), limits=Limits(4))
    record = swebench.run_instance(calc.instance(patch=hang), cfg)
    assert time.monotonic() - started < 40
    assert record["outcome"] == "error" and "ran past 4 s" in record["error"] and not record["resolved"]
    log = (cfg.out / "instances" / "acme__calc-1" / "test_output.txt").read_text()
    assert log.endswith("\n\nTimeout error: 4 seconds exceeded.")  # the official note
    assert record["infra_failure_reason"] == "tests_timed_out"  # the official classification of the log


def test_a_silent_test_run_is_not_killed(calc):
    """No idle limit, as officially: a test that prints nothing for longer than any idle limit
    the harness used to have still finishes and counts."""
    slow = calc.diff({"calc.py": calc.fixed_calc.replace("return a + b", "__import__('time').sleep(3)\n    return a + b")})
    record = swebench.run_instance(calc.instance(patch=slow), calc.config(OracleAgent(), limits=Limits(60)))
    assert record["outcome"] == "resolved", record


def test_a_patch_that_does_not_apply_is_an_error_as_officially(calc):
    record = _one(calc, OracleAgent(), patch="diff --git a/nope.py b/nope.py\n--- a/nope.py\n+++ b/nope.py\n"
                                              "@@ -1 +1 @@\n-old\n+new\n")
    assert record["outcome"] == "error" and "does not apply" in record["error"]
    assert record["patch_exists"] and not record["patch_successfully_applied"] and not record["resolved"]
    log = (calc.config(OracleAgent()).out / "instances" / "acme__calc-1" / "run_instance.log").read_text()
    # every official command was tried, in order, then the reverse check
    assert [line for line in log.splitlines() if line.startswith("$ ") and "patch.diff" in line] == [
        "$ git apply --verbose /tmp/patch.diff", "$ git apply --verbose --3way /tmp/patch.diff",
        "$ git apply --verbose --reject /tmp/patch.diff", "$ patch --batch --forward --fuzz=5 -p1 -i /tmp/patch.diff",
        "$ git apply --check --reverse /tmp/patch.diff"]


def test_model_edits_to_test_files_do_not_count(calc):
    cheat = calc.diff({"calc.py": calc.fixed_calc, "tests/test_calc.py": TESTS.replace("== 6", "== 7")})
    record = _one(calc, OracleAgent(), patch=cheat)
    assert record["resolved"]  # the test file went back to base, then the test patch
    assert record["suspicious"] == ["tests/test_calc.py"]  # a file of the test patch


def test_run_resumes_isolates_a_crash_and_runs_workers_in_parallel(calc):
    good = [calc.instance(instance_id=f"acme__calc-{i}") for i in range(1, 4)]
    broken = calc.instance(instance_id="acme__calc-9", version="2.0")  # no spec for it
    cfg = calc.config(OracleAgent(), workers=2)
    summary = swebench.run([*good, broken], cfg)
    assert (summary["total"], summary["resolved"], summary["errors"], summary["incomplete"]) == (4, 3, 1, 0)
    assert summary["error_ids"] == ["acme__calc-9"]
    assert "no environment spec" in (cfg.out / "instances" / "acme__calc-9" / "error.txt").read_text()
    predictions = [json.loads(line) for line in (cfg.out / "predictions.jsonl").read_text().splitlines()]
    # the broken instance got its patch; grading it is what crashed
    assert [p["instance_id"] for p in predictions] == ["acme__calc-1", "acme__calc-2", "acme__calc-3", "acme__calc-9"]
    assert predictions[0]["model_name_or_path"] == "oracle"
    first = (cfg.out / "instances" / "acme__calc-1" / "report.json").stat().st_mtime_ns
    again = swebench.run([*good, broken], cfg)
    assert again["resolved"] == 3 and again["errors"] == 1
    assert (cfg.out / "instances" / "acme__calc-1" / "report.json").stat().st_mtime_ns == first  # skipped


def test_v4_adapter_reads_fix_json_and_its_trajectory(calc, tmp_path):
    """A stand-in for `v4agent fix` with its contract: edits the work tree, writes trajectory
    records, prints the --json object (exit 1: no --patch-out file, so the diff is taken)."""
    fake = tmp_path / "fake_fix.py"
    fake.write_text(textwrap.dedent("""
        import json, pathlib, sys
        repo, issue, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
        (repo / "calc.py").write_text((repo / "calc.py").read_text().replace("a - b", "a + b"))
        call = {"id": "call_1_0", "type": "function", "function": {"name": "edit_file", "arguments": "{}"}}
        records = [{"type": "run", "issue": issue.read_text()},
                   {"type": "turn", "turn": 1, "assistant": {"role": "assistant", "content": "", "tool_calls": [call]},
                    "results": [{"id": "call_1_0", "name": "edit_file", "output": "edited"}],
                    "stats": {"prompt_tokens": 100, "cached_tokens": 80, "output_tokens": 20}},
                   {"type": "end", "stop": "submitted"}]
        runs.write_text("".join(json.dumps(r) + "\\n" for r in records))
        print(json.dumps({"patch": "", "stop": "submitted", "turns": 1, "tokens_in": 100, "tokens_out": 20,
                          "cached_tokens": 80, "trajectory": str(runs)}))
        sys.exit(1)
        """))
    agent = V4Agent(f"{sys.executable} {fake} {{repo}} {{issue_file}} {tmp_path / 'trajectory.jsonl'}")
    record = _one(calc, agent)
    assert record["resolved"] and record["cache_hits"] == 80
    assert record["tokens"] == {"prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 80}
    assert record["agent_detail"] == {"stop": "submitted", "turns": 1}
    folder = calc.config(agent).out / "instances" / "acme__calc-1"
    trajectory = json.loads((folder / "trajectory.atif.json").read_text())
    assert trajectory["steps"][0]["message"] == "add() subtracts"
    assert trajectory["steps"][1]["observation"]["results"][0] == {"source_call_id": "call_1_0", "content": "edited"}
    assert trajectory["final_metrics"]["total_cached_tokens"] == 80


@pytest.mark.parametrize("route", ["patch_out", "worktree_diff"])
def test_a_patch_that_is_not_utf8_is_graded_byte_for_byte(calc, tmp_path, route):
    """An agent that edits a Latin-1 file: its patch is not UTF-8, and neither reading it (from
    --patch-out, or the work tree's diff) nor grading it may crash or change a byte."""
    fake = tmp_path / "fake_fix.py"
    fake.write_text(textwrap.dedent(f"""
        import json, pathlib, subprocess, sys
        repo, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        (repo / "calc.py").write_text((repo / "calc.py").read_text().replace("a - b", "a + b"))
        (repo / "legacy.txt").write_bytes("caf\\xe9\\n".encode("latin-1"))
        if {route == "patch_out"!r}:
            subprocess.run(["git", "add", "--all"], cwd=repo, check=True)
            out.write_bytes(subprocess.run(["git", "diff", "--cached", "--binary"], cwd=repo, check=True,
                                           capture_output=True).stdout)
        print(json.dumps({{"stop": "submitted", "turns": 1}}))
        sys.exit(0 if {route == "patch_out"!r} else 1)
        """))
    agent = V4Agent(f"{sys.executable} {fake} {{repo}} {{patch_out}}")
    record = _one(calc, agent)
    assert record["resolved"], record
    applied = (calc.config(agent).out / "instances" / "acme__calc-1" / "patch.diff").read_bytes()
    assert b"+caf\xe9\n" in applied


def test_instance_and_prediction_formats(calc, tmp_path):
    record = calc.instance()
    folder = tmp_path / "dataset" / record.instance_id
    folder.mkdir(parents=True)
    (folder / "instance.json").write_text(json.dumps({
        "instance_id": record.instance_id, "repo": "acme/calc", "base_commit": record.base_commit,
        "problem_statement": "x", "FAIL_TO_PASS": "[]", "PASS_TO_PASS": "[]", "version": "1.0",
        "eval_script": None, "hints_text": "kept"}))
    (folder / "patch.diff").write_text(record.patch)
    (folder / "test_patch.diff").write_text(record.test_patch)
    (loaded,) = load_instances(tmp_path / "dataset")
    assert loaded.patch == record.patch and loaded.extra["hints_text"] == "kept"
    preds = {"acme__calc-1": {"model_name_or_path": "m", "model_patch": "p"}}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    (tmp_path / "p.jsonl").write_text(json.dumps({"instance_id": "acme__calc-1", **preds["acme__calc-1"]}) + "\n")
    assert load_predictions(tmp_path / "p.json") == load_predictions(tmp_path / "p.jsonl")
    assert make_agent("oracle", predictions=load_predictions(tmp_path / "p.json")).name == "m"


def test_sdist_commits_are_reproducible(tmp_path):
    tree = tmp_path / "pkg-1.0"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "__init__.py").write_text("x = 1\n")
    (tree / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tree / "run.sh", 0o755)
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="pkg-1.0")
    commits = []
    for name in ("a.git", "b.git"):
        git("init", "--quiet", "--bare", str(tmp_path / name), cwd=tmp_path)
        commits.append(sdist_commit(tmp_path / name, archive, "refs/heads/sdist/pkg-1.0"))
    assert commits[0] == commits[1]
    listing = subprocess.run(["git", "ls-tree", "-r", commits[0]], cwd=tmp_path / "a.git", capture_output=True,
                             text=True).stdout
    assert "100755 blob" in listing and "pkg/__init__.py" in listing


@pytest.mark.skipif(not sandbox.available(), reason="bubblewrap is not installed or cannot sandbox here")
def test_an_eval_script_runs_at_testbed_and_applies_the_tests_itself(calc):
    instance = calc.instance()
    script = (f"set -uxo pipefail\ncd /testbed\ngit apply -v - <<'EOF_114329324912'\n{instance.test_patch}"
              f"EOF_114329324912\n: '>>>>> Start Test Output'\necho '>>>>> Start Test Output'\n"
              "python -m pytest -rA -p no:cacheprovider tests/test_calc.py\necho '>>>>> End Test Output'\n")
    record = _one(calc, OracleAgent(), eval_script=script, log_parser="parse_log_pytest")
    assert record["resolved"], record
    unfixed = calc.diff({"calc.py": "# no fix\n" + CALC})
    assert _one(calc, OracleAgent(), instance_id="acme__calc-2", eval_script=script, patch=unfixed)["outcome"] == (
        "unresolved")




def test_predictions_for_unknown_instances_are_an_error(tmp_path):
    """Officially an error, not predictions quietly left out; nothing runs."""
    from typer.testing import CliRunner

    from agent.cli.eval import app

    (tmp_path / "p.jsonl").write_text(json.dumps({"instance_id": "nope__nope-1", "model_name_or_path": "m",
                                                  "model_patch": "x"}) + "\n")
    result = CliRunner().invoke(app, ["swebench", "mini", "--predictions", str(tmp_path / "p.jsonl"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "predictions for instances not in" in result.output
    assert "nope__nope-1" in result.output and not (tmp_path / "out").exists()


def test_v4_adapter_with_an_empty_trajectory_still_grades(calc, tmp_path):
    """A fix that died before writing any record leaves an empty trajectory: no ATIF file (ATIF has
    no empty trajectory), and the instance is graded on its patch, not turned into an error."""
    fake = tmp_path / "fake_fix.py"
    fake.write_text(textwrap.dedent("""
        import json, pathlib, sys
        repo, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        (repo / "calc.py").write_text((repo / "calc.py").read_text().replace("a - b", "a + b"))
        runs.write_text("")
        print(json.dumps({"patch": "", "stop": "error", "turns": 0, "trajectory": str(runs)}))
        sys.exit(1)
        """))
    agent = V4Agent(f"{sys.executable} {fake} {{repo}} {tmp_path / 'trajectory.jsonl'}")
    record = _one(calc, agent)
    assert record["resolved"]
    assert not (calc.config(agent).out / "instances" / "acme__calc-1" / "trajectory.atif.json").exists()
