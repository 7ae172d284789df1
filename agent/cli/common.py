"""Helpers every command group shares: usage errors, result printing, and `visible`, which every
text from the model, a tool or a repository goes through before it reaches a terminal."""

import json
import re

import typer

# What a terminal would act on instead of showing: C0 controls but newline and tab (ESC starts
# cursor moves, titles, OSC 52 clipboard writes), DEL, C1 (\x9b is a one-byte CSI), the bidi
# embeddings, overrides, isolates and marks of "Trojan Source", the line and paragraph
# separators, and lone surrogates (bytes that were not UTF-8, or a malformed \ud800 escape).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                      "\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by the surrogateescape decoder
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every control character written out as an escape, as Python writes it in a
    string (`\\x1b`, `\\x9b`, `\\u202e`; an undecodable byte as `\\xe9`). Newlines and tabs stay."""
    return _CONTROL.sub(_escape, text)


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit for usage/configuration errors (code 2)."""
    typer.echo(f"error: {visible(message)}", err=True)
    return typer.Exit(2)


def print_result(result: dict, as_json: bool) -> None:
    """One JSON object for machines, or aligned `key  value` lines for people."""
    if as_json:
        typer.echo(json.dumps(result))
        return
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        typer.echo(visible(f"{key:>{width}}  {value}"))
