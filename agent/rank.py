"""Ranking the files of a repository for an issue: the score the packer uses to choose what goes
into the prompt in full when the repository does not fit (agent/pack.py, agent/rank_budget.py).

A file's score is a weighted sum of FEATURES (the weights are COEFFICIENTS):
- lexical: BM25 (k1 1.2, b 0.75) of the file's contents for the issue's terms
  (agent/rank_terms.py: words split on snake_case and camelCase, hyphenated names kept whole;
  each query term weighs 1 + ln(its count in the issue), twice that when it looks like code:
  snake_case, camelCase, dotted, hyphenated or in backticks), divided by the best file's;
- path: the issue's terms in the file's path (directories and file name), each by its idf
  among the paths, divided by the best file's;
- defines: the issue's terms among the terms of the names the file defines (its outline's
  symbols), each by its idf among the files, divided by the best file's;
- mention: ln(1 + the mention score of agent/relevance.py): paths, dotted modules,
  identifiers and directories the issue names;
- named: the issue names the file's path or dotted module (its weight is set by hand: the
  benchmark removes paths from its queries, so it cannot be fitted);
- imported_by, imports, tests: the best lexical score among the non-test files that import
  it, the files it imports, the tests that import it or are named after it (one hop over
  the import graph of the outlines' imports);
- test, non_code, init: the file is a test, is not source code (docs, config, data), is a
  package's `__init__.py`;
- size: ln(the file's tokens / 1000): larger files hold more code, and so more of the bugs;
- cochange, recency (agent/rank_history.py; 0 without a git history): how often the file
  changed together with the files the issue mentions (the mention scores as weights), divided
  by the best file's; exp(-commits since it last changed / 300).

The coefficients are fitted once (a conditional logit: the softmax of the scores over a
repository's files is the probability that a file is one the fix changes) on the tune split
of `v4agent bench localize` (L2 penalty 0.1, by 5-fold cross-validation; the numbers are in
docs/agent-pack-and-tools.md; agent/data/fit_rank_weights.py refits them; the history ones
on top of the others held fixed, so that without a history the scores are the others' alone) and fixed here:
nothing is learned at run time, and the same issue and files give the same scores. The
softmax is what the budget step maximises the expected recall of.
"""

from __future__ import annotations

import math
import os
import re
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.outline import EXTENSIONS
from agent.pack_files import is_test_path
from agent.rank_history import History
from agent.rank_terms import TermIndex, term_hash, token_terms, tokens, word_terms
from agent.relevance import mentions, module_index, resolve_import

FEATURES = ("lexical", "path", "defines", "mention", "named", "imported_by", "imports", "tests", "test", "non_code",
            "size", "init", "cochange", "recency")
COEFFICIENTS = np.array([7.44, 1.61, 2.10, 0.34, 8.0, 1.35, 1.59, 3.25, -4.06, -3.43, 0.49, -0.99, 0.49, 1.66])
HISTORY_FEATURES = ("cochange", "recency")
K1 = 1.2
B = 0.75
CODE_WEIGHT = 2.0
_CODE_SPAN = re.compile(r"`[^`\n]+`|\b[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+\b")
_EXPLAINED_TERMS = 5
_DOC_DIRS = ("doc/", "docs/")


def is_source(path: str) -> bool:
    """Source code: a language agent/outline.py knows, outside a top-level doc/ or docs/."""
    return os.path.splitext(path)[1].lower() in EXTENSIONS and not path.startswith(_DOC_DIRS)


@dataclass
class Corpus:
    """What ranking needs of each candidate file, all in one order: path, term index, token
    count, whether it is source code; and by path the names it defines and the modules it
    imports (agent/outline.py)."""

    paths: Sequence[str]
    terms: Sequence[TermIndex]
    tokens: Sequence[int]
    code: Sequence[bool]
    symbols: Mapping[str, Sequence[str]]
    imports: Mapping[str, Sequence[str]]
    history: History | None = None
    _matrix: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(term hashes, counts, file of each entry, length of each file), all files in a row."""
        if self._matrix is None:
            hashes, counts = array("I"), array("I")
            for t in self.terms:
                hashes += t.hashes
                counts += t.counts
            sizes = np.array([len(t.hashes) for t in self.terms], dtype=np.int64)
            owner = np.repeat(np.arange(len(self.terms)), sizes)
            count_values = np.frombuffer(counts, dtype=np.uint32).astype(np.float64)
            lengths = np.bincount(owner, weights=count_values, minlength=len(self.terms))
            self._matrix = (np.frombuffer(hashes, dtype=np.uint32), count_values, owner, lengths)
        return self._matrix


@dataclass(frozen=True)
class Query:
    """The issue's terms: term -> weight, and which of them look like code."""

    weights: dict[str, float]
    code: frozenset[str]

    @classmethod
    def of(cls, issue: str) -> Query:
        code_tokens = {t for span in _CODE_SPAN.findall(issue) for t in tokens(span)}
        counts: Counter[str] = Counter()
        code: set[str] = set()
        for token in tokens(issue):
            # A hyphenated name is code as a whole; its words by their own look.
            for word in token.split("-") if "-" in token else (token,):
                looks_like_code = (token in code_tokens or "_" in word.strip("_")
                                   or any(c.isupper() for c in word[1:]))
                for term in token_terms(word) if len(word) > 1 else ():
                    counts[term] += 1
                    if looks_like_code:
                        code.add(term)
            if "-" in token:
                counts[token.lower()] += 1
                code.add(token.lower())
        weights = {t: (1 + math.log(n)) * (CODE_WEIGHT if t in code else 1.0) for t, n in counts.items()}
        return cls(weights, frozenset(code))


@dataclass(frozen=True)
class _Lexical:
    """BM25 scores per file, and the per-(file, term) contributions behind them."""

    scores: np.ndarray
    owner: np.ndarray
    term: np.ndarray  # index into `terms`
    contribution: np.ndarray
    terms: list[str]


def _bm25(weights: Mapping[str, float], corpus: Corpus) -> _Lexical:
    n = len(corpus.paths)
    # Two query terms with one hash (rare) count as one, with the first term's name.
    by_hash: dict[int, tuple[float, str]] = {}
    for term, weight in sorted(weights.items()):
        h = term_hash(term)
        total, name = by_hash.get(h, (0.0, term))
        by_hash[h] = (total + weight, name)
    order = sorted(by_hash)
    empty = _Lexical(np.zeros(n), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), [])
    if not n or not order:
        return empty
    query_hashes = np.array(order, dtype=np.uint32)
    query_weights = np.array([by_hash[h][0] for h in order])
    hashes, counts, owner, lengths = corpus.matrix()
    hit = np.flatnonzero(np.isin(hashes, query_hashes))
    if not hit.size:
        return empty
    which = np.searchsorted(query_hashes, hashes[hit])
    df = np.bincount(which, minlength=len(order))
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    tf = counts[hit]
    norm = K1 * (1 - B + B * lengths[owner[hit]] / max(float(lengths.mean()), 1.0))
    contribution = query_weights[which] * idf[which] * tf * (K1 + 1) / (tf + norm)
    scores = np.bincount(owner[hit], weights=contribution, minlength=n)
    return _Lexical(scores, owner[hit], which, contribution, [by_hash[h][1] for h in order])


def _path_terms(path: str) -> set[str]:
    parts = path.split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    return {t for part in [*parts[:-1], stem] for token in tokens(part) for t in token_terms(token)}


def _path_scores(weights: Mapping[str, float], paths: Sequence[str]) -> tuple[np.ndarray, list[set[str]]]:
    matched = [_path_terms(p) & weights.keys() for p in paths]
    df = Counter(t for terms in matched for t in terms)
    n = len(paths)
    scores = np.array([sum(weights[t] * math.log1p((n - df[t] + 0.5) / (df[t] + 0.5)) for t in terms)
                       for terms in matched], dtype=np.float64)
    return scores, matched


def _scaled(values: np.ndarray) -> np.ndarray:
    top = float(values.max()) if values.size else 0.0
    return values / top if top > 0 else values


def _defines(weights: Mapping[str, float], corpus: Corpus) -> tuple[np.ndarray, list[set[str]]]:
    """The issue's terms among the terms of the names a file defines, each by its idf among
    the files defining it."""
    wanted = weights.keys()
    matched = [{t for name in corpus.symbols.get(p, ()) for t in word_terms(name)} & wanted for p in corpus.paths]
    df = Counter(t for terms in matched for t in terms)
    n = len(corpus.paths)
    scores = np.array([sum(weights[t] * math.log1p((n - df[t] + 0.5) / (df[t] + 0.5)) for t in terms)
                       for terms in matched], dtype=np.float64)
    return scores, matched


def _edges(corpus: Corpus, test: np.ndarray, modules: Mapping[str, str]) -> list[tuple[int, int]]:
    """(importer, imported) for every import that resolves to another file of the corpus, and
    (test, subject) for tests named after a module (test_x.py, x_test.py -> x.py)."""
    index = {p: i for i, p in enumerate(corpus.paths)}
    edges = set()
    for i, path in enumerate(corpus.paths):
        for name in corpus.imports.get(path, ()):
            # Absolute imports (most of them) are a plain lookup.
            target = resolve_import(name, path, modules) if name.startswith(".") else modules.get(name)
            if target is not None and target != path:
                edges.add((i, index[target]))
    by_stem: dict[str, list[int]] = {}
    for i, path in enumerate(corpus.paths):
        if not test[i]:
            by_stem.setdefault(_stem(path), []).append(i)
    for i, path in enumerate(corpus.paths):
        stem = _stem(path)
        subject = stem.removeprefix("test_").removesuffix("_test").removesuffix("_tests")
        if test[i] and subject != stem:
            edges.update((i, j) for j in by_stem.get(subject, ()))
    return sorted(edges)


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _neighbours(lexical: np.ndarray, edges: Sequence[tuple[int, int]],
                test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per file and per kind of neighbour (FEATURES' imported_by, imports, tests): the best
    lexical score among those neighbours, and which neighbour that is (-1: none)."""
    n = len(lexical)
    best = np.zeros((n, 3))
    which = np.full((n, 3), -1)
    for a, b in edges:  # a imports b, or tests it
        for kind, source, target in ((2, a, b),) if test[a] else ((0, a, b), (1, b, a)):
            if lexical[source] > best[target, kind]:
                best[target, kind] = lexical[source]
                which[target, kind] = source
    return best, which


@dataclass(frozen=True)
class Ranking:
    """Scores of the files of a corpus for an issue, in the corpus's order; `probability` is
    their softmax; `explain(i)` says why file i scored what it did."""

    paths: Sequence[str]
    features: np.ndarray  # files x FEATURES
    scores: np.ndarray
    probability: np.ndarray
    _lexical: _Lexical
    _details: dict[str, list[str]]  # feature -> per file, what is behind it

    def explain(self, i: int) -> str:
        """`score S, p P: lexical +a (term, term...), path +b (term), ...`: each feature's
        share of the score, largest first, with what is behind it."""
        parts = sorted(((COEFFICIENTS[k] * self.features[i, k], name) for k, name in enumerate(FEATURES)
                        if self.features[i, k]), key=lambda part: (-abs(part[0]), part[1]))
        shown = []
        for value, name in parts:
            if name == "lexical":
                mine = np.flatnonzero(self._lexical.owner == i)
                top = sorted(mine, key=lambda e: (-self._lexical.contribution[e], int(self._lexical.term[e])))
                detail = ", ".join(self._lexical.terms[int(self._lexical.term[e])] for e in top[:_EXPLAINED_TERMS])
            else:
                detail = self._details[name][i] if name in self._details else ""
            shown.append(f"{name} {value:+.2f}" + (f" ({detail})" if detail else ""))
        return f"score {self.scores[i]:.2f}, p {self.probability[i]:.3f}: " + ", ".join(shown)


def rank(issue: str | None, corpus: Corpus) -> Ranking:
    """Score every file of `corpus` for `issue` (None: by the priors alone: kind, size, recency)."""
    query = Query.of(issue or "")
    paths = corpus.paths
    lexical = _bm25(query.weights, corpus)
    lexical_scaled = _scaled(lexical.scores)
    path, path_matches = _path_scores(query.weights, paths)
    defines, defined = _defines(query.weights, corpus)
    modules = module_index(paths)
    mentioned = mentions(issue or "", paths, corpus.symbols, modules)
    test = np.array([is_test_path(p) for p in paths], dtype=bool)
    neighbours, which = _neighbours(lexical_scaled, _edges(corpus, test, modules), test)
    columns = {
        "lexical": lexical_scaled,
        "path": _scaled(path),
        "defines": _scaled(defines),
        "mention": np.log1p(np.array([mentioned.scores.get(p, 0.0) for p in paths], dtype=np.float64)),
        "named": np.array([mentioned.named.get(p, 0.0) for p in paths], dtype=np.float64),
        "imported_by": neighbours[:, 0],
        "imports": neighbours[:, 1],
        "tests": neighbours[:, 2],
        "test": test.astype(np.float64),
        "non_code": 1.0 - np.array(corpus.code, dtype=np.float64),
        "size": np.log(np.maximum(np.array(corpus.tokens, dtype=np.float64), 1.0) / 1000),
        "init": np.array([p.endswith("__init__.py") for p in paths], dtype=np.float64),
    }
    # History: co-change with the files the issue mentions, and recency (0 without a history).
    partners: list[tuple[int, int]] = [(-1, 0)] * len(paths)
    since = [-1] * len(paths)
    columns["cochange"] = columns["recency"] = np.zeros(len(paths))
    if corpus.history is not None:
        cochange, partners = corpus.history.cochange(paths, columns["mention"])
        columns["cochange"] = _scaled(cochange)
        columns["recency"], since = corpus.history.recency(paths)
    features = np.stack([columns[name] for name in FEATURES], axis=1) if paths else np.zeros((0, len(FEATURES)))
    scores = features @ COEFFICIENTS
    shifted = np.exp(scores - scores.max()) if scores.size else scores
    probability = shifted / shifted.sum() if scores.size else scores
    details = {
        "path": [", ".join(sorted(m)) for m in path_matches],
        "defines": [", ".join(sorted(m)[:_EXPLAINED_TERMS]) for m in defined],
        "mention": [f"{mentioned.scores[p]:.2f}" if p in mentioned.scores else "" for p in paths],
        "named": ["the issue names its path or module" if p in mentioned.named else "" for p in paths],
        "size": [f"{t:,} tokens" for t in corpus.tokens],
        "cochange": [f"with {paths[j]} in {k} commit{'s' * (k != 1)}" if j >= 0 else "" for j, k in partners],
        "recency": ["changed in the last commit" if k == 0 else f"changed {k} commit{'s' * (k != 1)} back" if k > 0
                    else "" for k in since],
    }
    for kind, name in enumerate(("imported_by", "imports", "tests")):
        details[name] = [paths[j] if j >= 0 else "" for j in which[:, kind]]
    return Ranking(paths, features, scores, probability, lexical, details)
