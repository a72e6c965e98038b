"""A loopback OAuth2 provider for the sandbox: the stand-in for Google's or Microsoft's token service.

Run as its own process (``python -m carrier.sandbox.tokenserver --root DIR``), started by `TokenServer`.
Dovecot's ``oauth2`` passdb and the sandbox submission server check access tokens against its
introspection endpoint; Carrier gets them from its token endpoint. State lives in memory.

Clients: ``carrier-sandbox`` (confidential: its secret is ``layout.oauth_client_secret_file``) and
``carrier-public`` (no secret). Users: the sandbox addresses.

- ``POST /token``       RFC 6749 refresh grant and RFC 8628 device-code grant -> JSON tokens or errors
- ``POST /device``      RFC 8628 device authorization -> device_code, user_code, verification_uri
- ``POST /introspect``  RFC 7662 -> ``{"active": true, "username": ..., "exp": ...}`` or inactive
- ``POST /revoke``      RFC 7009: revoke a refresh token (and its access tokens) or an access token
- ``POST /device/approve``   what the user does on the verification page: ``user_code``, ``username``
  (``deny=1`` to refuse)
- ``POST /admin/grant``      a refresh token for ``username`` and ``client_id`` without the device flow
- ``POST /admin/lifetime``   ``seconds``: the lifetime of access tokens issued from now on
- ``GET /admin/stats``       how many refresh grants and introspections each user had
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from carrier.sandbox import procs
from carrier.sandbox.layout import IDENTITIES, LOOPBACK, Layout, address

log = logging.getLogger("carrier.sandbox.tokenserver")

CONFIDENTIAL_CLIENT = "carrier-sandbox"
PUBLIC_CLIENT = "carrier-public"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_LIFETIME = 3600.0
DEVICE_INTERVAL = 1
DEVICE_LIFETIME = 600.0
MAX_BODY = 64 * 1024


class OAuthFailure(Exception):
    """An OAuth2 error response: ``error`` code, description, HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass
class _Access:
    username: str
    client_id: str
    expires: float
    refresh: str | None


@dataclass
class _Device:
    client_id: str
    user_code: str
    scope: str
    expires: float
    state: str = "pending"  # pending | approved | denied | used
    username: str | None = None
    last_poll: float = 0.0


@dataclass
class ProviderState:
    """Clients, grants and tokens of the stand-in provider (thread-safe)."""

    clients: Mapping[str, str | None]
    users: frozenset[str]
    lifetime: float = DEFAULT_LIFETIME
    refresh: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (username, client)
    access: dict[str, _Access] = field(default_factory=dict)
    devices: dict[str, _Device] = field(default_factory=dict)  # device_code -> request
    refreshes: Counter[str] = field(default_factory=Counter)
    introspections: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- client authentication ---

    def _client(self, form: Mapping[str, str]) -> str:
        client_id = form.get("client_id", "")
        if client_id not in self.clients:
            raise OAuthFailure("invalid_client", "unknown client_id", 401)
        expected = self.clients[client_id]
        if expected is not None and not secrets.compare_digest(
            form.get("client_secret", "").encode(), expected.encode()
        ):
            raise OAuthFailure("invalid_client", "client authentication failed", 401)
        return client_id

    def _issue(self, username: str, client_id: str, refresh: str | None) -> dict[str, Any]:
        token = "at-" + secrets.token_urlsafe(24)
        self.access[token] = _Access(username, client_id, time.time() + self.lifetime, refresh)
        return {"access_token": token, "token_type": "Bearer", "expires_in": int(self.lifetime) or 1,
                "scope": "mail"}

    # --- endpoints ---

    def token(self, form: Mapping[str, str]) -> dict[str, Any]:
        with self.lock:
            client_id = self._client(form)
            grant = form.get("grant_type", "")
            if grant == "refresh_token":
                refresh = form.get("refresh_token", "")
                owner = self.refresh.get(refresh)
                if owner is None or owner[1] != client_id:
                    raise OAuthFailure("invalid_grant", "Token has been expired or revoked.")
                self.refreshes[owner[0]] += 1
                return self._issue(owner[0], client_id, refresh)
            if grant == DEVICE_GRANT:
                return self._device_token(form.get("device_code", ""), client_id)
            raise OAuthFailure("unsupported_grant_type", f"grant_type {grant[:40]!r} is not supported")

    def _device_token(self, device_code: str, client_id: str) -> dict[str, Any]:
        request = self.devices.get(device_code)
        if request is None or request.client_id != client_id:
            raise OAuthFailure("invalid_grant", "unknown device_code")
        now = time.time()
        if now > request.expires:
            raise OAuthFailure("expired_token", "the device code expired")
        if request.state == "denied":
            raise OAuthFailure("access_denied", "the user refused access")
        if request.state == "used":
            raise OAuthFailure("invalid_grant", "the device code was already used")
        if request.state == "pending":
            too_soon = now - request.last_poll < DEVICE_INTERVAL * 0.5
            request.last_poll = now
            if too_soon:
                raise OAuthFailure("slow_down", "polling too often")
            raise OAuthFailure("authorization_pending", "the user has not answered yet")
        assert request.username is not None
        request.state = "used"
        refresh = "rt-" + secrets.token_urlsafe(24)
        self.refresh[refresh] = (request.username, client_id)
        return {**self._issue(request.username, client_id, refresh), "refresh_token": refresh}

    def device(self, form: Mapping[str, str], base_url: str) -> dict[str, Any]:
        with self.lock:
            client_id = self._client(form)
            device_code = "dc-" + secrets.token_urlsafe(24)
            user_code = "-".join(secrets.token_hex(2).upper() for _ in range(2))
            self.devices[device_code] = _Device(client_id, user_code, form.get("scope", ""),
                                                time.time() + DEVICE_LIFETIME)
            return {"device_code": device_code, "user_code": user_code,
                    "verification_uri": f"{base_url}/device/approve",
                    "expires_in": int(DEVICE_LIFETIME), "interval": DEVICE_INTERVAL}

    def approve(self, form: Mapping[str, str]) -> dict[str, Any]:
        with self.lock:
            user_code = form.get("user_code", "").strip().upper()
            username = form.get("username", "").lower()
            found = [r for r in self.devices.values() if r.user_code == user_code and r.state == "pending"]
            if not found:
                raise OAuthFailure("invalid_request", "no pending request with that user code", 404)
            if username not in self.users:
                raise OAuthFailure("invalid_request", "unknown user", 404)
            found[0].state = "denied" if form.get("deny") else "approved"
            found[0].username = username
            return {"state": found[0].state}

    def introspect(self, form: Mapping[str, str]) -> dict[str, Any]:
        with self.lock:
            entry = self.access.get(form.get("token", ""))
            if entry is None or entry.expires <= time.time():
                self.introspections["(inactive)"] += 1
                return {"active": False}
            self.introspections[entry.username] += 1
            return {"active": True, "username": entry.username, "client_id": entry.client_id,
                    "exp": int(entry.expires), "token_type": "Bearer", "scope": "mail"}

    def revoke(self, form: Mapping[str, str]) -> dict[str, Any]:
        with self.lock:
            token = form.get("token", "")
            if self.refresh.pop(token, None) is not None:
                for key in [k for k, v in self.access.items() if v.refresh == token]:
                    del self.access[key]
            else:
                self.access.pop(token, None)
            return {}  # RFC 7009: 200 whether or not the token was known

    def grant(self, form: Mapping[str, str]) -> dict[str, Any]:
        with self.lock:
            username, client_id = form.get("username", "").lower(), form.get("client_id", "")
            if username not in self.users or client_id not in self.clients:
                raise OAuthFailure("invalid_request", "unknown username or client_id", 404)
            refresh = "rt-" + secrets.token_urlsafe(24)
            self.refresh[refresh] = (username, client_id)
            return {"refresh_token": refresh}

    def set_lifetime(self, form: Mapping[str, str]) -> dict[str, Any]:
        try:
            seconds = float(form.get("seconds", ""))
        except ValueError:
            raise OAuthFailure("invalid_request", "seconds must be a number") from None
        if not 1 <= seconds <= 86400:
            raise OAuthFailure("invalid_request", "seconds must be 1-86400")
        with self.lock:
            self.lifetime = seconds
        return {"lifetime": seconds}

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"refreshes": dict(self.refreshes), "introspections": dict(self.introspections),
                    "lifetime": self.lifetime}


class TokenHandler(BaseHTTPRequestHandler):
    """Routes requests to the ProviderState set on the server class."""

    server_version = "CarrierSandboxOAuth/1"
    state: ProviderState  # set by make_server on a subclass
    base_url: str

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise OAuthFailure("invalid_request", "request too large", 413)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def do_POST(self) -> None:
        routes = {
            "/token": self.state.token,
            "/introspect": self.state.introspect,
            "/revoke": self.state.revoke,
            "/device/approve": self.state.approve,
            "/admin/grant": self.state.grant,
            "/admin/lifetime": self.state.set_lifetime,
        }
        path = urlsplit(self.path).path
        try:
            form = self._form()
            if path == "/device":
                answer = self.state.device(form, self.base_url)
            elif path in routes:
                answer = routes[path](form)
            else:
                raise OAuthFailure("not_found", f"no endpoint {path[:80]}", 404)
        except OAuthFailure as exc:
            self._json(exc.status, {"error": exc.error, "error_description": exc.description})
            return
        self._json(200, answer)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/admin/stats":
            self._json(200, self.state.stats())
        else:
            self._json(404, {"error": "not_found", "error_description": "POST to the OAuth2 endpoints"})

    def _json(self, status: int, data: Mapping[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # The request line only (tokens travel in POST bodies, never in URLs).
        log.info("%s %s", self.address_string(), format % args)


def client_secret(layout: Layout) -> str:
    """The secret of the confidential sandbox client (written by `TokenServer.prepare`)."""
    return layout.oauth_client_secret_file.read_text().splitlines()[0]


def make_server(layout: Layout, host: str, port: int) -> ThreadingHTTPServer:
    """A ready (bound) provider for ``layout``; call ``serve_forever``."""
    state = ProviderState(
        clients={CONFIDENTIAL_CLIENT: client_secret(layout), PUBLIC_CLIENT: None},
        users=frozenset(address(i) for i in IDENTITIES),
    )
    base_url = f"http://{host}:{port}"
    handler = type("BoundTokenHandler", (TokenHandler,), {"state": state, "base_url": base_url})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: Sequence[str] | None = None) -> int:
    layout = procs.daemon_layout("carrier.sandbox.tokenserver", (__doc__ or "").split("\n")[0], argv)
    try:
        server = make_server(layout, LOOPBACK, layout.ports.oauth)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", LOOPBACK, layout.ports.oauth, exc)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("OAuth2 provider on http://%s:%d", LOOPBACK, layout.ports.oauth)
    with server:
        server.serve_forever()
    log.info("stopped")
    return 0


class TokenServer(procs.PidFileService):
    """Starts and stops the token server process."""

    name = "oauth"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.layout.ports.oauth}"

    def ports(self) -> list[tuple[str, int, str]]:
        return [(LOOPBACK, self.layout.ports.oauth, "oauth token server")]

    def prepare(self) -> None:
        procs.ensure_meta(self.layout)
        path: Path = self.layout.oauth_client_secret_file
        if not path.exists() or not path.read_text().strip():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(18) + "\n")
        path.chmod(0o600)

    def start(self) -> None:
        if self.running():
            return
        self.prepare()
        self.launch(*procs.python_module("carrier.sandbox.tokenserver", "--root", str(self.layout.root)))


if __name__ == "__main__":
    sys.exit(main())
