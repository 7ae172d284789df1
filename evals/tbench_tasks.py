"""Terminal-Bench tasks, in the 2.0 layout (Harbor) and the 1.0 layout, and the check of whether
the host can provide a task's environment without its image.

2.0, read as Harbor 0.26 reads it (`harbor.models.task`): `task.toml` ([agent] timeout_sec,
default none; [verifier] timeout_sec, default 600, and env; [solution] env; [environment]
docker_image, workdir, env, build_timeout_sec...), `instruction.md` (leading canary lines
stripped), `environment/Dockerfile`, `solution/solve.sh`, `tests/test.sh`. 1.0, as
terminal-bench 0.2 reads it: `task.yaml` (instruction, max_agent_timeout_sec 360,
max_test_timeout_sec 60, parser_name pytest), `Dockerfile`, `solution.sh`, `run-tests.sh`, `tests/`.

A task that cannot be read (no instruction.md, a bad task.toml...) is still a Task, with
`invalid` saying why: that task is an error, the others run. One that uses what this harness
does not run (multi-step tasks, Windows, a separate verifier environment...) has `unsupported`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from evals.proc import EvalError

# Anything that installs software or reaches the network needs the task's image (or its network).
_NEEDS_IMAGE = re.compile(r"\b(apt-get|apt|apk|yum|dnf|pip3?|uv|uvx|npm|npx|pnpm|yarn|conda|curl|wget|cargo|gem|"
                          r"go\s+(?:install|get)|git\s+clone)\b")
_HOST_INSTRUCTIONS = {"FROM", "WORKDIR", "COPY", "ADD", "ENV", "ARG", "LABEL", "RUN", "CMD", "ENTRYPOINT", "EXPOSE",
                      "USER", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "VOLUME"}
# harbor.models.task.task.strip_canary: leading comment lines naming the canary, and blank lines after
_CANARY_LINE = re.compile(r"^(<!--.*canary.*-->|#.*canary.*)$", re.IGNORECASE)
# harbor.utils.env.resolve_env_vars: a value that is wholly ${VAR} or ${VAR:-default}
_ENV_TEMPLATE = re.compile(r"\$\{([^}:]+)(?::-(.*))?\}")


@dataclass(frozen=True)
class Step:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    layout: str  # "2.0" or "1.0"
    instruction: str = ""
    agent_timeout: float | None = None  # None: no limit (Harbor's default)
    verifier_timeout: float = 600.0
    build_timeout: float = 600.0
    workdir: str | None = None  # task.toml's; None: the Dockerfile's WORKDIR, as in Harbor
    docker_image: str | None = None  # a prebuilt image: no Dockerfile to build
    context: Path | None = None  # the Dockerfile's folder
    solution: Path | None = None
    tests: Path | None = None  # copied to /tests
    test_script: str = "test.sh"  # inside /tests
    environment_env: dict[str, str] = field(default_factory=dict)  # every command's ([environment] env)
    verifier_env: dict[str, str] = field(default_factory=dict)
    solution_env: dict[str, str] = field(default_factory=dict)
    unsupported: str | None = None  # a feature this harness does not run: the task is refused
    invalid: str | None = None  # why the task could not be read: the task is an error

    @property
    def dockerfile(self) -> Path | None:
        found = self.context / "Dockerfile" if self.context else None
        return found if found and found.is_file() else None

    @property
    def hidden(self) -> list[Path]:
        """What the agent's phase must not see: the task's solution and tests."""
        if self.layout == "2.0":
            return [self.path / "solution", self.path / "tests"]
        return [self.path / "solution.sh", self.path / "run-tests.sh", self.path / "tests"]


def dockerfile_steps(text: str) -> list[Step]:
    steps, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        steps.append(Step(keyword.upper(), args.strip()))
        pending = ""
    return steps


def dockerfile_workdirs(task: Task) -> list[str]:
    """The WORKDIRs the Dockerfile sets, in order, each resolved against the one before."""
    workdirs: list[str] = []
    steps = dockerfile_steps(task.dockerfile.read_text()) if task.dockerfile else []
    for step in steps:
        if step.keyword == "WORKDIR":
            workdirs.append(str(PurePosixPath(workdirs[-1] if workdirs else "/", step.args.strip("\"'"))))
    return workdirs


def strip_canary(text: str) -> str:
    lines = text.split("\n")
    start = 0
    while start < len(lines) and _CANARY_LINE.match(lines[start].strip()):
        start += 1
    while start < len(lines) and lines[start].strip() == "":
        start += 1
    return "\n".join(lines[start:])


def resolve_env(values: dict[str, str], environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """Harbor's templates: a value that is `${VAR}` or `${VAR:-default}` comes from the host."""
    resolved = {}
    for key, value in values.items():
        match = _ENV_TEMPLATE.fullmatch(value)
        if not match:
            resolved[key] = value
        elif match.group(1) in environ:
            resolved[key] = environ[match.group(1)]
        elif match.group(2) is not None:
            resolved[key] = match.group(2)
        else:
            raise EvalError(f"environment variable {match.group(1)!r} is not set on this host (the task asks for it)")
    return resolved


def _float(value: Any, where: str) -> float:
    """pydantic's lax float, as Harbor's config reads it: numbers, booleans, numeric strings."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise EvalError(f"{where} must be a number, not {value!r}")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise EvalError(f"{where} must be a string, not {value!r}")
    return value


def _table(config: dict[str, Any], name: str) -> dict[str, Any]:
    table = config.get(name, {})
    if not isinstance(table, dict):
        raise EvalError(f"[{name}] must be a table")
    return table


def _env(table: dict[str, Any], where: str) -> dict[str, str]:
    values = table.get("env", {})
    if not isinstance(values, dict):
        raise EvalError(f"{where}.env must be a table")
    return {key: _text(value, f"{where}.env.{key}") for key, value in values.items()}


def _unsupported_2(config: dict[str, Any], agent: dict, verifier: dict, environment: dict) -> str | None:
    """What of Harbor's task format this harness does not run, or None."""
    if config.get("steps"):
        return "it is a multi-step task ([[steps]])"
    if str(environment.get("os", "linux")).lower() != "linux":
        return f"it targets {environment['os']} containers"
    if verifier.get("environment") is not None or verifier.get("environment_mode") == "separate":
        return "its verifier runs in a separate environment"
    if environment.get("healthcheck") is not None:
        return "it has a healthcheck"
    for section, table in (("agent", agent), ("verifier", verifier)):
        if table.get("user") not in (None, "root", 0):
            return f"its {section} runs as user {table['user']}"
    return None


def _load_2(path: Path) -> Task:
    config = tomllib.loads((path / "task.toml").read_text(encoding="utf-8"))
    agent, verifier = _table(config, "agent"), _table(config, "verifier")
    environment, solution = _table(config, "environment"), _table(config, "solution")
    timeout = agent.get("timeout_sec")
    workdir, image = environment.get("workdir"), environment.get("docker_image")
    if not (path / "instruction.md").is_file():
        raise EvalError(f"task directory {path} is missing instruction.md")
    if not (path / "tests" / "test.sh").is_file():
        raise EvalError(f"task directory {path} has no tests/test.sh")
    return Task(
        name=path.name, path=path, layout="2.0",
        instruction=strip_canary((path / "instruction.md").read_text(encoding="utf-8")),
        agent_timeout=None if timeout is None else _float(timeout, "agent.timeout_sec"),
        verifier_timeout=_float(verifier.get("timeout_sec", 600.0), "verifier.timeout_sec"),
        build_timeout=_float(environment.get("build_timeout_sec", 600.0), "environment.build_timeout_sec"),
        workdir=None if workdir is None else _text(workdir, "environment.workdir"),
        docker_image=None if image is None else _text(image, "environment.docker_image"),
        context=path / "environment", solution=path / "solution", tests=path / "tests",
        environment_env=_env(environment, "environment"), verifier_env=_env(verifier, "verifier"),
        solution_env=_env(solution, "solution"), unsupported=_unsupported_2(config, agent, verifier, environment))


def _load_1(path: Path) -> Task:
    try:
        import yaml
    except ImportError:
        raise EvalError("Terminal-Bench 1.0 tasks (task.yaml) need PyYAML: pip install pyyaml") from None
    try:
        config = yaml.safe_load((path / "task.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise EvalError(f"task.yaml: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("instruction"), str):
        raise EvalError("task.yaml has no instruction")
    parser = config.get("parser_name", "pytest")
    return Task(name=path.name, path=path, layout="1.0", instruction=config["instruction"],
                agent_timeout=_float(config.get("max_agent_timeout_sec", 360.0), "max_agent_timeout_sec"),
                verifier_timeout=_float(config.get("max_test_timeout_sec", 60.0), "max_test_timeout_sec"),
                context=path, solution=path, tests=path / "tests", test_script="run-tests.sh",
                unsupported=None if parser == "pytest" else f"its results are read by the {parser} parser")


def is_task(path: Path) -> bool:
    return (path / "task.toml").is_file() or (path / "task.yaml").is_file()


def load_task(path: Path) -> Task:
    """The task in `path`; one that cannot be read comes back with `invalid` set."""
    path = path.resolve()
    if not is_task(path):
        raise EvalError(f"{path}: not a Terminal-Bench task (no task.toml or task.yaml)")
    try:
        return _load_2(path) if (path / "task.toml").is_file() else _load_1(path)
    except (EvalError, OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        layout = "2.0" if (path / "task.toml").is_file() else "1.0"
        return Task(name=path.name, path=path, layout=layout, invalid=f"{type(e).__name__}: {e}")


def load_tasks(root: Path, names: list[str] | None = None) -> list[Task]:
    """A task folder, or a folder of them (sorted by name); `names` that are not there are an error."""
    if not root.is_dir():
        raise EvalError(f"{root}: no such folder")
    tasks = [load_task(root)] if is_task(root) else [load_task(p) for p in sorted(root.iterdir()) if is_task(p)]
    if names:
        unknown = sorted(set(names) - {t.name for t in tasks})
        if unknown:
            raise EvalError(f"no task named {', '.join(unknown)} in {root} (there: {', '.join(t.name for t in tasks)})")
        tasks = [t for t in tasks if t.name in names]
    if not tasks:
        raise EvalError(f"{root}: no tasks found")
    return tasks


def solution_script(task: Task) -> Path:
    return task.solution / ("solve.sh" if task.layout == "2.0" else "solution.sh")  # type: ignore[operator]


def verifier_files(task: Task) -> list[Path]:
    """The verifier's entry script and what sits beside it in /tests."""
    files = list(task.tests.iterdir()) if task.tests and task.tests.is_dir() else []
    if task.layout == "1.0":
        files.append(task.path / "run-tests.sh")
    return files


def host_workdir(task: Task) -> str:
    """Where the task works in the scratch root: its workdir, else its Dockerfile's WORKDIR."""
    workdirs = dockerfile_workdirs(task)
    if len(set(workdirs)) > 1:
        raise EvalError(f"its Dockerfile works in several folders ({', '.join(dict.fromkeys(workdirs))})")
    if task.workdir and workdirs and task.workdir != workdirs[0]:
        raise EvalError(f"its Dockerfile works in {workdirs[0]}, its task.toml in {task.workdir}")
    workdir = task.workdir or (workdirs[0] if workdirs else None)
    if not workdir or workdir == "/":
        raise EvalError("it sets no working folder (no WORKDIR, no [environment] workdir)")
    return workdir


def host_refusal(task: Task, oracle: bool) -> str | None:
    """Why the host cannot give this task its environment without the image, or None."""
    if task.docker_image:
        return f"it runs in the prebuilt image {task.docker_image}"
    try:
        host_workdir(task)
    except EvalError as e:
        return str(e)
    scripts = [p for p in verifier_files(task) if p.suffix == ".sh"] + ([solution_script(task)] if oracle else [])
    steps = dockerfile_steps(task.dockerfile.read_text()) if task.dockerfile else []
    for step in steps:
        if step.keyword not in _HOST_INSTRUCTIONS:
            return f"its Dockerfile uses {step.keyword}"
        if step.keyword == "RUN" and (m := _NEEDS_IMAGE.search(step.args)):
            return f"its Dockerfile installs software ({m.group(0)}: RUN {step.args[:80]})"
        if step.keyword in ("COPY", "ADD") and ("--from" in step.args or "://" in step.args):
            return f"its Dockerfile copies from outside the build context ({step.keyword} {step.args[:80]})"
        if step.keyword == "USER" and step.args not in ("root", "0"):
            return f"it runs as user {step.args}"
    for script in scripts:
        if script.is_file() and (m := _NEEDS_IMAGE.search(script.read_text())):
            return f"{script.relative_to(task.path)} installs software or uses the network ({m.group(0)})"
    return None
