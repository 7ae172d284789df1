"""Running Terminal-Bench tasks as Harbor runs them: set up the environment, let the agent work,
run the verifier, read the reward.

Grading is Harbor's (0.26: harbor.verifier.verifier, harbor.models.trial, harbor.metrics):
reward.json first, else reward.txt; no file, an empty one, a value that is not a finite number
(`inf`, `"1"`) are errors, not scores; a verifier past its timeout is an error whatever it
wrote; a trial's rewards are kept as the verifier wrote them, and the run's number is Harbor's
Mean metric over the trials with a valid reward (`metrics` in the summary). Terminal-Bench 1.0
tasks are graded as terminal-bench 0.2 grades them (its pytest parser: the short test summary).

Two environments with one interface: `SandboxEnv` (tasks whose environment the host can
provide: evals.tbench_tasks.host_refusal says which; the others are refused before anything
runs) runs every step of the task in the hardened sandbox (tools.sandbox, as the agent's `run`
tool: unprivileged, no network) with the task's folders bound at the paths it expects;
`ContainerEnv` is the task's own image under Docker or podman. Either way the agent's phase sees
neither the task's solution nor its tests, and /logs/verifier is made empty just before the
verifier runs, so only the verifier writes the reward. Per trial, under OUT/tasks/<task>/:
result.json, agent.log, verifier.log, trajectory.json (ATIF) and the task's /app and /logs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from glob import glob
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from agent.pack_cache import cache_root
from evals import atif
from evals.agents import TOKEN_FIELDS, ModelAccess, fix_argv, last_json_line, names_backend
from evals.container import Engine
from evals.proc import EvalError, Finished, git, run
from evals.ray_runner import run_on_ray
from evals.report import finished, read_report, run_all, summarize, write_json
from evals.sandbox import PATH, Bind, require_sandbox, scratch_argv, scratch_environ
from evals.sandbox import run as sandboxed
from evals.tbench_tasks import (Task, dockerfile_steps, dockerfile_workdirs, host_refusal, host_workdir, resolve_env,
                                solution_script, verifier_files)

_GIT_IDENTITY = {"GIT_AUTHOR_NAME": "v4agent", "GIT_AUTHOR_EMAIL": "v4agent@invalid",
                 "GIT_COMMITTER_NAME": "v4agent", "GIT_COMMITTER_EMAIL": "v4agent@invalid"}
# `fix` works in its own copy of the repository and applies its patch at the end (--apply), so
# the model is told to use paths relative to the task's folder.
_WORKDIR_NOTE = ("(You work in a copy of {workdir}: use paths relative to it. Your changes are applied to "
                 "{workdir} when you submit.)\n\n")
TB_FIX_CMD = "v4agent fix --repo {repo} --issue-file {issue_file} --apply --json"
# terminal-bench 0.2's PytestParser: the statuses of the short test summary, and which pass
_TB1_SUMMARY = re.compile(r"=+\s*short test summary info\s*=+", re.IGNORECASE)
_TB1_PASSING = {"PASSED": True, "SKIPPED": True, "XFAIL": True, "FAILED": False, "XPASS": False, "ERROR": False}


class Refused(EvalError):
    """The task needs what this environment cannot give it; nothing was run."""


class TrialError(EvalError):
    """What Harbor records as the trial's exception: `kind` is its type name there."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---- grading: Harbor's reward files and metric, terminal-bench 0.2's parser ----

def _reward_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _parse_reward_text(data: bytes) -> dict[str, float | int]:
    if not data:
        raise TrialError("RewardFileEmptyError", "the reward file reward.txt is empty")
    try:
        value = float(data.decode("utf-8"))
    except ValueError:
        raise TrialError("VerifierOutputParseError", "reward.txt does not hold a number") from None
    if not math.isfinite(value):
        raise TrialError("VerifierOutputParseError", f"reward.txt holds a non-finite reward {value!r}")
    return {"reward": value}


def _parse_reward_json(data: bytes) -> dict[str, float | int]:
    if not data:
        raise TrialError("RewardFileEmptyError", "the reward file reward.json is empty")
    try:
        rewards = json.loads(data.decode("utf-8"))
    except ValueError:
        raise TrialError("VerifierOutputParseError", "reward.json is not JSON") from None
    for value in rewards.values() if isinstance(rewards, dict) else [rewards]:
        if not isinstance(value, (int, float)):
            raise TrialError("VerifierOutputParseError", f"reward.json holds a non-numeric reward {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise TrialError("VerifierOutputParseError", f"reward.json holds a non-finite reward {value!r}")
    if not isinstance(rewards, dict):  # Harbor's VerifierResult wants an object of rewards
        raise TrialError("ValidationError", f"reward.json holds {type(rewards).__name__}, not an object of rewards")
    return {key: float(value) if isinstance(value, bool) else value for key, value in rewards.items()}


def read_rewards(verifier_dir: Path) -> dict[str, float | int]:
    """The verifier's rewards as Harbor reads them from /logs/verifier, or TrialError."""
    named = _reward_bytes(verifier_dir / "reward.json")
    if named is not None:
        return _parse_reward_json(named)
    plain = _reward_bytes(verifier_dir / "reward.txt")
    if plain is not None:
        return _parse_reward_text(plain)
    raise TrialError("RewardFileNotFoundError", "the verifier wrote no reward (neither reward.txt nor reward.json)")


def harbor_mean(rewards: list[dict[str, float | int]]) -> dict[str, float | int]:
    """Harbor's Mean metric over the trials with a valid reward: {"mean": m} when every trial has
    at most one reward key, else the mean of each key (a trial without it counts 0)."""
    if not rewards:
        return {}
    keys = sorted({key for reward in rewards for key in reward})
    if len(keys) <= 1:
        values = [next(iter(reward.values()), 0) for reward in rewards]
        return {"mean": sum(values) / len(values)}
    return {key: sum(reward.get(key, 0) for reward in rewards) / len(rewards) for key in keys}


def tb1_results(output: str) -> dict[str, bool] | None:
    """terminal-bench 0.2's pytest parser: each test of the short test summary and whether it
    passed (SKIPPED and XFAIL do; XPASS does not); None when there is no summary."""
    parts = _TB1_SUMMARY.split(output, maxsplit=1)
    if len(parts) < 2:
        return None
    results: dict[str, bool] = {}
    for line in parts[1].splitlines():
        if line.startswith("FAILED") and len(pieces := line.split(" - ")) > 1:
            line = " - ".join(pieces[:-1])  # the failure's message
        words = line.split(maxsplit=1)
        status = words[0].strip().strip(":") if len(words) > 1 else ""
        name = words[1].strip().split("::", maxsplit=1)[-1] if len(words) > 1 else ""
        if status in _TB1_PASSING and name:
            results[name] = _TB1_PASSING[status]
    return results


# ---- environments ----

class Environment(Protocol):
    def setup(self) -> None: ...
    def exec(self, command: str, timeout: float, log: Path, env: dict[str, str], phase: str,
             inputs: dict[str, list[Path]] | None = None) -> Finished: ...
    def start_verifier(self) -> None: ...
    def verifier_dir(self) -> Path: ...
    def close(self) -> None: ...


def _copy_inputs(folder: Path, files: list[Path]) -> Path:
    """A fresh copy of `files` in `folder` (what a command gets at /solution or /tests), the
    entry script made executable, as Harbor does (chmod +x) before running it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in files:
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, folder / path.name)
    for script in (folder / "solve.sh", folder / "test.sh"):
        if script.is_file():
            script.chmod(script.stat().st_mode | 0o111)
    return folder


class SandboxEnv:
    """The task in the hardened sandbox: its workdir a folder of the trial, /logs/agent writable in
    the agent's phase, a fresh /logs/verifier in the verifier's, inputs read-only beside."""

    def __init__(self, task: Task, trial: Path) -> None:
        require_sandbox(f"task {task.name} without a container engine")
        self.task, self.trial = task, trial
        self.workdir = host_workdir(task)
        # relative COPY targets: the Dockerfile's own WORKDIR, or / when it sets none
        self.copy_base = (dockerfile_workdirs(task) or ["/"])[0]
        self.app, self.logs = trial / "app", trial / "logs"
        self.env: dict[str, str] = {}  # the Dockerfile's ENV

    def _copy(self, args: str) -> None:
        parts = json.loads(args) if args.startswith("[") else shlex.split(args)
        parts = [p for p in parts if not p.startswith("--")]  # --chown, --chmod: one user here
        *sources, dest = parts
        target = PurePosixPath(self.copy_base, dest)
        if not target.is_relative_to(self.workdir):
            raise Refused(f"its Dockerfile copies into {target}, outside {self.workdir}")
        host = self.app / target.relative_to(self.workdir)
        for pattern in sources:
            for found in sorted(glob(str(self.task.context / pattern))):  # type: ignore[operator]
                path = Path(found)
                if path.is_dir():
                    shutil.copytree(path, host, dirs_exist_ok=True)
                else:
                    into = host / path.name if dest.endswith("/") or len(sources) > 1 or host.is_dir() else host
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, into)

    def setup(self) -> None:
        for folder in (self.app, self.logs / "agent"):
            folder.mkdir(parents=True, exist_ok=True)
        steps = dockerfile_steps(self.task.dockerfile.read_text()) if self.task.dockerfile else []
        for step in steps:
            if step.keyword in ("COPY", "ADD"):
                self._copy(step.args)
            elif step.keyword == "ENV":
                words = shlex.split(step.args)
                pairs = [w.split("=", 1) for w in words] if "=" in words[0] else [[words[0], " ".join(words[1:])]]
                self.env.update({k: v for k, v in pairs})
            elif step.keyword == "RUN":
                done = self.exec(step.args, self.task.build_timeout, self.trial / "setup.log", {}, "build")
                if not done.ok:
                    raise EvalError(f"environment setup failed at RUN {step.args[:100]}:\n{done.output[-1500:]}")

    def exec(self, command: str, timeout: float, log: Path, env: dict[str, str], phase: str,
             inputs: dict[str, list[Path]] | None = None) -> Finished:
        binds = [Bind(_copy_inputs(self.trial / target.strip("/"), files), target, writable=False)
                 for target, files in (inputs or {}).items()]
        if phase == "agent":
            binds.append(Bind(self.logs / "agent", "/logs/agent"))
        elif phase == "verify":
            binds += [Bind(self.logs / "agent", "/logs/agent", writable=False),
                      Bind(self.logs / "verifier", "/logs/verifier")]
        variables = scratch_environ({**self.env, **resolve_env(self.task.environment_env), **env})
        return sandboxed(Bind(self.app, self.workdir), ["bash", "-c", command], env=variables, timeout=timeout,
                         binds=binds, log=log)

    def start_verifier(self) -> None:
        # Whatever the agent's phase left is gone: only what the verifier writes here counts.
        shutil.rmtree(self.logs / "verifier", ignore_errors=True)
        (self.logs / "verifier").mkdir(parents=True)

    def verifier_dir(self) -> Path:
        return self.logs / "verifier"

    def close(self) -> None:
        pass


class ContainerEnv:
    """The task's image (built from its Dockerfile, or its prebuilt one), one container per trial."""

    def __init__(self, task: Task, trial: Path, engine: Engine) -> None:
        self.task, self.trial, self.engine = task, trial, engine
        self.name = f"v4agent-tb-{task.name}-{os.getpid()}".lower()

    def _engine(self, *args: str, timeout: float = 600) -> Finished:
        done = run([self.engine.cli, *args], cwd=self.trial, timeout=timeout, log=self.trial / "engine.log")
        if not done.ok:
            raise EvalError(f"{self.engine.cli} {args[0]} failed:\n{done.output[-1500:]}")
        return done

    def setup(self) -> None:
        self.trial.mkdir(parents=True, exist_ok=True)
        image = self.task.docker_image or f"v4agent-tb-{self.task.name}".lower()
        if not self.task.docker_image:
            self._engine("build", "-t", image, str(self.task.context), timeout=self.task.build_timeout)
        workdir = ["-w", self.task.workdir] if self.task.workdir else []  # else the image's WORKDIR, as Harbor
        self._engine("run", "-d", "--name", self.name, *workdir, "--entrypoint", "sleep", image, "infinity")
        self._engine("exec", self.name, "mkdir", "-p", "/logs/agent", "/logs/verifier")

    def exec(self, command: str, timeout: float, log: Path, env: dict[str, str], phase: str,
             inputs: dict[str, list[Path]] | None = None) -> Finished:
        for target, files in (inputs or {}).items():
            local = _copy_inputs(self.trial / target.strip("/"), files)
            self._engine("exec", self.name, "rm", "-rf", target)
            self._engine("cp", str(local), f"{self.name}:{target}")
        variables = {**resolve_env(self.task.environment_env), **env}
        flags = [f"--env={k}={v}" for k, v in variables.items()]
        return run([self.engine.cli, "exec", *flags, self.name, "bash", "-c", command], cwd=self.trial,
                   timeout=timeout, log=log)

    def start_verifier(self) -> None:
        # A restart ends every process the agent left running (one could write a reward later);
        # the files stay. Then /logs/verifier starts empty.
        self._engine("restart", "--time", "0", self.name)
        self._engine("exec", self.name, "sh", "-c", "rm -rf /logs/verifier && mkdir -p /logs/verifier")

    def verifier_dir(self) -> Path:
        shutil.rmtree(self.trial / "logs", ignore_errors=True)
        (self.trial / "logs").mkdir()
        self._engine("cp", f"{self.name}:/logs/.", str(self.trial / "logs"))
        return self.trial / "logs" / "verifier"

    def close(self) -> None:
        run([self.engine.cli, "rm", "-f", self.name], cwd=self.trial, timeout=120)


# ---- agents ----

@dataclass
class TbenchConfig:
    out: Path
    agent: str  # "oracle" or "v4"
    engine: Engine | None = None
    workers: int = 1
    v4_cmd: str | None = None
    ray: str | None = None  # --ray ADDRESS: run the tasks on a Ray cluster ("local": a private one)
    access: ModelAccess | None = None  # the model eval was given (--endpoint, or its own server for --weights)


def _limit(seconds: float | None) -> float:
    return math.inf if seconds is None else seconds


def _oracle(task: Task, env: Environment, trial: Path) -> tuple[Finished, str, list[dict[str, Any]]]:
    """The task's solution, run as Harbor's oracle agent runs it (1.0: as terminal-bench's)."""
    script = solution_script(task)
    if not script.is_file():
        raise Refused(f"the oracle needs {script.relative_to(task.path)}, which the task does not have")
    if task.layout == "2.0":
        files = [p for p in task.solution.iterdir()]  # type: ignore[union-attr]
        command = f"(/solution/{script.name}) > /logs/agent/oracle.txt 2>&1"
        variables = {"DEBIAN_FRONTEND": "noninteractive", **resolve_env(task.solution_env)}
    else:
        files, command, variables = [script], f"bash /solution/{script.name}", {}
    done = env.exec(command, _limit(task.agent_timeout), trial / "agent.log", variables, "agent", {"/solution": files})
    shown = trial / "logs" / "agent" / "oracle.txt"
    output = shown.read_text(errors="replace") if shown.is_file() else done.output
    return done, command, atif.script_messages(task.instruction, command, output)


def backend_access(template: str, environ: dict[str, str] | os._Environ[str] = os.environ,
                   given: ModelAccess | None = None) -> tuple[dict[str, str], list[Path]]:
    """What `v4agent fix` needs from the host to reach its model inside the scratch root: this
    environment's v4agent settings (config file and V4AGENT_* merged, passed as V4AGENT_*
    variables) and API keys, and the files that name the model (weights, script), read-only.
    EvalError when no backend is configured at all: like `v4agent fix`, the run refuses to start
    rather than score every task as a failure. `given`: the model eval was given, and its key."""
    from agent.backends.http import API_KEY_VARIABLES
    from agent.settings import SettingsError, load_settings

    argv = shlex.split(template)
    named = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("--weights", "--script")]
    named += [word.split("=", 1)[1] for word in argv if word.startswith(("--weights=", "--script="))]
    on_line = names_backend(argv) or given is not None
    try:
        settings = load_settings(environ=environ)
    except SettingsError as e:
        raise EvalError(str(e)) from None
    if not on_line and not (settings.weights or settings.endpoint or settings.script):
        raise EvalError("the v4 agent has no model to talk to: give --v4-cmd a backend (--weights DIR, --endpoint "
                        "URL --model NAME, or --script FILE), or set one in ~/.config/v4agent/config.toml or "
                        "V4AGENT_WEIGHTS / V4AGENT_ENDPOINT + V4AGENT_MODEL (docs/evals.md)")
    values = {field.name: getattr(settings, field.name) for field in fields(settings)}
    variables = {f"V4AGENT_{name.upper()}": str(value) for name, value in values.items() if value is not None}
    variables.update({name: environ[name] for name in API_KEY_VARIABLES if environ.get(name)})
    variables.update(given.env if given else {})
    files = [Path(p) for p in (*named, settings.weights, settings.script) if p]
    return variables, [p.resolve() for p in files if p.exists()]


def _v4(task: Task, env: Environment, trial: Path, template: str | None,
        given: ModelAccess | None) -> tuple[Finished, str, list[dict[str, Any]]]:
    """v4agent fix --apply inside a scratch root, on the task's folder. `fix` is ours, and runs
    the model's commands in its own hardened sandbox; around it the scratch root shows the
    project's code, its venv, the v4agent cache and the backend's files, shares the network (a
    backend may be remote), and hides the task's solution and tests and the bundled evals data
    (from the task folder, a checkout or an installed package) wherever they would show."""
    if not isinstance(env, SandboxEnv):
        raise Refused("the v4 agent runs in the host environment only (not yet inside containers)")
    template = template or TB_FIX_CMD
    variables, backend_files = backend_access(template, given=given)
    # `fix` works on a git work tree: a throwaway one, unless the task's folder is a repository of
    # its own, which the verifier may look at and so must keep its history
    throwaway = not (env.app / ".git").exists()
    if throwaway:
        git("init", "--quiet", cwd=env.app)
        git("add", "--all", cwd=env.app)
        git("commit", "--quiet", "--allow-empty", "-m", "task start", cwd=env.app,
            env={**os.environ, **_GIT_IDENTITY})
    (env.logs / "agent" / "instruction.md").write_text(_WORKDIR_NOTE.format(workdir=env.workdir) + task.instruction)
    argv = fix_argv(template, repo=env.workdir, issue_file="/logs/agent/instruction.md", instance_id=task.name)
    if given is not None:  # its key is among the variables; the scratch root shares the network (127.0.0.1)
        argv = given.argv(argv)
    cache = cache_root().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    project = Path(__file__).resolve().parents[1]
    code = [project / name for name in ("agent", "runtime", "tools")]  # not the checkout: no .git, no evals data
    empty = trial / ".hidden"
    empty.mkdir(exist_ok=True)
    hidden = [*task.hidden, project / "evals" / "data"]
    # A task's own repository was made by its build steps as the sandbox's uid: git trusts it only
    # through a global setting (the clone `fix` makes drops settings given in the environment).
    gitconfig = trial / "gitconfig"
    gitconfig.write_text(f"[safe]\n\tdirectory = {env.workdir}\n\tdirectory = {env.workdir}/.git\n")
    binds = [Bind(env.app, env.workdir), Bind(env.logs / "agent", "/logs/agent"), Bind(cache, str(cache)),
             Bind(gitconfig, "/root/.gitconfig", writable=False),
             *(Bind(empty if p.is_dir() else Path("/dev/null"), str(p), writable=False) for p in hidden if p.exists())]
    sandbox = scratch_argv(binds, env.workdir, network=True,
                           read_only=(*code, Path(sys.prefix).resolve(), *backend_files))
    variables = {**env.env, **resolve_env(task.environment_env), **variables, "V4AGENT_CACHE": str(cache),
                 "PATH": f"{Path(sys.executable).parent}:{PATH}"}
    done = run(sandbox + argv, cwd=trial, env=scratch_environ(variables), timeout=_limit(task.agent_timeout),
               log=trial / "agent.log")
    if throwaway:
        shutil.rmtree(env.app / ".git", ignore_errors=True)
    reported = last_json_line(done.output)
    if done.output.startswith("bwrap:") or (done.code == 2 and not reported):
        raise EvalError(f"the v4 agent could not start (exit {done.code}):\n{done.output[-2000:]}")
    if reported.get("stop") == "backend_error":  # Harbor: an API error leaves no valid reward
        raise TrialError("ApiError", f"the model backend failed: {reported.get('error') or 'backend_error'}")
    saved = reported.get("trajectory")
    messages = atif.load_messages(Path(saved).read_text()) if saved and Path(saved).is_file() else []
    return done, shlex.join(argv), messages or [{"role": "user", "content": task.instruction}]


# ---- one trial, and a run ----

def _verify(task: Task, env: Environment, trial: Path, record: dict[str, Any]) -> dict[str, float | int]:
    env.start_verifier()
    if task.layout == "2.0":
        command = f"(/tests/{task.test_script}) > /logs/verifier/test-stdout.txt 2>&1"
        variables = resolve_env(task.verifier_env)
    else:
        # terminal-bench runs it in a tmux pane 160 columns wide, which pytest sizes its summary to
        command, variables = f"bash /tests/{task.test_script}", {"TEST_DIR": "/tests", "COLUMNS": "160"}
    done = env.exec(command, task.verifier_timeout, trial / "verifier.log", variables, "verify",
                    {"/tests": verifier_files(task)})
    record.update(verifier_exit=done.code, verifier_timed_out=done.timed_out is not None)
    if task.layout == "1.0":  # terminal-bench 0.2: a timeout or no summary is a failure mode, unresolved
        results = None if done.timed_out else tb1_results(done.output)
        record["failure_mode"] = "test_timeout" if done.timed_out else "parse_error" if results is None else None
        return {"reward": 1.0 if results is not None and all(results.values()) else 0.0}
    if done.timed_out:
        raise TrialError("VerifierTimeoutError", f"the verifier ran past {task.verifier_timeout:g} s")
    return read_rewards(env.verifier_dir())


def _outcome(record: dict[str, Any], rewards: dict[str, float | int] | None) -> None:
    if not rewards:
        record.update(outcome="error", resolved=False, reward_valid=False)
        record.setdefault("error", "TrialError: the verifier left no rewards")
        return
    resolved = all(value >= 1 for value in rewards.values())
    record.update(rewards=rewards, reward=next(iter(rewards.values())) if len(rewards) == 1 else None,
                  reward_valid=True, resolved=resolved, outcome="resolved" if resolved else "unresolved")


def run_task(task: Task, cfg: TbenchConfig) -> dict[str, Any]:
    """One trial of `task`; its result record (also in its folder's result.json)."""
    trial = cfg.out / "tasks" / task.name
    previous = read_report(trial / "result.json")
    if previous is not None and not previous.get("error"):
        return previous
    shutil.rmtree(trial, ignore_errors=True)
    trial.mkdir(parents=True)
    record: dict[str, Any] = {"layout": task.layout, "agent": cfg.agent,
                              "environment": cfg.engine.cli if cfg.engine else "sandbox", "resolved": False}
    timings: dict[str, float] = {}
    env: Environment | None = None
    rewards = None
    try:
        if task.invalid:
            raise EvalError(f"the task cannot be read: {task.invalid}")
        reason = task.unsupported or (None if cfg.engine else host_refusal(task, cfg.agent == "oracle"))
        if reason:
            raise Refused(f"needs what this harness cannot give it: {reason}" if task.unsupported else
                          f"needs its container image: {reason} (run it with --container where docker or podman is)")
        env = ContainerEnv(task, trial, cfg.engine) if cfg.engine else SandboxEnv(task, trial)
        started = time.monotonic()
        env.setup()
        timings["setup_s"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        agent_run, command, messages = (_oracle(task, env, trial) if cfg.agent == "oracle"
                                        else _v4(task, env, trial, cfg.v4_cmd, cfg.access))
        timings["agent_s"] = round(time.monotonic() - started, 2)
        reported = last_json_line(agent_run.output) if cfg.agent == "v4" else {}
        record.update(agent_exit=agent_run.code, agent_timed_out=agent_run.timed_out is not None,
                      tokens={ours: reported[theirs] for theirs, ours in TOKEN_FIELDS.items() if theirs in reported})
        write_json(trial / "trajectory.json", atif.trajectory(messages, session_id=f"{task.name}-{cfg.agent}",
                                                               agent=cfg.agent, version="0.1.0"))
        started = time.monotonic()
        try:  # past the agent's timeout (Harbor: AgentTimeoutError) the verifier still grades
            rewards = _verify(task, env, trial, record)
        finally:
            timings["verify_s"] = round(time.monotonic() - started, 2)
    except Exception as e:  # noqa: BLE001 - one task's crash, whatever it is, must not stop the run
        kind = e.kind if isinstance(e, TrialError) else type(e).__name__
        record.update(error=f"{kind}: {e}", refused=isinstance(e, Refused))
        (trial / "error.txt").write_text(traceback.format_exc())
    finally:
        if env:
            env.close()
    _outcome(record, rewards)
    record["timings"] = timings
    write_json(trial / "result.json", {task.name: record})
    return record


def run_tasks(tasks: list[Task], cfg: TbenchConfig,
              on_done: Callable[[Task, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every task, `cfg.workers` at a time; the summary (also in summary.json). With the v4
    agent, refuses to start when it has no model to talk to."""
    if cfg.agent == "v4":
        backend_access(cfg.v4_cmd or TB_FIX_CMD, given=cfg.access)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.ray:
        records = run_on_ray(tasks, lambda t: t.name, lambda t, out: run_task(t, replace(cfg, out=out)), cfg.out,
                             lambda t: finished(cfg.out / "tasks" / t.name / "result.json"), cfg.ray, cfg.workers,
                             on_done)
    else:
        records = run_all(tasks, lambda t: t.name, lambda t: run_task(t, cfg), cfg.workers, on_done)
    summary = summarize(records, cfg.agent)
    for key in ("empty_patch", "incomplete", "empty_patch_ids", "incomplete_ids", "suspicious_ids"):
        summary.pop(key, None)  # SWE-bench's
    summary["refused_ids"] = sorted(k for k, r in records.items() if r.get("refused"))
    summary["metrics"] = harbor_mean([r["rewards"] for r in records.values() if r.get("reward_valid")])
    write_json(cfg.out / "summary.json", summary)
    return summary
