"""What every tool shares: the Tool record and its JSON schema, the result the model reads,
argument validation, and path resolution confined to the work tree.

A tool's function raises ToolError for anything the model got wrong or asked for that is
refused; the registry turns it into an error result, so a bad call never ends the task.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ToolError(Exception):
    """A refusal or failure the model should read and act on (the message says how)."""


@dataclass(frozen=True)
class ToolResult:
    """ok: the tool did what was asked; output: the text the model reads; done: the task is
    over (submit); summary: submit's summary."""

    ok: bool
    output: str
    done: bool = False
    summary: str | None = None


@dataclass(frozen=True)
class Settings:
    """Limits of one work tree's tools (configuration, not code)."""

    run_timeout_s: float = 300.0  # default for `run`
    max_run_timeout_s: float = 1800.0
    output_head_bytes: int = 10_000  # `run` keeps the head and the tail of long output
    output_tail_bytes: int = 20_000
    read_max_lines: int = 2_000
    read_max_line_chars: int = 2_000
    search_max_results: int = 100
    list_max_entries: int = 500
    sandbox: str = "on"  # "on": every command in the sandbox, none without it; "off": unconfined
    sandbox_uid: int = 65000  # the unprivileged uid commands run as when v4agent runs as root
    sandbox_paths: tuple[str, ...] = ()  # more read-only paths the sandbox shows (e.g. the project's venv)
    memory_mb: int = 8192  # a command's processes together (cgroup) and each one (RLIMIT_DATA)
    max_processes: int = 512  # processes and threads of a command (cgroup; else RLIMIT_NPROC)
    max_file_mb: int = 1024  # the largest file a command may write (RLIMIT_FSIZE)
    tmp_mb: int = 1024  # the sandbox's private /tmp
    max_disk_mb: int = 2048  # how much one command may grow the work tree on disk


@dataclass(frozen=True)
class Context:
    """What a tool call runs against: the work tree root (resolved) and the settings."""

    root: Path
    settings: Settings


@dataclass(frozen=True)
class Tool:
    """A tool the model may call. `parameters` is a JSON schema of an object whose
    properties are strings, integers or booleans; `run(context, **arguments)` returns the
    result or raises ToolError."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[..., ToolResult]

    def schema(self) -> dict[str, Any]:
        """The tool in OpenAI function format, for the prompt's tools block."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def parameters(required: Mapping[str, dict[str, Any]], optional: Mapping[str, dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    """An object schema: the given properties, `required` ones required, nothing else allowed."""
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required),
            "additionalProperties": False}


_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "boolean": bool}


def validate(tool: Tool, arguments: Any) -> dict[str, Any]:
    """`arguments` checked against the tool's schema; integers and booleans written as
    strings ("10", "true") are converted, a common slip that needs no extra turn."""
    if not isinstance(arguments, Mapping):
        raise ToolError(f"{tool.name}: arguments must be a JSON object, got {type(arguments).__name__}")
    schema = tool.parameters
    properties: Mapping[str, Any] = schema["properties"]
    allowed = ", ".join(properties) or "none"
    unknown = [name for name in arguments if name not in properties]
    if unknown:
        raise ToolError(f"{tool.name}: unexpected argument {unknown[0]!r} (allowed: {allowed})")
    missing = [name for name in schema.get("required", ()) if name not in arguments]
    if missing:
        raise ToolError(f"{tool.name}: missing required argument {missing[0]!r} (arguments: {allowed})")
    checked = {}
    for name, value in arguments.items():
        checked[name] = _coerce(tool.name, name, properties[name], value)
    return checked


def _coerce(tool: str, name: str, schema: Mapping[str, Any], value: Any) -> Any:
    kind = schema["type"]
    if kind == "integer" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    elif kind == "boolean" and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    # bool is an int subclass in Python; JSON keeps them apart.
    if not isinstance(value, _TYPES[kind]) or (kind == "integer" and isinstance(value, bool)):
        raise ToolError(f"{tool}: argument {name!r} must be {'an' if kind == 'integer' else 'a'} {kind}, "
                        f"got {type(value).__name__} {value!r:.60}")
    if kind == "string":
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from JSON's \ud800: no file name or command holds one
            raise ToolError(f"{tool}: argument {name!r} is not valid Unicode (character {e.start}: "
                            f"{value[e.start]!r})") from None
    if "minimum" in schema and value < schema["minimum"]:
        raise ToolError(f"{tool}: argument {name!r} must be at least {schema['minimum']}, got {value}")
    return value


def resolve(context: Context, path: str, *, for_writing: bool = False) -> Path:
    """`path` (relative to the work tree, or absolute inside it) as an absolute path inside
    the work tree after following symlinks; anything that leads outside is refused, and so is
    writing into .git (hooks there would run outside any sandbox)."""
    if not path.strip():
        raise ToolError("path is empty")
    if "\0" in path:
        raise ToolError("path contains a NUL character")
    candidate = Path(os.path.realpath(context.root / path))
    if candidate != context.root and not candidate.is_relative_to(context.root):
        raise ToolError(f"{path}: outside the work tree ({context.root}); use a path inside it")
    if for_writing and ".git" in candidate.relative_to(context.root).parts:
        raise ToolError(f"{path}: writing inside .git is not allowed")
    return candidate


def display(context: Context, path: Path) -> str:
    """`path` as the model should write it: relative to the work tree."""
    relative = path.relative_to(context.root).as_posix()
    return relative if relative != "." else "."
