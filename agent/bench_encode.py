"""The encoding benchmark behind `v4agent bench encode`.

Measured in one run, side by side: the tokenizer's own batch encoding of the corpus files
(the ceiling), our prompt encoder on the same files cold and with its token cache warm, the
time to re-encode a ~1M-token tool conversation after one more turn, and the DSML parser on
a ~1 MB completion streamed token by token.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.dsml import DsmlParser, parse_completion
from runtime.encoding import PromptEncoder, PromptSettings, TokenCache, render_completion, render_prompt, wrap_file

DJANGO = "5.2.8"
MAX_FILE_BYTES = 1_000_000  # larger files are data, not source; a packer skips them too
TOOLS = [
    {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(properties)},
    }}
    for name, description, properties in (
        ("read_file", "Read a file of the repository.", {"path": {"type": "string"}}),
        ("write_file", "Replace a file's content.", {"path": {"type": "string"}, "content": {"type": "string"}}),
    )
]


def django_sdist(cache_dir: Path) -> Path:
    """The django sdist, downloaded once into `cache_dir` with pip."""
    path = cache_dir / f"django-{DJANGO}.tar.gz"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"django=={DJANGO}",
             "-d", str(cache_dir)],
            check=True, capture_output=True,
        )
    return path


def read_corpus(path: Path) -> dict[str, str]:
    """The UTF-8 text files (at most 1 MB each) of a directory or a .tar.gz, by relative path."""
    raw: dict[str, bytes] = {}
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.stat().st_size <= MAX_FILE_BYTES:
                raw[file.relative_to(path).as_posix()] = file.read_bytes()
    else:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile() and member.size <= MAX_FILE_BYTES:
                    raw[member.name] = archive.extractfile(member).read()  # type: ignore[union-attr]
    files = {}
    for name, data in raw.items():
        try:
            files[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _repository_prompt(files: dict[str, str]) -> list[dict[str, Any]]:
    body = "".join(wrap_file(path, text) for path, text in files.items())
    return [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": body}]


def bench_corpus(files: dict[str, str], tokenizer: Any, runs: int = 2) -> tuple[dict[str, Any], TokenCache]:
    """Tokens/s: the tokenizer's batch encoding of the bare files, our encoder cold (empty cache)
    and warm (cache filled), on the whole repository as one prompt. Best of `runs`."""
    texts = list(files.values())
    messages = _repository_prompt(files)
    hf, cold = [], []
    for _ in range(runs):
        seconds, encoded = _timed(lambda: tokenizer.encode_batch(texts))
        hf.append(sum(map(len, encoded)) / seconds)
        encoder = PromptEncoder(tokenizer)
        seconds, ids = _timed(lambda: encoder.encode(messages))
        cold.append(len(ids) / seconds)
    cache = encoder.cache
    seconds, warm_ids = _timed(lambda: PromptEncoder(tokenizer, cache=cache).encode(messages))
    assert warm_ids == ids
    result = {
        "corpus_files": len(files),
        "corpus_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 2),
        "corpus_tokens": len(ids),
        "hf_encode_batch_tokens_per_s": round(max(hf)),
        "encode_tokens_per_s_cold": round(max(cold)),
        "encode_tokens_per_s_warm": round(len(ids) / seconds),
        "cold_vs_hf_batch": round(max(cold) / max(hf), 3),
        "warm_vs_cold": round(len(ids) / seconds / max(cold), 1),
    }
    return result, cache


def _read_turn(n: int, path: str, text: str) -> list[dict[str, Any]]:
    call_id = f"call_{n}"
    arguments = json.dumps({"path": path})
    return [
        {"role": "assistant", "reasoning_content": f"Next I need {path}.", "content": "",
         "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "read_file", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": text},
    ]


def bench_append(files: dict[str, str], tokenizer: Any, counts: TokenCache, target_tokens: int,
                 appends: int = 5) -> dict[str, Any]:
    """Milliseconds to re-encode a `target_tokens` tool conversation after one more turn (a tool
    call and a file it has not seen), median of `appends` turns; checked against encoding the
    final prompt whole."""
    items = list(files.items())
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a coding agent.", "tools": TOOLS},
        {"role": "user", "content": "Review this repository."},
    ]
    total, n = 0, 0
    while total < target_tokens:
        path, text = items[n % len(items)]
        messages += _read_turn(n, path, text)
        total += len(counts.encode_pieces([text])[0]) + 40  # + the call around it
        n += 1
    encoder = PromptEncoder(tokenizer)
    ids = encoder.encode(messages)
    conversation_tokens = len(ids)
    times, added = [], []
    for k in range(appends):
        path, text = items[(n + k) % len(items)]
        # A header makes the result new text even when the corpus is smaller than the conversation.
        messages += _read_turn(n + k, path, f"# turn {n + k}\n{text}")
        before = len(ids)
        seconds, ids = _timed(lambda: encoder.encode(messages))
        times.append(seconds * 1e3)
        added.append(len(ids) - before)
    return {
        "conversation_tokens": conversation_tokens,
        "append_turn_ms": round(statistics.median(times), 1),
        "append_turn_tokens": round(statistics.median(added)),
        "append_matches_full_encode": ids == tokenizer.encode(render_prompt(messages)),
    }


def bench_parse(files: dict[str, str], tokenizer: Any, nbytes: int) -> dict[str, Any]:
    """Seconds to parse a ~`nbytes` completion (reasoning, then a write_file call carrying
    source code) fed one token's text at a time, and fed whole."""
    texts = [t for t in files.values() if "｜" not in t and "think>" not in t]
    corpus, size = [], 0
    for text in texts:
        corpus.append(text)
        size += len(text.encode())
        if size >= nbytes:
            break
    body = "".join(corpus)
    split = len(body) // 3
    message = {
        "role": "assistant", "reasoning_content": body[:split], "content": "Here is the new file.",
        "tool_calls": [{"type": "function", "function": {
            "name": "write_file", "arguments": json.dumps({"path": "big.py", "content": body[split:]})}}],
    }
    completion = render_completion(message, PromptSettings())
    decode = tokenizer.stream_decoder()
    pieces = [decode(i) for i in tokenizer.encode(completion)]

    def streamed():
        parser = DsmlParser()
        for piece in pieces:
            parser.feed(piece)
        return parser.finish()

    stream_s, parsed = _timed(streamed)
    whole_s, whole = _timed(lambda: parse_completion(completion))
    assert parsed == whole and not parsed.errors and len(parsed.tool_calls) == 1
    return {
        "parse_bytes": len(completion.encode()),
        "parse_chunks": len(pieces),
        "parse_1mb_s": round(stream_s * 1e6 / len(completion.encode()), 3),
        "parse_1mb_oneshot_s": round(whole_s * 1e6 / len(completion.encode()), 3),
    }


def run(corpus: Path, conversation_tokens: int = 1_000_000, parse_bytes: int = 1_000_000) -> dict[str, Any]:
    """All measurements on the files of `corpus` (a directory or .tar.gz)."""
    from runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    files = read_corpus(corpus)
    if not files:
        raise ValueError(f"{corpus} holds no UTF-8 text files")
    result: dict[str, Any] = {"corpus": corpus.name, "cores": len(os.sched_getaffinity(0))}
    corpus_result, cache = bench_corpus(files, tokenizer)
    result.update(corpus_result)
    result.update(bench_append(files, tokenizer, cache, conversation_tokens))
    result.update(bench_parse(files, tokenizer, parse_bytes))
    return result
