"""GitHub Actions events: which ones ask v4agent for work, from whom, and what they ask.

An event asks when it is
- `issues`: `labeled` with the trigger label, or `opened` with the trigger phrase in the title
  or body;
- `issue_comment` (`created`): the phrase in a comment on an issue, or on v4agent's own pull
  request (to iterate on it);
- `pull_request_review_comment` (`created`) and `pull_request_review` (`submitted`): the phrase
  in a review of v4agent's own pull request.

Everything else is `Ignored`, with the reason: other events and actions, no label or phrase, an
author whose association with the repository is not allowed (default OWNER, MEMBER,
COLLABORATOR), a bot (v4agent's own comments among them), a pull request from a fork or not
v4agent's. A label can only be set by someone with triage access, so for `labeled` the label
is the check (the issue's author may be anyone: the text goes to a sandboxed model that holds
no token). `pull_request_target` is an error: it runs with a write token next to code from
the pull request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent.ci import BRANCH_PREFIX

DEFAULT_ASSOCIATIONS = ("OWNER", "MEMBER", "COLLABORATOR")


class Ignored(Exception):
    """The event asks nothing of v4agent, or not from someone it acts for; the message says why."""


class EventError(Exception):
    """An event v4agent must not run on, or a payload that is not the event's."""


@dataclass(frozen=True)
class Gate:
    """What makes an event a request: the label, the phrase, the allowed author associations."""

    label: str = "v4agent"
    phrase: str = "@v4agent"
    associations: tuple[str, ...] = DEFAULT_ASSOCIATIONS


@dataclass(frozen=True)
class Head:
    """A pull request's head: the repository it lives in ("owner/name"; None when that fork is
    gone) and its branch."""

    repository: str | None
    branch: str


@dataclass(frozen=True)
class Request:
    """What an event asks. number: the issue or pull request it is on (progress goes there);
    pull: whether that is a pull request; title, body: its text; ask: the comment or review that
    asked, the phrase taken out ('' for an issue itself); where: a review comment's file, line and
    diff hunk; actor: who asked; head: the pull request's head when the payload has it."""

    number: int
    pull: bool
    title: str
    body: str
    ask: str
    actor: str
    where: str = ""
    head: Head | None = None


def read_event(name: str, payload: dict[str, Any], gate: Gate, repository: str) -> Request:
    """The request an event of type `name` (GITHUB_EVENT_NAME) makes of v4agent in `repository`
    ("owner/name"); `Ignored` when it makes none, `EventError` when it must not be run on."""
    if name == "pull_request_target":
        raise EventError("pull_request_target runs with a write token beside the pull request's code: v4agent does "
                         "not run on it (use issue_comment, pull_request_review_comment or pull_request_review)")
    try:
        if name == "issues":
            return _issues(payload, gate)
        if name == "issue_comment":
            return _comment(payload, gate)
        if name in ("pull_request_review_comment", "pull_request_review"):
            return _review(name, payload, gate, repository)
    except (KeyError, TypeError, AttributeError) as e:
        raise EventError(f"the {name} payload lacks or mangles {e}") from None
    raise Ignored(f"{name} events do not ask v4agent for anything")


def own_pull(head: Head, repository: str) -> None:
    """`Ignored` unless the pull request is v4agent's own: a branch of this repository (not a
    fork's) named `v4agent/...`."""
    if head.repository != repository:
        raise Ignored(f"the pull request comes from {head.repository or 'a deleted fork'}, not {repository}")
    if not head.branch.startswith(BRANCH_PREFIX):
        raise Ignored(f"the pull request's branch {head.branch!r} is not v4agent's ({BRANCH_PREFIX}...)")


def _issues(payload: dict[str, Any], gate: Gate) -> Request:
    action, issue = payload["action"], payload["issue"]
    if action == "labeled":
        label = (payload.get("label") or {}).get("name", "")
        if label.casefold() != gate.label.casefold():
            raise Ignored(f"the label {label!r} is not the trigger label {gate.label!r}")
        _not_a_bot(payload["sender"])
        actor = payload["sender"]["login"]
    elif action == "opened":
        if _find(gate.phrase, f"{issue['title']}\n{issue.get('body') or ''}") is None:
            raise Ignored(f"the new issue does not mention {gate.phrase}")
        actor = _allowed(issue["user"], issue["author_association"], gate)
    else:
        raise Ignored(f"issues.{action} does not ask v4agent for anything")
    return Request(issue["number"], False, issue["title"], issue.get("body") or "", "", actor)


def _comment(payload: dict[str, Any], gate: Gate) -> Request:
    if payload["action"] != "created":
        raise Ignored(f"issue_comment.{payload['action']} does not ask v4agent for anything")
    issue, comment = payload["issue"], payload["comment"]
    ask = _asked(comment.get("body") or "", gate.phrase)
    actor = _allowed(comment["user"], comment["author_association"], gate)
    return Request(issue["number"], "pull_request" in issue, issue["title"], issue.get("body") or "", ask, actor)


def _review(name: str, payload: dict[str, Any], gate: Gate, repository: str) -> Request:
    expected = "created" if name == "pull_request_review_comment" else "submitted"
    if payload["action"] != expected:
        raise Ignored(f"{name}.{payload['action']} does not ask v4agent for anything")
    pull = payload["pull_request"]
    said = payload["comment"] if name == "pull_request_review_comment" else payload["review"]
    ask = _asked(said.get("body") or "", gate.phrase)
    actor = _allowed(said["user"], said["author_association"], gate)
    head = Head((pull["head"].get("repo") or {}).get("full_name"), pull["head"]["ref"])
    own_pull(head, repository)
    where = ""
    if name == "pull_request_review_comment":
        line = said.get("line") or said.get("original_line")
        where = f"on {said['path']}" + (f", line {line}" if line else "") + f":\n{said.get('diff_hunk') or ''}"
    return Request(pull["number"], True, pull["title"], pull.get("body") or "", ask, actor, where, head)


def _allowed(user: dict[str, Any], association: str, gate: Gate) -> str:
    """The author's login, if v4agent acts for them: no bot, an allowed association."""
    _not_a_bot(user)
    if association.upper() not in {a.upper() for a in gate.associations}:
        raise Ignored(f"{user['login']} is {association}, not one of {', '.join(gate.associations)}")
    return str(user["login"])


def _not_a_bot(user: dict[str, Any]) -> None:
    if user.get("type") == "Bot" or str(user["login"]).endswith("[bot]"):
        raise Ignored(f"{user['login']} is a bot")


def _find(phrase: str, text: str) -> re.Match[str] | None:
    """The phrase as a word of its own (`@v4agent`, not `@v4agent-old` or `x@v4agent`), any case."""
    return re.search(rf"(?<![\w@./-]){re.escape(phrase)}(?![\w-])", text, re.IGNORECASE)


def _asked(text: str, phrase: str) -> str:
    """What a comment asks: its text without the phrase; `Ignored` without the phrase."""
    found = _find(phrase, text)
    if found is None:
        raise Ignored(f"the comment does not mention {phrase}")
    return (text[:found.start()] + text[found.end():]).strip()
