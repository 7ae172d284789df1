"""The agent loop with a scripted policy on a real work tree and the real tokenizer: the
conversation only grows (and equals encoding it whole), malformed calls and replies without
calls become messages and the loop goes on, and each stop condition ends the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.backends import Completion, Listener, Request
from agent.backends.scripted import ScriptedBackend
from runtime.dsml import ReasoningDelta
from runtime.encoding import EOS, PromptEncoder
from agent.loop import (BACKEND_ERROR, CONTEXT_FULL, INTERRUPTED, MAX_TOKENS, MAX_TURNS, REPEATED_CALL, SUBMITTED,
                        Agent, AgentConfig, ConversationError, ToolRan, TurnFinished, TurnStarted)
from agent.pack import pack_repository
from agent.trajectory import Trajectory
from runtime.tokenizer import load_tokenizer
from tests.fixtures_agent import FIXED, fix_turns, isolate, make_repo

LIMIT = 1_048_576
READ = {"tool_calls": [{"name": "read_file", "arguments": {"path": "calc.py"}}]}
SUBMIT = {"tool_calls": [{"name": "submit", "arguments": {"summary": "done"}}]}


class Recording:
    """A backend around another that keeps every prompt and completion it saw."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.context_limit = inner.name, inner.context_limit
        self.turns: list[tuple[list[int], Completion]] = []

    def complete(self, request: Request, listener: Listener) -> Completion:
        completion = self.inner.complete(request, listener)
        self.turns.append((list(request.ids), completion))
        return completion

    def describe(self) -> dict:
        return self.inner.describe()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate(monkeypatch, tmp_path)
    return make_repo(tmp_path / "repo")


def agent_for(turns, tokenizer, repo: Path, tmp_path: Path, **config) -> tuple[Agent, Recording, list]:
    backend = Recording(ScriptedBackend(turns, config.pop("context_limit", LIMIT)))
    events: list = []
    agent = Agent(backend, tokenizer, repo, config=AgentConfig(**config),
                  trajectory=Trajectory(tmp_path / "trajectory.jsonl"), listener=events.append)
    return agent, backend, events


def test_a_scripted_fix_grows_one_conversation_equal_to_encoding_it_whole(tokenizer, repo: Path, tmp_path: Path):
    agent, backend, events = agent_for(fix_turns(), tokenizer, repo, tmp_path)
    packed = pack_repository(repo, budget=agent.repository_budget("add is wrong"), tokenizer=tokenizer)
    result = agent.run("add is wrong", packed)
    assert (result.stop, result.turns, result.summary) == (SUBMITTED, 4, "add adds; tests pass")
    assert (repo / "calc.py").read_text() == FIXED

    # Every prompt is the previous prompt, the completion as produced, and the new turn.
    eos = tokenizer.token_to_id(EOS)
    for (prompt, completion), (next_prompt, _) in zip(backend.turns, backend.turns[1:]):
        produced = PromptEncoder(tokenizer).encode_text(completion.text)
        assert produced[-1] == eos
        assert next_prompt[:len(prompt) + len(produced)] == prompt + produced
    # ... and the ids equal the whole conversation encoded from scratch (the packed ids spliced in right).
    messages = agent.conversation.messages
    assert agent.conversation.ids == PromptEncoder(tokenizer, agent.config.prompt_settings).encode(messages)
    assert "calc.py" in messages[1]["content"] and "add is wrong" in messages[1]["content"]
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "tool"] * 3 + ["assistant"]
    assert result.tokens_in == sum(len(p) for p, _ in backend.turns)
    assert result.context_tokens == len(agent.conversation.ids)

    kinds = [type(e) for e in events]
    assert kinds.count(TurnStarted) == kinds.count(TurnFinished) == 4 and kinds.count(ToolRan) == 4
    assert any(isinstance(e, ReasoningDelta) and "Read calc.py" in e.text for e in events)
    records = _records(tmp_path)
    assert [r["type"] for r in records] == ["turn"] * 4 + ["end"]
    assert records[2]["results"][0]["output"].startswith("[exit code 0]")
    assert records[-1]["stop"] == SUBMITTED


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "trajectory.jsonl").read_text().splitlines()]


def test_malformed_calls_are_reported_and_the_model_retries(tokenizer, repo: Path, tmp_path: Path):
    broken = ('I will read it.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="read_file">\n'
              '<｜DSML｜parameter name="path" string="true">calc.py</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="start_line" string="false">{one</｜DSML｜parameter>\n'
              '</｜DSML｜invoke>\n<｜DSML｜invoke name="list_dir">\n</｜DSML｜invoke>\n'
              f'</｜DSML｜tool_calls>{EOS}')
    agent, backend, _ = agent_for([{"completion": broken}, READ, SUBMIT], tokenizer, repo, tmp_path)
    result = agent.run("read calc.py")
    assert result.stop == SUBMITTED and result.turns == 3
    first = _records(tmp_path)[0]
    # The well-formed call ran; the broken one did not, and the model was told exactly why.
    assert [r["name"] for r in first["results"]] == ["list_dir"]
    assert 'Tool call 1 (read_file), parameter "start_line": expected a JSON value' in first["feedback"]
    assert first["errors"][0]["tool"] == "read_file"
    reply = agent.conversation.messages[4]
    assert reply["role"] == "user" and "were malformed" in reply["content"]


def test_replies_without_calls_and_cut_off_replies_get_told(tokenizer, repo: Path, tmp_path: Path):
    cut = {"completion": "I am thinking at length and the limit hits"}  # no EOS: cut off
    agent, backend, _ = agent_for([{"content": "It is probably calc.py."}, cut, SUBMIT], tokenizer, repo, tmp_path,
                                  max_turn_tokens=4096)
    result = agent.run("fix add")
    assert result.stop == SUBMITTED
    records = _records(tmp_path)
    assert "called no tool" in records[0]["feedback"]
    assert records[1]["cut_off"] and "cut off at the limit of 4096 tokens" in records[1]["feedback"]
    # The cut-off turn was closed with EOS before the reply, so the conversation stays well-formed.
    eos = tokenizer.token_to_id(EOS)
    prompt2, completion2 = backend.turns[1]
    produced = PromptEncoder(tokenizer).encode_text(completion2.text)
    assert backend.turns[2][0][len(prompt2) + len(produced)] == eos


def test_a_repeated_identical_call_stops_the_run(tokenizer, repo: Path, tmp_path: Path):
    same_again = {"tool_calls": [{"name": "read_file", "arguments": '{"path":  "calc.py"}'}]}  # other spelling
    agent, _, _ = agent_for([READ, same_again, SUBMIT], tokenizer, repo, tmp_path)
    result = agent.run("fix add")
    assert (result.stop, result.turns) == (REPEATED_CALL, 2)
    assert _records(tmp_path)[1]["results"] == []  # the repeat is not run


def test_limits_stop_the_run(tokenizer, repo: Path, tmp_path: Path):
    agent, _, _ = agent_for([READ, {"content": "hm"}, READ, SUBMIT], tokenizer, repo, tmp_path, max_turns=2)
    assert (agent.run("fix add").stop, agent.turns) == (MAX_TURNS, 2)

    agent, _, _ = agent_for([READ, {"content": "hm"}, SUBMIT], tokenizer, repo, tmp_path / "t",
                            max_total_tokens=40, max_turn_tokens=30)
    result = agent.run("fix add")
    assert result.stop == MAX_TOKENS and result.tokens_out >= 40

    agent, _, _ = agent_for([READ, READ], tokenizer, repo, tmp_path / "c", context_limit=1200, max_turn_tokens=100)
    result = agent.run("fix add")  # the tools block alone nearly fills 1,200 tokens
    assert (result.stop, result.turns) == (CONTEXT_FULL, 0)

    agent, _, _ = agent_for([READ], tokenizer, repo, tmp_path / "e")
    result = agent.run("fix add")
    assert result.stop == BACKEND_ERROR and "no more turns" in result.error


def test_ctrl_c_ends_the_run_and_keeps_the_record(tokenizer, repo: Path, tmp_path: Path):
    class Interrupted(ScriptedBackend):
        def complete(self, request, listener):
            if self.played == 1:
                raise KeyboardInterrupt
            return super().complete(request, listener)

    agent = Agent(Interrupted([READ, SUBMIT], LIMIT), tokenizer, repo,
                  trajectory=Trajectory(tmp_path / "trajectory.jsonl"))
    result = agent.run("fix add")
    assert (result.stop, result.turns) == (INTERRUPTED, 1)
    assert [r["type"] for r in _records(tmp_path)] == ["turn", "end"]


def test_a_rewritten_history_is_caught(tokenizer, repo: Path, tmp_path: Path):
    agent, _, _ = agent_for([READ, SUBMIT], tokenizer, repo, tmp_path, max_turns=1)
    agent.run("fix add")
    agent.conversation.ids[3] += 1
    with pytest.raises(ConversationError, match="does not start with the previous prompt"):
        agent.step()
