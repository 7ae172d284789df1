"""`v4agent prompt render|parse` and a network-free smoke run of `v4agent bench encode`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent.cli import app
from runtime.encoding import EFFORT_PREFIX_A

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
GOLDEN_5 = ('r</think>c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="x" string="false">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            f"</｜DSML｜tool_calls>{E}")

runner = CliRunner()


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def run(*args: str):
    return runner.invoke(app, list(args))


def test_render_prints_exactly_the_prompt(tmp_path):
    result = run("prompt", "render", write(tmp_path, "m.json", MESSAGES))
    assert result.exit_code == 0 and result.stdout == f"{B}S{U}Hi{A}<think>"


def test_render_modes_and_profiles(tmp_path):
    path = write(tmp_path, "m.json", MESSAGES)
    assert run("prompt", "render", path, "--think", "none").stdout == f"{B}S{U}Hi{A}</think>"
    assert run("prompt", "render", path, "--think", "max").stdout == f"{B}{EFFORT_PREFIX_A}S{U}Hi{A}<think>"
    assert run("prompt", "render", path, "--effort-profile", "v2").stdout == f"{B}{EFFORT_PREFIX_A}S{U}Hi{A}<think>"


def test_render_ids(tmp_path):
    result = run("prompt", "render", write(tmp_path, "m.json", MESSAGES), "--ids")
    assert json.loads(result.stdout) == [0, 53, 128803, 23166, 128804, 128821]


def test_render_attaches_tools_to_the_first_message(tmp_path):
    tools = write(tmp_path, "t.json", TOOLS)
    out = run("prompt", "render", write(tmp_path, "m.json", MESSAGES), "--tools", tools).stdout
    assert out.startswith(f"{B}S\n\n## Tools\n\n") and '{"name": "f", "description": "d", "parameters": {}}' in out
    # Without a system message, an empty one is put first to carry them.
    out = run("prompt", "render", write(tmp_path, "u.json", MESSAGES[1:]), "--tools", tools).stdout
    assert out.startswith(f"{B}\n\n## Tools\n\n") and out.endswith(f"tool calls.\n{U}Hi{A}<think>")


def test_render_full_conversation(tmp_path):
    messages = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "reasoning_content": "r",
         "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "out"},
    ]
    out = run("prompt", "render", write(tmp_path, "m.json", messages), "--tools", write(tmp_path, "t.json", TOOLS)).stdout
    assert out.endswith(f'r</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" '
                        f'string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>{E}'
                        f"{U}<tool_result>out</tool_result>{A}<think>")


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not JSON"),
    ('{"role": "user"}', "must hold a JSON list of message objects"),
    ('[{"role": "robot", "content": "x"}]', "role must be one of"),
])
def test_render_bad_input_exits_2(tmp_path, content, message):
    result = run("prompt", "render", write(tmp_path, "m.json", content))
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_missing_files_exit_2(tmp_path):
    for args in (("render", str(tmp_path / "nope.json")), ("parse", str(tmp_path / "nope.txt"))):
        result = run("prompt", *args)
        assert result.exit_code == 2 and "cannot read" in result.stderr
    result = run("prompt", "render", write(tmp_path, "m.json", MESSAGES), "--think", "low")
    assert result.exit_code == 2


def test_parse_golden_5(tmp_path):
    result = run("prompt", "parse", write(tmp_path, "c.txt", GOLDEN_5), "--strict")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "role": "assistant", "content": "c", "reasoning_content": "r",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": [1, 2]}'}}],
    }


def test_parse_non_think(tmp_path):
    result = run("prompt", "parse", write(tmp_path, "c.txt", f"Hello{E}"), "--think", "none")
    assert json.loads(result.stdout)["content"] == "Hello"


def test_parse_malformed_recovering_and_strict(tmp_path):
    path = write(tmp_path, "c.txt", GOLDEN_5.replace("[1, 2]", "[1, 2"))
    result = run("prompt", "parse", path)
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["tool_calls"] == [] and out["errors"][0]["tool"] == "f" and out["errors"][0]["parameter"] == "x"
    assert out["errors"][0]["message"].startswith('Tool call 1 (f), parameter "x": expected a JSON value')
    result = run("prompt", "parse", path, "--strict")
    assert result.exit_code == 1 and "parse error: Tool call 1 (f)" in result.stderr


def test_bench_encode_smoke(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    for n in range(4):
        (corpus / "pkg" / f"m{n}.py").write_text(f"def f{n}(x):\n    return x + {n}\n" * 40)
    (corpus / "blob.bin").write_bytes(b"\xff\xfe\x00")
    result = run("bench", "encode", "--corpus", str(corpus), "--conversation-tokens", "3000",
                 "--parse-bytes", "2000", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["corpus_files"] == 4 and out["append_matches_full_encode"] is True
    for key in ("encode_tokens_per_s_cold", "encode_tokens_per_s_warm", "append_turn_ms", "parse_1mb_s"):
        assert out[key] > 0
