"""A SWE-bench run: for each instance, the agent's patch, then grading, then a report file.

Run-level outcomes are the official harness's: an empty patch ("" or None) is not run
(`empty_patch`), an instance without a prediction is not run (`incomplete`), a patch that does
not apply and tests past the timeout are errors, and the rest is graded (`resolved`,
`unresolved`; evals.grader).

Output folder:
    predictions.jsonl            official format, every instance with a prediction
    summary.json                 the run summary (evals.report.swebench_summary)
    instances/<id>/report.json   the official report fields + outcome, suspicious, timings, tokens,
                                 cache hits (or `error`)
    instances/<id>/...           prediction.json, patch.diff, eval.sh, run_instance.log,
                                 test_output.txt, test_results.json, agent.log, error.txt
    <model>.<run_id>.json        with report_official: the official run report (and logs/ for it)
An instance whose report has no error is skipped when the run is started again; a crash in one
instance is recorded in its report and the run goes on.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evals import atif
from evals.agents import Agent, Outcome
from evals.container import Engine, grade_in_container
from evals.envs import SpecTable, ensure_env
from evals.grader import Limits, grade
from evals.instances import Instance, prediction
from evals.logparse import official
from evals.ray_runner import run_on_ray
from evals.report import finished, official_report, run_all, swebench_summary, write_json
from evals.repos import RepoStore


@dataclass
class RunConfig:
    out: Path
    agent: Agent
    store: RepoStore
    specs: SpecTable
    limits: Limits = Limits()
    workers: int = 1
    engine: Engine | None = None  # --container: grade in the official images
    env_root: Path | None = None  # where venvs are cached (default: the evals cache)
    strict: bool = False  # drop a prediction's changes to test infrastructure before grading
    report_official: bool = False  # also write the official run report, <model>.<out name>.json
    ray: str | None = None  # --ray ADDRESS: run the instances as tasks on a Ray cluster ("local": a private one)

    def __post_init__(self) -> None:
        self.out = self.out.resolve()  # the agent and the sandbox run elsewhere: no relative paths


def _grade(instance: Instance, patch: str, cfg: RunConfig, folder: Path, work: Path,
           timings: dict[str, float]) -> dict[str, Any]:
    if cfg.engine:
        return grade_in_container(cfg.engine, instance, patch, cfg.specs, cfg.store,
                                  cfg.store.checkout(instance, work / "eval"), folder, cfg.limits, cfg.strict)
    spec = cfg.specs.lookup(instance.repo, instance.version)
    started = time.monotonic()
    venv = ensure_env(spec, cfg.env_root)
    timings["env_s"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    try:
        return grade(instance, patch, cfg.store.checkout(instance, work / "eval"), spec, venv, folder, cfg.limits,
                     cfg.strict)
    finally:
        timings["grade_s"] = round(time.monotonic() - started, 2)


def _not_graded(patch: str | None, outcome: str) -> dict[str, Any]:
    """The official report's fields for an instance that was not graded."""
    return {"outcome": outcome, "patch_is_None": patch is None, "patch_exists": patch not in ("", None),
            "patch_successfully_applied": False, "resolved": False, "infra_failure": False}


def _error(patch: str | None, folder: Path, error: Exception) -> dict[str, Any]:
    """An error's record: the message, and the official classification of its logs (infra_failure)."""
    record = {**_not_graded(patch, "error"), "error": f"{type(error).__name__}: {error}"}
    classified = official("harness.infra_failure").classify_logs(folder / "test_output.txt",
                                                                  folder / "run_instance.log")
    if classified:
        record.update(infra_failure=classified[1] == "environment", infra_failure_reason=classified[0])
    return record


def run_instance(instance: Instance, cfg: RunConfig) -> dict[str, Any]:
    """Agent, then grading, of one instance; its report record (also written to its folder)."""
    folder = cfg.out / "instances" / instance.instance_id
    previous = finished(folder / "report.json")
    if previous is not None:
        return previous
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("error.txt", "prediction.json"):
        (folder / stale).unlink(missing_ok=True)
    work = cfg.out / "work" / instance.instance_id
    timings: dict[str, float] = {}
    outcome = Outcome(None)
    started = time.monotonic()
    try:
        worktree = (cfg.store.checkout(instance, work / "agent", self_contained=True) if cfg.agent.needs_worktree
                    else None)
        outcome = cfg.agent.solve(instance, worktree, folder)
        timings["agent_s"] = round(time.monotonic() - started, 2)
        if outcome.predicted:
            write_json(folder / "prediction.json", prediction(instance.instance_id, cfg.agent.name, outcome.patch))
        messages = atif.load_messages(outcome.trajectory.read_text()) if outcome.trajectory else []
        if messages:  # the agent's chat messages, also as ATIF for Harbor's tools (ATIF has no empty one)
            write_json(folder / "trajectory.atif.json", atif.trajectory(
                messages, session_id=instance.instance_id, agent=cfg.agent.name, version="0.1.0"))
        if not outcome.predicted:
            record = _not_graded(None, "incomplete")
        elif outcome.patch in ("", None):  # officially not run
            record = _not_graded(outcome.patch, "empty_patch")
        else:
            graded = _grade(instance, outcome.patch, cfg, folder, work, timings)
            record = {"outcome": "resolved" if graded["resolved"] else "unresolved", **graded}
    except Exception as e:  # noqa: BLE001 - one instance's crash, whatever it is, must not stop the run
        (folder / "error.txt").write_text(traceback.format_exc())
        record = _error(outcome.patch, folder, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = round(time.monotonic() - started, 2)
    record.update(timings=timings, tokens=outcome.tokens, cache_hits=outcome.tokens.get("cached_tokens"),
                  agent_detail=outcome.detail)
    write_json(folder / "report.json", {instance.instance_id: record})
    return record


def write_predictions(instances: list[Instance], out: Path) -> Path:
    """predictions.jsonl from every instance folder that has a prediction, in instance order."""
    path = out / "predictions.jsonl"
    lines = []
    for instance in instances:
        found = out / "instances" / instance.instance_id / "prediction.json"
        if found.is_file():
            lines.append(json.dumps(json.loads(found.read_text())))
    path.write_text("".join(line + "\n" for line in lines))
    return path


def run(instances: list[Instance], cfg: RunConfig,
        on_done: Callable[[Instance, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every instance, `cfg.workers` at a time; the summary (also written to summary.json)."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.ray:
        records = run_on_ray(instances, lambda i: i.instance_id, lambda i, out: run_instance(i, replace(cfg, out=out)),
                             cfg.out, lambda i: finished(cfg.out / "instances" / i.instance_id / "report.json"),
                             cfg.ray, cfg.workers, on_done)
    else:
        records = run_all(instances, lambda i: i.instance_id, lambda i: run_instance(i, cfg), cfg.workers, on_done)
    write_predictions(instances, cfg.out)
    summary = swebench_summary(records, cfg.agent.name)
    if cfg.report_official:
        summary["official_report"] = str(official_report(cfg.out, [i.instance_id for i in instances], records,
                                                         cfg.out.name))
    write_json(cfg.out / "summary.json", summary)
    return summary
