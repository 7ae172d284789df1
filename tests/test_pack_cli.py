"""`v4agent pack`: the report, the JSON summary, and exit code 2 with a one-line error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent.cli.pack import pack_cmd

# The command as agent/cli/__init__.py registers it.
app = typer.Typer()
app.command("pack")(pack_cmd)
app.callback()(lambda: None)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    body = "".join(f"    x = x * {i} + {i}\n" for i in range(10))
    (root / "pkg" / "core.py").write_text("".join(f"def f{i}(x):\n{body}    return x\n\n" for i in range(10)))
    (root / "pkg" / "small.py").write_text("VALUE = 1\n")
    (root / "logo.png").write_bytes(b"\x89PNG\0")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, ["pack", *args])


def test_json_summary(repo: Path):
    result = invoke(str(repo), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files_full"] == 2 and summary["files_outlined"] == 0 and summary["files_dropped"] == 0
    assert summary["files_skipped"] == 1 and summary["skipped"] == [{"path": "logo.png", "reason": "binary or data"}]
    assert summary["total_tokens"] == sum(f["tokens"] for f in summary["files"]) > 0
    tight = json.loads(invoke(str(repo), "--json", "--budget", "200", "--issue", "VALUE").stdout)
    assert tight["total_tokens"] <= 200 and tight["files_outlined"] == 1 and tight["files_full"] == 1


def test_report(repo: Path):
    result = invoke(str(repo), "--budget", "200", "--issue", "VALUE is wrong")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{repo.resolve()}: ") and "of a 200 budget" in lines[0]
    assert "full: 1 files" in result.stdout and "outlined: 1 files" in result.stdout
    assert any(line.strip().endswith("pkg/small.py  relevance 1.00") for line in lines)
    assert lines[-2:] == ["skipped: 1 files (binary or data 1)", "  logo.png  (binary or data)"]


def test_bad_input_exits_2_with_one_line(tmp_path: Path):
    for path in (tmp_path, tmp_path / "missing"):
        result = invoke(str(path))
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert invoke(str(tmp_path), "--budget", "0").exit_code == 2
