"""`v4agent eval swebench|tbench`: run an agent on SWE-bench instances or Terminal-Bench tasks
and grade it like the official harnesses. Register with `app.add_typer(eval.app, name="eval")`.

With `--json`, one JSON line per finished instance or task, and the summary (`total`,
`resolved`, `unresolved`, `errors`, `resolved_ids`, ...) as the final line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from agent.cli.common import fail, print_result

app = typer.Typer(help="Benchmarks: SWE-bench instances and Terminal-Bench tasks, graded like the official harnesses.",
                  no_args_is_help=True)

MINI = "mini"  # INSTANCES / TASKS_DIR alias for the bundled sets
DATA = Path(__file__).parents[2] / "evals" / "data"
RAY_HELP = "Run on a Ray cluster: its address (ray://host:10001, auto), or 'local' for a private one (docs/evals.md)."
WEIGHTS_HELP = ("The v4 agent's model: start one `v4agent serve` on these weights for the whole run, which every "
                "worker's fix talks to (on 127.0.0.1, with a key made for the run; stopped at the end).")
ENDPOINT_HELP = "The v4 agent's model: an OpenAI-compatible API base every fix talks to (key in V4AGENT_API_KEY)."
MODEL_HELP = "The model name --endpoint serves."


def _weights(weights: Path | None) -> Path | None:
    return weights.resolve() if weights else None


def _announce(weights: Path | None, out: Path) -> None:
    """That the run's own server is starting, and where it logs (stderr: --json keeps stdout for
    the results); loading real weights takes minutes."""
    if weights is not None:
        typer.echo(f"starting `v4agent serve --weights {weights}` for the workers (log: {out / 'server.log'})",
                   err=True)


def _progress(label: str, total: int, as_json: bool) -> tuple[Any, Callable[[str, dict[str, Any]], None]]:
    """A progress bar on stderr (terminal only) and the per-item callback that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(label, total=total)

    def done(name: str, record: dict[str, Any]) -> None:
        bar.advance(task)
        if as_json:
            typer.echo(json.dumps({"id": name, "resolved": bool(record.get("resolved")), "error": record.get("error")}))

    return bar, done


def _finish(summary: dict[str, Any], records: dict[str, dict[str, Any]], as_json: bool, table: Callable) -> None:
    if as_json:
        typer.echo(json.dumps(summary))
        return
    from rich.console import Console

    Console().print(table(records))
    print_result({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, False)


@app.command("swebench")
def swebench_cmd(
    instances: str = typer.Argument(..., help="Instances file (.json/.jsonl) or folder; 'mini' for the bundled set."),
    repo_source: Path | None = typer.Option(None, "--repo-source", help="Folder of local clones/mirrors, owner__name."),
    env_spec: Path | None = typer.Option(None, "--env-spec", help="Spec table (TOML/JSON) extending the bundled one."),
    agent: str = typer.Option("v4", "--agent", help="v4 (v4agent fix), oracle (gold patch) or empty (no patch)."),
    predictions: Path | None = typer.Option(None, "--predictions", help="Grade this predictions file instead."),
    ids: str | None = typer.Option(None, "--instance-ids", help="Comma-separated instance ids to run."),
    workers: int = typer.Option(1, "--workers", min=1, help="Instances in parallel."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default eval-runs/swebench-AGENT)."),
    timeout: float = typer.Option(1800, "--timeout", help="Seconds for one instance's test run (official: 1800)."),
    agent_timeout: float = typer.Option(3600, "--agent-timeout", help="Seconds for the v4 agent per instance."),
    v4_cmd: str | None = typer.Option(None, "--v4-cmd", help="Command template for the v4 agent (docs/evals.md)."),
    weights: Path | None = typer.Option(None, "--weights", metavar="<dir>", help=WEIGHTS_HELP),
    endpoint: str | None = typer.Option(None, "--endpoint", metavar="<url>", help=ENDPOINT_HELP),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    container: bool = typer.Option(False, "--container", help="Grade in containers on images built here (podman or docker; docs/evals.md)."),
    official: bool = typer.Option(False, "--official", help="Also grade predictions.jsonl with the official harness."),
    report_official: bool = typer.Option(False, "--report-official",
                                         help="Also write the official run report OUT/<model>.<out name>.json."),
    strict: bool = typer.Option(False, "--strict", help="Drop a prediction's changes to test infrastructure "
                                                        "(conftest.py, pytest/tox settings...) before grading."),
    ray: str | None = typer.Option(None, "--ray", help=RAY_HELP),
    as_json: bool = typer.Option(False, "--json", help="JSON lines; the last one is the summary."),
) -> None:
    """Run an agent on SWE-bench instances and grade its patches."""
    import subprocess

    from evals import swebench
    from evals.agents import V4Agent, check_model_options, make_agent, model_access, template
    from evals.container import detect_engine, official_harness
    from evals.envs import SpecTable
    from evals.grader import Limits
    from evals.instances import load_instances, load_predictions
    from evals.logparse import official as official_package
    from evals.proc import EvalError
    from evals.report import read_report, table
    from evals.repos import RepoStore

    # Every path absolute before use: the work trees, sandboxes and containers run elsewhere.
    path = DATA / "mini_swebench.jsonl" if instances == MINI else Path(instances).resolve()
    env_spec, predictions = (p.resolve() if p else None for p in (env_spec, predictions))
    try:
        official_package("harness.grading")  # the grader is the official one: stop now if it is missing
        selected = load_instances(path, ids.split(",") if ids else None)
        found = load_predictions(predictions) if predictions else None
        if found is not None:  # officially an error, not a prediction quietly ignored
            unknown = set(found) - {i.instance_id for i in (load_instances(path) if ids else selected)}
            if unknown:
                raise EvalError(f"{predictions}: predictions for instances not in {path}: {', '.join(sorted(unknown))}")
        check_model_options(agent, template(v4_cmd), weights=weights, endpoint=endpoint, model=model, ray=ray,
                            predictions=found is not None)
        chosen = make_agent(agent, predictions=found, v4_cmd=v4_cmd, timeout=agent_timeout)
        engine = detect_engine() if container else None
        if container and engine is None:
            raise EvalError("--container: neither docker nor podman answers on this machine")
        cfg = swebench.RunConfig(out=(out or Path("eval-runs") / f"swebench-{chosen.name}").resolve(), agent=chosen,
                                 store=RepoStore(repo_source.resolve() if repo_source else None),
                                 specs=SpecTable(env_spec), limits=Limits(timeout), workers=workers,
                                 engine=engine, ray=ray, strict=strict, report_official=report_official)
        _announce(weights, cfg.out)
        with model_access(weights=_weights(weights), endpoint=endpoint, model=model, log=cfg.out / "server.log",
                          max_running=workers) as access:
            if access is not None:
                assert isinstance(chosen, V4Agent)  # check_model_options: only the v4 agent is given a model
                chosen.access = access
            bar, done = _progress("instances", len(selected), as_json)
            with bar:
                summary = swebench.run(selected, cfg, lambda inst, record: done(inst.instance_id, record))
        if official:
            subprocess.run(official_harness(path, cfg.out / "predictions.jsonl", cfg.out.name, workers), check=False)
    except EvalError as e:
        raise fail(str(e)) from None
    records = {i.instance_id: read_report(cfg.out / "instances" / i.instance_id / "report.json") or {}
               for i in selected}
    _finish({**summary, "out": str(cfg.out)}, records, as_json, table)


@app.command("tbench")
def tbench_cmd(
    tasks_dir: str = typer.Argument(..., help="A task folder or a folder of tasks (2.0 or 1.0 layout); 'mini' for "
                                                 "the bundled samples."),
    agent: str = typer.Option("v4", "--agent", help="v4 (v4agent fix) or oracle (the task's solution)."),
    names: str | None = typer.Option(None, "--tasks", help="Comma-separated task names to run."),
    workers: int = typer.Option(1, "--workers", min=1, help="Tasks in parallel."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default eval-runs/tbench-AGENT)."),
    v4_cmd: str | None = typer.Option(None, "--v4-cmd", help="Command template for the v4 agent (docs/evals.md)."),
    weights: Path | None = typer.Option(None, "--weights", metavar="<dir>", help=WEIGHTS_HELP),
    endpoint: str | None = typer.Option(None, "--endpoint", metavar="<url>", help=ENDPOINT_HELP),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    container: bool = typer.Option(False, "--container", help="Build and use each task's image (docker or podman)."),
    ray: str | None = typer.Option(None, "--ray", help=RAY_HELP),
    as_json: bool = typer.Option(False, "--json", help="JSON lines; the last one is the summary."),
) -> None:
    """Run an agent on Terminal-Bench tasks, graded as Harbor (2.0) and terminal-bench (1.0) grade them."""
    from evals import tbench
    from evals.agents import check_model_options, model_access
    from evals.container import detect_engine
    from evals.proc import EvalError
    from evals.report import read_report, task_table
    from evals.tbench_tasks import load_tasks

    root = DATA / "tbench" if tasks_dir == MINI else Path(tasks_dir).resolve()
    try:
        if agent not in ("v4", "oracle"):
            raise EvalError(f"unknown agent {agent!r} (v4, oracle)")
        check_model_options(agent, v4_cmd or tbench.TB_FIX_CMD, weights=weights, endpoint=endpoint, model=model,
                            ray=ray)
        selected = load_tasks(root, names.split(",") if names else None)
        engine = detect_engine() if container else None
        if container and engine is None:
            raise EvalError("--container: neither docker nor podman answers on this machine")
        cfg = tbench.TbenchConfig(out=(out or Path("eval-runs") / f"tbench-{agent}").resolve(), agent=agent,
                                  engine=engine, workers=workers, v4_cmd=v4_cmd, ray=ray)
        _announce(weights, cfg.out)
        with model_access(weights=_weights(weights), endpoint=endpoint, model=model, log=cfg.out / "server.log",
                          max_running=workers) as access:
            cfg.access = access
            bar, done = _progress("tasks", len(selected), as_json)
            with bar:
                summary = tbench.run_tasks(selected, cfg, lambda task, record: done(task.name, record))
    except EvalError as e:
        raise fail(str(e)) from None
    records = {t.name: read_report(cfg.out / "tasks" / t.name / "result.json") or {} for t in selected}
    # Harbor's metric, the number to publish: on the table's summary lines too
    shown = {} if as_json else {f"metrics.{k}": round(v, 4) for k, v in summary["metrics"].items()}
    _finish({**summary, **shown, "out": str(cfg.out)}, records, as_json, task_table)
