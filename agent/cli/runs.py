"""`v4agent runs ls / show / prune`: the runs `fix` and `replay` saved under
`$V4AGENT_CACHE/runs` (default `~/.cache/v4agent/runs`), each a directory with its
`trajectory.jsonl`, `patch.diff` and, when it was kept, the agent's work tree. Register with
`app.add_typer(runs.app, name="runs")`.

A trajectory is data and may be damaged: `ls` shows such a run with what is wrong with it, and
`prune` only ever removes directories named as runs are (`YYYYmmdd-HHMMSS-xxxxxx`)."""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from agent.cli.common import fail, visible

app = typer.Typer(help="The saved runs of fix and replay: list, show, prune ($V4AGENT_CACHE/runs).",
                  no_args_is_help=True)

RUN_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
_AGE = re.compile(r"(\d+(?:\.\d+)?)([dhm]?)")
_AGE_UNITS = {"d": 86400, "h": 3600, "m": 60, "": 86400}


@dataclass
class Run:
    """One run directory and what its trajectory says (or why it cannot be read)."""

    path: Path
    records: list[dict[str, Any]]
    problem: str | None

    @property
    def started(self) -> float:
        """When the run started, from its name (a name that is no date: when it was last changed)."""
        try:
            return time.mktime(time.strptime(self.path.name[:15], "%Y%m%d-%H%M%S"))
        except ValueError:
            return self.path.stat().st_mtime

    def first(self, kind: str) -> dict[str, Any]:
        return next((r for r in self.records if r.get("type") == kind), {})

    def summary(self) -> dict[str, Any]:
        head, end, patch = self.first("run"), self.first("end"), self.first("patch")
        issue = str(head.get("issue", "")).strip().splitlines()
        return {"run": self.path.name, "path": str(self.path), "repo": head.get("repo"),
                "issue": issue[0] if issue else "", "stop": end.get("stop"), "turns": end.get("turns"),
                "patch_bytes": patch.get("bytes"), "work_kept": patch.get("work_kept"), "problem": self.problem}


def _root() -> Path:
    from agent.trajectory import runs_root

    return runs_root()


def _runs() -> list[Run]:
    """Every run directory, newest first."""
    root = _root()
    if not root.is_dir():
        return []
    return [_read(p) for p in sorted((p for p in root.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)),
                                     key=lambda p: p.name, reverse=True)]


def _read(path: Path) -> Run:
    from agent.trajectory import TrajectoryError, read_trajectory

    trajectory = path / "trajectory.jsonl"
    if not trajectory.exists():
        return Run(path, [], "no trajectory (the run ended before it started)")
    try:
        return Run(path, read_trajectory(trajectory), None)
    except TrajectoryError as e:
        return Run(path, [], str(e))


@app.command("ls")
def ls_cmd(
    limit: int = typer.Option(20, "--limit", min=0, help="Show the newest this many runs (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The saved runs, newest first: when, how each stopped, its patch, the repository and the issue."""
    runs = _runs()
    shown = runs[: limit or None]
    if as_json:
        for run in shown:
            typer.echo(json.dumps(run.summary()))
        return
    if not runs:
        typer.echo(visible(f"no runs in {_root()}"))
        return
    typer.echo(f"{'run':<22}  {'stop':<14}  {'turns':>5}  {'patch':>8}  repository: issue")
    for run in shown:
        s = run.summary()
        if run.problem:
            typer.echo(visible(f"{s['run']:<22}  {'?':<14}  {'':>5}  {'':>8}  {run.problem}"))
            continue
        patch = "" if s["patch_bytes"] is None else f"{_number(s['patch_bytes'])} B"
        turns = "" if s["turns"] is None else _number(s["turns"])
        typer.echo(visible(f"{s['run']:<22}  {str(s['stop'] or 'no end'):<14}  {turns:>5}  {patch:>8}  "
                           f"{s['repo']}: {s['issue'][:60]}"))
    if len(shown) < len(runs):
        typer.echo(f"… {len(runs) - len(shown)} older runs (--limit 0 lists all)")


@app.command("show")
def show_cmd(
    run: str = typer.Argument(..., help="A run's name (or the start of it), or its directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """One run: its repository, backend, limits, each turn's tool calls, how it stopped, its patch."""
    found = _find(run)
    if found.problem:
        raise fail(f"{found.path}: {found.problem}")
    s = found.summary()
    head, end, pack = found.first("run"), found.first("end"), found.first("pack")
    turns = [r for r in found.records if r.get("type") == "turn"]
    calls = [{"turn": t.get("turn"), "calls": [f"{r.get('name')}{'' if r.get('ok') else ' (error)'}"
                                                for r in t.get("results", [])]} for t in turns]
    patch_file = found.path / "patch.diff"
    details = {**s, "head": head.get("head"), "backend": head.get("backend"), "config": head.get("config"),
               "pack": {k: v for k, v in pack.items() if k != "type"}, "turn_calls": calls,
               "end": {k: v for k, v in end.items() if k != "type"},
               "patch_file": str(patch_file) if patch_file.is_file() else None}
    if as_json:
        typer.echo(json.dumps(details))
        return
    lines = [f"run        {s['run']} ({found.path})", f"repository {s['repo']} at {details['head']}",
             f"issue      {s['issue']}", f"backend    {json.dumps(details['backend'])}",
             f"limits     {json.dumps(details['config'])}"]
    if pack:
        lines.append(f"pack       {_number(pack.get('tokens'))} tokens of {_number(pack.get('budget'))}: "
                     f"{pack.get('files_full', 0)} files in full, {pack.get('files_outlined', 0)} outlined, "
                     f"{pack.get('files_dropped', 0)} dropped")
    lines += [f"turn {str(c['turn']):<5} {', '.join(c['calls']) or '(no tool call)'}" for c in calls]
    if end:
        error = f" ({end['error']})" if end.get("error") else ""
        lines.append(f"stopped    {end.get('stop')} after {end.get('turns')} turns{error}")
    else:
        lines.append("stopped    (no end record: still running, or killed)")
    lines.append(f"patch      {details['patch_file']} ({_number(s['patch_bytes'] or 0)} bytes)"
                 if details["patch_file"] else "patch      none saved")
    if s["work_kept"]:
        lines.append(f"work kept  {s['work_kept']}")
    for line in lines:
        typer.echo(visible(line))


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _find(name: str) -> Run:
    """The run `name` names: a directory, a run's full name, or the start of exactly one."""
    path = Path(name)
    if path.is_dir() and (path / "trajectory.jsonl").exists():
        return _read(path)
    matches = [run for run in _runs() if run.path.name.startswith(name)] if name else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise fail(f"no run {name!r} in {_root()} (v4agent runs ls lists them)")
    raise fail(f"{name!r} names {len(matches)} runs ({', '.join(r.path.name for r in matches[:3])}…): "
               "give more of the name")


@app.command("prune")
def prune_cmd(
    keep: int | None = typer.Option(None, "--keep", min=0, help="Keep the newest this many runs."),
    older_than: str | None = typer.Option(None, "--older-than", metavar="AGE",
                                          help="Remove runs started longer ago than this: 30d, 12h, 90m (days "
                                               "without a unit)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Remove old runs: their trajectory, patch and any kept work tree. With both options, a run
    goes when it is past the newest --keep and older than --older-than."""
    if keep is None and older_than is None:
        raise fail("say which runs to remove: --keep N (the newest N stay) and/or --older-than AGE")
    cutoff = None
    if older_than is not None:
        m = _AGE.fullmatch(older_than.strip().lower())
        if not m:
            raise fail(f"--older-than must be an age such as 30d, 12h or 90m, not {older_than!r}")
        cutoff = time.time() - float(m.group(1)) * _AGE_UNITS[m.group(2)]
    runs = _runs()
    doomed = [run for i, run in enumerate(runs)
              if (keep is None or i >= keep) and (cutoff is None or run.started < cutoff)]
    removed = []
    for run in doomed:
        if not dry_run:
            try:
                shutil.rmtree(run.path)
            except OSError as e:
                raise fail(f"cannot remove {e.filename or run.path}: {e.strerror or e} (removed before it: "
                           f"{len(removed)} runs)") from None
        removed.append(run.path.name)
    result = {"removed": removed, "kept": len(runs) - len(removed), "dry_run": dry_run}
    if as_json:
        typer.echo(json.dumps(result))
        return
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(removed)} runs, {result['kept']} kept ({_root()})")
    for name in removed:
        typer.echo(f"  {name}")
