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
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evals.instances import Instance
from evals.proc import EvalError, git, run

DEFAULT_FIX_CMD = "v4agent fix --repo {repo} --issue-file {issue_file} --patch-out {patch_out} --json"
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


def fix_argv(template: str, **fields: object) -> list[str]:
    """The v4 agent's command line: `template` split like a shell would, placeholders filled;
    a leading `v4agent` is the one installed beside this interpreter, whatever PATH says."""
    argv = [part.format(**fields) for part in shlex.split(template)]
    if argv[0] == "v4agent":
        argv[0] = str(Path(sys.executable).with_name("v4agent"))
    return argv


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {}


class V4Agent:
    """`v4agent fix` in a subprocess, with a wall-clock limit."""

    needs_worktree = True

    def __init__(self, command: str | None = None, timeout: float = 3600.0, name: str = "v4agent") -> None:
        self.command = command or os.environ.get("V4AGENT_FIX_CMD") or DEFAULT_FIX_CMD
        self.timeout, self.name = timeout, name

    def solve(self, instance: Instance, worktree: Path | None, logs: Path) -> Outcome:
        assert worktree is not None
        issue, patch_out = logs / "problem_statement.md", logs / "agent.patch"
        issue.write_text(instance.problem_statement)
        patch_out.unlink(missing_ok=True)
        argv = fix_argv(self.command, repo=worktree, issue_file=issue, patch_out=patch_out,
                        instance_id=instance.instance_id)
        done = run(argv, cwd=worktree, timeout=self.timeout, log=logs / "agent.log")
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
               timeout: float = 3600.0) -> Agent:
    if predictions is not None:
        return PredictionsAgent(predictions)
    if kind == "v4":
        return V4Agent(v4_cmd, timeout)
    agents: dict[str, type] = {"oracle": OracleAgent, "empty": EmptyAgent}
    if kind not in agents:
        raise EvalError(f"unknown agent {kind!r} (v4, oracle, empty)")
    return agents[kind]()
