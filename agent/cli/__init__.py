"""`v4agent` command line. Each command group lives in its own module; heavy imports (torch,
tokenizers, tree-sitter, git) happen inside the commands, after their arguments and settings are
checked, so `--help` and every usage error come back at once and only what runs the model
imports torch.

Ctrl-C before a command has started (while this module imports) exits 130 like Ctrl-C anywhere
else outside a run; a run itself stops `interrupted` and saves its patch (docs/agent.md)."""

from __future__ import annotations

try:
    import typer
    from typer.core import TyperOption

    from agent.cli import bench, cache, ci, config, fix, model, pack, prompt, runs, serve
    from agent.cli import eval as eval_cmd
except KeyboardInterrupt:
    raise SystemExit(130) from None

_option_type = TyperOption.display_type_rich


def _flag_type(self: TyperOption, ctx: typer.Context) -> str | None:
    # typer's rich help gives a flag a value type (`--apply <bool>`) though it takes no value;
    # its plain help does not. A flag is shown bare, as everywhere else.
    return None if self.is_flag else _option_type(self, ctx)


TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version  # ~20 ms: only when asked

        try:
            typer.echo(f"v4agent {version('v4agent')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("v4agent (not installed)")
        raise typer.Exit(0)


app = typer.Typer(
    name="v4agent",
    help="A repository-scale coding agent for DeepSeek-V4, with its own in-process V4 runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="Print the version and exit.")) -> None:
    pass


app.command("fix")(fix.fix_cmd)
app.command("replay")(fix.replay_cmd)
app.command("pack")(pack.pack_cmd)
app.command("serve")(serve.serve_cmd)
app.add_typer(model.app, name="model")
app.add_typer(prompt.app, name="prompt")
app.add_typer(config.app, name="config")
app.add_typer(runs.app, name="runs")
app.add_typer(cache.app, name="cache")
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(bench.app, name="bench")
app.add_typer(ci.app, name="ci")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C while typer builds the command, before click's own handling
        raise SystemExit(130) from None
