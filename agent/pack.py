"""Packing a git repository into one prompt: every file wrapped in the V4 file-marker tokens,

    <｜begin▁of▁file▁name｜>path<｜end▁of▁file▁name｜><｜begin▁of▁file｜>content<｜end▁of▁file｜>

so each file tokenizes on its own and the ids of the files concatenate to exactly the ids of
the whole text.

Order (for the runtime's prefix cache): files unchanged since HEAD first, by path, then files
with uncommitted edits or untracked, by path — the same commit and issue give the same prompt.

Budget: the whole repository when it fits. Otherwise each file is full, outlined (tree-sitter
signatures, see agent/outline.py) or dropped, chosen to maximise the expected recall of the
files the task needs: agent/rank.py scores every file for the issue (contents, paths, names
the issue mentions, kind and size, git history) and turns the scores into the probability p that a file is
one to change; a full file is worth p, an outline OUTLINE_VALUE * p (the model can find the
file and read it with a tool), and agent/rank_budget.py picks the modes of the DP_FILES most
likely files with the largest total worth within the budget; the budget left is filled one
step up at a time (a dropped file outlined, or a file put in full), most worth per token first.

Files that look like secrets (agent/pack_files.py: keys, tokens, .env files) are left out and
listed, unless the caller passes include_secrets=True: the prompt may go to a remote endpoint.

Token ids of file contents and outlines are cached on disk by git blob id (agent/pack_cache.py):
packing again after an edit tokenizes only the edited file. What a pack needs of every file (its
token count or skip verdict, secret verdict, outline facts, term index, the ids of its path) is
also kept in segments: the files' blobs (or paths) are spread over SEGMENTS buckets, and each
bucket's facts are one entry keyed by exactly the bucket's items, so a warm pack opens a few
hundred entries instead of several per file, and an edit misses only the buckets of the old and
the new blob. The ids of the files put in the prompt are still read from their own entries, and
made again from the packed text when one is gone or bad.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from array import array
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from agent import outline as outline_module
from runtime.encoding import FILE_BEGIN, FILE_END, FILE_NAME_BEGIN, FILE_NAME_END, wrap_file
from agent.outline import language_of, outline
from agent.pack_cache import TokenStore, cache_root, fingerprint
from agent.pack_files import (
    MAX_FILE_BYTES,
    SECRET_RULES_VERSION,
    PackError,
    RepoFile,
    blob_id,
    content_skip_reason,
    list_files,
    open_repo,
    secret_content_reason,
    secret_name_reason,
    work_tree,
)
from agent.rank import Corpus, Ranking, is_source, rank
from agent.rank_budget import FULL, OUTLINED, Option, choose
from agent.rank_history import HISTORY_VERSION, History, read_history
from agent.rank_terms import TermIndex
from agent import rank_terms as rank_terms_module

CONTEXT_TOKENS = 1_048_576
CONVERSATION_RESERVE = 131_072  # room for the issue, tool calls, their results and the answer
DEFAULT_BUDGET = CONTEXT_TOKENS - CONVERSATION_RESERVE
OUTLINE_VALUE = 0.25  # an outline's worth relative to the full text: the model must still read the file
DP_FILES = 512  # the most likely files whose modes are chosen exactly; the rest by worth per token
OUTLINE_HEADER = "[outline: signatures, first docstring lines, #N = line number; read_file for the full text]\n"
_BATCH_BYTES = 4_000_000  # tokenized per encode_batch call: bounds memory, paces progress
SEGMENTS = 64  # buckets of per-file facts: entries opened per kind and pack, at most
# Outline cache entries are keyed by the outliner's own source, so changing it invalidates them.
_OUTLINE_VERSION = hashlib.blake2b(Path(outline_module.__file__).read_bytes() + OUTLINE_HEADER.encode(),
                                   digest_size=6).hexdigest()
_TERMS_VERSION = hashlib.blake2b(Path(rank_terms_module.__file__).read_bytes(), digest_size=6).hexdigest()

Mode = Literal["full", "outlined", "dropped"]
Progress = Callable[[str, int, int], None]
"""progress(stage, files done, files in stage); stages: "tokenizing", "outlining"."""

class PackTokenizer(Protocol):
    """What the packer needs of a tokenizer (runtime.tokenizer.Tokenizer has it)."""

    path: Path

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def token_to_id(self, token: str) -> int: ...


@dataclass(frozen=True)
class PackedFile:
    """One file of the repository as packed.

    tokens: what it takes in the prompt, markers included (0 when dropped);
    full_tokens / outline_tokens: what it would take in full / as an outline (None: no outline);
    relevance: the probability that the task needs it (agent/rank.py; 0 when the whole repository
    fit and nothing was ranked); changed: differs from HEAD or untracked.
    """

    path: str
    mode: Mode
    tokens: int
    full_tokens: int
    outline_tokens: int | None
    blob: str
    changed: bool
    relevance: float


@dataclass(frozen=True)
class PackStats:
    """Work done by one pack: contents tokenized, outlined and term-indexed (cache misses; files
    with the same content count once), wall seconds, cache entries looked up (not counting
    those ids() reads)."""

    tokenized: int
    outlined: int
    seconds: float
    indexed: int = 0
    entries_read: int = 0


@dataclass
class PackResult:
    """A packed repository. `files` holds the prompt's files in order, then the dropped ones
    by path; `skipped` the files filtered out, with the reason; `secrets` the files that look
    like secrets, with the reason: left out unless `secrets_included`."""

    root: Path
    budget: int
    files: list[PackedFile]
    skipped: list[tuple[str, str]]
    secrets: list[tuple[str, str]]
    secrets_included: bool
    stats: PackStats
    _store: TokenStore = field(repr=False)
    _path_ids: dict[str, Sequence[int]] = field(repr=False)
    _outlines: dict[str, tuple[str, str]] = field(repr=False)  # path -> (outline text, ids key)
    _markers: tuple[int, int, int, int] = field(repr=False)
    _tokenizer: PackTokenizer = field(repr=False)
    ranking: Ranking | None = field(default=None, repr=False)  # None: the whole repository fit

    @property
    def ranked(self) -> bool:
        """Whether files were ranked (not when the whole repository fits)."""
        return self.ranking is not None

    def explain(self, path: str) -> str:
        """Why `path` scored what it did (agent/rank.py), or that nothing was ranked."""
        if self.ranking is None:
            return "not ranked: the whole repository fits"
        return self.ranking.explain(list(self.ranking.paths).index(path))

    @property
    def total_tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    def by_mode(self, mode: Mode) -> list[PackedFile]:
        return [f for f in self.files if f.mode == mode]

    def text(self) -> str:
        """The prompt text of the packed files. Full files are read again from the work tree
        and must still be what was packed (PackError otherwise)."""
        return "".join(wrap_file(f.path, self._content(f)) for f in self.files if f.mode != "dropped")

    def ids(self) -> list[int]:
        """The token ids of `text()`, from the cache (tokenizing only what is gone from it)."""
        name_begin, name_end, file_begin, file_end = self._markers
        ids: list[int] = []
        for f in self.files:
            if f.mode == "dropped":
                continue
            ids.append(name_begin)
            ids += self._path_ids[f.path]
            ids += (name_end, file_begin)
            ids += self._content_ids(f)
            ids.append(file_end)
        return ids

    def _content_ids(self, f: PackedFile) -> Sequence[int]:
        """The ids of a packed file's content (or outline). The pack took its count from a
        segment, not from this entry: an entry gone or bad since is made again from the text."""
        key = f"{f.blob}.ids" if f.mode == "full" else self._outlines[f.path][1]
        try:
            found: Sequence[int] = self._store.load_ids(key)
        except KeyError:
            (found,) = self._tokenizer.encode_batch([self._content(f)])
            self._store.save_ids(key, found)
        if 4 + len(self._path_ids[f.path]) + len(found) != f.tokens:
            raise PackError(f"{f.path}: the token cache disagrees with itself; remove {self._store.directory} "
                            "and pack again")
        return found

    def _content(self, f: PackedFile) -> str:
        if f.mode == "outlined":
            return OUTLINE_HEADER + self._outlines[f.path][0]
        data = (self.root / f.path).read_bytes()
        if blob_id(data) != f.blob:
            raise PackError(f"{f.path} changed since it was packed; pack again")
        return data.decode("utf-8")


@dataclass
class _Candidate:
    file: RepoFile
    content_tokens: int
    wrap_tokens: int = 0
    outline_key: str | None = None  # ids key of its outline, when it has one
    outline_content_tokens: int = 0
    symbols: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    terms: TermIndex | None = None
    probability: float = 0.0

    @property
    def full(self) -> int:
        return self.wrap_tokens + self.content_tokens

    @property
    def outlined(self) -> int | None:
        return self.wrap_tokens + self.outline_content_tokens if self.outline_key else None


def pack_repository(path: Path, *, budget: int = DEFAULT_BUDGET, issue: str | None = None,
                    tokenizer: PackTokenizer | None = None, progress: Progress | None = None,
                    cache_dir: Path | None = None, max_file_bytes: int = MAX_FILE_BYTES,
                    include_secrets: bool = False) -> PackResult:
    """Pack the git work tree holding `path` into at most `budget` tokens.

    issue: the task text; with it, files it points at are preferred when the repository does
    not fit. tokenizer: the V4 tokenizer by default. cache_dir: the cache root (default
    `$V4AGENT_CACHE` or ~/.cache/v4agent). include_secrets: pack files that look like secrets
    too (they are listed in `secrets` either way). Raises PackError (a ValueError) when `path`
    is not in a git work tree.
    """
    start = time.perf_counter()
    if budget < 1:
        raise PackError(f"budget must be positive, got {budget}")
    if tokenizer is None:
        from runtime.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    report = progress or (lambda stage, done, total: None)
    repo = open_repo(path)
    root = work_tree(repo)
    files, skipped = list_files(repo, max_file_bytes)
    store = TokenStore((cache_dir or cache_root()) / "pack" / f"tokenizer-{fingerprint(tokenizer.path)}")
    contents = _Contents(root)
    secrets = _secrets(contents, files, store)
    if not include_secrets:
        files = [f for f in files if f.path not in secrets]

    candidates, tokenized = _tokenize_contents(contents, files, store, tokenizer, skipped, report)
    path_ids = _segmented(store, "path", [c.file.path for c in candidates],
                          lambda paths: dict(zip(paths, tokenizer.encode_batch(paths))), binary=True)
    for c in candidates:
        c.wrap_tokens = 4 + len(path_ids[c.file.path])

    outlined = indexed = 0
    ranking = None
    if sum(c.full for c in candidates) <= budget:
        modes: dict[str, Mode] = {c.file.path: "full" for c in candidates}
    else:
        outlined = _outline_all(contents, candidates, store, tokenizer, report)
        if issue:
            indexed = _index_terms(contents, candidates, store, report)
        ranking = rank(issue, Corpus([c.file.path for c in candidates],
                                     [c.terms or TermIndex.empty() for c in candidates],
                                     [c.full for c in candidates],
                                     [is_source(c.file.path) for c in candidates],
                                     {c.file.path: c.symbols for c in candidates},
                                     {c.file.path: c.imports for c in candidates},
                                     _history(repo, root, store)))
        for c, p in zip(candidates, ranking.probability):
            c.probability = float(p)
        modes = _select(candidates, ranking.scores, budget)

    outlines = _outline_texts(contents, [c for c in candidates if modes[c.file.path] == "outlined"], store,
                              tokenizer)
    packed = [_packed(c, modes[c.file.path]) for c in candidates]
    packed.sort(key=lambda f: (f.mode == "dropped", f.mode != "dropped" and f.changed, f.path))
    markers = tuple(tokenizer.token_to_id(t) for t in (FILE_NAME_BEGIN, FILE_NAME_END, FILE_BEGIN, FILE_END))
    return PackResult(
        root=root, budget=budget, files=packed, skipped=sorted(skipped), secrets=sorted(secrets.items()),
        secrets_included=include_secrets,
        stats=PackStats(tokenized, outlined, time.perf_counter() - start, indexed, store.reads),
        _store=store, _path_ids=path_ids, _outlines=outlines,
        _markers=markers,  # type: ignore[arg-type]
        _tokenizer=tokenizer, ranking=ranking,
    )


def _packed(c: _Candidate, mode: Mode) -> PackedFile:
    return PackedFile(c.file.path, mode, _cost(c, mode), c.full, c.outlined, c.file.blob, c.file.changed,
                      c.probability)


class _Contents:
    """The files of the work tree, each read and decoded at most once per pack: a cold pack
    needs a file's bytes for the secret check, the tokenizer, the outline and the term index."""

    def __init__(self, root: Path) -> None:
        self._root = str(root)
        self._bytes: dict[str, bytes] = {}
        self._text: dict[str, str] = {}

    def data(self, path: str) -> bytes:
        found = self._bytes.get(path)
        if found is None:
            with open(f"{self._root}/{path}", "rb") as f:
                found = self._bytes[path] = f.read()
        return found

    def text(self, path: str) -> str:
        """The file as UTF-8 text (callers have checked that it is)."""
        found = self._text.get(path)
        if found is None:
            found = self._text[path] = self.data(path).decode("utf-8")
        return found


def _segmented(store: TokenStore, kind: str, items: Collection[str], make: Callable[[list[str]], dict[str, Any]],
               binary: bool = False) -> dict[str, Any]:
    """{item: fact} for `items` (blob ids, or paths), kept in few cache entries: the items are
    spread over SEGMENTS buckets by a hash, and a bucket's facts are one entry keyed by a digest
    of `kind` and exactly the bucket's items, so an entry is only ever used for the items it was
    made for. A bucket without a good entry gets its facts from `make` (each file's own entries,
    or computed) and is saved. binary: the facts are id arrays (else JSON values)."""
    buckets: dict[int, list[str]] = {}
    for item in sorted(set(items)):
        buckets.setdefault(zlib.crc32(item.encode()) % SEGMENTS, []).append(item)
    found: dict[str, Any] = {}
    missing: list[tuple[str, list[str]]] = []
    for members in buckets.values():
        digest = hashlib.blake2b("\0".join([kind, *members]).encode(), digest_size=16).hexdigest()
        key = f"{digest}.{kind}"
        values = store.load_arrays(key) if binary else store.load_json(key)
        if isinstance(values, list) and len(values) == len(members):
            found.update(zip(members, values))
        else:
            missing.append((key, members))
    if missing:
        found.update(make([item for _, members in missing for item in members]))
        for key, members in missing:
            values = [found[item] for item in members]
            if binary:
                store.save_arrays(key, values)
            else:
                store.save_json(key, values)
    return found


def _secrets(contents: _Contents, files: Sequence[RepoFile], store: TokenStore) -> dict[str, str]:
    """{path: why it looks like a secret}. Names count for files that differ from HEAD (a file as
    committed is already shared with whoever has the repository: a committed `.env.example` is
    fine); content counts for every file, its verdict cached per blob."""
    by_name = {f.path: reason for f in files if f.changed and (reason := secret_name_reason(f.path))}
    paths = {f.blob: f.path for f in files if f.path not in by_name}

    def make(blobs: list[str]) -> dict[str, str | None]:
        verdicts: dict[str, str | None] = {}
        for blob in blobs:
            key = f"{blob}.secret-{SECRET_RULES_VERSION}"
            cached = store.load_json(key)
            if isinstance(cached, dict) and "reason" in cached:
                verdicts[blob] = cached["reason"]
            else:
                verdicts[blob] = secret_content_reason(contents.data(paths[blob]))
                store.save_json(key, {"reason": verdicts[blob]})
        return verdicts

    by_content = _segmented(store, f"secret-{SECRET_RULES_VERSION}", paths, make)
    found: dict[str, str] = {}
    for f in files:
        reason = by_name.get(f.path) or by_content[f.blob]
        if reason:
            found[f.path] = reason
    return found


def _batches(items: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """`items` cut into consecutive batches of about _BATCH_BYTES."""
    batches: list[list[Any]] = []
    current: list[Any] = []
    total = 0
    for item, size in zip(items, sizes):
        current.append(item)
        total += size
        if total >= _BATCH_BYTES:
            batches.append(current)
            current, total = [], 0
    if current:
        batches.append(current)
    return batches


def _tokenize_contents(contents: _Contents, files: Sequence[RepoFile], store: TokenStore, tokenizer: PackTokenizer,
                       skipped: list[tuple[str, str]], report: Progress) -> tuple[list[_Candidate], int]:
    """Candidates with their content token counts, tokenizing only blobs the cache lacks (each
    once); files failing the content filters are added to `skipped` (their verdict cached too)."""
    by_blob = {f.blob: f for f in files}
    tokenized = 0

    def make(blobs: list[str]) -> dict[str, int | str]:
        """{blob: its token count, or why it is skipped}."""
        nonlocal tokenized
        facts: dict[str, int | str] = {}
        pending: list[RepoFile] = []
        for blob in blobs:
            count = store.count(f"{blob}.ids")
            reason = None if count is not None else store.load_json(f"{blob}.skip")
            if count is not None or reason is not None:
                facts[blob] = count if count is not None else reason
            else:
                pending.append(by_blob[blob])
        done = len(blobs) - len(pending)
        report("tokenizing", done, len(blobs))
        for batch in _batches(pending, [f.size for f in pending]):
            texts: list[tuple[RepoFile, str]] = []
            for f in batch:
                reason = content_skip_reason(contents.data(f.path))
                if reason is None:
                    texts.append((f, contents.text(f.path)))
                else:
                    store.save_json(f"{f.blob}.skip", reason)
                    facts[f.blob] = reason
            for (f, _), ids in zip(texts, tokenizer.encode_batch([text for _, text in texts])):
                store.save_ids(f"{f.blob}.ids", ids)
                facts[f.blob] = len(ids)
            tokenized += len(texts)
            done += len(batch)
            report("tokenizing", done, len(blobs))
        return facts

    facts = _segmented(store, "count", by_blob, make)
    candidates: list[_Candidate] = []
    for f in files:
        fact = facts[f.blob]
        if isinstance(fact, int):
            candidates.append(_Candidate(f, fact))
        else:
            skipped.append((f.path, fact))
    return candidates, tokenized


def _outline_key(blob: str, language: str) -> str:
    return f"{blob}.{language}-{_OUTLINE_VERSION}"


def _outline_all(contents: _Contents, candidates: Sequence[_Candidate], store: TokenStore, tokenizer: PackTokenizer,
                 report: Progress) -> int:
    """Fill in the outline facts of all candidates that have an outline (its token count, the
    names it defines and imports; from the cache, or outlined and tokenized); returns how many
    were made. The outline texts are read later, for the files outlined in the prompt only."""
    languages = {c.file.path: language_of(c.file.path) for c in candidates}
    # Items are blob.language: the language comes from the file name, not the content.
    files = {f"{c.file.blob}.{language}": (c.file, language) for c in candidates
             if (language := languages[c.file.path]) is not None}
    made = 0

    def make(names: list[str]) -> dict[str, list[Any]]:
        """{blob.language: [token count, whether there is any text, symbols, imports]}."""
        nonlocal made
        facts: dict[str, list[Any]] = {}
        todo: list[tuple[RepoFile, str]] = []
        for name in names:
            f, language = files[name]
            key = _outline_key(f.blob, language)
            record, count = store.load_json(f"{key}.json"), store.count(f"{key}.ids")
            if record is None or count is None:
                todo.append(files[name])
            else:
                facts[name] = _outline_facts(record, count)
        made = len(todo)
        report("outlining", len(names) - len(todo), len(names))
        progress = lambda done: report("outlining", len(names) - len(todo) + done, len(names))
        for (f, language), (record, count) in zip(todo, _make_outlines(contents, todo, store, tokenizer, progress)):
            facts[f"{f.blob}.{language}"] = _outline_facts(record, count)
        return facts

    facts = _segmented(store, f"outline-{_OUTLINE_VERSION}", files, make)
    for c in candidates:
        language = languages[c.file.path]
        if language is not None:
            count, has_text, c.symbols, c.imports = facts[f"{c.file.blob}.{language}"]
            # An empty outline, or one no cheaper than the file, is no option.
            if has_text and count < c.content_tokens:
                c.outline_key, c.outline_content_tokens = f"{_outline_key(c.file.blob, language)}.ids", count
    return made


def _outline_facts(record: dict[str, Any], count: int) -> list[Any]:
    return [count, bool(record["text"]), record["symbols"], record["imports"]]


def _make_outlines(contents: _Contents, todo: Sequence[tuple[RepoFile, str]], store: TokenStore,
                   tokenizer: PackTokenizer, report: Callable[[int], None]) -> list[tuple[dict[str, Any], int]]:
    """Outline and tokenize the files of `todo` ((file, language)), saving their entries; for
    each in turn, (its record: text, symbols, imports; its token count)."""
    made: list[tuple[dict[str, Any], int]] = []
    for batch in _batches(todo, [f.size for f, _ in todo]):
        found = []
        for f, language in batch:
            result = outline(f.path, contents.text(f.path))
            assert result is not None  # its language has a grammar
            found.append((_outline_key(f.blob, language), result))
        for (key, result), ids in zip(found, tokenizer.encode_batch([OUTLINE_HEADER + r.text for _, r in found])):
            record = {"text": result.text, "symbols": result.symbols, "imports": result.imports}
            store.save_ids(f"{key}.ids", ids)
            store.save_json(f"{key}.json", record)
            made.append((record, len(ids)))
        report(len(made))
    return made


def _outline_texts(contents: _Contents, outlined: Sequence[_Candidate], store: TokenStore,
                   tokenizer: PackTokenizer) -> dict[str, tuple[str, str]]:
    """{path: (outline text, ids key)} of the files outlined in the prompt, each from its own
    entry, or outlined again when that is gone or bad."""
    texts: dict[str, tuple[str, str]] = {}
    for c in outlined:
        assert c.outline_key is not None  # only files with an outline are outlined
        key = c.outline_key.removesuffix(".ids")
        record = store.load_json(f"{key}.json")
        if record is None:
            language = language_of(c.file.path)
            assert language is not None
            if blob_id(contents.data(c.file.path)) != c.file.blob:
                raise PackError(f"{c.file.path} changed while it was packed; pack again")
            ((record, count),) = _make_outlines(contents, [(c.file, language)], store, tokenizer, lambda done: None)
            if count != c.outline_content_tokens:
                raise PackError(f"{c.file.path}: the token cache disagrees with itself; remove {store.directory} "
                                "and pack again")
        texts[c.file.path] = (record["text"], c.outline_key)
    return texts


def _index_terms(contents: _Contents, candidates: Sequence[_Candidate], store: TokenStore, report: Progress) -> int:
    """Fill in the term index of every candidate (agent/rank_terms.py), from the cache or made
    from the file; returns how many were made."""
    paths = {c.file.blob: c.file.path for c in candidates}
    made = 0

    def make(blobs: list[str]) -> dict[str, array]:
        nonlocal made
        encoded: dict[str, array] = {}
        report("indexing", 0, len(blobs))
        for done, blob in enumerate(blobs, 1):
            key = f"{blob}.terms-{_TERMS_VERSION}"
            try:
                encoded[blob] = store.load_ids(key)
            except KeyError:
                encoded[blob] = TermIndex.of_text(contents.text(paths[blob])).encode()
                store.save_ids(key, encoded[blob])
                made += 1
            if done % 500 == 0 or done == len(blobs):
                report("indexing", done, len(blobs))
        return encoded

    encoded = _segmented(store, f"terms-{_TERMS_VERSION}", paths, make, binary=True)
    for c in candidates:
        c.terms = TermIndex.decode(encoded[c.file.blob])
    return made


def _history(repo: Any, root: Path, store: TokenStore) -> History | None:
    """The commit history behind HEAD (agent/rank_history.py), cached per HEAD commit; None
    without one (no commit yet, a shallow clone, git failing)."""
    try:
        head = repo.head.commit.hexsha
    except ValueError:  # no commit yet
        return None
    key = f"{head}.{HISTORY_VERSION}"
    cached = store.load_json(key)
    if isinstance(cached, list):
        return History(tuple(tuple(commit) for commit in cached))
    history = read_history(root, Path(repo.common_dir), head)
    if history is not None:
        store.save_json(key, [list(commit) for commit in history.commits])
    return history


def _cost(c: _Candidate, mode: Mode) -> int:
    return c.full if mode == "full" else (c.outlined or 0) if mode == "outlined" else 0


_MODES: dict[int, Mode] = {0: "dropped", OUTLINED: "outlined", FULL: "full"}


def _select(candidates: Sequence[_Candidate], scores: Sequence[float], budget: int) -> dict[str, Mode]:
    """Each file's mode under `budget` (module docstring): exactly for the DP_FILES most likely,
    then by worth per token for the budget left."""
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i].file.path))
    ranked = [candidates[i] for i in order]
    options = [Option(c.probability, c.full, OUTLINE_VALUE * c.probability, c.outlined) for c in ranked]
    chosen = choose(options[:DP_FILES], budget)
    modes: dict[str, Mode] = {c.file.path: "dropped" for c in candidates}
    for c, mode in zip(ranked, chosen):
        modes[c.file.path] = _MODES[mode]
    spent = sum(_cost(c, modes[c.file.path]) for c in ranked)
    # Every step up left (outline a dropped file, or full text), by worth per token; ties in rank order.
    steps: list[tuple[float, int, Mode]] = []
    for position, (c, option) in enumerate(zip(ranked, options)):
        if c.outlined is not None:
            steps.append((-option.outline_value / max(c.outlined, 1), position, "outlined"))
        steps.append((-option.full_value / max(c.full, 1), position, "full"))
    for _, position, mode in sorted(steps):
        c = ranked[position]
        current = modes[c.file.path]
        if current == "full" or (mode == "outlined" and current != "dropped"):
            continue  # never a step down
        delta = _cost(c, mode) - _cost(c, current)
        if spent + delta <= budget:
            modes[c.file.path] = mode
            spent += delta
    return modes
