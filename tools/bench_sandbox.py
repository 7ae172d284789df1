"""The sandbox benchmark behind `v4agent bench sandbox`: what the sandbox adds to one `run`.

Runs `true` through the run tool, alternately sandboxed and unconfined (so machine noise hits
both alike), in a scratch work tree that is a shared git clone as `fix` makes, and reports the
mean and median milliseconds of each, the overhead, and what bounds each command's memory and
processes here (`limits`: a cgroup per command, or rlimits only; tools.cgroups).
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tools import cgroups, sandbox
from tools.base import Settings
from tools.registry import call

GOAL_MS = 50.0  # the sandbox's overhead per command we hold ourselves to


def _scratch_clone(tmp: Path) -> Path:
    origin = tmp / "origin"
    origin.mkdir()
    (origin / "README").write_text("bench\n")
    env = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "."], [*env, "commit", "-qm", "bench"]):
        subprocess.run(["git", *args], cwd=origin, check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", "--shared", str(origin), str(tmp / "work")], check=True, capture_output=True)
    return tmp / "work"


def _time_one(root: Path, settings: Settings) -> float:
    started = time.perf_counter()
    result = call("run", {"command": "true"}, root, settings=settings)
    elapsed = (time.perf_counter() - started) * 1000
    if not result.ok or not result.output.startswith("[exit code 0]"):
        raise RuntimeError(f"`true` failed ({settings.sandbox}): {result.output[:300]}")
    return elapsed


def run(repeats: int = 50) -> dict[str, Any]:
    """Mean/median ms per `run` of `true` with and without the sandbox; raises SandboxUnavailable."""
    sandbox.check()
    on, off = Settings(sandbox="on"), Settings(sandbox="off")
    times: dict[str, list[float]] = {"sandboxed": [], "unconfined": []}
    with tempfile.TemporaryDirectory(prefix="v4agent-bench-sandbox-") as tmp:
        root = _scratch_clone(Path(tmp))
        _time_one(root, on), _time_one(root, off)  # warm-up: the probe, the filter, the page cache
        for _ in range(repeats):
            times["sandboxed"].append(_time_one(root, on))
            times["unconfined"].append(_time_one(root, off))
    result: dict[str, Any] = {"repeats": repeats, "limits": cgroups.mechanism()}
    for name, values in times.items():
        result[f"{name}_mean_ms"] = round(statistics.fmean(values), 2)
        result[f"{name}_median_ms"] = round(statistics.median(values), 2)
    result["overhead_mean_ms"] = round(result["sandboxed_mean_ms"] - result["unconfined_mean_ms"], 2)
    result["sandboxed_over_unconfined"] = round(result["sandboxed_mean_ms"] / result["unconfined_mean_ms"], 3)
    result["goal_sandboxed_mean_ms"] = GOAL_MS
    result["goal_met"] = result["sandboxed_mean_ms"] <= GOAL_MS
    return result
