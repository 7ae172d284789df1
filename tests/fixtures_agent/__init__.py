"""Shared pieces of the agent tests: a fixture repository with a real failing pytest test, the
scripted fix for it, and isolation from the user's settings and cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GIT_IDENTITY = ("-c", "user.name=Test", "-c", "user.email=test@example.com")
BUGGY = "def add(a, b):\n    return a - b\n"
FIXED = "def add(a, b):\n    return a + b\n"
PYTEST = f"{sys.executable} -m pytest -q -p no:cacheprovider"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def make_repo(root: Path) -> Path:
    """A committed repository whose test fails: calc.add subtracts."""
    root.mkdir(parents=True)
    (root / "calc.py").write_text(BUGGY)
    (root / "test_calc.py").write_text("from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    (root / "notes.txt").write_text("notes\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "initial")
    return root


def fix_turns(test_command: str = PYTEST) -> list[dict]:
    """The scripted policy that fixes make_repo's bug: read, edit, run the tests, submit."""
    return [
        {"reasoning": "The test says add(2, 3) should be 5. Read calc.py.",
         "tool_calls": [{"name": "read_file", "arguments": {"path": "calc.py"}}]},
        {"reasoning": "It subtracts.", "tool_calls": [{"name": "edit_file", "arguments": {
            "path": "calc.py", "old_text": "return a - b", "new_text": "return a + b"}}]},
        {"tool_calls": [{"name": "run", "arguments": {"command": test_command}}]},
        {"content": "Fixed.", "tool_calls": [{"name": "submit", "arguments": {"summary": "add adds; tests pass"}}]},
    ]


def write_script(path: Path, turns: list[dict]) -> Path:
    path.write_text(json.dumps(turns))
    return path


def isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """No user config, no V4AGENT_* variables, a private cache; returns the cache root."""
    for name in list(os.environ):
        if name.startswith("V4AGENT_") or name in ("DEEPSEEK_API_KEY", "OPENAI_API_KEY"):
            monkeypatch.delenv(name)
    # no config file: the default place is empty (V4AGENT_CONFIG naming a missing file is an error)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "no-config"))
    monkeypatch.setenv("V4AGENT_CACHE", str(root / "cache"))
    return root / "cache"
