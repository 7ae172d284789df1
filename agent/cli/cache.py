"""`v4agent cache ...`: the on-disk prefix cache of the in-process runtime."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import typer

from agent.cli.common import fail, print_result, visible

app = typer.Typer(help="Inspect and prune the persisted KV prefixes (~/.cache/v4agent/prefix, V4AGENT_CACHE).",
                  no_args_is_help=True)

RootOption = typer.Option(None, "--root", help="Cache directory (default: $V4AGENT_CACHE/prefix or "
                                              "~/.cache/v4agent/prefix).")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'500M', '10G', '123456' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 500M or 20G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _root(root: Path | None) -> Path | None:
    """`--root` must be a cache directory; without it, the default one (which may not exist yet)."""
    if root is not None and not root.is_dir():
        raise fail(f"--root {root}: no such directory")
    return root


@app.command("ls")
def ls_cmd(root: Path | None = RootOption,
           as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """List persisted segments: prefix span, size, last use, and the key they were written under."""
    root = _root(root)
    from runtime.prefix_cache import cache_root, segments

    rows = [{"prefix_hash": s.prefix_hash[:16], "start": s.start, "end": s.end, "bytes": s.nbytes,
             "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(s.last_used)),
             "precision": s.key.get("precision"), "cache_format": s.key.get("cache_format"),
             "model": s.key.get("model", "")[:40]} for s in segments(root)]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo(visible(f"no persisted prefixes in {root or cache_root()}"))
        return
    _table(list(rows[0]), [[str(v) for v in row.values()] for row in rows])


@app.command("stats")
def stats_cmd(root: Path | None = RootOption,
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Totals per compatibility key (checkpoint, precision, cache format)."""
    root = _root(root)
    from runtime.prefix_cache import stats

    summary = stats(root)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    print_result({k: v for k, v in summary.items() if k != "keys"}, False)
    if summary["keys"]:
        typer.echo("")
        _table(["model", "precision", "cache_format", "segments", "bytes", "longest_prefix"],
               [[str(k["key"].get("model", "")), str(k["key"].get("precision")), str(k["key"].get("cache_format")),
                 str(k["segments"]), f"{k['bytes']:,}", f"{k['longest_prefix']:,}"] for k in summary["keys"]])


@app.command("prune")
def prune_cmd(max_size: str = typer.Option(..., "--max-size", help="Keep at most this much, e.g. 20G."),
              root: Path | None = RootOption,
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Delete unreadable segments, then least-recently-used leaves (never a prefix still extended by another)."""
    try:
        limit = parse_size(max_size)
    except ValueError as e:
        raise fail(str(e)) from None
    root = _root(root)
    from runtime.prefix_cache import prune, stats

    removed = prune(limit, root)
    print_result({"removed": len(removed), "bytes_left": stats(root)["bytes"]}, as_json)


def _table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell, the header first; never cut to the terminal."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo(visible("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()))
