"""A cgroup per command: the memory of all its processes together and their number, bounded by
the kernel, and everything left in it killed when the command ends.

Where (`mechanism()` says which is active):
- "cgroup v2": the caller's own cgroup in a cgroup2 hierarchy with the memory and pids
  controllers (a delegated subtree, a container, a systemd service). Commands' cgroups are made
  inside it, so they stay under whatever limits the caller already has. A cgroup that hands
  controllers to children may hold no process itself ("no internal processes"): when v4agent is
  the only process in its cgroup it moves into a leaf of its own (`v4agent-PID`) first; when
  others share it (a login session's scope), commands' cgroups go into the nearest cgroup above
  that hands both controllers on and that v4agent may write (root's case), else none is used.
- "cgroup v1": the caller's cgroups in writable v1 memory and pids hierarchies (hybrid hosts,
  containers that mount them read-write).
- "rlimits": neither is writable (an unprivileged user on a v1 host); tools.sandbox's
  per-process rlimits are all there is.

A command enters its cgroup before it can fork: `argv()` is a `sh -c` prefix that writes its own
pid into cgroup.procs and then execs the command. The sandbox's cgroup namespace starts there and
it sees no cgroup file system, so it cannot raise its own limits.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids")
# Per controller and cgroup version: the files that take the limit (the first must exist, the
# others are set when the kernel has them) with the share of the limit each gets, and the file
# and key that count what the limit refused. Memory bounds swap too: v1's memory+swap limit takes
# the same value, v2's swap limit none.
_LIMIT_FILES = {
    ("memory", 2): ((("memory.max", 1), ("memory.swap.max", 0)), ("memory.events", "oom_kill")),
    ("memory", 1): ((("memory.limit_in_bytes", 1), ("memory.memsw.limit_in_bytes", 1)),
                    ("memory.oom_control", "oom_kill")),
    ("pids", 2): ((("pids.max", 1),), ("pids.events", "max")),
    ("pids", 1): ((("pids.max", 1),), ("pids.events", "max")),
}
# The file a process joins a cgroup by. v1's `tasks` moves one thread (the writer: `sh` is
# single-threaded), which spares the kernel's global lock and its RCU grace period (~10 ms a
# command on a busy machine); cgroup2 has only cgroup.procs for this.
_JOIN = {1: "tasks", 2: "cgroup.procs"}
# Writes its own pid (0: the writer) into each file named before "--", then runs the rest.
_ENTER = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'
_EMPTY_WAIT_S = 5.0  # how long killed processes get to leave their cgroup before it is left behind


class CgroupError(OSError):
    """No cgroup for this command; the message says why."""


@dataclass(frozen=True)
class Hierarchy:
    """A place commands' cgroups are made: the cgroup `path` (the caller's own, or on v2 one
    above it) in a hierarchy of cgroup `version` that holds `controllers`."""

    version: int
    path: Path
    controllers: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    """What the limits refused a command: processes the memory limit killed, forks the process
    limit refused."""

    oom_kills: int = 0
    forks: int = 0


class Group:
    """One command's cgroup, in each hierarchy (one on v2; memory and pids apart on v1)."""

    def __init__(self, hierarchies: tuple[Hierarchy, ...], memory_bytes: int, processes: int) -> None:
        self.hierarchies = hierarchies
        name = f"v4agent-{os.getpid()}-{secrets.token_hex(4)}"
        self.dirs: list[Path] = []
        values = {"memory": memory_bytes, "pids": processes}
        try:
            for hierarchy in hierarchies:
                folder = hierarchy.path / name
                folder.mkdir()
                self.dirs.append(folder)
                for controller in hierarchy.controllers:
                    files, _ = _LIMIT_FILES[controller, hierarchy.version]
                    for index, (file, share) in enumerate(files):
                        if index == 0 or (folder / file).exists():
                            (folder / file).write_text(str(values[controller] * share))
        except OSError as e:
            self.close()
            raise CgroupError(e.errno, f"cannot make the command's cgroup: {e.strerror or e}", e.filename) from None

    def argv(self) -> list[str]:
        """The prefix that runs a command inside this group."""
        joins = (str(d / _JOIN[h.version]) for h, d in zip(self.hierarchies, self.dirs))
        return ["/bin/sh", "-c", _ENTER, "sh", *joins, "--"]

    def refused(self) -> Refused:
        counts = {}
        for hierarchy, folder in zip(self.hierarchies, self.dirs):
            for controller in hierarchy.controllers:
                file, key = _LIMIT_FILES[controller, hierarchy.version][1]
                counts[controller] = _count(folder / file, key)
        return Refused(counts.get("memory", 0), counts.get("pids", 0))

    def close(self) -> Refused:
        """Kill whatever is left in the group, remove it, and say what its limits refused."""
        refused = self.refused() if len(self.dirs) == len(self.hierarchies) else Refused()
        deadline = time.monotonic() + _EMPTY_WAIT_S
        while self.dirs and time.monotonic() < deadline:
            pids = _kill(self.dirs[0])
            for folder in list(self.dirs):
                try:
                    folder.rmdir()
                    self.dirs.remove(folder)
                except OSError as e:
                    if e.errno != errno.EBUSY:  # gone already, or never ours to remove
                        self.dirs.remove(folder)
            if self.dirs:
                time.sleep(0.001 if not pids else 0.01)
        return refused


def _kill(folder: Path) -> list[str]:
    """Kill every process in the cgroup `folder` (cgroup.kill where the kernel has it, else each
    listed pid); the pids that were listed."""
    try:
        pids = (folder / "cgroup.procs").read_text().split()
    except FileNotFoundError:  # removed already
        return []
    if pids and (folder / "cgroup.kill").exists():
        (folder / "cgroup.kill").write_text("1")
    else:
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


def _count(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline and backslash as octal)."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """The cgroup mounts: (file system type, mount point, the mount's root in its hierarchy, options)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if tail and tail[0] in ("cgroup", "cgroup2"):
                found.append((tail[0], _unescape(fields[4]), _unescape(fields[3]), set(tail[2].split(","))))
    return found


def _own(line_controllers: str) -> str | None:
    """The caller's cgroup path in the hierarchy /proc/self/cgroup lists with these controllers
    ("" for cgroup2)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if (line_controllers == "" and controllers == "") or line_controllers in controllers.split(","):
                return path
    return None


def _inside(mount_point: str, mount_root: str, path: str) -> Path | None:
    """The directory of cgroup `path` under a mount of the hierarchy at `mount_root`."""
    relative = os.path.relpath(path, mount_root)
    return None if relative.startswith("..") else Path(mount_point, relative)


def _v2() -> Hierarchy:
    mount = next((m for m in _mounts() if m[0] == "cgroup2"), None)
    path = _own("")
    if mount is None or path is None:
        raise CgroupError(errno.ENOENT, "no cgroup2 hierarchy")
    own = _inside(mount[1], mount[2], path)
    if own is None:
        raise CgroupError(errno.ENOENT, "v4agent's cgroup2 is outside the mounted hierarchy")
    missing = set(CONTROLLERS) - set((own / "cgroup.controllers").read_text().split())
    if missing:
        raise CgroupError(errno.ENOENT, f"cgroup2 lacks the {' and '.join(sorted(missing))} controller")
    if _hands_on(own):
        return Hierarchy(2, own, CONTROLLERS)
    if (own / "cgroup.procs").read_text().split() == [str(os.getpid())]:
        leaf = own / f"v4agent-{os.getpid()}"  # v4agent's own place, so `own` may hand on controllers
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        (own / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
        return Hierarchy(2, own, CONTROLLERS)
    # Others share v4agent's cgroup (a login session's scope): the nearest cgroup above that
    # hands both controllers on and that v4agent may write (root may; others rarely).
    for parent in own.parents:
        if not parent.is_relative_to(mount[1]):
            break
        if _hands_on(parent) and os.access(parent, os.W_OK):
            return Hierarchy(2, parent, CONTROLLERS)
    raise CgroupError(errno.EBUSY, "other processes share v4agent's cgroup2 and no cgroup above it may be used")


def _hands_on(folder: Path) -> bool:
    """Whether the cgroup2 `folder` enables both controllers for its children."""
    return set(CONTROLLERS) <= set((folder / "cgroup.subtree_control").read_text().split())


def _v1() -> tuple[Hierarchy, ...]:
    found = []
    for controller in CONTROLLERS:
        mount = next((m for m in _mounts() if m[0] == "cgroup" and controller in m[3]), None)
        path = _own(controller)
        if mount is None or path is None:
            raise CgroupError(errno.ENOENT, f"no cgroup v1 {controller} hierarchy")
        own = _inside(mount[1], mount[2], path)
        if own is None:
            raise CgroupError(errno.ENOENT, f"v4agent's {controller} cgroup is outside the mounted hierarchy")
        found.append(Hierarchy(1, own, (controller,)))
    return tuple(found)


@functools.cache
def _detect() -> tuple[tuple[Hierarchy, ...], str]:
    """The hierarchies commands' cgroups go in, and the mechanism's name; where none works,
    () and why (each candidate proven by making and removing one cgroup)."""
    reasons = []
    for name, find in (("cgroup v2", lambda: (_v2(),)), ("cgroup v1", _v1)):
        try:
            hierarchies = find()
            Group(hierarchies, 64 << 20, 16).close()
            return hierarchies, name
        except (OSError, ValueError) as e:
            reasons.append(f"{name}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
    return (), "; ".join(reasons)


def mechanism() -> str:
    """How commands' memory and processes are bounded here: "cgroup v2", "cgroup v1" or "rlimits"."""
    hierarchies, name = _detect()
    return name if hierarchies else "rlimits"


def unavailable_reason() -> str | None:
    """Why no cgroup is used (None when one is)."""
    hierarchies, reason = _detect()
    return None if hierarchies else reason


def create(memory_bytes: int, processes: int) -> Group | None:
    """A new cgroup for one command with these limits; None where cgroups are not available.
    Raises CgroupError when they are but this one cannot be made."""
    hierarchies, _ = _detect()
    return Group(hierarchies, memory_bytes, processes) if hierarchies else None
