"""User settings for `v4agent fix`: defaults, then `~/.config/v4agent/config.toml`, then
`V4AGENT_*` environment variables, then the command line — the later wins.

The config file is flat TOML with the field names below (`think = "max"`, `max_turns = 80`);
its path is `$V4AGENT_CONFIG` when set, else `$XDG_CONFIG_HOME/v4agent/config.toml`, else
`~/.config/v4agent/config.toml`. Each field also reads `V4AGENT_<FIELD>` (`V4AGENT_ENDPOINT`,
`V4AGENT_MAX_TURNS`...). API keys are never settings: they come from the environment only
(see agent.backends.http).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from agent.backends.http import REASONING_FIELDS
from agent.encoding import EFFORT_PROFILES, THINK_MODES

CONTEXT_TOKENS = 1_048_576


class SettingsError(ValueError):
    """A setting that is unknown or has a bad value; the message names where it came from."""


@dataclass(frozen=True)
class Settings:
    # the backend: exactly one of weights, endpoint (with model) and script
    weights: str | None = None  # a V4 checkpoint directory, run in-process
    device: str | None = None  # where the in-process model runs (default: cuda when available)
    endpoint: str | None = None  # an OpenAI-compatible API base, e.g. http://localhost:8000/v1
    model: str | None = None  # the model name the endpoint serves
    script: str | None = None  # a scripted policy (JSON/JSONL turns)
    # the model's behaviour
    think: str = "high"  # none | high | max
    effort_profile: str = "preview"  # which weights' effort prefixes (in-process): preview | v2
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # in-process sampling seed
    # limits
    max_turns: int = 50
    max_turn_tokens: int = 32_768  # one completion
    max_total_tokens: int = 0  # all completions together; 0: no limit
    context_limit: int = CONTEXT_TOKENS  # endpoint and script; in-process it is the model's own
    # the endpoint
    timeout_s: float = 1800.0  # one whole completion, connect to last byte (a long max-think turn)
    retries: int = 3
    reasoning_fields: str = "auto"  # auto | deepseek | chat_template_kwargs | none
    # the tools (docs/security.md)
    sandbox: str = "on"  # on: every command sandboxed, none without the sandbox | off: unconfined
    sandbox_uid: int = 65000  # the unprivileged uid commands run as when v4agent runs as root
    sandbox_paths: str = ""  # more read-only paths for the sandbox, separated by ":" (e.g. a venv)
    run_timeout_s: float = 300.0
    memory_mb: int = 8192  # per process of a command
    max_processes: int = 512  # per command
    max_file_mb: int = 1024  # the largest file a command may write
    tmp_mb: int = 1024  # the sandbox's private /tmp


_CHOICES = {"think": THINK_MODES, "effort_profile": tuple(EFFORT_PROFILES), "reasoning_fields": REASONING_FIELDS,
            "sandbox": ("on", "off")}
_POSITIVE = ("max_turns", "max_turn_tokens", "context_limit", "timeout_s", "run_timeout_s", "sandbox_uid", "memory_mb",
             "max_processes", "max_file_mb", "tmp_mb")
_NON_NEGATIVE = ("max_total_tokens", "retries", "temperature")


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("V4AGENT_CONFIG"):
        return Path(environ["V4AGENT_CONFIG"])
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "v4agent" / "config.toml"


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings from the config file, the environment and `overrides` (None values are ignored)."""
    settings = Settings()
    path = config_path(environ)
    if path.is_file():
        try:
            with open(path, "rb") as f:
                settings = _merge(settings, tomllib.load(f), str(path))
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"{path}: {e}") from None
    names = [f.name for f in fields(Settings)]
    from_env = {name: environ[f"V4AGENT_{name.upper()}"] for name in names if f"V4AGENT_{name.upper()}" in environ}
    settings = _merge(settings, from_env, "the environment")
    return _merge(settings, {k: v for k, v in (overrides or {}).items() if v is not None}, "the command line")


def _merge(settings: Settings, values: Mapping[str, Any], source: str) -> Settings:
    kinds = {f.name: f.type for f in fields(Settings)}
    changes = {}
    for name, value in values.items():
        if name not in kinds:
            raise SettingsError(f"{source}: unknown setting {name!r} (settings: {', '.join(kinds)})")
        changes[name] = _convert(name, kinds[name], value, source)
    return replace(settings, **changes)


def _convert(name: str, kind: str, value: Any, source: str) -> Any:
    """`value` (TOML-typed, or a string from the environment) as the field's type, checked."""
    optional = kind.endswith("| None")
    base = kind.removesuffix(" | None")
    where = f"{source}: {name}"
    if optional and value in ("", None):
        return None
    try:
        if base == "int":
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError
            value = int(value)
        elif base == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif not isinstance(value, str):
            raise ValueError
    except ValueError:
        raise SettingsError(f"{where} must be {'an' if base == 'int' else 'a'} {base}, not {value!r}") from None
    if name in _CHOICES and value not in _CHOICES[name]:
        raise SettingsError(f"{where} must be one of {', '.join(_CHOICES[name])}, not {value!r}")
    if (name in _POSITIVE and value <= 0) or (name in _NON_NEGATIVE and value < 0):
        raise SettingsError(f"{where} must be {'positive' if name in _POSITIVE else 'at least 0'}, not {value!r}")
    if name == "top_p" and not 0 < value <= 1:
        raise SettingsError(f"{where} must be in (0, 1], not {value!r}")
    return value
