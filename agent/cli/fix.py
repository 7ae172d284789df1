"""`v4agent fix`: run the agent on an issue in a private copy of the repository, then print, save,
apply or commit its patch. `v4agent replay`: play a saved run's model turns again on a fresh copy
and check the tools answer the same.

Register with `app.command("fix")(fix.fix_cmd)` and `app.command("replay")(fix.replay_cmd)`.
Exit codes: 0 with a patch (applied or committed when asked), 1 without one (or when applying or
committing it was refused), 2 for usage and configuration errors.

Whatever the model, a tool or the repository wrote reaches the terminal through `visible` and
never as rich markup; the patch itself goes to stdout as is unless stdout is a terminal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from agent.cli.common import fail, visible

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from agent.backends import Backend
    from agent.ci.github import Connection
    from agent.ci.progress import Tally
    from agent.loop import AgentConfig, RunResult
    from agent.settings import Settings
    from agent.trajectory import Trajectory
    from agent.workspace import LeftOut, Workspace
    from runtime.tokenizer import Tokenizer
    from tools.base import Settings as ToolSettings

BACKEND_OPTIONS = ("weights", "endpoint", "script")
NO_BACKEND = ("no model to talk to: the agent needs real weights (--weights DIR, a DeepSeek-V4 checkpoint "
              "directory) or an OpenAI-compatible endpoint (--endpoint URL --model NAME, key in V4AGENT_API_KEY); "
              "--script FILE plays scripted turns. These can also be set in ~/.config/v4agent/config.toml or "
              "V4AGENT_WEIGHTS / V4AGENT_ENDPOINT / V4AGENT_MODEL.")
SANDBOX_HELP = ("on: every command of the model runs in the sandbox, and none runs without it; "
                "off: unconfined, as you (docs/security.md).")
CONFIG_HELP = "The settings file (default: $V4AGENT_CONFIG, else ~/.config/v4agent/config.toml)."
RESULT_LINES = 8  # lines of a tool result shown live
RESULT_LINE_CHARS = 120


def setting_default(name: str) -> str:
    """A setting's built-in default for --help, with the config key that changes it."""
    from agent.settings import Settings

    value = getattr(Settings, name)
    return f"\\[default: {value}; config: {name}]"  # the backslash: not rich markup


def fix_cmd(
    text: str | None = typer.Argument(None, help="The issue to fix (or --issue-file)."),
    repo: Path = typer.Option(Path("."), "--repo", help="Any directory of the repository's git work tree."),
    issue_file: Path | None = typer.Option(None, "--issue-file", help="Read the issue from this file."),
    think: str | None = typer.Option(None, "--think", metavar="<none|high|max>",
                                     help=f"Thinking mode. {setting_default('think')}"),
    max_turns: int | None = typer.Option(None, "--max-turns", metavar="<int>",
                                         help=f"Stop after this many model turns. {setting_default('max_turns')}"),
    max_turn_tokens: int | None = typer.Option(
        None, "--max-turn-tokens", metavar="<int>",
        help=f"The most one completion may take (lowered to fit the model's context). {setting_default('max_turn_tokens')}"),
    max_total_tokens: int | None = typer.Option(
        None, "--max-total-tokens", metavar="<int>",
        help=f"Stop once all completions together took this many tokens (0: no limit). {setting_default('max_total_tokens')}"),
    context_limit: int | None = typer.Option(
        None, "--context-limit", metavar="<int>",
        help=f"The endpoint's context in tokens (in-process: the model's own). {setting_default('context_limit')}"),
    temperature: float | None = typer.Option(None, "--temperature", metavar="<float>",
                                             help=f"Sampling temperature. {setting_default('temperature')}"),
    apply: bool = typer.Option(False, "--apply", help="Apply the patch to the repository's work tree."),
    branch: str | None = typer.Option(None, "--branch", help="Commit the patch on top of HEAD as this new branch."),
    allow_outside_symlinks: bool = typer.Option(
        False, "--allow-outside-symlinks",
        help="Let --apply and --branch bring in symlinks that point outside the repository (refused otherwise)."),
    pr: bool = typer.Option(
        False, "--pr", help="Commit the patch on a new branch v4agent/..., push it to origin's GitHub repository and "
                            "open a pull request (token: GITHUB_TOKEN or GH_TOKEN; docs/ci.md)."),
    patch_out: Path | None = typer.Option(None, "--patch-out", help="Also write the patch to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the patch."),
    weights: str | None = typer.Option(None, "--weights", metavar="<dir>",
                                       help="A DeepSeek-V4 checkpoint directory, run in-process."),
    device: str | None = typer.Option(None, "--device", metavar="<cpu|cuda|cuda:N>",
                                      help="Where the in-process model runs. \\[default: cuda if there is one, "
                                           "else cpu; config: device]"),
    endpoint: str | None = typer.Option(None, "--endpoint", metavar="<url>",
                                        help="An OpenAI-compatible API base, e.g. http://localhost:8000/v1."),
    model: str | None = typer.Option(None, "--model", help="The model name the endpoint serves."),
    script: str | None = typer.Option(None, "--script", metavar="<file>",
                                      help="A JSON/JSONL file of scripted model turns."),
    sandbox: str | None = typer.Option(None, "--sandbox", metavar="<on|off>",
                                       help=f"{SANDBOX_HELP} {setting_default('sandbox')}"),
    include_secrets: bool = typer.Option(
        False, "--include-secrets",
        help="Also pack files that look like secrets (keys, tokens, .env; left out and listed otherwise)."),
    config_file: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Fix an issue: the agent works in a private copy, you get a patch.

    Into a file or a pipe the patch is written as made; on a terminal, control characters show as escapes (\\x1b).
    """
    from agent.settings import SettingsError, load_settings
    from agent.workspace import WorkspaceError, check_new_branch, toplevel

    # Everything the command line and the settings can get wrong is checked first: before the
    # sandbox, the tokenizer or the model, so a mistake costs no wait.
    if sum((apply, branch is not None, patch_out is not None)) > 1:
        raise fail("--apply, --branch and --patch-out exclude each other")
    if pr and (apply or branch is not None):
        raise fail("--pr commits on a branch of its own: it excludes --apply and --branch")
    if (text is None) == (issue_file is None):
        raise fail("give the issue as TEXT or with --issue-file, not both" if text else
                   "no issue: give it as TEXT or with --issue-file FILE")
    if issue_file is not None:
        try:
            text = issue_file.read_text(encoding="utf-8")
        except OSError as e:
            raise fail(f"cannot read {issue_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise fail(f"cannot read {issue_file}: not UTF-8 text") from None
    assert text is not None
    if not text.strip():
        raise fail("the issue is empty")
    cli = {"think": think, "max_turns": max_turns, "max_turn_tokens": max_turn_tokens,
           "max_total_tokens": max_total_tokens, "context_limit": context_limit, "temperature": temperature,
           "weights": weights, "device": device, "endpoint": endpoint, "model": model, "script": script,
           "sandbox": sandbox}
    try:
        settings = load_settings(cli, config=config_file)
        top = toplevel(repo)
        target = _pull_target(top, text, settings) if pr else None
        if target is not None:
            branch = target.branch
        if branch is not None:
            check_new_branch(top, branch)
    except (SettingsError, WorkspaceError) as e:
        raise fail(str(e)) from None
    if patch_out is not None:
        _check_writable(patch_out)
    settings = choose_backend(settings, cli)
    remote = remote_backend(settings)  # a script is read, an endpoint checked, before anything heavy
    device = checked_device(settings.device) if settings.weights else None  # imports torch: only for weights

    console = make_console()
    check_sandbox(settings, console)
    started = time.perf_counter()
    tokenizer, backend = load_model(settings, remote, device)
    run = run_agent(backend, tokenizer, top, text, agent_config(settings), tool_settings_of(settings), console,
               include_secrets=include_secrets, observer=target.tally if target else None)

    patch = run.saved.patch
    totals = {k: v for k, v in run.result.to_dict().items() if k != "seconds"}  # the loop's; ours covers it all
    # JSON holds text: bytes that are not UTF-8 become \udc80-\udcff (Python's surrogateescape).
    out: dict[str, Any] = {"patch": patch.decode("utf-8", "surrogateescape"), **totals,
                           "seconds": round(time.perf_counter() - started, 3),
                           "trajectory": str(run.dir / "trajectory.jsonl"), "patch_file": str(run.dir / "patch.diff"),
                           "applied": False, "branch": None, "commit": None, "refused": None,
                           "patch_error": run.saved.error, "left_out": _left_out(run.saved.left_out),
                           "work_kept": str(run.saved.kept) if run.saved.kept else None}
    if patch_out is not None:
        try:
            patch_out.write_bytes(patch)
        except OSError as e:
            raise fail(f"cannot write {patch_out}: {e.strerror or e}; the patch is in {run.dir / 'patch.diff'}"
                       ) from None
        out["patch_file"] = str(patch_out)
    if patch and (apply or branch):
        out.update(_deliver(top, patch, run.result.summary, text, apply, branch, allow_outside_symlinks))
    if target is not None:
        out["pull_request"] = None
        if out["commit"]:
            out.update(_open_pull(top, target, out["commit"], text, run.result.summary))
    run.trajectory.write({"type": "patch", "bytes": len(patch),
                          **{k: out[k] for k in ("patch_file", "applied", "branch", "commit", "refused", "patch_error",
                                                 "left_out", "work_kept")}})

    if as_json:
        typer.echo(json.dumps(out))
    else:
        if patch:
            _print_patch(patch)
        _report(console, out, stop_explanation(run.result.stop, run.config, endpoint=bool(settings.endpoint)))
    raise typer.Exit(0 if patch and not out["refused"] else 1)


def replay_cmd(
    trajectory: Path = typer.Argument(..., help="A run's trajectory.jsonl."),
    repo: Path | None = typer.Option(None, "--repo", help="The repository. \\[default: the one recorded]"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    sandbox: str | None = typer.Option(None, "--sandbox", metavar="<on|off>",
                                       help=f"{SANDBOX_HELP} {setting_default('sandbox')}"),
    config_file: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Replay a saved run: its model turns again, on a fresh copy; do the tools answer the same?"""
    from agent.backends.scripted import ScriptedBackend
    from agent.loop import AgentConfig
    from agent.settings import SettingsError, load_settings
    from agent.trajectory import TrajectoryError, read_trajectory
    from agent.workspace import WorkspaceError, toplevel

    try:
        # The sandbox and every limit come from your settings, never from the file: a shared
        # trajectory could say anything. Only the modes the recorded turns answered are its own.
        settings = load_settings({"sandbox": sandbox}, config=config_file)
        records = read_trajectory(trajectory)
        header = records[0]
        recorded = AgentConfig(**header["config"])
        top = toplevel(repo or Path(header["repo"]))
        turns = [r for r in records if r["type"] == "turn"]
        backend = ScriptedBackend([{"completion": t["completion"]} for t in turns], int(header["context_limit"]),
                                  source=str(trajectory))
        issue, base = str(header["issue"]), (str(header["head"]), str(header["base"]))
    except (SettingsError, TrajectoryError, WorkspaceError) as e:
        raise fail(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise fail(f"{trajectory}: the run record lacks or mangles {e}") from None
    config = replace(agent_config(settings), think=recorded.think, effort_profile=recorded.effort_profile)
    console = make_console()
    check_sandbox(settings, console)
    from runtime.tokenizer import load_tokenizer

    run = run_agent(backend, load_tokenizer(), top, issue, config, tool_settings_of(settings), console, recorded=base)

    replayed = [r for r in read_trajectory(run.dir / "trajectory.jsonl") if r["type"] == "turn"]
    roots = (header.get("workdir", ""), str(run.workdir))
    mismatches, compared = _compare(turns, replayed, roots)
    recorded_end = next((r for r in records if r["type"] == "end"), {})
    recorded_patch = trajectory.parent / "patch.diff"
    patch_matches = run.saved.patch == recorded_patch.read_bytes() if recorded_patch.is_file() else None
    out = {"trajectory": str(trajectory), "replay": str(run.dir / "trajectory.jsonl"), "turns": len(turns),
           "results": compared, "matched": compared - len(mismatches), "mismatches": mismatches,
           "stop": {"recorded": recorded_end.get("stop"), "replayed": run.result.stop},
           "patch_matches": patch_matches}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(visible(f"{out['matched']} of {compared} tool results match over {len(turns)} turns; "
                           f"stop {out['stop']['recorded']} -> {out['stop']['replayed']}; patch "
                           f"{ {True: 'matches', False: 'differs', None: 'not recorded'}[out['patch_matches']] }"))
        for m in mismatches:
            typer.echo(visible(f"\nturn {m['turn']}, call {m['call']} ({m['tool']}):\n  recorded: "
                               f"{m['recorded'][:300]!r}\n  replayed: {m['replayed'][:300]!r}"))
    raise typer.Exit(0 if not mismatches else 1)


# ---- one run, shared by fix and replay ----------------------------------------------------

@dataclass
class _Saved:
    """What the run left: the patch; what could not go into it; the agent's copy when it was kept
    because the patch does not hold all of its work; why there is no patch, if there is none."""

    patch: bytes
    left_out: tuple[LeftOut, ...]
    kept: Path | None
    error: str | None


@dataclass
class _Run:
    result: RunResult
    saved: _Saved
    dir: Path
    workdir: Path
    trajectory: Trajectory
    config: AgentConfig  # as run: max_turn_tokens may be lowered to fit the context


def run_agent(backend: Backend, tokenizer: Tokenizer, top: Path, issue: str, config: AgentConfig,
         tool_settings: ToolSettings, console: Console, recorded: tuple[str, str] | None = None,
         include_secrets: bool = False, observer: Callable[[object], None] | None = None) -> _Run:
    """Workspace, pack, loop, patch; the patch is saved whatever ends the run (SIGTERM as Ctrl-C).
    `observer` gets the live events too (a CI job's progress comment)."""
    from rich.text import Text

    from agent.loop import Agent
    from agent.pack import PackError, pack_repository
    from agent.trajectory import Trajectory, new_run_dir
    from agent.workspace import Workspace, WorkspaceError

    config = _fit(config, backend.context_limit, console)
    run_dir = new_run_dir()
    try:
        head, base = recorded or (None, None)
        workspace = Workspace.create(top, run_dir / "work", head=head, base=base)
    except WorkspaceError as e:
        shutil.rmtree(run_dir)  # nothing was recorded: no run to keep (a repository with no commit yet)
        raise fail(str(e)) from None
    trajectory = Trajectory(run_dir / "trajectory.jsonl")
    console.print(Text(visible(f"run {run_dir.name}: trajectory {trajectory.path}"), style="dim"), soft_wrap=True)
    if workspace.left_out:
        console.print(_left_out_note("not copied into the agent's work tree", _left_out(workspace.left_out)),
                      soft_wrap=True)
    view = LiveView(console)
    with _terminate_as_interrupt():
        try:
            listener = view if observer is None else (lambda event: (view(event), observer(event)))
            agent = Agent(backend, tokenizer, workspace.root, config=config, tool_settings=tool_settings,
                          trajectory=trajectory, listener=listener)
            trajectory.write({"type": "run", "version": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "repo": str(workspace.repo), "head": workspace.head, "base": workspace.base,
                              "workdir": str(workspace.root), "left_out": _left_out(workspace.left_out),
                              "issue": issue, "backend": backend.describe(), "context_limit": backend.context_limit,
                              "config": asdict(config), "tool_settings": asdict(tool_settings),
                              "tools": [t.name for t in agent.tools]})
            budget = agent.repository_budget(issue)
            if budget < 1:
                raise fail(f"the model's context ({backend.context_limit:,} tokens) leaves no room for the repository")
            view.start()
            try:
                packed = pack_repository(workspace.root, budget=budget, issue=issue, tokenizer=tokenizer,
                                         progress=view.stage, include_secrets=include_secrets)
            except PackError as e:
                raise fail(str(e)) from None
            finally:
                view.stop()
            if packed.secrets:
                verb = "sent anyway (--include-secrets)" if packed.secrets_included else "left out of the prompt"
                console.print(Text(visible(f"{len(packed.secrets)} files that look like secrets {verb}: " + ", ".join(
                    f"{path} ({why})" for path, why in packed.secrets)), style="yellow"), soft_wrap=True)
            trajectory.write({"type": "pack", "budget": budget, "tokens": packed.total_tokens,
                              **{f"files_{mode}": len(packed.by_mode(mode))
                                 for mode in ("full", "outlined", "dropped")},
                              "secrets": [{"path": path, "reason": why} for path, why in packed.secrets],
                              "secrets_included": packed.secrets_included})
            result = agent.run(issue, packed)
        finally:
            view.stop()
            # Even on a crash or Ctrl-C during setup, the work so far is saved before the copy goes.
            saved = _save(workspace, run_dir, console)
    return _Run(result, saved, run_dir, workspace.root, trajectory, config)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a cancelled CI job, `kill`, a timeout) ends the run as Ctrl-C does: the loop stops
    where it is and the patch is saved."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _save(workspace: Workspace, run_dir: Path, console: Console) -> _Saved:
    """The patch, saved as patch.diff; then the agent's copy is removed — only once all its work is
    in the patch. When something could not go in, or no patch could be made, or saving it was
    interrupted, the copy stays where it is, and that is said."""
    from rich.text import Text

    from agent.workspace import WorkspaceError

    saved = None
    try:
        patch = workspace.patch()
        (run_dir / "patch.diff").write_bytes(patch.diff)
        saved = _Saved(patch.diff, patch.left_out, workspace.root if patch.left_out else None, None)
    except (WorkspaceError, OSError) as e:
        saved = _Saved(b"", (), workspace.root, f"no patch could be made: {e}")
    finally:
        if saved is not None and saved.kept is None:
            workspace.remove()
        else:
            console.print(Text(visible(f"the agent's work tree is kept: {workspace.root}"), style="yellow"),
                          soft_wrap=True)
    return saved


def _left_out(left_out: tuple[LeftOut, ...]) -> list[dict[str, str]]:
    return [{"path": path, "reason": reason} for path, reason in left_out]


def _left_out_note(what: str, left_out: list[dict[str, str]]) -> Text:
    from rich.text import Text

    lines = [f"{what}:"] + [f"  {x['path']} ({x['reason']})" for x in left_out]
    return Text(visible("\n".join(lines)), style="yellow")


def _print_patch(patch: bytes) -> None:
    """The patch on stdout: as made into a file or a pipe, so it stays a valid patch; with control
    characters shown as escapes on a terminal, where they would act instead of showing."""
    if sys.stdout.isatty():
        typer.echo(visible(patch.decode("utf-8", "surrogateescape")), nl=False)
    else:
        typer.echo(patch, nl=False)  # bytes are written as they are


def _deliver(top: Path, patch: bytes, summary: str | None, issue: str, apply: bool, branch: str | None,
             allow_outside_symlinks: bool) -> dict[str, Any]:
    """Apply the patch or commit it on a new branch; what happened, for the output."""
    from agent.workspace import WorkspaceError, apply_patch, commit_branch

    try:
        if apply:
            apply_patch(top, patch, allow_outside_symlinks=allow_outside_symlinks)
            return {"applied": True}
        assert branch is not None
        return {"branch": branch, "commit": commit_branch(top, patch, branch, commit_message(issue, summary),
                                                          allow_outside_symlinks=allow_outside_symlinks)}
    except WorkspaceError as e:
        return {"refused": str(e)}


@dataclass(frozen=True)
class _PullTarget:
    """Where `fix --pr` sends its branch: GitHub, the repository, the new branch, its base; and the
    tally of the run (the commands it ran go into the pull request's description)."""

    connection: Connection
    repository: str
    branch: str
    base: str
    tally: Tally


def _pull_target(top: Path, issue: str, settings: Settings) -> _PullTarget:
    """Checked before the run: a token, origin's repository, a branch to go into, the sandbox on
    (unconfined commands could read the token from v4agent's environment)."""
    from agent.ci.github import Connection, GitHubError
    from agent.ci.progress import Tally
    from agent.ci.pull import TargetError, origin_repository, pull_base, text_branch

    if settings.sandbox == "off":
        raise fail("--pr needs the sandbox: with it off, the model's commands could read the GitHub token")
    try:
        return _PullTarget(Connection.from_env(), origin_repository(top), text_branch(issue), pull_base(top), Tally())
    except (GitHubError, TargetError) as e:
        raise fail(str(e)) from None


def _open_pull(top: Path, target: _PullTarget, commit: str, issue: str, summary: str | None) -> dict[str, Any]:
    """Push the committed branch and open its pull request; its page, or why not."""
    from agent.ci.github import GitHubError
    from agent.ci.pull import first_line, publish
    from agent.ci.remote import RemoteError

    connection = target.connection
    try:
        pull, _ = publish(connection.remote(top, target.repository), connection.repository(target.repository), commit,
                          f"{commit}^", target.branch, target.base, title=f"v4agent: {first_line(issue, 100)}",
                          summary=summary, commands=target.tally.commands)
    except (GitHubError, RemoteError) as e:
        return {"refused": f"{target.branch} is committed here, but no pull request was opened: {e}"}
    return {"pull_request": pull.url}


def commit_message(issue: str, summary: str | None) -> str:
    """`v4agent: <the issue's first line>`, then the model's summary; control characters shown as
    escapes (both are untrusted, and `git log` prints them to a terminal)."""
    title = visible(issue.strip().splitlines()[0][:72])
    return f"v4agent: {title}\n\n{visible(summary)}\n" if summary else f"v4agent: {title}\n"


def _report(console: Console, out: dict[str, Any], why: str | None) -> None:
    from rich.text import Text

    lines = [f"stopped: {out['stop']} after {out['turns']} turns"
             + (f" ({out['error']})" if out["error"] else "") + (f": {why}" if why else ""),
             f"tokens: {out['tokens_in']:,} in ({out['cached_tokens']:,} cached), {out['tokens_out']:,} out; "
             f"context {out['context_tokens']:,} of {out['context_limit']:,}; {out['seconds']:.1f} s",
             f"trajectory: {out['trajectory']}",
             f"patch: {out['patch_file']}" if out["patch"] else out["patch_error"] or "no changes",
             ]
    if out["applied"]:
        lines.append("patch applied to the work tree")
    if out["commit"]:
        lines.append(f"committed {out['commit'][:12]} on new branch {out['branch']}")
    if out.get("pull_request"):
        lines.append(f"pushed {out['branch']}: {out['pull_request']}")
    for line in lines:
        console.print(Text(visible(line)), soft_wrap=True)
    if out["refused"]:
        console.print(Text.assemble(("not delivered: ", "red"), visible(out["refused"])), soft_wrap=True)
    if out["left_out"]:
        console.print(_left_out_note("left out of the patch", out["left_out"]), soft_wrap=True)


def _compare(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]],
             roots: tuple[str, str]) -> tuple[list[dict[str, Any]], int]:
    """Tool results that differ between two runs' turns, and how many results were compared.
    Each run's own work tree path and durations ("0.03s") are masked before comparing."""
    mismatches, compared = [], 0
    for turn, old in enumerate(recorded, 1):
        new_results = replayed[turn - 1]["results"] if turn <= len(replayed) else []
        for index, result in enumerate(old["results"]):
            compared += 1
            other = new_results[index] if index < len(new_results) else None
            before = _mask(result["output"], roots)
            after = _mask(other["output"], roots) if other else "(not run)"
            if other is None or before != after or result["name"] != other["name"]:
                mismatches.append({"turn": turn, "call": index + 1, "tool": result["name"],
                                   "recorded": before, "replayed": after})
    return mismatches, compared


_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:s|ms|sec|seconds)\b")


def _mask(text: str, roots: tuple[str, str]) -> str:
    for root in roots:
        if root:
            text = text.replace(root, "<workdir>")
    return _DURATION.sub("<duration>", text)


# ---- settings to parts ----------------------------------------------------------------------

def agent_config(settings: Settings) -> AgentConfig:
    from agent.loop import AgentConfig

    return AgentConfig(think=settings.think, effort_profile=settings.effort_profile, max_turns=settings.max_turns,
                       max_turn_tokens=settings.max_turn_tokens, max_total_tokens=settings.max_total_tokens)


def tool_settings_of(settings: Settings) -> ToolSettings:
    from tools.base import Settings as ToolSettings

    return ToolSettings(run_timeout_s=settings.run_timeout_s, sandbox=settings.sandbox,
                        sandbox_uid=settings.sandbox_uid,
                        sandbox_paths=tuple(p for p in settings.sandbox_paths.split(":") if p),
                        memory_mb=settings.memory_mb, max_processes=settings.max_processes,
                        max_file_mb=settings.max_file_mb, tmp_mb=settings.tmp_mb, max_disk_mb=settings.max_disk_mb)


def check_sandbox(settings: Settings, console: Console) -> None:
    """Before any work: refuse to start without a working sandbox, unless the user turned it off,
    and then say so loudly."""
    from tools import sandbox

    if settings.sandbox == "off":
        who = "root" if os.geteuid() == 0 else "you"
        console.print(f"[bold red]UNCONFINED:[/bold red] the sandbox is off (--sandbox off or sandbox = \"off\"): "
                      f"the model's commands run as {who}, can read and change everything {who} can, and reach "
                      "the network. See docs/security.md.", highlight=False, soft_wrap=True)
        return
    try:
        sandbox.check(settings.sandbox_uid)
    except sandbox.SandboxUnavailable as e:
        raise fail(str(e)) from None


def _check_writable(path: Path) -> None:
    """--patch-out is checked before the run: a run that ends unable to write it wastes the run."""
    parent = path.parent
    if path.is_dir():
        raise fail(f"--patch-out {path} is a directory")
    if not parent.is_dir():
        raise fail(f"--patch-out {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise fail(f"--patch-out {path}: not writable")


def choose_backend(settings: Settings, cli: dict[str, Any]) -> Settings:
    """`settings` with the backend the command line names, if it names one (it replaces the
    configured ones); usage errors unless there is exactly one, with what it needs."""
    if any(cli[name] for name in BACKEND_OPTIONS):
        settings = replace(settings, **{name: cli[name] for name in BACKEND_OPTIONS})
    chosen = [name for name in BACKEND_OPTIONS if getattr(settings, name)]
    if not chosen:
        raise fail(NO_BACKEND)
    if len(chosen) > 1:
        raise fail(f"one backend at a time: {' and '.join('--' + name for name in chosen)} were both given")
    if settings.endpoint and not settings.model:
        raise fail("--endpoint needs --model NAME, the model the server serves")
    if settings.weights and not Path(settings.weights).is_dir():
        raise fail(f"--weights {settings.weights}: no such directory")
    return settings


def remote_backend(settings: Settings) -> Backend | None:
    """The endpoint's or the script's backend (they need no tokenizer and import nothing heavy);
    None for in-process weights, which `load_model` loads."""
    from agent.backends import BackendError
    from agent.backends.scripted import ScriptedBackend, ScriptError, load_script

    try:
        if settings.endpoint:
            from agent.backends.http import HttpBackend, api_key_from_env

            assert settings.model is not None
            return HttpBackend(settings.endpoint, settings.model, api_key_from_env(),
                               context_limit=settings.context_limit, timeout_s=settings.timeout_s,
                               retries=settings.retries, temperature=settings.temperature, top_p=settings.top_p,
                               reasoning=settings.reasoning_fields)
        if settings.script:
            return ScriptedBackend(load_script(settings.script), settings.context_limit, source=settings.script)
    except (BackendError, ScriptError) as e:
        raise fail(str(e)) from None
    return None


def load_model(settings: Settings, remote: Backend | None, device: str | None) -> tuple[Tokenizer, Backend]:
    """The tokenizer (the checkpoint's own with --weights) and the backend: `remote`, or the
    in-process model loaded onto `device`."""
    from runtime.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(settings.weights)
    except TokenizerError as e:
        raise fail(str(e)) from None
    if remote is not None:
        return tokenizer, remote
    assert settings.weights is not None
    from agent.backends.local import LocalBackend
    from runtime import CheckpointError, ConfigError
    from runtime.session import SamplingParams

    sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
    try:
        return tokenizer, LocalBackend.load(settings.weights, tokenizer, sampling, device)
    except (CheckpointError, ConfigError) as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot read {e.filename or settings.weights}: {e.strerror or e}") from None


def checked_device(wanted: str | None) -> str:
    """The device to run on: `wanted` once torch can use it (settings checked the spelling:
    cpu, cuda, cuda:N), else cuda when there is one, else cpu."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted is None:
        return "cuda" if gpus else "cpu"
    index = int(wanted.partition(":")[2] or 0)
    if wanted.startswith("cuda") and index >= gpus:
        have = (f"{gpus} CUDA device{'s' if gpus > 1 else ''} (cuda:0..cuda:{gpus - 1})" if gpus else
                "no CUDA device" + ("" if torch.version.cuda else " (this torch is built without CUDA)"))
        raise fail(f"device {wanted}: this machine has {have}; use --device cpu, or set device in the config")
    return wanted


def _fit(config: AgentConfig, context_limit: int, console: Console) -> AgentConfig:
    """`config` with max_turn_tokens lowered, when it must be, to the room the context keeps for
    the conversation (a quarter of it, at most conversation_reserve): else the first turn would not
    fit beside the packed repository, and the run would stop before it began."""
    room = min(config.conversation_reserve, context_limit // 4)
    if config.max_turn_tokens <= room:
        return config
    console.print(f"max_turn_tokens {config.max_turn_tokens:,} lowered to {room:,}: the model's context is "
                  f"{context_limit:,} tokens, and a quarter of it is what the conversation has beside the repository",
                  style="yellow", highlight=False, soft_wrap=True)
    return replace(config, max_turn_tokens=room)


def stop_explanation(stop: str, config: AgentConfig, endpoint: bool) -> str | None:
    """Which limit ended the run, and how to change it (None when no limit did)."""
    if stop == "max_turns":
        return f"the turn limit ({config.max_turns}): raise it with --max-turns N (config: max_turns)"
    if stop == "max_tokens":
        return (f"all completions together reached {config.max_total_tokens:,} tokens: raise --max-total-tokens "
                "(0: no limit; config: max_total_tokens)")
    if stop == "context_full":
        more = "; --context-limit if the server takes more" if endpoint else ""
        return (f"the next turn (up to {config.max_turn_tokens:,} tokens, --max-turn-tokens) would not fit in what is "
                f"left of the context: a lower --max-turn-tokens leaves room for more, shorter turns{more}")
    if stop == "repeated_call":
        return f"the model made the same tool calls {config.repeat_limit} turns in a row"
    return None


# ---- the live view ----------------------------------------------------------------------------

def make_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


class LiveView:
    """Shows a run on stderr as it happens: progress bars (packing, prefill; terminals only),
    reasoning dim, the answer, each tool call with the start of its result, tokens per turn.
    Text from the model and the tools goes through `visible` and is never read as markup."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self._tasks: dict[str, Any] = {}
        self._open_line = False  # streamed text not yet ended by a newline

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        """Stop drawing bars and forget them (the next stage starts afresh)."""
        self.progress.stop()
        for task in self._tasks.values():
            self.progress.remove_task(task)
        self._tasks.clear()

    def stage(self, name: str, done: int, total: int) -> None:
        """A progress bar per stage (the packer's "tokenizing", "outlining"; "prefill")."""
        if name not in self._tasks:
            self._tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self._tasks[name], completed=done, total=total)

    def __call__(self, event: object) -> None:
        from rich.text import Text

        from agent.backends import Prefill
        from runtime.dsml import ContentDelta, ReasoningDelta
        from agent.loop import ToolRan, TurnFinished, TurnStarted

        if isinstance(event, ReasoningDelta):
            self._stream(event.text, "dim")
        elif isinstance(event, ContentDelta):
            self._stream(event.text, "")
        elif isinstance(event, Prefill):
            self._prefill(event.done, event.total)
        elif isinstance(event, TurnStarted):
            self._end_line()
            share = event.prompt_tokens / event.context_limit
            self.console.rule(f"turn {event.turn} · context {event.prompt_tokens:,} of {event.context_limit:,} "
                              f"tokens ({share:.1%})", style="dim")
        elif isinstance(event, ToolRan):
            self._end_line()
            self.console.print(Text.assemble((visible(f"→ {event.name}"), "bold"),
                                             visible(f"({_short_arguments(event.arguments)})")))
            self.console.out(visible(_excerpt(event.result.output)), style="" if event.result.ok else "red",
                             highlight=False)
        elif isinstance(event, TurnFinished):
            self._end_line()
            s = event.stats
            self.console.print(Text(f"{s.prompt_tokens:,} tokens in ({s.cached_tokens:,} cached), "
                                    f"{s.output_tokens:,} out, {s.seconds:.1f} s", style="dim"))

    def _prefill(self, done: int, total: int) -> None:
        if done == 0:
            self._end_line()
            self.start()
        self.stage("prefill", done, total)
        if done >= total:
            self.stop()

    def _stream(self, text: str, style: str) -> None:
        self.console.out(visible(text), style=style or None, end="", highlight=False)
        self._open_line = not text.endswith("\n")

    def _end_line(self) -> None:
        if self._open_line:
            self.console.out("")
            self._open_line = False


def _short_arguments(arguments: str) -> str:
    try:
        values = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments[:80]
    if not isinstance(values, dict):
        return arguments[:80]
    shown = []
    for key, value in values.items():
        text = json.dumps(value, ensure_ascii=False)
        shown.append(f"{key}={text[:60] + '…' if len(text) > 60 else text}")
    return ", ".join(shown)


def _excerpt(output: str) -> str:
    lines = output.splitlines()
    shown = [line if len(line) <= RESULT_LINE_CHARS else line[:RESULT_LINE_CHARS] + "…"
             for line in lines[:RESULT_LINES]]
    more = f"\n… {len(lines) - RESULT_LINES} more lines" if len(lines) > RESULT_LINES else ""
    return "  " + "\n  ".join(shown) + more
