"""`v4agent model ...`: checkpoints and model facts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from agent.cli.common import fail

app = typer.Typer(help="Make tiny checkpoints and inspect model configs.", no_args_is_help=True)


@app.command("make-tiny")
def make_tiny_cmd(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint (a new or empty directory)."),
    config: Path | None = typer.Option(None, "--config", help="A config.json to use instead of tiny_config()."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty DIRECTORY (never one holding .git)."),
) -> None:
    """Write a random checkpoint in the official V4 layout (FP8/FP4 weights, sharded, with tokenizer)."""
    _check_target(directory, force)
    from runtime.checkpoint import CheckpointError, make_tiny
    from runtime.config import ConfigError, load_config

    try:
        cfg = load_config(config) if config is not None else None
        out = make_tiny(directory, cfg, seed, overwrite=force)
    except (ConfigError, CheckpointError) as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot write {e.filename or directory}: {e.strerror or e}") from None
    files = sorted(out.iterdir())
    for f in files:
        typer.echo(f"{f.stat().st_size:>12,}  {f}")
    typer.echo(f"wrote {len(files)} files, {sum(f.stat().st_size for f in files):,} bytes, seed {seed}")


def _check_target(directory: Path, force: bool) -> None:
    """Refuse what --force must not replace, before any work: a file (make-tiny writes a
    directory) and a directory holding a git repository (someone's work); and a place that cannot
    be written."""
    if directory.exists() and not directory.is_dir():
        raise fail(f"{directory} is a file, not a directory; make-tiny writes a directory and will not replace it")
    if directory.is_dir() and any(directory.iterdir()):
        if not force:
            raise fail(f"{directory} exists and is not empty; --force replaces it")
        if (directory / ".git").exists():
            raise fail(f"{directory} holds a git repository (.git); --force will not replace it")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(f"cannot create {directory.parent}: {e.strerror or e}") from None
    if not os.access(directory.parent, os.W_OK):
        raise fail(f"cannot write in {directory.parent}: permission denied")


@app.command("info")
def info_cmd(
    target: str = typer.Argument(..., metavar="CONFIG_OR_DIR",
                                 help="A config.json, a checkpoint directory, or 'flash' / 'pro'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Parameter counts, layer schedule and KV-cache size of a V4 model.

    A checkpoint directory is checked as runtime.load checks it (every shard and tensor); a config is only a config.
    """
    from runtime.config import RELEASED, ConfigError, load_config

    path = Path(target)
    if target not in RELEASED and not path.exists():
        raise fail(f"{target!r} is neither 'flash' nor 'pro' nor an existing config.json or checkpoint directory")
    try:
        config = load_config(target)
        if path.is_dir():
            from runtime.checkpoint import CheckpointError, open_checkpoint

            try:
                open_checkpoint(path, config).close()
            except CheckpointError as e:
                raise fail(f"{e} (a checkpoint runtime.load would refuse)") from None
    except ConfigError as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot read {e.filename or target}: {e.strerror or e}") from None
    from runtime.info import model_info

    info = model_info(config)
    if as_json:
        typer.echo(json.dumps(info))
        return
    _print_table(target, info, "checkpoint checked" if path.is_dir() else "config only, no weights read")


def _print_table(target: str, info: dict, checked: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def billions(n: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:,.2f} {unit}"
        return str(n)

    def gib(n: float) -> str:
        return f"{n / 2**30:,.2f} GiB"

    t = Table(title=f"DeepSeek-V4 model: {target} ({checked})", show_header=False)
    t.add_column("fact")
    t.add_column("value", justify="right", overflow="fold")
    t.add_row("total parameters (no MTP)", billions(info["total_params"]))
    t.add_row("total parameters with MTP", billions(info["total_params_with_mtp"]))
    t.add_row("active per token (no embedding, no MTP)", billions(info["active_params"]))
    for cat, n in info["params_by_category"].items():
        t.add_row(f"  {cat.replace('_', ' ')}", billions(n))
    t.add_row("  MTP block", billions(info["mtp_params"]))
    layers = info["layers"]
    t.add_row("layers (SWA / CSA / HCA)", f"{layers['main']} ({layers['sliding_attention']} / "
              f"{layers['compressed_sparse_attention']} / {layers['heavily_compressed_attention']})")
    t.add_row("schedule", layers["schedule"])
    t.add_row("hash-routed layers / MTP blocks", f"{layers['hash_routed']} / {layers['mtp']}")
    t.add_row("KV bytes/token bf16", f"{info['kv_bytes_per_token_bf16']:,.1f}")
    t.add_row("KV bytes/token native (FP8 + bf16 rope, FP4 indexer)", f"{info['kv_bytes_per_token_native']:,.1f}")
    t.add_row("KV bytes/token native + scales", f"{info['kv_bytes_per_token_native_scales']:,.1f}")
    at = info["kv_bytes_at_1m_tokens"]
    t.add_row("KV per sequence at 1M tokens, incl. windows and open-window state (bf16 / native / +scales)",
              f"{gib(at['bf16'])} / {gib(at['native'])} / {gib(at['native_scales'])}")
    t.add_row("checkpoint", f"{info['checkpoint_tensors']:,} tensors, {info['checkpoint_bytes'] / 1e9:,.1f} GB")
    Console().print(t)
