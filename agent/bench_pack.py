"""The packing benchmark behind `v4agent bench pack`.

On the django 5.2.8 sdist made into a git repository (one commit, prepared once and kept), with
an issue that names a module: packing with an empty token cache (cold), packing again after
one file is edited (warm: only that file is tokenized and outlined), and with nothing changed.
Each time includes getting the prompt's token ids. Beside the wall times: the CPU seconds of
this process and the cache entries a warm pack looks up, which the load of a shared machine
moves less (or not at all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.bench_encode import DJANGO, django_sdist
from agent.pack import DEFAULT_BUDGET, PackResult, pack_repository

ISSUE = ("QuerySet.bulk_create() with update_conflicts=True ignores unique_fields on PostgreSQL; "
         "see django/db/models/query.py and the SQL compiler.")
EDITED = "django/db/models/query.py"
# Fixed identity and dates: the prepared repository gets the same commit id on every machine.
_GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@localhost", "GIT_AUTHOR_DATE": "2025-01-01T00:00:00Z",
            "GIT_COMMITTER_DATE": "2025-01-01T00:00:00Z"}


def django_repo(cache_dir: Path) -> Path:
    """The django sdist extracted and committed as a git repository, made once in `cache_dir`."""
    repo = cache_dir / f"django-{DJANGO}-repo"
    if (repo / ".git" / "v4agent-prepared").is_file():
        return repo
    sdist = django_sdist(cache_dir)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".django-repo-"))
    try:
        with tarfile.open(sdist) as archive:
            archive.extractall(staging, filter="data")  # "data": no absolute paths, no foreign owners
        (top,) = staging.iterdir()
        env = {**os.environ, **_GIT_ENV}
        for command in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", f"django {DJANGO}"]):
            subprocess.run(command, cwd=top, env=env, check=True, capture_output=True)
        (top / ".git" / "v4agent-prepared").touch()
        shutil.rmtree(repo, ignore_errors=True)
        top.rename(repo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return repo


def _timed_pack(repo: Path, tokenizer: Any, token_cache: Path) -> tuple[float, float, PackResult]:
    """Wall and CPU seconds (this process's, the tokenizer's threads included; not git's) of a pack."""
    start, cpu = time.perf_counter(), time.process_time()
    result = pack_repository(repo, issue=ISSUE, tokenizer=tokenizer, cache_dir=token_cache)
    ids = result.ids()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(ids) == result.total_tokens
    return seconds, cpu, result


def run(cache_dir: Path) -> dict[str, Any]:
    """Cold, warm-after-one-edit and unchanged packing times on the prepared django repository."""
    from runtime.tokenizer import load_tokenizer

    repo = django_repo(cache_dir)
    tokenizer = load_tokenizer()
    edited = repo / EDITED
    original = edited.read_bytes()
    with tempfile.TemporaryDirectory(prefix="v4agent-pack-bench-") as token_cache:
        cold_s, cold_cpu, cold = _timed_pack(repo, tokenizer, Path(token_cache))
        try:
            edited.write_bytes(original + b"\n# edited by v4agent bench pack\n")
            warm_s, warm_cpu, warm = _timed_pack(repo, tokenizer, Path(token_cache))
        finally:
            edited.write_bytes(original)
        unchanged_s, unchanged_cpu, unchanged = _timed_pack(repo, tokenizer, Path(token_cache))
    return {
        "corpus": f"django-{DJANGO}",
        "cores": len(os.sched_getaffinity(0)),
        "files": len(cold.files),
        "files_skipped": len(cold.skipped),
        "repo_tokens": sum(f.full_tokens for f in cold.files),
        "budget": DEFAULT_BUDGET,
        "tokens": cold.total_tokens,
        "files_full": len(cold.by_mode("full")),
        "files_outlined": len(cold.by_mode("outlined")),
        "files_dropped": len(cold.by_mode("dropped")),
        "cold_s": round(cold_s, 2),
        "cold_cpu_s": round(cold_cpu, 2),
        "cold_tokenized": cold.stats.tokenized,
        "cold_outlined": cold.stats.outlined,
        "warm_s": round(warm_s, 3),
        "warm_cpu_s": round(warm_cpu, 3),
        "warm_tokenized": warm.stats.tokenized,
        "warm_outlined": warm.stats.outlined,
        "warm_entries_read": warm.stats.entries_read,
        "unchanged_s": round(unchanged_s, 3),
        "unchanged_cpu_s": round(unchanged_cpu, 3),
        "unchanged_entries_read": unchanged.stats.entries_read,
    }
