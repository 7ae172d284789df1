"""Code-aware terms of files and of an issue, for lexical ranking (agent/rank.py).

A word is an identifier-like run (`[A-Za-z_][A-Za-z0-9_]*`, two characters at least) anywhere
in the text: code, comments, strings and error messages alike. Its terms are the word itself,
lower-cased, and, when it is compound, its parts split on `_`, camelCase and digit boundaries
(`bulk_create` -> bulk_create, bulk, create; `QuerySet` -> queryset, query, set;
`HTTPError` -> httperror, http, error; leading and trailing underscores dropped:
`_request` -> request). A file's term counts are kept per git blob
(`TermIndex`: 32-bit term hashes and counts, as one uint32 array the token store holds), so
a repository is read once and every later pack loads small arrays.
"""

from __future__ import annotations

import functools
import re
import zlib
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]+")
# Hyphenated names (`not-callable`, `--import-mode`, `no-name-in-module`): message ids, options
# and config keys, as specific as an identifier.
_HYPHENATED = re.compile(r"(?<!\w)[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)+")
_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
MAX_COUNT = 2**32 - 1


@functools.lru_cache(maxsize=1 << 18)
def word_terms(word: str) -> tuple[str, ...]:
    """The terms of one word: itself lower-cased, then its parts (two letters at least) when
    it has more than one."""
    whole = word.lower().strip("_")
    parts = [p.lower() for p in _PART.findall(word)]
    parts = [p for p in parts if len(p) > 1 and not p.isdigit()]
    if len(parts) < 2:
        return (whole,)
    return (whole, *dict.fromkeys(p for p in parts if p != whole))


@functools.lru_cache(maxsize=1 << 18)
def term_hash(term: str) -> int:
    """A stable 32-bit id of a term (collisions are rare enough not to matter for ranking)."""
    return zlib.crc32(term.encode())


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def hyphenated(text: str) -> list[str]:
    return _HYPHENATED.findall(text)


def term_counts(text: str) -> Counter[str]:
    """How often each term occurs in `text`: the terms of its words, and its hyphenated names
    lower-cased."""
    counts: Counter[str] = Counter()
    for word, n in Counter(_WORD.findall(text)).items():
        for term in word_terms(word):
            counts[term] += n
    for name, n in Counter(_HYPHENATED.findall(text)).items():
        counts[name.lower()] += n
    return counts


@dataclass(frozen=True)
class TermIndex:
    """The terms of one file: sorted unique term hashes, their counts, and the file's length
    in terms."""

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
        by_hash: dict[int, int] = {}
        for term, n in term_counts(text).items():
            h = term_hash(term)
            by_hash[h] = by_hash.get(h, 0) + n
        ordered = sorted(by_hash)
        return cls(array("I", ordered), array("I", (min(by_hash[h], MAX_COUNT) for h in ordered)))

    def encode(self) -> array:
        """One uint32 array: the hashes, then the counts."""
        return self.hashes + self.counts

    @classmethod
    def decode(cls, ids: array) -> TermIndex:
        half = len(ids) // 2
        return cls(ids[:half], ids[half:])


def hashes(terms: Iterable[str]) -> list[int]:
    return [term_hash(t) for t in terms]
