"""SWE-bench instances and predictions in the official schema.

Instances come as the Hugging Face dataset files are distributed (Parquet, e.g.
`data/test-00000-of-00001.parquet` of SWE-bench Verified; JSON or JSONL), as JSON (a list, or
one object), or a directory: the dataset's own folder (its `.parquet`/`.json`/`.jsonl` files,
found recursively) or one subdirectory per instance holding `instance.json` (long fields may
sit beside it as `patch.diff`, `test_patch.diff`, `problem_statement.md`, `eval_script.sh`).
FAIL_TO_PASS / PASS_TO_PASS are lists or, as the official dataset stores them, JSON strings.
Parquet is read with pyarrow (the `scale` extra; `datasets` depends on it too). Fields we do
not use are kept.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.proc import EvalError

REQUIRED = ("instance_id", "repo", "base_commit", "patch", "test_patch", "problem_statement", "FAIL_TO_PASS",
            "PASS_TO_PASS", "version")
_SIDE_FILES = {"patch": "patch.diff", "test_patch": "test_patch.diff", "problem_statement": "problem_statement.md",
               "eval_script": "eval_script.sh"}


@dataclass(frozen=True)
class Instance:
    instance_id: str
    repo: str  # owner/name
    base_commit: str
    patch: str  # the gold patch
    test_patch: str
    problem_statement: str
    fail_to_pass: tuple[str, ...]
    pass_to_pass: tuple[str, ...]
    version: str
    environment_setup_commit: str | None = None
    eval_script: str | None = None  # newer datasets: the script that applies tests and runs them
    log_parser: str | None = None  # newer datasets: the name of the parser for its output
    extra: dict[str, Any] = field(default_factory=dict)  # everything else (hints_text, created_at, sdist, ...)

    @property
    def hints_text(self) -> str:
        """The issue's comments before the fix (official field; never shown to the agent)."""
        return self.extra.get("hints_text") or ""

    @property
    def created_at(self) -> str:
        """When the fixing pull request was opened (official field)."""
        return str(self.extra.get("created_at") or "")

    @property
    def repo_key(self) -> str:
        """`owner__name`, the official spelling in file and image names."""
        return self.repo.replace("/", "__")


def _test_list(value: Any, name: str, instance_id: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EvalError(f"{instance_id}: {name} must be a list of test ids (or a JSON string of one)")
    return tuple(value)


def parse_instance(record: dict[str, Any]) -> Instance:
    """One record in the official schema as an Instance; EvalError names what is missing."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise EvalError(f"instance {record.get('instance_id', '?')}: missing {', '.join(missing)}")
    known = set(REQUIRED) | {"environment_setup_commit", "eval_script", "log_parser"}
    iid = str(record["instance_id"])
    return Instance(
        instance_id=iid, repo=record["repo"], base_commit=record["base_commit"], patch=record["patch"] or "",
        test_patch=record["test_patch"] or "", problem_statement=record["problem_statement"],
        fail_to_pass=_test_list(record["FAIL_TO_PASS"], "FAIL_TO_PASS", iid),
        pass_to_pass=_test_list(record["PASS_TO_PASS"], "PASS_TO_PASS", iid), version=str(record["version"]),
        environment_setup_commit=record.get("environment_setup_commit"), eval_script=record.get("eval_script"),
        log_parser=record.get("log_parser"), extra={k: v for k, v in record.items() if k not in known},
    )


_DATA_SUFFIXES = (".parquet", ".json", ".jsonl")


def _plain(value: Any) -> Any:
    """A Parquet cell as JSON would hold it (timestamps as ISO 8601 text)."""
    return value.isoformat() if isinstance(value, (datetime.date, datetime.datetime)) else value


def _parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalError(f"{path}: reading Parquet needs pyarrow: pip install 'v4agent[scale]'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise EvalError(f"{path}: not a readable Parquet file ({e})") from None
    return [{k: _plain(v) for k, v in row.items()} for row in rows]


def _records(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        subdirs = sorted(p for p in path.iterdir() if (p / "instance.json").is_file())
        if not subdirs:  # a dataset folder (data/test-*.parquet, ...): its data files, in name order
            files = sorted(f for f in path.rglob("*") if f.suffix in _DATA_SUFFIXES and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            return [r for f in files for r in _records(f)]
        records = []
        for sub in subdirs:
            record = json.loads((sub / "instance.json").read_text())
            for name, filename in _SIDE_FILES.items():
                if name not in record and (sub / filename).is_file():
                    record[name] = (sub / filename).read_text()
            records.append(record)
        return records
    if path.suffix == ".parquet":
        return _parquet(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


def _read(path: Path) -> list[dict[str, Any]]:
    """`_records(path)`, with every way the file can be missing or malformed an EvalError."""
    if not path.exists():
        raise EvalError(f"{path}: no such file or directory")
    try:
        records = _records(path)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or e}") from None
    if not all(isinstance(r, dict) for r in records):
        raise EvalError(f"{path}: every record must be a JSON object")
    return records


def load_instances(path: Path, ids: list[str] | None = None) -> list[Instance]:
    """The instances in `path` (in file order), only those in `ids` when given."""
    instances = [parse_instance(r) for r in _read(path)]
    twice = sorted(k for k, n in Counter(i.instance_id for i in instances).items() if n > 1)
    if twice:  # two files of one folder (a dev and a test split?) would grade an instance twice
        raise EvalError(f"{path}: instance ids listed more than once: {', '.join(twice[:10])}")
    if ids:
        unknown = set(ids) - {i.instance_id for i in instances}
        if unknown:
            raise EvalError(f"instances not in {path}: {', '.join(sorted(unknown))}")
        instances = [i for i in instances if i.instance_id in ids]
    return instances


def load_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Predictions (`instance_id`, `model_name_or_path`, `model_patch`) from .jsonl, or .json
    holding a list or an object keyed by instance id, as the official harness accepts."""
    records = _read(path)
    if len(records) == 1 and "instance_id" not in records[0]:  # {id: prediction}
        if not all(isinstance(v, dict) for v in records[0].values()):
            raise EvalError(f"{path}: an object of predictions must map instance ids to objects")
        records = [{"instance_id": k, **v} for k, v in records[0].items()]
    predictions = {}
    for record in records:
        if "instance_id" not in record or "model_patch" not in record:
            raise EvalError(f"{path}: each prediction needs instance_id and model_patch")
        predictions[record["instance_id"]] = record
    return predictions


def prediction(instance_id: str, model: str, patch: str | None) -> dict[str, Any]:
    """A prediction record in the official format."""
    return {"instance_id": instance_id, "model_name_or_path": model, "model_patch": patch}
