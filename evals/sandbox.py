"""A fresh scratch root under bubblewrap: an empty file system holding the host's system
directories read-only, a private /tmp and HOME, no network (unless asked), and the binds a run
needs at the paths it expects (`/app`, `/tests`, `/logs`, `/testbed`).

Where `tools.shell` confines the agent's commands to a work tree inside the host's own view of
the file system, this gives a task the container-like layout its scripts assume. It reuses
tools.shell's probe (`bwrap_available`) and its secret-free environment (`scrubbed_env`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from evals.proc import EvalError
from tools.sandbox import interpreter_dirs
from tools.shell import bwrap_available, scrubbed_env

# What every scratch root sees of the host, read-only; merged-/usr symlinks stay symlinks.
HOST_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Bind:
    source: Path
    target: str
    writable: bool = True


def require_bwrap(what: str) -> None:
    if not bwrap_available():
        raise EvalError(f"{what} needs bubblewrap (apt-get install bubblewrap) or a container engine (--container)")


def scratch_argv(binds: Iterable[Bind], workdir: str, *, network: bool = False,
                 read_only: Iterable[Path] = ()) -> list[str]:
    """The bwrap command line for a scratch root with `binds`, starting in `workdir`."""
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    if not network:
        argv.append("--unshare-net")
    for host_dir in HOST_DIRS:
        if os.path.islink(host_dir):
            argv += ["--symlink", os.readlink(host_dir), host_dir]
        elif os.path.isdir(host_dir):
            argv += ["--ro-bind", host_dir, host_dir]
    # the private /tmp first: what is bound after it stays visible even if it lives under /tmp
    argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", "/root"]
    for path in [*interpreter_dirs(), *read_only]:
        argv += ["--ro-bind", str(path), str(path)]
    for bind in binds:
        argv += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.target]
    return argv + ["--chdir", workdir, "--"]


def scratch_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment inside: tools.shell's allowlist, a system PATH and a private HOME."""
    return {**scrubbed_env(), "PATH": PATH, "HOME": "/root", "TMPDIR": "/tmp", **(extra or {})}
