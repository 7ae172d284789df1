"""The sandbox every command of the model runs in, and the limits every such command gets.

The view (the same whoever starts v4agent): the work tree read-write (its .git read-only), a
private /tmp (also $HOME) and /var/tmp, the system directories read-only (/usr, /bin, /sbin,
/lib*, /opt), /etc read-only with the files in SECRET_ETC hidden, this Python's installation and
virtualenv and any `extra` paths read-only (but never the evals' data of this installation,
HIDDEN: gold patches, test patches, task solutions), a minimal /dev and a /proc of its own.
Nothing else:
no home directory, no /run (no host sockets), no /sys, no other repository, not the user's
checkout (the git objects the work tree borrows are shown read-only at a neutral path). A network
namespace of its own (loopback only), and its own pid, ipc, uts and cgroup namespaces.

No privilege, two ways in:
- started by root, bubblewrap runs privileged (it needs no user namespace to build the view) and
  the command then becomes the unprivileged `uid` with the bounding set and every capability
  cleared and no_new_privs set (setpriv); the work tree is handed to that uid (`adopt`), so the
  command owns nothing else on the machine and counts its processes against its own uid only;
- started by anyone else, bubblewrap makes a user namespace (the uid stays the caller's), holds
  no capability, and forbids further user namespaces.
Both load the same seccomp filter (BLOCKED_SYSCALLS, and clone with any namespace flag), which
refuses mount, namespaces, ptrace, keyrings, bpf and kernel modules even where a kernel would
allow them to an unprivileged user.

Limits (both sandboxed and unconfined commands): the command's own cgroup where one can be made
(tools.cgroups: the memory of all its processes together, their number), rlimits set by prlimit
— data and anonymous memory of each process (RLIMIT_DATA), the size of any one file written
(RLIMIT_FSIZE), no core dumps, and processes (RLIMIT_NPROC, counted per uid) where there is no
cgroup — and the size of the private /tmp.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools import cgroups

# Read-only system directories; merged-/usr symlinks (/bin -> usr/bin) stay symlinks.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
# Files and directories of /etc that hold credentials or keys: hidden even where readable.
# (Anything else of /etc that is not world-readable stays unreadable: the command is unprivileged.)
SECRET_ETC = (
    "shadow", "shadow-", "gshadow", "gshadow-", "security/opasswd", "sudoers", "sudoers.d", "ssh", "ssl/private",
    "krb5.keytab", "environment", "apt/auth.conf", "apt/auth.conf.d", "pip.conf", "docker", "containers/auth.json",
    "credstore", "credstore.encrypted", "NetworkManager/system-connections", "wpa_supplicant", "wireguard",
    "ppp/chap-secrets", "ppp/pap-secrets", "ipsec.secrets", "openvpn", "letsencrypt", "mysql/debian.cnf",
)
BLOCKED_SYSCALLS = (
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "ptrace", "process_vm_readv",
    "process_vm_writev", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "acct", "quotactl", "syslog",
)
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_CLONE_NAMESPACES = (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80)
OBJECTS_MOUNT = "/.v4agent/objects"  # where the git objects a shared clone borrows are shown
HOME = "/tmp/home"
# Never shown, even inside a shown directory: the evals' gold patches, test patches and task
# solutions, which sit inside an installed package (site-packages/evals/data).
HIDDEN = (Path(__file__).resolve().parents[1] / "evals" / "data",)
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), "
                "or run without a sandbox at your own risk with --sandbox off (or sandbox = \"off\" in the config)")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    """Per-command limits. memory_mb: the memory of the command's processes together (its
    cgroup), and the data segment and anonymous memory of each; processes: processes and threads
    of the command (its cgroup; without one, of the sandbox's uid); file_mb: the largest file a
    command may write; tmp_mb: the size of the private /tmp."""

    memory_mb: int = 8192
    processes: int = 512
    file_mb: int = 1024
    tmp_mb: int = 1024


def interpreter_dirs() -> list[Path]:
    """This Python's installation and virtualenv outside /usr (pyenv, a venv, perhaps under
    /tmp or $HOME): the sandbox shows these read-only, so the tests can run with them."""
    dirs = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    if os.environ.get("VIRTUAL_ENV"):  # the user's activated environment: most likely the project's
        dirs.add(Path(os.environ["VIRTUAL_ENV"]).resolve())
    return sorted(d for d in dirs if d.is_dir() and not d.is_relative_to("/usr"))


def limit_argv(limits: Limits, uid: int, group: cgroups.Group | None = None) -> list[str]:
    """The prefix that runs a command under `limits`: into `group` (its cgroup, if it has one),
    then prlimit. RLIMIT_DATA stays with a cgroup too: no one process may take more than the
    whole command anyway, and a single hog then fails an allocation it can report rather than
    being killed. RLIMIT_NPROC goes: pids.max counts exactly the command's processes, where
    RLIMIT_NPROC counts every process of a uid (all sandboxes running at once share one), so
    without a cgroup a uid that also runs other things gets its current count on top."""
    argv = [_which("prlimit"), f"--data={limits.memory_mb << 20}", f"--fsize={limits.file_mb << 20}", "--core=0"]
    if group is not None:
        return [*group.argv(), *argv, "--"]
    processes = limits.processes + (0 if uid != os.geteuid() or uid == 0 else _process_count(uid))
    return [*argv, f"--nproc={processes}", "--"]


def _process_count(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count


def _which(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)),
                                       None)
    if found is None:
        raise SandboxUnavailable(f"{name} (util-linux) is not installed")
    return found


@functools.cache
def seccomp_filter() -> bytes:
    """The compiled BPF program (for this machine's architecture) that refuses BLOCKED_SYSCALLS
    and namespace-creating clones with EPERM, and clone3 with ENOSYS (its flags sit in memory
    a filter cannot read; libc falls back to clone)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as e:  # OSError: libseccomp.so.2 itself is missing
        raise SandboxUnavailable(f"seccomp is not available ({e}); install libseccomp2") from None
    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in BLOCKED_SYSCALLS:
        try:
            flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            pass  # a system call this architecture does not have
    for flag in _CLONE_NAMESPACES:
        flt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


def _data_fd(data: bytes) -> int:
    """A file descriptor to read `data` from (for bubblewrap's --add-seccomp-fd / --ro-bind-data)."""
    fd = os.memfd_create("v4agent-sandbox", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass(frozen=True)
class Bind:
    """One more path in the sandbox (for the eval harness): `source` on the host at `target`."""

    source: Path
    target: str
    writable: bool = True


@dataclass
class Command:
    """A command line ready for subprocess: `argv`, the descriptors to pass (`pass_fds`), the
    environment; `close()` releases the descriptors once the process has started."""

    argv: list[str]
    pass_fds: tuple[int, ...]
    env: dict[str, str]

    def close(self) -> None:
        for fd in self.pass_fds:
            os.close(fd)


def borrowed_objects(root: Path) -> list[Path]:
    """The object directories a shared clone at `root` borrows (git's alternates), at any depth:
    a `clone --shared` of a shared clone reads objects through its source's alternates too. As
    git reads them: one path a line, relative ones to the objects directory that lists them."""
    found: list[Path] = []

    def follow(objects: Path, depth: int) -> None:
        alternates = objects / "info" / "alternates"
        if depth > 5 or not alternates.is_file():  # git's own nesting limit
            return
        for line in alternates.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            path = (objects / line.strip()).resolve()
            if path.is_dir() and path not in found:
                found.append(path)
                follow(path, depth + 1)

    follow(root / ".git" / "objects", 0)
    return found


def command(root: Path, argv: Sequence[str], env: dict[str, str], *, limits: Limits = Limits(), uid: int = 65000,
            extra: Iterable[Path] = (), at: str | None = None, binds: Sequence[Bind] = (),
            writable_git: bool = False, group: cgroups.Group | None = None) -> Command:
    """`argv` confined to the work tree `root` with `limits`, in the cgroup `group` when given;
    `uid` is the unprivileged uid the command runs as when v4agent runs as root. Raises
    SandboxUnavailable.

    For the eval harness only (the agent's commands use none of these): `at` shows the work tree
    at another path (`/testbed`), where the command starts; `binds` adds paths at targets of
    their own; `writable_git` lets the command change the work tree's .git (a grading tree that
    is thrown away afterwards), though never the objects it borrows."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
    as_root = os.geteuid() == 0
    fds: list[int] = []
    try:
        fds.append(_data_fd(seccomp_filter()))
        args = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
        if not as_root:
            args += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        args += ["--ro-bind", "/etc", "/etc"]
        for name in SECRET_ETC:
            path = Path("/etc", name)
            if path.is_dir() and not path.is_symlink():
                args += ["--tmpfs", str(path)]
            elif path.exists() or path.is_symlink():
                args += ["--ro-bind", "/dev/null", str(path)]
        args += ["--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--size", str(limits.tmp_mb << 20),
                 "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", "/var/tmp", "--perms", "0777", "--dir", HOME]
        shown = sorted({*interpreter_dirs(), *(Path(p).resolve() for p in extra)})
        inside = Path(at or root)
        targets = [inside, *(Path(b.target) for b in binds)]
        # Parent directories bubblewrap creates would copy the host's modes (/root is 0700): make
        # them traversable for the unprivileged uid, and no more.
        for parent in sorted({p for path in [*shown, *targets] for p in path.parents} - {Path("/"), Path("/tmp")}):
            if not any(parent.is_relative_to(d) for d in (*SYSTEM_DIRS, "/etc")):
                args += ["--perms", "0755", "--dir", str(parent)]
        for path in shown:
            args += ["--ro-bind", str(path), str(path)]
        for path in HIDDEN:
            if any(path.is_relative_to(d) for d in shown) and path.is_dir():
                args += ["--tmpfs", str(path)]
        args += ["--bind", str(root), str(inside)]
        git_dir = root / ".git"
        if git_dir.is_dir():
            if not writable_git:
                args += ["--ro-bind", str(git_dir), str(inside / ".git")]
            borrowed = borrowed_objects(root)
            if borrowed:
                args += ["--perms", "0755", "--dir", str(Path(OBJECTS_MOUNT).parent), "--perms", "0755", "--dir",
                         OBJECTS_MOUNT]
            for index, objects in enumerate(borrowed):
                args += ["--ro-bind", str(objects), f"{OBJECTS_MOUNT}/{index}"]
                if (objects / "info" / "alternates").is_file():
                    # the top list names every level; a nested one would name host paths
                    args += ["--ro-bind", "/dev/null", f"{OBJECTS_MOUNT}/{index}/info/alternates"]
            if borrowed:  # git inside reads the neutral paths; the user's checkout stays unseen
                fds.append(_data_fd("".join(f"{OBJECTS_MOUNT}/{i}\n" for i in range(len(borrowed))).encode()))
                args += ["--perms", "0444", "--ro-bind-data", str(fds[-1]),
                         str(inside / ".git" / "objects" / "info" / "alternates")]
        for bind in binds:
            args += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.target]
        # The new root itself is a tmpfs the user namespace owns: nothing may be written there.
        args += ["--remount-ro", "/", "--chdir", str(inside), "--add-seccomp-fd", str(fds[0]), "--"]
        if as_root:
            args += [_which("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                     "--bounding-set=-all", "--no-new-privs", "--"]
        environ = {**env, "HOME": HOME, "TMPDIR": "/tmp",
                  # .git belongs to the invoking user, not to the sandbox's uid: let git read it
                  "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": str(inside)}
        return Command(limit_argv(limits, uid if as_root else os.geteuid(), group) + args + list(argv), tuple(fds),
                       environ)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def adopt(root: Path, uid: int, *, with_git: bool = False) -> None:
    """Hand the work tree's contents (but not its .git, unless `with_git`: a grading tree whose
    git the sandbox uses) to `uid` (also the sandbox's gid), so the unprivileged command can
    change them. The top directory keeps its owner, for git outside the sandbox, and is opened to
    the group instead. Only root does this, once per work tree: the top directory's group says
    whether it is done."""
    if os.geteuid() != 0 or root.stat().st_gid == uid:
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if with_git or not (folder == str(root) and d == ".git")]
        for name in [*dirs, *files]:
            os.lchown(os.path.join(folder, name), uid, uid)
    os.chown(root, -1, uid)
    os.chmod(root, root.stat().st_mode | 0o070)


def hand_over(root: Path, path: Path) -> None:
    """Give `path`, just created inside the work tree by v4agent itself, to the sandbox's uid when
    `adopt` handed the tree over, so later sandboxed commands may change it too."""
    group = root.stat().st_gid
    if os.geteuid() == 0 and group != 0:
        os.lchown(path, group, group)


@functools.cache
def _probe(as_root: bool, uid: int) -> str | None:
    """Why the sandbox cannot run here (None when it can): one real sandboxed command in a
    scratch work tree, which must be able to write there and nowhere else."""
    del as_root  # part of the cache key: a process that changes uid probes again
    with tempfile.TemporaryDirectory(prefix="v4agent-probe-") as tmp:
        root = Path(tmp).resolve()
        try:
            adopt(root, uid)
            cmd = command(root, ["/bin/sh", "-c", "echo ok > probe && test ! -w /etc"], {"PATH": "/usr/bin:/bin"},
                          uid=uid)
        except SandboxUnavailable as e:
            return str(e)
        try:
            done = subprocess.run(cmd.argv, env=cmd.env, pass_fds=cmd.pass_fds, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bubblewrap did not run: {e}"
        finally:
            cmd.close()
        if done.returncode != 0 or not (root / "probe").is_file():
            detail = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()
            return f"bubblewrap failed here: {detail[-1] if detail else f'exit code {done.returncode}'}"
    return None


def check(uid: int = 65000) -> None:
    """Raise SandboxUnavailable (saying how to fix it) unless the sandbox works on this machine."""
    problem = _probe(os.geteuid() == 0, uid)
    if problem is not None:
        raise SandboxUnavailable(f"the sandbox cannot run: {problem}; {INSTALL_HINT}")


def available(uid: int = 65000) -> bool:
    return _probe(os.geteuid() == 0, uid) is None
