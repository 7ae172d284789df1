"""Attacks on `search` and on what the packer sends to an endpoint, on real git repositories,
the real ripgrep and real subprocesses: a catastrophic pattern, Ctrl-C, the time limit, escapes
through symlinks; secret files left out of the prompt unless asked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tools.search
from tests.fixtures_agent import git
from tools.registry import call


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("def alpha(x):\n    return x + 1\n")
    git(root, "init", "-q")
    return root


def slow_files(root: Path, count: int) -> None:
    """Files that take rg about 1.8 s each for SLOW_PATTERN (2-core machine): Unicode word
    boundaries on non-ASCII text keep rg off its fast engines; linear, but slow."""
    line = "αλφα βήτα γάμμα δέλτα x1 ζήτα έψιλον αλφα βήτα γάμμα\n"
    for i in range(count):
        (root / f"slow{i}.txt").write_text(line * 40_000)  # 3.7 MB, under the 5 MB file limit


SLOW_PATTERN = r"(?:\b\w+\b\s*){5}\d$"


def test_catastrophic_pattern_is_linear(repo: Path):
    # `(a+)+$` backtracks exponentially in Python's re on a run of a's that ends in a non-match;
    # in a subprocess, so the test fails instead of hanging where the engine is a backtracking one.
    (repo / "data.txt").write_text("a" * 50_000 + "b\n" + "aaaa\n")
    script = ("import sys; from pathlib import Path; from tools.registry import call; "
              "print(call('search', {'pattern': '(a+)+$'}, Path(sys.argv[1])).output)")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, str(repo)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert time.monotonic() - start < 30, "the search took exponential time"
    assert done.stdout.splitlines() == ["1 matching lines in 1 files", "data.txt:2: aaaa"], done.stderr


def test_time_limit_kills_the_search(repo: Path, monkeypatch: pytest.MonkeyPatch):
    slow_files(repo, 4)
    monkeypatch.setattr(tools.search, "TIME_LIMIT_S", 0.3)
    start = time.monotonic()
    result = call("search", {"pattern": SLOW_PATTERN}, repo)
    assert time.monotonic() - start < 5
    assert not result.ok and "search took longer than 0.3 s; narrow the pattern" in result.output


def test_ctrl_c_stops_a_search_and_its_rg(repo: Path):
    # The first file is catastrophic for a backtracking engine (which then ignores Ctrl-C);
    # the others are slow for rg.
    (repo / "a.txt").write_text("a" * 40 + "b\n")
    slow_files(repo, 8)
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from tools.search import search
        from tools.base import Context, Settings
        print("searching", flush=True)
        try:
            search(Context(Path(sys.argv[1]).resolve(), Settings()), sys.argv[2])
        except KeyboardInterrupt:
            try:
                os.waitpid(-1, os.WNOHANG)
                print("a child is left")
            except ChildProcessError:
                print("interrupted, no child left")
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(repo), SLOW_PATTERN + "|(a+)+$"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert child.stdout is not None and child.stdout.readline() == "searching\n"
        time.sleep(0.5)  # into the search: the listing is done, rg is running
        start = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
        assert time.monotonic() - start < 3, "Ctrl-C was not acted on"
        assert out == "interrupted, no child left\n"
    finally:
        child.kill()
        child.wait()


def test_symlinked_parent_directory_does_not_lead_out(repo: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("top secret\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "notes.txt").write_text("nothing here\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    # The model replaces a tracked directory by a symlink out of the work tree: git's index still
    # names sub/notes.txt, which now opens the file outside.
    (repo / "sub" / "notes.txt").unlink()
    (repo / "sub").rmdir()
    (repo / "sub").symlink_to(outside)
    assert "No matches" in call("search", {"pattern": "secret"}, repo).output
    refused = call("search", {"pattern": "secret", "path": "sub"}, repo)
    assert not refused.ok and "outside the work tree" in refused.output
    assert not call("read_file", {"path": "sub/notes.txt"}, repo).ok  # the same rule as read_file


@pytest.mark.parametrize("is_git", [True, False])
def test_symlinks_to_outside_are_not_searched(tmp_path: Path, is_git: bool):
    root = tmp_path / "tree"
    root.mkdir()
    if is_git:
        git(root, "init", "-q")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.txt").write_text("top secret\n")
    (root / "link.txt").symlink_to(outside / "key.txt")
    (root / "linkdir").symlink_to(outside)
    (root / "own.txt").write_text("no secret here\n")
    assert call("search", {"pattern": "secret"}, root).output.splitlines() == [
        "1 matching lines in 1 files", "own.txt:1: no secret here"]


def test_file_set_hidden_git_binary_and_encoding(repo: Path):
    (repo / ".github").mkdir()
    (repo / ".github" / "ci.yml").write_text("run: needle\n")
    (repo / ".gitignore").write_text("build/\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.txt").write_text("needle\n")
    (repo / "blob.bin").write_bytes(b"needle\0\1\2")
    (repo / "latin.txt").write_bytes("caf\xe9 needle\n".encode("latin-1"))
    (repo / "-dash.txt").write_text("needle\n")
    assert call("search", {"pattern": "needle"}, repo).output.splitlines() == [
        "3 matching lines in 3 files", "-dash.txt:1: needle", ".github/ci.yml:1: run: needle",
        "latin.txt:1: caf\N{REPLACEMENT CHARACTER} needle"]  # not .git, build/ (ignored) or the binary file
    assert "No matches" in call("search", {"pattern": r"\[core\]"}, repo).output  # .git/config


def test_rust_regex_syntax_errors_are_clear(repo: Path):
    for pattern, expected in [(r"(?<=a)b", "look-around"), (r"(a)\1", "backreferences"), ("(", "unclosed group"),
                              (r"a\nb", r"\n")]:
        result = call("search", {"pattern": pattern}, repo)
        assert not result.ok and "invalid regular expression" in result.output and expected in result.output, (
            pattern, result.output)
        assert "--multiline" not in result.output
    # A pattern that looks like a flag is a pattern.
    (repo / "flags.txt").write_text("--files\n")
    assert call("search", {"pattern": "--files"}, repo).output.endswith("flags.txt:1: --files")


def test_rg_is_installed_with_the_package():
    assert os.access(tools.search.ripgrep(), os.X_OK)
    assert Path(tools.search.ripgrep()).parent == Path(sys.executable).parent


# Secrets: real-looking values, made up here (random letters and digits of each format).
GITHUB_TOKEN = "ghp_" + "Ab3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6"
AWS_KEY_ID = "AKIA" + "Q3ZT7XK2M9WB4RLP"
OPENAI_KEY = "sk-" + "Zt8qP3xL7vM2nB6cR1wK9yH4"
PRIVATE_KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\n"
               "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
               "-----END OPENSSH PRIVATE KEY-----\n")
UNTRACKED_SECRETS = {
    ".env": "DATABASE_URL=postgres://app:hunter2@db/app\n",  # no pattern: caught by its name
    "deploy/.env.production": "DEBUG=0\n",
    "certs/server.pem": "not even a key\n",
    "id_rsa": PRIVATE_KEY,
    ".npmrc": "//registry.npmjs.org/:_authToken=npm_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6" + "\n",
    "notes.txt": f"the bot's token: {GITHUB_TOKEN}\n",  # no name rule: caught by its content
}
UNTRACKED_FINE = {
    "id_rsa.pub": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9 user@host\n",
    "config.env.example": "OPENAI_API_KEY=sk-your-api-key-goes-here-please\n",
    "app.py": "import os\nKEY = os.environ['OPENAI_API_KEY']\n",
}
TRACKED = {
    # as committed, already shared with whoever has the repository: only the content counts
    ".env.example": "OPENAI_API_KEY=sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxx\nAWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\n",
    ".env": "DEBUG=1\n",
    ".npmrc": "//registry.npmjs.org/:_authToken=${NPM_TOKEN}\n",
    "settings.py": f"AWS_ACCESS_KEY_ID = '{AWS_KEY_ID}'\n",  # a real-looking key committed: still a secret
    "crypto.py": 'BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"\nEND = b"-----END OPENSSH PRIVATE KEY-----"\n',
    "src/client.py": f"DEFAULT = '{OPENAI_KEY}'\n",
}
EXPECTED_SECRETS = [
    (".env", "name .env"), (".npmrc", "name .npmrc"), ("certs/server.pem", "name *.pem"),
    ("deploy/.env.production", "name .env.*"), ("id_rsa", "name id_rsa"), ("notes.txt", "content: GitHub token"),
    ("settings.py", "content: AWS access key id"), ("src/client.py", "content: API key sk-…"),
]


@pytest.fixture(scope="module")
def tokenizer():
    from runtime.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def leaky(tmp_path: Path) -> Path:
    root = tmp_path / "leaky"
    root.mkdir()
    git(root, "init", "-q")
    for files in (TRACKED, UNTRACKED_SECRETS, UNTRACKED_FINE):
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(content)
        if files is TRACKED:
            git(root, "add", ".")
            git(root, "commit", "-q", "-m", "init")
    return root


def test_secrets_are_left_out_and_listed(leaky: Path, tokenizer, tmp_path: Path):
    from agent.pack import pack_repository

    result = pack_repository(leaky, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert result.secrets == EXPECTED_SECRETS and not result.secrets_included
    packed = {f.path for f in result.files}
    assert packed == {".env.example", "app.py", "config.env.example", "crypto.py", "id_rsa.pub"}
    text = result.text()
    for value in ("hunter2", GITHUB_TOKEN, AWS_KEY_ID, OPENAI_KEY, "OPENSSH PRIVATE KEY-----\nb3Blbn", "npm_aB3"):
        assert value not in text
    assert result.ids() == tokenizer.encode(text)
    # The verdicts come from the cache the second time, and still hold.
    again = pack_repository(leaky, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert again.secrets == EXPECTED_SECRETS and {f.path for f in again.files} == packed


def test_include_secrets_is_the_only_way_to_send_them(leaky: Path, tokenizer, tmp_path: Path):
    from agent.pack import pack_repository

    cache = tmp_path / "cache"
    everything = pack_repository(leaky, tokenizer=tokenizer, cache_dir=cache, include_secrets=True)
    assert everything.secrets == EXPECTED_SECRETS and everything.secrets_included
    assert {path for path, _ in EXPECTED_SECRETS} <= {f.path for f in everything.files}
    assert GITHUB_TOKEN in everything.text()
    # Token ids cached by that pack do not let the secrets back in.
    default = pack_repository(leaky, tokenizer=tokenizer, cache_dir=cache)
    assert GITHUB_TOKEN not in default.text() and len(default.files) == 5


def test_edited_tracked_file_is_checked_by_name(leaky: Path, tokenizer, tmp_path: Path):
    from agent.pack import pack_repository

    (leaky / ".env").write_text("DEBUG=1\nDB_PASSWORD=correct-horse\n")  # the committed .env, edited
    result = pack_repository(leaky, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert (".env", "name .env") in result.secrets and "correct-horse" not in result.text()


def test_secret_patterns_and_names():
    from agent.pack_files import secret_content_reason, secret_name_reason

    found = {
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,96F5\n\n"
        "MIIEowIBAAKCAQEAvK7xV5rZz0mJ1Lr2Jn3aT6uVq8bW0cY1dE2fG3hI4jK5lM6nO7pQ\n": "private key",
        '{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIB\\n"}':
            "private key",
        "aws_access_key_id = ASIA" + "Q3ZT7XK2M9WB4RLP": "AWS access key id",
        "token: github_pat_" + "11AB3DE6GH9JK2MN5PQ8ST_1vW4yZ7bC0eF3hJ6kL9nP2rS5uV8xA1": "GitHub token",
        "SLACK=xoxb-" + "1234567890-abcdefGHIJ": "Slack token",
        "key = 'sk-proj-" + "Zt8qP3xL7vM2nB6cR1wK9yH4'": "API key sk-…",
        "STRIPE=sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc": "Stripe key",
        "password = pypi-AgE" + "IcHlwaS5vcmcCJDk2ZjQ1ZGNmLTk3YjYtNDk0ZS1hYTU4LWI4MDAyZjZkNjY3OQAC": "PyPI token",
        "HF_TOKEN=hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh": "Hugging Face token",
        "glpat-" + "Xy7Zk2Lm9Qp4Rs8Tv1Wn": "GitLab token",
    }
    for text, what in found.items():
        assert secret_content_reason(text.encode()) == f"content: {what}", text
    for text in ["sk-your-api-key-goes-here-please", "sk-" + "x" * 40, "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
                 "_authToken=${NPM_TOKEN}", "this._authToken = token;", "task-" + "Zt8qP3xL7vM2nB6cR1wK9yH4",
                 'MARKER = "-----BEGIN PRIVATE KEY-----"', "hf_" + "modelconfigurationforpretrainedmo",
                 "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9", "DATABASE_URL=postgres://localhost/app"]:
        assert secret_content_reason(text.encode()) is None, text
    names = {"a/.env": ".env", ".env.local": ".env.*", "prod.env": "*.env", "tls/key.pem": "*.pem",
             "server.key": "*.key", "cert.P12": "*.p12", "id_ed25519": "id_ed25519", ".pypirc": ".pypirc",
             ".netrc": ".netrc", ".git-credentials": ".git-credentials", "gcp/credentials.json": "credentials.json",
             "release.keystore": "*.keystore", ".htpasswd": ".htpasswd", "secrets.yaml": "secrets.yaml",
             "terraform.tfstate": "*.tfstate"}
    for path, glob in names.items():
        assert secret_name_reason(path) == f"name {glob}", path
    for path in [".env.example", ".env.sample", "id_rsa.pub", "environment.py", "secrets.py", "keys.py",
                 "credentials.json.template", "README.md"]:
        assert secret_name_reason(path) is None, path


def test_pack_cli_lists_secrets(leaky: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json

    import typer
    from typer.testing import CliRunner

    from agent.cli.pack import pack_cmd

    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    app = typer.Typer()
    app.command("pack")(pack_cmd)
    app.callback()(lambda: None)
    summary = json.loads(CliRunner().invoke(app, ["pack", str(leaky), "--json"]).stdout)
    assert summary["files_secret"] == 8 and summary["secrets_included"] is False
    assert summary["secrets"] == [{"path": p, "reason": r} for p, r in EXPECTED_SECRETS]
    assert not {p for p, _ in EXPECTED_SECRETS} & {f["path"] for f in summary["files"]}
    report = CliRunner().invoke(app, ["pack", str(leaky), "--limit", "1"]).stdout.splitlines()
    at = report.index("secrets: 8 files look like secrets, left out (--include-secrets packs them)")
    assert report[at + 1:] == [f"  {p}  ({r})" for p, r in EXPECTED_SECRETS]
    included = json.loads(CliRunner().invoke(app, ["pack", str(leaky), "--json", "--include-secrets"]).stdout)
    assert included["secrets_included"] is True and included["files_full"] == 13
