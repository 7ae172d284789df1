"""Terminal-Bench: the bundled 2.0 samples under the oracle in a bubblewrap scratch root, a task
that needs its image refused before anything runs, the 1.0 layout, and the ATIF export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evals import atif, tbench
from evals.tbench_tasks import host_refusal, load_task, load_tasks
from tools import sandbox

SAMPLES = Path(__file__).parents[1] / "evals" / "data" / "tbench"
needs_bwrap = pytest.mark.skipif(not sandbox.available(), reason="bubblewrap is not installed or cannot sandbox here")


def _task(root: Path, dockerfile: str, test_sh: str = "echo 1 > /logs/verifier/reward.txt\n") -> Path:
    for folder in ("environment", "solution", "tests"):
        (root / folder).mkdir(parents=True)
    (root / "task.toml").write_text('version = "2.0"\n[agent]\ntimeout_sec = 30.0\n[verifier]\ntimeout_sec = 30.0\n')
    (root / "instruction.md").write_text("Do it.\n")
    (root / "environment" / "Dockerfile").write_text(dockerfile)
    (root / "solution" / "solve.sh").write_text("touch /app/done\n")
    (root / "tests" / "test.sh").write_text(test_sh)
    return root


def test_bundled_tasks_load_with_their_settings():
    tasks = {t.name: t for t in load_tasks(SAMPLES)}
    assert sorted(tasks) == ["count-words", "error-report", "fix-median"]
    assert tasks["fix-median"].agent_timeout == 300 and tasks["count-words"].verifier_timeout == 60
    assert all(host_refusal(t, oracle=True) is None for t in tasks.values())


@needs_bwrap
def test_oracle_solves_the_bundled_tasks_without_containers(tmp_path):
    summary = tbench.run_tasks(load_tasks(SAMPLES), tbench.TbenchConfig(out=tmp_path, agent="oracle", workers=2))
    assert (summary["total"], summary["resolved"], summary["errors"]) == (3, 3, 0)
    result = json.loads((tmp_path / "tasks" / "fix-median" / "result.json").read_text())["fix-median"]
    assert result["rewards"] == {"reward": 1.0} and summary["metrics"] == {"mean": 1.0}  # reward.json
    trajectory = json.loads((tmp_path / "tasks" / "count-words" / "trajectory.json").read_text())
    assert trajectory["schema_version"].startswith("ATIF-") and [s["step_id"] for s in trajectory["steps"]] == [1, 2]
    call = trajectory["steps"][1]["tool_calls"][0]
    assert call["arguments"] == {"command": "(/solution/solve.sh) > /logs/agent/oracle.txt 2>&1"}  # as Harbor runs it
    assert trajectory["steps"][1]["observation"]["results"][0]["source_call_id"] == call["tool_call_id"]


@needs_bwrap
def test_the_sandbox_has_no_network_and_a_wrong_answer_scores_zero(tmp_path):
    task = _task(tmp_path / "t", "FROM ubuntu\nWORKDIR /app\n",
                 "if python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), 3)'; then r=0; "
                 "else r=1; fi\necho $r > /logs/verifier/reward.txt\n")
    record = tbench.run_task(load_task(task), tbench.TbenchConfig(out=tmp_path / "out", agent="oracle"))
    assert record["resolved"], record  # no route out
    (task / "tests" / "test.sh").write_text("echo 0 > /logs/verifier/reward.txt\n")
    again = tbench.run_task(load_task(task), tbench.TbenchConfig(out=tmp_path / "out2", agent="oracle"))
    assert again["reward"] == 0.0 and not again["resolved"] and not again.get("error")


def test_a_task_that_needs_its_image_is_refused_before_running(tmp_path):
    task = _task(tmp_path / "t",
                 "FROM ubuntu:24.04\nWORKDIR /app\nRUN apt-get update && \\\n    apt-get install -y jq\n")
    assert "apt-get" in host_refusal(load_task(task), oracle=True)
    record = tbench.run_task(load_task(task), tbench.TbenchConfig(out=tmp_path / "out", agent="oracle"))
    assert record["refused"] and "container image" in record["error"] and "timings" in record
    assert not (tmp_path / "out" / "tasks" / "t" / "app").exists()  # nothing was set up
    image = _task(tmp_path / "u", "FROM x\n")
    (image / "task.toml").write_text('[environment]\ndocker_image = "ghcr.io/x/y:1"\n')
    assert "prebuilt image" in host_refusal(load_task(image), oracle=False)


@needs_bwrap
def test_terminal_bench_1_layout(tmp_path):
    pytest.importorskip("yaml")
    root = tmp_path / "hello"
    (root / "tests").mkdir(parents=True)
    (root / "task.yaml").write_text("instruction: |\n  Write hello to /app/hello.txt\nmax_agent_timeout_sec: 30\n"
                                    "max_test_timeout_sec: 30\n")
    (root / "Dockerfile").write_text("FROM python:3.11\nWORKDIR /app\n")
    (root / "solution.sh").write_text("echo hello > /app/hello.txt\n")
    (root / "tests" / "test_outputs.py").write_text(
        "def test_hello():\n    assert open('/app/hello.txt').read() == 'hello\\n'\n")
    (root / "run-tests.sh").write_text(
        f"{sys.executable} -m pytest -rA -p no:cacheprovider $TEST_DIR/test_outputs.py\n")
    task = load_task(root)
    assert task.layout == "1.0" and task.instruction.startswith("Write hello")
    record = tbench.run_task(task, tbench.TbenchConfig(out=tmp_path / "out", agent="oracle"))
    assert record["resolved"] and record["reward"] == 1.0


def test_atif_from_chat_messages():
    messages = [{"role": "system", "content": "You fix bugs."}, {"role": "user", "content": "Fix add()."},
                {"role": "assistant", "content": "Looking.", "reasoning_content": "probably a sign",
                 "tool_calls": [{"id": "a", "function": {"name": "read_file", "arguments": '{"path": "calc.py"}'}}],
                 "usage": {"prompt_tokens": 50, "completion_tokens": 9, "cached_tokens": 40}},
                {"role": "tool", "tool_call_id": "a", "content": "1 def add(a, b): ..."},
                {"role": "assistant", "content": "Done.", "usage": {"prompt_tokens": 70, "completion_tokens": 3}}]
    out = atif.trajectory(messages, session_id="s", agent="v4agent", version="0.1.0", model="deepseek-v4")
    assert [s["source"] for s in out["steps"]] == ["system", "user", "agent", "agent"]
    assert out["steps"][2]["tool_calls"][0] == {"tool_call_id": "a", "function_name": "read_file",
                                                "arguments": {"path": "calc.py"}}
    assert out["steps"][2]["observation"] == {"results": [{"source_call_id": "a", "content": "1 def add(a, b): ..."}]}
    assert out["final_metrics"] == {"total_prompt_tokens": 120, "total_completion_tokens": 12,
                                    "total_cached_tokens": 40, "total_steps": 4}
    assert atif.load_messages("\n".join(json.dumps(m) for m in messages)) == messages


def test_cli_runs_the_samples_and_ends_with_the_summary(tmp_path):
    if not sandbox.available():
        pytest.skip("bubblewrap is not installed or cannot sandbox here")
    from typer.testing import CliRunner

    from agent.cli.eval import app

    result = CliRunner().invoke(app, ["tbench", "mini", "--agent", "oracle", "--tasks", "count-words",
                                      "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["total"] == 1 and summary["resolved_ids"] == ["count-words"]
