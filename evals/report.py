"""Run outputs: per-instance report files (the official report's fields keyed by instance id,
plus timings, tokens and cache hits), the run summary, the official run report, and a table for
people.

Outcomes are the official run report's: `resolved` and `unresolved` (graded), `error` (a patch
that does not apply, tests past the timeout, a crash), `empty_patch` (a prediction without a
patch: not run) and `incomplete` (no prediction: not run)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from evals.logparse import official
from evals.proc import EvalError

OUTCOMES = ("resolved", "unresolved", "error", "empty_patch", "incomplete")
# The fields of the official per-instance report.json (swebench.harness.grading.get_eval_report).
OFFICIAL_FIELDS = ("patch_is_None", "patch_exists", "patch_successfully_applied", "resolved", "infra_failure",
                   "infra_failure_reason", "tests_status")
# What the official harness leaves per instance, and so what its run report reads.
OFFICIAL_LOGS = ("test_output.txt", "run_instance.log", "patch.diff", "eval.sh")

T = TypeVar("T")


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a crash leaves the old file or the new one, and resuming trusts it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=2)
    os.replace(handle.name, path)


def read_report(path: Path) -> dict[str, Any] | None:
    """A per-instance report's record (the value under its instance id), or None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return next(iter(data.values()), None) if isinstance(data, dict) and len(data) == 1 else None


def finished(path: Path) -> dict[str, Any] | None:
    """The record at `path` when it is a finished one (no `error`): resuming skips its item."""
    record = read_report(path)
    return record if record is not None and not record.get("error") else None


def run_all(items: Iterable[T], key: Callable[[T], str], run_one: Callable[[T], dict[str, Any]], workers: int,
            on_done: Callable[[T, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """`run_one` on every item, `workers` at a time; the records by key. `run_one` catches its own crashes."""
    records: dict[str, dict[str, Any]] = {}

    def one(item: T) -> None:
        records[key(item)] = run_one(item)
        if on_done:
            on_done(item, records[key(item)])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, items))
    return records


def outcome(record: dict[str, Any]) -> str:
    """A record's outcome; a record without one (Terminal-Bench's) is an error, resolved or not."""
    return record.get("outcome") or ("error" if record.get("error") else
                                     "resolved" if record.get("resolved") else "unresolved")


def summarize(records: dict[str, dict[str, Any]], agent: str) -> dict[str, Any]:
    """The run summary; `records` maps every instance id to its report record."""
    ids = sorted(records)
    by = {name: [i for i in ids if outcome(records[i]) == name] for name in OUTCOMES}
    tokens: dict[str, int] = {}
    for record in records.values():
        for key, value in (record.get("tokens") or {}).items():
            tokens[key] = tokens.get(key, 0) + value
    return {
        "agent": agent, "total": len(ids), "resolved": len(by["resolved"]), "unresolved": len(by["unresolved"]),
        "errors": len(by["error"]), "empty_patch": len(by["empty_patch"]),
        "resolved_rate": round(len(by["resolved"]) / len(ids), 4) if ids else 0.0, "tokens": tokens,
        "resolved_ids": by["resolved"], "unresolved_ids": by["unresolved"], "error_ids": by["error"],
    }


def swebench_summary(records: dict[str, dict[str, Any]], agent: str) -> dict[str, Any]:
    """`summarize`, and what only SWE-bench has: instances not run (empty patch, no prediction)
    and predictions that touch test infrastructure."""
    ids = sorted(records)
    return {**summarize(records, agent), "incomplete": sum(outcome(records[i]) == "incomplete" for i in ids),
            "empty_patch_ids": [i for i in ids if outcome(records[i]) == "empty_patch"],
            "incomplete_ids": [i for i in ids if outcome(records[i]) == "incomplete"],
            "suspicious_ids": [i for i in ids if records[i].get("suspicious")]}


def official_report(out: Path, instance_ids: list[str], records: dict[str, dict[str, Any]], run_id: str) -> Path:
    """The official run summary `<model>.<run_id>.json` in `out`, written by the official
    make_run_report from the official log layout, which this lays out first under
    `out/logs/run_evaluation/<run_id>/<model>/<id>/` (report.json for the graded instances,
    the logs for all that ran)."""
    predictions = {}
    if (out / "predictions.jsonl").is_file():
        for line in (out / "predictions.jsonl").read_text().splitlines():
            prediction = json.loads(line)
            predictions[prediction["instance_id"]] = prediction
    if not predictions:
        raise EvalError("--report-official: the run has no predictions to report on")
    root = out / "logs" / "run_evaluation"
    for iid, prediction in predictions.items():
        record = records.get(iid) or {}
        folder = root / run_id / prediction["model_name_or_path"].replace("/", "__") / iid
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in OFFICIAL_LOGS:
            if (out / "instances" / iid / name).is_file():
                shutil.copyfile(out / "instances" / iid / name, folder / name)
        if record.get("outcome") in ("resolved", "unresolved"):  # officially, only graded instances have one
            write_json(folder / "report.json", {iid: {k: record[k] for k in OFFICIAL_FIELDS if k in record}})
    reporting = official("harness.reporting")
    # make_run_report reads the reports under this folder, officially relative to the working
    # directory; pointed at ours for the call. Its printout goes to stderr: stdout may be JSON lines.
    saved, reporting.RUN_EVALUATION_LOG_DIR = reporting.RUN_EVALUATION_LOG_DIR, root
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return Path(reporting.make_run_report(predictions, [{"instance_id": i} for i in instance_ids], run_id,
                                                  None, str(out)))
    finally:
        reporting.RUN_EVALUATION_LOG_DIR = saved


def _count(status: dict[str, Any] | None, key: str) -> str:
    if not status:
        return "-"
    block = status[key]
    total = len(block["success"]) + len(block["failure"])
    return f"{len(block['success'])}/{total}"


def table(records: dict[str, dict[str, Any]]):
    """A rich Table of the instances: outcome, FAIL_TO_PASS and PASS_TO_PASS counts, times, tokens."""
    from rich.table import Table

    view = Table(show_lines=False)
    for column in ("instance", "outcome", "F2P", "P2P", "agent s", "tests s", "tokens"):
        view.add_column(column, justify="left" if column in ("instance", "outcome") else "right",
                        no_wrap=column == "instance")
    for iid in sorted(records):
        record = records[iid]
        name = outcome(record)
        style = {"resolved": "green", "unresolved": "red", "error": "yellow"}.get(name, "dim")
        shown = f"[{style}]{name.replace('_', ' ')}[/]" + (" [magenta](suspicious)[/]" if record.get("suspicious") else "")
        timings = record.get("timings", {})
        tokens = sum((record.get("tokens") or {}).get(k, 0) for k in ("prompt_tokens", "completion_tokens"))
        view.add_row(iid, shown, _count(record.get("tests_status"), "FAIL_TO_PASS"),
                     _count(record.get("tests_status"), "PASS_TO_PASS"), f"{timings.get('agent_s', 0):.1f}",
                     f"{timings.get('grade_s', 0):.1f}", str(tokens or "-"))
    return view


def task_table(records: dict[str, dict[str, Any]]):
    """A rich Table of Terminal-Bench trials: outcome, reward, times."""
    from rich.table import Table

    view = Table()
    for column in ("task", "outcome", "reward", "setup s", "agent s", "verify s"):
        view.add_column(column, justify="left" if column in ("task", "outcome") else "right", no_wrap=column == "task")
    for name in sorted(records):
        record = records[name]
        outcome = ("[yellow]refused[/]" if record.get("refused") else "[yellow]error[/]" if record.get("error")
                   else "[green]resolved[/]" if record.get("resolved") else "[red]unresolved[/]")
        timings = record.get("timings", {})
        reward = record.get("reward")
        view.add_row(name, outcome, "-" if reward is None else f"{reward:g}",
                     *(f"{timings.get(k, 0):.1f}" for k in ("setup_s", "agent_s", "verify_s")))
    return view
