"""Grading SWE-bench instances in containers (podman or Docker) on images built here, and
handing a predictions file to the official `swebench` harness.

No image registry is needed. Three layers, as the official harness has them:
- base: a Debian root file system made by `mmdebstrap` from Debian's archive, with the official
  base image's packages (its Dockerfile's apt list, read from the pinned swebench wheel) plus
  python3-venv, imported into the engine (`v4agent-eval-base:<hash of the package list>`);
- environment: the spec's Python (the base's own python3 when the version matches, else the
  interpreter `evals.envs.find_python` finds or uv installs on the host, copied in at the same
  path), a venv at /opt/venv and the spec's install steps (`v4agent-eval-env:<key>`), built by
  running the steps in a container and committing it (works alike on Docker and podman);
- instance: a container of the environment image with the grading work tree at /testbed (and
  the git objects it borrows, read-only), in which `pre_install` and the repository's own
  install run with the network at the base commit (the official instance image); after the model
  patch, the install runs again (the official eval script does) and the network is disconnected;
  the grader's eval script then runs there with no network, as on the host (evals.grader.grade
  with this container as its runner).

Steps that reach the network see the host's CA certificates (/etc/ssl/certs, read-only), so a
TLS-intercepting proxy trusted by the host is trusted there too. The engine runs as configured
on the machine (docs/evals.md says what podman needs where the kernel's cgroups are hybrid).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.cache import evals_cache, locked
from evals.envs import EnvSpec, SpecTable, find_python, official_wheel, resolved_for
from evals.grader import Limits, grade
from evals.instances import Instance
from evals.proc import EvalError, Finished, run
from evals.repos import RepoStore
from evals.sandbox import Bind
from tools.sandbox import borrowed_objects

BASE_SUITE = "bookworm"
VENV = "/opt/venv"
_CERTS = "/etc/ssl/certs"
# pip (its own certifi bundle), requests and OpenSSL all told to trust the host's certificates
_TRUST = {var: f"{_CERTS}/ca-certificates.crt" for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
# What we add to the official base packages: venv instead of conda, Python's headers (conda's
# Python has them: C extensions among the requirements build against them), patch for `--fuzz`.
_EXTRA_PACKAGES = ("python3-venv", "python3-dev", "patch", "ca-certificates")


@dataclass(frozen=True)
class Engine:
    cli: str  # "docker" or "podman"


def detect_engine() -> Engine | None:
    """The first of docker and podman whose daemon/service answers."""
    for cli in ("docker", "podman"):
        if shutil.which(cli) and subprocess.run([cli, "info"], capture_output=True, timeout=60).returncode == 0:
            return Engine(cli)
    return None


def _limits() -> list[str]:
    """Explicit open-file and process limits: an engine's defaults (podman: 1M open files) are
    above what a process without CAP_SYS_RESOURCE may set, and the container would not start."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=8192:8192"]


def _engine(engine: Engine, *args: str, timeout: float = 600, log: Path | None = None) -> Finished:
    done = run([engine.cli, *args], cwd=Path(tempfile.gettempdir()), timeout=timeout, log=log)
    if not done.ok:
        raise EvalError(f"{engine.cli} {args[0]} failed ({done.code}):\n{done.output.strip()[-2000:]}")
    return done


def _env_flags(env: dict[str, str]) -> list[str]:
    return [item for k, v in env.items() for item in ("-e", f"{k}={v}")]


def image_exists(engine: Engine, image: str) -> bool:
    return subprocess.run([engine.cli, "image", "inspect", image], capture_output=True).returncode == 0


# --- the base image ------------------------------------------------------------------------------

def official_base_packages() -> tuple[str, ...]:
    """The apt packages of the official Python base image (its Dockerfile, in the pinned wheel)."""
    with zipfile.ZipFile(official_wheel()) as wheel:
        dockerfile = wheel.read("swebench/harness/dockerfiles/python.py").decode()
    found = re.search(r"apt install -y \\\n(.*?)&&", dockerfile, re.DOTALL)
    if not found:
        raise EvalError("the official base Dockerfile has no `apt install -y` list where expected")
    return tuple(word for word in found.group(1).replace("\\", " ").split())


def base_packages() -> list[str]:
    return sorted({*official_base_packages(), *_EXTRA_PACKAGES})


def base_image_name() -> str:
    """The base image's name: it changes with what goes into it."""
    tag = hashlib.sha256(" ".join([BASE_SUITE, *base_packages()]).encode()).hexdigest()[:12]
    return f"localhost/v4agent-eval-base:{tag}"


def base_image(engine: Engine, log: Path | None = None) -> str:
    """The base image's name, built now (mmdebstrap, minutes) if the engine does not have it."""
    packages, image = base_packages(), base_image_name()
    with locked(evals_cache() / "images" / "base"):
        if image_exists(engine, image):
            return image
        if shutil.which("mmdebstrap") is None:
            raise EvalError("building the base image needs mmdebstrap (apt-get install mmdebstrap)")
        with tempfile.TemporaryDirectory(prefix="v4agent-rootfs-") as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            done = run(["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", BASE_SUITE, str(tarball)],
                       cwd=Path(tmp), timeout=3600, log=log)
            if not done.ok:
                raise EvalError(f"mmdebstrap failed:\n{done.output.strip()[-3000:]}")
            _engine(engine, "import", "--change", "CMD /bin/bash", str(tarball), image, timeout=1800, log=log)
    return image


# --- environment images --------------------------------------------------------------------------

def _python_prefix(version: str) -> tuple[str, str]:
    """(installation prefix, interpreter) of the host's python `version`: copied into the image."""
    python = find_python(version)
    prefix = subprocess.run([python, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    real = str(Path(python).resolve())
    if prefix in ("/usr", "/usr/local", "/"):
        raise EvalError(f"python{version} ({real}) is part of the host's system: the image needs a self-contained one "
                        "(uv python install, pyenv)")
    return prefix, str(Path(prefix) / "bin" / f"python{version}")


def env_image(engine: Engine, spec: EnvSpec, log: Path | None = None) -> str:
    """The environment image of `spec` (requirements already resolved), built if missing."""
    base = base_image(engine, log)
    key = hashlib.sha256(" ".join([base, spec.python, *spec.install]).encode()).hexdigest()[:16]
    image = f"localhost/v4agent-eval-env:{key}"
    with locked(evals_cache() / "images" / key):
        if image_exists(engine, image):
            return image
        system = subprocess.run([engine.cli, "run", "--rm", *_limits(), "--network", "none", base, "python3", "-c",
                                 "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True)
        mounts: list[str] = []
        if system.stdout.strip() == spec.python:
            python = "python3"
        else:
            prefix, python = _python_prefix(spec.python)
            mounts = ["-v", f"{prefix}:/v4agent-python:ro"]
            python = f"mkdir -p {shlex.quote(str(Path(prefix).parent))} && cp -a /v4agent-python " \
                     f"{shlex.quote(prefix)} && {shlex.quote(python)}"
        script = "\n".join(["set -euxo pipefail", f"{python} -m venv {VENV}", f"source {VENV}/bin/activate",
                            "python -m pip install --upgrade pip", *spec.install]) + "\n"
        name = f"v4agent-env-{uuid.uuid4().hex[:12]}"
        try:
            _engine(engine, "run", "--name", name, *_limits(), "-v", f"{_CERTS}:{_CERTS}:ro", *_env_flags(_TRUST),
                    *mounts, base,
                    "bash", "-c", script, timeout=3600, log=log)
            _engine(engine, "commit", name, image, timeout=1800, log=log)
        finally:
            subprocess.run([engine.cli, "rm", "-f", name], capture_output=True)
    return image


# --- grading in an instance container ------------------------------------------------------------

class InstanceContainer:
    """One instance's container: started with the network for its setup, then cut off; the
    grader's commands run in it through `runner` (the signature of evals.grader's sandbox)."""

    def __init__(self, engine: Engine, image: str, worktree: Path, logs: Path) -> None:
        self.engine, self.worktree, self.logs = engine, worktree, logs
        self.name = f"v4agent-eval-{uuid.uuid4().hex[:12]}"
        mounts = ["-v", f"{worktree}:/testbed", "-v", f"{logs}:/v4agent-logs:ro", "-v", f"{_CERTS}:{_CERTS}:ro"]
        for objects in borrowed_objects(worktree):
            mounts += ["-v", f"{objects}:{objects}:ro"]
        _engine(engine, "run", "-d", "--name", self.name, *_limits(), *mounts, "-w", "/testbed", image,
                "sleep", "infinity")

    def setup(self, spec: EnvSpec, steps: list[str], limits: Limits) -> None:
        """`steps` in /testbed with the venv active and the network on (logged to setup.log)."""
        if not steps:
            return
        script = "\n".join(["set -ex", "cd /testbed", f"source {VENV}/bin/activate", *spec.eval_commands, *steps])
        done = self._exec(["bash", "-c", script + "\n"], _TRUST, limits, self.logs / "setup.log")
        if not done.ok:
            raise EvalError(f"the instance setup failed in the container (see {self.logs / 'setup.log'}):\n"
                            f"{done.output.strip()[-2000:]}")

    def go_offline(self) -> None:
        networks = subprocess.run([self.engine.cli, "inspect", "--format",
                                   "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", self.name],
                                  capture_output=True, text=True, check=True).stdout.split()
        for network in networks:
            _engine(self.engine, "network", "disconnect", network, self.name)

    def _exec(self, argv: list[str], env: dict[str, str], limits: Limits, log: Path | None = None) -> Finished:
        return run([self.engine.cli, "exec", "-w", "/testbed", *_env_flags(env), self.name, *argv], cwd=self.logs,
                   timeout=limits.timeout, log=log)

    def runner(self, spec: EnvSpec) -> Any:
        """The grader's runner: `argv` in this container, the logs folder's files at the paths
        the grader binds them to, the spec's eval_commands first. Its first call reinstalls the
        repository (the patch is in by then) and cuts the network."""
        online = [True]

        def run_here(worktree: Path, argv: list[str], env: dict[str, str], limits: Limits, binds: list[Bind],
                     read_only: list[Path]) -> Finished:
            if online[0]:
                self.setup(spec, [spec.repo_install] if spec.repo_install else [], limits)
                self.go_offline()
                online[0] = False
            links = [f"mkdir -p {shlex.quote(str(Path(b.target).parent))} && "
                     f"ln -sf /v4agent-logs/{shlex.quote(str(Path(b.source).relative_to(self.logs)))} "
                     f"{shlex.quote(b.target)}" for b in binds]
            script = " && ".join([*links, *spec.eval_commands, f"exec {shlex.join(argv)}"]) if (
                links or spec.eval_commands) else shlex.join(argv)
            return self._exec(["bash", "-c", script], {**env, "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin"},
                              limits)
        return run_here

    def close(self) -> None:
        # kill first: `sleep` as PID 1 ignores SIGTERM, and `rm -f` would wait out its stop timeout
        subprocess.run([self.engine.cli, "kill", self.name], capture_output=True)
        subprocess.run([self.engine.cli, "rm", "-f", self.name], capture_output=True)


def grade_in_container(engine: Engine, instance: Instance, model_patch: str, specs: SpecTable, store: RepoStore,
                       worktree: Path, logs: Path, limits: Limits, strict: bool = False) -> dict[str, Any]:
    """The official report for one prediction, graded as evals.grader.grade does on the host but
    with the instance's container as the place its commands run."""
    spec = specs.lookup(instance.repo, instance.version)
    spec = resolved_for(spec, store.source(instance), instance.environment_setup_commit or instance.base_commit)
    logs.mkdir(parents=True, exist_ok=True)
    image = env_image(engine, spec, logs / "image_build.log")
    box = InstanceContainer(engine, image, worktree.resolve(), logs.resolve())
    try:
        box.setup(spec, [*spec.pre_install, *([spec.repo_install] if spec.repo_install else [])], limits)
        return grade(instance, model_patch, worktree, spec, Path(VENV), logs, limits, strict, runner=box.runner(spec))
    finally:
        box.close()


def official_harness(dataset: Path, predictions: Path, run_id: str, workers: int) -> list[str]:
    """The command that grades `predictions` with the official harness (`pip install swebench`)."""
    if importlib.util.find_spec("swebench") is None:
        raise EvalError("the official harness is not installed: pip install swebench")
    return [sys.executable, "-m", "swebench.harness.run_evaluation", "--dataset_name", str(dataset),
            "--predictions_path", str(predictions), "--run_id", run_id, "--max_workers", str(workers)]


if __name__ == "__main__":  # `python -m evals.container base`: build the base image ahead (CI's cached step)
    if sys.argv[1:] != ["base"]:
        sys.exit("usage: python -m evals.container base")
    found = detect_engine()
    if found is None:
        sys.exit("error: neither docker nor podman answers on this machine")
    print(base_image(found, Path(tempfile.gettempdir()) / "v4agent-base-image.log"))
