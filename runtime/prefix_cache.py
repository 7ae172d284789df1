"""Persisted prefixes: a repository prefix computed once is reused by every later run.

A session's state at a block-aligned position b (a multiple of 128 and of every
compression rate, so no compressor window is open) is saved as an append-only chain of
segments. A segment holds the compressed rows its tokens [a, b) emitted plus the small
state at b (sliding windows, CSA overlap halves, MTP window, next-token logits). It is
addressed by a hash chained over the token blocks, `h(b) = sha256(h(b-128) | tokens)`,
so any prompt finds its longest saved prefix by hashing its own blocks; a segment never
splits a 128-token block, and a later turn writes only its new tokens.

A segment's file is named by its prefix hash and the digest of its compatibility key
(checkpoint content identity, precision, cache format, format version); segments under
another key are reported, never read. A file is used only if everything that decides
reuse checks out against its name and the request: its header is well-formed and bounded,
a checksum covers its metadata (key, prefix hash, token range, previous segment's hash)
and every tensor's name, dtype, shape and bytes, and its tensors are exactly the layout
this model's state has at that range. Anything else is reported once, removed, and the
prefix recomputed (and saved again). Writes go to a temporary file renamed into place.
Pruning removes least-recently-used leaves first, so a parent never goes before its children.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from runtime.checkpoint import TORCH_DTYPES, CheckpointError, read_header
from runtime.kvstore import Rows
from runtime.model import Model, SequenceState

FORMAT_VERSION = "2"
BLOCK = 128
_SAFETENSORS_DTYPE = {v: k for k, v in TORCH_DTYPES.items()}
_META_FIELDS = ("key", "prefix", "start", "end", "prev", "checksum")


class BadSegment(ValueError):
    """A segment file that must not be used; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("V4AGENT_CACHE", Path.home() / ".cache" / "v4agent")) / "prefix"


def alignment(model: Model) -> int:
    """Segment boundaries: multiples of 128 and of every compression rate."""
    return math.lcm(BLOCK, *model.config.compress_rates.values())


def compat_key(model: Model, cache_format: str) -> dict[str, str]:
    return {"model": model.identity, "precision": model.precision, "cache_format": cache_format,
            "format_version": FORMAT_VERSION}


def _key_digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def prefix_hashes(tokens: list[int], align: int) -> dict[int, str]:
    """Chained hash at every aligned boundary b <= len(tokens): {b: hex}."""
    out, h = {}, hashlib.sha256(b"v4agent-prefix").digest()
    for b in range(align, len(tokens) + 1, align):
        h = hashlib.sha256(h + torch.tensor(tokens[b - align:b], dtype=torch.int64).numpy().tobytes()).digest()
        out[b] = h.hex()
    return out


@dataclass(frozen=True)
class SegmentInfo:
    path: Path
    prefix_hash: str
    key: dict[str, str]
    start: int
    end: int
    prev: str  # prefix hash at `start` ("" for the first segment)
    nbytes: int
    last_used: float


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """Over the metadata (but the checksum itself) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _state_tensors(state: SequenceState, start_rows: list[tuple[int, int]] | None) -> dict[str, torch.Tensor]:
    """The state's small parts plus, per compressed stream, rows [start, now)."""
    out: dict[str, torch.Tensor] = {}
    streams = 0
    for i, st in enumerate(state.layers):
        out[f"layer.{i}.window"] = st.window
        for tag, comp in (("c", st.compressor), ("i", st.indexer)):
            if comp is None:
                continue
            start = start_rows[streams][1] if start_rows else 0
            streams += 1
            for j, part in enumerate(comp.entries.encoded(start, comp.entries.count)):
                out[f"layer.{i}.{tag}.rows.{j}"] = part
            if comp.prev_kv is not None:
                out[f"layer.{i}.{tag}.prev_kv"], out[f"layer.{i}.{tag}.prev_gate"] = comp.prev_kv, comp.prev_gate
    for i, st in enumerate(state.mtp):
        out[f"mtp.{i}.window"] = st.window
    return out


def row_counts(state: SequenceState) -> list[tuple[int, int]]:
    return [(i, c.entries.count) for i, st in enumerate(state.layers) for c in (st.compressor, st.indexer)
            if c is not None]


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # not ours to remove (permissions): it stays unused, and is reported again next time


def _read_segment_header(fh: BinaryIO, path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """A segment's metadata and tensor entries, bounded and well-formed (BadSegment otherwise)."""
    try:
        meta, entries = read_header(fh, os.fstat(fh.fileno()).st_size, path)
    except CheckpointError as e:
        raise BadSegment(f"is unreadable ({e})") from None
    missing = [f for f in _META_FIELDS if f not in meta]
    if missing:
        raise BadSegment(f"lacks the metadata {missing}")
    if not all(meta[f].isascii() and meta[f].isdigit() and len(meta[f]) < 20 for f in ("start", "end")):
        raise BadSegment(f"has a malformed token range {meta['start']!r}..{meta['end']!r}")
    return meta, entries


class PrefixCache:
    """Segments of one compatibility key under `root` (default ~/.cache/v4agent/prefix)."""

    def __init__(self, model: Model, cache_format: str, root: str | Path | None = None,
                 warn: Callable[[str], None] = lambda _: None) -> None:
        self.model, self.root, self.warn = model, Path(root) if root else cache_root(), warn
        self.key = compat_key(model, cache_format)
        self.key_json = json.dumps(self.key, sort_keys=True)
        self.digest = _key_digest(self.key)
        self.align = alignment(model)

    def _path(self, prefix_hash: str, digest: str | None = None) -> Path:
        return self.root / prefix_hash[:2] / f"{prefix_hash}-{digest or self.digest}.safetensors"

    def layout(self, start: int, end: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor of a segment [start, end) of this model's state, with its dtype and shape."""
        model, out = self.model, {}
        template = model.new_state(self.key["cache_format"])
        for prefix, blocks, states, seen in (("layer", model.layers, template.layers, end),
                                             ("mtp", model.mtp, template.mtp, end - 1)):  # MTP lags by one
            for i, (block, st) in enumerate(zip(blocks, states)):
                out[f"{prefix}.{i}.window"] = (st.window.dtype, (min(seen, block.attn.window - 1), st.window.shape[1]))
                for tag, comp in (("c", st.compressor), ("i", st.indexer)):
                    if comp is None:
                        continue
                    module = block.attn.compressor if tag == "c" else block.attn.indexer.compressor
                    rows = end // module.ratio - start // module.ratio
                    for j, part in enumerate(comp.entries.codec.encode(torch.zeros(1, comp.entries.width))):
                        out[f"{prefix}.{i}.{tag}.rows.{j}"] = (part.dtype, (rows, *part.shape[1:]))
                    if module.overlap:
                        for half in ("prev_kv", "prev_gate"):
                            out[f"{prefix}.{i}.{tag}.{half}"] = (comp.open_kv.dtype, (module.ratio, module.width))
        out["logits"] = (torch.float32, (model.config.vocab_size,))
        if model.mtp:
            out["streams"] = (model.act_dtype, (1, model.config.hc_mult, model.config.hidden_size))
        return out

    # -- writing ------------------------------------------------------------------------

    def save(self, tokens: list[int], state: SequenceState, logits: torch.Tensor, streams: torch.Tensor | None,
             since: tuple[int, list[tuple[int, int]]] | None) -> tuple[int, list[tuple[int, int]]]:
        """Persist the state at `state.position` (aligned) as one segment on top of the one at `since`.

        `since` is what the previous save returned (position and per-stream row counts), or
        None for a segment from position 0. Returns the same for the next save. A segment that
        cannot be written (a full disk, a read-only cache) is reported through `warn`, not raised.
        """
        end = state.position
        if end % self.align:
            raise ValueError(f"segments end at multiples of {self.align}, not {end}")
        hashes = prefix_hashes(tokens[:end], self.align)
        start = since[0] if since else 0
        path = self._path(hashes[end])
        if not path.exists():
            tensors = _state_tensors(state, since[1] if since else None)
            tensors["logits"] = logits.float()
            if streams is not None:
                tensors["streams"] = streams
            tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
            meta = {"key": self.key_json, "prefix": hashes[end], "start": str(start), "end": str(end),
                    "prev": hashes.get(start, "")}
            meta["checksum"] = _checksum(meta, tensors)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(tmp), metadata=meta)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # atomic: readers see the old state or the whole segment
            except (OSError, SafetensorError) as e:
                # the run goes on; a later segment on top of this one is removed by the first reader
                _remove(tmp)
                self.warn(f"could not save the prefix of {end} tokens to {self.root} ({e}); going on without it")
        return end, row_counts(state)

    # -- reading ------------------------------------------------------------------------

    def _read(self, path: Path, hashes: dict[int, str], end: int) -> tuple[dict, dict] | None:
        """The segment that holds the prefix `hashes[end]`, verified; None (reported, and the file
        removed) if it is not exactly that."""
        try:
            with open(path, "rb") as fh:
                return self._verified(fh, path, hashes, end)
        except FileNotFoundError:
            return None  # pruned meanwhile
        except (BadSegment, OSError) as e:
            why = str(e) if isinstance(e, BadSegment) else f"is unreadable ({e})"
            self.warn(f"cache segment {path.name} {why}; removed, its prefix will be recomputed")
            _remove(path)
            return None

    def _verified(self, fh: BinaryIO, path: Path, hashes: dict[int, str], at: int) -> tuple[dict, dict]:
        meta, entries = _read_segment_header(fh, path)
        start, stop = int(meta["start"]), int(meta["end"])
        layout = self.layout(start, stop)
        found = {name: (e["dtype"], tuple(e["shape"])) for name, e in entries.items()}
        expected = {name: (_SAFETENSORS_DTYPE[dtype], shape) for name, (dtype, shape) in layout.items()}
        if start >= stop or found != expected:
            raise BadSegment(f"does not hold this model's state for tokens {start}..{stop}")
        # the layout bounds what is read: exactly the bytes such a segment has
        data = bytearray(sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()))
        if fh.readinto(data) != len(data):
            raise BadSegment("is truncated")
        tensors = {}
        for name, e in entries.items():
            begin, end = e["data_offsets"]
            dtype, shape = layout[name]
            if begin % dtype.itemsize:
                raise BadSegment(f"has misaligned data for {name}")
            flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin) if end > begin \
                else torch.empty(0, dtype=torch.uint8)
            tensors[name] = flat.view(dtype).reshape(shape)
        if meta["checksum"] != _checksum(meta, tensors):
            raise BadSegment("is damaged (checksum mismatch)")
        # an intact file: what decides reuse must match its name and the request
        if meta["key"] != self.key_json:
            raise BadSegment(f"was written under another compatibility key ({meta['key'][:200]})")
        if meta["prefix"] != hashes[at] or stop != at:
            raise BadSegment(f"holds another prefix (of {stop} tokens), not this prompt's first {at}")
        if start % self.align or meta["prev"] != hashes.get(start, ""):
            raise BadSegment(f"continues another prefix (from token {start})")
        return meta, tensors

    def _candidates(self, tokens: list[int]) -> tuple[dict[int, str], list[int]]:
        """Chained hashes of `tokens` and the boundaries with a segment of ours, longest first.
        Segments of the same prefix under another key are reported, never used."""
        hashes = prefix_hashes(tokens, self.align)
        ours, foreign = [], 0
        for end in sorted(hashes, reverse=True):
            if self._path(hashes[end]).exists():
                ours.append(end)
            elif not foreign and any(self._path(hashes[end]).parent.glob(f"{hashes[end]}-*.safetensors")):
                foreign = end
        if foreign > (ours[0] if ours else 0):
            self.warn(f"a cached prefix of {foreign} tokens exists under another compatibility key "
                      f"(other checkpoint, precision or cache format); not used")
        return hashes, ours

    def longest_prefix(self, tokens: list[int]) -> int:
        """Length of the longest prefix of `tokens` with a saved segment (0 if none; not verified)."""
        return max(self._candidates(tokens)[1], default=0)

    def load(self, tokens: list[int]) -> tuple[SequenceState, torch.Tensor, torch.Tensor | None] | None:
        """The state after the longest saved prefix of `tokens` whose whole chain verifies, or None."""
        hashes, ends = self._candidates(tokens)
        for end in ends:
            chain = self._chain(hashes, end)
            if chain:
                return self._assemble(chain)
        return None

    def _chain(self, hashes: dict[int, str], end: int) -> list[tuple[dict, dict]] | None:
        chain, paths, at = [], [], end
        while at > 0:  # each segment starts before it ends (verified), so this ends
            path = self._path(hashes[at])
            seg = self._read(path, hashes, at)
            if seg is None:
                if paths:  # they continue a segment that is gone: no prompt can use them any more
                    self.warn(f"cache segments {', '.join(p.name for p in paths)} continue a prefix whose "
                              f"segment is missing; removed")
                    for p in paths:
                        _remove(p)
                return None
            chain.append(seg)
            paths.append(path)
            try:
                os.utime(path)  # recency for pruning
            except OSError:
                pass
            at = int(seg[0]["start"])
        return chain[::-1]

    def _assemble(self, chain: list[tuple[dict, dict]]) -> tuple[SequenceState, torch.Tensor, torch.Tensor | None]:
        state = self.model.new_state(self.key["cache_format"])
        dev = self.model.device
        _, last = chain[-1]
        for i, st in enumerate(state.layers):
            st.window = last[f"layer.{i}.window"].to(dev)
            for tag, comp in (("c", st.compressor), ("i", st.indexer)):
                if comp is None:
                    continue
                n = sum(1 for k in last if k.startswith(f"layer.{i}.{tag}.rows."))
                comp.entries = Rows(comp.entries.codec, comp.entries.width, comp.entries.dtype, dev, tuple(
                    tuple(seg[f"layer.{i}.{tag}.rows.{j}"].to(dev) for j in range(n)) for _, seg in chain))
                if f"layer.{i}.{tag}.prev_kv" in last:
                    comp.prev_kv = last[f"layer.{i}.{tag}.prev_kv"].to(dev)
                    comp.prev_gate = last[f"layer.{i}.{tag}.prev_gate"].to(dev)
        for i, st in enumerate(state.mtp):
            st.window = last[f"mtp.{i}.window"].to(dev)
        state.position = int(chain[-1][0]["end"])
        state.mtp_position = state.position - 1 if state.mtp else 0
        streams = last.get("streams")
        return state, last["logits"].to(dev), None if streams is None else streams.to(dev)


# -- maintenance (v4agent cache ls|stats|prune) -------------------------------------------


def segments(root: Path | None = None) -> list[SegmentInfo]:
    """Segments whose header reads and agrees with the file's name (the tensors are checked when
    a segment is loaded, not here)."""
    out = []
    for path in sorted((root or cache_root()).glob("*/*.safetensors")):
        try:
            with open(path, "rb") as fh:
                meta, _ = _read_segment_header(fh, path)
            key = json.loads(meta["key"])
            start, end = int(meta["start"]), int(meta["end"])
            if not isinstance(key, dict) or path.stem != f"{meta['prefix']}-{_key_digest(key)}" or start >= end:
                continue
            stat = path.stat()
            out.append(SegmentInfo(path, meta["prefix"], key, start, end, meta["prev"], stat.st_size, stat.st_mtime))
        except (BadSegment, OSError, ValueError):
            continue  # reported by `stats` as unreadable and removed by prune
    return out


def stats(root: Path | None = None) -> dict:
    root = root or cache_root()
    segs = segments(root)
    files = list(root.glob("*/*.safetensors"))
    keys: dict[str, dict] = {}
    for s in segs:
        k = keys.setdefault(_key_digest(s.key), {"key": s.key, "segments": 0, "bytes": 0, "longest_prefix": 0})
        k["segments"] += 1
        k["bytes"] += s.nbytes
        k["longest_prefix"] = max(k["longest_prefix"], s.end)
    return {"root": str(root), "segments": len(segs), "bytes": sum(s.nbytes for s in segs),
            "unreadable": len(files) - len(segs), "keys": list(keys.values())}


def prune(max_bytes: int, root: Path | None = None) -> list[Path]:
    """Delete unreadable files, then least-recently-used leaf segments until under `max_bytes`."""
    root = root or cache_root()
    good = {s.path for s in segments(root)}
    removed = [p for p in root.glob("*/*.safetensors") if p not in good]
    for p in removed:
        p.unlink(missing_ok=True)
    segs = {s.path: s for s in segments(root)}
    total = sum(s.nbytes for s in segs.values())
    while total > max_bytes and segs:
        parents = {(s.prev, _key_digest(s.key)) for s in segs.values()}
        leaves = [s for s in segs.values() if (s.prefix_hash, _key_digest(s.key)) not in parents]
        victim = min(leaves or segs.values(), key=lambda s: s.last_used)  # no leaf: a cycle of forged files
        victim.path.unlink(missing_ok=True)
        removed.append(victim.path)
        total -= victim.nbytes
        del segs[victim.path]
    return removed


__all__ = ["PrefixCache", "BadSegment", "prefix_hashes", "row_counts", "segments", "stats", "prune", "cache_root"]
