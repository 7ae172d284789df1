"""Run a command so that nothing it starts outlives it: `python subreaper.py -- ARGV...`.

Used for commands that run without the sandbox (where a pid namespace would do this). This
process becomes a child subreaper, so whatever the command leaves behind, even a daemon that
double-forked into a session of its own, is re-parented here rather than to init; when the
command ends, or when this process gets SIGTERM, every remaining descendant is killed. It exits
with the command's status (128 + signal when a signal ended it).

Runs as a script with `-I -S` (no site, no project imports): it must start fast and trust nothing
from the environment.
"""

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from each process's parent in /proc/PID/stat)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])  # fields after the command name
        parents.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_all() -> None:
    """Kill every descendant and reap them, until none is left (killing one re-parents its children here)."""
    me = os.getpid()
    while True:
        pids = descendants(me)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("subreaper: prctl(PR_SET_CHILD_SUBREAPER) failed", file=sys.stderr)
        return 126

    def stop(signum: int, frame: object) -> None:
        kill_all()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    child = os.fork()
    if child == 0:
        for signum in (signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores the last two
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"subreaper: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    status = 0
    while True:  # reap re-parented orphans too, until the command itself has ended
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    kill_all()
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
