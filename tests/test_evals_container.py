"""`--container`: SWE-bench instances graded in a real container (podman or Docker) on images
built here: the base from a Debian root file system (mmdebstrap), an environment image, and one
instance container whose network is cut before the tests run.

Building the base image takes minutes (mmdebstrap), so these tests use it only when it is
already there (`python -m evals.container base` builds it; CI does that as a cached step); the
build itself is the `slow` test. Without a working engine they skip, saying why."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from evals import swebench
from evals.agents import OracleAgent, PredictionsAgent
from evals.container import Engine, base_image, base_image_name, detect_engine, image_exists, official_base_packages
from evals.envs import SpecTable
from evals.instances import load_instances
from evals.repos import RepoStore
from tests.test_evals_scale import _rows

pytestmark = pytest.mark.container


def _engine_or_skip() -> Engine:
    engine = detect_engine()
    if engine is None:
        answers = [subprocess.run([cli, "info"], capture_output=True, text=True) for cli in ("podman", "docker")
                   if subprocess.run(["which", cli], capture_output=True).returncode == 0]
        reasons = "; ".join(a.stderr.strip()[-300:] for a in answers) or "neither podman nor docker is installed"
        pytest.skip(f"no container engine answers here: {reasons}")
    return engine


def _base_or_skip(engine: Engine) -> str:
    image = base_image_name()  # base_image() would build it when missing: the slow test's job
    if not image_exists(engine, image):
        pytest.skip(f"the base image {image} is not built: python -m evals.container base (minutes)")
    probe = subprocess.run([engine.cli, "run", "--rm", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
                            "--network", "none", image, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{engine.cli} cannot run a container here: {probe.stderr.strip()[-500:]}")
    return image


@pytest.mark.slow
def test_build_the_base_image_from_debian() -> None:
    engine = _engine_or_skip()
    assert {"git", "build-essential", "python3"} <= set(official_base_packages())  # the official Dockerfile's
    image = base_image(engine)
    done = subprocess.run([engine.cli, "run", "--rm", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
                           "--network", "none", image, "bash", "-c",
                           "git --version && python3 -m venv /tmp/v && gcc --version"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_instance_graded_in_a_container(tmp_path: Path) -> None:
    engine = _engine_or_skip()
    _base_or_skip(engine)
    rows = _rows(tmp_path / "source")
    jsonl = tmp_path / "instances.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"spec": [{
        "repo": "acme/calc", "versions": ["1.0"], "python": "3.11", "install": ["python -m pip install pytest==8.3.5"],
        "pythonpath": ["."],
        "test_cmd": "python -c 'import os, sys; print(\"interpreter\", sys.prefix, \"network\", sorted(os.listdir("
                    "\"/sys/class/net\")))'; python -m pytest -rA -p no:cacheprovider"}]}))
    instances = load_instances(jsonl)
    # each instance given the other's fix: applies, runs, and its FAIL_TO_PASS test still fails
    swapped = PredictionsAgent({row["instance_id"]: {"instance_id": row["instance_id"], "model_name_or_path": "swap",
                                                     "model_patch": other["patch"]}
                                for row, other in zip(rows[:2], rows[1::-1], strict=True)})
    results = {}
    for name, agent in (("oracle", OracleAgent()), ("swap", swapped)):
        cfg = swebench.RunConfig(out=tmp_path / name, agent=agent, store=RepoStore(tmp_path / "source"),
                                 specs=SpecTable(spec), engine=engine)
        results[name] = swebench.run(instances, cfg)
    assert results["oracle"]["resolved_ids"] == ["acme__calc-1", "acme__calc-2"], results
    assert results["swap"]["unresolved_ids"] == ["acme__calc-1", "acme__calc-2"], results
    output = (tmp_path / "oracle" / "instances" / "acme__calc-1" / "test_output.txt").read_text()
    assert "interpreter /opt/venv network ['lo']" in output  # the image's venv; no network but loopback
    assert "2 passed" in output
    assert "1 failed, 1 passed" in (tmp_path / "swap" / "instances" / "acme__calc-1" / "test_output.txt").read_text()
    leftovers = subprocess.run([engine.cli, "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True)
    assert "v4agent-eval-" not in leftovers.stdout  # every instance container removed



@pytest.mark.slow
def test_the_official_django_spec_in_a_container(tmp_path: Path) -> None:
    """Django 5.0 from its PyPI sdist (as the mini set gets its repositories), graded on the
    official spec: Python 3.11, tests/requirements/py3.txt read from the repository, `pip install
    -e .`, Django's runner on dotted labels, the official Django parser. Minutes cold (PyPI)."""
    engine = _engine_or_skip()
    _base_or_skip(engine)
    from evals.proc import git
    from evals.repos import download_sdist, sdist_commit

    bare = tmp_path / "source" / "django__django.git"
    bare.mkdir(parents=True)
    git("init", "--quiet", "--bare", str(bare), cwd=tmp_path)
    base = sdist_commit(bare, download_sdist("Django==5.0.1"), "refs/heads/base")
    work = tmp_path / "work"
    git("clone", "--quiet", "--shared", str(bare), str(work), cwd=tmp_path)
    git("checkout", "--quiet", base, cwd=work)

    def diff(path: str, added: str) -> str:
        with (work / path).open("a") as handle:
            handle.write(added)
        patch = git("diff", cwd=work)
        git("checkout", "--quiet", "--", ".", cwd=work)
        return patch

    record = {
        "repo": "django/django", "instance_id": "django__django-1", "base_commit": base, "version": "5.0",
        "environment_setup_commit": base, "problem_statement": "add shout()", "hints_text": "", "created_at": "",
        "patch": diff("django/utils/text.py", "\n\ndef shout(value):\n    return str(value).upper() + '!'\n"),
        "test_patch": diff("tests/utils_tests/test_text.py",
                           "\n\nclass ShoutTests(SimpleTestCase):\n    def test_shout(self):\n"
                           "        from django.utils.text import shout\n\n"
                           "        self.assertEqual(shout('hi'), 'HI!')\n\n"
                           "    def test_slug(self):\n        self.assertEqual(text.slugify('A b'), 'a-b')\n"),
        "FAIL_TO_PASS": json.dumps(["test_shout (utils_tests.test_text.ShoutTests.test_shout)"]),
        "PASS_TO_PASS": json.dumps(["test_slug (utils_tests.test_text.ShoutTests.test_slug)"])}
    (tmp_path / "django.jsonl").write_text(json.dumps(record) + "\n")
    cfg = swebench.RunConfig(out=tmp_path / "out", agent=OracleAgent(), store=RepoStore(tmp_path / "source"),
                             specs=SpecTable(), engine=engine)
    summary = swebench.run(load_instances(tmp_path / "django.jsonl"), cfg)
    folder = tmp_path / "out" / "instances" / "django__django-1"
    assert summary["resolved_ids"] == ["django__django-1"], (folder / "report.json").read_text()
    assert "python -m pip install -e ." in (folder / "setup.log").read_text()
    assert "runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 utils_tests.test_text" in (
        folder / "test_output.txt").read_text()
