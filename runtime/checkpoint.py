"""The official DeepSeek-V4 checkpoint layout (spec §13): inventory, a validating lazy reader, a writer.

A checkpoint directory holds sharded safetensors files named after the reference
code's modules (``layers.3.attn.wq_a.weight``; no ``model.`` prefix), an index
``model.safetensors.index.json`` (or one ``model.safetensors``), ``config.json``,
``generation_config.json`` and the tokenizer files.

Stored formats (§13.3):

* most projections: FP8 e4m3 ``X.weight`` plus ``X.scale``, one ue8m0 scale per 128x128 block;
* routed experts (``expert_dtype == "fp4"``): FP4 e2m1 packed two per byte (``I8``),
  plus ``X.scale`` with one ue8m0 scale per 32 inputs of a row;
* compressors, router, embedding, head, norms: BF16; sinks, ``ape``, mHC, router bias: F32;
* hash-routing tables ``tid2eid``: I64.

"Logical" names are the stored names minus the ``.scale`` entries; a logical tensor
is the dequantized weight (:meth:`Checkpoint.tensor`). The writer takes logical
weights and quantizes them, so ``write -> read`` reproduces the quantized values
bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.config import CSA, ModelConfig, load_config, tiny_config
from runtime.quant import dequantize_fp4_rows, dequantize_fp8_blocks, quantize_fp4_rows, quantize_fp8_blocks
from runtime.tokenizer import packaged_tokenizer_files

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 2**30

BYTES_PER_ELEMENT = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
                "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8, "I64": torch.int64}
# safetensors refuses headers above 100 MB; a larger length field means a damaged file
_MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that does not match the official layout; the message names the tensor and file."""


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: safetensors dtype string and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BYTES_PER_ELEMENT[self.dtype]

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """Shape of the dequantized tensor: packed FP4 holds two values per byte."""
        return self.shape[:-1] + (2 * self.shape[-1],) if self.dtype == "I8" else self.shape


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- inventory ------------------------------------------------------------------------

def inventory(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for ``config``, in a stable order (§13.2)."""
    c = config
    d, hc = c.hidden_size, c.hc_mult
    inv: dict[str, TensorSpec] = {}

    def put(name: str, dtype: str, *shape: int) -> None:
        inv[name] = TensorSpec(dtype, tuple(shape))

    def fp8(name: str, rows: int, cols: int) -> None:
        put(f"{name}.weight", "F8_E4M3", rows, cols)
        put(f"{name}.scale", "F8_E8M0", _cdiv(rows, 128), _cdiv(cols, 128))

    def expert(name: str, rows: int, cols: int) -> None:
        if c.expert_dtype == "fp8":
            fp8(name, rows, cols)
        else:
            put(f"{name}.weight", "I8", rows, cols // 2)
            put(f"{name}.scale", "F8_E8M0", rows, cols // 32)

    def compressor(p: str, rate: int, width: int, overlap: bool) -> None:
        # overlapping (CSA-type) windows pool two halves per token: twice the projection width
        cw = (2 if overlap else 1) * width
        put(f"{p}.ape", "F32", rate, cw)
        put(f"{p}.wkv.weight", "BF16", cw, d)
        put(f"{p}.wgate.weight", "BF16", cw, d)
        put(f"{p}.norm.weight", "BF16", width)

    def block(p: str, attn_type: str | None, rate: int, hashed: bool) -> None:
        mix = (2 + hc) * hc
        for sub in ("attn", "ffn"):
            put(f"{p}.hc_{sub}_fn", "F32", mix, hc * d)
            put(f"{p}.hc_{sub}_base", "F32", mix)
            put(f"{p}.hc_{sub}_scale", "F32", 3)
        put(f"{p}.attn_norm.weight", "BF16", d)
        put(f"{p}.ffn_norm.weight", "BF16", d)
        a = f"{p}.attn"
        put(f"{a}.attn_sink", "F32", c.num_attention_heads)
        fp8(f"{a}.wq_a", c.q_lora_rank, d)
        put(f"{a}.q_norm.weight", "BF16", c.q_lora_rank)
        fp8(f"{a}.wq_b", c.num_attention_heads * c.head_dim, c.q_lora_rank)
        fp8(f"{a}.wkv", c.head_dim, d)
        put(f"{a}.kv_norm.weight", "BF16", c.head_dim)
        fp8(f"{a}.wo_a", c.o_groups * c.o_lora_rank, c.num_attention_heads * c.head_dim // c.o_groups)
        fp8(f"{a}.wo_b", d, c.o_groups * c.o_lora_rank)
        if attn_type is not None:
            compressor(f"{a}.compressor", rate, c.head_dim, overlap=attn_type == CSA)
        if attn_type == CSA:
            fp8(f"{a}.indexer.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank)
            put(f"{a}.indexer.weights_proj.weight", "BF16", c.index_n_heads, d)
            compressor(f"{a}.indexer.compressor", rate, c.index_head_dim, overlap=True)
        f = f"{p}.ffn"
        put(f"{f}.gate.weight", "BF16", c.n_routed_experts, d)
        if hashed:
            put(f"{f}.gate.tid2eid", "I64", c.vocab_size, c.num_experts_per_tok)
        else:
            put(f"{f}.gate.bias", "F32", c.n_routed_experts)
        inter = c.moe_intermediate_size
        for e in range(c.n_routed_experts):
            expert(f"{f}.experts.{e}.w1", inter, d)
            expert(f"{f}.experts.{e}.w3", inter, d)
            expert(f"{f}.experts.{e}.w2", d, inter)
        fp8(f"{f}.shared_experts.w1", inter, d)
        fp8(f"{f}.shared_experts.w3", inter, d)
        fp8(f"{f}.shared_experts.w2", d, inter)

    def hc_head(p: str) -> None:
        put(f"{p}hc_head_fn", "F32", hc, hc * d)
        put(f"{p}hc_head_base", "F32", hc)
        put(f"{p}hc_head_scale", "F32", 1)

    put("embed.weight", "BF16", c.vocab_size, d)
    put("head.weight", "BF16", c.vocab_size, d)
    put("norm.weight", "BF16", d)
    hc_head("")
    for layer in range(c.num_hidden_layers):
        rate = c.compress_ratio(layer)
        block(f"layers.{layer}", c.layer_types[layer] if rate else None, rate, c.is_hash_layer(layer))
    for j in range(c.num_nextn_predict_layers):
        # the MTP block: sliding-window attention, learned routing, its own projections and head mixer
        p = f"mtp.{j}"
        block(p, None, 0, False)
        fp8(f"{p}.e_proj", d, d)
        fp8(f"{p}.h_proj", d, d)
        for norm in ("enorm", "hnorm", "norm"):
            put(f"{p}.{norm}.weight", "BF16", d)
        hc_head(f"{p}.")
    return inv


def logical_names(inv: Mapping[str, TensorSpec]) -> list[str]:
    """The inventory's names without the ``.scale`` entries, in inventory order."""
    return [n for n in inv if not _is_scale(n, inv)]


def _is_scale(name: str, inv: Mapping[str, TensorSpec]) -> bool:
    return name.endswith(".scale") and inv[name].dtype == "F8_E8M0"


def _scale_of(name: str) -> str:
    return name.removesuffix(".weight") + ".scale"


# -- reading ------------------------------------------------------------------------

def _read_header(file: Path) -> dict[str, dict]:
    """A shard's tensor entries, after checking that the file really holds their bytes."""
    with open(file, "rb") as fh:
        return read_header(fh, os.fstat(fh.fileno()).st_size, file)[1]


def read_header(fh: BinaryIO, size: int, file: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """The metadata and tensor entries of a safetensors file open at offset 0 (`size` bytes), after
    checking what safetensors itself will: the tensors' data lie back to back, from the start of the
    data section to its end, each as long as its dtype and shape say. Raises CheckpointError naming
    the tensor and `file`; never reads more than the header."""
    head = fh.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > _MAX_HEADER_BYTES:
        raise CheckpointError(f"{file}: unreadable safetensors header (header length field {n})")
    if 8 + n > size:
        raise CheckpointError(f"{file}: truncated shard: header needs {8 + n} bytes, file has {size}")
    try:
        header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: unreadable safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: unreadable safetensors header (metadata is not a map of strings)")
    data_bytes = size - 8 - n
    entries: dict[str, dict] = {}
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], [int(x) for x in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            if not isinstance(dtype, str) or min(shape, default=0) < 0 or not 0 <= begin <= end:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{file}: unreadable safetensors header entry for tensor '{name}'") from None
        if end > data_bytes:
            raise CheckpointError(f"tensor '{name}' in {file}: truncated shard: its data ends at byte {end} "
                                  f"of the data section, which holds only {data_bytes} bytes")
        if dtype in BYTES_PER_ELEMENT and end - begin != prod(shape) * BYTES_PER_ELEMENT[dtype]:
            raise CheckpointError(f"tensor '{name}' in {file}: {end - begin} data bytes do not match "
                                  f"{dtype} {shape}")
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    # safetensors refuses overlaps, gaps and trailing bytes when a tensor is first read; say so now,
    # with the file's name
    at, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda e: e[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        if begin != at:
            how = f"overlaps tensor '{previous}' (which ends at byte {at})" if begin < at else \
                f"leaves a gap after byte {at}"
            raise CheckpointError(f"tensor '{name}' in {file}: its data (bytes {begin}..{end} of the data "
                                  f"section) {how}")
        at, previous = end, name
    if at != data_bytes:
        raise CheckpointError(f"{file}: {data_bytes - at} bytes after the data of the last tensor, "
                              f"'{previous}', belong to no tensor")
    return metadata, entries


def _looks_hf(name: str) -> bool:
    return name.startswith(("model.", "lm_head.")) or name.endswith("weight_scale_inv")


def _is_mtp_duplicate(name: str) -> bool:
    # the reference's convert.py drops MTP copies of the embedding/head (the block shares the main ones)
    return name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight"))


def _shard_files(root: Path) -> tuple[dict[str, Path], Path]:
    """``{tensor name: shard}`` as the index claims it, and the file that makes the claim."""
    index = root / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: unreadable index (expected a JSON object with a 'weight_map')") from None
        return {name: root / file for name, file in weight_map.items()}, index
    single = root / SINGLE_FILE
    if single.exists():
        return {name: single for name in _read_header(single)}, single
    raise CheckpointError(f"{root}: no {INDEX_FILE} or {SINGLE_FILE}")


def _check(stored: dict[str, tuple[Path, dict]], source: Path, inv: Mapping[str, TensorSpec]) -> list[str]:
    """Every difference between the stored tensors and the inventory, as messages."""
    problems = []
    for name, (file, entry) in stored.items():
        spec = inv.get(name)
        if spec is None:
            problems.append(f"unexpected tensor '{name}' in {file} (not part of the V4 layout for this config)")
        elif entry["dtype"] != spec.dtype:
            problems.append(f"tensor '{name}' in {file} has dtype {entry['dtype']}, expected {spec.dtype}")
        elif tuple(entry["shape"]) != spec.shape:
            problems.append(f"tensor '{name}' in {file} has shape {list(entry['shape'])}, "
                            f"expected {list(spec.shape)}")
    problems += [f"tensor '{name}' is missing (not in {source})" for name in inv if name not in stored]
    return problems


def logical_tensor(name: str, inv: Mapping[str, TensorSpec], raw: Callable[[str], torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A logical weight from stored tensors (`raw(name)`): FP8/FP4 dequantized with their scales,
    others cast to ``dtype``; int64 (``tid2eid``) returned as stored."""
    spec = inv[name]
    if spec.dtype == "I64":
        return raw(name)
    if spec.dtype == "F8_E4M3":
        return dequantize_fp8_blocks(raw(name), raw(_scale_of(name))).to(dtype)
    if spec.dtype == "I8":
        return dequantize_fp4_rows(raw(name), raw(_scale_of(name))).to(dtype)
    return raw(name).to(dtype)


class Checkpoint:
    """A validated checkpoint; tensors are read lazily from memory-mapped shards."""

    def __init__(self, path: Path, config: ModelConfig, inv: dict[str, TensorSpec], files: dict[str, Path]):
        self.path = path
        self.config = config
        self.inventory = inv
        self._files = files
        self._handles: dict[Path, object] = {}
        self._names = logical_names(inv)

    def names(self) -> list[str]:
        """Logical tensor names (no ``.scale`` entries), in inventory order."""
        return list(self._names)

    def raw(self, name: str) -> torch.Tensor:
        """A tensor exactly as stored (FP8, packed FP4 as int8, ue8m0 scales, ...)."""
        if name not in self._files:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.path}")
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(name)

    def raw_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (`dim` 0) or columns (`dim` 1) start:stop of a tensor as stored, read from the
        memory-mapped shard without reading the rest (a rank's part, runtime.distributed)."""
        if name not in self._files:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.path}")
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        part = self._handles[file].get_slice(name)
        return part[start:stop] if dim == 0 else part[:, start:stop]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The logical (dequantized) tensor in ``dtype``; ``tid2eid`` stays int64."""
        if name not in self.inventory or _is_scale(name, self.inventory):
            raise KeyError(f"{name!r} is not a logical tensor of checkpoint {self.path}")
        return logical_tensor(name, self.inventory, self.raw, dtype)

    def identity(self) -> str:
        """A digest of everything that decides this checkpoint's outputs: the config and the full
        content of every shard (see :func:`file_digest` for what makes this cheap after the first time)."""
        h = hashlib.sha256(f"v4agent-checkpoint-identity-{IDENTITY_VERSION}\0".encode())
        h.update(json.dumps(self.config.to_hf_dict(), sort_keys=True).encode())
        shards = sorted(set(self._files.values()))
        with ThreadPoolExecutor(max_workers=min(len(shards), os.cpu_count() or 1, 8)) as pool:
            digests = list(pool.map(file_digest, shards))  # hashlib lets go of the GIL: shards in parallel
        for shard, digest in zip(shards, digests):
            h.update(f"\0{shard.name}\0{digest}".encode())
        return h.hexdigest()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | Path, config: ModelConfig | None = None) -> Checkpoint:
    """Open a checkpoint directory and check every tensor against :func:`inventory`.

    Raises :class:`CheckpointError` for a missing, extra, mis-shaped or mistyped
    tensor, a shard the index lists but that is absent, a truncated shard, an
    unreadable header or an index that disagrees with its shards; ``ConfigError``
    for a bad config.json.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    config = config or load_config(root)
    claimed, source = _shard_files(root)
    stored: dict[str, tuple[Path, dict]] = {}
    for file in dict.fromkeys(claimed.values()):
        if not file.exists():
            first = next(n for n, f in claimed.items() if f == file)
            raise CheckpointError(f"shard {file.name} listed in {source} is missing (holds tensor '{first}')")
        for name, entry in _read_header(file).items():
            if claimed.get(name) != file:
                raise CheckpointError(f"tensor '{name}' in {file} is not listed for that file in {source}")
            stored[name] = (file, entry)
    hf_names = [n for n in stored if _looks_hf(n)]
    if hf_names:
        raise CheckpointError(
            f"tensor '{hf_names[0]}' in {stored[hf_names[0]][0]} uses HF/transformers naming; v4agent reads the "
            f"official DeepSeek-V4 layout (e.g. 'layers.0.attn.wq_a.weight' with a '.scale' sibling), as released "
            f"in the deepseek-ai/DeepSeek-V4-* repositories")
    absent = [n for n in claimed if n not in stored]
    if absent:
        raise CheckpointError(f"tensor '{absent[0]}' listed in {source} for {claimed[absent[0]].name} "
                              f"is not in that file")
    stored = {n: v for n, v in stored.items() if not _is_mtp_duplicate(n)}
    inv = inventory(config)
    problems = _check(stored, source, inv)
    if problems:
        more = f" (and {len(problems) - 1} more problems, e.g. {problems[1]})" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    return Checkpoint(root, config, inv, {n: f for n, (f, _) in stored.items()})


# -- content digests, remembered -------------------------------------------------------

IDENTITY_VERSION = "2"
# A digest is remembered only for a file whose status last changed this long before it was hashed:
# a write in the same timestamp tick as the status we saw would otherwise go unnoticed.
_SETTLED_NS = 1_000_000_000
_READ_CHUNK = 16 * 2**20


def digest_store() -> Path:
    """Where file digests are remembered: `$V4AGENT_CACHE/file-digests` (default ~/.cache/v4agent)."""
    return Path(os.environ.get("V4AGENT_CACHE") or Path.home() / ".cache" / "v4agent") / "file-digests"


def _status(file: Path) -> dict[str, int]:
    """What identifies one version of a file's bytes without reading them (not its path: a moved
    checkpoint keeps its digests). The change time is there because only the kernel sets it: an
    in-place edit that puts the old modification time back (utime) still moves it."""
    st = os.stat(file)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _record_check(status: dict, digest: str) -> str:
    return hashlib.sha256(json.dumps([status, digest], sort_keys=True).encode()).hexdigest()


def file_digest(file: Path) -> str:
    """sha256 of a file's bytes, remembered in :func:`digest_store` for this version of the file
    (device, inode, size, modification and change times); a remembered record that does not
    verify is reported (a RuntimeWarning), removed and recomputed."""
    status = _status(file)
    record_file = digest_store() / hashlib.sha256(json.dumps(status, sort_keys=True).encode()).hexdigest()[:40]
    try:
        with open(record_file, "rb") as f:
            record = json.loads(f.read(4096))
        if record["status"] == status and record["check"] == _record_check(status, record["sha256"]):
            return record["sha256"]
        problem = f"does not match its file {file}"
    except FileNotFoundError:
        problem = ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"is unreadable ({e!r})"
    if problem:
        warnings.warn(f"remembered digest {record_file} {problem}; removed, hashing again", RuntimeWarning,
                      stacklevel=2)
        _remove(record_file)
    started = time.time_ns()
    h = hashlib.sha256()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(file, "rb") as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    digest = h.hexdigest()
    if _status(file) == status and started - status["ctime_ns"] >= _SETTLED_NS:
        tmp = record_file.with_name(f".{record_file.name}.{os.getpid()}.tmp")
        try:
            record_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"status": status, "sha256": digest, "check": _record_check(status, digest)}))
            os.replace(tmp, record_file)
        except OSError:
            _remove(tmp)  # a read-only cache only costs hashing again next time
    return digest


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # not ours to remove: it is checked (and ignored) again next time


# -- writing ------------------------------------------------------------------------

def _encode(name: str, w: torch.Tensor, inv: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """One logical weight -> its stored tensor(s)."""
    spec = inv[name]
    if tuple(w.shape) != spec.logical_shape:
        raise CheckpointError(f"weight '{name}' has shape {list(w.shape)}, expected {list(spec.logical_shape)}")
    if spec.dtype == "F8_E4M3":
        q, s = quantize_fp8_blocks(w)
        return {name: q, _scale_of(name): s}
    if spec.dtype == "I8":
        q, s = quantize_fp4_rows(w)
        return {name: q, _scale_of(name): s}
    if spec.dtype == "I64" and w.is_floating_point():
        raise CheckpointError(f"weight '{name}' must be an integer tensor, got {w.dtype}")
    return {name: w.to(TORCH_DTYPES[spec.dtype]).contiguous()}


def encode_weights(config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logical weights -> the stored tensors of the official layout (inventory order), quantized.

    ``weights`` must hold exactly the logical names of :func:`inventory` with their
    logical (dequantized) shapes.
    """
    inv = inventory(config)
    names = logical_names(inv)
    missing = [n for n in names if n not in weights]
    if missing:
        raise CheckpointError(f"weight '{missing[0]}' is missing ({len(missing)} missing in all)")
    extra = [n for n in weights if n not in inv or _is_scale(n, inv)]
    if extra:
        raise CheckpointError(f"weight '{extra[0]}' is not a logical tensor of the V4 layout for this config")
    stored: dict[str, torch.Tensor] = {}
    for name in names:
        stored.update(_encode(name, weights[name], inv))
    return stored


def write_checkpoint(path: str | Path, config: ModelConfig, weights: Mapping[str, torch.Tensor], *,
                     shard_size_bytes: int = DEFAULT_SHARD_BYTES, metadata: Mapping[str, str] | None = None,
                     overwrite: bool = False) -> Path:
    """Write logical weights (the names :meth:`Checkpoint.tensor` returns) in the official layout.

    Weights are quantized per the inventory and written as ``model-0000i-of-0000N.safetensors``
    shards of at most ``shard_size_bytes`` (a single larger tensor gets its own shard), with
    the index, ``config.json``, ``generation_config.json`` and the tokenizer files.
    ``metadata`` goes into every shard's safetensors header. Everything is written into a
    sibling temporary directory that replaces ``path`` only when complete. A non-empty
    ``path`` is refused unless ``overwrite``.
    """
    root = Path(path)
    if root.exists() and not overwrite and (not root.is_dir() or any(root.iterdir())):
        raise CheckpointError(f"{root} exists and is not empty; refusing to overwrite it "
                              f"(overwrite=True, or --force on the command line, replaces it)")
    stored = encode_weights(config, weights)
    shards: list[list[str]] = [[]]
    used = 0
    for name, t in stored.items():
        size = t.numel() * t.element_size()
        if shards[-1] and used + size > shard_size_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: stored[n] for n in shard}, str(tmp / file), metadata={"format": "pt", **(metadata or {})})
            os.chmod(tmp / file, 0o666 & ~_umask())  # safetensors writes 0600; the other files follow the umask
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in stored.values())
        _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", config.to_hf_dict())
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "do_sample": True, "temperature": 1.0, "top_p": 1.0})
        for f in packaged_tokenizer_files():
            shutil.copyfile(f, tmp / f.name)
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _write_json(file: Path, obj: object) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory into place; an old one is moved aside first, then deleted."""
    if target.is_dir() and any(target.iterdir()):
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        if target.exists() and not target.is_dir():
            target.unlink()
        new.rename(target)  # rename(2) replaces an empty directory atomically


# -- random weights -------------------------------------------------------------------

def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Logical float32 weights for tests: every parameter non-trivial, scaled to keep activations O(1).

    Sinks, ``ape``, mHC base/scale and router bias are random (not zero) so that every
    code path contributes; norms are near 1; matrices are ``randn / sqrt(fan_in)``; each
    ``tid2eid`` row holds distinct random experts.
    """
    g = torch.Generator().manual_seed(seed)
    inv = inventory(config)
    out: dict[str, torch.Tensor] = {}
    for name in logical_names(inv):
        shape = inv[name].logical_shape
        if name.endswith("tid2eid"):
            picks = torch.rand((shape[0], config.n_routed_experts), generator=g).argsort(dim=-1)
            out[name] = picks[:, : shape[1]].contiguous()
        elif name.endswith("attn_sink") or name.endswith(".ape"):
            out[name] = 0.5 * torch.randn(shape, generator=g)
        elif name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("_scale"):  # mHC scales (not the '.scale' quantization entries)
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("_base"):
            out[name] = 0.3 * torch.randn(shape, generator=g)
        elif name.endswith("gate.bias"):
            out[name] = 0.05 * torch.randn(shape, generator=g)
        elif len(shape) == 2:
            out[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        else:
            out[name] = 0.1 * torch.randn(shape, generator=g)
    return out


def make_tiny(path: str | Path, config: ModelConfig | None = None, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a random checkpoint for ``config`` (default :func:`runtime.config.tiny_config`).

    Shards are kept small (64 MiB) so that even tiny checkpoints exercise the index.
    """
    config = config or tiny_config()
    return write_checkpoint(path, config, random_weights(config, seed), shard_size_bytes=64 * 2**20,
                            metadata={"generator": "v4agent make-tiny", "seed": str(seed)}, overwrite=overwrite)


__all__ = ["CheckpointError", "TensorSpec", "Checkpoint", "inventory", "logical_names", "open_checkpoint",
           "encode_weights", "write_checkpoint", "random_weights", "make_tiny", "INDEX_FILE", "SINGLE_FILE",
           "BYTES_PER_ELEMENT", "read_header", "file_digest", "digest_store"]
