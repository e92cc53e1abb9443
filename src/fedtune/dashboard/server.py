"""The dashboard's HTTP server: one page, its bundled assets, and the run as JSON. GET only.

What is notable:
- Three routes: `/` (the page), `/static/<name>` (a fixed list of bundled files, read once at start: no
  path ever reaches the file system), `/api/run` (the `RunSummary` of the run directory). Everything else
  is 404, any method but GET and HEAD 405: there is no write endpoint at all.
- Bound to 127.0.0.1 by default. On loopback without a token, a request must name a loopback host in its
  `Host` header, so a web page elsewhere cannot reach the API by DNS rebinding. Listening on any other
  interface needs a token (`secrets.token_urlsafe`, printed at start); the page asks for it and sends it
  in the `X-Fedtune-Token` header, compared in constant time (`hmac.compare_digest`). The page and its
  assets hold no run data and are served without it; `/api/run` is not.
- `ThreadingHTTPServer` in a daemon thread: the run never waits on it, a slow browser never waits on
  another, and a request that fails is answered 500 and logged; the server carries on.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from fedtune.dashboard.watch import RunWatcher
from fedtune.errors import ConfigError

log = logging.getLogger("fedtune.dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
TOKEN_HEADER = "X-Fedtune-Token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
STATIC_FILES = ("dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE.txt")
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name, IPv6 with or without brackets) is this machine only."""
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_matches(expected: str | None, given: str | None) -> bool:
    """No token expected: any request; otherwise the same token, compared in constant time."""
    if expected is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def required_token(host: str, token: str | None) -> str | None:
    """The token a dashboard on `host` requires: the one given; on loopback none; elsewhere a new one."""
    if token is not None and not token:
        raise ConfigError("an empty dashboard token would let anyone in; leave it out to get one")
    if token is None and not is_loopback(host):
        return secrets.token_urlsafe(32)
    return token


def _host_name(header: str | None) -> str | None:
    """The name in a `Host` header, without its port (`[::1]:8050` -> `::1`)."""
    if not header:
        return None
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else None
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("fedtune.dashboard") / "static"
    files = {name: ((folder / name).read_bytes(), _CONTENT_TYPES[Path(name).suffix]) for name in STATIC_FILES}
    files["index.html"] = ((folder / "index.html").read_bytes(), _CONTENT_TYPES[".html"])
    return files


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], watcher: RunWatcher, token: str | None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.watcher = watcher
        self.token = token
        self.static = _load_static()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "fedtune-dashboard"
    sys_version = ""
    timeout = 30  # seconds a silent connection may hold its thread

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _refuse_method(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            _error("the dashboard only reads: GET and HEAD"),
            "application/json",
            body=True,
            extra={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _answer(self, *, body: bool) -> None:
        try:
            status, payload, content_type, extra = self._route()
        except Exception:  # a request that fails is answered, never the end of the server
            log.exception("dashboard: %s failed", self.path)
            status, payload, content_type, extra = (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                _error("the run could not be read; see the dashboard's log"),
                "application/json",
                {},
            )
        self._send(status, payload, content_type, body=body, extra=extra)

    def _route(self) -> tuple[HTTPStatus, bytes, str, dict[str, str]]:
        app = self.server
        if app.token is None and not is_loopback(_host_name(self.headers.get("Host")) or ""):
            return (
                HTTPStatus.MISDIRECTED_REQUEST,
                _error("this dashboard answers loopback hosts only"),
                "application/json",
                {},
            )
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            content, content_type = app.static["index.html"]
            return HTTPStatus.OK, content, content_type, {"Cache-Control": "no-cache"}
        if path.startswith("/static/") and path.removeprefix("/static/") in STATIC_FILES:
            content, content_type = app.static[path.removeprefix("/static/")]
            return HTTPStatus.OK, content, content_type, {"Cache-Control": "no-cache"}
        if path == "/api/run":
            if not token_matches(app.token, self.headers.get(TOKEN_HEADER)):
                return (
                    HTTPStatus.UNAUTHORIZED,
                    _error("a token is required: the one printed at start"),
                    "application/json",
                    {},
                )
            summary = json.dumps(asdict(app.watcher.summary()), allow_nan=False, separators=(",", ":"))
            return HTTPStatus.OK, summary.encode(), "application/json", {"Cache-Control": "no-store"}
        return HTTPStatus.NOT_FOUND, _error(f"no such page: {path[:200]}"), "application/json", {}

    def _send(
        self, status: HTTPStatus, payload: bytes, content_type: str, *, body: bool, extra: dict[str, str]
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in {**_SECURITY_HEADERS, **extra}.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class DashboardServer:
    """The dashboard of one run directory, served from a daemon thread until `stop` (or the `with`)."""

    def __init__(
        self, run_dir: Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None
    ) -> None:
        self.host = host
        self.token = token = required_token(host, token)
        try:
            self._httpd = _HTTPServer((host.strip("[]"), port), RunWatcher(run_dir), token)
        except OSError as err:
            raise ConfigError(
                f"the dashboard cannot listen on {host}:{port} ({err.strerror or err}): pass another --port "
                "or --host"
            ) from err
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port bound (the one asked for, or the system's choice for 0)."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.host.strip("[]")
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.1,), name="fedtune-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
