"""Eval workers on Ray: the instances (or tasks) of one run spread over a Ray cluster, a local one
(`--ray local`) or an existing one (`--ray ADDRESS`, e.g. `ray://head:10001` or `auto`), running
the same per-item code as the local runner.

Each item runs as a Ray task on some node, in a private scratch output folder there; its files
come back to the driver, which writes them into the run's folder as soon as the item is done.
So nodes need no shared file system, and an interrupted run started again skips every item
that had finished (the harness says which: `finished`), like the local runner. Every node needs
v4agent installed and what the items need (git, bubblewrap or a container engine); caches
(repositories, environments) are per node. Ray is optional: `pip install 'v4agent[scale]'`.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from evals.proc import EvalError

T = TypeVar("T")
LOCAL = "local"  # --ray local: start a private cluster on this machine for the run
# The per-item records resuming trusts: written after the item's other files, so a driver killed
# while writing leaves an item that runs again rather than one that looks finished without its logs.
_WRITTEN_LAST = ("report.json", "result.json")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EvalError("--ray needs Ray: pip install 'v4agent[scale]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """A `host:port` address that accepts no connection fails now: Ray itself retries for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "local", "auto": Ray finds (or starts) the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise EvalError(f"--ray {address}: cannot connect ({e})") from None


def _work(run_one: Callable[[T, Path], dict[str, Any]], item: T) -> tuple[dict[str, Any], dict[str, bytes | str]]:
    """On a worker: the item in a scratch output folder; its record and what it left there: a
    file's bytes, or a symbolic link's target as text (a link a task made is not followed: it
    could point anywhere on the worker)."""
    with tempfile.TemporaryDirectory(prefix="v4agent-ray-") as tmp:
        record = run_one(item, Path(tmp))
        found: dict[str, bytes | str] = {}
        for path in Path(tmp).rglob("*"):
            if path.is_symlink():
                found[str(path.relative_to(tmp))] = os.readlink(path)
            elif path.is_file():
                found[str(path.relative_to(tmp))] = path.read_bytes()
    return record, found


def _write(out: Path, files: dict[str, bytes | str]) -> None:
    """Into `out` as the local runner would have left them; a path that leads out of `out` (a
    worker that is not ours) is an error."""
    root = out.resolve()
    for rel in sorted(files, key=lambda r: (Path(r).name in _WRITTEN_LAST, r)):
        path = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.resolve().parent.is_relative_to(root):
            raise EvalError(f"a Ray worker sent back {rel!r}, a path outside {out}")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".ray-partial")
        partial.unlink(missing_ok=True)
        content = files[rel]
        if isinstance(content, str):
            partial.symlink_to(content)
        else:
            partial.write_bytes(content)
        os.replace(partial, path)


def run_on_ray(items: Iterable[T], key: Callable[[T], str], run_one: Callable[[T, Path], dict[str, Any]], out: Path,
               finished: Callable[[T], dict[str, Any] | None], address: str, workers: int,
               on_done: Callable[[T, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """`run_one(item, scratch_out)` for every item not `finished`, at most `workers` at a time on
    the cluster at `address` ("local" for a private one); the records by key. `run_one` must be
    picklable (cloudpickle: closures are fine) and catch its own crashes."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        _check_reachable(address)
        try:
            ray.init(address=None if address == LOCAL else address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except Exception as e:  # noqa: BLE001 - Ray reports an unreachable cluster with several types
            raise EvalError(f"--ray {address}: cannot connect ({type(e).__name__}: {e})") from None
    try:
        records: dict[str, dict[str, Any]] = {}
        todo = []
        for item in items:
            previous = finished(item)
            if previous is None:
                todo.append(item)
            else:
                records[key(item)] = previous
                if on_done:
                    on_done(item, previous)
        task = ray.remote(num_cpus=1)(_work)
        shared = ray.put(run_one)
        waiting = iter(todo)
        pending: dict[Any, T] = {}

        def submit() -> None:
            item = next(waiting, None)
            if item is not None:
                pending[task.remote(shared, item)] = item

        for _ in range(max(1, workers)):
            submit()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(ready[0])
            record, files = ray.get(ready[0])
            _write(out, files)
            records[key(item)] = record
            if on_done:
                on_done(item, record)
            submit()
        return records
    finally:
        if started_here:
            ray.shutdown()
