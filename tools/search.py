"""The search tool: a regular expression over the work tree's text files (git's view when it
is a repository: tracked and untracked-not-ignored files), hits as `path:line: text`.

ripgrep (`rg`) is the engine: its regular expressions (Rust's `regex`) never backtrack, so a
search takes time linear in the text whatever the pattern, and it runs as a subprocess that is
killed at TIME_LIMIT_S or on Ctrl-C. The list of files is made here and confined like
`read_file`: no symlink is searched, and no file reached through a symlinked directory.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tools.base import Context, Tool, ToolError, ToolResult, display, parameters, resolve

MAX_FILE_BYTES = 5_000_000  # larger files are data; read_file can still open them
MAX_HIT_CHARS = 200
TIME_LIMIT_S = 20.0  # for one search, all of its rg runs together
_ARGS_BYTES = 500_000  # paths per rg run: a quarter of Linux's usual 2 MB limit on a command line
_SKIPPED_DIRS = frozenset({".git", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".mypy_cache"})


def ripgrep() -> str:
    """The rg binary: the one the `ripgrep` package installed next to this Python, else PATH's."""
    beside = Path(sys.executable).parent / "rg"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("rg")
    if found is None:
        raise ToolError("search needs ripgrep (rg), which is not installed: pip install ripgrep")
    return found


def _listed(root: Path, base: Path) -> list[str]:
    """Paths (relative to `root`) under `base`: git's tracked and untracked-not-ignored files
    when `root` is a git work tree, else every file outside well-known junk directories."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", str(base)],
        cwd=root, capture_output=True,
    )
    if listing.returncode == 0:
        return [name for name in listing.stdout.decode("utf-8", "replace").split("\0") if name]
    found = []
    for folder, dirs, files in os.walk(base):  # does not follow symlinked directories
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        found += [os.path.relpath(os.path.join(folder, name), root) for name in files]
    return found


def _searchable(root: Path, relative: str, real_dirs: dict[str, bool]) -> bool:
    """A regular file of at most MAX_FILE_BYTES whose path has no symlink in it: git's index
    can still name `a/b` after `a` became a symlink leading out of the work tree."""
    parent = os.path.dirname(relative)
    if parent not in real_dirs:
        directory = os.path.join(root, parent)
        real_dirs[parent] = os.path.realpath(directory) == os.path.normpath(directory)
    if not real_dirs[parent]:
        return False
    try:
        info = os.lstat(os.path.join(root, relative))
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= MAX_FILE_BYTES


def _matches_glob(relative: str, glob: str) -> bool:
    # A glob without a slash is about the file name, as in `*.py`; with one, about the path.
    subject = relative if "/" in glob else relative.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(subject, glob)


def _files(context: Context, base: Path, glob: str | None) -> list[str]:
    """The files to search, relative to the work tree, in path order."""
    root = context.root
    names = [display(context, base)] if base.is_file() else _listed(root, base)
    real_dirs: dict[str, bool] = {}
    chosen = {name for name in names
              if (not glob or _matches_glob(name, glob)) and _searchable(root, name, real_dirs)}
    return sorted(chosen, key=lambda name: name.split("/"))


def _batches(names: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for name in names:
        if batch and size + len(name) > _ARGS_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += len(name) + 9  # and its pointer in argv
    if batch:
        yield batch


def _text(field: dict[str, Any]) -> str:
    # rg's JSON carries text that is not UTF-8 as base64 bytes.
    return field["text"] if "text" in field else base64.b64decode(field["bytes"]).decode("utf-8", "replace")


def _hit(data: dict[str, Any]) -> str:
    content = _text(data["lines"]).strip()
    if len(content) > MAX_HIT_CHARS:
        content = content[:MAX_HIT_CHARS] + "…"
    return f"{_text(data['path'])}:{data['line_number']}: {content}"


def _collect(stream: IO[bytes], hits: list[str], limit: int) -> tuple[int, int]:
    """Reads one rg run's JSON lines: appends hits up to `limit`; returns (matching lines,
    files with a match). A file rg found a NUL byte in is binary: its hits are left out."""
    total = files = count = 0
    pending: list[str] = []
    for line in stream:
        # rg writes "type" first; only hits still shown are worth decoding.
        if line.startswith(b'{"type":"match"'):
            count += 1
            if len(hits) + len(pending) < limit:
                pending.append(_hit(json.loads(line)["data"]))
        elif line.startswith(b'{"type":"end"'):
            if count and json.loads(line)["data"]["binary_offset"] is None:
                hits += pending
                total += count
                files += 1
            pending, count = [], 0
    return total, files


def _too_long() -> ToolError:
    return ToolError(f"search took longer than {TIME_LIMIT_S:g} s; narrow the pattern, glob or path")


def _check_pattern(command: list[str], deadline: float) -> None:
    """An invalid pattern is the model's to fix: rg's own message, from a run on no text."""
    try:
        checked = subprocess.run([*command, "--", os.devnull], capture_output=True,
                                 timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        raise _too_long() from None  # a huge pattern takes long to compile
    if checked.returncode == 2:
        # The message up to the first blank line: what follows suggests rg's command-line flags.
        message = checked.stderr.decode("utf-8", "replace").strip().split("\n\n")[0]
        raise ToolError(f"invalid regular expression: {message.removeprefix('rg: ')}\n"
                        "(Rust regex syntax: no look-around, no backreferences; a pattern matches within one line)")


def search(context: Context, pattern: str, glob: str | None = None, path: str = ".",
           ignore_case: bool = False) -> ToolResult:
    command = [ripgrep(), "--no-config", "--json", "--threads=1", f"--regexp={pattern}"]
    if ignore_case:
        command.append("--ignore-case")
    deadline = time.monotonic() + TIME_LIMIT_S
    _check_pattern(command, deadline)
    base = resolve(context, path)
    if not base.exists():
        raise ToolError(f"{path} does not exist")
    limit = context.settings.search_max_results
    hits: list[str] = []
    total = files_with_hits = 0
    for batch in _batches(_files(context, base, glob)):
        # One thread: files are searched, and hits come, in the order given.
        process = subprocess.Popen([*command, "--", *batch], cwd=context.root, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0), process.kill)
        timer.start()
        try:
            assert process.stdout is not None
            found, files = _collect(process.stdout, hits, limit)
            process.wait()
        finally:  # Ctrl-C included: rg does not outlive the call
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode == -signal.SIGKILL:
            raise _too_long()
        total += found
        files_with_hits += files
    where = f" in {path}" if path != "." else ""
    if not total:
        return ToolResult(True, f"No matches for {pattern!r}{where}" + (f" in files matching {glob!r}" if glob else ""))
    header = f"{total} matching lines in {files_with_hits} files"
    if total > limit:
        header += f" (showing the first {limit}; narrow the pattern, glob or path for the rest)"
    return ToolResult(True, header + "\n" + "\n".join(hits))


SEARCH = Tool(
    "search",
    "Search the work tree's text files for a regular expression, line by line (one result per "
    "matching line, as path:line: text; gitignored, binary and symlinked files are skipped). Rust "
    "regex syntax (like Python's, without look-around or backreferences; a match never spans lines). "
    "Narrow with glob (`*.py` matches file names; `src/**/test_*.py` whole paths) and path (a directory).",
    parameters({"pattern": {"type": "string", "description": "A regular expression, e.g. "
                                                             "`def parse_\\w+` or `class Foo\\b`."}},
               {"glob": {"type": "string", "description": "Only files matching this glob."},
                "path": {"type": "string", "description": "Only files under this directory (default: the root)."},
                "ignore_case": {"type": "boolean", "description": "Match case-insensitively."}}),
    search,
)
