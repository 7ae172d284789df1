"""Packing real git repositories made in tmp dirs: file selection and filters, deterministic
cache-friendly order, exact token ids, the on-disk token cache, budgets that force outlines
and drops, relevance to an issue, and tree-sitter outlines."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.encoding import FILE_BEGIN, FILE_END, FILE_NAME_BEGIN, FILE_NAME_END
from agent.outline import GRAMMARS, _Writer, outline
from agent.pack import OUTLINE_HEADER, SEGMENTS, PackError, pack_repository
from agent.pack_cache import TokenStore
from agent.relevance import DIRECTORY_WEIGHT, PATH_WEIGHT, mentions, module_index, resolve_import
from runtime.tokenizer import load_tokenizer

MOD = '''"""Geometry helpers.

Longer description."""
import math
from .units import Metre

SCALE = 2


class Shape:
    """A shape."""

    sides = 0

    def area(self, unit: Metre) -> float:
        """Area in square units."""
        return 0.0 * SCALE


def distance(a, b):
    return math.dist(a, b)
'''


class CountingTokenizer:
    """The real tokenizer, counting the file contents it is asked to encode."""

    def __init__(self) -> None:
        self.inner = load_tokenizer()
        self.path = self.inner.path
        self.texts: list[str] = []

    def encode_batch(self, texts):
        self.texts += texts
        return self.inner.encode_batch(texts)

    def token_to_id(self, token: str) -> int:
        return self.inner.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)


@pytest.fixture(scope="module")
def tokenizer() -> CountingTokenizer:
    return CountingTokenizer()


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def make_repo(root: Path, files: dict[str, str | bytes], *, commit: bool = True) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q")
    for name, content in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    if commit:
        git(root, "add", ".")
        git(root, "commit", "-q", "-m", "init")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "project", {
        "README.md": "# Project\n",
        "geo/__init__.py": "",
        "geo/shapes.py": MOD,
        "geo/units.py": "class Metre:\n    pass\n",
        "geo/tests/test_shapes.py": "from geo.shapes import Shape\n\n\ndef test_area():\n    assert Shape()\n",
        "docs/guide.md": "How to use it.\n" * 20,
        "web/app.js": "function main() {\n  return 1;\n}\n",
    })


def test_whole_repository_fits_in_path_order(project: Path, tokenizer: CountingTokenizer, tmp_path: Path):
    result = pack_repository(project, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert [f.path for f in result.files] == ["README.md", "docs/guide.md", "geo/__init__.py", "geo/shapes.py",
                                              "geo/tests/test_shapes.py", "geo/units.py", "web/app.js"]
    assert {f.mode for f in result.files} == {"full"}
    text = result.text()
    assert text.startswith(f"{FILE_NAME_BEGIN}README.md{FILE_NAME_END}{FILE_BEGIN}# Project\n{FILE_END}")
    assert result.total_tokens == len(result.ids()) == sum(f.tokens for f in result.files)


def test_file_ids_concatenate_to_the_ids_of_the_whole_text(project: Path, tokenizer: CountingTokenizer,
                                                           tmp_path: Path):
    # Whitespace at the edges of files is where plain concatenation would merge tokens.
    (project / "edges.py").write_text("\n\n    indented = 1\n\n\n")
    (project / "crlf.txt").write_bytes(b"a\r\n  b\r\n")
    (project / "unicode.txt").write_text("na\u00efve \u4e2d\u6587 \U0001f600\n")
    for budget in (1_000_000, 400):
        result = pack_repository(project, budget=budget, issue="Shape.area", tokenizer=tokenizer,
                                 cache_dir=tmp_path / "cache")
        assert result.ids() == tokenizer.encode(result.text())
    markers = [tokenizer.token_to_id(t) for t in (FILE_NAME_BEGIN, FILE_NAME_END, FILE_BEGIN, FILE_END)]
    assert markers == [128817, 128818, 128819, 128820]


def test_order_is_deterministic_with_edited_files_last(project: Path, tokenizer: CountingTokenizer,
                                                       tmp_path: Path):
    first = pack_repository(project, tokenizer=tokenizer, cache_dir=tmp_path / "a")
    second = pack_repository(project, tokenizer=tokenizer, cache_dir=tmp_path / "b")
    assert first.ids() == second.ids() and first.files == second.files
    (project / "docs/guide.md").write_text("Edited.\n")
    (project / "aaa_untracked.py").write_text("x = 1\n")
    edited = pack_repository(project, tokenizer=tokenizer, cache_dir=tmp_path / "a")
    assert [f.path for f in edited.files][-2:] == ["aaa_untracked.py", "docs/guide.md"]
    assert all(f.changed for f in edited.files[-2:]) and not any(f.changed for f in edited.files[:-2])
    # Unchanged files keep their places: the prompt up to the first edited file is unchanged.
    unchanged = [f for f in first.files if f.path != "docs/guide.md"]
    assert edited.files[: len(unchanged)] == unchanged


def test_filters(tmp_path: Path, tokenizer: CountingTokenizer):
    root = make_repo(tmp_path / "filtered", {
        "src/main.py": "print('hi')\n",
        "image.png": b"\x89PNG\r\n\x1a\n\0\0\0",
        "blob.dat2": b"abc\0def",
        "latin1.txt": "caf\xe9\n".encode("latin-1"),
        "package-lock.json": "{}\n",
        "poetry.lock": "[[package]]\n",
        "huge.py": "x = 1\n" * 200_000,
        "vendor/lib.py": "def f(): pass\n",
        "node_modules/pkg/index.js": "module.exports = 1;\n",
        "third_party/x.c": "int x;\n",
        "static/app.min.js": "var a=1;\n",
        "static/bundle.js": "var a=1;" * 2000 + "\n",
        "gen/api_pb2.py": "# protoc output\n",
        "gen/client.go": "// Code generated by tool. DO NOT EDIT.\npackage gen\n",
        "data/big.json": "[" + "1," * 40_000 + "1]\n",
        "data/small.json": '{"a": 1}\n',
        "data/table.csv": "a,b\n1,2\n",
        "logo.svg": "<svg></svg>\n",
        ".gitignore": "ignored.py\n",
    })
    (root / "ignored.py").write_text("secret = 1\n")
    (root / "untracked.py").write_text("y = 2\n")
    (root / "link.py").symlink_to(root / "src/main.py")
    result = pack_repository(root, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    # Untracked files come last; ignored files and symlinks not at all.
    assert [f.path for f in result.files] == [".gitignore", "data/small.json", "src/main.py", "untracked.py"]
    assert dict(result.skipped) == {
        "blob.dat2": "binary", "data/big.json": "data", "data/table.csv": "binary or data",
        "gen/api_pb2.py": "generated", "gen/client.go": "generated", "huge.py": "too large",
        "image.png": "binary or data", "latin1.txt": "binary", "logo.svg": "binary or data",
        "node_modules/pkg/index.js": "vendored", "package-lock.json": "lockfile", "poetry.lock": "lockfile",
        "static/app.min.js": "minified", "static/bundle.js": "minified", "third_party/x.c": "vendored",
        "vendor/lib.py": "vendored",
    }
    # Content verdicts are cached: the second pack reads no skipped file again.
    tokenizer.texts.clear()
    again = pack_repository(root, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert again.skipped == result.skipped and again.stats.tokenized == 0


def test_token_cache_tokenizes_only_the_edited_file(project: Path, tokenizer: CountingTokenizer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "env-cache"))
    cold = pack_repository(project, tokenizer=tokenizer)
    assert cold.stats.tokenized == 7 and (tmp_path / "env-cache" / "pack").is_dir()
    tokenizer.texts.clear()
    warm = pack_repository(project, tokenizer=tokenizer)
    assert warm.stats.tokenized == 0 and warm.ids() == cold.ids()
    assert all(text in [f.path for f in warm.files] for text in tokenizer.texts)  # only paths were encoded
    (project / "geo/units.py").write_text("class Metre:\n    factor = 1\n")
    tokenizer.texts.clear()
    edited = pack_repository(project, tokenizer=tokenizer)
    contents = [t for t in tokenizer.texts if t not in [f.path for f in edited.files]]
    assert edited.stats.tokenized == 1 and contents == ["class Metre:\n    factor = 1\n"]
    assert edited.ids() == tokenizer.encode(edited.text())


def test_cache_survives_torn_and_leftover_files(project: Path, tokenizer: CountingTokenizer, tmp_path: Path):
    cache = tmp_path / "cache"
    first = pack_repository(project, tokenizer=tokenizer, cache_dir=cache)
    ids_files = sorted(cache.rglob("*.ids"))
    whole = ids_files[0].read_bytes()
    ids_files[0].write_bytes(b"\1\2\3")  # torn: not a whole number of ids
    (ids_files[1].parent / ".tmp-leftover").write_bytes(b"junk")  # a crashed writer's temp file
    with pytest.warns(RuntimeWarning, match=ids_files[0].name):
        again = pack_repository(project, tokenizer=tokenizer, cache_dir=cache)
        # The counts come from the segments: the torn entry is found, and made again, by ids().
        assert again.ids() == first.ids()
    assert ids_files[0].read_bytes() == whole
    store = TokenStore(tmp_path / "store")
    store.save_ids("abc", [1, 2, 3])
    assert store.count("abc") == 3 and list(store.load_ids("abc")) == [1, 2, 3] and store.count("abd") is None
    assert not list((tmp_path / "store").rglob(".tmp-*"))


def test_budget_forces_outlines_then_drops(project: Path, tokenizer: CountingTokenizer, tmp_path: Path):
    cache = tmp_path / "cache"
    body = "".join(f"    x = x * {k} + {k}\n" for k in range(6))
    (project / "geo/big.py").write_text("".join(f"def f{i}(x):\n{body}    return x\n\n" for i in range(40)))
    whole = pack_repository(project, tokenizer=tokenizer, cache_dir=cache).total_tokens
    # One token short: the least worth is given up (one small file that is no code and not named).
    short = pack_repository(project, budget=whole - 1, issue="Shape.area is wrong", tokenizer=tokenizer,
                            cache_dir=cache)
    short_modes = {f.path: f.mode for f in short.files}
    assert short.total_tokens <= whole - 1 and short_modes.pop("README.md") == "dropped"
    assert set(short_modes.values()) == {"full"}
    tight = pack_repository(project, budget=whole // 2, issue="Shape.area is wrong", tokenizer=tokenizer,
                            cache_dir=cache)
    modes = {f.path: f.mode for f in tight.files}
    assert tight.total_tokens <= whole // 2 and modes["geo/big.py"] == "outlined"
    assert modes["geo/shapes.py"] == "full"  # what the issue points at
    tiny = pack_repository(project, budget=120, issue="Shape.area is wrong", tokenizer=tokenizer, cache_dir=cache)
    tiny_modes = {f.path: f.mode for f in tiny.files}
    assert tiny.total_tokens <= 120 and "dropped" in tiny_modes.values()
    assert [f.mode for f in tiny.files] == sorted((f.mode for f in tiny.files), key=lambda m: m == "dropped")
    outlined = next(f for f in tight.files if f.mode == "outlined")
    assert OUTLINE_HEADER in tight.text() and outlined.tokens == outlined.outline_tokens < outlined.full_tokens


def test_outlines_of_the_rest_when_the_issue_file_is_full(tmp_path: Path, tokenizer: CountingTokenizer):
    files = {f"pkg/mod{i}.py": f'def function_{i}(a, b):\n    """Doc {i}."""\n' + "    x = 1\n" * 200
             for i in range(6)}
    root = make_repo(tmp_path / "r", files)
    cache = tmp_path / "cache"
    budget = 2 * pack_repository(root, tokenizer=tokenizer, cache_dir=cache).files[0].tokens
    result = pack_repository(root, budget=budget, issue="function_3 crashes", tokenizer=tokenizer,
                             cache_dir=cache)
    modes = {f.path: f.mode for f in result.files}
    assert modes.pop("pkg/mod3.py") == "full" and set(modes.values()) == {"outlined"}
    assert "def function_0(a, b): ... #1\n    \"\"\"Doc 0.\"\"\"\n" in result.text()
    assert result.ids() == tokenizer.encode(result.text())


def test_not_a_git_repository(tmp_path: Path, tokenizer: CountingTokenizer):
    with pytest.raises(PackError, match="not inside a git repository"):
        pack_repository(tmp_path, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    with pytest.raises(PackError, match="does not exist"):
        pack_repository(tmp_path / "missing", tokenizer=tokenizer, cache_dir=tmp_path / "cache")


def test_a_subdirectory_packs_the_whole_work_tree(project: Path, tokenizer: CountingTokenizer, tmp_path: Path):
    result = pack_repository(project / "geo", tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert result.root == project.resolve() and len(result.files) == 7


def test_python_outline():
    found = outline("geo/shapes.py", MOD)
    assert found is not None
    assert found.text == (
        '"""Geometry helpers."""\n'
        "SCALE = 2\n"
        "class Shape: #10\n"
        '    """A shape."""\n'
        "    sides = 0\n"
        "    def area(self, unit: Metre) -> float: ... #15\n"
        '        """Area in square units."""\n'
        "def distance(a, b): ... #20\n"
    )
    assert found.symbols == ["SCALE", "Shape", "sides", "area", "distance"]
    assert found.imports == ["math", ".units", ".units.Metre"]
    assert outline("notes.txt", "text") is None


def test_python_docstring_as_a_bare_string_in_the_block():
    """tree-sitter-language-pack's grammar puts the docstring string straight in the block."""
    source = b'"""Bare docstring."""\n'
    string = SimpleNamespace(type="string", start_byte=0, end_byte=len(source) - 1, named_child_count=0)
    block = SimpleNamespace(type="block", named_children=[string], named_child_count=1)
    writer = _Writer(GRAMMARS["python"], source, python=True)
    writer.docstring(block, 1)
    assert writer.lines == ['    """Bare docstring."""\n']


@pytest.mark.skipif(outline("a.js", "") is None, reason="tree-sitter-javascript is not installed")
def test_javascript_outline():
    found = outline("a.js", "/** Adds. */\nexport function add(a, b) {\n  return a + b;\n}\n"
                            "class Box {\n  open() { return 1; }\n}\n")
    assert found is not None
    assert found.text == ("// Adds.\nexport function add(a, b) { … } //2\nclass Box //5\n    open() { … } //6\n")


def test_mentions():
    paths = ["pkg/__init__.py", "pkg/core.py", "pkg/util.py", "pkg/other.py", "tests/test_core.py",
             "tests/bulk_save/tests.py", "docs/core.md"]
    symbols = {"pkg/core.py": ["Engine", "run"], "pkg/util.py": ["helper"], "pkg/other.py": ["run"]}
    found = mentions("Engine.start() fails in bulk_save, see pkg/core.py", paths, symbols, module_index(paths))
    assert found.named == {"pkg/core.py": 1.0}
    assert found.scores["pkg/core.py"] == PATH_WEIGHT + 1  # its path, and a class it defines (a plain word)
    assert found.scores["tests/bulk_save/tests.py"] == DIRECTORY_WEIGHT  # in a directory named in the issue
    assert set(found.scores) == {"pkg/core.py", "tests/bulk_save/tests.py"}
    dotted = mentions("pkg.util.helper is slow; run it", paths, symbols, module_index(paths))
    assert dotted.named == {"pkg/util.py": 1.0}
    assert dotted.scores["pkg/core.py"] == dotted.scores["pkg/other.py"] == 0.5  # `run`: shared, plain word
    assert mentions("see core.py", paths, symbols, module_index(paths)).named == {"pkg/core.py": 1.0}
    modules = module_index(["src/a/__init__.py", "src/a/b.py"])
    assert modules["a.b"] == "src/a/b.py" and resolve_import("..b", "src/a/c/d.py", modules) == "src/a/b.py"


def segment_entries(cache: Path) -> list[Path]:
    """The segment entries of a token cache (keyed by a 32-digit digest; a file's own entries by
    its 40-digit blob id)."""
    return [p for p in cache.rglob("*") if p.is_file() and len(p.name.split(".")[0]) == 32]


def test_segments_give_the_pack_the_files_own_entries_give(tmp_path: Path, tokenizer: CountingTokenizer,
                                                           monkeypatch: pytest.MonkeyPatch):
    body = "    total = request.value * {k} + {k}\n"
    files: dict[str, str | bytes] = {
        f"pkg/mod{i:03d}.py": f'"""Module {i}."""\n\n\ndef handler_{i}(request):\n'
                              + "".join(body.format(k=k) for k in range(i % 9 + 2)) + "    return total\n"
        for i in range(120)}
    files |= {"README.md": "# Handlers\n" * 30, "pkg/data.bin": b"\0\1\2", ".env": "KEY=1\n"}
    root = make_repo(tmp_path / "r", files)
    issue = "handler_42 returns the wrong total for a request"

    stats = []

    def pack(cache: str) -> tuple:
        result = pack_repository(root, budget=3000, issue=issue, tokenizer=tokenizer, cache_dir=tmp_path / cache)
        stats.append(result.stats)
        return result.files, result.skipped, result.secrets, result.ids(), result.text()

    cold = pack("cache")
    modes = {f.mode for f in cold[0]}
    assert modes == {"full", "outlined", "dropped"} and cold[1] and cold[3] == tokenizer.encode(cold[4])
    reads: list[str] = []
    read = TokenStore._read
    monkeypatch.setattr(TokenStore, "_read", lambda store, key: reads.append(key) or read(store, key))
    assert pack("cache") == cold
    # Five kinds of segments (counts, secret verdicts, path ids, outlines, term indexes), the history,
    # then each file in the prompt: not five entries or so per file of the repository.
    in_prompt = sum(f.mode != "dropped" for f in cold[0])
    assert len(reads) <= 5 * SEGMENTS + 1 + 2 * in_prompt < 4 * len(files)
    assert stats[-1].entries_read == len(reads) - in_prompt  # ids() reads one per file in the prompt
    for entry in segment_entries(tmp_path / "cache"):
        entry.unlink()
    assert pack("cache") == cold  # from the files' own entries, and the segments made again
    assert segment_entries(tmp_path / "cache")
    # An edit misses the buckets of the old and the new blob; the rest come from their segments.
    (root / "pkg/mod042.py").write_text(files["pkg/mod042.py"] + "\n\ndef handler_42_total(request):\n    return 0\n")
    reads.clear()
    edited = pack("cache")
    assert len(reads) < 5 * SEGMENTS + 1 + 2 * in_prompt + 50
    assert edited == pack("fresh") and edited != cold
    (root / "pkg/mod042.py").write_text(files["pkg/mod042.py"])  # type: ignore[arg-type]
    assert pack("cache") == cold
