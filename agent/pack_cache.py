"""An on-disk store of token ids and small JSON records, keyed by name (the packer uses git
blob ids), so unchanged files are never tokenized twice.

Layout: `<root>/pack/<namespace>/v2/<key[:2]>/<key>`. An entry is a 4-byte magic, a 16-byte
checksum (SHA-256, truncated, over the namespace, the key and the payload), then the payload: ids as raw
native uint32 (one array, or several: their count and lengths first), or UTF-8 JSON. An entry is
used only when its checksum matches the key it is read under: a torn, truncated, edited or
swapped entry is reported (a RuntimeWarning), removed, and counts as missing, so the caller
rebuilds it. Writes go to a temporary file that is renamed
into place: a crash leaves either the old entry or the new one, never half of one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ITEM = array("I").itemsize  # 4 on every platform we run on
_MAGIC = b"v4t\x02"
_SUM = 16
_HEAD = len(_MAGIC) + _SUM  # a multiple of 4: the ids that follow stay aligned
_MAX_PAYLOAD = 64 * 2**20  # far above any entry the packer writes (files are <= 1 MB): reads stay bounded


def cache_root() -> Path:
    """`$V4AGENT_CACHE`, else ~/.cache/v4agent."""
    return Path(os.environ.get("V4AGENT_CACHE") or Path.home() / ".cache" / "v4agent")


@functools.lru_cache(maxsize=8)
def file_fingerprint(path: Path, mtime_ns: int, size: int) -> str:
    """A short content hash of a file (callers pass mtime and size so a changed file is rehashed)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def fingerprint(path: Path) -> str:
    """A short content hash of the file at `path`, computed once per version of the file."""
    stat = path.stat()
    return file_fingerprint(path, stat.st_mtime_ns, stat.st_size)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class TokenStore:
    """Token ids and JSON records under one namespace directory; `warn` hears of every entry
    that failed its check (default: a RuntimeWarning)."""

    def __init__(self, directory: Path, warn: Callable[[str], None] = _warn) -> None:
        self.directory = directory
        self.warn = warn
        self._namespace = directory.name.encode()
        self._made: set[str] = set()
        self.reads = 0  # entries looked up (found or not): what a warm pack costs, whatever the load

    def _path(self, key: str) -> str:
        # Plain strings: this runs for every file of a repository on every pack, and pathlib
        # would cost more than the stat itself.
        return f"{self.directory}/v2/{key[:2]}/{key}"

    def _checksum(self, key: str, payload: bytes | memoryview) -> bytes:
        h = hashlib.sha256(self._namespace + b"\0" + key.encode() + b"\0")
        h.update(payload)
        return h.digest()[:_SUM]

    def _read(self, key: str) -> memoryview | None:
        """The payload stored under `key` if its entry checks out; None when there is none. A bad
        entry is reported and removed."""
        path = self._path(key)
        self.reads += 1
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > _HEAD + _MAX_PAYLOAD:
                    return self._discard(path, f"is larger than any entry ({_MAX_PAYLOAD} bytes)")
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._discard(path, f"is unreadable ({e})")
        if len(data) < _HEAD or data[:len(_MAGIC)] != _MAGIC:
            return self._discard(path, "is not an entry of this cache")
        payload = memoryview(data)[_HEAD:]
        if data[len(_MAGIC):_HEAD] != self._checksum(key, payload):
            return self._discard(path, "does not match its checksum (damaged, edited or not made for this key)")
        return payload

    def _discard(self, path: str, why: str) -> None:
        self.warn(f"token cache entry {path} {why}; removed, it will be rebuilt")
        try:
            os.unlink(path)
        except OSError:
            pass
        return None

    def count(self, key: str) -> int | None:
        """How many ids are stored under `key`, or None when there is no (good) entry."""
        payload = self._ids_payload(key)
        return None if payload is None else len(payload) // _ITEM

    def load_ids(self, key: str) -> array:
        """The ids stored under `key` (KeyError when missing or bad)."""
        payload = self._ids_payload(key)
        if payload is None:
            raise KeyError(key)
        ids = array("I")
        ids.frombytes(payload)
        return ids

    def _ids_payload(self, key: str) -> memoryview | None:
        payload = self._read(key)
        if payload is not None and len(payload) % _ITEM:
            return self._discard(self._path(key), "holds a partial token id")
        return payload

    def save_ids(self, key: str, ids: Sequence[int]) -> None:
        self._write(key, array("I", ids).tobytes())

    def load_arrays(self, key: str) -> list[array] | None:
        """The id arrays stored together under `key` (save_arrays), or None when missing or bad."""
        payload = self._ids_payload(key)
        if payload is None:
            return None
        ids = array("I")
        ids.frombytes(payload)
        n = ids[0] if ids else -1
        if n < 0 or len(ids) < 1 + n or 1 + n + sum(ids[1:1 + n]) != len(ids):
            return self._discard(self._path(key), "is not a list of id arrays")
        arrays, at = [], 1 + n
        for length in ids[1:1 + n]:
            arrays.append(ids[at:at + length])
            at += length
        return arrays

    def save_arrays(self, key: str, arrays: Sequence[Sequence[int]]) -> None:
        """Several id arrays as one entry: how many, their lengths, then each in turn."""
        out = array("I", [len(arrays), *(len(a) for a in arrays)])
        for a in arrays:
            out.extend(a)
        self._write(key, out.tobytes())

    def load_json(self, key: str) -> Any:
        """The JSON value stored under `key`, or None when missing or bad."""
        payload = self._read(key)
        if payload is None:
            return None
        try:
            return json.loads(bytes(payload))
        except ValueError:
            return self._discard(self._path(key), "holds no JSON")

    def save_json(self, key: str, value: Any) -> None:
        self._write(key, json.dumps(value, ensure_ascii=False).encode())

    def _write(self, key: str, data: bytes) -> None:
        target = self._path(key)
        folder = os.path.dirname(target)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(_MAGIC + self._checksum(key, data) + data)
            os.replace(temp, target)
        except BaseException:
            os.unlink(temp)
            raise
