"""`v4agent serve`: the in-process runtime behind OpenAI- and Anthropic-compatible APIs
(runtime/serve, docs/serve.md)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import signal
import socket
import sys
from pathlib import Path

import typer

from agent.cli.common import fail

DEVICE = re.compile(r"cpu|cuda(:\d+)?")
# what a connection that does not take its last bytes (a client that stopped reading) gets at shutdown
SHUTDOWN_GRACE_S = 10.0


def serve_cmd(
    weights: Path = typer.Option(..., "--weights", metavar="<dir>", help="A DeepSeek-V4 checkpoint directory."),
    precision: str = typer.Option("reference", "--precision", metavar="<exact|reference>",
                                  help="exact: fp32; reference: bf16 with the release's FP8/FP4 simulations."),
    device: str | None = typer.Option(None, "--device", metavar="<cpu|cuda|cuda:N>",
                                      help="Where the model runs. \\[default: cuda if there is one, else cpu]"),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="The address to listen on; 0.0.0.0 (every interface) only when you mean it."),
    port: int = typer.Option(8000, "--port", help="The port (0: any free one, printed at start)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="V4AGENT_API_KEY", show_envvar=True,
                                       help="Required on every request when set (Bearer or x-api-key)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", metavar="<origin>",
                                          help="Allow browser requests from this origin (repeatable); CORS is off "
                                               "otherwise."),
    max_running: int = typer.Option(8, "--max-running", help="Sequences decoded together in one batch."),
    max_waiting: int | None = typer.Option(
        None, "--max-waiting", metavar="<N>",
        help="Requests queued beyond the running ones; past that a request is refused with 429 (Anthropic: 529) "
             "and Retry-After, which clients retry. \\[default: 4 x --max-running]"),
    persist: bool = typer.Option(False, "--persist",
                                 help="Save KV prefixes to the on-disk prefix cache and reuse them."),
    kv_budget_mb: int | None = typer.Option(
        None, "--kv-budget-mb", metavar="<MB>",
        help="Memory the finished conversations kept warm may hold together; the least recently used "
             "go first (to host memory on a GPU). \\[default: no limit beyond 64 conversations]"),
    model_name: str | None = typer.Option(
        None, "--model-name", help="The model name clients ask for. \\[default: the weights' directory name]"),
    effort_profile: str = typer.Option("preview", "--effort-profile", metavar="<preview|v2>",
                                       help="Which release's effort prefixes the prompts carry (docs/encoding.md)."),
) -> None:
    """Serve the model to many clients at once: /v1/chat/completions, /v1/messages, /v1/responses."""
    from runtime.encoding import EFFORT_PROFILES

    if not weights.is_dir():
        raise fail(f"--weights {weights}: no such directory")
    if precision not in ("exact", "reference"):
        raise fail(f"--precision must be exact or reference, not {precision!r}")
    if device is not None and not DEVICE.fullmatch(device):
        raise fail(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if effort_profile not in EFFORT_PROFILES:
        raise fail(f"--effort-profile must be one of {', '.join(EFFORT_PROFILES)}, not {effort_profile!r}")
    if not 0 <= port <= 65535:
        raise fail(f"--port must be 0..65535, not {port}")
    if max_running < 1:
        raise fail("--max-running must be at least 1")
    if max_waiting is not None and max_waiting < 0:
        raise fail("--max-waiting must be 0 or more")
    if kv_budget_mb is not None and kv_budget_mb < 0:
        raise fail("--kv-budget-mb must be 0 or more")
    from runtime.distributed import follower

    listener = None
    if not follower():  # under torchrun only rank 0 listens; the others follow its model calls (runtime.load)
        try:
            listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as e:
            raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if not api_key and not _loopback(host):
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)

    import logging

    import uvicorn

    from agent.cli.fix import checked_device
    from runtime import CheckpointError, ConfigError, load
    from runtime.serve.engine import Engine
    from runtime.serve.http import create_app
    from runtime.serve.service import Service
    from runtime.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(weights)
        model = load(weights, precision=precision, device=checked_device(device))
    except (CheckpointError, ConfigError, TokenizerError) as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot read {e.filename or weights}: {e.strerror or e}") from None
    context_limit = model.config.max_position_embeddings
    engine = Engine(model, detokenize=tokenizer.decode, max_running=max_running,
                    max_waiting=4 * max_running if max_waiting is None else max_waiting, persist=persist,
                    context_limit=context_limit,
                    budget_bytes=None if kv_budget_mb is None else kv_budget_mb << 20)
    name = model_name or weights.resolve().name
    app = create_app(Service(engine, tokenizer, name, context_limit, effort_profile=effort_profile),
                     api_key=api_key, cors_origins=cors_origin)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    address = listener.getsockname()
    shown = f"[{address[0]}]" if ":" in address[0] else address[0]
    typer.echo(f"serving {name} on http://{shown}:{address[1]}/v1 (context {context_limit:,} tokens, "
               f"{'API key required' if api_key else 'no API key'})", err=True)
    class Server(uvicorn.Server):
        """uvicorn's server, whose shutdown also ends the generations in flight. uvicorn stops
        taking connections and waits for the open ones, and a stream's stays open until its
        generation ends, which could take as long as max_tokens allows."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            closing = asyncio.get_running_loop().run_in_executor(None, engine.close)
            await super().shutdown(sockets)
            await closing

    engine.start()
    # uvicorn stops on Ctrl-C or SIGTERM, then raises the signal again: that is the normal end. For
    # SIGTERM too it must come back as KeyboardInterrupt, or its default action would end the
    # process before the engine is closed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                              timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    typer.echo("stopped", err=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
