"""Build the bundled mini SWE-bench set (`mini_swebench.jsonl`) from PyPI alone.

Each instance is a real upstream fix between two consecutive releases of a small pure-Python
project whose sdist ships its tests: the base is the older release's sdist committed
deterministically (evals.repos.sdist_commit: fixed author, date and message, so the harness
rebuilds the same base_commit anywhere), the gold `patch` is the newer release's change to the
fixed source files (version-string bumps left out), the `test_patch` its change to the tests.
FAIL_TO_PASS and PASS_TO_PASS come from running the tests with the harness's grader, before (no
patch) and after (gold patch), and so are spelled as the official parser spells them (a
parametrized id ends at its first space); passing is the official PASSED or XFAIL.

    python evals/data/build_mini_swebench.py [--out evals/data/mini_swebench.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

from evals.envs import SpecTable, ensure_env
from evals.grader import grade
from evals.instances import parse_instance
from evals.proc import git
from evals.repos import RepoStore, download_sdist, sdist_commit

HERE = Path(__file__).parent

MINI = [
    {"instance_id": "martinblech__xmltodict-0.14.2", "repo": "martinblech/xmltodict", "sdist": "xmltodict",
     "base": "0.14.1", "fixed": "0.14.2", "version": "0.14", "source": ["xmltodict.py"],
     "tests": ["tests/test_xmltodict.py"],
     "problem_statement": "With the default strip_whitespace=True, an element that holds only whitespace keeps it "
                          "when it has no attributes or children: parse('<root> </root>') returns {'root': ' '}, and "
                          "an empty element with whitespace inside a parent comes back as a string of spaces. "
                          "Whitespace-only text should be stripped to None for every element, as it is for "
                          "elements with attributes; strip_whitespace=False must keep it."},
    {"instance_id": "r1chardj0n3s__parse-1.20.1", "repo": "r1chardj0n3s/parse", "sdist": "parse",
     "base": "1.20.0", "fixed": "1.20.1", "version": "1.20", "source": ["parse.py"], "tests": ["tests/test_parse.py"],
     "problem_statement": "The %f directive in a datetime format only matches exactly six digits, so "
                          "parse.parse('{dt:%Y-%m-%d %H:%M:%S.%f}', '2023-11-21 13:23:27.123') returns None, although "
                          "strptime accepts one to six digits (.123 is 123000 microseconds). Also, a compiled Parser "
                          "does not expose the format string it was built from: add a read-only `format` property "
                          "(parse.compile('hello {}').format == 'hello {}'; assigning it raises AttributeError)."},
    {"instance_id": "r1chardj0n3s__parse-1.20.2", "repo": "r1chardj0n3s/parse", "sdist": "parse",
     "base": "1.20.1", "fixed": "1.20.2", "version": "1.20", "source": ["parse.py"], "tests": ["tests/test_parse.py"],
     "problem_statement": "Field names containing a hyphen are not recognised: parse.search('/local/sub/{user-id}/"
                          "duration', 'https://x/local/sub/1647222638/duration') does not match. The field should be "
                          "found (Parser(template).named_fields == ['user_id']) and the result keyed by its name "
                          "(result['user-id'] == '1647222638'). Names that become equal once '-' and '.' are "
                          "replaced ({user-id}/{user_id}/{user.id}) must still get distinct groups."},
    {"instance_id": "python-poetry__tomlkit-0.12.2", "repo": "python-poetry/tomlkit", "sdist": "tomlkit",
     "base": "0.12.1", "fixed": "0.12.2", "version": "0.12", "source": ["tomlkit/items.py", "tomlkit/container.py"],
     "tests": ["tests/test_items.py"],
     "problem_statement": "True division of a tomlkit Integer returns a plain int-typed item or fails to keep the "
                          "TOML representation: after doc = parse('int = 33'); i = doc['int']; i /= 2, i should be a "
                          "tomlkit Float equal to 16.5 whose as_string() is '16.5'. The reflected division "
                          "(2 / i) should behave the same way. Also, overwriting a sub table with a plain value "
                          "raises an error."},
    {"instance_id": "pallets__jinja-3.1.4", "repo": "pallets/jinja", "sdist": "jinja2", "base": "3.1.3",
     "fixed": "3.1.4", "version": "3.1", "source": ["src/jinja2/filters.py"], "tests": ["tests/test_filters.py"],
     "problem_statement": "The xmlattr filter rejects keys with spaces, but keys containing '/', '>' or '=' are "
                          "still accepted, so a key such as 'class/onclick=alert(1)' injects an attribute. Any "
                          "character that moves an HTML parser out of the attribute-name state (whitespace, '/', "
                          "'>', '=') must make xmlattr raise ValueError('Invalid character in attribute name: ...')."},
]

PASSING = ("PASSED", "XFAIL")  # swebench.harness.grading.test_passed
_VERSION_LINE = re.compile(r"^__version__\s*=.*$", re.MULTILINE)


def _extract(archive: Path, dest: Path) -> Path:
    shutil.unpack_archive(archive, dest, filter="data")
    (top,) = list(dest.iterdir())
    return top


def _diff(worktree: Path, fixed_tree: Path, paths: list[str]) -> str:
    """The change to `paths` from the base work tree to the fixed release, `__version__` kept."""
    for path in paths:
        new = (fixed_tree / path).read_text()
        old_version = _VERSION_LINE.search((worktree / path).read_text())
        if old_version:  # a release's version bump is not part of its fix
            new = _VERSION_LINE.sub(lambda _, line=old_version.group(0): line, new, count=1)
        (worktree / path).write_text(new)
    patch = git("diff", "--", *paths, cwd=worktree)
    git("checkout", "--quiet", "--", ".", cwd=worktree)
    return patch


def build(entry: dict, tmp: Path, store: RepoStore, specs: SpecTable) -> dict:
    base_archive = download_sdist(f"{entry['sdist']}=={entry['base']}")
    fixed_archive = download_sdist(f"{entry['sdist']}=={entry['fixed']}")
    bare = tmp / "bare.git"
    git("init", "--quiet", "--bare", str(bare), cwd=tmp)
    base_commit = sdist_commit(bare, base_archive, "refs/heads/base")
    worktree = tmp / "tree"
    git("clone", "--quiet", "--branch", "base", str(bare), str(worktree), cwd=tmp)
    fixed_tree = _extract(fixed_archive, tmp / "fixed")
    record = {
        "instance_id": entry["instance_id"], "repo": entry["repo"], "base_commit": base_commit,
        "patch": _diff(worktree, fixed_tree, entry["source"]),
        "test_patch": _diff(worktree, fixed_tree, entry["tests"]),
        "problem_statement": entry["problem_statement"], "version": entry["version"],
        "environment_setup_commit": base_commit, "FAIL_TO_PASS": [], "PASS_TO_PASS": [],
        "sdist": f"{entry['sdist']}=={entry['base']}",
        "sdist_sha256": hashlib.sha256(base_archive.read_bytes()).hexdigest(),
    }
    instance = parse_instance(record)
    spec = specs.lookup(instance.repo, instance.version)
    venv = ensure_env(spec)
    results = {}
    for name, patch in (("before", ""), ("after", instance.patch)):
        logs = tmp / name
        grade(instance, patch, store.checkout(instance, tmp / f"{name}-tree"), spec, venv, logs)
        results[name] = json.loads((logs / "test_results.json").read_text())
    before, after = results["before"], results["after"]
    record["FAIL_TO_PASS"] = sorted(t for t, s in after.items() if s in PASSING and before.get(t) not in PASSING)
    record["PASS_TO_PASS"] = sorted(t for t, s in after.items() if s in PASSING and before.get(t) in PASSING)
    if not record["FAIL_TO_PASS"]:
        raise SystemExit(f"{entry['instance_id']}: no test fails before the fix and passes after it")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "mini_swebench.jsonl")
    args = parser.parse_args()
    store, specs = RepoStore(), SpecTable()
    lines = []
    for entry in MINI:
        with tempfile.TemporaryDirectory() as tmp:
            record = build(entry, Path(tmp), store, specs)
        print(f"{record['instance_id']}: {len(record['FAIL_TO_PASS'])} FAIL_TO_PASS, "
              f"{len(record['PASS_TO_PASS'])} PASS_TO_PASS")
        lines.append(json.dumps(record))
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
