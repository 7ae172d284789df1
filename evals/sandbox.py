"""Sandboxed runs for the eval harnesses.

`run` confines a command with tools.sandbox's sandbox, the one the agent's `run` tool uses: no
capability even when started by root (an unprivileged uid, no_new_privs, seccomp), no network
(loopback only), the host's system directories read-only, a private /tmp, and nothing of the
host writable but the work tree, and (where cgroups can be used: tools.cgroups) the memory and
processes of everything the command starts bounded together, and whatever it leaves behind
killed when it ends. What the harness adds is where things appear: the work tree at
the path a benchmark expects (`/testbed`, `/app`), where the command starts, and more binds
(inputs read-only at `/eval.sh`, `/tmp/patch.diff`, `/tests`...). Started by root, the work tree
and every writable bind are handed to the sandbox's uid first (tools.sandbox.adopt).

`scratch_argv` is an unhardened scratch root (bubblewrap with the caller's privileges, network
optional) for what cannot run in the hardened one: Terminal-Bench's v4 agent, `v4agent fix`
itself, which reaches its model over the network and starts its own hardened sandbox for every
command of the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from evals.proc import EvalError, Finished
from evals.proc import run as run_process
from tools import cgroups, sandbox
from tools.sandbox import Bind, interpreter_dirs
from tools.shell import scrubbed_env

__all__ = ["Bind", "PATH", "require_sandbox", "run", "scratch_argv", "scratch_environ"]

# What every scratch root sees of the host, read-only; merged-/usr symlinks stay symlinks.
HOST_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UID = 65000  # the sandbox's uid when the harness runs as root (as the agent's default)


def require_sandbox(what: str) -> None:
    """EvalError saying why, unless the hardened sandbox works on this machine."""
    try:
        sandbox.check(UID)
    except sandbox.SandboxUnavailable as e:
        raise EvalError(f"{what} needs the sandbox: {e}") from None


def run(work: Bind, argv: Sequence[str], *, env: dict[str, str], timeout: float, binds: Sequence[Bind] = (),
        read_only: Iterable[Path] = (), writable_git: bool = False, log: Path | None = None,
        limits: sandbox.Limits = sandbox.Limits()) -> Finished:
    """`argv` in the sandbox, the work tree `work.source` shown at `work.target` and started in,
    `binds` beside it, `read_only` host paths shown at their own paths (an environment)."""
    require_sandbox("a sandboxed run")
    sandbox.adopt(work.source, UID, with_git=writable_git)
    for bind in binds:
        if bind.writable:
            sandbox.adopt(bind.source, UID)
    try:
        group = cgroups.create(limits.memory_mb << 20, limits.processes)
    except cgroups.CgroupError:  # the per-process rlimits still hold
        group = None
    try:
        try:
            command = sandbox.command(work.source, argv, env, limits=limits, uid=UID, extra=read_only,
                                      at=work.target, binds=binds, writable_git=writable_git, group=group)
        except sandbox.SandboxUnavailable as e:
            raise EvalError(str(e)) from None
        try:
            done = run_process(command.argv, cwd=work.source, env=command.env, timeout=timeout, log=log,
                               pass_fds=command.pass_fds)
        finally:
            command.close()
    finally:
        refused = group.close() if group is not None else cgroups.Refused()
    if refused.oom_kills or refused.forks:
        note = (f"[v4agent: the sandbox's limits refused this command: {refused.oom_kills} process(es) killed "
                f"over {limits.memory_mb} MB, {refused.forks} fork(s) over {limits.processes} processes]")
        done = replace(done, output=f"{done.output}\n{note}\n")
    return done


def scratch_argv(binds: Iterable[Bind], workdir: str, *, network: bool = False,
                 read_only: Iterable[Path] = ()) -> list[str]:
    """The bwrap command line for an unhardened scratch root with `binds`, starting in `workdir`."""
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
