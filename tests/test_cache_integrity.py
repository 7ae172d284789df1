"""Caches never serve what they were not made for (issue 11 #11, issue 17 #1, #2, #5).

Persisted prefix segments, token-cache entries and remembered checkpoint digests are checked
against their checksum, their name and the request; anything else is reported once, removed
and rebuilt, and never crashes or hangs a run. "Right" logits here means bit-identical to a
recompute from scratch with the same chunk boundaries (exact precision, tiny checkpoint).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.pack import pack_repository
from agent.pack_cache import TokenStore
from runtime import load
from runtime.checkpoint import INDEX_FILE, CheckpointError, digest_store, open_checkpoint
from runtime.prefix_cache import prune, segments, stats
from runtime.session import Session
from runtime.tokenizer import load_tokenizer
from tests.conftest import tokens

ALIGN = 128  # the tiny config's segment boundaries



class Hung(Exception):
    """Not an OSError (as TimeoutError is): the code under test must not be able to swallow it."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """A hang becomes a test failure (the loader once looped forever on an edited header)."""
    def expire(*_: object) -> None:
        raise Hung(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def split_header(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the data stays aligned
    return len(text).to_bytes(8, "little") + text + data


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    header, data = split_header(path.read_bytes())
    change(header)
    path.write_bytes(join_header(header, data))


# -- prefix cache ------------------------------------------------------------------------------

PROMPT = tokens(270, 1)  # segments [0, 128) and [128, 256), written as two turns
OTHER = tokens(270, 2)  # another prompt: one segment [0, 256)



@pytest.fixture(scope="module")
def written(exact, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A cache holding PROMPT's two segments and OTHER's one; the writer's logits for PROMPT."""
    root = tmp_path_factory.mktemp("pristine-prefixes")
    writer = Session(exact, persist=True, cache_root=root)
    writer.extend(PROMPT[:ALIGN])
    writer.extend(PROMPT[ALIGN:])
    Session(exact, persist=True, cache_root=root).extend(OTHER)
    assert sorted((s.start, s.end) for s in segments(root)) == [(0, 128), (0, 256), (128, 256)]
    return root, writer.last_logits


def recompute(model, turns: list[list[int]]) -> torch.Tensor:
    session = Session(model)
    for turn in turns:
        logits = session.extend(turn)
    return logits


@pytest.fixture(scope="module")
def pristine(written) -> Path:
    return written[0]


@pytest.fixture(scope="module")
def right(exact, written) -> dict[int, list[torch.Tensor]]:
    """PROMPT's logits from scratch, by the chunk boundaries a reader can have after reusing n
    tokens: the first writer's ([0, 128), [128, 256), [256, 270)), or, once a reader has
    recomputed the 256-token prefix and saved it, one [0, 256) chunk and [256, 270)."""
    by_segments = recompute(exact, [PROMPT[:128], PROMPT[128:256], PROMPT[256:]])
    assert torch.equal(written[1], by_segments)  # the writer's own two turns chunk just so
    one_chunk = recompute(exact, [PROMPT[:256], PROMPT[256:]])
    return {256: [by_segments, one_chunk], 128: [by_segments], 0: [one_chunk]}


def cache_copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "prefix"
    shutil.copytree(pristine, root)
    return root


def segment(root: Path, prompt: list[int], start: int, end: int) -> Path:
    return next(s.path for s in segments(root) if (s.start, s.end) == (start, end)
                and s.prefix_hash.startswith(_prefix_hash(prompt, end)))


def _prefix_hash(prompt: list[int], end: int) -> str:
    from runtime.prefix_cache import prefix_hashes

    return prefix_hashes(prompt[:end], ALIGN)[end]


def read_and_check(exact, root: Path, right: dict[int, list[torch.Tensor]]) -> tuple[Session, list[str]]:
    """One run on PROMPT: no crash, no hang, and the right logits (bit for bit) for what it reused."""
    heard: list[str] = []
    with deadline(30):
        reader = Session(exact, persist=True, cache_root=root, warn=heard.append)
        logits = reader.extend(PROMPT)
    assert reader.cached_tokens in right, f"{reader.cached_tokens} tokens taken from the cache"
    assert any(torch.equal(logits, r) for r in right[reader.cached_tokens]), \
        f"wrong logits after reusing {reader.cached_tokens} tokens (off by " \
        f"{min(float((logits - r).abs().max()) for r in right[reader.cached_tokens]):.3g})"
    return reader, heard


def heals(exact, root: Path, right: dict[int, list[torch.Tensor]]) -> None:
    """The run after a bad entry was reported: nothing more to report, the whole prefix reused."""
    again, heard = read_and_check(exact, root, right)
    assert heard == [] and again.cached_tokens == 256


def set_meta(field: str, value: str) -> Callable[[dict], None]:
    return lambda header: header["__metadata__"].__setitem__(field, value)


def flip_key_bit(header: dict) -> None:
    key = header["__metadata__"]["key"]
    at = key.index('"precision"') + 2
    header["__metadata__"]["key"] = key[:at] + chr(ord(key[at]) ^ 1) + key[at + 1:]


@pytest.mark.parametrize("target,edit", [
    ((128, 256), set_meta("end", "128")),  # used to be taken as a 128-token prefix: wrong logits
    ((128, 256), set_meta("start", "0")),  # used to crash extend with a RuntimeError
    ((128, 256), set_meta("start", "256")),  # start == end: the loader looped forever
    ((0, 128), flip_key_bit),  # used to raise CacheError on this and every later run
], ids=["end", "start-earlier", "start-equals-end", "key-bit"])
def test_edited_segment_metadata_is_reported_once_removed_and_recomputed(exact, pristine, right, tmp_path,
                                                                         target, edit) -> None:
    root = cache_copy(pristine, tmp_path)
    victim = segment(root, PROMPT, *target)
    edit_header(victim, edit)
    reader, heard = read_and_check(exact, root, right)
    assert reader.cached_tokens < 256 and len([w for w in heard if victim.name in w]) == 1
    heals(exact, root, right)


def test_another_prompts_segment_under_the_name_is_not_used(exact, pristine, right, tmp_path) -> None:
    root = cache_copy(pristine, tmp_path)
    victim = segment(root, PROMPT, 128, 256)
    victim.write_bytes(segment(root, OTHER, 0, 256).read_bytes())  # a valid segment, of OTHER's 256 tokens
    reader, heard = read_and_check(exact, root, right)
    assert reader.cached_tokens == 128 and any(victim.name in w and "another prefix" in w for w in heard)
    heals(exact, root, right)


def test_a_segment_whose_parent_is_gone_is_removed_so_the_prefix_is_saved_again(exact, pristine, right,
                                                                                 tmp_path) -> None:
    root = cache_copy(pristine, tmp_path)
    segment(root, PROMPT, 0, 128).unlink()
    orphan = segment(root, PROMPT, 128, 256)
    reader, heard = read_and_check(exact, root, right)
    assert reader.cached_tokens == 0 and any(orphan.name in w for w in heard)
    heals(exact, root, right)


MUTATIONS = ("truncate", "flip-bit", "flip-header-bit", "header-length", "metadata", "forged-metadata",
             "swap-prompts", "swap-own", "junk", "empty", "foreign-key")


def mutate(rng: random.Random, root: Path, how: str) -> None:
    """Damage one of PROMPT's segments the way `how` says, at random places and values."""
    from runtime.prefix_cache import _checksum  # a valid checksum over forged fields: only the checks on them remain

    files = {s.end: s.path for s in segments(root) if s.prefix_hash == _prefix_hash(PROMPT, s.end)}
    end = rng.choice(sorted(files))
    victim = files[end]
    raw = victim.read_bytes()
    header, data = split_header(raw)
    n = len(raw) - len(data) - 8
    if how == "truncate":
        victim.write_bytes(raw[:rng.randrange(len(raw))])
    elif how in ("flip-bit", "flip-header-bit"):
        at = rng.randrange(len(raw)) if how == "flip-bit" else rng.randrange(8, 8 + n)
        victim.write_bytes(raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1:])
    elif how == "header-length":
        victim.write_bytes(rng.choice([2**63, 2**40, len(raw), n + 1, n - 1, 0]).to_bytes(8, "little") + raw[8:])
    elif how in ("metadata", "forged-metadata"):
        meta = header["__metadata__"]
        field = rng.choice(["start", "end", "prev", "prefix", "key"])
        meta[field] = rng.choice({
            "start": ["0", "128", "256", "-1", "x", "\u00b2", "99999999999999999999999"],
            "end": ["128", "256", "384", "0", ""],
            "prev": ["", _prefix_hash(PROMPT, 128), _prefix_hash(OTHER, 128)],
            "prefix": [_prefix_hash(OTHER, 256), _prefix_hash(PROMPT, 128), _prefix_hash(PROMPT, 256)],
            "key": [meta["key"].replace("fp32", "bf16"), meta["key"].replace("exact", "reference"), "{}", "[]"],
        }[field])
        if how == "forged-metadata":
            from safetensors.torch import load_file

            meta["checksum"] = _checksum(meta, load_file(str(victim)))
        victim.write_bytes(join_header(header, data))
    elif how == "swap-prompts":
        victim.write_bytes(segment(root, OTHER, 0, 256).read_bytes())
    elif how == "swap-own":
        other = files[ALIGN if end != ALIGN else 256]
        victim.write_bytes(other.read_bytes())
    elif how == "junk":
        victim.write_bytes(rng.randbytes(rng.randrange(1, 4096)))
    elif how == "empty":
        victim.write_bytes(b"")
    elif how == "foreign-key":
        victim.rename(victim.with_name(victim.name.rsplit("-", 1)[0] + "-0123456789abcdef.safetensors"))


def corrupt_and_read(exact, pristine, right, tmp_path, seed: int) -> None:
    rng = random.Random(seed)
    root = cache_copy(pristine, tmp_path / str(seed))
    how = MUTATIONS[seed % len(MUTATIONS)]
    mutate(rng, root, how)
    reader, heard = read_and_check(exact, root, right)
    assert reader.cached_tokens == 256 or heard, f"{how}: a segment went unused without a word"
    heals(exact, root, right)


@pytest.mark.parametrize("seed", [0, 2, 4, 6, 8, 10])  # one per kind of damage; the slow test has every kind
def test_corrupted_truncated_and_swapped_segments_never_give_a_wrong_logit(exact, pristine, right, tmp_path,
                                                                           seed) -> None:
    corrupt_and_read(exact, pristine, right, tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12 * len(MUTATIONS)))
def test_corrupted_segments_many_seeds(exact, pristine, right, tmp_path, seed) -> None:
    corrupt_and_read(exact, pristine, right, tmp_path, seed)


def test_untouched_cache_is_reused_whole_without_a_word(exact, pristine, right, tmp_path) -> None:
    heals(exact, cache_copy(pristine, tmp_path), right)


def test_a_cache_that_cannot_be_written_is_reported_and_the_run_goes_on(exact, right, tmp_path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    heard: list[str] = []
    session = Session(exact, persist=True, cache_root=blocked, warn=heard.append)
    session.extend(PROMPT[:128])
    assert torch.equal(session.extend(PROMPT[128:]), right[128][0])
    assert len(heard) == 2 and all("could not save" in w for w in heard)


def test_maintenance_lists_good_segments_and_prunes_bad_ones(pristine, tmp_path) -> None:
    root = cache_copy(pristine, tmp_path)
    good = segment(root, OTHER, 0, 256)
    segment(root, PROMPT, 0, 128).write_bytes(b"\xff" * 64)
    loop = segment(root, PROMPT, 128, 256)  # a header whose segment continues itself: no leaf left
    edit_header(loop, lambda header: header["__metadata__"].__setitem__("prev", _prefix_hash(PROMPT, 256)))
    shutil.copyfile(good, good.with_name("0" * 64 + "-" + good.name.rsplit("-", 1)[1]))  # named after no prefix
    assert [s.path for s in segments(root)] == sorted([good, loop])
    assert stats(root)["unreadable"] == 2
    assert len(prune(0, root)) == 4 and not list(root.glob("*/*"))


# -- checkpoint identity -------------------------------------------------------------------------


def tensor_bytes(root: Path, name: str) -> tuple[Path, int, int]:
    """The shard holding `name` and the file offsets of its data."""
    shard = root / json.loads((root / INDEX_FILE).read_text())["weight_map"][name]
    raw = shard.read_bytes()
    header, data = split_header(raw)
    begin, end = header[name]["data_offsets"]
    start = len(raw) - len(data)
    return shard, start + begin, start + end


def flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)[0]
        f.seek(at)
        f.write(bytes([old ^ 0xFF]))


@pytest.fixture(scope="module")
def editable(checkpoint_dir, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("editable") / "ckpt"
    shutil.copytree(checkpoint_dir("tiny", 0), root)
    return root, open_checkpoint(root).identity()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_tensor_change_gives_a_new_identity(editable, data) -> None:
    root, original = editable
    names = sorted(json.loads((root / INDEX_FILE).read_text())["weight_map"])
    shard, begin, end = tensor_bytes(root, data.draw(st.sampled_from(names), label="tensor"))
    at = data.draw(st.integers(begin, end - 1), label="byte")
    flip_byte(shard, at)
    try:
        assert open_checkpoint(root).identity() != original
    finally:
        flip_byte(shard, at)
    assert open_checkpoint(root).identity() == original


def test_in_place_edit_with_the_old_mtime_restored_gives_a_new_identity(checkpoint_dir, tmp_path,
                                                                        monkeypatch) -> None:
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir("tiny", 0), root)
    time.sleep(1.1)  # a digest is remembered only once its file has not changed for a second
    before = load(root).identity
    shard, begin, _ = tensor_bytes(root, "embed.weight")
    status = os.stat(shard)
    flip_byte(shard, begin + 7)  # same size, same name, same header
    os.utime(shard, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert (os.stat(shard).st_size, os.stat(shard).st_mtime_ns) == (status.st_size, status.st_mtime_ns)
    assert load(root).identity != before


def test_digests_are_remembered_and_a_bad_record_is_recomputed(checkpoint_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir("tiny", 0), root)
    assert open_checkpoint(root).identity() and not digest_store().exists()  # just written: not settled
    time.sleep(1.1)
    identity = open_checkpoint(root).identity()
    (record,) = digest_store().iterdir()  # the tiny checkpoint is one shard
    # the record is what a later open uses instead of reading the shard: a changed digest shows
    entry = json.loads(record.read_text())
    from runtime.checkpoint import _record_check

    forged = {**entry, "sha256": "0" * 64, "check": _record_check(entry["status"], "0" * 64)}
    record.write_text(json.dumps(forged))
    assert open_checkpoint(root).identity() != identity
    record.write_text(json.dumps({**entry, "sha256": "1" * 64}))  # a record that fails its check
    with pytest.warns(RuntimeWarning, match="does not match"):
        assert open_checkpoint(root).identity() == identity
    record.write_bytes(b"\xff" * 10)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert open_checkpoint(root).identity() == identity
    assert json.loads(record.read_text()) == entry  # rewritten, good again


# -- shard headers (issue 17 #5) -----------------------------------------------------------------


@pytest.mark.parametrize("how,words", [("overlap", "overlaps tensor"), ("gap", "leaves a gap"),
                                       ("trailing", "belong to no tensor")])
def test_tensor_data_that_does_not_tile_the_shard_is_refused_at_open(checkpoint_dir, tmp_path, how, words) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir("tiny", 0), root)
    shard, _, _ = tensor_bytes(root, "embed.weight")
    header, data = split_header(shard.read_bytes())
    order = sorted((e["data_offsets"], name) for name, e in header.items() if name != "__metadata__")
    (_, first), (_, second) = order[0], order[1]
    if how == "trailing":
        data += b"\0" * 8
    else:  # move the second tensor 8 bytes down (overlap) or up (gap; the file grows to match)
        shift = -8 if how == "overlap" else 8
        header[second]["data_offsets"] = [x + shift for x in header[second]["data_offsets"]]
        data = data[:order[1][0][0]] + b"\0" * 8 + data[order[1][0][0]:] if how == "gap" else data
    shard.write_bytes(join_header(header, data))
    with pytest.raises(CheckpointError, match=words) as e:
        open_checkpoint(root)
    named = {"overlap": [first, second], "gap": [second], "trailing": [order[-1][1]]}[how]
    assert shard.name in str(e.value) and all(f"'{name}'" in str(e.value) for name in named)


# -- token cache ------------------------------------------------------------------------------------

FUNCTION = 'def f{i}_{j}(x):\n    """Doc {j}."""\n' + "    x = x * {j} + 1\n" * 8 + "    return x\n\n\n"
SOURCES = {  # four modules whose outlines are much smaller than they are
    f"pkg/mod{i}.py": "".join(FUNCTION.format(i=i, j=j) for j in range(8)) for i in range(4)
} | {"README.md": "# Project\n" + "Words and more words.\n" * 20, "blob.bin": "\0binary\0"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for name, text in SOURCES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                       capture_output=True)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


BUDGETS = (100_000, 1500)  # everything in full; some files outlined (their outline records read too)
ISSUE = "f2_3 gives the wrong x"  # ranked at the small budget: the term indexes are read too


def packs(repo: Path, tokenizer, cache: Path) -> tuple[list, list[str]]:
    """What the model reads, per budget: (files and modes, ids); and the warnings heard."""
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        out = []
        for budget in BUDGETS:
            result = pack_repository(repo, budget=budget, issue=ISSUE, tokenizer=tokenizer, cache_dir=cache)
            ids = result.ids()
            assert ids == tokenizer.encode(result.text())
            out.append(([(f.path, f.mode) for f in result.files], result.skipped, ids))
    return out, [str(w.message) for w in heard if issubclass(w.category, RuntimeWarning)]


@pytest.fixture(scope="module")
def packed(repo, tokenizer, tmp_path_factory) -> tuple[Path, list]:
    cache = tmp_path_factory.mktemp("token-cache")
    expected, heard = packs(repo, tokenizer, cache)
    assert heard == [] and any(mode == "outlined" for _, mode in expected[1][0])
    assert [path for path, _ in expected[0][1]] == ["blob.bin"]  # its verdict is a cache entry too
    return cache, expected


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


def test_a_rewritten_token_entry_is_reported_and_rebuilt(repo, tokenizer, packed, tmp_path) -> None:
    pristine, expected = packed
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    victim = next(p for p in entries(cache) if p.name.endswith(".ids") and p.stat().st_size > 64)
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-4] + (1000).to_bytes(4, "little"))  # one token id changed, same length
    got, heard = packs(repo, tokenizer, cache)
    assert got == expected and len([w for w in heard if victim.name in w]) == 1
    assert packs(repo, tokenizer, cache) == (expected, [])


@pytest.mark.parametrize("seed", range(25))
def test_damaged_and_swapped_token_entries_never_change_what_the_model_reads(repo, tokenizer, packed, tmp_path,
                                                                           seed) -> None:
    pristine, expected = packed
    rng = random.Random(seed)
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    files = entries(cache)
    for victim in rng.sample(files, 3):
        raw = victim.read_bytes()
        how = rng.choice(["truncate", "flip-bit", "swap", "payload-of-another", "junk", "legacy"])
        if how == "truncate":
            victim.write_bytes(raw[:rng.randrange(len(raw))])
        elif how == "flip-bit":
            at = rng.randrange(len(raw))
            victim.write_bytes(raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1:])
        elif how == "swap":
            victim.write_bytes(rng.choice(files).read_bytes())
        elif how == "payload-of-another":
            victim.write_bytes(raw[:20] + rng.choice(files).read_bytes()[20:])
        elif how == "junk":
            victim.write_bytes(rng.randbytes(rng.randrange(64)))
        else:  # raw ids without header, as the first version of the cache stored them
            victim.write_bytes(raw[20:])
    with deadline(60):
        got, heard = packs(repo, tokenizer, cache)
    assert got == expected
    assert packs(repo, tokenizer, cache) == (expected, [])  # reported once: rebuilt entries verify


def segment_entries(cache: Path) -> list[Path]:
    """Entries over many files (keyed by a 32-digit digest; a file's own by its 40-digit blob id)."""
    return [p for p in entries(cache) if len(p.name.split(".")[0]) == 32]


def test_damaged_segments_are_reported_and_made_again_from_the_files_entries(repo, tokenizer, packed,
                                                                             tmp_path) -> None:
    pristine, expected = packed
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    segments = segment_entries(cache)
    assert {p.name.split(".")[1].split("-")[0] for p in segments} == {"count", "secret", "path", "outline", "terms"}
    for victim in segments:
        raw = victim.read_bytes()
        victim.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        result = pack_repository(repo, budget=BUDGETS[1], issue=ISSUE, tokenizer=tokenizer, cache_dir=cache)
    # Every segment was read, reported and rebuilt from the files' own entries: nothing made anew.
    assert sorted(str(w.message).split()[3] for w in heard) == sorted(map(str, segments))
    assert (result.stats.tokenized, result.stats.outlined, result.stats.indexed) == (0, 0, 0)
    assert packs(repo, tokenizer, cache) == (expected, [])


def test_a_packed_files_entry_lost_after_its_segment_was_made_is_made_again(repo, tokenizer, packed,
                                                                            tmp_path) -> None:
    """The token counts come from segments: a file's own ids (or outline) entry gone or damaged
    since is found when the prompt is made, and made again from the file."""
    pristine, expected = packed
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    result = pack_repository(repo, budget=BUDGETS[1], issue=ISSUE, tokenizer=tokenizer, cache_dir=cache)
    full = next(f for f in result.files if f.mode == "full" and f.path.endswith(".py"))
    outlined = next(f for f in result.files if f.mode == "outlined")
    (store,) = (cache / "pack").iterdir()
    full_ids = store / "v2" / full.blob[:2] / f"{full.blob}.ids"
    outline_ids, outline_record = sorted((store / "v2" / outlined.blob[:2]).glob(f"{outlined.blob}.python-*"))
    kept = {p: p.read_bytes() for p in (full_ids, outline_ids, outline_record)}
    full_ids.unlink()
    outline_ids.unlink()
    outline_record.write_bytes(kept[outline_record][:-2] + b"}}")  # edited: its checksum no longer holds
    got, heard = packs(repo, tokenizer, cache)
    assert got == expected and heard == [w for w in heard if outline_record.name in w] and len(heard) == 1
    assert {p: p.read_bytes() for p in kept} == kept  # made again, as they were
    assert packs(repo, tokenizer, cache) == (expected, [])


def test_token_store_binds_entries_to_their_key_and_namespace(tmp_path) -> None:
    heard: list[str] = []
    store = TokenStore(tmp_path / "tokenizer-a", warn=heard.append)
    store.save_ids("k1", [1, 2, 3])
    store.save_json("k2", {"text": "x"})
    assert store.count("k1") == 3 and list(store.load_ids("k1")) == [1, 2, 3] and store.load_json("k2") == {"text": "x"}
    other = TokenStore(tmp_path / "tokenizer-b", warn=heard.append)
    path = Path(other._path("k1"))
    path.parent.mkdir(parents=True)
    shutil.copyfile(store._path("k1"), path)  # the same key, another tokenizer's namespace
    assert other.count("k1") is None and not path.exists() and len(heard) == 1
    shutil.copyfile(store._path("k1"), store._path("k2"))  # another key's entry under this key
    assert store.load_json("k2") is None and store.count("k2") is None and len(heard) == 2
    with pytest.raises(KeyError):
        store.load_ids("k2")
