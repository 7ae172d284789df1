"""`v4agent eval ... --agent v4 --weights DIR`: one `v4agent serve` subprocess for the whole run,
shared by every worker's `v4agent fix`, on 127.0.0.1 with a key made for the run that travels in
environments only, and gone when the run ends (normally, on an error or Ctrl-C, or when eval
itself is killed). Real subprocesses on a tiny checkpoint; the mini SWE-bench set with four
workers is the slow test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from agent.cli.eval import app
from evals.agents import shared_server

# No --context-limit: fix takes the server's (the tiny model's 4,096 tokens) from eval.
TEMPLATE = ("v4agent fix --repo {repo} --issue-file {issue_file} --patch-out {patch_out} --json "
            "--max-turns 2 --max-turn-tokens 4")


@pytest.fixture(scope="module")
def tiny(tiny_v4: Path) -> Path:
    return tiny_v4


def servers(weights: Path) -> list[int]:
    """The pids of `v4agent serve` processes on `weights`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(weights).encode() in argv:
            found.append(int(proc.name))
    return found


def gone(weights: Path, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while servers(weights):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("args, message", [
    (["--weights", "W", "--endpoint", "http://127.0.0.1:1/v1", "--model", "m"], "one model at a time"),
    (["--agent", "oracle", "--weights", "W"], "this run does not use it"),
    (["--endpoint", "http://127.0.0.1:1/v1"], "--endpoint needs --model"),
    (["--model", "m"], "give both"),
    (["--weights", "W", "--v4-cmd", "v4agent fix --repo {repo} --endpoint http://h/v1 --model m"],
     "already names a model"),
    (["--weights", "/nonexistent"], "no such directory"),
    (["--weights", "W", "--ray", "ray://head:10001"], "cannot reach"),
])
def test_model_options_are_usage_errors_before_anything_starts(args: list[str], message: str, tiny: Path):
    args = [str(tiny) if a == "W" else a for a in args]
    for command in ("swebench", "tbench"):
        result = CliRunner().invoke(app, [command, "mini", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not servers(tiny)


def test_the_server_has_a_private_key_and_stops_when_the_run_breaks_off(tiny: Path, tmp_path: Path):
    log = tmp_path / "out" / "server.log"
    with pytest.raises(KeyboardInterrupt), shared_server(tiny, log, max_running=2) as access:
        (pid,) = servers(tiny)
        key = access.env["V4AGENT_API_KEY"]
        assert len(key) >= 40 and key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert f"V4AGENT_API_KEY={key}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert key not in " ".join(access.argv(["fix"]))  # the workers get it in their environment too
        url = access.flags[access.flags.index("--endpoint") + 1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url) and access.context_limit == 4096
        assert access.flags[access.flags.index("--model") + 1] == "tiny-v4"
        base = url.removesuffix("/v1")
        assert httpx.get(base + "/health", timeout=30).status_code == 401
        assert httpx.get(base + "/health", headers={"Authorization": f"Bearer {key}"}, timeout=30).is_success
        # fix's own --context-limit wins over the server's
        assert access.argv(["fix"])[-2:] == ["--context-limit", "4096"]
        assert access.argv(["fix", "--context-limit=99"]).count("--context-limit") == 0
        raise KeyboardInterrupt  # Ctrl-C in the middle of the run
    assert gone(tiny)
    assert log.read_text().rstrip().endswith("stopped")  # SIGTERM: a clean stop, the engine closed
    assert "v4agent_engine_running 0" in (log.parent / "server-metrics.txt").read_text()


def _eval(tiny: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from agent.cli import main; main()", "eval", "swebench", "mini",
                             "--agent", "v4", "--weights", str(tiny), "--v4-cmd", TEMPLATE, "--out", str(out),
                             "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1])


def _metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.slow  # the mini set's five instances, each a real fix against the tiny model: ~2 min on 2 busy cores
def test_four_workers_share_one_server_and_every_instance_is_graded(tiny: Path, tmp_path: Path):
    process = _eval(tiny, tmp_path / "out", "--workers", "4")
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr
    summary = json.loads(stdout.splitlines()[-1])
    assert (summary["total"], summary["errors"]) == (5, 0), summary
    reports = [json.loads(p.read_text()) for p in (tmp_path / "out" / "instances").glob("*/report.json")]
    records = [record for report in reports for record in report.values()]
    assert len(records) == 5 and all(r["outcome"] in ("resolved", "unresolved", "empty_patch") for r in records)
    turns = sum(r["agent_detail"]["turns"] for r in records)
    assert turns >= 5 and all(r["tokens"]["prompt_tokens"] > 0 for r in records)

    log = (tmp_path / "out" / "server.log").read_text()
    assert log.count("serving tiny-v4 on http://127.0.0.1:") == 1 and log.rstrip().endswith("stopped")
    metrics = _metrics((tmp_path / "out" / "server-metrics.txt").read_text())
    # every request of every instance went to the one server, and conversations ran together
    assert metrics['v4agent_requests_total{path="/v1/chat/completions",status="200"}'] == turns
    assert metrics["v4agent_engine_requests"] == turns and metrics["v4agent_engine_errors"] == 0
    assert metrics["v4agent_engine_running_peak"] >= 2, metrics
    assert gone(tiny, within=5)


@pytest.mark.slow  # one server start, then eval is killed: ~20 s
def test_a_killed_eval_leaves_no_server(tiny: Path, tmp_path: Path):
    process = _eval(tiny, tmp_path / "out", "--workers", "2")
    log = tmp_path / "out" / "server.log"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "serving tiny-v4" in log.read_text()):
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read() if process.stderr else ""
        time.sleep(0.1)
    assert servers(tiny)
    os.kill(process.pid, signal.SIGKILL)  # no finally runs: the server must go by itself
    process.communicate(timeout=60)
    assert gone(tiny)


@pytest.mark.slow  # two Terminal-Bench tasks, each a real fix in its scratch root: 45-90 s on 2 busy cores
def test_tbench_workers_reach_the_server_from_their_scratch_roots(tiny: Path, tmp_path: Path):
    out = tmp_path / "out"
    template = "v4agent fix --repo {repo} --issue-file {issue_file} --apply --json --max-turns 2 --max-turn-tokens 4"
    result = CliRunner().invoke(app, ["tbench", "mini", "--agent", "v4", "--weights", str(tiny), "--v4-cmd", template,
                                      "--tasks", "count-words,fix-median", "--workers", "2", "--out", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert (summary["total"], summary["errors"]) == (2, 0) and summary["tokens"]["prompt_tokens"] > 0, summary
    metrics = _metrics((out / "server-metrics.txt").read_text())
    assert metrics['v4agent_requests_total{path="/v1/chat/completions",status="200"}'] == 4  # 2 turns each
    assert (out / "server.log").read_text().rstrip().endswith("stopped") and gone(tiny, within=5)
