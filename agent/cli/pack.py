"""`v4agent pack [PATH]`: pack a git repository into a prompt and show what went in full,
outlined or dropped, with token counts. Register with `app.command("pack")(pack.pack_cmd)`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from agent.cli.common import fail, visible


def pack_cmd(
    path: Path = typer.Argument(Path("."), help="A directory inside the git work tree to pack."),
    budget: int | None = typer.Option(None, "--budget", min=1,
                                      help="Token budget (default: the 1M context minus a conversation reserve)."),
    issue: str | None = typer.Option(None, "--issue", help="The task text: files it points at are kept in full."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a report."),
    limit: int = typer.Option(20, "--limit", min=0, help="Files listed per mode and skipped in the report (0: all)."),
    include_secrets: bool = typer.Option(False, "--include-secrets",
                                         help="Pack files that look like secrets (keys, tokens, .env) too."),
    explain: bool = typer.Option(False, "--explain", help="Say why each full file is in full: its score, its "
                                 "probability and what they are made of (docs/agent-pack-and-tools.md)."),
) -> None:
    """Pack a repository into one prompt within a token budget."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.pack import DEFAULT_BUDGET, PackError, pack_repository
    from runtime.tokenizer import TokenizerError

    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    tasks: dict[str, Any] = {}
    # Drawn only on a terminal: piped stderr gets nothing but errors.
    bar = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        with bar:
            result = pack_repository(path, budget=budget or DEFAULT_BUDGET, issue=issue, progress=progress,
                                     include_secrets=include_secrets)
    except (PackError, TokenizerError) as e:
        raise fail(str(e)) from None
    summary = {
        "root": str(result.root),
        "budget": result.budget,
        "total_tokens": result.total_tokens,
        "files_full": len(result.by_mode("full")),
        "files_outlined": len(result.by_mode("outlined")),
        "files_dropped": len(result.by_mode("dropped")),
        "files_skipped": len(result.skipped),
        "files_secret": len(result.secrets),
        "secrets_included": result.secrets_included,
        "tokens_full": sum(f.tokens for f in result.by_mode("full")),
        "tokens_outlined": sum(f.tokens for f in result.by_mode("outlined")),
        "tokenized": result.stats.tokenized,
        "outlined": result.stats.outlined,
        "seconds": round(result.stats.seconds, 3),
    }
    if as_json:
        summary["files"] = [{"path": f.path, "mode": f.mode, "tokens": f.tokens, "full_tokens": f.full_tokens,
                             "relevance": round(f.relevance, 3)} for f in result.files]
        if explain:
            for entry in summary["files"]:
                if entry["mode"] == "full":
                    entry["why"] = result.explain(entry["path"])
        summary["skipped"] = [{"path": p, "reason": reason} for p, reason in result.skipped]
        summary["secrets"] = [{"path": p, "reason": reason} for p, reason in result.secrets]
        typer.echo(json.dumps(summary))
        return
    modes = {mode: result.by_mode(mode) for mode in ("full", "outlined", "dropped")}
    secrets = (f", {len(result.secrets)} that look like secrets "
               + ("packed" if result.secrets_included else "left out") if result.secrets else "")
    typer.echo(f"{result.root}: {result.total_tokens:,} tokens of a {result.budget:,} budget; "
               f"{len(modes['full'])} files in full, {len(modes['outlined'])} outlined, "
               f"{len(modes['dropped'])} dropped, {len(result.skipped)} skipped{secrets}")
    typer.echo(f"({result.stats.tokenized} files tokenized and {result.stats.outlined} outlined by this run, the rest "
               f"from the cache; {result.stats.seconds:.2f} s)")
    for mode, files in modes.items():
        tokens = sum(f.full_tokens if mode == "dropped" else f.tokens for f in files)
        note = " in full" if mode == "dropped" else ""
        typer.echo(f"\n{mode}: {len(files)} files, {tokens:,} tokens{note}")
        # The most relevant first, then the largest: what a reader checks first.
        shown = sorted(files, key=lambda f: (-f.relevance, -f.full_tokens, f.path))[: limit or None]
        for f in shown:
            count = f.full_tokens if mode == "dropped" else f.tokens
            relevance = f"  relevance {f.relevance:.2f}" if f.relevance else ""
            typer.echo(f"  {count:>9,}  {visible(f.path)}{relevance}")
        _more(len(files) - len(shown))
    reasons = Counter(reason for _, reason in result.skipped)
    typer.echo(f"\nskipped: {len(result.skipped)} files"
               + (f" ({', '.join(f'{r} {n}' for r, n in reasons.most_common())})" if reasons else ""))
    shown_skipped = sorted(result.skipped, key=lambda item: (item[1], item[0]))[: limit or None]
    for p, reason in shown_skipped:
        typer.echo(f"  {visible(p)}  ({reason})")
    _more(len(result.skipped) - len(shown_skipped))
    if result.secrets:
        # All of them, whatever --limit says: the user should see every one.
        typer.echo(f"\nsecrets: {len(result.secrets)} files look like secrets, "
                   + ("packed (--include-secrets)" if result.secrets_included else
                      "left out (--include-secrets packs them)"))
        for p, reason in result.secrets:
            typer.echo(f"  {visible(p)}  ({reason})")
    if explain and not result.ranked:
        typer.echo("\nwhy in full: the whole repository fits in the budget, nothing was ranked")
    elif explain:
        typer.echo("\nwhy in full (score = the sum of the parts; p = its probability of being needed):")
        for f in sorted(modes["full"], key=lambda f: (-f.relevance, f.path)):
            typer.echo(visible(f"  {f.path}: {result.explain(f.path)}"))


def _more(hidden: int) -> None:
    if hidden:
        typer.echo(f"  … {hidden} more (--limit 0 lists all)")
