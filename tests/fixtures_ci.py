"""A GitHub on 127.0.0.1 for the CI tests: the REST endpoints v4agent calls, and git's smart HTTP
protocol served by the real `git http-backend`, both behind the token.

REST: every request body is validated against githubkit's request models (generated from
GitHub's OpenAPI description) with no key outside them, and every answer is an instance of the
documented response model (`documented`), validated before it is sent. Anything else — another
endpoint, a bad body, a missing or wrong token, two Authorization headers — is answered as GitHub
would (404, 422, 401) and recorded in `faults`, which the tests require to be empty.

Event payloads are built the same way: `documented(WebhookIssuesLabeled, {...})` is a payload
of that webhook's documented shape with the values given.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel

API = "/api/v3"


def documented(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """A JSON instance of `model` (a githubkit model): its required fields filled with plain values
    of their documented types, `values` (nested dicts) set over them; validated by the model."""
    schema = model.model_json_schema()
    instance = _fill(schema, schema.get("$defs", {}), values)
    model.model_validate(instance)
    return instance


def _fill(schema: dict[str, Any], defs: dict[str, Any], given: Any) -> Any:
    if "$ref" in schema:
        return _fill(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, given)
    # githubkit writes an optional field as "<UNSET>", the value, or null: a payload has the value.
    options = [o for o in schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf") or []
               if o.get("const") != "<UNSET>"]
    if options:
        if given is None and any(o.get("type") == "null" for o in options):
            return None
        if given is not None and not isinstance(given, dict):
            return given
        return _fill(next(o for o in options if o.get("type") != "null"), defs, given)
    if given is not None and not isinstance(given, dict):
        return given
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("type") == "object" or "properties" in schema:
        given = given or {}
        properties = schema.get("properties", {})
        names = [n for n in properties if n in schema.get("required", ()) or n in given]
        filled = {n: _fill(properties[n], defs, given.get(n)) for n in names}
        return filled | {k: v for k, v in given.items() if k not in properties}
    plain = {"array": [], "integer": 1, "number": 1.0, "boolean": False, "null": None}
    if schema.get("type") == "string":
        return {"date-time": "2026-01-01T00:00:00Z", "uri": "https://example.com/x", "email": "a@example.com"}.get(
            schema.get("format", ""), "x")
    return plain.get(schema.get("type", "null"))


def user(login: str, kind: str = "User") -> dict[str, Any]:
    return {"login": login, "type": kind, "id": abs(hash(login)) % 10**6}


@dataclass
class FakeGitHub:
    """GitHub for one repository `owner/name` whose bare repository is `bare`, behind `token`."""

    root: Path
    full_name: str
    token: str
    issues: dict[int, dict[str, Any]] = field(default_factory=dict)
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)
    pulls: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)  # REST: method, path, body
    faults: list[str] = field(default_factory=list)
    url: str = ""

    @property
    def bare(self) -> Path:
        return self.root / f"{self.full_name}.git"

    def start(self) -> FakeGitHub:
        self.bare.mkdir(parents=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def env(self) -> dict[str, str]:
        """What an Actions runner sets for this GitHub."""
        return {"GITHUB_SERVER_URL": self.url, "GITHUB_API_URL": self.url + API, "GITHUB_REPOSITORY": self.full_name,
                "GITHUB_TOKEN": self.token, "GITHUB_RUN_ID": "4242"}

    def head(self, branch: str) -> str | None:
        done = subprocess.run(["git", "rev-parse", "--verify", "-q", f"refs/heads/{branch}"], cwd=self.bare,
                              capture_output=True, text=True)
        return done.stdout.strip() or None

    # ---- REST ------------------------------------------------------------------------------

    def rest(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        from githubkit_schemas.latest import models as m

        prefix = f"{API}/repos/{self.full_name}"
        route = path[len(prefix):] if path.startswith(prefix + "/") else None
        routes = [
            ("GET", r"/issues/(\d+)", None, self._get_issue),
            ("POST", r"/issues/(\d+)/comments", m.ReposOwnerRepoIssuesIssueNumberCommentsPostBody, self._comment),
            ("PATCH", r"/issues/comments/(\d+)", m.ReposOwnerRepoIssuesCommentsCommentIdPatchBody, self._edit),
            ("GET", r"/pulls", None, self._list_pulls),
            ("POST", r"/pulls", m.ReposOwnerRepoPullsPostBody, self._open_pull),
            ("GET", r"/pulls/(\d+)", None, self._get_pull),
        ]
        for verb, pattern, model, answer in routes:
            found = re.fullmatch(pattern, route or "")
            if verb == method and found:
                if model is not None:
                    problem = _invalid(model, body)
                    if problem:
                        self.faults.append(f"{method} {path}: {problem}")
                        return 422, {"message": "Validation Failed", "errors": [problem],
                                     "documentation_url": "https://docs.github.com/rest"}
                return answer(*(int(g) for g in found.groups()), query=query, body=body)
        self.faults.append(f"{method} {path}: not an endpoint v4agent should call")
        return 404, {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}

    def _get_issue(self, number: int, **_: Any) -> tuple[int, Any]:
        from githubkit_schemas.latest.models import Issue

        if number not in self.issues:
            return 404, {"message": "Not Found"}
        return 200, documented(Issue, {"number": number, **self.issues[number]})

    def _comment(self, number: int, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        comment = len(self.comments) + 1
        self.comments[comment] = {"issue": number, "body": body["body"], "edits": []}
        return 201, self._comment_json(comment)

    def _edit(self, comment: int, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        if comment not in self.comments:
            return 404, {"message": "Not Found"}
        self.comments[comment]["edits"].append(self.comments[comment]["body"])
        self.comments[comment]["body"] = body["body"]
        return 200, self._comment_json(comment)

    def _comment_json(self, comment: int) -> dict[str, Any]:
        from githubkit_schemas.latest.models import IssueComment

        c = self.comments[comment]
        return documented(IssueComment, {"id": comment, "body": c["body"], "user": user("github-actions[bot]", "Bot"),
                                         "html_url": f"{self.url}/{self.full_name}/issues/{c['issue']}#{comment}"})

    def _list_pulls(self, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        from githubkit_schemas.latest.models import PullRequestSimple

        owner = self.full_name.split("/")[0]
        found = [n for n, p in self.pulls.items() if p["state"] == query.get("state", "open")
                 and ("head" not in query or query["head"] == f"{owner}:{p['head']}")]
        return 200, [documented(PullRequestSimple, self._pull_values(n)) for n in found]

    def _open_pull(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        from githubkit_schemas.latest.models import PullRequest

        for side in ("head", "base"):
            if self.head(body[side]) is None:
                return 422, {"message": "Validation Failed", "errors": [{"field": side, "code": "invalid"}]}
        number = 100 + len(self.pulls)
        self.pulls[number] = {"title": body["title"], "body": body.get("body"), "head": body["head"],
                              "base": body["base"], "draft": body.get("draft", False), "state": "open",
                              "repository": self.full_name}
        return 201, documented(PullRequest, self._pull_values(number))

    def _get_pull(self, number: int, **_: Any) -> tuple[int, Any]:
        from githubkit_schemas.latest.models import PullRequest

        if number not in self.pulls:
            return 404, {"message": "Not Found"}
        return 200, documented(PullRequest, self._pull_values(number))

    def _pull_values(self, number: int) -> dict[str, Any]:
        p = self.pulls[number]
        repo = {"full_name": p["repository"], "name": p["repository"].split("/")[1],
                "owner": user(p["repository"].split("/")[0])}
        return {"number": number, "title": p["title"], "body": p["body"], "state": p["state"], "draft": p["draft"],
                "html_url": f"{self.url}/{self.full_name}/pull/{number}",
                "head": {"ref": p["head"], "sha": self.head(p["head"]) or "0" * 40, "repo": repo},
                "base": {"ref": p["base"], "sha": self.head(p["base"]) or "0" * 40, "repo": repo}}

    # ---- git --------------------------------------------------------------------------------

    def basic(self, token: str | None = None) -> str:
        return "Basic " + base64.b64encode(f"x-access-token:{token or self.token}".encode()).decode()


def _invalid(model: type[BaseModel], body: Any) -> str | None:
    """Why `body` is not a valid `model` (a key outside it counts), or None."""
    from pydantic import ValidationError

    if not isinstance(body, dict):
        return "the body is not a JSON object"
    known = {f.alias or name for name, f in model.model_fields.items()}
    if set(body) - known:
        return f"unknown keys {sorted(set(body) - known)}"
    try:
        model.model_validate(body)
    except ValidationError as e:
        return str(e.errors()[0])
    return None


def _handler(github: FakeGitHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        do_POST = do_PATCH = do_GET

        def _serve(self) -> None:
            body = self._body()
            path, _, query = self.path.partition("?")
            if path.startswith(API + "/"):
                self._rest(path, query, body)
            else:
                self._git(path, query, body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorized(self, expected: str) -> bool:
            given = self.headers.get_all("Authorization") or []
            if given == [expected]:
                return True
            github.faults.append(f"{self.command} {self.path}: {len(given)} Authorization headers, "
                                 f"{'not ' if expected not in given else ''}the token's")
            return False

        def _rest(self, path: str, query: str, raw: bytes) -> None:
            if not self._authorized(f"token {github.token}"):
                return self._answer(401, {"message": "Bad credentials"})
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                github.faults.append(f"{self.command} {path}: the body is not JSON")
                return self._answer(400, {"message": "Problems parsing JSON"})
            github.requests.append((self.command, path, body))
            pairs = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            from urllib.parse import unquote

            status, answer = github.rest(self.command, path, {k: unquote(v) for k, v in pairs.items()}, body)
            self._answer(status, answer)

        def _answer(self, status: int, answer: Any) -> None:
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _git(self, path: str, query: str, body: bytes) -> None:
            if not self._authorized(github.basic()):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="GitHub"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            env = {"GIT_PROJECT_ROOT": str(github.root), "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
                   "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": "x-access-token",
                   "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                   "CONTENT_LENGTH": str(len(body)), "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                   "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""), "PATH": "/usr/bin:/bin"}
            out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
            # The CGI headers end at the first blank line, written with CRLF or LF.
            end = min((out.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n") if sep in out)
            cgi, rest = out[:end[0]], out[end[0] + len(end[1]):]
            headers = [line.split(":", 1) for line in cgi.decode().splitlines() if ":" in line]
            status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
            self.send_response(status)
            for key, value in headers:
                if key.lower() != "status":
                    self.send_header(key, value.strip())
            self.send_header("Content-Length", str(len(rest)))
            self.end_headers()
            self.wfile.write(rest)

    return Handler
