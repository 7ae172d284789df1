"""Prompt encoding: the spec's golden cases, cases derived from its rules, piece-wise
tokenization equal to whole-prompt tokenization, and the warm-cache (append-only) property."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.encoding import (
    BOS, EFFORT_PREFIX_A, EFFORT_PREFIX_B, EOS, SPLIT_TOKENS, EncodingError, PromptEncoder, PromptSettings,
    TokenCache, render_completion, render_prompt, split_pieces, wrap_file,
)
from runtime.tokenizer import load_tokenizer

B, E, U, A = BOS, EOS, "<｜User｜>", "<｜Assistant｜>"
THINK = PromptSettings()
CHAT = PromptSettings(think="none")
TOOL = {"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
SYSTEM_WITH_TOOLS = {"role": "system", "content": "S", "tools": [TOOL]}
CONVERSATION = [
    {"role": "user", "content": "A"},
    {"role": "assistant", "reasoning_content": "r1", "content": "c1"},
    {"role": "user", "content": "B"},
]


def call(call_id: str, name: str, **arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def tools_block_of(prompt: str) -> str:
    start = prompt.index("## Tools")
    return prompt[start: prompt.index("invoke tool calls.\n", start) + len("invoke tool calls.\n")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ---- golden cases from the spec ----------------------------------------------------------
def test_golden_1_thinking_no_tools():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert render_prompt(messages, THINK) == f"{B}S{U}Hi{A}<think>"


def test_golden_2_non_think():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert render_prompt(messages, CHAT) == f"{B}S{U}Hi{A}</think>"


def test_golden_3_earlier_reasoning_dropped():
    assert render_prompt(CONVERSATION, THINK) == f"{B}{U}A{A}</think>c1{E}{U}B{A}<think>"


def test_golden_4_tools_keep_reasoning():
    prompt = render_prompt([SYSTEM_WITH_TOOLS, *CONVERSATION], THINK)
    assert prompt.endswith(f"{U}A{A}<think>r1</think>c1{E}{U}B{A}<think>")
    assert prompt.startswith(f"{B}S\n\n## Tools\n\n")


def test_golden_1_ids(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert PromptEncoder(tok).encode(messages) == [0, 53, 128803, 23166, 128804, 128821]


# ---- rules of the spec -------------------------------------------------------------------
def test_tools_block_text():
    block = tools_block_of(render_prompt([SYSTEM_WITH_TOOLS, {"role": "user", "content": "x"}]))
    assert block.startswith(
        "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
        'writing a "<｜DSML｜tool_calls>" block like the following:\n\n<｜DSML｜tool_calls>\n'
        '<｜DSML｜invoke name="$TOOL_NAME">\n<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">'
        "$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n"
    )
    assert "\n\n### Available Tool Schemas\n\n" + json.dumps(TOOL["function"], ensure_ascii=False) + "\n\n" in block
    assert block.endswith("\n\nYou MUST strictly follow the above defined tool name and parameter schemas to "
                          "invoke tool calls.\n")
    assert "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside " \
           "<think>...</think> BEFORE any tool calls or final response." in block


def test_tool_schemas_one_per_line_non_ascii_kept():
    other = {"type": "function", "function": {"name": "grep", "description": "Suche ｜ 検索", "parameters": {}}}
    prompt = render_prompt([{"role": "system", "content": "", "tools": [TOOL, other]}, {"role": "user", "content": "x"}])
    lines = json.dumps(TOOL["function"], ensure_ascii=False) + "\n" + '{"name": "grep", "description": "Suche ｜ 検索", "parameters": {}}'
    assert "\n\n" + lines + "\n\n" in prompt


def test_response_format_block():
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    prompt = render_prompt([{"role": "system", "content": "S", "response_format": schema}, {"role": "user", "content": "Q"}])
    assert prompt == (f"{B}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                      f"{json.dumps(schema)}{U}Q{A}<think>")


def test_response_format_after_tools():
    prompt = render_prompt([{**SYSTEM_WITH_TOOLS, "response_format": {"type": "json_object"}}, {"role": "user", "content": "Q"}])
    assert "invoke tool calls.\n\n\n## Response Format:" in prompt


def test_several_calls_in_one_turn():
    message = {"role": "assistant", "reasoning_content": "plan", "content": "Reading both.", "tool_calls": [
        call("1", "read_file", path="a.py", start=10), call("2", "grep", pattern="x", flags=["-n", "-i"])]}
    assert render_completion(message, THINK) == (
        "plan</think>Reading both.\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="read_file">\n'
        '<｜DSML｜parameter name="path" string="true">a.py</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="start" string="false">10</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="grep">\n'
        '<｜DSML｜parameter name="pattern" string="true">x</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="flags" string="false">["-n", "-i"]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        f"</｜DSML｜tool_calls>{E}"
    )


def test_call_without_arguments_and_non_think_completion():
    message = {"role": "assistant", "content": "", "tool_calls": [call("1", "list_files")]}
    assert render_completion(message, CHAT) == (
        f'\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="list_files">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>{E}')


def test_tool_results_merged_and_reordered_by_call_order():
    messages = [
        SYSTEM_WITH_TOOLS, {"role": "user", "content": "go"},
        {"role": "assistant", "reasoning_content": "r", "content": "", "tool_calls": [
            call("c1", "read_file", path="a"), call("c2", "read_file", path="b"), call("c3", "read_file", path="c")]},
        {"role": "tool", "tool_call_id": "c3", "content": "C"},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "c2", "content": "B"},
    ]
    prompt = render_prompt(messages)
    assert prompt.endswith(
        f"{E}{U}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\n<tool_result>C</tool_result>{A}<think>")


def test_user_text_after_tool_results_joins_the_turn():
    messages = [
        SYSTEM_WITH_TOOLS, {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [call("x", "read_file", path="a"), call("y", "read_file", path="b")]},
        {"role": "tool", "tool_call_id": "y", "content": "B"},
        {"role": "user", "content": "Also check c."},
        {"role": "tool", "tool_call_id": "x", "content": "A"},
    ]
    # Results are reordered among themselves; the text block keeps its place.
    assert render_prompt(messages, CHAT).endswith(
        f"{E}{U}<tool_result>A</tool_result>\n\nAlso check c.\n\n<tool_result>B</tool_result>{A}</think>")


def test_unknown_tool_result_ids_sort_first():
    messages = [
        SYSTEM_WITH_TOOLS, {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [call("a", "f"), call("b", "f")]},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "zzz", "content": "Z"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    ]
    assert f"{U}<tool_result>Z</tool_result>\n\n<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>" \
        in render_prompt(messages)


def test_unicode_and_full_width_characters_kept_verbatim():
    message = {"role": "assistant", "content": "完成｜ok", "tool_calls": [
        call("1", "write", path="ドキュメント/说明.md", meta={"title": "Ü｜全角", "emoji": "🎉"})]}
    out = render_completion(message, CHAT)
    assert '<｜DSML｜parameter name="path" string="true">ドキュメント/说明.md</｜DSML｜parameter>' in out
    assert '<｜DSML｜parameter name="meta" string="false">{"title": "Ü｜全角", "emoji": "🎉"}</｜DSML｜parameter>' in out
    assert out.startswith("完成｜ok\n\n")


def test_raw_strings_are_written_as_is():
    tricky = 'a < b && "q" > \'s\'\nline2\n<｜DSML｜invoke name="x">\n</｜DSML｜invoke>\n<tool_result></think>'
    out = render_completion({"role": "assistant", "tool_calls": [call("1", "write", content=tricky)]}, CHAT)
    assert f'<｜DSML｜parameter name="content" string="true">{tricky}</｜DSML｜parameter>' in out


def test_nested_json_arguments_use_default_separators():
    arguments = {"edits": [{"line": 3, "text": None, "ok": True}, {"range": [1.5, -2]}], "opts": {}}
    out = render_completion({"role": "assistant", "tool_calls": [call("1", "edit", **arguments)]}, CHAT)
    assert ('<｜DSML｜parameter name="edits" string="false">[{"line": 3, "text": null, "ok": true}, '
            '{"range": [1.5, -2]}]</｜DSML｜parameter>') in out
    assert '<｜DSML｜parameter name="opts" string="false">{}</｜DSML｜parameter>' in out


def test_arguments_that_are_not_json_become_one_string_parameter():
    message = {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "sh", "arguments": "ls -la"}}]}
    assert '<｜DSML｜parameter name="arguments" string="true">ls -la</｜DSML｜parameter>' in render_completion(message, CHAT)


def test_three_tool_turns_keep_all_reasoning():
    messages = [SYSTEM_WITH_TOOLS, {"role": "user", "content": "task"}]
    for n in range(3):
        messages += [
            {"role": "assistant", "reasoning_content": f"think {n}", "content": f"step {n}",
             "tool_calls": [call(f"c{n}", "read_file", path=f"f{n}")]},
            {"role": "tool", "tool_call_id": f"c{n}", "content": f"out {n}"},
        ]
    tail = render_prompt(messages).split("invoke tool calls.\n", 1)[1]
    turns = "".join(
        f'{A}<think>think {n}</think>step {n}\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="read_file">\n'
        f'<｜DSML｜parameter name="path" string="true">f{n}</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        f"</｜DSML｜tool_calls>{E}{U}<tool_result>out {n}</tool_result>"
        for n in range(3)
    )
    assert tail == f"{U}task{turns}{A}<think>"


def test_reasoning_after_the_last_user_turn_is_kept_without_tools():
    messages = [*CONVERSATION, {"role": "assistant", "reasoning_content": "r2", "content": "c2"}]
    assert render_prompt(messages) == f"{B}{U}A{A}</think>c1{E}{U}B{A}<think>r2</think>c2{E}"


def test_non_think_never_writes_reasoning():
    messages = [*CONVERSATION, {"role": "assistant", "reasoning_content": "r2", "content": "c2"}]
    assert render_prompt(messages, CHAT) == f"{B}{U}A{A}</think>c1{E}{U}B{A}</think>c2{E}"
    assert render_prompt([SYSTEM_WITH_TOOLS, *CONVERSATION], CHAT).endswith(f"{U}A{A}</think>c1{E}{U}B{A}</think>")


def test_drop_thinking_off_keeps_reasoning():
    assert render_prompt(CONVERSATION, PromptSettings(drop_thinking=False)) == \
        f"{B}{U}A{A}<think>r1</think>c1{E}{U}B{A}<think>"


@pytest.mark.parametrize("profile,think,prefix", [
    ("preview", "none", ""), ("preview", "high", ""), ("preview", "max", EFFORT_PREFIX_A),
    ("v2", "none", ""), ("v2", "high", EFFORT_PREFIX_A), ("v2", "max", EFFORT_PREFIX_B),
])
def test_effort_profiles(profile, think, prefix):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    prompt = render_prompt(messages, PromptSettings(think=think, effort_profile=profile))
    end = "</think>" if think == "none" else "<think>"
    assert prompt == f"{B}{prefix}S{U}Hi{A}{end}"


def test_effort_prefixes_are_exact():
    assert EFFORT_PREFIX_A.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be")
    assert EFFORT_PREFIX_A.endswith("to ensure absolutely no assumption is left unchecked.\n\n")
    assert EFFORT_PREFIX_B.startswith("Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n")
    assert EFFORT_PREFIX_B.endswith("no assumption remains unchecked and no error remains undiscovered.\n\n")
    assert EFFORT_PREFIX_A.count("\n") == EFFORT_PREFIX_B.count("\n") == 4


def test_effort_prefix_precedes_a_first_user_message():
    prompt = render_prompt([{"role": "user", "content": "Hi"}], PromptSettings(think="max"))
    assert prompt == f"{B}{EFFORT_PREFIX_A}{U}Hi{A}<think>"


def test_developer_is_a_user_turn_that_carries_tools():
    messages = [{"role": "system", "content": "S"}, {"role": "developer", "content": "D", "tools": [TOOL]}]
    prompt = render_prompt(messages)
    assert prompt.startswith(f"{B}S{U}D\n\n## Tools\n\n") and prompt.endswith(f"tool calls.\n{A}<think>")


def test_developer_before_the_last_user_turn_is_dropped_without_tools():
    messages = [{"role": "developer", "content": "D"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "Q"}]
    assert render_prompt(messages) == f"{B}ok{E}{U}Q{A}<think>"
    assert render_prompt(messages, CHAT) == f"{B}{U}D{A}</think>ok{E}{U}Q{A}</think>"


def test_latest_reminder_placement():
    before_user = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "2026-05-01"},
                   {"role": "user", "content": "Hi"}]
    assert render_prompt(before_user) == f"{B}S<｜latest_reminder｜>2026-05-01{U}Hi{A}<think>"
    # A reminder after a user turn follows the generation prompt, as in the reference.
    after_user = [{"role": "user", "content": "Hi"}, {"role": "latest_reminder", "content": "R"}]
    assert render_prompt(after_user) == f"{B}{U}Hi{A}<think><｜latest_reminder｜>R"


def test_content_parts_and_empty_content():
    messages = [{"role": "system", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]}]
    assert render_prompt(messages) == f"{B}{U}a\n\n[Unsupported image_url]\n\nb{A}<think>"


def test_empty_conversation_is_just_bos():
    assert render_prompt([], PromptSettings(think="max")) == B


@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "x"}], "message 0: role must be one of"),
    (["hello"], "message 0: role must be one of"),
    ([{"role": "user", "content": "x", "tools": [TOOL]}], "tools belong on a system or developer message"),
    ([{"role": "developer", "content": ""}], "developer message needs content"),
    ([{"role": "system", "content": "", "tools": [{"name": "f"}]}], "tools must be a list of OpenAI tools"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"name": "f"}]}], "a tool call must look like"),
    ([{"role": "assistant", "tool_calls": [call("1", "w", text="a</｜DSML｜parameter>b")]}], "cannot represent"),
])
def test_malformed_messages_are_encoding_errors(messages, match):
    with pytest.raises(EncodingError, match=match):
        render_prompt(messages)


def test_settings_are_validated():
    with pytest.raises(EncodingError, match="think must be one of"):
        PromptSettings(think="low")
    with pytest.raises(EncodingError, match="effort_profile must be one of"):
        PromptSettings(effort_profile="v9")


# ---- pieces tokenize like the whole ------------------------------------------------------
def test_split_tokens_never_overlap_another_added_token(tok):
    """A cut at a split token T is safe when the tokenizer's leftmost-longest match of added
    tokens always finds T there too: no added token contains T, starts with T, or ends with a
    proper prefix of T."""
    added = [t["content"] for t in json.loads(tok.path.read_text())["added_tokens"]]
    for split in SPLIT_TOKENS:
        for other in added:
            if other == split:
                continue
            assert split not in other
            assert not any(other.endswith(split[:k]) for k in range(1, len(split))), (split, other)


TRICKY_TEXTS = [
    f"{B}  \n\n{U}  x  \n{A}<think>\n\n  </think>  {E}",
    wrap_file("a.py", "def f():\n    return 1\n\n\n") + wrap_file("b.py", "\n\n    x = 2   "),
    f"{U}<｜/table>｜DSML｜invoke<think><think></think>12345678{E}{E}",
    "no special tokens at all   \t\n",
    f"3{U}4{A}5 6",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_piecewise_ids_equal_whole_ids(tok, text):
    assert PromptEncoder(tok).encode_text(text) == tok.encode(text)


def test_pieces_cut_around_split_tokens():
    assert split_pieces(f"{B}S{U}Hi{A}<think>") == [B, "S", U, "Hi", A, "<think>"]
    assert split_pieces(wrap_file("p", "x")) == ["<｜begin▁of▁file▁name｜>", "p", "<｜end▁of▁file▁name｜>",
                                                 "<｜begin▁of▁file｜>", "x", "<｜end▁of▁file｜>"]


def test_files_tokenize_alone_as_in_the_prompt(tok):
    files = {"a.py": "import os\n\n\n    ", "b.py": "  \n\tpass\n", "c.md": "# Title\n\n"}
    body = "".join(wrap_file(path, text) for path, text in files.items())
    whole = tok.encode(body)
    per_file = []
    for path, text in files.items():
        per_file += [128817, *tok.encode(path), 128818, 128819, *tok.encode(text), 128820]
    assert per_file == whole


PIECE_ALPHABET = st.sampled_from([*SPLIT_TOKENS, "｜DSML｜", "<｜/table>｜", " ", "  ", "\n", "\t", "a", "Ü", "1", "<", "|", "世界"])


@settings(max_examples=150, deadline=None)
@given(st.lists(PIECE_ALPHABET, max_size=30).map("".join))
def test_piecewise_ids_equal_whole_ids_for_any_text(text):
    tok = load_tokenizer()
    assert PromptEncoder(tok).encode_text(text) == tok.encode(text)


def test_token_cache_tokenizes_each_piece_once(tok):
    calls = []

    class Counting:
        def encode_batch(self, texts):
            calls.append(list(texts))
            return tok.encode_batch(texts)

    cache = TokenCache(Counting())
    first = cache.encode_pieces(["alpha", "beta", "alpha"])
    again = cache.encode_pieces(["beta", "alpha", "gamma"])
    assert calls == [["alpha", "beta"], ["gamma"]]
    assert list(first[0]) == list(again[1]) == tok.encode("alpha") and len(cache) == 3


# ---- the warm-cache property -------------------------------------------------------------
def _turn(n: int) -> tuple[dict, list[dict]]:
    """Assistant turn n (reasoning, a call or two) and the tool results answering it."""
    calls = [call(f"c{n}-{k}", "read_file", path=f"src/m{n}_{k}.py", limit=n * 10 + k) for k in range(1 + n % 2)]
    assistant = {"role": "assistant", "reasoning_content": f"Turn {n}: look at\n  the code   ",
                 "content": "" if n % 3 else f"Checking {n}.\n", "tool_calls": calls}
    results = [{"role": "tool", "tool_call_id": c["id"], "content": f"def f{n}():\n    return {n}  \n\n"}
               for c in reversed(calls)]
    return assistant, results


@pytest.mark.parametrize("think", ["high", "none"])
def test_next_prompt_extends_previous_prompt_and_completion(tok, think):
    setting = PromptSettings(think=think)
    encoder = PromptEncoder(tok, setting)
    encoded: list[str] = []
    real_encode_text = encoder.encode_text
    encoder.encode_text = lambda text: encoded.append(text) or real_encode_text(text)
    messages = [SYSTEM_WITH_TOOLS, {"role": "user", "content": "Fix the bug in   src/.\n"}]
    previous = None
    for n in range(8):
        text = render_prompt(messages, setting)
        ids = encoder.encode(messages)
        assert ids == tok.encode(text)  # incremental ids equal encoding the whole prompt
        if previous is not None:
            prompt_ids, completion_ids = previous
            assert ids[: len(prompt_ids) + len(completion_ids)] == prompt_ids + completion_ids
            assert len(encoded[-1]) < len(text) // 2  # only the new turns were tokenized
        assistant, results = _turn(n)
        completion = render_completion(assistant, setting)
        previous = ids, tok.encode(completion)
        messages += [assistant, *results]
        if n == 4:
            messages.append({"role": "user", "content": "Also run the tests."})


def test_conversation_that_is_not_append_only_is_re_encoded(tok):
    encoder = PromptEncoder(tok)
    first = encoder.encode(CONVERSATION[:1])
    longer = CONVERSATION + [{"role": "assistant", "reasoning_content": "r2", "content": "c2"},
                             {"role": "user", "content": "C"}]
    # Without tools the earlier <think> becomes </think>: the old ids cannot be kept.
    assert not render_prompt(longer).startswith(render_prompt(CONVERSATION[:1]))
    assert encoder.encode(longer) == tok.encode(render_prompt(longer))
    assert first == tok.encode(render_prompt(CONVERSATION[:1]))


def test_returned_ids_are_a_copy(tok):
    encoder = PromptEncoder(tok)
    ids = encoder.encode(CONVERSATION)
    ids.append(7)
    assert encoder.encode(CONVERSATION) == tok.encode(render_prompt(CONVERSATION))
