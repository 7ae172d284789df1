"""Test environments: a spec per (repo, version) says how to build a virtualenv and run the
tests; the venv is built once per distinct (python, install) and shared by every instance that
needs the same one.

The spec table is TOML or JSON, a list of `[[spec]]` entries; the bundled one
(`evals/data/env_specs.toml`) is extended by the user's (`--env-spec FILE`), whose entries win:

    [[spec]]
    repo = "pallets/jinja"
    versions = ["3.1"]             # "*" matches any version
    python = "3.11"                # found as pythonX.Y on PATH
    install = ["pip install pytest==8.3.5 markupsafe==2.1.5"]   # run in the venv
    test_cmd = "pytest -rA -p no:cacheprovider"   # the test files are appended
    pythonpath = ["src"]           # work-tree dirs put first on PYTHONPATH: the code under test
    pre_test = []                  # commands in the work tree before the tests (in-place builds...)
    test_directives = "files"      # or "django": tests/a/b.py -> a.b, for tests/runtests.py
    log_parser = "pytest"          # or "django"
    # venv = "/opt/envs/jinja"     # instead of python/install: an existing environment, used as is

The repository under test is never installed into the shared venv (parallel instances would
race); it is imported from the work tree through `pythonpath`, or built in place by `pre_test`.
A repository whose own config changes how tests run says so here: a plugin its pytest config
requires goes in `install`, an `addopts` to drop goes in `test_cmd` (`-o addopts=""`).

A (repo, version) no table entry matches takes the official spec: MAP_REPO_VERSION_TO_SPECS of
the `swebench` package, release 4.1.0 (the last that carries it; 5.x ships per-instance scripts
instead), read from that release's wheel (downloaded once into the cache, hash checked) so it
never conflicts with the 5.x package the grader imports. An official spec installs the repository
into its environment (`repo_install`) and may run system commands (`pre_install`): only in a
container (`--container`, evals/container.py). Its `requirements.txt` / `environment.yml` is read
from the repository at the instance's `environment_setup_commit`, as the official harness reads
it from GitHub; conda's environment.yml is installed with pip (see docs/evals.md).

A `python` version not on PATH is provisioned with uv (`uv python find`, then `uv python install`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from evals.cache import evals_cache, locked
from evals.logparse import parser_for
from evals.proc import EvalError, run
from tools.shell import scrubbed_env

BUNDLED_SPECS = Path(__file__).parent / "data" / "env_specs.toml"
_READY = ".v4agent-ready"


@dataclass(frozen=True)
class EnvSpec:
    repo: str
    versions: tuple[str, ...]
    python: str
    install: tuple[str, ...] = ()
    test_cmd: str = "pytest -rA -p no:cacheprovider"
    pythonpath: tuple[str, ...] = ()
    pre_test: tuple[str, ...] = ()
    test_directives: str = "files"
    log_parser: str = "pytest"
    env: dict[str, str] = field(default_factory=dict)  # extra variables for the tests
    venv: str | None = None  # an existing environment to use as is
    # official specs (container only): system/repository setup run as root, the repository's own
    # install into the environment, and shell lines the tests run after (exports)
    pre_install: tuple[str, ...] = ()
    repo_install: str | None = None
    eval_commands: tuple[str, ...] = ()
    # official specs: a requirements file (the first of these paths that exists) or a conda
    # environment.yml, read from the repository at the instance's environment_setup_commit
    requirements: tuple[str, ...] = ()
    environment_yml: tuple[str, ...] = ()

    @property
    def container_only(self) -> bool:
        return bool(self.pre_install or self.repo_install or self.requirements or self.environment_yml)

    def matches(self, repo: str, version: str) -> bool:
        return self.repo == repo and ("*" in self.versions or version in self.versions)

    @property
    def env_key(self) -> str:
        """What the venv depends on, hashed: equal installs share one venv."""
        return hashlib.sha256(json.dumps([self.python, list(self.install)]).encode()).hexdigest()[:16]


def _spec(entry: dict, source: Path) -> EnvSpec:
    try:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        spec = EnvSpec(**values)
    except TypeError as e:
        raise EvalError(f"{source}: bad spec entry {entry.get('repo', '?')}: {e}") from None
    if spec.test_directives not in ("files", "django"):
        raise EvalError(f"{source}: test_directives must be 'files' or 'django', not {spec.test_directives!r}")
    parser_for(spec.log_parser)
    return spec


def load_specs(path: Path) -> list[EnvSpec]:
    """The entries of one spec file (TOML, or JSON: a list or {"spec": [...]})."""
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read the env spec file {path}: {e}") from None
    entries = data.get("spec", []) if isinstance(data, dict) else data
    return [_spec(entry, path) for entry in entries]


class SpecTable:
    """Specs looked up by (repo, version); later files take precedence, the official table last."""

    def __init__(self, extra: Path | None = None) -> None:
        self.specs = load_specs(BUNDLED_SPECS) + (load_specs(extra) if extra else [])

    def lookup(self, repo: str, version: str) -> EnvSpec:
        for spec in reversed(self.specs):
            if spec.matches(repo, version):
                return spec
        if repo in OFFICIAL_REPOS:
            return official_spec(repo, version)
        raise EvalError(f"no environment spec for {repo} version {version}: add one to a spec file "
                        "and pass it with --env-spec (see docs/evals.md)")


# --- the official specs (swebench 4.1.0) ---------------------------------------------------------

OFFICIAL_RELEASE = "swebench==4.1.0"
_OFFICIAL_WHEEL = ("swebench-4.1.0-py3-none-any.whl",
                   "1243776f720047cc9e20a427f7a52b75c13a07abda6154fb60fe77f82ec8af57")
# Python repositories the official table covers (swe-bench/humaneval is a toy, left out); the
# first twelve are SWE-bench Verified's.
VERIFIED_REPOS = ("astropy/astropy", "django/django", "matplotlib/matplotlib", "mwaskom/seaborn", "pallets/flask",
                  "psf/requests", "pydata/xarray", "pylint-dev/pylint", "pytest-dev/pytest",
                  "scikit-learn/scikit-learn", "sphinx-doc/sphinx", "sympy/sympy")
OFFICIAL_REPOS = VERIFIED_REPOS + ("dbt-labs/dbt-core", "marshmallow-code/marshmallow", "pvlib/pvlib-python",
                                   "pydicom/pydicom", "pylint-dev/astroid", "pyvista/pyvista", "sqlfluff/sqlfluff")


def official_wheel(cache_dir: Path | None = None) -> Path:
    """The pinned swebench release's wheel, from the cache or PyPI (`pip download`), hash checked."""
    folder = (cache_dir or evals_cache()) / "official"
    wheel = folder / _OFFICIAL_WHEEL[0]
    with locked(folder):
        if not wheel.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
                                       ":all:", OFFICIAL_RELEASE, "-d", tmp], capture_output=True, text=True)
                if done.returncode != 0 or not (Path(tmp) / wheel.name).is_file():
                    raise EvalError(f"the official specs come from {OFFICIAL_RELEASE}, which pip cannot download "
                                    f"here: {done.stderr.strip()[-1500:]}")
                os.replace(Path(tmp) / wheel.name, wheel)
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != _OFFICIAL_WHEEL[1]:
        raise EvalError(f"{wheel}: sha256 differs from the {OFFICIAL_RELEASE} release; delete it to download again")
    return wheel


@cache
def official_tables() -> dict[str, Any]:
    """From the wheel: MAP_REPO_VERSION_TO_SPECS_PY, MAP_REPO_TO_REQS_PATHS and
    MAP_REPO_TO_ENV_YML_PATHS (constants/python.py, plain data with no imports: executed on
    its own), and the name of each repository's log parser (MAP_REPO_TO_PARSER_PY, read from
    the source, not imported: its module needs the package)."""
    with zipfile.ZipFile(official_wheel()) as wheel:
        constants = wheel.read("swebench/harness/constants/python.py").decode()
        parsers = wheel.read("swebench/harness/log_parsers/python.py").decode()
    tree = ast.parse(constants)
    if any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(tree)):
        raise EvalError("swebench's constants/python.py imports modules: not the plain table this reads")
    namespace: dict[str, Any] = {}
    exec(compile(tree, "swebench/harness/constants/python.py", "exec"), namespace)  # noqa: S102 - pinned, hashed
    parser_names = {}
    for node in ast.walk(ast.parse(parsers)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MAP_REPO_TO_PARSER_PY" for t in node.targets):
            assert isinstance(node.value, ast.Dict)
            parser_names = {ast.literal_eval(k): v.id for k, v in zip(node.value.keys, node.value.values, strict=True)
                            if k is not None and isinstance(v, ast.Name)}
    return {"specs": namespace["MAP_REPO_VERSION_TO_SPECS_PY"], "reqs": namespace["MAP_REPO_TO_REQS_PATHS"],
            "env_yml": namespace["MAP_REPO_TO_ENV_YML_PATHS"], "parsers": parser_names}


def official_spec(repo: str, version: str) -> EnvSpec:
    """The official spec of (repo, version) as an EnvSpec: python, its packages (a list, or the
    repository's requirements.txt / environment.yml) and pip_packages, pre_install, install,
    eval_commands, test_cmd, the test directives' style and the official log parser."""
    tables = official_tables()
    found = tables["specs"].get(repo, {}).get(version)
    if found is None:
        known = ", ".join(sorted(tables["specs"].get(repo, {}))) or "none"
        raise EvalError(f"the official specs have no {repo} version {version} (versions: {known})")
    packages = found.get("packages", "")
    install = []
    if packages and packages not in ("requirements.txt", "environment.yml"):
        install.append(f"python -m pip install {packages}")  # conda package names; PyPI's are the same
    if found.get("pip_packages"):
        install.append("python -m pip install " + " ".join(found["pip_packages"]))
    test_cmd = found["test_cmd"]
    return EnvSpec(
        repo=repo, versions=(version,), python=found["python"], install=tuple(install),
        test_cmd=test_cmd if isinstance(test_cmd, str) else " && ".join(test_cmd),
        test_directives="django" if repo == "django/django" else "files",
        log_parser=tables["parsers"].get(repo, "parse_log_pytest"),
        env={k: str(v) for k, v in found.get("env_vars", {}).items()},
        pre_install=tuple(found.get("pre_install", ())), repo_install=found.get("install"),
        eval_commands=tuple(found.get("eval_commands", ())),
        requirements=tuple(tables["reqs"].get(repo, ())) if packages == "requirements.txt" else (),
        environment_yml=tuple(tables["env_yml"].get(repo, ())) if packages == "environment.yml" else ())


_REQ_EXCLUDED = ("-e .", "#", ".[test")  # the official get_requirements_by_commit's exclusions
_REPLACED = (("types-pkg_resources", "types-setuptools"),)  # yanked from PyPI (official clean_requirements)


def _show(repo_dir: Path, commit: str, path: str) -> str | None:
    done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=repo_dir, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def _first_file(spec: EnvSpec, repo_dir: Path, commit: str, paths: Sequence[str]) -> tuple[str, str]:
    """The first of `paths` that exists at `commit`, and its text (the official lookup order)."""
    for path in paths:
        text = _show(repo_dir, commit, path)
        if text is not None:
            return path, text
    raise EvalError(f"{spec.repo}: none of {', '.join(paths)} at {commit}")


def requirements_text(spec: EnvSpec, repo_dir: Path, commit: str) -> str:
    """The official requirements text for `spec` at `commit` of the repository in `repo_dir`:
    the first listed file that exists, `-r` includes inlined first, `-e .`, comments and
    `.[test` lines dropped, yanked packages replaced (swebench's get_requirements)."""
    path, text = _first_file(spec, repo_dir, commit, spec.requirements)
    folder = "/".join(path.split("/")[:-1])
    included, own = [], []
    for line in text.split("\n"):
        if line.strip().startswith("-r"):
            extra = _show(repo_dir, commit, "/".join(p for p in (folder, line.strip()[2:].strip()) if p))
            included += [x for x in (extra or "").split("\n") if not x.strip().startswith(_REQ_EXCLUDED)]
        elif not line.strip().startswith(_REQ_EXCLUDED):
            own.append(line)
    merged = "\n".join([*included, "\n".join(own)])
    for old, new in _REPLACED:
        merged = re.sub(rf"^{re.escape(old)}([<>=!~]=?.*|$)", new, merged, flags=re.MULTILINE)
    return merged


def environment_yml_requirements(spec: EnvSpec, repo_dir: Path, commit: str) -> str:
    """A conda environment.yml as pip requirements (no conda here): its dependencies (a conda
    pin `name=1.2` becomes `name==1.2`; python and pip left out) and its `pip:` list."""
    _, text = _first_file(spec, repo_dir, commit, spec.environment_yml)
    lines, in_deps = [], False
    for raw in text.splitlines():
        stripped = raw.split("#", 1)[0].rstrip()
        if not stripped:
            continue
        if not raw.startswith((" ", "-")):
            in_deps = stripped.startswith("dependencies:")
            continue
        item = stripped.strip().removeprefix("- ").strip().strip("'\"")
        if not in_deps or item.endswith(":") or not item:
            continue
        name = re.split(r"[<>=!~ \[]", item, maxsplit=1)[0].split("::")[-1]
        if name in ("python", "pip"):
            continue
        lines.append(re.sub(r"(?<![<>=!~])=(?!=)", "==", item.split("::")[-1]))
    return "\n".join(lines)


def resolved_for(spec: EnvSpec, repo_dir: Path, commit: str) -> EnvSpec:
    """`spec` with its requirements file / environment.yml read from the repository at `commit`
    and turned into an install step (so the environment's key depends on what it installs)."""
    if not (spec.requirements or spec.environment_yml):
        return spec
    text = requirements_text(spec, repo_dir, commit) if spec.requirements else \
        environment_yml_requirements(spec, repo_dir, commit)
    delimiter = "EOF_59812759871"  # the official heredoc delimiter
    step = (f"cat <<'{delimiter}' > /tmp/requirements.txt\n{text}\n{delimiter}\n"
            "python -m pip install -r /tmp/requirements.txt")
    return replace(spec, install=(step, *spec.install), requirements=(), environment_yml=())


# --- Python interpreters -------------------------------------------------------------------------

def _runs(python: str, version: str) -> bool:
    """Whether `python` starts and is `version` (a pyenv shim for a version not selected is on
    PATH but fails)."""
    try:
        done = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return done.returncode == 0 and done.stdout.strip() == version


def _uv() -> str | None:
    beside = Path(sys.executable).with_name("uv")  # the `uv` package's binary, installed with us
    return str(beside) if beside.is_file() else shutil.which("uv")


def find_python(version: str) -> str:
    """An interpreter for `version`: `pythonX.Y` on PATH that runs, else one uv finds or installs."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / f"python{version}"
        if candidate.is_file() and os.access(candidate, os.X_OK) and _runs(str(candidate), version):
            return str(candidate)
    uv = _uv()
    if uv is None:
        raise EvalError(f"python{version} is not on PATH and uv is not installed to provision it "
                        "(pip install 'v4agent[scale]'), or use --container")
    found = subprocess.run([uv, "python", "find", "--no-project", version], capture_output=True, text=True)
    if found.returncode != 0:
        installed = subprocess.run([uv, "python", "install", version], capture_output=True, text=True)
        if installed.returncode != 0:
            raise EvalError(f"python{version} is not on PATH and `uv python install {version}` failed:\n"
                            f"{installed.stderr.strip()[-2000:]}")
        found = subprocess.run([uv, "python", "find", "--no-project", version], capture_output=True, text=True)
    python = found.stdout.strip()
    if found.returncode != 0 or not _runs(python, version):
        raise EvalError(f"uv found no working python{version}: {found.stderr.strip()[-1000:]}")
    return python


def venv_environ(venv: Path, base: dict[str, str]) -> dict[str, str]:
    """`base` with the venv activated."""
    return {**base, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{base.get('PATH', '')}"}


def ensure_env(spec: EnvSpec, root: Path | None = None) -> Path:
    """The venv for `spec`, built now if this is its first use (under a lock: once per key)."""
    if spec.venv:
        return Path(spec.venv)
    if spec.container_only:
        raise EvalError(f"the environment of {spec.repo} {spec.versions[0]} (an official spec: it installs the "
                        "repository and may run system commands) is built only in a container: use --container")
    venv = (root or evals_cache() / "envs") / spec.env_key
    with locked(venv):
        if (venv / _READY).is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from a crash
        log = venv.with_name(venv.name + ".log")
        steps = [[find_python(spec.python), "-m", "venv", str(venv)]] + [["bash", "-c", c] for c in spec.install]
        for argv in steps:
            # Installs reach the package index, so they keep our environment (proxies, pip config).
            done = run(argv, cwd=venv.parent, env=venv_environ(venv, dict(os.environ)), timeout=1800, log=log)
            if not done.ok:
                raise EvalError(f"building the environment for {spec.repo} failed at {argv[-1]!r}:\n"
                                f"{done.output[-3000:]}\n(full log: {log})")
        (venv / _READY).write_text(json.dumps(asdict(spec), default=list))
    return venv


def runner_environ(venv: Path, spec: EnvSpec, worktree: Path) -> dict[str, str]:
    """What the tests run with: no secrets (tools.shell's allowlist), the venv, the work tree's
    `pythonpath` first, and the spec's own variables."""
    env = venv_environ(venv, scrubbed_env())
    paths = [str(worktree / p) for p in spec.pythonpath]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **spec.env}
