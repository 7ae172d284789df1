"""The run tool: a shell command in the work tree, with a timeout that kills everything it
started, an environment scrubbed down to an allowlist (no API keys or tokens), per-command
limits (memory, processes, file size, and the disk it may fill in the work tree), and output
bounded to its head and tail.

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
import time
from pathlib import Path
from typing import IO

from tools import cgroups, sandbox
from tools.base import Context, Settings, Tool, ToolError, ToolResult, parameters

ENV_ALLOWLIST = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "SHELL", "TMPDIR")
FIXED_ENV = {
    "TERM": "dumb", "NO_COLOR": "1", "PAGER": "cat", "GIT_PAGER": "cat", "GIT_TERMINAL_PROMPT": "0",
    "PYTHONUNBUFFERED": "1",
}
_DRAIN_GRACE_S = 5.0  # how long to wait for output after the process group is gone
_STOP_GRACE_S = 2.0  # how long an unconfined command's subreaper gets to kill what it left behind
_SUBREAPER = Path(__file__).with_name("subreaper.py")
_DISK_POLL_S = 0.15  # how often the work tree's file system is looked at while a command runs
_CLOCK_REALTIME_COARSE = 5  # Linux's clock id (Python has no name for it)


def scrubbed_env() -> dict[str, str]:
    """The environment commands get: the allowlisted variables (and LC_*) of ours, plus FIXED_ENV."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWLIST or k.startswith("LC_")}
    env.update(FIXED_ENV)
    return env


def limits(settings: Settings) -> sandbox.Limits:
    return sandbox.Limits(memory_mb=settings.memory_mb, processes=settings.max_processes,
                          file_mb=settings.max_file_mb, tmp_mb=settings.tmp_mb)


def prepare(root: Path, command: str, settings: Settings, group: cgroups.Group | None = None) -> sandbox.Command:
    """The command line that runs `command` in the work tree `root` under `settings`, in the
    cgroup `group` when given."""
    argv = ["bash", "-c", command]
    env = scrubbed_env()
    if settings.sandbox == "off":
        wrapped = [sys.executable, "-I", "-S", str(_SUBREAPER), "--", *argv]
        return sandbox.Command(sandbox.limit_argv(limits(settings), os.geteuid(), group) + wrapped, (), env)
    try:
        sandbox.check(settings.sandbox_uid)
        sandbox.adopt(root, settings.sandbox_uid)
        return sandbox.command(root, argv, env, limits=limits(settings), uid=settings.sandbox_uid,
                               extra=[Path(p) for p in settings.sandbox_paths], group=group)
    except sandbox.SandboxUnavailable as e:
        raise ToolError(f"{e}; no command runs without it") from None


class DiskWatch:
    """Whether a command has grown the work tree by more than `cap` bytes since it started.
    Cheap while it has not: the file system's used bytes (statvfs) only; when they grew by more
    than the cap, a walk of the tree adds up the files changed since the start (by ctime, which
    no command can set back), so others' writes elsewhere on that file system do not count."""

    def __init__(self, root: Path, cap: int) -> None:
        self.root, self.cap = root, cap
        # File systems stamp files with the coarse clock (a tick behind the precise one): a
        # file written after this moment is never stamped before it.
        self.since = time.clock_gettime(_CLOCK_REALTIME_COARSE)
        self.base = self._used()

    def _used(self) -> int:
        st = os.statvfs(self.root)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def written(self) -> int | None:
        """The bytes the command wrote into the tree when they are over the cap, else None."""
        grown = self._used() - self.base
        if grown <= self.cap:
            return None
        written, complete = _changed_bytes(self.root, self.since)
        if not complete:  # a folder the walk cannot read (the command's own chmod) may hold the rest
            written = max(written, grown)
        if written > self.cap:
            return written
        self.base += grown - written  # the rest was written elsewhere: walk again only when the tree could be over
        return None


def _changed_bytes(root: Path, since: float) -> tuple[int, bool]:
    """The disk space of the files under `root` changed since `since` (symlinks not followed),
    and whether every folder could be read."""
    total, complete, folders = 0, True, [str(root)]
    while folders:  # a stack, not recursion: a command may nest folders deeper than Python's stack
        try:
            entries = list(os.scandir(folders.pop()))
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError:
            complete = False
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                else:
                    st = entry.stat(follow_symlinks=False)
                    total += st.st_blocks * 512 if st.st_ctime >= since else 0
            except FileNotFoundError:
                pass
            except OSError:
                complete = False
    return total, complete


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
    notes = []
    try:
        group = cgroups.create(settings.memory_mb << 20, settings.max_processes)
    except cgroups.CgroupError as e:  # the rlimits still hold
        group = None
        notes.append(f"{e.strerror}: per-process limits only")
    try:
        prepared = prepare(context.root, command, settings, group)
        watch = DiskWatch(context.root, settings.max_disk_mb << 20)
        try:
            process = subprocess.Popen(
                prepared.argv, cwd=context.root, env=prepared.env, pass_fds=prepared.pass_fds,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            prepared.close()
        output = BoundedOutput(settings.output_head_bytes, settings.output_tail_bytes)
        assert process.stdout is not None
        reader = threading.Thread(target=output.drain, args=(process.stdout,), daemon=True)
        reader.start()
        code, written, stopped = _wait(process, limit, watch, settings)
    finally:
        refused = group.close() if group is not None else cgroups.Refused()
    reader.join(_DRAIN_GRACE_S)
    if not reader.is_alive():  # else a process that left the group still holds the pipe: let it be
        process.stdout.close()
    if written is None and not stopped:  # a burst between two looks, or just before the end
        written = watch.written()
    text = output.text() or "(no output)"
    notes += _refused_notes(refused, settings)
    if written is not None:
        what = "killed: it" if stopped else "it"
        return ToolResult(False, f"[{what} wrote {written / (1 << 20):.0f} MB into the work tree, over the "
                                 f"{settings.max_disk_mb} MB cap on disk written by one command; the files are "
                                 f"still there: delete what is not needed{_joined(notes)}]\n{text}")
    if stopped:
        return ToolResult(False, f"[timed out after {limit:g} s; the command and its subprocesses were killed"
                                 f"{_joined(notes)}]\n{text}")
    return ToolResult(True, f"[exit code {code}{_joined([*_signal_note(code, settings), *notes])}]\n{text}")


def _wait(process: subprocess.Popen[bytes], limit: float, watch: DiskWatch, settings: Settings
          ) -> tuple[int, int | None, bool]:
    """Wait for the command until it ends, times out or writes more than the disk cap into the
    work tree; then kill what is left of its process group. The exit code, the bytes written
    when over the cap, and whether it was stopped (timeout or cap)."""
    deadline = time.monotonic() + limit
    code, written = -1, None
    try:
        while True:
            try:
                code = process.wait(timeout=max(0.0, min(_DISK_POLL_S, deadline - time.monotonic())))
                return code, None, False
            except subprocess.TimeoutExpired:
                written = watch.written()
                if written is not None or time.monotonic() >= deadline:
                    break
        if settings.sandbox == "off":  # the subreaper kills what left the process group, then exits
            process.terminate()
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        return code, written, True
    finally:
        # Background jobs it left behind die too (and stop holding the output pipe open); in the
        # sandbox, everything in its pid namespace dies with it; the cgroup catches the rest.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _reap(process)


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait for the killed command without Popen's lock: a Ctrl-C landing inside Popen.wait's
    poll, just after it took that lock and before its `try`, leaves the lock held, and a later
    wait() then blocks for ever (seen: `fix` hung after Ctrl-C)."""
    if process.returncode is None:
        try:
            _, status = os.waitpid(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped already
            pass


def _joined(notes: list[str]) -> str:
    return f": {'; '.join(notes)}" if notes else ""


def _signal_note(code: int, settings: Settings) -> list[str]:
    """Why a command died, when a signal says it hit one of the limits."""
    if code == 128 + signal.SIGXFSZ:
        return [f"a file reached the {settings.max_file_mb} MB limit on files a command writes"]
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return [f"killed by {signal.Signals(code - 128).name}"]
    return []


def _refused_notes(refused: cgroups.Refused, settings: Settings) -> list[str]:
    """What the command's cgroup refused it."""
    notes = []
    if refused.oom_kills:
        notes.append(f"out of memory: the {settings.memory_mb} MB limit on the memory of all its processes "
                     f"together killed {refused.oom_kills} process{'es' if refused.oom_kills > 1 else ''}")
    if refused.forks:
        notes.append(f"the limit of {settings.max_processes} processes refused {refused.forks} "
                     f"fork{'s' if refused.forks > 1 else ''}")
    return notes


RUN = Tool(
    "run",
    "Run a bash command in the repository root and get its exit code and output (stdout and stderr "
    "together; long output keeps its beginning and end). Non-interactive: no input, no network; only "
    "the repository is writable (and a private /tmp); nothing it starts outlives it; memory, processes, "
    "file sizes and the disk it may fill are limited. Use it to run tests and scripts.",
    parameters({"command": {"type": "string", "description": "The bash command line."}},
               {"timeout": {"type": "integer", "minimum": 1,
                            "description": "Seconds before the command is killed (default 300, at most 1800)."}}),
    run,
)
