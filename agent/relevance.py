"""What an issue mentions outright, for ranking files (agent/rank.py uses it among its features).

`mentions` scores each file by what the issue text names:
- its path (`django/db/models/query.py`, a traceback's `File ".../query.py"`, or a bare name
  `query.py`, shared among the files it could mean): PATH_WEIGHT;
- its dotted module (`django.db.models.query`, also `pkg.mod.Class.method`): PATH_WEIGHT;
- an identifier that it defines (class, function, module constant), shared among the files
  defining it, doubled when it looks like code (`QuerySet`, `bulk_create`), ignored when more
  than a few files define it (a common word then, not a pointer);
- a code-like identifier naming one of its directories (`tests/bulk_create/`), weakly.
The first two are also returned apart (`named`): the files the issue names outright.
Modules are resolved with `module_index` and `resolve_import`, which agent/rank.py also uses
for the import graph.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PATH_WEIGHT = 10.0
SYMBOL_WEIGHT = 1.0
DIRECTORY_WEIGHT = 0.5  # a directory named like the code is a hint, not a pointer
MAX_AMBIGUITY = 5  # a mention matching more files than this points nowhere in particular

_PATHLIKE = re.compile(r"[\w.\-/]*\w\.[A-Za-z]\w*")
_DOTTED = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_IDENT = re.compile(r"\b[A-Za-z_]\w{2,}")
_PY_SUFFIXES = (".py", ".pyi")
_SOURCE_ROOTS = ("src", "lib", "python")


def module_index(paths: Sequence[str]) -> dict[str, str]:
    """Dotted module name -> path, for the Python files among `paths` (also without a
    leading src/ or lib/ directory)."""
    modules: dict[str, str] = {}
    for path in sorted(paths):
        if not path.endswith(_PY_SUFFIXES):
            continue
        parts = path.rsplit(".", 1)[0].split("/")
        if parts[-1] == "__init__":
            parts.pop()
        if not parts:
            continue
        modules.setdefault(".".join(parts), path)
        if len(parts) > 1 and parts[0] in _SOURCE_ROOTS:
            modules.setdefault(".".join(parts[1:]), path)
    return modules


def resolve_import(name: str, importer: str, modules: Mapping[str, str]) -> str | None:
    """The path of the file that import `name` (leading dots for relative) in `importer` means."""
    level = len(name) - len(name.lstrip("."))
    if level == 0:
        return modules.get(name)
    package = importer.split("/")[:-1]
    if level - 1 > len(package):
        return None
    base = package[: len(package) - (level - 1)]
    rest = [part for part in name[level:].split(".") if part]
    return modules.get(".".join(base + rest))


def _looks_like_code(identifier: str) -> bool:
    return "_" in identifier or any(c.isupper() for c in identifier[1:])


@dataclass(frozen=True)
class Mentions:
    """scores: path -> the sum of its mentions' weights; named: path -> the share of
    PATH_WEIGHT its path or module mentions gave it (1 when named once without ambiguity)."""

    scores: dict[str, float]
    named: dict[str, float]


def mentions(issue: str, paths: Sequence[str], symbols: Mapping[str, Sequence[str]],
             modules: Mapping[str, str]) -> Mentions:
    """What `issue` mentions of the files `paths` (with the names each defines and the module
    index of `paths`); files not mentioned are left out."""
    scores: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[str]] = defaultdict(list)
    by_dir: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        parts = path.split("/")
        by_name[parts[-1]].append(path)
        for directory in set(parts[:-1]):
            by_dir[directory].append(path)

    def add(matches: Sequence[str], weight: float) -> None:
        if 0 < len(matches) <= MAX_AMBIGUITY:
            for path in matches:
                scores[path] += weight / len(matches)

    # Path parts and module parts name places, not symbols: they are not read as identifiers.
    not_identifiers: set[str] = set()
    for mention in set(_PATHLIKE.findall(issue)):
        mention = mention.lstrip("./")
        add([p for p in by_name.get(mention.rsplit("/", 1)[-1], ())
             if p == mention or p.endswith("/" + mention) or mention.endswith("/" + p)], PATH_WEIGHT)
        if "/" in mention:
            not_identifiers.update(mention.split("/"))
    for dotted in set(_DOTTED.findall(issue)):
        parts = dotted.split(".")
        # `pkg.mod.Class.method` names module `pkg.mod`: the longest prefix that is a module
        # (two parts at least: a bare top-level package points nowhere in particular).
        n = next((n for n in range(len(parts), 1, -1) if ".".join(parts[:n]) in modules), 0)
        if n:
            add([modules[".".join(parts[:n])]], PATH_WEIGHT)
            not_identifiers.update(parts[:n])
    named = {path: score / PATH_WEIGHT for path, score in scores.items()}

    identifiers = set(_IDENT.findall(issue)) - not_identifiers
    defined_in: dict[str, list[str]] = defaultdict(list)
    for path, names in symbols.items():
        for name in identifiers.intersection(names):
            defined_in[name].append(path)
    for identifier in identifiers:
        code = _looks_like_code(identifier)
        add(defined_in.get(identifier, ()), SYMBOL_WEIGHT * (2 if code else 1))
        if code:
            # A directory named after it (tests/bulk_create/) is about it too, less surely.
            add(by_dir.get(identifier, ()), DIRECTORY_WEIGHT)
    return Mentions(dict(scores), named)
