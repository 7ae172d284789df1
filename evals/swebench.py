"""A SWE-bench run: for each instance, the agent's patch, then grading, then a report file.

Output folder:
    predictions.jsonl            official format, every instance with a prediction
    summary.json                 the run summary (evals.report.summarize)
    instances/<id>/report.json   the official report fields + timings, tokens, cache hits (or `error`)
    instances/<id>/...           prediction.json, patches, agent.log, test_output.txt, error.txt
An instance whose report exists without an error is skipped when the run is started again; a
crash in one instance is recorded in its report and the run goes on.
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
from evals.ray_runner import run_on_ray
from evals.report import finished, read_report, run_all, summarize, write_json
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
    ray: str | None = None  # --ray ADDRESS: run the instances as tasks on a Ray cluster ("local": a private one)


def _grade(instance: Instance, outcome: Outcome, cfg: RunConfig, folder: Path, work: Path,
           timings: dict[str, float]) -> dict[str, Any]:
    if cfg.engine:
        return grade_in_container(cfg.engine, instance, outcome.patch, cfg.specs, folder, cfg.limits)
    spec = cfg.specs.lookup(instance.repo, instance.version)
    started = time.monotonic()
    venv = ensure_env(spec, cfg.env_root)
    timings["env_s"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    report = grade(instance, outcome.patch, cfg.store.checkout(instance, work / "eval"), spec, venv, folder, cfg.limits)
    timings["grade_s"] = round(time.monotonic() - started, 2)
    return report


def run_instance(instance: Instance, cfg: RunConfig) -> dict[str, Any]:
    """Agent, then grading, of one instance; its report record (also written to its folder)."""
    folder = cfg.out / "instances" / instance.instance_id
    previous = read_report(folder / "report.json")
    if previous is not None and not previous.get("error"):
        return previous
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").unlink(missing_ok=True)
    work = cfg.out / "work" / instance.instance_id
    timings: dict[str, float] = {}
    outcome = Outcome(None)
    record: dict[str, Any] = {}
    started = time.monotonic()
    try:
        worktree = cfg.store.checkout(instance, work / "agent") if cfg.agent.needs_worktree else None
        outcome = cfg.agent.solve(instance, worktree, folder)
        timings["agent_s"] = round(time.monotonic() - started, 2)
        write_json(folder / "prediction.json", prediction(instance.instance_id, cfg.agent.name, outcome.patch))
        if outcome.trajectory:  # the agent's chat messages, also as ATIF for Harbor's tools
            write_json(folder / "trajectory.atif.json", atif.trajectory(
                atif.load_messages(outcome.trajectory.read_text()), session_id=instance.instance_id,
                agent=cfg.agent.name, version="0.1.0"))
        record.update(_grade(instance, outcome, cfg, folder, work, timings))
    except Exception as e:  # noqa: BLE001 - one instance's crash, whatever it is, must not stop the run
        record["error"] = f"{type(e).__name__}: {e}"
        (folder / "error.txt").write_text(traceback.format_exc())
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
    summary = summarize(records, cfg.agent.name)
    write_json(cfg.out / "summary.json", summary)
    return summary
