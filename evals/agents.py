"""The agents a SWE-bench run can use; each turns an instance and a work tree into a patch.

- `oracle`: the gold patch; `empty`: no patch (the tests must then fail);
- `predictions`: patches read from a predictions file (grading someone else's run);
- `v4`: v4agent itself, run as `v4agent fix --repo W --issue-file F --patch-out P --json` in a
  subprocess. A subprocess and not an in-process call, so a crash, a leak or a hang of the agent
  (torch, CUDA, a remote backend) ends one instance, not the harness, a timeout can kill it
  cleanly, and the harness depends on the agent's command line only, not on its Python API.
  The command is a template (`V4AGENT_FIX_CMD` or `--v4-cmd`; add backend flags such as
  `--endpoint URL --model NAME` or `--weights DIR` there). The patch is the file it writes or,
  if none, the work tree's diff. From its `--json` object we keep `tokens_in`, `tokens_out`,
  `cached_tokens` (prefix-cache hits), `stop`, `turns`, and `trajectory` (its JSONL record).
  Exit status 1 with that object is a run that ended without a patch, not a crash.

The model can also be given to eval itself (`ModelAccess`, `model_access`): `--endpoint URL
--model NAME` is passed on to every fix command, and `--weights DIR` starts one `v4agent serve`
for the whole run (a subprocess: the harness depends on the command line only) that every
worker's fix talks to, instead of each worker loading the weights itself. The server listens on
127.0.0.1 with a key made for the run, which reaches the fix commands in their environment,
never on a command line; it is stopped when the run ends, however it ends.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evals.instances import Instance
from evals.proc import EvalError, git, run

DEFAULT_FIX_CMD = "v4agent fix --repo {repo} --issue-file {issue_file} --patch-out {patch_out} --json"
BACKEND_FLAGS = ("--weights", "--endpoint", "--script")  # fix's options that name its model
SERVER_START_S = 3600.0  # loading real weights from disk takes minutes
# the line `v4agent serve` prints on stderr once the model is loaded
SERVING = re.compile(r"serving (?P<name>.+) on (?P<url>http://\S+/v1) \(context (?P<context>[\d,]+) tokens")
# `fix --json` names -> the names our reports (and ATIF) use
TOKEN_FIELDS = {"tokens_in": "prompt_tokens", "tokens_out": "completion_tokens", "cached_tokens": "cached_tokens"}
DETAIL_FIELDS = ("stop", "turns", "error", "seconds", "context_tokens")


@dataclass
class Outcome:
    """What an agent produced: the patch (None or "": no patch), token counts, and where its
    trajectory (a list of chat messages) was written, if anywhere. `predicted` is false when
    there is no prediction at all (a predictions file without this instance)."""

    patch: str | None
    tokens: dict[str, int] = field(default_factory=dict)
    trajectory: Path | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    predicted: bool = True


class Agent(Protocol):
    name: str  # written as model_name_or_path
    needs_worktree: bool

    def solve(self, instance: Instance, worktree: Path | None, logs: Path) -> Outcome: ...


class OracleAgent:
    name, needs_worktree = "oracle", False

    def solve(self, instance: Instance, worktree: Path | None, logs: Path) -> Outcome:
        return Outcome(instance.patch)


class EmptyAgent:
    name, needs_worktree = "empty", False

    def solve(self, instance: Instance, worktree: Path | None, logs: Path) -> Outcome:
        return Outcome("")


class PredictionsAgent:
    """Patches from a predictions file; an instance without one has no prediction."""

    needs_worktree = False

    def __init__(self, predictions: dict[str, dict[str, Any]]) -> None:
        self.predictions = predictions
        names = {p.get("model_name_or_path") for p in predictions.values()} - {None}
        self.name = names.pop() if len(names) == 1 else "predictions"

    def solve(self, instance: Instance, worktree: Path | None, logs: Path) -> Outcome:
        found = self.predictions.get(instance.instance_id)
        return Outcome(found["model_patch"]) if found else Outcome(None, predicted=False)


def worktree_diff(worktree: Path, base: str) -> str:
    """Everything changed in the work tree since `base`, new files included, as a git diff."""
    git("add", "--all", cwd=worktree)
    return git("diff", "--cached", "--binary", base, cwd=worktree)


def v4agent_command() -> str:
    """The `v4agent` installed beside this interpreter, whatever PATH says."""
    return str(Path(sys.executable).with_name("v4agent"))


def fix_argv(template: str, **fields: object) -> list[str]:
    """The v4 agent's command line: `template` split like a shell would, placeholders filled;
    a leading `v4agent` is the one installed beside this interpreter."""
    argv = [part.format(**fields) for part in shlex.split(template)]
    if argv[0] == "v4agent":
        argv[0] = v4agent_command()
    return argv


def names_backend(argv: Sequence[str]) -> bool:
    """Whether a fix command line chooses its model itself (--weights, --endpoint, --script)."""
    return any(word.split("=", 1)[0] in BACKEND_FLAGS for word in argv)


@dataclass(frozen=True)
class ModelAccess:
    """The model eval was given, as every fix command reaches it: options added to its command
    line and variables to its environment (the API key of eval's own server)."""

    flags: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    context_limit: int | None = None  # the server's context, unless the command sets its own

    def argv(self, argv: list[str]) -> list[str]:
        own_limit = any(word.split("=", 1)[0] == "--context-limit" for word in argv)
        limit = [] if own_limit or self.context_limit is None else ["--context-limit", str(self.context_limit)]
        return [*argv, *self.flags, *limit]


def check_model_options(agent: str, template: str, *, weights: Path | None, endpoint: str | None,
                        model: str | None, ray: str | None, predictions: bool = False) -> None:
    """EvalError (a usage error) unless eval's --weights / --endpoint --model can be used as given."""
    if weights is None and endpoint is None:
        if model is not None:
            raise EvalError("--model names the model of --endpoint URL; give both")
        return
    if weights is not None and endpoint is not None:
        raise EvalError("one model at a time: --weights and --endpoint were both given")
    if agent != "v4" or predictions:
        raise EvalError("--weights and --endpoint give the v4 agent its model; this run does not use it")
    if names_backend(shlex.split(template)):
        raise EvalError(f"the v4 command template already names a model ({template!r}): give it there or to "
                        "eval, not both")
    if endpoint is not None and not model:
        raise EvalError("--endpoint needs --model NAME, the model the server serves")
    if weights is not None and not weights.is_dir():
        raise EvalError(f"--weights {weights}: no such directory")
    if weights is not None and ray not in (None, "local"):
        raise EvalError("--weights serves the model on this machine's 127.0.0.1, which the nodes of a Ray cluster "
                        "cannot reach: start `v4agent serve --host ADDRESS --api-key KEY` where the weights are and "
                        "give eval --endpoint http://ADDRESS:PORT/v1 --model NAME")


@contextmanager
def model_access(*, weights: Path | None, endpoint: str | None, model: str | None, log: Path,
                 max_running: int) -> Iterator[ModelAccess | None]:
    """How the fix commands of a run reach the model eval was given (None: it was given none,
    the command template or the v4agent settings name one). With `weights`, one `v4agent
    serve` runs for as long as this context (`shared_server`)."""
    if weights is not None:
        with shared_server(weights, log, max_running) as access:
            yield access
    else:
        yield ModelAccess(("--endpoint", endpoint, "--model", model)) if endpoint and model else None


def _end_with_parent() -> None:
    """Run in the server's process before it starts: SIGTERM when the process that started it
    dies, however it dies (SIGKILL included), so no server outlives its eval."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def shared_server(weights: Path, log: Path, max_running: int, start_timeout: float = SERVER_START_S,
                  ) -> Iterator[ModelAccess]:
    """`v4agent serve --weights DIR --port 0` for the length of the context: its output appended to
    `log`, its /metrics saved beside it (server-metrics.txt) at the end, and then it is stopped
    (SIGTERM; SIGKILL after 30 s). The key is made here and given to it in its environment."""
    key = secrets.token_urlsafe(32)
    argv = [v4agent_command(), "serve", "--weights", str(weights), "--port", "0", "--max-running", str(max_running)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        offset = sink.tell()
        # Its own session: a Ctrl-C at the terminal reaches eval, which stops the server after the
        # workers have stopped, not before.
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                                   env={**os.environ, "V4AGENT_API_KEY": key}, start_new_session=True,
                                   preexec_fn=_end_with_parent)  # noqa: PLW1509 - before the workers' threads
    try:
        name, url, context = _serving(process, log, offset, start_timeout)
        base = url.removesuffix("/v1")
        _healthy(process, base, key, log, 120.0)
        try:
            yield ModelAccess(("--endpoint", url, "--model", name), {"V4AGENT_API_KEY": key}, context)
        finally:
            try:
                log.with_name("server-metrics.txt").write_bytes(_get(base + "/metrics", key, 30).read())
            except OSError:
                pass  # a server that died: its log says why
    finally:
        _stop(process)


def _serving(process: subprocess.Popen, log: Path, offset: int, timeout: float) -> tuple[str, str, int]:
    """(model name, API base URL, context) from the line the server prints once it is loaded."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        for line in text.splitlines():
            found = SERVING.match(line)
            if found:
                return found["name"], found["url"], int(found["context"].replace(",", ""))
        if process.poll() is not None:
            raise EvalError(f"`v4agent serve --weights` exited with status {process.returncode} before serving "
                            f"(log: {log}):\n{text[-2000:]}")
        if time.monotonic() > deadline:
            raise EvalError(f"`v4agent serve --weights` was not serving after {timeout:g} s (log: {log})")
        time.sleep(0.1)


def _get(url: str, key: str, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    return urllib.request.urlopen(request, timeout=timeout)


def _healthy(process: subprocess.Popen, base: str, key: str, log: Path, timeout: float) -> None:
    """Wait until /health answers (the line is printed just before the server takes requests:
    `timeout` is short)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _get(base + "/health", key, 10) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not accepting yet (HTTPError, a URLError, is one too)
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise EvalError(f"`v4agent serve` at {base} did not become healthy (log: {log})")
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it finishes or closes its connections and exits);
    SIGKILL if it has not ended 30 s later."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {}


def template(command: str | None) -> str:
    """The v4 agent's command template: `command`, else $V4AGENT_FIX_CMD, else the default."""
    return command or os.environ.get("V4AGENT_FIX_CMD") or DEFAULT_FIX_CMD


class V4Agent:
    """`v4agent fix` in a subprocess, with a wall-clock limit; `access`: the model eval gave it."""

    needs_worktree = True

    def __init__(self, command: str | None = None, timeout: float = 3600.0, name: str = "v4agent",
                 access: ModelAccess | None = None) -> None:
        self.command = template(command)
        self.timeout, self.name, self.access = timeout, name, access

    def solve(self, instance: Instance, worktree: Path | None, logs: Path) -> Outcome:
        assert worktree is not None
        issue, patch_out = logs / "problem_statement.md", logs / "agent.patch"
        issue.write_text(instance.problem_statement)
        patch_out.unlink(missing_ok=True)
        argv = fix_argv(self.command, repo=worktree, issue_file=issue, patch_out=patch_out,
                        instance_id=instance.instance_id)
        env = None
        if self.access is not None:
            argv, env = self.access.argv(argv), {**os.environ, **self.access.env}
        done = run(argv, cwd=worktree, env=env, timeout=self.timeout, log=logs / "agent.log")
        if done.timed_out:
            raise EvalError(f"the agent ran past {self.timeout:g} s and was killed")
        result = last_json_line(done.output)
        if done.code != 0 and not result:
            raise EvalError(f"the agent exited with status {done.code}:\n{done.output[-2000:]}")
        return outcome_of(result, patch_out if patch_out.is_file() else None, worktree, instance.base_commit)


def outcome_of(result: dict[str, Any], patch_file: Path | None, worktree: Path, base: str) -> Outcome:
    """An Outcome from `fix --json`'s object: the patch file, else the work tree's diff."""
    # a patch need not be UTF-8 (an edited Latin-1 file): its bytes are kept as surrogates, and
    # written back the same way for grading
    patch = patch_file.read_bytes().decode("utf-8", "surrogateescape") if patch_file else worktree_diff(worktree, base)
    tokens = {ours: int(result[theirs]) for theirs, ours in TOKEN_FIELDS.items() if isinstance(result.get(theirs), int)}
    trajectory = Path(result["trajectory"]) if isinstance(result.get("trajectory"), str) else None
    return Outcome(patch, tokens, trajectory if trajectory and trajectory.is_file() else None,
                   {k: result[k] for k in DETAIL_FIELDS if k in result})


def make_agent(kind: str, *, predictions: dict[str, dict[str, Any]] | None = None, v4_cmd: str | None = None,
               timeout: float = 3600.0, access: ModelAccess | None = None) -> Agent:
    if predictions is not None:
        return PredictionsAgent(predictions)
    if kind == "v4":
        return V4Agent(v4_cmd, timeout, access=access)
    agents: dict[str, type] = {"oracle": OracleAgent, "empty": EmptyAgent}
    if kind not in agents:
        raise EvalError(f"unknown agent {kind!r} (v4, oracle, empty)")
    return agents[kind]()
