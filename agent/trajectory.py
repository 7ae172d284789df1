"""Run records: every run gets a directory under `$V4AGENT_CACHE/runs` (default
~/.cache/v4agent/runs) holding `trajectory.jsonl` and `patch.diff`.

The trajectory is JSON lines, appended and synced to disk after every step, so whatever ends the
run — submit, a limit, Ctrl-C, a crash — what happened up to then is on disk. Records:

- `{"type": "run", ...}`: the start: repository, HEAD, base tree, issue, backend, configuration;
- `{"type": "turn", "turn": N, ...}`: one model turn: the completion as written, the parsed
  assistant message, format errors, each tool call with its result, the reply sent, token stats;
- `{"type": "end", "stop": ..., ...}`: how the run ended and its totals;
- `{"type": "patch", ...}`: where the patch went (saved, applied, committed).

Nothing secret reaches the file: every record is redacted as it is written (`redact`): the
password or token in a URL (`https://user:pass@host` becomes `https://***@host`) and the value of
every environment variable whose name looks secret (KEY, TOKEN, SECRET, PASSWORD, PASSWD,
CREDENTIAL: the API keys among them) become `***`, wherever they appear.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.pack_cache import cache_root


SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
# Shorter values are left alone: redacting `true` or `5` everywhere (TOKENIZERS_PARALLELISM,
# V4AGENT_MAX_TURN_TOKENS) would mangle the record and protect nothing.
MIN_SECRET_CHARS = 8
MASK = "***"
# The userinfo of a URL: everything between `scheme://` and the last `@` of the authority. The
# scheme's length is bounded so that a long run like `a.a.a.a…` costs linear time, not quadratic.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]{0,31}://)[^/?#\s\"'<>]+@")


class TrajectoryError(ValueError):
    """A trajectory file that cannot be read."""


def secret_values(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The values of the environment variables whose names look secret, longest first (so a
    secret that contains another is masked whole)."""
    found = {value for name, value in environ.items()
             if any(part in name.upper() for part in SECRET_NAME_PARTS) and len(value) >= MIN_SECRET_CHARS}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, hidden: Sequence[str] = ()) -> str:
    """`text` with URL userinfo and every string of `hidden` replaced by ***."""
    for secret in hidden:
        text = text.replace(secret, MASK)
    return _USERINFO.sub(r"\1" + MASK + "@", text)


def redact(value: Any, hidden: Sequence[str]) -> Any:
    """JSON data with `redact_text` applied to every string in it, keys included."""
    if isinstance(value, str):
        return redact_text(value, hidden)
    if isinstance(value, Mapping):
        return {redact_text(str(k), hidden): redact(v, hidden) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, hidden) for v in value]
    return value


def runs_root() -> Path:
    return cache_root() / "runs"


def new_run_dir() -> Path:
    """A fresh, empty run directory named by its start time (and a random suffix)."""
    path = runs_root() / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    return path


class Trajectory:
    """Appends records to a JSONL file, each one redacted and on disk before `write` returns.
    The secrets are those of `environ` when the trajectory is opened."""

    def __init__(self, path: Path, environ: Mapping[str, str] = os.environ) -> None:
        self.path = path
        self._hidden = secret_values(environ)
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(redact(record, self._hidden), ensure_ascii=False) + "\n"
        # A lone surrogate (from a model's JSON \ud800, or a file name that is not UTF-8) cannot
        # be UTF-8: written as its JSON escape, it reads back as the same string.
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_trajectory(path: Path) -> list[dict[str, Any]]:
    """The records of a trajectory file. A torn last line (the process died writing it) is left
    out; anything else unreadable is an error."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TrajectoryError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TrajectoryError(f"{path} is not a trajectory: not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep to be ours
            if number == len(lines) > 1:  # torn; a file of one bad line was never a trajectory
                break
            raise TrajectoryError(f"{path}: line {number} is not JSON") from None
        if not isinstance(record, dict) or "type" not in record:
            raise TrajectoryError(f"{path}: line {number} is not a trajectory record")
        records.append(record)
    if not lines:
        raise TrajectoryError(f"{path} is empty")
    if not records or records[0]["type"] != "run":
        raise TrajectoryError(f"{path}: a trajectory starts with a run record")
    return records
