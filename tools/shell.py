"""The run tool: a shell command in the work tree, with a timeout that kills everything it
started, an environment scrubbed down to an allowlist (no API keys or tokens), per-command
limits, and output bounded to its head and tail.

With `sandbox = "on"` (the default) every command runs in tools.sandbox's sandbox, and none runs
when the sandbox cannot (the tool refuses; `v4agent fix` checks before it starts). With "off" it
runs unconfined under the same limits, inside a subreaper that kills whatever it leaves behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from tools import sandbox
from tools.base import Context, Settings, Tool, ToolError, ToolResult, parameters

ENV_ALLOWLIST = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "SHELL", "TMPDIR")
FIXED_ENV = {
    "TERM": "dumb", "NO_COLOR": "1", "PAGER": "cat", "GIT_PAGER": "cat", "GIT_TERMINAL_PROMPT": "0",
    "PYTHONUNBUFFERED": "1",
}
_DRAIN_GRACE_S = 5.0  # how long to wait for output after the process group is gone
_STOP_GRACE_S = 2.0  # how long an unconfined command's subreaper gets to kill what it left behind
_SUBREAPER = Path(__file__).with_name("subreaper.py")


def scrubbed_env() -> dict[str, str]:
    """The environment commands get: the allowlisted variables (and LC_*) of ours, plus FIXED_ENV."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWLIST or k.startswith("LC_")}
    env.update(FIXED_ENV)
    return env


def limits(settings: Settings) -> sandbox.Limits:
    return sandbox.Limits(memory_mb=settings.memory_mb, processes=settings.max_processes,
                          file_mb=settings.max_file_mb, tmp_mb=settings.tmp_mb)


def prepare(root: Path, command: str, settings: Settings) -> sandbox.Command:
    """The command line that runs `command` in the work tree `root` under `settings`."""
    argv = ["bash", "-c", command]
    env = scrubbed_env()
    if settings.sandbox == "off":
        wrapped = [sys.executable, "-I", "-S", str(_SUBREAPER), "--", *argv]
        return sandbox.Command(sandbox.limit_argv(limits(settings), os.geteuid()) + wrapped, (), env)
    try:
        sandbox.check(settings.sandbox_uid)
        sandbox.adopt(root, settings.sandbox_uid)
        return sandbox.command(root, argv, env, limits=limits(settings), uid=settings.sandbox_uid,
                               extra=[Path(p) for p in settings.sandbox_paths])
    except sandbox.SandboxUnavailable as e:
        raise ToolError(f"{e}; no command runs without it") from None


class BoundedOutput:
    """Keeps the first `head` and last `tail` bytes of a stream, and counts all of it."""

    def __init__(self, head: int, tail: int) -> None:
        self.head_limit, self.tail_limit = head, tail
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > 2 * self.tail_limit:  # trim now and then, not on every chunk
            del self.tail[: len(self.tail) - self.tail_limit]

    def drain(self, stream: IO[bytes]) -> None:
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            self.feed(chunk)

    def text(self) -> str:
        tail = self.tail[-self.tail_limit:] if self.tail_limit else b""
        omitted = self.total - len(self.head) - len(tail)
        head_text = self.head.decode("utf-8", "replace")
        if omitted <= 0:
            return head_text + bytes(tail).decode("utf-8", "replace")
        return (f"{head_text}\n[… {omitted} bytes of output omitted …]\n"
                f"{bytes(tail).decode('utf-8', 'replace')}")


def run(context: Context, command: str, timeout: int | None = None) -> ToolResult:
    settings = context.settings
    limit = min(timeout if timeout is not None else settings.run_timeout_s, settings.max_run_timeout_s)
    if limit <= 0:
        raise ToolError("timeout must be positive")
    prepared = prepare(context.root, command, settings)
    try:
        process = subprocess.Popen(
            prepared.argv, cwd=context.root, env=prepared.env, pass_fds=prepared.pass_fds, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        prepared.close()
    output = BoundedOutput(settings.output_head_bytes, settings.output_tail_bytes)
    assert process.stdout is not None
    reader = threading.Thread(target=output.drain, args=(process.stdout,), daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        if settings.sandbox == "off":  # the subreaper kills what left the process group, then exits
            process.terminate()
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    finally:
        # Background jobs it left behind die too (and stop holding the output pipe open); in the
        # sandbox, everything in its pid namespace dies with it.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    reader.join(_DRAIN_GRACE_S)
    if not reader.is_alive():  # else a process that left the group still holds the pipe: let it be
        process.stdout.close()
    text = output.text() or "(no output)"
    if timed_out:
        return ToolResult(False, f"[timed out after {limit:g} s; the command and its subprocesses were killed]\n{text}")
    return ToolResult(True, f"[exit code {code}{_limit_note(code, settings)}]\n{text}")


def _limit_note(code: int, settings: Settings) -> str:
    """Why a command died, when a signal says it hit one of the limits."""
    if code == 128 + signal.SIGXFSZ:
        return f": a file reached the {settings.max_file_mb} MB limit on files a command writes"
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f": killed by {signal.Signals(code - 128).name}"
    return ""


RUN = Tool(
    "run",
    "Run a bash command in the repository root and get its exit code and output (stdout and stderr "
    "together; long output keeps its beginning and end). Non-interactive: no input, no network; only "
    "the repository is writable (and a private /tmp); nothing it starts outlives it; memory, processes "
    "and file sizes are limited. Use it to run tests and scripts.",
    parameters({"command": {"type": "string", "description": "The bash command line."}},
               {"timeout": {"type": "integer", "minimum": 1,
                            "description": "Seconds before the command is killed (default 300, at most 1800)."}}),
    run,
)
