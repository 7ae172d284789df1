"""The streaming DSML parser: golden case, events, recovery with model-readable errors, strict
mode, and property tests (render -> parse round trips, no foreign exceptions, chunking)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.dsml import (
    ContentDelta, DsmlError, DsmlParser, End, ParameterComplete, ReasoningDelta, ToolCall, ToolCallComplete,
    ToolCallStarted, parse_completion,
)
from runtime.encoding import VALUE_END, EncodingError, PromptSettings, render_completion
from runtime.tokenizer import load_tokenizer

EOS = "<｜end▁of▁sentence｜>"
GOLDEN_5 = ('r</think>c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="x" string="false">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            f"</｜DSML｜tool_calls>{EOS}")


def invoke(name: str, *params: str) -> str:
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def param(name: str, value: str, string: bool = True) -> str:
    return f'<｜DSML｜parameter name="{name}" string="{"true" if string else "false"}">{value}</｜DSML｜parameter>'


def block(*invokes: str, before: str = "r</think>c") -> str:
    return f"{before}\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + f"\n</｜DSML｜tool_calls>{EOS}"


GOOD = invoke("read_file", param("path", "a.py"))
GOOD_CALL = ToolCall("read_file", '{"path": "a.py"}')


def feed_in_chunks(text: str, sizes: list[int], **kwargs) -> tuple[list, object]:
    parser = DsmlParser(**kwargs)
    events, i, k = [], 0, 0
    while i < len(text):
        size = sizes[k % len(sizes)] if sizes else len(text)
        events += parser.feed(text[i: i + size])
        i, k = i + size, k + 1
    events += parser.close()
    return events, parser.finish()


# ---- well-formed -------------------------------------------------------------------------
def test_golden_5():
    message = parse_completion(GOLDEN_5, strict=True)
    assert (message.reasoning, message.content) == ("r", "c")
    assert message.tool_calls == [ToolCall("f", '{"x": [1, 2]}')]
    assert message.to_openai() == {
        "role": "assistant", "content": "c", "reasoning_content": "r",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": [1, 2]}'}}],
    }


def test_events_while_streaming_character_by_character():
    events, message = feed_in_chunks(GOLDEN_5, [1])
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "r"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "c"
    structural = [e for e in events if not isinstance(e, (ReasoningDelta, ContentDelta))]
    assert structural == [ToolCallStarted(0, "f"), ParameterComplete(0, "x", [1, 2]),
                          ToolCallComplete(0, ToolCall("f", '{"x": [1, 2]}')), End(message)]


def test_events_arrive_as_soon_as_they_are_certain():
    parser = DsmlParser()
    assert parser.feed("thinking hard") == [ReasoningDelta("thinking hard")]
    assert parser.feed(" </thi") == [ReasoningDelta(" ")]  # "</thi" may still be the tag
    assert parser.feed("nk>answer\n") == [ContentDelta("answer")]  # a newline may precede a block
    assert parser.feed('\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n') == []
    assert parser.feed('<｜DSML｜parameter') == [ToolCallStarted(0, "f")]
    assert not parser.done
    assert parser.feed(' name="a" string="true">1</｜DSML｜parameter>\n') == [ParameterComplete(0, "a", "1")]
    events = parser.feed(f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}")
    assert events[0] == ToolCallComplete(0, ToolCall("f", '{"a": "1"}')) and isinstance(events[1], End)
    assert parser.done and parser.finish().content == "answer"


def test_plain_answer_in_both_modes():
    assert parse_completion(f"hmm</think>Hello!{EOS}", strict=True).to_openai() == {
        "role": "assistant", "content": "Hello!", "reasoning_content": "hmm", "tool_calls": []}
    message = parse_completion(f"Hello\n\n{EOS}", think=False, strict=True)
    assert (message.reasoning, message.content) == ("", "Hello\n\n")


def test_several_calls_in_one_turn():
    text = block(GOOD, invoke("grep", param("pattern", "x|y"), param("max", "5", False)), invoke("ls"))
    assert parse_completion(text, strict=True).tool_calls == [
        GOOD_CALL, ToolCall("grep", '{"pattern": "x|y", "max": 5}'), ToolCall("ls", "{}")]


def test_empty_tool_calls_block():
    assert parse_completion(f"r</think>c\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>{EOS}", strict=True).tool_calls == []


def test_raw_strings_with_markup_survive():
    raw = ('if a < b and c > "d":\n    print(\'<tool_result>\')\n<｜DSML｜invoke name="fake">\n'
           '</｜DSML｜invoke>\n</｜DSML｜tool_calls><think>\n')
    message = parse_completion(block(invoke("write", param("content", raw))), strict=True)
    assert json.loads(message.tool_calls[0].arguments) == {"content": raw}


def test_unicode_and_full_width_characters():
    text = block(invoke("write", param("path", "说明｜ドキュメント.md"), param("meta", '{"t": "Ü🎉"}', False)),
                 before="考え中｜</think>完了")
    message = parse_completion(text, strict=True)
    assert (message.reasoning, message.content) == ("考え中｜", "完了")
    assert json.loads(message.tool_calls[0].arguments) == {"path": "说明｜ドキュメント.md", "meta": {"t": "Ü🎉"}}


def test_nested_json_values_are_kept_as_written():
    value = '{"edits": [{"line": 3, "text": null}], "n": 1.50}'
    message = parse_completion(block(invoke("edit", param("spec", value, False))), strict=True)
    assert message.tool_calls[0].arguments == '{"spec": ' + value + "}"
    assert json.loads(message.tool_calls[0].arguments)["spec"]["edits"][0] == {"line": 3, "text": None}


def test_feed_ids_joins_characters_split_across_tokens():
    tok = load_tokenizer()
    text = block(invoke("write", param("text", "🎉 世界")), before="ü</think>ok")
    parser = DsmlParser(tokenizer=tok)
    for token_id in tok.encode(text):
        parser.feed_ids([token_id])
    assert parser.done and parser.finish() == parse_completion(text, strict=True)


# ---- recovery: errors the model can act on -----------------------------------------------
def test_bad_json_drops_only_that_call():
    text = block(GOOD, invoke("write_file", param("path", "b.py"), param("mode", "{bad", False)), GOOD)
    message = parse_completion(text)
    assert message.tool_calls == [GOOD_CALL, GOOD_CALL]
    (issue,) = message.errors
    assert (issue.section, issue.call, issue.tool, issue.parameter) == ("tool_calls", 1, "write_file", "mode")
    assert str(issue).startswith('Tool call 2 (write_file), parameter "mode": expected a JSON value since '
                                 'string="false"')
    assert str(issue).endswith('found "{bad".')


def test_missing_string_attribute():
    text = block(invoke("f", '<｜DSML｜parameter name="x">1</｜DSML｜parameter>'), GOOD)
    message = parse_completion(text)
    assert message.tool_calls == [GOOD_CALL]
    assert str(message.errors[0]) == ('Tool call 1 (f): expected  name="NAME" string="true" or string="false"> after '
                                      '<｜DSML｜parameter, found " name=\\"x\\">1".')


def test_duplicate_parameter():
    message = parse_completion(block(invoke("f", param("x", "1"), param("x", "2"))))
    assert message.tool_calls == []
    assert str(message.errors[0]) == 'Tool call 1 (f), parameter "x": expected each parameter at most once, found a second value.'


def test_missing_invoke_close_before_next_invoke():
    text = block(f'<｜DSML｜invoke name="f">\n{param("x", "1")}', GOOD)
    message = parse_completion(text)
    assert message.tool_calls == [GOOD_CALL]
    assert (message.errors[0].call, message.errors[0].expected) == (0, "<｜DSML｜parameter or </｜DSML｜invoke>")


def test_malformed_parameter_close():
    text = block(invoke("f", '<｜DSML｜parameter name="x" string="true">1</｜DSML｜parameter\n'
                        + param("y", "2")), GOOD)
    message = parse_completion(text)
    assert message.tool_calls == [GOOD_CALL]
    assert message.errors[0].call == 0 and "</｜DSML｜parameter> and a newline" in str(message.errors[0])


def test_truncated_inside_a_parameter_keeps_earlier_calls():
    text = block(GOOD)[: -len(f"\n</｜DSML｜tool_calls>{EOS}")] + '\n<｜DSML｜invoke name="w">\n<｜DSML｜parameter name="c" string="true">par'
    message = parse_completion(text)
    assert message.tool_calls == [GOOD_CALL]
    assert [str(e) for e in message.errors] == [
        "At the end of the completion: expected <｜end▁of▁sentence｜>, found the output stopping without it.",
        "Tool call 2 (w): expected </｜DSML｜parameter> to end the parameter, found the end of the completion.",
    ]


def test_missing_think_close_before_tool_calls():
    message = parse_completion(block(GOOD, before="reasoning only"))
    assert message.reasoning == "reasoning only" and message.tool_calls == [GOOD_CALL]
    assert message.errors[0].section == "reasoning" and "</think>" in message.errors[0].expected


def test_missing_blank_line_before_block():
    text = f'r</think>c\n<｜DSML｜tool_calls>\n{GOOD}\n</｜DSML｜tool_calls>{EOS}'
    message = parse_completion(text)
    assert (message.content, message.tool_calls) == ("c", [GOOD_CALL])
    assert str(message.errors[0]) == 'In the content: expected a blank line before <｜DSML｜tool_calls>, found "c\\n".'


def test_invoke_outside_a_block():
    message = parse_completion(f"r</think>Let me look.\n{GOOD}{EOS}")
    assert message.tool_calls == []
    assert message.content == f"Let me look.\n{GOOD}"
    assert message.errors[0].section == "content" and "<｜DSML｜tool_calls>" in message.errors[0].expected


def test_text_between_block_and_eos_and_after_eos():
    message = parse_completion(block(GOOD)[: -len(EOS)] + f"\nDone.{EOS}more")
    assert message.tool_calls == [GOOD_CALL]
    assert [e.expected for e in message.errors] == ["<｜end▁of▁sentence｜> right after </｜DSML｜tool_calls>"]
    parser = DsmlParser()
    parser.feed(f"r</think>c{EOS}la")
    parser.feed("te")
    assert parser.finish().errors[0].found == '"late"'


def test_missing_tool_calls_close():
    message = parse_completion(f"r</think>c\n\n<｜DSML｜tool_calls>\n{GOOD}{EOS}")
    assert message.tool_calls == [GOOD_CALL]
    assert message.errors[0].expected == "</｜DSML｜tool_calls> before the end"


def test_bad_invoke_header():
    message = parse_completion(block('<｜DSML｜invoke nam="f">\n\n</｜DSML｜invoke>', GOOD))
    assert message.tool_calls == [GOOD_CALL]
    assert str(message.errors[0]).startswith('Tool call 1: expected  name="TOOL_NAME"> and a newline after <｜DSML｜invoke')


# ---- strict mode -------------------------------------------------------------------------
MALFORMED = [
    block(invoke("f", param("x", "{bad", False))),
    block(invoke("f", param("x", "1"), param("x", "2"))),
    block(GOOD, before="no think close"),
    f"r</think>c\n<｜DSML｜tool_calls>\n{GOOD}\n</｜DSML｜tool_calls>{EOS}",
    f"r</think>c{EOS}x",
    "r</think>c",
    f"r</think>c<think>{EOS}",
    block(GOOD)[: -len(EOS)] + f" {EOS}",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_strict_rejects_what_recovery_reports(text):
    with pytest.raises(DsmlError) as raised:
        parse_completion(text, strict=True)
    recovered = parse_completion(text)
    assert recovered.errors and raised.value.issue == recovered.errors[0]


# ---- properties --------------------------------------------------------------------------
def joined(pieces: list[str], max_size: int) -> st.SearchStrategy[str]:
    """Text made of the given pieces (tags whole or broken, quotes, newlines, wide characters)."""
    return st.lists(st.sampled_from(pieces), max_size=max_size).map("".join)


NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
TRICKY_TEXT = joined([
    "a", " ", "\n", "<", ">", '"', "'", "/", "｜", "DSML", "<｜DSML｜invoke", "</｜DSML｜invoke>", "<｜DSML｜parameter",
    "</｜DSML｜tool_calls>", "<think>", "</think>", "Ü", "世", "🎉", "\\", "{", "}", "parameter", 'string="true"',
], 40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=12,
)
ARGUMENTS = st.dictionaries(NAMES, st.one_of(TRICKY_TEXT, JSON_VALUES), max_size=5)


@st.composite
def assistant_messages(draw):
    calls = draw(st.lists(st.tuples(NAMES, ARGUMENTS), max_size=3))
    content = draw(st.text(st.sampled_from(["a", " ", "\n", "<", "｜", "世"]), max_size=20))
    reasoning = draw(st.text(st.sampled_from(["b", " ", "\n", "<", ">", "Ü"]), max_size=20))
    return {"role": "assistant", "reasoning_content": reasoning, "content": content,
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls]}


@settings(max_examples=200, deadline=None)
@given(assistant_messages(), st.booleans())
def test_render_then_parse_gives_back_the_arguments(message, think):
    setting = PromptSettings(think="high" if think else "none")
    try:
        text = render_completion(message, setting)
    except EncodingError:
        assert any(VALUE_END in json.dumps(json.loads(c["function"]["arguments"]), ensure_ascii=False)
                   for c in message["tool_calls"])
        return
    parsed = parse_completion(text, think=think, strict=True)
    assert parsed.content == message["content"]
    assert parsed.reasoning == (message["reasoning_content"] if think else "")
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


ANY_TEXT = joined([
    "a", "\n", " ", "<", ">", '"', "｜", "DSML", "｜DSML｜", "tool_calls", "invoke", "parameter", " name=\"x\"",
    ' string="true"', ' string="false"', "</", "/", "<think>", "</think>", EOS, "<｜begin▁of▁sentence｜>", "[1]", "{",
    "\n\n<｜DSML｜tool_calls>\n", '<｜DSML｜invoke name="f">\n', '<｜DSML｜parameter name="p" string="false">',
    "</｜DSML｜parameter>\n", "</｜DSML｜invoke>\n", "</｜DSML｜tool_calls>",
], 40)


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT, st.booleans())
def test_any_text_raises_only_dsml_errors(text, think):
    try:
        parse_completion(text, think=think, strict=True)
    except DsmlError:
        pass
    parse_completion(text, think=think)  # recovering mode never raises


@settings(max_examples=300, deadline=None)
@given(st.one_of(ANY_TEXT, assistant_messages().map(lambda m: render_completion(m, PromptSettings()))),
       st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_chunked_feeding_equals_one_shot(text, sizes):
    events, message = feed_in_chunks(text, sizes)
    assert message == parse_completion(text)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == message.reasoning
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == message.content
    assert [e.call for e in events if isinstance(e, ToolCallComplete)] == message.tool_calls
