"""The in-process backend on a tiny random checkpoint with the real vocabulary: full turns run
through the runtime's Session (the text is noise; the plumbing, progress and stats are what is
tested), the second turn prefills only what was appended, and a rewritten history is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.backends import BackendError, Prefill, Request
from agent.backends.local import LocalBackend
from agent.loop import MAX_TURNS, Agent, AgentConfig
from agent.pack import pack_repository
from agent.trajectory import Trajectory
from runtime.session import SamplingParams
from runtime.tokenizer import load_tokenizer
from tests.fixtures_agent import isolate, make_repo


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_v4: Path) -> Path:
    return tiny_v4


def test_turns_through_the_runtime_session(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate(monkeypatch, tmp_path)
    repo = make_repo(tmp_path / "repo")
    tokenizer = load_tokenizer(tiny_checkpoint)
    backend = LocalBackend.load(tiny_checkpoint, tokenizer, SamplingParams(temperature=0), device="cpu")
    assert backend.context_limit == 4096  # the model's own
    events: list = []
    agent = Agent(backend, tokenizer, repo, config=AgentConfig(max_turns=2, max_turn_tokens=8),
                  trajectory=Trajectory(tmp_path / "t.jsonl"), listener=events.append)
    budget = agent.repository_budget("add is wrong")
    assert 0 < budget < 4096
    result = agent.run("add is wrong", pack_repository(repo, budget=budget, tokenizer=tokenizer))
    assert (result.stop, result.turns) == (MAX_TURNS, 2)

    first, second = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()][:2]
    assert 1 <= first["stats"]["output_tokens"] <= 8
    assert first["stats"]["cached_tokens"] == 0
    assert first["details"]["prefilled"] == first["stats"]["prompt_tokens"]
    # Turn 2 reuses all the session holds: turn 1's prompt and the tokens it sampled.
    assert second["stats"]["cached_tokens"] == first["stats"]["prompt_tokens"] + first["stats"]["output_tokens"]
    assert second["details"]["prefilled"] == second["stats"]["prompt_tokens"] - second["stats"]["cached_tokens"]
    assert result.cached_tokens == second["stats"]["cached_tokens"]
    # The session holds exactly the conversation: replayed tokens, never re-tokenized text.
    held = backend.session.tokens
    assert held == agent.conversation.ids[:len(held)]
    assert len(held) == second["stats"]["prompt_tokens"] + second["stats"]["output_tokens"]

    prefills = [e for e in events if isinstance(e, Prefill)]
    assert prefills[0] == Prefill(0, first["details"]["prefilled"])
    assert Prefill(first["details"]["prefilled"], first["details"]["prefilled"]) in prefills
    assert prefills[-1] == Prefill(second["details"]["prefilled"], second["details"]["prefilled"])

    with pytest.raises(BackendError, match="does not extend"):
        backend.complete(Request([], [5, 6, 7], 4, "high"), events.append)


@pytest.mark.slow  # the same turn again through the command line: another ~2K-token prefill on the CPU
def test_fix_with_weights_runs_the_in_process_backend(tiny_checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    import typer
    from typer.testing import CliRunner

    from agent.cli.fix import fix_cmd

    isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("V4AGENT_MAX_TURN_TOKENS", "8")
    repo = make_repo(tmp_path / "repo")
    app = typer.Typer()
    app.command()(fix_cmd)
    result = CliRunner().invoke(app, ["add is wrong", "--repo", str(repo), "--weights", str(tiny_checkpoint),
                                      "--device", "cpu", "--max-turns", "1", "--json"])
    out = json.loads(result.stdout)
    assert (out["stop"], out["turns"], out["cached_tokens"]) == ("max_turns", 1, 0), result.stderr
    assert 1 <= out["tokens_out"] <= 8 and out["context_limit"] == 4096
    assert result.exit_code == (0 if out["patch"] else 1)
