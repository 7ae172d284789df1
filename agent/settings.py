"""User settings for `v4agent fix`: defaults, then `~/.config/v4agent/config.toml`, then
`V4AGENT_*` environment variables, then the command line — the later wins.

The config file is flat TOML with the field names below (`think = "max"`, `max_turns = 80`);
its path is `--config FILE` when given, else `$V4AGENT_CONFIG` when set, else
`$XDG_CONFIG_HOME/v4agent/config.toml`, else `~/.config/v4agent/config.toml`. A file named by
`--config` or `V4AGENT_CONFIG` must exist; the default one may not. Each field also reads
`V4AGENT_<FIELD>` (`V4AGENT_ENDPOINT`, `V4AGENT_MAX_TURNS`...). Every error names where the bad
value came from: the file, the variable or the flag. API keys are never settings: they come
from the environment only (see agent.backends.http).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from runtime.encoding import EFFORT_PROFILES, THINK_MODES

CONTEXT_TOKENS = 1_048_576


class SettingsError(ValueError):
    """A setting that is unknown or has a bad value; the message names where it came from."""


@dataclass(frozen=True)
class Settings:
    # the backend: exactly one of weights, endpoint (with model) and script
    weights: str | None = None  # a V4 checkpoint directory, run in-process
    device: str | None = None  # where the in-process model runs: cpu, cuda, cuda:N (default: cuda when available)
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
    memory_mb: int = 8192  # a command's processes together, and each one
    max_processes: int = 512  # per command
    max_file_mb: int = 1024  # the largest file a command may write
    tmp_mb: int = 1024  # the sandbox's private /tmp
    max_disk_mb: int = 2048  # how much one command may grow the work tree on disk


CHOICE_FIELDS = ("think", "effort_profile", "reasoning_fields", "sandbox")
_POSITIVE = ("max_turns", "max_turn_tokens", "context_limit", "timeout_s", "run_timeout_s", "sandbox_uid", "memory_mb",
             "max_processes", "max_file_mb", "tmp_mb", "max_disk_mb")
_NON_NEGATIVE = ("max_total_tokens", "retries", "temperature")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
DEFAULT = "default"  # the source of a value nobody set


def config_path(environ: Mapping[str, str] = os.environ, given: str | Path | None = None) -> tuple[Path, str | None]:
    """The config file, and who named it (`--config`, `V4AGENT_CONFIG`; None for the default
    place, where a missing file is no error)."""
    if given is not None:
        return Path(given), "--config"
    if environ.get("V4AGENT_CONFIG"):
        return Path(environ["V4AGENT_CONFIG"]), "V4AGENT_CONFIG"
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "v4agent" / "config.toml", None


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ,
                  config: str | Path | None = None) -> Settings:
    """Settings from the config file (`config`, else the usual place), the environment and
    `overrides` (the command line; None values are ignored)."""
    return resolve_settings(overrides, environ, config)[0]


def resolve_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ,
                     config: str | Path | None = None) -> tuple[Settings, dict[str, str]]:
    """The settings, and where each value came from: "default", the config file's path,
    `V4AGENT_<NAME>`, or `--<name>` for the command line."""
    settings, sources = Settings(), dict.fromkeys((f.name for f in fields(Settings)), DEFAULT)
    path, named_by = config_path(environ, config)
    values = _read_config(path, named_by)
    settings = _merge(settings, values, sources, lambda name: f"{path}: {name}", str(path))
    names = [f.name for f in fields(Settings)]
    from_env = {name: environ[_variable(name)] for name in names if _variable(name) in environ}
    settings = _merge(settings, from_env, sources, _variable, None)
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    return _merge(settings, cli, sources, _flag, None), sources


def _variable(name: str) -> str:
    return f"V4AGENT_{name.upper()}"


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _read_config(path: Path, named_by: str | None) -> dict[str, Any]:
    """The config file's values; {} when the default file does not exist."""
    if named_by is None and not path.exists():
        return {}
    where = f"{named_by} names {path}, which" if named_by else str(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise SettingsError(f"{where} is a directory, not a TOML file") from None
    except OSError as e:
        raise SettingsError(f"cannot read {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: not valid TOML: {e}") from None


def _merge(settings: Settings, values: Mapping[str, Any], sources: dict[str, str], where: Callable[[str], str],
           source: str | None) -> Settings:
    """`settings` with `values` converted and checked; `where(name)` says where a bad value came
    from, `source` (or `where(name)`) is recorded in `sources`."""
    kinds = {f.name: f.type for f in fields(Settings)}
    changes = {}
    for name, value in values.items():
        if name not in kinds:
            origin = source or where(name)
            raise SettingsError(f"{origin}: unknown setting {name!r} (settings: {', '.join(kinds)})")
        changes[name] = _convert(name, kinds[name], value, where(name))
        sources[name] = source or where(name)
    return replace(settings, **changes)


def _choices(name: str) -> tuple[str, ...]:
    # Imported here: the HTTP client is not needed to read settings (fix's --help reads the defaults).
    from agent.backends.http import REASONING_FIELDS

    return {"think": THINK_MODES, "effort_profile": tuple(EFFORT_PROFILES), "reasoning_fields": REASONING_FIELDS,
            "sandbox": ("on", "off")}[name]


def _convert(name: str, kind: str, value: Any, where: str) -> Any:
    """`value` (TOML-typed, or a string from the environment) as the field's type, checked.
    Choices are not case-sensitive (`MAX` is `max`)."""
    optional = kind.endswith("| None")
    base = kind.removesuffix(" | None")
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
    if base == "float" and not math.isfinite(value):
        raise SettingsError(f"{where} must be a finite number, not {value!r}")
    if name in CHOICE_FIELDS or name == "device":
        value = value.strip().lower()
    if name in CHOICE_FIELDS and value not in _choices(name):
        raise SettingsError(f"{where} must be one of {', '.join(_choices(name))}, not {value!r}")
    if name == "device" and not _DEVICE.fullmatch(value):
        raise SettingsError(f"{where} must be cpu, cuda or cuda:N (a GPU's index), not {value!r}")
    if (name in _POSITIVE and value <= 0) or (name in _NON_NEGATIVE and value < 0):
        raise SettingsError(f"{where} must be {'positive' if name in _POSITIVE else 'at least 0'}, not {value!r}")
    if name == "top_p" and not 0 < value <= 1:
        raise SettingsError(f"{where} must be in (0, 1], not {value!r}")
    return value
