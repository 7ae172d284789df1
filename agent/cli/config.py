"""`v4agent config show`: the settings `fix` would run with, and where each value came from
(the built-in default, the config file, a `V4AGENT_*` variable). Register with
`app.add_typer(config.app, name="config")`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from agent.cli.common import fail, visible

app = typer.Typer(help="The settings fix and replay use, and where each comes from.", no_args_is_help=True)


@app.command("show")
def show_cmd(
    config_file: Path | None = typer.Option(None, "--config",
                                            help="The settings file (default: $V4AGENT_CONFIG, else "
                                                 "~/.config/v4agent/config.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Every setting's value and its source: default, the config file, or a V4AGENT_* variable."""
    from agent.backends.http import API_KEY_VARIABLES
    from agent.settings import SettingsError, config_path, resolve_settings

    try:
        settings, sources = resolve_settings(config=config_file)
    except SettingsError as e:
        raise fail(str(e)) from None
    path, _ = config_path(os.environ, config_file)
    # The key is never a setting and never shown: only which variable holds it.
    key_source = next((name for name in API_KEY_VARIABLES if os.environ.get(name)), None)
    if as_json:
        typer.echo(json.dumps({"config_file": str(path), "config_file_exists": path.is_file(),
                               "settings": {name: {"value": value, "source": sources[name]}
                                            for name, value in vars(settings).items()},
                               "api_key_variable": key_source}))
        return
    typer.echo(visible(f"config file: {path}" + ("" if path.is_file() else " (none there: defaults apply)")))
    rows = [(name, "-" if value is None else str(value), sources[name]) for name, value in vars(settings).items()]
    rows.append(("api key", "set (not shown)" if key_source else "not set", key_source or
                 f"none of {', '.join(API_KEY_VARIABLES)}"))
    widths = [max(len(row[i]) for row in [("setting", "value", "source"), *rows]) for i in range(2)]
    for name, value, source in [("setting", "value", "source"), *rows]:
        typer.echo(visible(f"{name:<{widths[0]}}  {value:<{widths[1]}}  {source}"))
