"""The bundled mini SWE-bench set end to end, through the CLI: repositories rebuilt from PyPI
sdists at their recorded base commits, environments built and shared, and then the oracle
resolves every instance under the official grader (the set's ids are the official parser's) and
the empty agent's empty patches are not run, as officially. The output folder is relative, and
the official run report is written by the official code. Needs PyPI (pip download, pip
install); about a minute cold on 2 cores, seconds once the evals cache is warm."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from agent.cli.eval import app

MINI_IDS = ["martinblech__xmltodict-0.14.2", "pallets__jinja-3.1.4", "python-poetry__tomlkit-0.12.2",
            "r1chardj0n3s__parse-1.20.1", "r1chardj0n3s__parse-1.20.2"]


def _summary(agent: str, *extra: str) -> dict:
    result = CliRunner().invoke(app, ["swebench", "mini", "--agent", agent, "--workers", "2",
                                      "--out", f"runs/{agent}", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])  # the official report prints on stderr


def test_oracle_resolves_the_mini_set_and_empty_patches_are_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out is relative to it
    oracle = _summary("oracle", "--report-official")
    assert (oracle["errors"], oracle["resolved"], oracle["total"]) == (0, 5, 5), oracle
    assert oracle["out"] == str(tmp_path / "runs" / "oracle")
    official = json.loads((tmp_path / "runs" / "oracle" / "oracle.oracle.json").read_text())  # <model>.<run_id>.json
    assert (official["schema_version"], official["resolved_ids"], official["error_ids"]) == (2, MINI_IDS, [])
    assert official["completed_instances"] == official["submitted_instances"] == 5
    report = json.loads((tmp_path / "runs" / "oracle" / "instances" / "pallets__jinja-3.1.4" / "report.json").read_text())
    # an id with a space ends at it, as the official parser spells it
    assert "tests/test_filters.py::TestFilter::test_xmlattr_key_invalid[" in (
        report["pallets__jinja-3.1.4"]["tests_status"]["FAIL_TO_PASS"]["success"])
    empty = _summary("empty")
    assert (empty["errors"], empty["resolved"], empty["unresolved"], empty["empty_patch"]) == (0, 0, 0, 5)
