"""File tools: read_file, list_dir, edit_file, write_file. Reads show line numbers; edits
replace text that must occur exactly once, and say precisely why when it does not.

Text is UTF-8 when it decodes as UTF-8, else Latin-1 (one character per byte, so any bytes
read as text and written back are the same bytes): a file in another encoding is edited in
place without touching the bytes around the edit, and keeps its encoding when written.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from tools.base import Context, Tool, ToolError, ToolResult, display, parameters, resolve
from tools.sandbox import hand_over

_SNIPPET_CONTEXT = 3  # lines shown around an edit


def _decode(data: bytes) -> tuple[str, str]:
    """(text, encoding): UTF-8 when the bytes are UTF-8, else Latin-1."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _encode(path: str, text: str, encoding: str) -> bytes:
    try:
        return text.encode(encoding)
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end]  # only Latin-1 can fail: tools.base refuses lone surrogates
        raise ToolError(f"{path} is not UTF-8 (it is read and written as Latin-1, one character per byte), and "
                        f"{bad!r} has no Latin-1 byte; keep to its characters, or delete the file to write it "
                        f"afresh as UTF-8") from None


def _read_text(context: Context, path: str, *, for_writing: bool = False) -> tuple[Path, str, str]:
    """(file, text, encoding) of a text file of the work tree."""
    target = resolve(context, path, for_writing=for_writing)
    if target.is_dir():
        raise ToolError(f"{path} is a directory; use list_dir")
    if not target.is_file():
        raise ToolError(f"{path} does not exist")
    data = target.read_bytes()
    if b"\0" in data[:8192]:
        raise ToolError(f"{path} is a binary file")
    return target, *_decode(data)


def _lines(text: str) -> list[str]:
    """The lines of `text` with their ends, broken at newlines only (str.splitlines also breaks at
    form feeds, \\x85 — a Latin-1 byte — and more, which would put line numbers off)."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _numbered(lines: list[str], first: int, max_chars: int) -> str:
    """Lines prefixed with their 1-based numbers; overlong lines are cut."""
    width = len(str(first + len(lines) - 1))
    out = []
    for number, line in enumerate(lines, first):
        line = line.rstrip("\n")
        if len(line) > max_chars:
            line = line[:max_chars] + f" … [{len(line) - max_chars} more characters]"
        out.append(f"{number:>{width}}\t{line}")
    return "\n".join(out)


def read_file(context: Context, path: str, start_line: int = 1, end_line: int | None = None) -> ToolResult:
    target, text, encoding = _read_text(context, path)
    lines = _lines(text)
    total = len(lines)
    if total == 0:
        return ToolResult(True, f"{display(context, target)} is empty")
    if start_line > total:
        raise ToolError(f"start_line {start_line} is past the end of {path} ({total} lines)")
    last = min(end_line if end_line is not None else total, total)
    if last < start_line:
        raise ToolError(f"end_line {end_line} is before start_line {start_line}")
    last = min(last, start_line + context.settings.read_max_lines - 1)
    latin = ", not UTF-8: read as Latin-1" if encoding == "latin-1" else ""
    header = f"{display(context, target)} (lines {start_line}-{last} of {total}{latin})"
    body = _numbered(lines[start_line - 1:last], start_line, context.settings.read_max_line_chars)
    more = f"\n[… {total - last} more lines; read again with start_line={last + 1}]" if last < total else ""
    return ToolResult(True, f"{header}\n{body}{more}")


def list_dir(context: Context, path: str = ".") -> ToolResult:
    target = resolve(context, path)
    if not target.is_dir():
        raise ToolError(f"{path} is not a directory" if target.exists() else f"{path} does not exist")
    entries = []
    for entry in sorted(os.scandir(target), key=lambda e: (not e.is_dir(), e.name)):
        if entry.name == ".git":
            continue
        if entry.is_dir():
            entries.append(f"{entry.name}/")
        else:
            size = entry.stat().st_size if entry.is_file() else 0
            entries.append(f"{entry.name}  ({size} bytes)" + (" -> symlink" if entry.is_symlink() else ""))
    limit = context.settings.list_max_entries
    shown = entries[:limit]
    more = f"\n[… {len(entries) - limit} more entries]" if len(entries) > limit else ""
    listing = "\n".join(shown) if shown else "(empty)"
    return ToolResult(True, f"{display(context, target)}/ ({len(entries)} entries)\n{listing}{more}")


def write_file(context: Context, path: str, content: str) -> ToolResult:
    target = resolve(context, path, for_writing=True)
    if target.is_dir():
        raise ToolError(f"{path} is a directory")
    existed = target.exists()
    # A text file that is not UTF-8 keeps its encoding; new files, and binary ones, are UTF-8.
    old = target.read_bytes() if target.is_file() else b""
    encoding = "utf-8" if b"\0" in old[:8192] else _decode(old)[1]
    data = _encode(path, content, encoding)
    created = [d for d in target.parents if not d.exists() and d.is_relative_to(context.root)]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    for made in ([] if existed else [target, *created]):  # root's new files go to the sandbox's uid
        hand_over(context.root, made)
    lines = content.count("\n") + (1 if content and not content.endswith("\n") else 0)
    verb = "Overwrote" if existed else "Created"
    latin = ", Latin-1 as before" if encoding == "latin-1" else ""
    return ToolResult(True, f"{verb} {display(context, target)} ({lines} lines, {len(data)} bytes{latin})")


def edit_file(context: Context, path: str, old_text: str, new_text: str) -> ToolResult:
    target, text, encoding = _read_text(context, path, for_writing=True)
    if not old_text:
        raise ToolError("old_text is empty; to create or replace a whole file use write_file")
    if old_text == new_text:
        raise ToolError("old_text and new_text are the same; nothing to change")
    count = text.count(old_text)
    if count != 1:
        raise ToolError(_mismatch(path, text, old_text, count))
    at = text.index(old_text)
    updated = text[:at] + new_text + text[at + len(old_text):]
    target.write_bytes(_encode(path, updated, encoding))
    first = text.count("\n", 0, at) + 1
    lines = _lines(updated)
    new_last = first + max(new_text.count("\n") + (0 if new_text.endswith("\n") else 1), 1) - 1
    lo = max(first - _SNIPPET_CONTEXT, 1)
    hi = min(new_last + _SNIPPET_CONTEXT, len(lines))
    snippet = _numbered(lines[lo - 1:hi], lo, context.settings.read_max_line_chars)
    old_count = old_text.count("\n") + (0 if old_text.endswith("\n") else 1)
    return ToolResult(True, f"Edited {display(context, target)}: replaced {old_count} line(s) at line {first}. "
                            f"Now lines {lo}-{hi}:\n{snippet}")


def _mismatch(path: str, text: str, old_text: str, count: int) -> str:
    """Why old_text did not match exactly once, with where to look."""
    if count > 1:
        lines = []
        start = 0
        for _ in range(min(count, 10)):
            at = text.index(old_text, start)
            lines.append(str(text.count("\n", 0, at) + 1))
            start = at + 1
        return (f"old_text occurs {count} times in {path} (at lines {', '.join(lines)}); "
                "include more surrounding lines so it matches exactly once")
    file_lines = [line.rstrip("\n") for line in _lines(text)]
    wanted = next((line for line in old_text.splitlines() if line.strip()), old_text)
    # Whitespace is the usual culprit: say so when the text matches once it is ignored.
    squashed = " ".join(old_text.split())
    if squashed and squashed in " ".join(text.split()):
        hint = " It does match when whitespace is ignored: copy the indentation and line breaks exactly."
    else:
        hint = ""
    best = max(range(len(file_lines)), default=None,
               key=lambda i: difflib.SequenceMatcher(None, wanted.strip(), file_lines[i].strip()).ratio())
    if best is None:
        return f"old_text not found in {path} (the file is empty)"
    return (f"old_text not found in {path}.{hint} The line most like its first line is line {best + 1}:\n"
            f"{best + 1}\t{file_lines[best]}")


READ_FILE = Tool(
    "read_file",
    "Read a text file of the work tree, with line numbers. Long files come in pages of up to 2000 "
    "lines: pass start_line (and end_line) to read a range.",
    parameters({"path": {"type": "string", "description": "Path relative to the repository root."}},
               {"start_line": {"type": "integer", "minimum": 1, "description": "First line to show (1-based)."},
                "end_line": {"type": "integer", "minimum": 1, "description": "Last line to show (inclusive)."}}),
    read_file,
)
LIST_DIR = Tool(
    "list_dir",
    "List a directory of the work tree: subdirectories first (ending in /), then files with sizes.",
    parameters({}, {"path": {"type": "string", "description": "Directory relative to the repository root "
                                                              "(default: the root)."}}),
    list_dir,
)
WRITE_FILE = Tool(
    "write_file",
    "Create a file, or replace a file's whole content. For a change inside an existing file prefer edit_file.",
    parameters({"path": {"type": "string", "description": "Path relative to the repository root."},
                "content": {"type": "string", "description": "The complete new content of the file."}}),
    write_file,
)
EDIT_FILE = Tool(
    "edit_file",
    "Replace one exact piece of text in a file. old_text must occur exactly once in the file, "
    "whitespace and indentation included; copy it from read_file output without the line numbers, "
    "with enough surrounding lines to be unique.",
    parameters({"path": {"type": "string", "description": "Path relative to the repository root."},
                "old_text": {"type": "string", "description": "The exact text to replace."},
                "new_text": {"type": "string", "description": "The text to put in its place."}}),
    edit_file,
)
