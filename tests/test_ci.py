"""`v4agent ci github` and `v4agent fix --pr` against a GitHub on 127.0.0.1 (tests/fixtures_ci.py):
the REST endpoints with bodies validated against githubkit's models, and a bare repository behind
the real `git http-backend`, pushed to with the real `git push`. Events are payloads of the
documented webhook shapes. The model is the scripted backend; the sandbox is on.

End to end: a label → the progress comment → the branch pushed → the pull request opened with
its description → a review comment → a second commit on the same pull request. Then: untrusted
authors, bots, forks and pull_request_target are ignored (or refused) before anything is called;
a run without a patch says why and exits 1; the token appears in no output, file, trajectory,
commit, comment or pull request, and the model's commands never see it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.ci.events import EventError, Gate, Ignored, read_event
from agent.ci.pull import fenced, first_line, pull_body, text_branch
from agent.ci.remote import Remote, RemoteError
from agent.cli.fix import commit_message
from tests.fixtures_agent import FIXED, PYTEST, fix_turns, git, isolate, make_repo, write_script
from tests.fixtures_ci import FakeGitHub, documented, user

TOKEN = "ghs_" + "Zq7" * 12  # what GITHUB_TOKEN looks like
REPO = "acme/calc"
CLI = [sys.executable, "-c", "from agent.cli import main; main()"]
# What a hostile model would try for the token: its environment, every process's, git's config
# and credential files. The output goes into the patch, so it is pushed and checked.
PROBE = ("{ env; cat /proc/[0-9]*/environ; git config --list --show-origin; cat ~/.git-credentials ~/.gitconfig "
         ".git/config; } > probe.txt 2>&1; true")


@pytest.fixture
def github(tmp_path: Path):
    server = FakeGitHub(tmp_path / "github", REPO, TOKEN).start()
    server.issues[7] = {"title": "add(2, 3) returns -1", "body": "calc.add should add.", "user": user("outsider")}
    yield server
    server.stop()


@pytest.fixture
def checkout(tmp_path: Path, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The repository on GitHub (main: calc.add subtracts) and a job's checkout of it, where
    actions/checkout's persist-credentials left a header of another token for the server."""
    isolate(monkeypatch, tmp_path)
    seed = make_repo(tmp_path / "seed")
    git(seed, "push", "-q", str(github.bare), "main")
    work = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(github.bare), str(work))
    git(work, "remote", "set-url", "origin", f"{github.url}/{REPO}.git")
    git(work, "config", f"http.{github.url}/.extraheader", "AUTHORIZATION: " + github.basic("ghs_stale"))
    return work


def labeled(number: int = 7, label: str = "v4agent", sender: dict[str, Any] | None = None) -> dict[str, Any]:
    from githubkit_schemas.latest.models import WebhookIssuesLabeled

    return documented(WebhookIssuesLabeled, {
        "action": "labeled", "label": {"name": label},
        "issue": {"number": number, "title": "add(2, 3) returns -1", "body": "calc.add should add.",
                  "user": user("outsider"), "author_association": "NONE"},
        "repository": {"full_name": REPO, "default_branch": "main"}, "sender": sender or user("maintainer")})


def commented(body: str, association: str = "MEMBER", author: dict[str, Any] | None = None,
              on_pull: bool = False) -> dict[str, Any]:
    from githubkit_schemas.latest.models import WebhookIssueCommentCreated

    issue: dict[str, Any] = {"number": 100 if on_pull else 7, "title": "add(2, 3) returns -1", "body": "calc.add"}
    if on_pull:
        issue["pull_request"] = {"url": "https://example.com/pulls/100"}
    return documented(WebhookIssueCommentCreated, {
        "action": "created", "issue": issue,
        "comment": {"body": body, "author_association": association, "user": author or user("alice")},
        "repository": {"full_name": REPO, "default_branch": "main"}, "sender": author or user("alice")})


def reviewed(body: str, head_repo: str = REPO, branch: str = "v4agent/issue-7") -> dict[str, Any]:
    from githubkit_schemas.latest.models import WebhookPullRequestReviewCommentCreated

    repo = {"full_name": head_repo, "name": head_repo.split("/")[1]}
    return documented(WebhookPullRequestReviewCommentCreated, {
        "action": "created",
        "comment": {"body": body, "author_association": "OWNER", "user": user("owner"), "path": "calc.py",
                    "line": 2, "diff_hunk": "@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b"},
        "pull_request": {"number": 100, "title": "v4agent: add(2, 3) returns -1", "body": "Fixes #7.",
                         "head": {"ref": branch, "repo": repo}, "base": {"ref": "main", "repo": repo}},
        "repository": {"full_name": REPO, "default_branch": "main"}, "sender": user("owner")})


def ci(github: FakeGitHub, checkout: Path, event: str, payload: dict[str, Any], script: Path | None = None,
       *args: str) -> subprocess.CompletedProcess[str]:
    """`v4agent ci github` in a fresh process, in the environment an Actions runner gives it."""
    event_file = checkout.parent / "event.json"
    event_file.write_text(json.dumps(payload))
    env = {**os.environ, **github.env(), "GITHUB_EVENT_NAME": event, "GITHUB_EVENT_PATH": str(event_file),
           "GITHUB_WORKSPACE": str(checkout), "GITHUB_OUTPUT": str(checkout.parent / "output.txt")}
    script = script or write_script(checkout.parent / "no-turns.json", [])
    return subprocess.run([*CLI, "ci", "github", "--script", str(script), *args], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=300)


def log(bare: Path, branch: str) -> list[str]:
    return git(bare, "log", "--format=%H %P", branch).splitlines()


def test_a_label_opens_a_pull_request_and_a_review_adds_a_commit_to_it(github: FakeGitHub, checkout: Path,
                                                                        tmp_path: Path):
    main = github.head("main")
    first = write_script(tmp_path / "first.json", [{"tool_calls": [{"name": "run", "arguments": {"command": PROBE}}]},
                                                   *fix_turns()])
    done = ci(github, checkout, "issues", labeled(), first)
    assert done.returncode == 0, done.stderr
    printed = [done.stdout, done.stderr]
    assert github.faults == []

    # the branch, one commit on main: the fix, and what the model could see of the token (nothing)
    commit, parent = log(github.bare, "v4agent/issue-7")[0].split()
    assert parent == main
    assert git(github.bare, "show", "v4agent/issue-7:calc.py") == FIXED
    probe = git(github.bare, "show", "v4agent/issue-7:probe.txt")
    assert "PATH=" in probe and "GITHUB" not in probe and "x-access-token" not in probe.lower()

    # the pull request and its description
    [(number, pull)] = github.pulls.items()
    assert (pull["head"], pull["base"], pull["draft"]) == ("v4agent/issue-7", "main", False)
    assert pull["title"] == "v4agent: add(2, 3) returns -1"
    assert pull["body"].startswith("Fixes #7.") and "add adds; tests pass" in pull["body"]
    assert "M calc.py" in pull["body"] and "A probe.txt" in pull["body"]
    assert f"$ {PYTEST}\n  exit 0" in pull["body"] and f"{github.url}/{REPO}/actions/runs/4242" in pull["body"]

    # one comment on the issue, posted at the start and edited to the result
    [comment] = github.comments.values()
    assert comment["issue"] == 7 and "working on it" in comment["edits"][0]
    assert f"opened #{number}" in comment["body"] and "5 turns" in comment["body"]
    step = (tmp_path / "output.txt").read_text()
    assert f"pull-request={github.url}/{REPO}/pull/{number}" in step and "run-dir=" in step

    # a review comment on that pull request: a second commit on the same branch, the same pull request
    second = write_script(tmp_path / "second.json", [
        {"tool_calls": [{"name": "edit_file", "arguments": {
            "path": "calc.py", "old_text": "def add(a, b):\n", "new_text": 'def add(a, b):\n    """The sum."""\n'}}]},
        {"tool_calls": [{"name": "run", "arguments": {"command": PYTEST}}]},
        {"content": "Done.", "tool_calls": [{"name": "submit", "arguments": {"summary": "a docstring"}}]}])
    done = ci(github, checkout, "pull_request_review_comment", reviewed("@v4agent add a docstring"), second)
    assert done.returncode == 0, done.stderr
    assert github.faults == []
    newest, parent = log(github.bare, "v4agent/issue-7")[0].split()
    assert parent == commit and '"""The sum."""' in git(github.bare, "show", f"{newest}:calc.py")
    subjects = git(github.bare, "log", "--format=%s", "main..v4agent/issue-7").splitlines()
    assert subjects == ["v4agent: add a docstring", "v4agent: add(2, 3) returns -1"]
    assert list(github.pulls) == [number]
    reply = github.comments[2]
    assert reply["issue"] == number and f"pushed to #{number}" in reply["body"]
    asked = [(method, path) for method, path, _ in github.requests]
    assert {("GET", f"/api/v3/repos/{REPO}/pulls/{number}"), ("GET", f"/api/v3/repos/{REPO}/issues/7")} <= set(asked)

    _assert_no_token(tmp_path, github, *printed, done.stdout, done.stderr)


def _assert_no_token(root: Path, github: FakeGitHub, *outputs: str) -> None:
    """The token, or the header made of it, in no output, file, object, comment or pull request."""
    forms = [TOKEN, base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()]
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=github.bare,
                             capture_output=True).stdout
    texts = [*outputs, json.dumps(github.requests), json.dumps(github.comments), json.dumps(github.pulls),
             objects.decode("latin-1")]
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "trajectory.jsonl" for p in files)
    texts += [p.read_bytes().decode("latin-1") for p in files]
    for form in forms:
        assert not [t[:200] for t in texts if form in t]


@pytest.mark.parametrize("event, payload, why", [
    ("issue_comment", lambda: commented("@v4agent fix it", association="NONE"), "is NONE, not one of"),
    ("issue_comment", lambda: commented("@v4agent fix it", association="CONTRIBUTOR"), "is CONTRIBUTOR"),
    ("issue_comment", lambda: commented("@v4agent fix it", author=user("helper[bot]", "Bot")), "is a bot"),
    ("issue_comment", lambda: commented("please fix it, @v4agent-old"), "does not mention @v4agent"),
    ("issues", lambda: labeled(label="bug"), "is not the trigger label"),
    ("issues", lambda: labeled(sender=user("labeler[bot]", "Bot")), "is a bot"),
    ("pull_request_review_comment", lambda: reviewed("@v4agent more", head_repo="mallory/calc"),
     "comes from mallory/calc"),
    ("pull_request_review_comment", lambda: reviewed("@v4agent more", branch="feature"), "is not v4agent's"),
    ("push", lambda: {"ref": "refs/heads/main"}, "push events do not ask"),
])
def test_events_v4agent_does_not_act_on_are_ignored_before_anything_is_called(github: FakeGitHub, checkout: Path,
                                                                              event: str, payload: Any, why: str):
    done = ci(github, checkout, event, payload())
    assert done.returncode == 0, done.stderr
    assert f"v4agent: ignored {event}: " in done.stderr and why in done.stderr
    assert github.requests == [] and github.faults == [] and github.head("v4agent/issue-7") is None


def test_a_comment_on_a_pull_request_that_is_not_v4agents_is_ignored(github: FakeGitHub, checkout: Path):
    git(checkout, "push", "-q", str(github.bare), "main:feature")
    github.pulls[100] = {"title": "a feature", "body": "", "head": "feature", "base": "main", "draft": False,
                         "state": "open", "repository": REPO}
    done = ci(github, checkout, "issue_comment", commented("@v4agent rebase this", on_pull=True))
    assert done.returncode == 0 and "is not v4agent's" in done.stderr
    assert [(m, p) for m, p, _ in github.requests] == [("GET", f"/api/v3/repos/{REPO}/pulls/100")]
    assert github.comments == {} and github.faults == []


def test_pull_request_target_is_refused(github: FakeGitHub, checkout: Path):
    done = ci(github, checkout, "pull_request_target", {"action": "opened"})
    assert done.returncode == 2 and done.stderr.startswith("error: pull_request_target runs with a write token")
    assert github.requests == []


def test_without_a_patch_the_comment_says_why_and_the_job_fails(github: FakeGitHub, checkout: Path, tmp_path: Path):
    script = write_script(tmp_path / "give-up.json", [
        {"tool_calls": [{"name": "run", "arguments": {"command": PYTEST}}]},
        {"content": "I cannot.", "tool_calls": [{"name": "submit", "arguments": {"summary": "no idea"}}]}])
    done = ci(github, checkout, "issue_comment", commented("@v4agent please fix"), script)
    assert done.returncode == 1, done.stderr
    assert github.faults == [] and github.pulls == {} and github.head("v4agent/issue-7") is None
    [comment] = github.comments.values()
    assert comment["issue"] == 7 and comment["body"].startswith("**v4agent**: no patch")
    assert "stopped: submitted after 2 turns" in comment["body"] and "the agent changed nothing" in comment["body"]
    assert "1 failed" in comment["body"] and "assert -1 == 5" in comment["body"]  # the test's own output


def test_settings_and_environment_mistakes_are_one_error_line(github: FakeGitHub, checkout: Path, tmp_path: Path):
    script = write_script(tmp_path / "s.json", fix_turns())
    done = subprocess.run([*CLI, "ci", "github", "--script", str(script)], cwd=checkout, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")})
    assert done.returncode == 2 and done.stderr.startswith("error: not a GitHub Actions job")
    no_token = {**github.env(), "GITHUB_TOKEN": ""}
    event = tmp_path / "e.json"
    event.write_text(json.dumps(labeled()))
    env = {**os.environ, **no_token, "GITHUB_EVENT_NAME": "issues", "GITHUB_EVENT_PATH": str(event)}
    done = subprocess.run([*CLI, "ci", "github", "--script", str(script)], cwd=checkout, capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2 and done.stderr.startswith("error: no GitHub token")
    done = ci(github, checkout, "issues", labeled(), script, "--allow", " , ")
    assert done.returncode == 2 and "--allow must not be empty" in done.stderr
    env_off = {"V4AGENT_SANDBOX": "off"}
    os.environ.update(env_off)
    try:
        done = ci(github, checkout, "issues", labeled(), script)
    finally:
        del os.environ["V4AGENT_SANDBOX"]
    assert done.returncode == 2 and "ci needs the sandbox" in done.stderr
    assert github.requests == []


# ---- fix --pr --------------------------------------------------------------------------------

def fix_pr(checkout: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "fix", "add(2, 3) returns -1", "--pr", "--json", *args], cwd=checkout,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_fix_pr_pushes_a_branch_and_opens_a_pull_request(github: FakeGitHub, checkout: Path, tmp_path: Path):
    script = write_script(tmp_path / "fix.json", fix_turns())
    env = {"GH_TOKEN": TOKEN, "GITHUB_SERVER_URL": github.url, "GITHUB_API_URL": github.url + "/api/v3"}
    done = fix_pr(checkout, env, "--script", str(script))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    [(number, pull)] = github.pulls.items()
    assert out["pull_request"] == f"{github.url}/{REPO}/pull/{number}" and out["branch"] == pull["head"]
    assert pull["head"].startswith("v4agent/add-2-3-returns-1-") and pull["base"] == "main"
    assert github.head(pull["head"]) == out["commit"] == git(checkout, "rev-parse", pull["head"]).strip()
    assert "Fixes #" not in pull["body"] and "M calc.py" in pull["body"] and f"$ {PYTEST}" in pull["body"]
    assert github.faults == [] and github.comments == {}
    _assert_no_token(tmp_path, github, done.stdout, done.stderr)


def test_fix_pr_checks_token_origin_and_sandbox_before_the_run(github: FakeGitHub, checkout: Path, tmp_path: Path):
    script = str(write_script(tmp_path / "fix.json", fix_turns()))
    no_token = {"GITHUB_TOKEN": "", "GH_TOKEN": ""}
    done = fix_pr(checkout, no_token, "--script", script)
    assert done.returncode == 2 and done.stderr.startswith("error: no GitHub token")
    done = fix_pr(checkout, {"GH_TOKEN": TOKEN}, "--script", script, "--sandbox", "off")
    assert done.returncode == 2 and "--pr needs the sandbox" in done.stderr
    done = fix_pr(checkout, {"GH_TOKEN": TOKEN}, "--script", script, "--branch", "x")
    assert done.returncode == 2 and "excludes --apply and --branch" in done.stderr
    git(checkout, "remote", "remove", "origin")
    done = fix_pr(checkout, {"GH_TOKEN": TOKEN}, "--script", script)
    assert done.returncode == 2 and "has no remote 'origin'" in done.stderr
    git(checkout, "checkout", "-q", "--detach")
    git(checkout, "remote", "add", "origin", f"{github.url}/{REPO}.git")
    done = fix_pr(checkout, {"GH_TOKEN": TOKEN}, "--script", script)
    assert done.returncode == 2 and "HEAD is detached" in done.stderr
    assert github.requests == [] and not (tmp_path / "cache" / "runs").exists()


# ---- the pieces ------------------------------------------------------------------------------

def test_the_phrase_is_a_word_of_its_own_and_is_taken_out_of_the_request():
    gate = Gate()
    for body, ask in [("@v4agent fix the parser", "fix the parser"), ("Hey @V4Agent: please.", "Hey : please."),
                      ("see above\n@v4agent", "see above")]:
        assert read_event("issue_comment", commented(body), gate, REPO).ask == ask
    for body in ("email me at x@v4agent.dev", "@v4agent-old fix", "mention v4agent", "`@v4agentx`"):
        with pytest.raises(Ignored):
            read_event("issue_comment", commented(body), gate, REPO)
    owners = Gate(associations=("owner",))
    assert read_event("issue_comment", commented("@v4agent go", association="OWNER"), owners, REPO).actor == "alice"
    with pytest.raises(EventError, match="lacks or mangles"):
        read_event("issue_comment", {"action": "created", "issue": {}}, gate, REPO)


def test_new_issues_and_reviews_ask_too_from_allowed_authors_only():
    from githubkit_schemas.latest.models import WebhookIssuesOpened, WebhookPullRequestReviewSubmitted

    def opened(association: str) -> dict[str, Any]:
        return documented(WebhookIssuesOpened, {
            "action": "opened", "issue": {"number": 9, "title": "crash on empty input", "body": "@v4agent please",
                                          "user": user("bob"), "author_association": association},
            "repository": {"full_name": REPO}, "sender": user("bob")})

    request = read_event("issues", opened("COLLABORATOR"), Gate(), REPO)
    assert (request.number, request.pull, request.actor, request.ask) == (9, False, "bob", "")
    with pytest.raises(Ignored, match="bob is FIRST_TIME_CONTRIBUTOR"):
        read_event("issues", opened("FIRST_TIME_CONTRIBUTOR"), Gate(), REPO)
    repo = {"full_name": REPO, "name": "calc"}
    review = documented(WebhookPullRequestReviewSubmitted, {
        "action": "submitted", "review": {"body": "@v4agent handle None too", "author_association": "MEMBER",
                                          "user": user("carol")},
        "pull_request": {"number": 100, "title": "v4agent: fix", "head": {"ref": "v4agent/issue-7", "repo": repo},
                         "base": {"ref": "main", "repo": repo}},
        "repository": {"full_name": REPO}, "sender": user("carol")})
    request = read_event("pull_request_review", review, Gate(), REPO)
    assert (request.number, request.pull, request.ask, request.where) == (100, True, "handle None too", "")


def outside_fences(markdown: str) -> list[str]:
    """The lines of `markdown` that are not inside a fenced code block (CommonMark: a fence of 3
    or more backticks is closed by a line of at least as many backticks and nothing else)."""
    outside, fence = [], ""
    for line in markdown.splitlines():
        if fence:
            if re.fullmatch(r" {0,3}`+\s*", line) and len(line.strip()) >= len(fence):
                fence = ""
        elif found := re.match(r" {0,3}(`{3,})", line):
            fence = found.group(1)
        else:
            outside.append(line)
    return outside


def test_text_from_issues_and_the_model_cannot_act_in_a_branch_name_or_a_pull_request():
    hostile = "\x1b]0;owned\x07Fix `x`\u202e ../../refs/heads/main @everyone Fixes #1 <img src=x>\n```\nclose"
    branch = text_branch(hostile)
    assert re.fullmatch(r"v4agent/[a-z0-9-]+", branch)
    assert subprocess.run(["git", "check-ref-format", f"refs/heads/{branch}"]).returncode == 0
    title = first_line(hostile, 60)
    assert "\x1b" not in title and "\u202e" not in title and "\\x1b" in title and len(title) <= 60
    body = pull_body(3, hostile + "\n`````\n@everyone", ["M a\x1bb @everyone"], [(hostile, "exit 0")], None)
    assert "\x1b" not in body and "\x07" not in body and "\u202e" not in body
    outside = outside_fences(body)
    assert "Fixes #3." in outside  # the check sees what is outside
    assert not [line for line in outside if "@everyone" in line or "Fixes #1" in line or "<img" in line]
    assert fenced("a\n```` b\n``") == "`````text\na\n```` b\n``\n`````"
    message = commit_message(hostile, "done\x1b[2J")
    assert message.startswith("v4agent: \\x1b]0;owned\\x07Fix") and "\x1b" not in message and "\x07" not in message


def test_the_remote_pushes_only_v4agents_branches(github: FakeGitHub, checkout: Path):
    remote = Remote(checkout, f"{github.url}/{REPO}.git", TOKEN)
    head = git(checkout, "rev-parse", "HEAD").strip()
    for branch in ("main", "refs/heads/v4agent/x", "feature/v4agent/x"):
        with pytest.raises(RemoteError, match="pushes only its own branches"):
            remote.push(head, branch)
    remote.push(head, "v4agent/x")
    assert github.head("v4agent/x") == head and github.head("main") == head
    wrong = Remote(checkout, f"{github.url}/{REPO}.git", "ghs_wrong_token_123")
    with pytest.raises(RemoteError) as e:
        wrong.push(head, "v4agent/y")
    assert "ghs_wrong_token_123" not in str(e.value) and github.head("v4agent/y") is None


def test_action_yml_runs_ci_github_with_flags_it_has():
    from typer.main import get_command

    from agent.cli import app

    action = yaml.safe_load((Path(__file__).parents[1] / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    flags = {o for p in get_command(app).commands["ci"].commands["github"].params for o in p.opts}
    [script] = [step["run"] for step in action["runs"]["steps"] if step.get("id") == "run"]
    assert '/v4agent" ci github "${args[@]}"' in script
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", script))
    assert used and used <= flags, used - flags
    for name in ("trigger-label", "trigger-phrase", "allowed-associations", "think", "max-turns", "base-branch",
                 "draft", "endpoint", "model", "api-key", "weights", "github-token"):
        assert name in action["inputs"] and f"inputs.{name}" in yaml.safe_dump(action["runs"]), name
