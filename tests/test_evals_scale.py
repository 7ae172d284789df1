"""SWE-bench at full scale: the dataset files as Hugging Face distributes them (Parquet, JSONL),
eval workers on a real local Ray cluster (the same results as the local runner, resumable after
an interruption), and the README's quick checks with default options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals import swebench
from evals.agents import EmptyAgent, OracleAgent, Outcome
from evals.envs import SpecTable
from evals.instances import Instance, load_instances
from evals.proc import EvalError, git
from evals.repos import RepoStore

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# The columns of princeton-nlp/SWE-bench_Verified, in its order; every one is a string there
# (FAIL_TO_PASS / PASS_TO_PASS are JSON-encoded lists).
OFFICIAL_COLUMNS = ("repo", "instance_id", "base_commit", "patch", "test_patch", "problem_statement", "hints_text",
                    "created_at", "version", "FAIL_TO_PASS", "PASS_TO_PASS", "environment_setup_commit", "difficulty")

CALC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a + b\n\n\ndef neg(a):\n    return a\n"
FIXES = {"add": ("a - b", "a + b"), "mul": ("a + b\n\n\ndef neg", "a * b\n\n\ndef neg"),
         "neg": ("return a\n", "return -a\n")}
KEEP = "def test_keep():\n    assert True\n"
CALLS = {"add": "add(2, 3) == 5", "mul": "mul(2, 3) == 6", "neg": "neg(4) == -4"}


def _diff(repo: Path, path: str, content: str) -> str:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(content)
    git("add", "--all", cwd=repo)
    patch = git("diff", "--cached", "HEAD", cwd=repo)
    git("reset", "--quiet", "--hard", "HEAD", cwd=repo)
    return patch


def _rows(source: Path) -> list[dict[str, str]]:
    """Three instances of one small repository, as rows of the official dataset (all strings)."""
    repo = source / "acme__calc"
    repo.mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    (repo / "tests").mkdir()
    (repo / "tests" / "test_calc.py").write_text(KEEP)
    git("init", "--quiet", cwd=repo)
    git("add", "--all", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "base", cwd=repo)
    base = git("rev-parse", "HEAD", cwd=repo).strip()
    rows = []
    for n, (name, (bad, good)) in enumerate(FIXES.items()):
        test = f"{KEEP}\n\nfrom calc import {name}\n\n\ndef test_{name}():\n    assert {CALLS[name]}\n"
        rows.append({
            "repo": "acme/calc", "instance_id": f"acme__calc-{n + 1}", "base_commit": base,
            "patch": _diff(repo, "calc.py", CALC.replace(bad, good)),
            "test_patch": _diff(repo, "tests/test_calc.py", test),
            "problem_statement": f"{name}() is wrong", "hints_text": f"look at {name}",
            "created_at": f"2024-0{n + 1}-01T10:00:00Z",
            "version": "1.0", "FAIL_TO_PASS": json.dumps([f"tests/test_calc.py::test_{name}"]),
            "PASS_TO_PASS": json.dumps(["tests/test_calc.py::test_keep"]), "environment_setup_commit": base,
            "difficulty": "<15 min fix"})
    return rows


@pytest.fixture()
def dataset(tmp_path: Path):
    """The rows, a repo source folder, and a spec table running the tests in this interpreter."""
    rows = _rows(tmp_path / "source")
    spec = tmp_path / "specs.json"
    spec.write_text(json.dumps({"spec": [{"repo": "acme/calc", "versions": ["1.0"], "python": "3.11",
                                          "venv": sys.prefix, "pythonpath": ["."],
                                          "test_cmd": "python -m pytest -rA -p no:cacheprovider"}]}))
    return rows, tmp_path / "source", spec


def _parquet(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(c, pa.string()) for c in OFFICIAL_COLUMNS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# --- the dataset files ---------------------------------------------------------------------------

def test_parquet_jsonl_and_dataset_folder_give_the_same_instances(dataset, tmp_path: Path) -> None:
    rows, _, _ = dataset
    parquet = _parquet(rows, tmp_path / "hf" / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "hf" / "README.md").write_text("dataset card\n")
    jsonl = tmp_path / "verified.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_parquet = load_instances(parquet)
    assert from_parquet == load_instances(jsonl) == load_instances(tmp_path / "hf")
    first = from_parquet[0]
    assert isinstance(first, Instance) and first.instance_id == "acme__calc-1"
    assert first.fail_to_pass == ("tests/test_calc.py::test_add",)  # decoded from the JSON string
    assert first.pass_to_pass == ("tests/test_calc.py::test_keep",)
    assert (first.hints_text, first.created_at) == ("look at add", "2024-01-01T10:00:00Z")
    assert first.environment_setup_commit == rows[0]["base_commit"] and first.extra["difficulty"] == "<15 min fix"
    assert [i.instance_id for i in load_instances(parquet, ["acme__calc-3"])] == ["acme__calc-3"]


def test_parquet_timestamps_and_bad_files(dataset, tmp_path: Path) -> None:
    rows, _, _ = dataset
    # a copy whose created_at column is a real timestamp (as some exports store it): ISO text
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in OFFICIAL_COLUMNS]))
    stamps = pa.array([1704103200000000] * 3, type=pa.timestamp("us", tz="UTC"))
    table = table.set_column(table.schema.get_field_index("created_at"), "created_at", stamps)
    pq.write_table(table, tmp_path / "stamped.parquet")
    assert load_instances(tmp_path / "stamped.parquet")[0].created_at == "2024-01-01T10:00:00+00:00"

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(EvalError, match="not a readable Parquet file"):
        load_instances(tmp_path / "broken.parquet")
    twice = tmp_path / "twice"
    _parquet(rows, twice / "data" / "dev-00000.parquet")
    _parquet(rows[:1], twice / "data" / "test-00000.parquet")
    with pytest.raises(EvalError, match="more than once: acme__calc-1"):
        load_instances(twice)
    missing = dict(rows[0])
    del missing["base_commit"]
    (tmp_path / "missing.jsonl").write_text(json.dumps(missing) + "\n")
    with pytest.raises(EvalError, match="missing base_commit"):
        load_instances(tmp_path / "missing.jsonl")


# --- Ray ----------------------------------------------------------------------------------------

ray = pytest.importorskip("ray")


def test_ray_address_that_answers_nothing_is_a_clear_error(dataset, tmp_path: Path) -> None:
    rows, source, spec = dataset
    assert not ray.is_initialized()  # runs before the module's cluster starts
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(EvalError, match="--ray 127.0.0.1:1: cannot connect"):
        swebench.run(load_instances(jsonl), _config(tmp_path / "x", source, spec, OracleAgent(), "127.0.0.1:1"))


def test_what_workers_send_back_stays_inside_the_run_folder(tmp_path: Path) -> None:
    """A link an item left is sent as a link (never the worker's file it points at), and a path
    leading out of the output folder is refused."""
    from evals.ray_runner import _work, _write

    def leave_files(item: str, out: Path) -> dict:
        folder = out / "tasks" / item
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("{}")
        (folder / "secret").symlink_to("/etc/hostname")
        return {"item": item}

    record, files = _work(leave_files, "t")
    assert record == {"item": "t"} and files == {"tasks/t/result.json": b"{}", "tasks/t/secret": "/etc/hostname"}
    out = tmp_path / "out"
    _write(out, files)
    assert (out / "tasks/t/secret").is_symlink() and os.readlink(out / "tasks/t/secret") == "/etc/hostname"
    for evil in ({"../evil": b"x"}, {"/tmp/evil": b"x"}, {"tasks/l": str(tmp_path), "tasks/l/evil": b"x"}):
        with pytest.raises(EvalError, match="a path outside"):
            _write(out, evil)
    assert not (tmp_path / "evil").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray cluster for the module (starting one costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # The test module's agent class travels by value: Ray's workers cannot import tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


class WhereAgent(OracleAgent):
    """The gold patch, saying which process produced it."""

    def solve(self, instance, worktree, logs) -> Outcome:
        outcome = super().solve(instance, worktree, logs)
        outcome.detail = {"pid": os.getpid()}
        return outcome


def _config(out: Path, source: Path, spec: Path, agent, ray_address: str | None) -> swebench.RunConfig:
    return swebench.RunConfig(out=out, agent=agent, store=RepoStore(source), specs=SpecTable(spec), workers=2,
                              ray=ray_address)


def _comparable(out: Path) -> dict[str, object]:
    """Everything of a run's output but times and the driver's process id."""
    reports = {}
    for report in sorted((out / "instances").glob("*/report.json")):
        (iid, record), = json.loads(report.read_text()).items()
        reports[iid] = {k: v for k, v in record.items() if k not in ("timings", "test_seconds", "agent_detail")}
    files = sorted(str(p.relative_to(out)) for p in (out / "instances").rglob("*") if p.is_file())
    return {"reports": reports, "files": files, "summary": json.loads((out / "summary.json").read_text()),
            "predictions": (out / "predictions.jsonl").read_text()}


def test_ray_workers_give_the_local_runners_results(dataset, tmp_path: Path, ray_cluster) -> None:
    rows, source, spec = dataset
    jsonl = tmp_path / "verified.jsonl"
    # a fourth instance whose repository does not exist: an error on either runner
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {**rows[0], "instance_id": "ghost__x-1",
                                                                         "repo": "ghost/x"}]))
    instances = load_instances(jsonl)
    local = swebench.run(instances, _config(tmp_path / "local", source, spec, WhereAgent(), None))
    remote = swebench.run(instances, _config(tmp_path / "ray", source, spec, WhereAgent(), "auto"))
    assert local == remote
    assert local["resolved_ids"] == ["acme__calc-1", "acme__calc-2", "acme__calc-3"]
    assert local["error_ids"] == ["ghost__x-1"]
    assert _comparable(tmp_path / "local") == _comparable(tmp_path / "ray")
    pids = {json.loads(p.read_text())[p.parent.name]["agent_detail"]["pid"]
            for p in (tmp_path / "ray" / "instances").glob("acme*/report.json")}
    assert pids and os.getpid() not in pids  # the instances ran in Ray's worker processes

    empty = swebench.run(instances[:3], _config(tmp_path / "empty", source, spec, EmptyAgent(), "auto"))
    assert empty["resolved"] == 0 and empty["empty_patch"] == 3


def test_an_interrupted_ray_run_picks_up_where_it_left_off(dataset, tmp_path: Path, ray_cluster) -> None:
    rows, source, spec = dataset
    jsonl = tmp_path / "verified.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    instances = load_instances(jsonl)
    out = tmp_path / "run"
    done: list[str] = []

    def interrupt(instance: Instance, record: dict) -> None:  # Ctrl-C once the first instance is in
        done.append(instance.instance_id)
        raise KeyboardInterrupt

    cfg = _config(out, source, spec, WhereAgent(), "auto")
    cfg.workers = 1
    with pytest.raises(KeyboardInterrupt):
        swebench.run(instances, cfg, interrupt)
    first = out / "instances" / done[0] / "report.json"
    kept = (first.read_bytes(), first.stat().st_mtime_ns)
    assert len(list((out / "instances").glob("*/report.json"))) == 1

    seen: list[str] = []
    summary = swebench.run(instances, cfg, lambda i, r: seen.append(i.instance_id))
    assert sorted(seen) == [i.instance_id for i in instances] and summary["resolved"] == 3
    assert (first.read_bytes(), first.stat().st_mtime_ns) == kept  # not run again


def test_terminal_bench_tasks_on_ray_as_on_the_local_runner(tmp_path: Path, ray_cluster) -> None:
    from evals import tbench
    from evals.tbench_tasks import load_tasks

    tasks = load_tasks(Path(tbench.__file__).parent / "data" / "tbench")
    local = tbench.run_tasks(tasks, tbench.TbenchConfig(out=tmp_path / "local", agent="oracle", workers=2))
    remote = tbench.run_tasks(tasks, tbench.TbenchConfig(out=tmp_path / "ray", agent="oracle", workers=2, ray="auto"))
    assert local == remote and remote["resolved"] == len(tasks) == 3

    def files(out: Path) -> list[str]:
        return sorted(str(p.relative_to(out)) for p in (out / "tasks").rglob("*") if p.is_file())

    assert files(tmp_path / "local") == files(tmp_path / "ray")
    for task in tasks:
        rewards = [json.loads((tmp_path / run / "tasks" / task.name / "result.json").read_text())[task.name]["rewards"]
                   for run in ("local", "ray")]
        assert rewards[0] == rewards[1]


def test_the_cli_joins_a_running_cluster(dataset, tmp_path: Path, ray_cluster) -> None:
    """`--ray ADDRESS` from another process: the driver joins this module's cluster."""
    rows, source, spec = dataset
    jsonl = tmp_path / "verified.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    address = ray.get_runtime_context().gcs_address
    done = _cli("eval", "swebench", str(jsonl), "--agent", "oracle", "--repo-source", str(source), "--env-spec",
                str(spec), "--ray", address, "--workers", "2", "--out", str(tmp_path / "out"), "--json", cwd=tmp_path)
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (done.returncode, summary["resolved"]) == (0, 3), done.stdout + done.stderr


# --- the README's quick checks, exactly as documented (default --out, relative to the cwd) ---------

def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    v4agent = Path(sys.executable).with_name("v4agent")
    return subprocess.run([str(v4agent), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_readme_quick_check_tbench_mini_oracle(tmp_path: Path) -> None:
    done = _cli("eval", "tbench", "mini", "--agent", "oracle", "--json", cwd=tmp_path)
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (done.returncode, summary["total"], summary["resolved"]) == (0, 3, 3), done.stdout + done.stderr
    assert Path(summary["out"]) == tmp_path / "eval-runs" / "tbench-oracle"


def test_readme_quick_check_swebench_mini(tmp_path: Path) -> None:
    """Needs PyPI (the mini set's sdists), like tests/test_evals_mini.py."""
    oracle = _cli("eval", "swebench", "mini", "--agent", "oracle", "--json", cwd=tmp_path)
    summary = json.loads(oracle.stdout.splitlines()[-1])
    assert (oracle.returncode, summary["total"], summary["resolved"]) == (0, 5, 5), oracle.stdout + oracle.stderr
    assert Path(summary["out"]) == tmp_path / "eval-runs" / "swebench-oracle"
    empty = _cli("eval", "swebench", "mini", "--agent", "empty", "--json", cwd=tmp_path)
    summary = json.loads(empty.stdout.splitlines()[-1])
    assert (empty.returncode, summary["total"], summary["resolved"]) == (0, 5, 0), empty.stdout + empty.stderr


# --- environments: the official specs, Python interpreters ------------------------------------------

def test_official_specs_for_all_twelve_verified_repositories() -> None:
    """Needs PyPI once (the swebench 4.1.0 wheel, cached and hash checked)."""
    from evals.envs import VERIFIED_REPOS, official_tables

    table = SpecTable()
    specs = official_tables()["specs"]
    assert len(VERIFIED_REPOS) == 12
    for repo in VERIFIED_REPOS:
        assert specs[repo], repo
        for version, raw in specs[repo].items():
            spec = table.lookup(repo, version)
            assert (spec.repo, spec.versions, spec.python, spec.repo_install) == (repo, (version,), raw["python"],
                                                                                raw.get("install"))
            assert spec.test_cmd == raw["test_cmd"] and spec.container_only
    django = table.lookup("django/django", "3.0")
    assert (django.python, django.test_directives, django.log_parser) == ("3.6", "django", "parse_log_django")
    assert django.requirements == ("tests/requirements/py3.txt",) and "export LANG=en_US.UTF-8" in django.eval_commands
    assert table.lookup("sympy/sympy", "1.12").log_parser == "parse_log_sympy"
    assert table.lookup("astropy/astropy", "5.0").log_parser == "parse_log_astropy"
    assert table.lookup("pydata/xarray", "2022.06").environment_yml == ("ci/requirements/environment.yml",
                                                                        "environment.yml")
    sklearn = table.lookup("scikit-learn/scikit-learn", "0.20")
    assert sklearn.python == "3.6" and any("numpy==1.19.2" in step for step in sklearn.install)
    with pytest.raises(EvalError, match="no django/django version 0.1"):
        table.lookup("django/django", "0.1")
    from evals.envs import ensure_env
    with pytest.raises(EvalError, match="use --container"):
        ensure_env(django)


def test_requirements_and_environment_yml_read_from_the_repository(tmp_path: Path) -> None:
    """As the official get_requirements / environment.yml reading, from git instead of GitHub."""
    from evals.envs import environment_yml_requirements, requirements_text, resolved_for

    repo = tmp_path / "r"
    (repo / "tests" / "requirements").mkdir(parents=True)
    (repo / "tests" / "requirements" / "py3.txt").write_text("-r base.txt\n# a comment\n-e .\nasgiref >= 3.2\n")
    (repo / "tests" / "requirements" / "base.txt").write_text("pytz\ntypes-pkg_resources==0.1\n")
    (repo / "environment.yml").write_text("name: env\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.10\n"
                                         "  - numpy=1.23\n  - pip\n  - pip:\n      - pytest-xdist\n")
    git("init", "--quiet", cwd=repo)
    git("add", "--all", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "env", cwd=repo)
    commit = git("rev-parse", "HEAD", cwd=repo).strip()
    django = SpecTable().lookup("django/django", "3.0")
    assert requirements_text(django, repo, commit).split("\n") == ["pytz", "types-setuptools", "", "asgiref >= 3.2", ""]
    resolved = resolved_for(django, repo, commit)
    assert resolved.install[0].endswith("python -m pip install -r /tmp/requirements.txt") and not resolved.requirements
    xarray = SpecTable().lookup("pydata/xarray", "2022.06")
    assert environment_yml_requirements(xarray, repo, commit).split("\n") == ["numpy==1.23", "pytest-xdist"]


def test_find_python_skips_an_interpreter_on_path_that_does_not_run(tmp_path: Path, monkeypatch) -> None:
    """A pyenv shim for a version that is not selected is on PATH and fails: the next one counts."""
    from evals.envs import find_python

    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python3.11").write_text("#!/bin/sh\necho 'pyenv: python3.11: command not found' >&2\nexit 127\n")
    (shims / "python3.11").chmod(0o755)
    real = Path(sys.executable).resolve()
    good = tmp_path / "good"
    good.mkdir()
    (good / "python3.11").symlink_to(real)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{good}{os.pathsep}/usr/bin:/bin")
    assert find_python("3.11") == str(good / "python3.11")


def test_uv_provisions_a_python_that_is_not_on_path(tmp_path: Path, monkeypatch) -> None:
    """uv downloads CPython builds from GitHub: where it cannot (this project's machines reach
    only the package registries), the test skips with uv's own message."""
    from evals.envs import find_python

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no pythonX.Y of ours on PATH
    monkeypatch.setenv("UV_PYTHON_INSTALL_DIR", str(tmp_path / "uv-python"))
    try:
        python = find_python("3.9")
    except EvalError as e:
        if "uv python install 3.9` failed" in str(e) and ("Failed to download" in str(e) or "dns" in str(e).lower()):
            pytest.skip(f"uv cannot download CPython here: {str(e)[-400:]}")
        raise
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    assert version.stdout.strip() == "(3, 9)"
