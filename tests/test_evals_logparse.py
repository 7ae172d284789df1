"""How the grader finds the official parsers and test directives (the parsing itself is the
official package's, held to it by tests/test_evals_official.py), and what it says when the
official package is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evals.grader import runner_args
from evals.logparse import parser_for, parser_name, repo_parser
from evals.proc import EvalError


def test_spec_table_names_and_dataset_names_map_to_the_official_registry():
    from swebench.harness.log_parsers import PARSER_REGISTRY

    assert parser_name("pytest") == "parse_log_pytest" and parser_name("django") == "parse_log_django"
    assert parser_name("parse_log_pytest_v2") == "parse_log_pytest_v2"
    assert parser_for("sympy") is PARSER_REGISTRY["parse_log_sympy"]
    with pytest.raises(EvalError, match="unknown log parser 'nose'.*pytest_options"):
        parser_name("nose")


def test_a_row_without_a_parser_gets_its_repositorys_official_one():
    assert repo_parser("sympy/sympy") == "parse_log_sympy"
    assert repo_parser("django/django") == "parse_log_django"
    assert repo_parser("astropy/astropy") == "parse_log_pytest_v2"
    assert repo_parser("psf/requests") == "parse_log_pytest_options"
    assert repo_parser("acme/unknown") is None


def test_directives_are_the_official_ones():
    """Every file of the test patch but the official non-test extensions: conftest.py,
    __init__.py and deleted files included, as the 4.x harness passed them."""
    patch = "".join(f"diff --git a/{p} b/{p}\n--- a/{p}\n+++ b/{p}\n@@ -1 +1 @@\n-x\n+y\n" for p in
                    ("tests/test_a.py", "tests/data/input.json", "tests/conftest.py", "tests/admin/test_b.py",
                     "tests/notes.txt", "tests/table.csv"))
    patch += ("diff --git a/tests/test_old.py b/tests/test_old.py\ndeleted file mode 100644\n"
              "--- a/tests/test_old.py\n+++ /dev/null\n")
    assert runner_args(patch, "files") == ["tests/test_a.py", "tests/conftest.py", "tests/admin/test_b.py",
                                           "tests/test_old.py"]
    assert runner_args(patch, "django") == ["test_a", "conftest", "admin.test_b", "test_old"]


def test_without_the_official_package_the_message_says_how_to_install_it():
    code = ("import sys; sys.modules['swebench'] = None\n"  # as if it were not installed
            "from evals.logparse import official\nofficial('harness.grading')")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'v4agent[evals]'" in done.stderr and "swebench==5.0.2" in done.stderr
