"""``alignscope view``: serve one report file on 127.0.0.1, and nothing else.

Why a server at all: some browsers restrict ``file://`` pages, and a URL is easier to open from a
remote shell through an SSH tunnel. The handler answers ``/`` and ``/report.html`` with the report
(re-read on each request, so a rebuild shows on reload); every other path is 404, so the run
directory's other files are never exposed. Requests whose Host header is not this loopback address
are refused, which defeats DNS-rebinding pages trying to read the report from another origin.
"""

from __future__ import annotations

import http.server
from functools import partial
from pathlib import Path
from typing import Any

from alignscope.errors import InputError
from alignscope.report.build import CSP

HOST = "127.0.0.1"
ROUTES = ("/", "/report.html")


class ReportHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the report file only."""

    server_version = "alignscope"
    sys_version = ""

    def __init__(self, *args: Any, report: Path, quiet: bool = False, **kwargs: Any) -> None:
        self.report = report
        self.quiet = quiet
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        port = self.server.server_address[1]
        if self.headers.get("Host") not in (f"{HOST}:{port}", f"localhost:{port}"):
            self.send_error(403, "unexpected Host header")
            return
        if self.path.split("?", 1)[0] not in ROUTES:
            self.send_error(404, "only the report is served here")
            return
        try:
            data = self.report.read_bytes()
        except OSError:
            self.send_error(404, "report file is gone; rerun `alignscope report`")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.quiet:
            super().log_message(format, *args)


def make_server(report: Path, port: int = 8000, *, quiet: bool = False) -> http.server.ThreadingHTTPServer:
    """A server bound to 127.0.0.1 (port 0 picks a free one); call ``serve_forever`` on it."""
    if not Path(report).is_file():
        raise InputError(f"{report}: no report to serve; run `alignscope report RUN` first")
    handler = partial(ReportHandler, report=Path(report), quiet=quiet)
    try:
        return http.server.ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        raise InputError(f"cannot listen on {HOST}:{port} ({exc.strerror}); pick another --port") from None


def url(server: http.server.HTTPServer) -> str:
    return f"http://{HOST}:{server.server_address[1]}/"
