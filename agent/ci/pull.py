"""Branch names and pull request text made from untrusted text, and publishing a commit as a pull
request.

Issue text, the model's summary, file names and commands are all untrusted: a branch name keeps
only lowercase ASCII letters, digits and dashes; a title is one line with control characters
shown as escapes; everything else goes into fenced blocks of plain text, so no markdown, HTML,
mention, link or closing keyword in it acts.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from agent.ci import BRANCH_PREFIX
from agent.ci.github import Pull, Repository
from agent.ci.remote import Remote
from agent.cli.common import visible
from agent.workspace import git

SHOWN_COMMANDS = 10  # the last commands a pull request or comment lists


def issue_branch(number: int) -> str:
    return f"{BRANCH_PREFIX}issue-{number}"


def text_branch(text: str) -> str:
    """`v4agent/<words of the issue's first line>-<6 hex digits>`."""
    slug = "-".join(re.findall(r"[a-z0-9]+", first_line(text, 200).lower()))[:40].strip("-") or "fix"
    return f"{BRANCH_PREFIX}{slug}-{secrets.token_hex(3)}"


def first_line(text: str, limit: int) -> str:
    """The first line of `text` that is not blank, control characters shown as escapes, at most
    `limit` characters."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = visible(line)
    return line if len(line) <= limit else line[:limit - 1] + "…"


def fenced(text: str) -> str:
    """`text` as a fenced block of plain text, with a fence longer than any run of backticks in
    it (so nothing in it can close the block), control characters shown as escapes."""
    text = visible(text)
    fence = "`" * max(3, max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence}text\n{text}\n{fence}"


def commands_block(commands: list[tuple[str, str]]) -> str:
    """The last commands run, `$ command` then how it ended, fenced."""
    shown = commands[-SHOWN_COMMANDS:]
    more = f"({len(commands) - len(shown)} earlier commands not shown)\n" if len(commands) > len(shown) else ""
    return fenced(more + "\n".join(f"$ {command}\n  {ended}" for command, ended in shown))


def files_changed(top: Path, parent: str, commit: str) -> list[str]:
    """`M path`, `A path`, `D path` lines of what `commit` changes."""
    fields = git(top, "diff-tree", "-r", "--name-status", "--no-renames", "-z", parent, commit).split("\0")
    return [f"{status} {path}" for status, path in zip(fields[0:-1:2], fields[1::2], strict=True)]


def pull_body(issue: int | None, summary: str | None, files: list[str], commands: list[tuple[str, str]],
              link: str | None) -> str:
    """The pull request's description: the issue it fixes, the agent's summary, the files, the
    commands it ran and how they ended, and where the run is."""
    parts = [f"Fixes #{issue}." if issue is not None else "",
             "### What the agent says\n\n" + fenced(summary or "(no summary)"),
             "### Files changed\n\n" + fenced("\n".join(files)),
             "### Commands it ran\n\n" + (commands_block(commands) if commands else "none"),
             f"Made by v4agent ([the run]({link}), its trajectory attached there)." if link else "Made by v4agent."]
    return "\n\n".join(part for part in parts if part)


def publish(remote: Remote, repository: Repository, commit: str, parent: str, branch: str, base: str, *, title: str,
            summary: str | None, commands: list[tuple[str, str]], issue: int | None = None, link: str | None = None,
            draft: bool = False) -> tuple[Pull, bool]:
    """Push `commit` (on top of `parent`) as v4agent's `branch`, then its open pull request (the
    push updated it) or a new one into `base`, described by `pull_body`; and whether it is new."""
    body = pull_body(issue, summary, files_changed(remote.top, parent, commit), commands, link)
    remote.push(commit, branch)
    pull = repository.open_pull_of(branch)
    if pull is not None:
        return pull, False
    return repository.open_pull(title, body, branch, base, draft), True


class TargetError(ValueError):
    """The local checkout does not say where a pull request goes."""


def origin_repository(top: Path) -> str:
    """"owner/name" of the repository `origin` points to (https://host/owner/name(.git),
    git@host:owner/name(.git), ssh://...)."""
    from agent.workspace import WorkspaceError

    try:
        url = git(top, "remote", "get-url", "origin").strip()
    except WorkspaceError:
        raise TargetError(f"{top} has no remote 'origin': the pull request's repository comes from it") from None
    found = re.search(r"[:/]([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?/?$", url)
    if found is None:
        raise TargetError(f"origin ({url}) does not name a GitHub repository (owner/name)")
    return f"{found.group(1)}/{found.group(2)}"


def pull_base(top: Path) -> str:
    """The branch a pull request from HEAD goes into: the one HEAD's branch tracks on origin, or
    else the branch of HEAD's name."""
    from agent.workspace import WorkspaceError

    try:
        branch = git(top, "symbolic-ref", "--quiet", "--short", "HEAD").strip()
    except WorkspaceError:
        raise TargetError("HEAD is detached: check out the branch the pull request should go into") from None
    try:
        upstream = git(top, "rev-parse", "--abbrev-ref", f"{branch}@{{upstream}}").strip()
    except WorkspaceError:
        return branch
    return upstream.removeprefix("origin/") if upstream.startswith("origin/") else branch
