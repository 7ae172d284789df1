"""git over HTTPS with the token, from v4agent's own process only.

The token reaches git as one HTTP header, through git's environment-scoped configuration
(`GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`) of each git process v4agent itself
runs here, scoped to the remote's URL: it is never on a command line (other processes can read
those), in a file (a work tree's or a repository's config, a credential store) or in the
environment of anything the model runs. Those git processes get none of the caller's `GIT_*`
variables (`GIT_TRACE_CURL` would log the header) and no secret-looking variable, no credential
helper, no prompt and no hook.

Only branches named `v4agent/...` are pushed, and never by force.
"""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

from agent.ci import BRANCH_PREFIX
from agent.trajectory import SECRET_NAME_PARTS, redact_text


class RemoteError(Exception):
    """A fetch or push failed; git's message, without the token."""


class Remote:
    """The repository at `url` (https://host/owner/name.git), reached with `token`, from the local
    repository `top` (its objects receive what is fetched)."""

    def __init__(self, top: Path, url: str, token: str) -> None:
        self.top, self.url, self._token = top, url, token

    def heads(self, *branches: str) -> dict[str, str]:
        """The commits of those of `branches` the remote has."""
        listed = self._git("ls-remote", "--heads", self.url, *(f"refs/heads/{b}" for b in branches))
        found = dict(line.split("\t")[::-1] for line in listed.splitlines() if "\t" in line)
        return {b: found[f"refs/heads/{b}"] for b in branches if f"refs/heads/{b}" in found}

    def fetch(self, branch: str) -> str:
        """Fetch `branch` into the local repository's objects; its commit."""
        self._git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", self.url,
                  f"+refs/heads/{branch}:refs/v4agent/fetched")
        return self._git("rev-parse", "--verify", "refs/v4agent/fetched^{commit}").strip()

    def push(self, commit: str, branch: str) -> None:
        """Make `branch` (v4agent's) point at `commit`: a new branch, or a fast-forward."""
        if not branch.startswith(BRANCH_PREFIX):
            raise RemoteError(f"v4agent pushes only its own branches ({BRANCH_PREFIX}...), not {branch!r}")
        self._git("push", "--quiet", "--no-verify", "--no-follow-tags", self.url, f"{commit}:refs/heads/{branch}")

    def _git(self, *args: str) -> str:
        header = "Authorization: Basic " + base64.b64encode(f"x-access-token:{self._token}".encode()).decode()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("GIT_") and not any(part in k.upper() for part in SECRET_NAME_PARTS)}
        scoped = f"http.{self.url}.extraHeader"
        # The empty value first drops any header a checkout saved for this host (actions/checkout's
        # persist-credentials), so the server does not get two Authorization headers.
        config = [(scoped, ""), (scoped, header), ("credential.helper", ""), ("core.hooksPath", os.devnull)]
        env.update({"GIT_CONFIG_COUNT": str(len(config)), "GIT_TERMINAL_PROMPT": "0"})
        for n, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{n}"], env[f"GIT_CONFIG_VALUE_{n}"] = key, value
        try:
            done = subprocess.run(["git", *args], cwd=self.top, env=env, capture_output=True, text=True,
                                  errors="replace", timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RemoteError(f"git {args[0]} {self.url}: {e}") from None
        if done.returncode:
            said = (done.stderr.strip() or done.stdout.strip())
            raise RemoteError(redact_text(f"git {args[0]} {self.url} failed: {said}",
                                          [self._token, header.split()[-1]]))
        return done.stdout
