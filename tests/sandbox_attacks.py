"""Attacks on the sandbox, run inside it by tests/test_sandbox.py: `python sandbox_attacks.py JSON`.

JSON holds what the host knows: `host_pid` (a process outside), `outside` (a directory next to the
work tree), `hidden` (host paths that must not be visible), `tcp_port` (a server on the host's
127.0.0.1), `abstract` (an abstract Unix socket name on the host), `uid` (the uid expected).
Prints one JSON object: attack name -> "refused", or "BREACH: what happened".
Standard library only: it also runs under a system Python as an unprivileged user.
"""

import ctypes
import json
import os
import socket
import subprocess
import sys

libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND = 32, 4096
CLONE_FLAGS = {"mount": 0x20000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
               "user": 0x10000000, "pid": 0x20000000, "net": 0x40000000}
PTRACE_ATTACH, PTRACE_TRACEME = 16, 0


def status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def fails(action) -> str:
    """'refused' when `action` raises or returns a C failure (-1); else a BREACH line."""
    try:
        result = action()
    except Exception:
        return "refused"
    if result == -1 or result is False:
        return "refused"
    return f"BREACH: {result!r}"


def write(path: str) -> bool:
    with open(path, "w") as f:
        f.write("planted")
    return True


def read(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return data[:40] if data else False


def connect_tcp(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


def connect_unix(address: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(address)
        return True


def command(*argv: str) -> object:
    done = subprocess.run(argv, capture_output=True)
    return -1 if done.returncode else f"{argv[0]} succeeded"


def main(facts: dict) -> dict[str, str]:
    me = status()
    out: dict[str, str] = {}
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        out[f"capabilities {field}"] = "refused" if int(me[field], 16) == 0 else f"BREACH: {me[field]}"
    out["no_new_privs"] = "refused" if me.get("NoNewPrivs") == "1" else f"BREACH: NoNewPrivs {me.get('NoNewPrivs')}"
    uid = os.getuid()
    out["unprivileged uid"] = "refused" if uid != 0 and uid == facts["uid"] else f"BREACH: uid {uid}"
    out["seccomp"] = "refused" if me.get("Seccomp") == "2" else f"BREACH: Seccomp {me.get('Seccomp')}"

    out["remount / read-write"] = fails(lambda: libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None))
    out["mount tmpfs"] = fails(lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
    out["mount command"] = fails(lambda: command("mount", "-o", "remount,rw", "/"))
    out["chroot"] = fails(lambda: os.chroot("/"))
    for name, flag in CLONE_FLAGS.items():
        out[f"unshare {name}"] = fails(lambda flag=flag: libc.unshare(flag))
    out["unshare command"] = fails(lambda: command("unshare", "-U", "-r", "true"))
    out["write /proc/sys"] = fails(lambda: write("/proc/sys/kernel/core_pattern"))
    out["write /proc/sysrq-trigger"] = fails(lambda: write("/proc/sysrq-trigger"))
    out["ptrace host process"] = fails(lambda: libc.ptrace(PTRACE_ATTACH, facts["host_pid"], None, None))
    out["signal host process"] = fails(lambda: os.kill(facts["host_pid"], 0))
    if os.uname().machine == "x86_64":  # keyctl(KEYCTL_READ, the user keyring); 250 is x86-64's number
        out["keyring"] = fails(lambda: libc.syscall(250, 11, -4, None, 0))

    out["write next to the work tree"] = fails(lambda: write(os.path.join(facts["outside"], "planted")))
    for path in ("/usr/planted", "/etc/planted", "/planted", "/opt/planted"):
        out[f"write {path}"] = fails(lambda path=path: write(path))
    out["read /etc/shadow"] = fails(lambda: read("/etc/shadow"))
    for path in facts["hidden"]:
        out[f"see {path}"] = "refused" if not os.path.lexists(path) else "BREACH: it exists"
    for path in ("/run", "/var/run", "/sys", "/home"):
        listing = os.listdir(path) if os.path.isdir(path) else []
        out[f"see {path}"] = f"BREACH: {listing[:5]}" if listing else "refused"

    out["tcp to the host"] = fails(lambda: connect_tcp(facts["tcp_port"]))
    out["abstract unix socket"] = fails(lambda: connect_unix("\0" + facts["abstract"]))
    out["internet"] = fails(lambda: socket.create_connection(("1.1.1.1", 53), timeout=2) and True)
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
