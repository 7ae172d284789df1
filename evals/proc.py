"""Running one command for the harness: its whole process group killed at a total timeout or
when it has been silent for `idle_timeout` seconds (a hanging test prints nothing), all output
kept in a log file, and a clear record of why it ended."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class EvalError(RuntimeError):
    """A failure with a message that says what to do (bad input, a missing tool, a failed step)."""


@dataclass(frozen=True)
class Finished:
    """code: the exit status (None when killed); timed_out: None, "total" or "idle"."""

    code: int | None
    output: str
    seconds: float
    timed_out: str | None = None
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.timed_out is None


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 3600.0,
        idle_timeout: float | None = None, log: Path | None = None, pass_fds: tuple[int, ...] = ()) -> Finished:
    """Run `argv`; stdout and stderr together, appended to `log` as they come and in the result.
    `pass_fds`: descriptors the command inherits (a sandbox's seccomp filter)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds)
    chunks: list[bytes] = []
    last_output = [time.monotonic()]
    sink = open(log, "ab") if log else None

    def drain() -> None:
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):  # type: ignore[attr-defined]
            chunks.append(chunk)
            last_output[0] = time.monotonic()
            if sink:
                sink.write(chunk)
                sink.flush()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    timed_out = None
    while process.poll() is None:
        now = time.monotonic()
        if now - started > timeout:
            timed_out = "total"
        elif idle_timeout is not None and now - last_output[0] > idle_timeout:
            timed_out = "idle"
        if timed_out:
            break
        time.sleep(0.1)
    try:  # background jobs it left behind go too, and stop holding the pipe open
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    code = process.wait()
    reader.join(5.0)
    if sink:
        if timed_out:
            limit = timeout if timed_out == "total" else idle_timeout
            why = "in all" if timed_out == "total" else "without output"
            sink.write(f"\n[v4agent: killed after {limit:g} s {why}]\n".encode())
        sink.close()
    text = b"".join(chunks).decode("utf-8", "replace")
    return Finished(None if timed_out else code, text, time.monotonic() - started, timed_out, log)


def git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """`git args` in `cwd`: its stdout, or EvalError with git's message."""
    # surrogateescape: a diff of a Latin-1 file is not UTF-8, and its bytes must survive as they are
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            errors="surrogateescape")
    if result.returncode != 0:
        raise EvalError(f"git {' '.join(args[:2])} failed in {cwd}: {result.stderr.strip()[-2000:]}")
    return result.stdout
