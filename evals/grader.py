"""Grading one prediction as the official SWE-bench harness does (`swebench.harness.run_evaluation`
of the pinned package), with the sandbox in place of its container.

In a fresh work tree at the base commit, shown at /testbed:
1. The model patch is applied with the official commands in their order (GIT_APPLY_CMDS: `git
   apply`, `--3way`, `--reject`, `patch --forward --fuzz=5`), the tree reset between tries, then
   the official reverse check. When nothing applies the instance is an error, as officially.
2. The eval script runs, as /eval.sh: the row's `eval_script` (the 5.x datasets) or, for a row
   without one, the script the 4.x harness made for it (make_eval_script_list_py, its conda
   lines left out): reset the test patch's files to the base commit, apply the test patch, run
   the spec table's `test_cmd` on the official test directives between the Start/End markers,
   reset again. The official `make_test_spec` adds the recording of the test command's exit
   status. No idle limit (there is none officially); a run past `timeout` is an error.
3. The log is graded by the official `get_eval_report`: the official parser (the row's
   `log_parser`, else the official one for its repository, else the spec's), statuses, the
   resolved rule, the exit-code check, `infra_failure`.

Every step that touches the prediction runs in the sandbox (evals.sandbox: no network, no
capability even as root, nothing of the host writable but the work tree; its .git too, so the
script's git commands work). The host only reads the fresh checkout before that, and the log.

A prediction that changes test infrastructure (`suspicious_files`) is graded all the same, as
officially, and flagged; `strict` drops those changes before grading (not official).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from evals.envs import EnvSpec, runner_environ
from evals.instances import Instance
from evals.logparse import official, parser_name, repo_parser
from evals.proc import EvalError, Finished, git
from evals.sandbox import Bind
from evals.sandbox import run as sandboxed

TESTBED = "/testbed"  # where the work tree is, as in the official images
PATCH_FILE = "/tmp/patch.diff"  # the official CONTAINER_PATCH_FILE
EVAL_FILE = "/eval.sh"
_HEREDOC = "EOF_114329324912"  # the 4.x harness's delimiter for the test patch
_DIFF_HEADER = re.compile(r"^diff --git a/(.+?) b/(.+)$", re.MULTILINE)
# Test infrastructure: files that decide how tests run or what they report, wherever they are.
INFRA_NAMES = frozenset({"conftest.py", "pytest.ini", ".pytest.ini", "tox.ini", "sitecustomize.py",
                         "usercustomize.py"})
# Files where only some sections are test settings: [tool:pytest], [tool.pytest.ini_options], [tox]...
SECTIONED = frozenset({"setup.cfg", "pyproject.toml"})
_TEST_SECTION = re.compile(r"^(tool[:.])?(pytest|tox)\b")
_SECTION_LINE = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
_HUNK = re.compile(r"^@@ -(\d+)")


@dataclass(frozen=True)
class Limits:
    timeout: float = 1800.0  # the eval script's whole run, as the official harness's --timeout


def patched_files(patch: str) -> list[tuple[str, bool]]:
    """(path, deleted) for each file a unified git diff touches."""
    return [(path, "\n+++ /dev/null" in text or "\ndeleted file mode" in text) for path, text in file_sections(patch)]


def file_sections(patch: str) -> list[tuple[str, str]]:
    """(path, its part of the diff) for each file of a git diff, or of a plain unified diff."""
    if _DIFF_HEADER.search(patch):
        starts = [(m.start(), m.group(2)) for m in _DIFF_HEADER.finditer(patch)]
    else:
        plain = re.finditer(r"^--- .*\n\+\+\+ (?:b/)?([^\t\n]+)", patch, re.MULTILINE)
        starts = [(m.start(), m.group(1).strip()) for m in plain]
    return [(path, patch[start: starts[i + 1][0] if i + 1 < len(starts) else len(patch)])
            for i, (start, path) in enumerate(starts)]


def runner_args(test_patch: str, style: str) -> list[str]:
    """The official test directives: every file the test patch names but the official non-test
    extensions (NON_TEST_EXTS), as paths or, for Django's runner, as dotted labels under tests/."""
    non_test = official("harness.constants").NON_TEST_EXTS
    paths = [p for p in re.findall(r"diff --git a/.* b/(.*)", test_patch) if not any(p.endswith(e) for e in non_test)]
    if style == "django":
        return [p.removesuffix(".py").removeprefix("tests/").replace("/", ".") for p in paths]
    return paths


def made_eval_script(instance: Instance, spec: EnvSpec) -> str:
    """The eval script the 4.x harness made for a row without one (make_eval_script_list_py),
    without its conda lines (the spec's venv is on PATH instead) and its `install` line (the
    environment is built beforehand: `pre_test`, or the container's repository install)."""
    test_files = official("utils").get_modified_files(instance.test_patch)
    reset = f"git checkout {instance.base_commit} {' '.join(test_files)}"
    delimiter = _HEREDOC if _HEREDOC not in instance.test_patch else \
        official("utils").generate_heredoc_delimiter(instance.test_patch)
    style = "django" if instance.repo == "django/django" else spec.test_directives  # the official rule, by repo
    test_cmd = " ".join([spec.test_cmd, *map(shlex.quote, runner_args(instance.test_patch, style))])
    constants = official("harness.constants")
    lines = [f"cd {TESTBED}", *spec.eval_commands, f"git config --global --add safe.directory {TESTBED}",
             f"cd {TESTBED}", "git status",
             "git show", f"git -c core.fileMode=false diff {instance.base_commit}", reset,
             f"git apply -v - <<'{delimiter}'\n{instance.test_patch}\n{delimiter}",
             f": '{constants.START_TEST_OUTPUT}'", test_cmd, f": '{constants.END_TEST_OUTPUT}'", reset]
    return "\n".join(["#!/bin/bash", "set -uxo pipefail", *lines]) + "\n"


def log_parser(instance: Instance, spec: EnvSpec) -> str:
    """The row's parser, else the official one for its repository, else the spec's."""
    return parser_name(instance.log_parser or repo_parser(instance.repo) or spec.log_parser)


def official_spec(instance: Instance, parser: str, eval_script: str = "") -> Any:
    """The official TestSpec (swebench.harness.utils.make_test_spec) for `instance`, graded with
    the official parser `parser`, running `eval_script`."""
    constants = official("harness.constants")
    eval_type = instance.extra.get("eval_type") or (
        constants.EvalType.FAIL_ONLY if instance.repo in constants.FAIL_ONLY_REPOS
        else constants.EvalType.PASS_AND_FAIL).value
    return official("harness.utils").make_test_spec({
        "instance_id": instance.instance_id, "repo": instance.repo, "version": instance.version,
        "image": instance.extra.get("image", ""), "eval_script": eval_script,
        "FAIL_TO_PASS": list(instance.fail_to_pass), "PASS_TO_PASS": list(instance.pass_to_pass),
        "log_parser": parser_name(parser), "eval_type": eval_type, "image_assets": instance.extra.get("image_assets")})


def graded_outcome(instance: Instance, parser: str, done: Finished) -> dict[str, Any]:
    """The official report of a finished eval script whose output is in `done.log`: the fields of
    get_eval_report (with tests_status), and `test_seconds`. Every test the official parser
    found, with its status, goes to test_results.json beside the log."""
    assert done.log is not None
    spec = official_spec(instance, parser)
    grading = official("harness.grading")
    statuses, _ = grading.get_logs_eval(spec, str(done.log))
    done.log.with_name("test_results.json").write_text(json.dumps(statuses, indent=1, sort_keys=True))
    prediction = {"instance_id": instance.instance_id, "model_patch": "graded"}  # a patch exists: it was run
    report = grading.get_eval_report(spec, prediction, str(done.log), include_tests_status=True)
    return {**report[instance.instance_id], "test_seconds": round(done.seconds, 2)}


def suspicious_files(patch: str, instance: Instance, spec: EnvSpec, worktree: Path) -> list[str]:
    """The files of `patch` that are test infrastructure: conftest.py, pytest.ini, tox.ini,
    sitecustomize.py, the pytest/tox sections of setup.cfg and pyproject.toml, the files of the
    test patch, and runner scripts the test command names. `worktree` is at the base commit."""
    test_files = {p for p, _ in patched_files(instance.test_patch)}
    runners = {str(PurePosixPath(w)) for w in shlex.split(spec.test_cmd) if "/" in w and not w.startswith("-")}
    found = []
    for path, text in file_sections(patch):
        name = PurePosixPath(path).name
        if (name in INFRA_NAMES or path in test_files or path in runners
                or (name in SECTIONED and _touches_test_section(text, _base_text(worktree, instance, path)))):
            found.append(path)
    return found


def _base_text(worktree: Path, instance: Instance, path: str) -> str:
    try:  # from git, not the file: a symlink in the tree is not followed
        return git("show", f"{instance.base_commit}:{path}", cwd=worktree)
    except EvalError:
        return ""  # a new file


def _touches_test_section(diff: str, base: str) -> bool:
    """Whether a hunk of `diff` adds or removes a line in a pytest/tox section of the config
    file whose base content is `base` (or adds or removes such a section header)."""
    base_lines = base.splitlines()
    section = ""
    for line in diff.splitlines():
        if m := _HUNK.match(line):
            start = int(m.group(1))
            section = next((h.group(1) for text in reversed(base_lines[: max(start - 1, 0)])
                            if (h := _SECTION_LINE.match(text))), "")
            continue
        if not line[:1] in (" ", "+", "-") or line.startswith(("+++", "---")):
            continue
        if header := _SECTION_LINE.match(line[1:]):
            section = header.group(1)
        if line[0] in "+-" and _TEST_SECTION.match(section.strip("\"'")):
            return True
    return False


def without_files(patch: str, paths: list[str]) -> str:
    """`patch` with the parts for `paths` left out (`--strict`)."""
    sections = file_sections(patch)
    head = patch[: patch.find(sections[0][1])] if sections else patch
    return head + "".join(text for path, text in sections if path not in paths)


def _sandboxed(worktree: Path, argv: list[str], env: dict[str, str], limits: Limits, binds: list[Bind],
               read_only: list[Path]) -> Finished:
    return sandboxed(Bind(worktree, TESTBED), argv, env=env, timeout=limits.timeout, binds=binds,
                     read_only=read_only, writable_git=True)


def apply_model_patch(worktree: Path, patch_file: Path, env: dict[str, str], limits: Limits, log: Path) -> bool:
    """The official application (run_instance): each of GIT_APPLY_CMDS in turn, the tree reset
    between tries, then the reverse check; whether the patch is in. All of it in the sandbox."""
    commands = official("harness.run_evaluation").GIT_APPLY_CMDS
    binds = [Bind(patch_file, PATCH_FILE, writable=False)]

    def step(command: str) -> Finished:
        done = _sandboxed(worktree, ["/bin/bash", "-c", command], env, limits, binds, [])
        with log.open("a") as sink:
            sink.write(f"$ {command}\n{done.output}\n[exit {done.code}]\n")
        return done

    for attempt, command in enumerate(commands):
        if attempt:  # a failed try (--reject above all) leaves a half-applied tree
            step("git checkout -- . ; git clean -fd")
        if step(f"{command} {PATCH_FILE}").ok:
            return True
    return step(f"git apply --check --reverse {PATCH_FILE}").ok


def _read_only(venv: Path) -> list[Path]:
    """The venv and the Python installation it was made from (pyvenv.cfg's `home`)."""
    paths = [venv.resolve()]
    config = venv / "pyvenv.cfg"
    if config.is_file():
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                prefix = Path(value.strip()).resolve().parent
                if not prefix.is_relative_to("/usr") and prefix != Path("/"):
                    paths.append(prefix)
    return paths


def grade(instance: Instance, model_patch: str, worktree: Path, spec: EnvSpec, venv: Path, logs: Path,
          limits: Limits = Limits(), strict: bool = False, runner: Callable[..., Finished] | None = None
          ) -> dict[str, Any]:
    """The official report fields for one non-empty prediction, plus `test_seconds` and
    `suspicious` (and `strict_dropped` with `strict`). `worktree`: a fresh checkout at the base
    commit; `logs`: the instance's folder (patch.diff, eval.sh, run_instance.log, test_output.txt,
    test_results.json). Raises EvalError when the official harness would error (a patch that does
    not apply, a test run past the timeout)."""
    logs.mkdir(parents=True, exist_ok=True)
    for stale in ("test_output.txt", "run_instance.log", "test_results.json"):
        (logs / stale).unlink(missing_ok=True)
    suspicious = suspicious_files(model_patch, instance, spec, worktree)
    extra: dict[str, Any] = {"suspicious": suspicious}
    if strict and suspicious:
        model_patch = without_files(model_patch, suspicious)
        extra["strict_dropped"] = suspicious
    parser = log_parser(instance, spec)
    (logs / "patch.diff").write_text(model_patch, errors="surrogateescape")
    (logs / "eval.sh").write_text(official_spec(instance, parser, instance.eval_script or
                                                made_eval_script(instance, spec)).eval_script)
    env = runner_environ(venv, spec, Path(TESTBED))
    log = logs / "run_instance.log"
    if model_patch.strip() and not apply_model_patch(worktree, logs / "patch.diff", env, limits, log):
        raise EvalError(f"{instance.instance_id}: the patch does not apply (official: an error; "
                        f"see {log})")
    read_only = _read_only(venv)
    run_tests = runner or _sandboxed  # evals.container: the instance's container instead of the sandbox
    for command in spec.pre_test:
        done = run_tests(worktree, ["/bin/bash", "-c", command], env, limits, [], read_only)
        with log.open("a") as sink:
            sink.write(f"$ {command}\n{done.output}\n[exit {done.code}]\n")
        if not done.ok:
            raise EvalError(f"pre_test command {command!r} failed:\n{done.output[-2000:]}")
    done = run_tests(worktree, ["/bin/bash", EVAL_FILE], env, limits,
                      [Bind(logs / "eval.sh", EVAL_FILE, writable=False)], read_only)
    output = done.output
    if done.timed_out:  # what the official harness appends before it gives up on the instance
        output += f"\n\nTimeout error: {limits.timeout:g} seconds exceeded."
    (logs / "test_output.txt").write_text(output)
    if done.timed_out:
        raise EvalError(f"{instance.instance_id}: the tests ran past {limits.timeout:g} s (official: an error)")
    finished = Finished(done.code, output, done.seconds, None, logs / "test_output.txt")
    return {**graded_outcome(instance, parser, finished), **extra}
