"""The GitHub REST calls v4agent makes, through githubkit (its request and response models are
generated from GitHub's OpenAPI description): an issue, a pull request, the open pull request
of a branch, opening one, posting and editing a comment. Nothing else.

Every failure is a `GitHubError` whose message says what was asked and what GitHub answered;
the token never appears in one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.ci.events import Head
from agent.ci.remote import Remote
from agent.trajectory import redact_text

if TYPE_CHECKING:
    from githubkit_schemas.latest.models import PullRequest, PullRequestSimple


class GitHubError(Exception):
    """A GitHub REST call failed; the message names the call and GitHub's answer."""


@dataclass(frozen=True)
class Pull:
    """A pull request: its number, page, head (with the commit), base branch and text."""

    number: int
    url: str
    head: Head
    sha: str
    base: str
    title: str
    body: str


@dataclass(frozen=True)
class Connection:
    """Where GitHub is and the token for it: GITHUB_TOKEN (else GH_TOKEN), GITHUB_SERVER_URL
    (https://github.com), GITHUB_API_URL (https://api.github.com), as Actions sets them."""

    token: str
    server: str
    api: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Connection:
        token = environ.get("GITHUB_TOKEN") or environ.get("GH_TOKEN")
        if not token:
            raise GitHubError("no GitHub token: set GITHUB_TOKEN (in Actions: ${{ github.token }}) or GH_TOKEN "
                              "(e.g. GH_TOKEN=$(gh auth token))")
        return cls(token, environ.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/"),
                   environ.get("GITHUB_API_URL", "https://api.github.com").rstrip("/"))

    def repository(self, full_name: str) -> Repository:
        return Repository(full_name, self.token, self.api)

    def remote(self, top: Path, full_name: str) -> Remote:
        return Remote(top, f"{self.server}/{full_name}.git", self.token)


class Repository:
    """One repository ("owner/name") on the GitHub whose REST API is at `api_url`."""

    def __init__(self, full_name: str, token: str, api_url: str) -> None:
        from githubkit import GitHub

        self.full_name = full_name
        self.owner, _, self.name = full_name.partition("/")
        self._token = token
        self._api_url = api_url
        # No HTTP cache: a run reads what it has just written (the pull request it opened).
        self._github = GitHub(token, base_url=api_url, timeout=30.0, http_cache=False)

    def issue(self, number: int) -> tuple[str, str]:
        """An issue's title and body."""
        with self._call(f"reading issue #{number}"):
            issue = self._github.rest.issues.get(self.owner, self.name, number).parsed_data
        return issue.title, issue.body or ""

    def pull(self, number: int) -> Pull:
        with self._call(f"reading pull request #{number}"):
            return _pull(self._github.rest.pulls.get(self.owner, self.name, number).parsed_data)

    def open_pull_of(self, branch: str) -> Pull | None:
        """The open pull request whose head is `branch` of this repository, if there is one."""
        with self._call(f"looking for the pull request of {branch}"):
            found = self._github.rest.pulls.list(self.owner, self.name, state="open",
                                                 head=f"{self.owner}:{branch}").parsed_data
        return _pull(found[0]) if found else None

    def open_pull(self, title: str, body: str, head: str, base: str, draft: bool) -> Pull:
        with self._call(f"opening a pull request from {head} into {base}"):
            return _pull(self._github.rest.pulls.create(self.owner, self.name, title=title, body=body, head=head,
                                                        base=base, draft=draft).parsed_data)

    def comment(self, number: int, body: str) -> int:
        """Post a comment on an issue or pull request; its id."""
        with self._call(f"commenting on #{number}"):
            return self._github.rest.issues.create_comment(self.owner, self.name, number, body=body).parsed_data.id

    def edit_comment(self, comment: int, body: str) -> None:
        with self._call(f"editing comment {comment}"):
            self._github.rest.issues.update_comment(self.owner, self.name, comment, body=body)

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        from githubkit.exception import GitHubException, RequestFailed
        from pydantic import ValidationError

        try:
            yield
        except RequestFailed as e:
            response = e.response.raw_response
            try:
                said = str(response.json().get("message", response.text))
            except ValueError:
                said = response.text
            raise self._error(f"{what} in {self.full_name}: GitHub answered {response.status_code}: {said[:500]}"
                              ) from None
        except GitHubException as e:
            raise self._error(f"{what} in {self.full_name}: cannot reach {self._api_url}: {e}") from None
        except ValidationError as e:
            raise self._error(f"{what} in {self.full_name}: {self._api_url} answered something that is not "
                              f"GitHub's response: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None

    def _error(self, message: str) -> GitHubError:
        return GitHubError(redact_text(message, [self._token]))


def _pull(pull: PullRequest | PullRequestSimple) -> Pull:
    head = Head(pull.head.repo.full_name if pull.head.repo else None, pull.head.ref)
    return Pull(pull.number, pull.html_url, head, pull.head.sha, pull.base.ref, pull.title, pull.body or "")
