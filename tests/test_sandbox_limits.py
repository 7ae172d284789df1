"""Per-command limits enforced for the whole command tree (tools/cgroups.py) and the cap on disk
written into the work tree (tools/shell.py), with real processes, sandboxed and unconfined: a
memory hog spread over processes and a fork bomb end as tool results that say which limit hit,
a command filling the work tree is killed, its cgroup is gone afterwards, and the agent goes on.
CI runs these as root on hosts where cgroups are writable (v2, or v1 on hybrid hosts)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tools import cgroups, sandbox
from tools.base import Settings
from tools.registry import call

MODES = ["on", "off"]
# where the unconfined case runs the same cgroup code as the sandboxed one, it runs with -m slow
SAME_IN_BOTH = ["on", pytest.param("off", marks=pytest.mark.slow)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The work tree; the sandbox hands it to its uid on the first command, as in `fix`."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def goes_on(root: Path, settings: Settings) -> None:
    after = call("run", {"command": "echo still here"}, root, settings=settings)
    assert after.ok and "still here" in after.output, after.output


def test_cgroups_are_in_use_here():
    """Root on this project's machines (and CI) can make cgroups; without them the tests below
    would only see per-process rlimits."""
    assert os.geteuid() != 0 or cgroups.mechanism() in ("cgroup v2", "cgroup v1"), cgroups.unavailable_reason()


@pytest.mark.parametrize("mode", SAME_IN_BOTH)
def test_memory_of_all_processes_together_is_bounded(root: Path, mode: str):
    """Four processes of 100 MB each: each is under its own 256 MB RLIMIT_DATA, together they are
    over the command's 256 MB."""
    settings = Settings(sandbox=mode, memory_mb=256)
    hog = ("for i in 1 2 3 4; do python3 -c 'import time; b = b\"x\" * (100 << 20); time.sleep(4)' & done; "
           "wait; echo finished")
    result = call("run", {"command": hog}, root, settings=settings)
    assert result.output.startswith("[exit code 0: out of memory: the 256 MB limit on the memory of all its "
                                    "processes together killed "), result.output
    assert "finished" in result.output
    goes_on(root, settings)


@pytest.mark.parametrize("mode", MODES)
def test_processes_of_the_command_are_bounded(root: Path, mode: str):
    """200 sleepers, where 64 processes are allowed: the rest are refused, whoever runs v4agent
    (root's unconfined commands were exempt from RLIMIT_NPROC)."""
    settings = Settings(sandbox=mode, max_processes=64)
    many = "for i in $(seq 200); do sleep 5 & done"  # bash gives up when a fork keeps failing
    result = call("run", {"command": many}, root, settings=settings)
    assert re.search(r"the limit of 64 processes refused \d+ forks?\]", result.output), result.output
    goes_on(root, settings)


@pytest.mark.parametrize("mode", MODES)
def test_a_fork_bomb_ends_as_a_tool_result(root: Path, mode: str):
    settings = Settings(sandbox=mode, max_processes=64)
    assert cgroups.mechanism() != "rlimits"  # unconfined, root is exempt from RLIMIT_NPROC: no bomb without pids.max
    started = time.monotonic()
    bomb = call("run", {"command": "bomb() { bomb | bomb & }; bomb; sleep 2", "timeout": 5}, root,
                settings=settings)
    assert time.monotonic() - started < 20  # bash retries a failed fork for a while: it may last until the timeout
    assert "processes refused" in bomb.output, bomb.output[:500]
    goes_on(root, settings)


def _writer(folder: str) -> str:
    """Writes 1 MB files into `folder`, one each 20 ms: 100 MB in all."""
    return (f"mkdir -p {folder} && for i in $(seq 100); do head -c 1048576 /dev/zero > {folder}/f$i; sleep 0.02; "
            "done; echo all written")


@pytest.mark.parametrize("mode", MODES)
def test_disk_written_into_the_work_tree_is_capped(root: Path, mode: str, tmp_path: Path):
    settings = Settings(sandbox=mode, max_disk_mb=20, tmp_mb=200, max_file_mb=4)
    result = call("run", {"command": _writer("out")}, root, settings=settings)
    assert not result.ok
    written = re.match(r"\[killed: it wrote (\d+) MB into the work tree, over the 20 MB cap on disk written by one "
                       r"command; the files are still there", result.output)
    assert written, result.output
    files = list((root / "out").iterdir())
    assert 20 <= len(files) < 100 and "all written" not in result.output  # killed on the way, the files kept
    assert int(written[1]) >= 20
    goes_on(root, settings)

    # The same amount elsewhere: the sandbox's /tmp, or (unconfined) another folder on the work tree's file system.
    elsewhere = "/tmp/out" if mode == "on" else str(tmp_path / "elsewhere")
    result = call("run", {"command": _writer(elsewhere)}, root, settings=settings)
    assert result.ok and "all written" in result.output, result.output


def test_a_burst_between_two_looks_is_reported(root: Path):
    """A command that writes over the cap and ends before the next look still gets the error
    (on a busy machine a look may come first and kill it)."""
    settings = Settings(max_disk_mb=8, max_file_mb=4)
    burst = "for i in 1 2 3 4; do head -c 3000000 /dev/zero > burst$i; done"
    result = call("run", {"command": burst}, root, settings=settings)
    assert not result.ok and re.match(r"\[(killed: )?it wrote (9|11) MB into the work tree, over the 8 MB cap",
                                      result.output), result.output


def _groups() -> list[Path]:
    """This process's commands' cgroups that exist now."""
    hierarchies, _ = cgroups._detect()
    return [p for h in hierarchies for p in h.path.glob(f"v4agent-{os.getpid()}-*")]


@pytest.mark.parametrize("mode", MODES)
def test_each_command_has_a_cgroup_that_is_gone_afterwards(root: Path, mode: str):
    """The command's processes run in a cgroup of their own, removed when it ends, also after a
    timeout with processes left in the background; in the sandbox, the command sees neither its
    cgroup's name nor a cgroup file system to raise its limits with."""
    settings = Settings(sandbox=mode)
    seen: list[str] = []

    def look() -> None:
        time.sleep(1)
        seen.extend(pid for group in _groups() for pid in (group / "cgroup.procs").read_text().split())

    looker = threading.Thread(target=look)
    looker.start()
    timed_out = call("run", {"command": "sleep 60 & sleep 60 & sleep 60", "timeout": 2}, root,
                     settings=settings)
    looker.join()
    assert "timed out" in timed_out.output
    assert len(set(seen)) >= 4, seen  # bash and its three sleepers at least
    assert _groups() == []
    if mode == "on":
        shown = call("run", {"command": "cat /proc/self/cgroup; ls /sys/fs/cgroup"}, root,
                     settings=settings)
        assert "v4agent-" not in shown.output and "No such file or directory" in shown.output, shown.output
    goes_on(root, settings)


def test_max_disk_mb_is_a_setting():
    """From the config file or V4AGENT_MAX_DISK_MB to the run tool; it must be positive."""
    from agent.cli.fix import tool_settings_of
    from agent.settings import SettingsError, load_settings

    settings = load_settings(environ={"V4AGENT_MAX_DISK_MB": "300", "V4AGENT_CONFIG": "/dev/null"})
    assert tool_settings_of(settings).max_disk_mb == 300
    assert Settings().max_disk_mb == load_settings(environ={"V4AGENT_CONFIG": "/dev/null"}).max_disk_mb == 2048
    with pytest.raises(SettingsError, match="V4AGENT_MAX_DISK_MB must be positive"):
        load_settings(environ={"V4AGENT_MAX_DISK_MB": "0", "V4AGENT_CONFIG": "/dev/null"})


def test_the_disk_cap_cannot_be_dodged(root: Path):
    """Files stamped with an old time, deeper than Python's stack and than a path may be long:
    still counted (by ctime; a folder the walk cannot read counts the file system's growth)."""
    hide = ("python3 -c \"import os, time\nfor i in range(2500): os.mkdir('d'); os.chdir('d')\n"
            "for i in range(100):\n    open(f'f{i}', 'wb').write(bytes(1 << 20)); os.utime(f'f{i}', (0, 0)); "
            "time.sleep(0.02)\nprint('all written')\"")
    result = call("run", {"command": hide}, root, settings=Settings(max_disk_mb=20))
    assert not result.ok and result.output.startswith("[killed: it wrote "), result.output
    assert "all written" not in result.output
    subprocess.run(["rm", "-rf", str(root / "d")], check=True)  # too deep for pytest's own clean-up


def test_the_eval_graders_sandbox_bounds_all_processes_together(tmp_path: Path):
    """evals/sandbox.py (the SWE-bench grader's and Terminal-Bench's sandbox) puts each command in
    a cgroup too: four processes of 100 MB, each under its own rlimit, are over 256 MB together;
    a process the command leaves behind is killed when it ends."""
    from evals.sandbox import Bind, run

    work = tmp_path / "testbed"
    work.mkdir()
    hog = ("for i in 1 2 3 4; do python3 -c 'import time; b = b\"x\" * (100 << 20); time.sleep(4)' & done; wait; "
           "(sleep 300; echo late > left.txt) & echo finished")
    limits = sandbox.Limits(memory_mb=256)
    done = run(Bind(work, "/testbed"), ["bash", "-c", hog], env={}, timeout=60, limits=limits)
    assert "finished" in done.output
    if cgroups.mechanism() == "rlimits":
        pytest.skip(cgroups.unavailable_reason() or "no cgroups")
    assert re.search(r"\[v4agent: the sandbox's limits refused this command: [1-4] process\(es\) killed over "
                     r"256 MB, 0 fork\(s\)", done.output), done.output
    deadline = time.monotonic() + 10  # SIGKILLed processes may take a moment to leave /proc
    while any(_cmdline(p) == b"sleep\x00300\x00" for p in Path("/proc").glob("[0-9]*")):
        assert time.monotonic() < deadline, "the command's leftover `sleep 300` is still running"
        time.sleep(0.2)


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
