"""`v4agent ci github`: the CI job that turns an issue into a pull request (docs/ci.md). Register
with `app.add_typer(ci.app, name="ci")`.

In a GitHub Actions job it reads the event (GITHUB_EVENT_NAME, GITHUB_EVENT_PATH), decides
whether it asks for work and from whom (agent/ci/events.py; anything else is ignored with one
log line, exit 0), posts one progress comment, runs the agent as `fix` does on the pull request's
branch or else the base branch, fetched from GitHub, then pushes the fix to `v4agent/issue-N` (or
the pull request's own branch) and opens the pull request, or updates the one there is.

Exit codes: 0 with the pull request opened or updated, or the event ignored; 1 without a patch
(the comment says why) or when publishing it failed; 2 for usage and configuration errors,
`pull_request_target` among them.

The token stays in this process: the model's commands run sandboxed with a scrubbed environment
(`ci` refuses `sandbox = "off"`), git gets it through agent/ci/remote.py only, and trajectories
are redacted as written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from agent.cli import fix
from agent.cli.common import fail, visible

if TYPE_CHECKING:
    from rich.console import Console

    from agent.backends import Backend
    from agent.ci.events import Request
    from agent.ci.github import Connection, Pull
    from agent.ci.progress import Progress
    from agent.settings import Settings
    from runtime.tokenizer import Tokenizer

app = typer.Typer(help="CI jobs that turn issues into pull requests (docs/ci.md).", no_args_is_help=True)


@app.command("github")
def github_cmd(
    repo: Path | None = typer.Option(None, "--repo", help="The repository's checkout. \\[default: "
                                                            "$GITHUB_WORKSPACE, else the current directory]"),
    label: str = typer.Option("v4agent", "--label", help="Labeling an issue with this asks for a fix."),
    phrase: str = typer.Option("@v4agent", "--phrase",
                               help="A new issue, a comment or a review of v4agent's pull request with this asks."),
    allow: str = typer.Option("OWNER,MEMBER,COLLABORATOR", "--allow", metavar="<list>",
                              help="The author associations v4agent acts for, comma-separated."),
    base: str | None = typer.Option(None, "--base", help="The branch pull requests go into. \\[default: the "
                                                         "repository's default branch]"),
    draft: bool = typer.Option(False, "--draft", help="Open pull requests as drafts."),
    think: str | None = typer.Option(None, "--think", metavar="<none|high|max>",
                                     help=f"Thinking mode. {fix.setting_default('think')}"),
    max_turns: int | None = typer.Option(None, "--max-turns", metavar="<int>",
                                         help=f"Stop after this many model turns. {fix.setting_default('max_turns')}"),
    weights: str | None = typer.Option(None, "--weights", metavar="<dir>",
                                       help="A DeepSeek-V4 checkpoint directory, run in-process (a GPU runner)."),
    device: str | None = typer.Option(None, "--device", metavar="<cpu|cuda|cuda:N>",
                                      help="Where the in-process model runs."),
    endpoint: str | None = typer.Option(None, "--endpoint", metavar="<url>",
                                        help="An OpenAI-compatible API base (key in V4AGENT_API_KEY)."),
    model: str | None = typer.Option(None, "--model", help="The model name the endpoint serves."),
    script: str | None = typer.Option(None, "--script", metavar="<file>",
                                      help="A JSON/JSONL file of scripted model turns (tests, demos)."),
    config_file: Path | None = typer.Option(None, "--config", help=fix.CONFIG_HELP),
) -> None:
    """Handle the GitHub Actions event this job runs for: fix the issue, open or update its pull request."""
    from agent.ci.events import EventError, Gate, Ignored, read_event
    from agent.ci.github import Connection, GitHubError
    from agent.settings import SettingsError, load_settings
    from agent.workspace import WorkspaceError, toplevel

    associations = tuple(a.strip().upper() for a in allow.split(",") if a.strip())
    if not (label.strip() and phrase.strip() and associations):
        raise fail("--label, --phrase and --allow must not be empty")
    name, path, full_name = (os.environ.get(v, "") for v in ("GITHUB_EVENT_NAME", "GITHUB_EVENT_PATH",
                                                               "GITHUB_REPOSITORY"))
    if not (name and path and full_name):
        raise fail("not a GitHub Actions job: GITHUB_EVENT_NAME, GITHUB_EVENT_PATH and GITHUB_REPOSITORY must be set "
                   "(docs/ci.md)")
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise fail(f"cannot read the event {path}: {e}") from None
    try:
        request = read_event(name, payload if isinstance(payload, dict) else {}, Gate(label, phrase, associations),
                             full_name)
    except Ignored as e:
        raise _ignored(name, e) from None
    except EventError as e:
        raise fail(str(e)) from None

    cli = {"think": think, "max_turns": max_turns, "weights": weights, "device": device, "endpoint": endpoint,
           "model": model, "script": script}
    try:
        settings = load_settings(cli, config=config_file)
        top = toplevel(repo or Path(os.environ.get("GITHUB_WORKSPACE") or "."))
        connection = Connection.from_env()
    except (SettingsError, WorkspaceError, GitHubError) as e:
        raise fail(str(e)) from None
    if settings.sandbox == "off":
        raise fail("ci needs the sandbox: with it off, the model's commands could read the GitHub token")
    settings = fix.choose_backend(settings, cli)
    remote_backend = fix.remote_backend(settings)
    device = fix.checked_device(settings.device) if settings.weights else None
    console = fix.make_console()
    fix.check_sandbox(settings, console)

    base = base or (payload.get("repository") or {}).get("default_branch")
    if not base:
        raise fail("the event names no default branch: give --base BRANCH")
    job = _Job(connection, full_name, top, request, base, draft)
    try:
        job.prepare()
    except Ignored as e:
        raise _ignored(name, e) from None
    tokenizer, backend = fix.load_model(settings, remote_backend, device)
    raise typer.Exit(job.run(backend, tokenizer, settings, console))


class _Job:
    """One request, from the progress comment to the pull request."""

    def __init__(self, connection: Connection, full_name: str, top: Path, request: Request, base: str,
                 draft: bool) -> None:
        self.repository = connection.repository(full_name)
        self.remote = connection.remote(top, full_name)
        self.full_name, self.top = full_name, top
        self.request, self.base, self.draft = request, base, draft
        self.pull: Pull | None = None
        self.link = (f"{connection.server}/{full_name}/actions/runs/{os.environ['GITHUB_RUN_ID']}"
                     if os.environ.get("GITHUB_RUN_ID") else None)

    def prepare(self) -> None:
        """Before any comment: a request on a pull request is one on v4agent's own (`Ignored` else)."""
        from agent.ci.events import own_pull
        from agent.ci.github import GitHubError

        if self.request.pull:
            try:
                self.pull = self.repository.pull(self.request.number)
            except GitHubError as e:
                raise fail(str(e)) from None
            own_pull(self.pull.head, self.full_name)

    def run(self, backend: Backend, tokenizer: Tokenizer, settings: Settings, console: Console) -> int:
        """The exit code: 0 with a pull request, 1 without."""
        from agent.ci.github import GitHubError
        from agent.ci.progress import Progress
        from agent.ci.pull import fenced
        from agent.ci.remote import RemoteError
        from agent.workspace import WorkspaceError

        try:
            progress = Progress(self.repository, self.request.number, self.link)
        except GitHubError as e:
            typer.echo(visible(f"error: {e}"), err=True)
            return 1
        try:
            return self._work(progress, backend, tokenizer, settings, console)
        except (GitHubError, RemoteError, WorkspaceError) as e:
            typer.echo(visible(f"error: {e}"), err=True)
            progress.finish("failed", fenced(str(e)))
            return 1
        except BaseException:
            progress.finish("failed", "The job stopped before the end: its log says why.")
            raise

    def _work(self, progress: Progress, backend: Backend, tokenizer: Tokenizer, settings: Settings,
              console: Console) -> int:
        from agent.ci.pull import first_line, issue_branch, publish
        from agent.ci.remote import RemoteError
        from agent.workspace import commit_patch, git

        issue, text = self._task()
        branch = self.pull.head.branch if self.pull else issue_branch(self.request.number)
        heads = self.remote.heads(branch, self.base)
        if branch not in heads and self.base not in heads:
            raise RemoteError(f"the base branch {self.base!r} is not in {self.full_name}")
        start = self.remote.fetch(branch if branch in heads else self.base)
        tree = git(self.top, "rev-parse", f"{start}^{{tree}}").strip()
        run = fix.run_agent(backend, tokenizer, self.top, text, fix.agent_config(settings), fix.tool_settings_of(settings),
                       console, recorded=(start, tree), observer=progress)
        _output("run-dir", str(run.dir))
        result = run.result
        if not run.saved.patch:
            why = fix.stop_explanation(result.stop, run.config, endpoint=bool(settings.endpoint))
            progress.no_patch(f"stopped: {result.stop} after {result.turns} turns"
                              + (f" ({result.error})" if result.error else "") + (f": {why}" if why else "")
                              + f"\n{run.saved.error or 'the agent changed nothing'}")
            return 1
        subject = self.request.ask if self.request.pull else self.request.title  # a review asks for one more step
        commit = commit_patch(self.top, run.saved.patch, fix.commit_message(subject or text, result.summary),
                              parent=start)
        title = f"v4agent: {first_line(self.request.title, 100)}"
        pull, new = publish(self.remote, self.repository, commit, start, branch, self.base, title=title,
                            summary=result.summary, commands=progress.tally.commands, issue=issue, link=self.link,
                            draft=self.draft)
        _output("pull-request", pull.url)
        progress.finish(f"{'opened' if new else 'pushed to'} #{pull.number}",
                        f"{'Opened' if new else 'Pushed a new commit to'} {pull.url}: "
                        f"{first_line(result.summary or '', 200) or 'no summary'}.")
        typer.echo(visible(f"{'opened' if new else 'updated'} {pull.url}"), err=True)
        return 0

    def _task(self) -> tuple[int | None, str]:
        """The issue the work is for (None when unknown) and the task as the model reads it."""
        from agent.ci import BRANCH_PREFIX

        r = self.request
        if not r.pull:
            asked = f"\n\nA comment by {r.actor} asks:\n{r.ask}" if r.ask else ""
            return r.number, f"{r.title}\n\n{r.body}{asked}"
        assert self.pull is not None
        issue, original = None, ""
        suffix = self.pull.head.branch.removeprefix(BRANCH_PREFIX + "issue-")
        if suffix.isdigit():
            issue = int(suffix)
            title, body = self.repository.issue(issue)
            original = f"The issue (#{issue}): {title}\n\n{body}\n\n"
        where = f"\n\nIt is a review comment {r.where}" if r.where else ""
        return issue, (f"{original}Your pull request #{r.number} for it is checked out: {r.title}\n\n{r.body}\n\n"
                       f"{r.actor} asks for more:\n{r.ask}{where}")


def _ignored(event: str, why: Exception) -> typer.Exit:
    """One log line saying why the event was ignored; the exit (0: nothing went wrong)."""
    typer.echo(visible(f"v4agent: ignored {event}: {why}"), err=True)
    return typer.Exit(0)


def _output(name: str, value: str) -> None:
    """A step output for the workflow (GITHUB_OUTPUT), when there is one."""
    if path := os.environ.get("GITHUB_OUTPUT"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{name}={value}\n")
