"""Code-aware terms of files and of an issue, for lexical ranking (agent/rank.py).

A token is an identifier-like run, hyphens between parts allowed (`[A-Za-z_][A-Za-z0-9_]*`,
then `-part`s), anywhere in the text: code, comments, strings and error messages alike. Its
terms are its words (the hyphen-separated parts of two characters or more that start with a
letter or `_`), each lower-cased with leading and trailing underscores dropped, and each
compound word's parts, split on `_`, camelCase and digit boundaries (`bulk_create` ->
bulk_create, bulk, create; `QuerySet` -> queryset, query, set; `HTTPError` -> httperror,
http, error); a hyphenated token is also a term whole (`not-callable`, `--import-mode` ->
import-mode): message ids, options and config keys are as specific as an identifier.

A file's terms are kept per git blob (`TermIndex`: sorted 32-bit term hashes and their
counts, one uint32 array in the token store), so a repository is read once and every later
pack loads small arrays.
"""

from __future__ import annotations

import re
import zlib
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]+")
_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
MAX_COUNT = 2**32 - 1
MEMO_SIZE = 1 << 18  # results kept per memoized function: more than the distinct tokens of django


class _Memo(dict[str, Any]):
    """A function's results by argument, emptied when it holds MEMO_SIZE. Not functools.lru_cache:
    its entries are objects the garbage collector walks one by one, and full of a large
    repository's tokens they made every full collection of the process cost ~0.35 s (a warm pack
    after a cold one in the same process took twice as long); a dict of strings and tuples of
    strings or ints is one object to it."""

    def __init__(self, function: Callable[[str], Any]) -> None:
        super().__init__()
        self.function = function

    def __missing__(self, key: str) -> Any:
        if len(self) >= MEMO_SIZE:
            self.clear()
        value = self[key] = self.function(key)
        return value


def _memoized(function: Callable[[str], tuple[Any, ...]]) -> Callable[[str], tuple[Any, ...]]:
    return _Memo(function).__getitem__


@_memoized
def word_terms(word: str) -> tuple[str, ...]:
    """The terms of one word: itself lower-cased (underscores at its ends dropped), then its
    parts (two letters at least) when it has more than one."""
    whole = word.lower().strip("_")
    parts = [p.lower() for p in _PART.findall(word)]
    parts = [p for p in parts if len(p) > 1 and not p.isdigit()]
    if len(parts) < 2:
        return (whole,) if whole else ()
    return (whole, *dict.fromkeys(p for p in parts if p != whole))


@_memoized
def token_terms(token: str) -> tuple[str, ...]:
    """The terms of one token (module docstring), each once."""
    if "-" not in token:
        return word_terms(token) if len(token) > 1 else ()
    found = [token.lower()]
    for word in token.split("-"):
        if _WORD.fullmatch(word):
            found += word_terms(word)
    return tuple(dict.fromkeys(found))


@_memoized
def _token_hashes(token: str) -> tuple[int, ...]:
    return tuple(term_hash(t) for t in token_terms(token))


def term_hash(term: str) -> int:
    """A stable 32-bit id of a term (collisions are rare enough not to matter for ranking)."""
    return zlib.crc32(term.encode())


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def term_counts(text: str) -> Counter[str]:
    """How often each term occurs in `text`."""
    counts: Counter[str] = Counter()
    for token, n in Counter(_TOKEN.findall(text)).items():
        for term in token_terms(token):
            counts[term] += n
    return counts


@dataclass(frozen=True)
class TermIndex:
    """The terms of one file: sorted unique term hashes and their counts."""

    hashes: array
    counts: array

    @property
    def length(self) -> int:
        return sum(self.counts)

    @classmethod
    def empty(cls) -> TermIndex:
        return cls(array("I"), array("I"))

    @classmethod
    def of_text(cls, text: str) -> TermIndex:
        # Hashes straight from the tokens (cached per token): this runs over every file once.
        by_hash: dict[int, int] = {}
        get = by_hash.get
        for token, n in Counter(_TOKEN.findall(text)).items():
            for h in _token_hashes(token):
                by_hash[h] = get(h, 0) + n
        ordered = sorted(by_hash)
        return cls(array("I", ordered), array("I", (min(by_hash[h], MAX_COUNT) for h in ordered)))

    def encode(self) -> array:
        """One uint32 array: the hashes, then the counts."""
        return self.hashes + self.counts

    @classmethod
    def decode(cls, ids: array) -> TermIndex:
        half = len(ids) // 2
        return cls(ids[:half], ids[half:])
