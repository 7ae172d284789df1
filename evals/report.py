"""Run outputs: per-instance report files (the official report's fields keyed by instance id,
plus timings, tokens and cache hits), the run summary, and a table for people."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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


def summarize(records: dict[str, dict[str, Any]], agent: str) -> dict[str, Any]:
    """The run summary; `records` maps every instance id to its report record."""
    ids = sorted(records)
    errors = [i for i in ids if records[i].get("error")]
    resolved = [i for i in ids if records[i].get("resolved") and i not in errors]
    unresolved = [i for i in ids if i not in errors and i not in resolved]
    tokens: dict[str, int] = {}
    for record in records.values():
        for key, value in (record.get("tokens") or {}).items():
            tokens[key] = tokens.get(key, 0) + value
    return {
        "agent": agent, "total": len(ids), "resolved": len(resolved), "unresolved": len(unresolved),
        "errors": len(errors),
        "empty_patch": sum(records[i].get("patch_exists") is False for i in ids if i not in errors),
        "resolved_rate": round(len(resolved) / len(ids), 4) if ids else 0.0, "tokens": tokens,
        "resolved_ids": resolved, "unresolved_ids": unresolved, "error_ids": errors,
    }


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
        if record.get("error"):
            outcome = "[yellow]error[/]"
        elif record.get("resolved"):
            outcome = "[green]resolved[/]"
        else:
            outcome = "[red]unresolved[/]" if record.get("patch_successfully_applied", True) else "[red]no apply[/]"
        timings = record.get("timings", {})
        tokens = sum((record.get("tokens") or {}).get(k, 0) for k in ("prompt_tokens", "completion_tokens"))
        view.add_row(iid, outcome, _count(record.get("tests_status"), "FAIL_TO_PASS"),
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
