"""The server against the requests real clients send: Claude Code, Codex CLI, opencode.

The fixtures under tests/fixtures_serve/ are the shapes those clients were seen sending to
`v4agent serve` (docs/serve.md, "Clients": versions and what was run), trimmed by hand: their
fields, headers, roles and block types as sent, with short prompts and a few tools written
for these tests instead of the clients' own 20K-token ones. Each is replayed over real HTTP on
a tiny checkpoint, streamed as the client streams it, and must come back 200 with a well-formed
stream; so CI checks the compatibility without node or the clients installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.encoding import ASSISTANT, EOS, THINK_CLOSE, USER, PromptEncoder
from runtime.serve import anthropic_api, openai_api
from runtime.serve.chat import Assembler, Usage, prompt_ids
from runtime.serve.toolcalls import ToolCallMap
from runtime.tokenizer import load_tokenizer
from tests.test_serve_http import MODEL

FIXTURES = Path(__file__).parent / "fixtures_serve"
KEY = "sk-clients-test"


def test_a_mid_conversation_system_message_is_a_developer_turn_answered_after_it():
    # Claude Code 2.1 puts a {"role": "system"} message after the user's prompt.
    chat = anthropic_api.parse_request({
        "model": "m", "max_tokens": 8, "system": "You fix bugs.",
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "say hi"}]},
                     {"role": "system", "content": [{"type": "text", "text": "Agents available: Explore."}]},
                     {"role": "system", "content": ""}]})
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "You fix bugs."), ("user", "say hi"), ("developer", "Agents available: Explore.")]
    tokenizer = load_tokenizer()
    text = tokenizer.decode(prompt_ids(chat, PromptEncoder(tokenizer), "preview", ToolCallMap()))
    assert text.endswith(f"{USER}say hi{USER}Agents available: Explore.{ASSISTANT}{THINK_CLOSE}")


# ---- the clients' captured request shapes, replayed over HTTP ----------------------------------

@pytest.fixture(scope="module")
def server(tiny_v4):
    from tests.test_serve_http import (
        Running,  # the server on a tiny checkpoint, under uvicorn
    )

    assert tiny_v4.name == MODEL
    running = Running(tiny_v4, load_tokenizer(tiny_v4), api_key=KEY)
    yield running
    running.close()


def replay(server, name: str, **fields) -> tuple[int, list[tuple[str, dict]]]:
    """POST the fixture's body (with `fields` over it) and its headers, as its client does; the
    status and the SSE events as (event name or "", data)."""
    import httpx

    fixture = json.loads((FIXTURES / name).read_text())
    body = {**fixture["body"], "model": MODEL, **fields}
    headers = {**fixture["headers"], "authorization": f"Bearer {KEY}"}
    events, event = [], ""
    with httpx.stream("POST", server.url + fixture["path"], json=body, headers=headers, timeout=120) as response:
        if response.status_code != 200:
            return response.status_code, [("", json.loads(response.read()))]
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                events.append((event, json.loads(line[6:])))
                event = ""
    return 200, events


def test_claude_codes_first_request_streams_back(server):
    # Its 32,000-token max_tokens would run the random model for minutes: 4 are enough here.
    status, events = replay(server, "claude_code_messages.json", max_tokens=4)
    assert status == 200, events
    kinds = [name for name, _ in events if name != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    delta = next(data for name, data in events if name == "message_delta")
    assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn") and delta["usage"]["output_tokens"] >= 1


def test_codexs_first_request_streams_back(server):
    # Codex sends no max_output_tokens (the server may then fill the context): 4 are enough here.
    status, events = replay(server, "codex_responses.json", max_output_tokens=4)
    assert status == 200, events
    kinds = [data["type"] for _, data in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    added = [data["item"]["id"] for _, data in events if data["type"] == "response.output_item.added"]
    assert [item["id"] for item in final["output"]] == added and final["usage"]["output_tokens"] >= 1
    # Codex shows reasoning_output_tokens from here: thinking (the default) starts with reasoning.
    assert 1 <= final["usage"]["output_tokens_details"]["reasoning_tokens"] <= final["usage"]["output_tokens"]


def test_reasoning_tokens_are_counted_up_to_the_think_close():
    tokenizer = load_tokenizer()
    reasoning = tokenizer.encode("Look at calc.py first." + THINK_CLOSE)
    for thinking, answer, expected in ((True, reasoning + tokenizer.encode("Done." + EOS), len(reasoning)),
                                       (True, reasoning[:3], 3),  # cut off while thinking
                                       (False, tokenizer.encode("Done." + EOS), 0)):
        assembler = Assembler(tokenizer, thinking, ToolCallMap())
        for token in answer:
            assembler.feed(token)
        _, result = assembler.finish("stop", Usage(10, 0, len(answer)))
        assert result.usage.reasoning_tokens == expected
        body = openai_api.response_body(result, "m", 0)
        assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": expected}


def test_consecutive_assistant_turns_are_one_turn():
    # Claude Code sends two assistant messages in a row after its "no visible output" retry;
    # Anthropic combines consecutive turns of a role, and V4 has one assistant tag per turn.
    chat = anthropic_api.parse_request({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Greet.", "signature": ""},
                                          {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " there."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}]})
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool"]
    turn = chat.messages[1]
    assert (turn.reasoning, turn.content, [c.name for c in turn.calls]) == ("Greet.", "Hi there.", ["Read"])


def test_claude_codes_billing_header_stays_out_of_the_prompt():
    # Its hash differs between conversations (seen: cc_version=2.1.197.123, then .fa0): kept at
    # the top of the prompt, no new conversation could reuse the cached system prompt and tools.
    fixture = json.loads((FIXTURES / "claude_code_messages.json").read_text())["body"]
    chats = [anthropic_api.parse_request({**fixture, "system": [
        {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.197.{suffix}; cc_entrypoint=sdk-cli;"},
        *fixture["system"][1:]]}) for suffix in ("123", "fa0")]
    assert chats[0].messages[0].content == chats[1].messages[0].content
    assert chats[0].messages[0].content.startswith("You are an agent for software engineering tasks.")


def test_codexs_namespace_tools_are_offered_and_their_calls_name_the_namespace():
    from runtime.serve import responses_api
    from runtime.serve.chat import Call, Result

    body = {**json.loads((FIXTURES / "codex_responses.json").read_text())["body"], "model": "m"}
    chat = responses_api.parse_request(body)
    assert [t["name"] for t in chat.tools] == ["exec_command", "get_goal", "multi_agent_v1.close_agent"]
    calls = [Call("call_1", "multi_agent_v1.close_agent", '{"target": "a1"}'), Call("call_2", "get_goal", "{}")]
    output = responses_api.response_body(Result("", "", calls, "tool_calls", Usage()), chat, body)["output"]
    assert [(i["name"], i.get("namespace")) for i in output] == [("close_agent", "multi_agent_v1"), ("get_goal", None)]
    # Codex sends the items back as they came: the model's turn renders with the names it wrote.
    history = {**body, "input": [*body["input"], *output,
                                 {"type": "function_call_output", "call_id": "call_1", "output": "closed"}]}
    assert [c.name for c in responses_api.parse_request(history).messages[-2].calls] == [c.name for c in calls]


def test_opencodes_first_request_streams_back(server):
    status, events = replay(server, "opencode_chat.json", max_tokens=4)
    assert status == 200, events
    chunks = [data for _, data in events]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
