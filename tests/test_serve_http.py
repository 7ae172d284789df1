"""The server of `v4agent serve`.

Converter level, on real DSML written by runtime.encoding and tokenized by the V4 tokenizer:
tool calls parsed back with ids and streamed argument deltas; history re-rendered as the exact
sampled tokens (misses counted); each API's request checks and its stream events.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from runtime.dsml import ContentDelta, ReasoningDelta
from runtime.encoding import EOS, PromptEncoder, PromptSettings, render_completion
from runtime.serve import anthropic_api, openai_api, responses_api
from runtime.serve.chat import (ApiError, Assembler, CallArguments, CallDone, CallStarted, Result, Usage,
                                prompt_ids)
from runtime.serve.toolcalls import ToolCallMap
from runtime.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file.",
                                           "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}]
ANSWER = {"role": "assistant", "reasoning_content": "Look at calc.py first.", "content": "Reading.",
          "tool_calls": [{"function": {"name": "read_file", "arguments": '{"path": "calc.py"}'}},
                         {"function": {"name": "run", "arguments": '{"command": "pytest -q", "timeout": 30}'}}]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def body(*messages: dict, **fields) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": "You fix bugs."}, *messages], "tools": TOOLS,
            **fields}


def sample(tokenizer, calls: ToolCallMap, completion_ids: list[int]) -> tuple[list, Result]:
    """What the server does with sampled tokens: feed them one at a time, then finish."""
    assembler = Assembler(tokenizer, True, calls)
    events = [e for token in completion_ids for e in assembler.feed(token)]
    last, result = assembler.finish("stop", Usage(10, 0, len(completion_ids)))
    return events + last, result


def test_tool_calls_come_back_with_ids_and_argument_deltas(tokenizer):
    text = render_completion(ANSWER)
    events, result = sample(tokenizer, ToolCallMap(), tokenizer.encode(text))
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Look at calc.py first."
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Reading."
    started = [e for e in events if isinstance(e, CallStarted)]
    assert [(e.index, e.name) for e in started] == [(0, "read_file"), (1, "run")]
    assert started[0].id.startswith("call_") and len(started[0].id) == 5 + 24 and started[0].id != started[1].id
    for index, call in enumerate(result.calls):
        deltas = [e.delta for e in events if isinstance(e, CallArguments) and e.index == index]
        assert len(deltas) == (2 if index == 0 else 3)  # one per parameter, then the closing brace
        assert "".join(deltas) == call.arguments and call.id == started[index].id
    assert [json.loads(c.arguments) for c in result.calls] == [{"path": "calc.py"}, {"command": "pytest -q",
                                                                                      "timeout": 30}]
    assert [e.call for e in events if isinstance(e, CallDone)] == result.calls
    assert (result.finish, result.reasoning, result.content) == ("tool_calls", "Look at calc.py first.", "Reading.")


def test_history_renders_as_the_sampled_tokens(tokenizer):
    calls = ToolCallMap()
    encoder = PromptEncoder(tokenizer)
    chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}))
    first = prompt_ids(chat, encoder, "preview", calls)
    text = render_completion(ANSWER)
    # Sampled as the model might: the same text in other tokens than the tokenizer's own split.
    cut = text.index("calc.py\"}") if "calc.py\"}" in text else text.index("calc.py")
    sampled = tokenizer.encode(text[:cut]) + [tokenizer.token_to_id(c) for c in "calc"] + tokenizer.encode(text[cut + 4:])
    assert tokenizer.decode(sampled) == text and sampled != tokenizer.encode(text)
    _, result = sample(tokenizer, calls, sampled)

    # The client sends the turn back as JSON, spaced its own way, reasoning included or not.
    for reasoning in ("Look at calc.py first.", None):
        back = {"role": "assistant", "content": result.content, "reasoning_content": reasoning,
                "tool_calls": [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": json.dumps(json.loads(c.arguments),
                                                                                     separators=(",", ":"))}}
                               for c in result.calls]}
        results = [{"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(result.calls)]
        chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}, back, *results))
        second = prompt_ids(chat, encoder, "preview", calls)
        assert second[:len(first) + len(sampled)] == first + sampled
    assert (calls.hits, calls.misses) == (2, {"unknown": 0, "changed": 0})

    # An id the server never gave out renders canonically, and counts as a miss.
    back["tool_calls"][0]["id"] = "call_forged"
    chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}, back, *results))
    messages = [m.encoding() for m in chat.messages]
    messages[0]["tools"] = TOOLS
    assert prompt_ids(chat, encoder, "preview", calls) == PromptEncoder(tokenizer).encode(messages)
    assert calls.misses == {"unknown": 1, "changed": 0}

    # A known id whose call was changed is not spliced either.
    back["tool_calls"][0]["id"] = result.calls[0].id
    back["tool_calls"][0]["function"]["arguments"] = '{"path": "other.py"}'
    chat = openai_api.parse_request(body({"role": "user", "content": "add is wrong"}, back, *results))
    second = prompt_ids(chat, encoder, "preview", calls)
    assert second[:len(first) + len(sampled)] != first + sampled and calls.misses["changed"] == 1


def test_the_map_is_bounded_by_tokens_and_forgets_the_oldest(tokenizer):
    calls = ToolCallMap(max_tokens=3 * len(tokenizer.encode(render_completion(ANSWER))))
    ids = [sample(tokenizer, calls, tokenizer.encode(render_completion(ANSWER)))[1].calls for _ in range(4)]
    assert len(calls) == 3 and calls.held_tokens <= calls.max_tokens
    settings = (True, None, "Reading.", [("read_file", {"path": "calc.py"}),
                                         ("run", {"command": "pytest -q", "timeout": 30})])
    assert calls.recall([c.id for c in ids[0]], *settings) is None  # the oldest went first
    assert calls.recall([c.id for c in ids[3]], *settings) is not None


@pytest.mark.parametrize("fields, message", [
    ({"messages": "hi"}, "messages must be a list"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content"),
    ({"max_tokens": "10"}, "max_tokens must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"temperature": 3}, "temperature must be between 0 and 2"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort must be one of"),
    ({"tools": [{"type": "function", "function": {"name": 'a"b'}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "JSON schema object"),
    ({"tool_choice": "required"}, "not supported"),
    ({"n": 2}, "n must be 1"),
])
def test_chat_request_errors_name_the_field(fields: dict, message: str):
    with pytest.raises(ApiError) as caught:
        openai_api.parse_request({**body({"role": "user", "content": "hi"}), **fields})
    assert caught.value.status == 400 and message in caught.value.message


@pytest.mark.parametrize("fields, think", [
    ({}, "high"), ({"reasoning_effort": "max"}, "max"), ({"reasoning_effort": "low"}, "high"),
    ({"thinking": {"type": "disabled"}}, "none"), ({"reasoning_effort": "none"}, "none"),
    ({"chat_template_kwargs": {"thinking": False}}, "none"),
    ({"chat_template_kwargs": {"thinking": True, "reasoning_effort": "max"}}, "max"),
])
def test_thinking_switches_map_to_the_three_modes(fields: dict, think: str):
    assert openai_api.parse_request({**body({"role": "user", "content": "hi"}), **fields}).think == think


def test_anthropic_request_becomes_the_same_conversation():
    chat = anthropic_api.parse_request({
        "model": "m", "max_tokens": 100, "system": [{"type": "text", "text": "You fix bugs."}],
        "thinking": {"type": "enabled", "budget_tokens": 4096},
        "tools": [{"name": "read_file", "description": "Read a file.", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "add is wrong"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Look.", "signature": ""},
                                              {"type": "text", "text": "Reading."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "read_file",
                                               "input": {"path": "calc.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "def add"},
                                         {"type": "text", "text": "go on"}]}]})
    assert chat.think == "high" and chat.max_tokens == 100 and chat.tools[0]["name"] == "read_file"
    assert [m.encoding() for m in chat.messages] == [
        {"role": "system", "content": "You fix bugs."}, {"role": "user", "content": "add is wrong"},
        {"role": "assistant", "content": "Reading.", "reasoning_content": "Look.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "read_file", "arguments": '{"path": "calc.py"}'}}]},
        {"role": "tool", "content": "def add", "tool_call_id": "toolu_1"}, {"role": "user", "content": "go on"}]
    with pytest.raises(ApiError, match="max_tokens is required"):
        anthropic_api.parse_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(ApiError, match="image"):
        anthropic_api.parse_request({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {}}]}]})


def test_responses_input_items_group_into_turns():
    chat = responses_api.parse_request({
        "model": "m", "instructions": "You fix bugs.", "reasoning": {"effort": "xhigh"},
        "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}, {"type": "web_search"}],
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "add is wrong"}]},
                  {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Look."}]},
                  {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": '{"cmd": "ls"}'},
                  {"type": "function_call", "call_id": "call_2", "name": "shell", "arguments": '{"cmd": "pwd"}'},
                  {"type": "function_call_output", "call_id": "call_1", "output": "a.py"},
                  {"type": "function_call_output", "call_id": "call_2", "output": "/"}]})
    assert chat.think == "max" and [t["name"] for t in chat.tools] == ["shell"]
    roles = [(m.role, m.reasoning, [c.id for c in m.calls]) for m in chat.messages]
    assert roles == [("system", None, []), ("user", None, []), ("assistant", "Look.", ["call_1", "call_2"]),
                     ("tool", None, []), ("tool", None, [])]
    with pytest.raises(ApiError, match="previous_response_id"):
        responses_api.parse_request({"model": "m", "input": "x", "previous_response_id": "resp_1"})


async def _collect(stream) -> list[str]:
    return [chunk async for chunk in stream]


def _events(tokenizer) -> tuple[list, Result]:
    events, result = sample(tokenizer, ToolCallMap(), tokenizer.encode(render_completion(ANSWER)))

    async def source():
        for event in [*events, result]:
            yield event
    return source, result


def test_anthropic_stream_is_the_documented_event_sequence(tokenizer):
    source, result = _events(tokenizer)
    text = "".join(asyncio.run(_collect(anthropic_api.stream_events(source(), "m"))))
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names == [e["type"] for e in events]
    blocks = [(e["index"], e["content_block"]["type"]) for e in events if e["type"] == "content_block_start"]
    assert blocks == [(0, "thinking"), (1, "text"), (2, "tool_use"), (3, "tool_use")]
    compact = []
    for name in names:  # runs of deltas folded into one
        if not (compact and compact[-1] == name == "content_block_delta"):
            compact.append(name)
    assert compact == ["message_start"] + ["content_block_start", "content_block_delta", "content_block_stop"] * 4 + [
        "message_delta", "message_stop"]
    tool_input = "".join(e["delta"]["partial_json"] for e in events
                         if e["type"] == "content_block_delta" and e["index"] == 3)
    assert json.loads(tool_input) == {"command": "pytest -q", "timeout": 30}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    body = anthropic_api.response_body(result, "m", ())
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert body["content"][3]["id"] == result.calls[1].id and body["stop_reason"] == "tool_use"


def test_responses_stream_items_match_the_whole_response(tokenizer):
    source, result = _events(tokenizer)
    chat = responses_api.parse_request({"model": "m", "input": "x", "stream": True})
    text = "".join(asyncio.run(_collect(responses_api.stream_events(source(), chat, {}))))
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    final = events[-1]["response"]["output"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final and [i["type"] for i in final] == ["reasoning", "message", "function_call", "function_call"]
    whole = responses_api.response_body(result, chat, {})["output"]
    strip = lambda items: [{k: v for k, v in i.items() if k != "id"} for i in items]  # noqa: E731
    assert strip(whole) == strip(final)
    assert final[3]["call_id"] == result.calls[1].id and json.loads(final[3]["arguments"])["timeout"] == 30
