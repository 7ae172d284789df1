"""`v4agent bench ...`: benchmarks that print JSON with side-by-side ratios. Each command imports
what it measures (torch, the packer, the sandbox) only when it runs."""

from __future__ import annotations

from pathlib import Path

import typer

from agent.cli.common import fail, print_result

app = typer.Typer(help="Benchmarks; each prints JSON with ratios measured side by side in one run.", no_args_is_help=True)


@app.command("encode")
def encode_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    corpus: Path | None = typer.Option(None, "--corpus", help="A directory or .tar.gz of text files "
                                       "(default: the django 5.2.8 sdist, downloaded once into --cache-dir)."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "v4agent" / "corpora", "--cache-dir",
                                   help="Where downloaded corpora are kept."),
    conversation_tokens: int = typer.Option(1_000_000, "--conversation-tokens", min=1,
                                            help="Size of the conversation a turn is appended to."),
    parse_bytes: int = typer.Option(1_000_000, "--parse-bytes", min=1, help="Size of the completion to parse."),
) -> None:
    """Prompt encoding (cold, warm cache, one appended turn) and completion parsing speed."""
    import subprocess

    from agent.bench_encode import django_sdist, run

    try:
        result = run(corpus or django_sdist(cache_dir), conversation_tokens, parse_bytes)
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        raise fail(str(e)) from None
    print_result(result, as_json)


@app.command("model")
def model_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    lengths: str = typer.Option("512,1024", "--lengths", help="Comma-separated prompt lengths."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Timed runs per length and implementation."),
    layers: int = typer.Option(2, "--layers", min=1, help="Layers of the Flash-width benchmark model."),
) -> None:
    """Forward throughput in exact mode at real Flash widths, ours and transformers' side by side.

    The first run writes a ~2 GB random checkpoint into ~/.cache/v4agent/bench (V4AGENT_CACHE).
    """
    try:
        sizes = [int(s) for s in lengths.split(",") if s.strip()]
    except ValueError:
        raise fail(f"--lengths must be comma-separated integers, got {lengths!r}") from None
    if not sizes or min(sizes) < 1:
        raise fail(f"--lengths must be positive integers, got {lengths!r}")
    from rich.console import Console

    from runtime.bench import bench_model

    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        try:
            result = bench_model(sizes, repeats, layers, progress=lambda msg: status.update(msg))
        except RuntimeError as e:
            raise fail(str(e)) from None
    print_result(result, as_json)


@app.command("pack")
def pack_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    cache_dir: Path = typer.Option(Path.home() / ".cache" / "v4agent" / "corpora", "--cache-dir",
                                   help="Where the django sdist and the git repository made from it are kept."),
) -> None:
    """Repository packing on django 5.2.8: cold (empty token cache), warm after one edit, unchanged."""
    import subprocess

    from agent.bench_pack import run

    try:
        result = run(cache_dir)
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        raise fail(str(e)) from None
    print_result(result, as_json)


@app.command("localize")
def localize_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    repos: Path | None = typer.Option(None, "--repos", help="Bare clones as <owner>+<name>.git (default: "
                                      "~/.cache/v4agent/localize/repos; missing ones are cloned from GitHub)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Where snapshots and their token cache are kept "
                                         "(default: ~/.cache/v4agent/localize)."),
    split: str | None = typer.Option(None, "--split", help="Only the cases of this split: tune or held-out."),
    repo: str | None = typer.Option(None, "--repo", help="Only the cases of this repository (owner/name)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many cases per repository."),
) -> None:
    """Does packing put the files real bug fixes changed in full? Recall at 32K/128K/512K, BM25 and random beside it."""
    import subprocess

    from rich.console import Console

    from agent.bench_localize import SPLITS, run

    if split is not None and split not in SPLITS:
        raise fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    with Console(stderr=True).status("localize") as status:
        try:
            result = run(repos, work_dir, split=split, repo=repo, limit=limit, progress=status.update)
        except (OSError, ValueError, subprocess.CalledProcessError) as e:
            raise fail(str(e)) from None
    print_result(result, as_json)


@app.command("session")
def session_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    prefix: int = typer.Option(16384, "--prefix", min=1024, help="Long-context length (tokens)."),
    small: int = typer.Option(4096, "--small", min=256, help="Short prefill for the scaling ratio."),
) -> None:
    """Warm vs cold turns, prefill and decode scaling, persisted-prefix loading, speculative decoding, KV bytes."""
    from rich.console import Console

    from runtime.bench_session import bench_session

    with Console(stderr=True).status("benchmarking sessions") as status:
        result = bench_session(prefix, small, progress=lambda msg: status.update(msg))
    print_result(result, as_json)


@app.command("serve")
def serve_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    context: int = typer.Option(16384, "--context", min=1024, help="Long-prompt length (tokens)."),
    chunk: int = typer.Option(512, "--chunk", min=1, help="Prefill chunk of the engine (tokens)."),
) -> None:
    """The serving engine: 8 decoders over 1, a follow-up turn warm vs cold, decoders while a long prompt prefills."""
    from rich.console import Console

    from runtime.bench_serve import bench_serve

    with Console(stderr=True).status("benchmarking the serving engine") as status:
        result = bench_serve(context, chunk_size=chunk, progress=lambda msg: status.update(msg))
    print_result(result, as_json)


@app.command("kernels")
def kernels_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    sizes: str | None = typer.Option(None, "--sizes", help="Comma-separated context lengths in tokens "
                                     "(default 8192,131072,1048576 on a GPU, 1024,2048 under the CPU interpreter)."),
    chunk: int | None = typer.Option(None, "--chunk", min=1, help="Prefill chunk in tokens (default 4096 on a GPU, "
                                     "8 on the CPU)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per measurement (median)."),
) -> None:
    """Each Triton kernel against the torch code it replaces, side by side (on the CPU: interpreted smoke test)."""
    try:
        contexts = [int(s) for s in sizes.split(",") if s.strip()] if sizes else None
    except ValueError:
        raise fail(f"--sizes must be comma-separated integers, got {sizes!r}") from None
    if contexts is not None and (not contexts or min(contexts) < 1):
        raise fail(f"--sizes must be positive integers, got {sizes!r}")
    from rich.console import Console

    from runtime.bench_kernels import bench_kernels

    with Console(stderr=True).status("benchmarking kernels") as status:
        try:
            result = bench_kernels(contexts, chunk, repeats, progress=lambda msg: status.update(msg))
        except RuntimeError as e:
            raise fail(str(e)) from None
    print_result(result, as_json)


@app.command("distributed")
def distributed_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
) -> None:
    """Tensor + expert parallel under torchrun (1, 2, 4 ranks) against one process, on a tiny checkpoint."""
    from runtime.distributed.bench import bench_distributed

    try:
        result = bench_distributed()
    except RuntimeError as e:
        raise fail(str(e)) from None
    print_result(result, as_json)


@app.command("sandbox")
def sandbox_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
    repeats: int = typer.Option(50, "--repeats", min=1, help="Timed commands per mode."),
) -> None:
    """What the sandbox adds to one `run` of `true`: mean/median ms sandboxed and unconfined, alternated."""
    from tools.bench_sandbox import run
    from tools.sandbox import SandboxUnavailable

    try:
        result = run(repeats)
    except (SandboxUnavailable, RuntimeError) as e:
        raise fail(str(e)) from None
    print_result(result, as_json)
