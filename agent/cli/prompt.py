"""`v4agent prompt ...`: the V4 prompt encoding and DSML parser as debugging aids."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from agent.cli.common import fail

app = typer.Typer(help="Render V4 prompts and parse completions exactly as the model sees them.", no_args_is_help=True)


class Think(str, Enum):
    none = "none"
    high = "high"
    max = "max"


class EffortProfile(str, Enum):
    preview = "preview"
    v2 = "v2"


THINK_OPTION = typer.Option(Think.high, "--think", case_sensitive=False,
                            help="Thinking mode: none (chat), high, or max.")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(f"cannot read {path}: {e}") from None


def _read_json_list(path: Path, what: str) -> list[Any]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise fail(f"{path} is not JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise fail(f"{path} must hold a JSON list of {what} objects")
    return value


@app.command("render")
def render_cmd(
    messages_file: Path = typer.Argument(..., metavar="MESSAGES.json", help="An OpenAI-style list of messages."),
    think: Think = THINK_OPTION,
    effort_profile: EffortProfile = typer.Option(EffortProfile.preview, "--effort-profile", case_sensitive=False,
                                                 help="Which release's reasoning-effort prefixes to use."),
    tools_file: Path | None = typer.Option(None, "--tools", metavar="TOOLS.json",
                                           help="An OpenAI-style list of tools, attached to the first message."),
    ids: bool = typer.Option(False, "--ids", help="Print the token ids (a JSON list) instead of the text."),
) -> None:
    """Print the prompt text exactly as the model reads it, with nothing added."""
    from runtime.encoding import EncodingError, PromptEncoder, PromptSettings, render_prompt

    messages = _read_json_list(messages_file, "message")
    if tools_file is not None:
        tools = _read_json_list(tools_file, "tool")
        if not messages or messages[0].get("role") not in ("system", "developer"):
            # Tools live in a system prompt; serving stacks insert an empty one when there is none.
            messages.insert(0, {"role": "system", "content": ""})
        messages[0]["tools"] = tools
    settings = PromptSettings(think=think.value, effort_profile=effort_profile.value)
    try:
        if ids:
            typer.echo(json.dumps(PromptEncoder(settings=settings).encode(messages)))
        else:
            sys.stdout.buffer.write(render_prompt(messages, settings).encode("utf-8"))
    except EncodingError as e:
        raise fail(str(e)) from None


@app.command("parse")
def parse_cmd(
    completion_file: Path = typer.Argument(..., metavar="COMPLETION.txt", help="Model output, EOS included."),
    think: Think = THINK_OPTION,
    strict: bool = typer.Option(False, "--strict", help="Reject any deviation from the format (exit 1)."),
) -> None:
    """Parse a completion into an OpenAI-style assistant message (JSON); `errors` lists what is malformed."""
    from runtime.dsml import DsmlError, parse_completion

    text = _read_text(completion_file)
    try:
        message = parse_completion(text, think=think is not Think.none, strict=strict)
    except DsmlError as e:
        typer.echo(f"parse error: {e}", err=True)
        raise typer.Exit(1) from None
    out = message.to_openai()
    if message.errors:
        out["errors"] = [issue.to_dict() for issue in message.errors]
    typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
