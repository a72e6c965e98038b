"""A loopback keyserver speaking the VKS API of keys.openpgp.org, serving ``layout.keyserver_dir``.

Run as its own process (``python -m carrier.sandbox.keyserver --root DIR``), started by `Keyserver`.
Keys are files named ``<address>.asc`` (and optionally ``<FINGERPRINT>.asc``), read at request
time, so keys written after start are served without a restart.

- ``GET /vks/v1/by-email/<url-encoded address>`` -> 200 ``application/pgp-keys`` or 404
- ``GET /vks/v1/by-fingerprint/<40 hex>``       -> 200 or 404 (upper-case hex, as VKS wants)
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from urllib.parse import unquote, urlsplit

from carrier.sandbox import procs
from carrier.sandbox.layout import LOOPBACK

log = logging.getLogger("carrier.sandbox.keyserver")

BY_EMAIL = "/vks/v1/by-email/"
BY_FINGERPRINT = "/vks/v1/by-fingerprint/"
# Deliberately narrow: enough for sandbox addresses, and nothing that can name another path.
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
FINGERPRINT_RE = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")


def key_file(key_dir: Path, path: str) -> tuple[int, Path | str]:
    """Map a request path to ``(200, file)`` or ``(status, message)``; never leaves ``key_dir``."""
    raw = urlsplit(path).path
    if raw.startswith(BY_EMAIL):
        wanted = unquote(raw[len(BY_EMAIL):])
        if not EMAIL_RE.fullmatch(wanted) or ".." in wanted:
            return 400, f"Invalid email address: {wanted!r}"
        name = wanted.lower()
        what = f"No key found for email address {wanted}"
    elif raw.startswith(BY_FINGERPRINT):
        wanted = unquote(raw[len(BY_FINGERPRINT):])
        if not FINGERPRINT_RE.fullmatch(wanted):
            return 400, "Invalid fingerprint: use upper-case hex without spaces"
        name = wanted
        what = f"No key found for fingerprint {wanted}"
    else:
        return 404, "Not found: use /vks/v1/by-email/<address> or /vks/v1/by-fingerprint/<FPR>"
    candidate = key_dir / f"{name}.asc"
    # The regexes already exclude separators; the containment check guards against symlinks too.
    try:
        resolved = candidate.resolve(strict=True)
    except OSError:
        return 404, what
    if resolved.parent != key_dir.resolve() or not resolved.is_file():
        return 404, what
    return 200, resolved


class VksHandler(BaseHTTPRequestHandler):
    """Answers VKS lookups from the key directory set on the server."""

    server_version = "CarrierSandboxVKS/1"
    key_dir: Path  # set by make_server on a subclass

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        status, result = key_file(self.key_dir, self.path)
        if isinstance(result, Path):
            try:
                body = result.read_bytes()
            except OSError:
                status, body = 404, b"No key found\n"
            content_type = "application/pgp-keys"
        else:
            body = (result + "\n").encode()
            content_type = "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)


def make_server(key_dir: Path, host: str, port: int) -> ThreadingHTTPServer:
    """A ready (bound) server for ``key_dir``; call ``serve_forever``."""
    handler = type("BoundVksHandler", (VksHandler,), {"key_dir": key_dir})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: Sequence[str] | None = None) -> int:
    layout = procs.daemon_layout("carrier.sandbox.keyserver", (__doc__ or "").split("\n")[0], argv)
    try:
        server = make_server(layout.keyserver_dir, LOOPBACK, layout.ports.keyserver)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", LOOPBACK, layout.ports.keyserver, exc)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # shutdown() blocks until serve_forever returns, so it must run outside the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving %s on http://%s:%d", layout.keyserver_dir, LOOPBACK, layout.ports.keyserver)
    with server:
        server.serve_forever()
    log.info("stopped")
    return 0


class Keyserver(procs.PidFileService):
    """Starts and stops the keyserver process."""

    name = "keyserver"

    @property
    def url(self) -> str:
        """Base URL to configure as Carrier's keyserver."""
        return f"http://{LOOPBACK}:{self.layout.ports.keyserver}"

    def ports(self) -> list[tuple[str, int, str]]:
        return [(LOOPBACK, self.layout.ports.keyserver, "keyserver")]

    def prepare(self) -> None:
        procs.ensure_meta(self.layout)
        self.layout.keyserver_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        if self.running():
            return
        self.prepare()
        self.launch(*procs.python_module("carrier.sandbox.keyserver", "--root", str(self.layout.root)))


if __name__ == "__main__":
    sys.exit(main())
