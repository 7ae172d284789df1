"""The official SWE-bench log parsers, by name: the pinned `swebench` package's own.

Nothing here parses a log itself: the harness grades with the official code (evals.grader), so
ids, statuses and quirks are the official ones by construction (a parametrized id with a space
ends at the space, the last line for a test wins, XPASS is not a pass...). This module finds the
package (with a clear message when it is missing or another version), and maps the names a
spec table or a dataset row uses to the official registry: `pytest` and `django` (the spec
table's short names), `parse_log_pytest`, `parse_log_sympy`... (PARSER_REGISTRY), and a
repository's official parser when a row names none (MAP_REPO_TO_PARSER_PY).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from evals.proc import EvalError

SWEBENCH_VERSION = "5.0.2"  # the official harness the grades are identical to (pyproject's `evals` extra)
INSTALL_HINT = f"pip install 'v4agent[evals]' (or pip install swebench=={SWEBENCH_VERSION})"
# The official markers around the test command's output (swebench.harness.constants).
START_MARK, END_MARK = ">>>>> Start Test Output", ">>>>> End Test Output"


def official(module: str) -> ModuleType:
    """`swebench.<module>` from the pinned official package, or EvalError saying how to get it."""
    try:
        import swebench
    except ImportError as e:
        raise EvalError(f"grading needs the official SWE-bench package ({e}): {INSTALL_HINT}") from None
    if swebench.__version__ != SWEBENCH_VERSION:
        raise EvalError(f"swebench {swebench.__version__} is installed; the grader is pinned to "
                        f"{SWEBENCH_VERSION}: {INSTALL_HINT}")
    try:
        return importlib.import_module(f"swebench.{module}")
    except ImportError as e:  # one of its own dependencies is missing
        raise EvalError(f"the official SWE-bench package cannot be imported ({e}): {INSTALL_HINT}") from None


def parser_name(name: str) -> str:
    """The official registry name for `name` (`pytest` -> `parse_log_pytest`); EvalError if none."""
    registry = official("harness.log_parsers").PARSER_REGISTRY
    key = name if name.startswith("parse_log_") else f"parse_log_{name}"
    if key not in registry:
        raise EvalError(f"unknown log parser {name!r} (the official ones: "
                        f"{', '.join(k.removeprefix('parse_log_') for k in registry)})")
    return key


def parser_for(name: str) -> Callable[[str, Any], dict[str, str]]:
    """The official parser function for `name` (log text, test spec) -> {test id: status}."""
    return official("harness.log_parsers").PARSER_REGISTRY[parser_name(name)]


def repo_parser(repo: str) -> str | None:
    """The official parser's registry name for a repository SWE-bench knows, else None."""
    function = official("harness.log_parsers.python").MAP_REPO_TO_PARSER_PY.get(repo)
    if function is None:
        return None
    registry = official("harness.log_parsers").PARSER_REGISTRY
    return next(name for name, found in registry.items() if found is function)

