"""A real HTTP server on 127.0.0.1 standing in for a chat completions endpoint: every POST is
answered by a function of the request handler, and every request (path, headers, JSON body) is
kept for the test to look at."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[BaseHTTPRequestHandler], None]


class Endpoint:
    """HTTP/1.1, one request per connection; `answer(handler)` writes the whole response."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.close_connection = True
                try:
                    endpoint.answer(self)
                except OSError:
                    pass  # the client hung up (it gave up, as it should)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def endpoints() -> Iterator[Callable[..., Endpoint]]:
    """`start(answer, tls=None)` -> a running Endpoint; all of them are closed on exit."""
    started: list[Endpoint] = []

    def start(answer: Answer, tls: ssl.SSLContext | None = None) -> Endpoint:
        started.append(Endpoint(answer, tls))
        return started[-1]

    try:
        yield start
    finally:
        for endpoint in started:
            endpoint.close()
