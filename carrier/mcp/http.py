"""The MCP door over streamable HTTP: the SDK's app behind Carrier's guard, served by uvicorn with TLS.

Every HTTP request goes through :class:`GuardMiddleware` first, which asks the trust layer's
``HttpGuard`` (network gate → per-address rate limit → token → per-token/identity rate limits):

- an address the gate refuses gets 403 and a rate-limited one 429 (``Retry-After``), before any
  token is looked at and before any tool runs;
- a missing, unknown, expired or revoked token goes on to the SDK's bearer-auth layer, whose
  ``token_verifier`` (:class:`GuardVerifier`) only accepts a token the guard admitted in this very
  request: the client gets the SDK's 401 with ``WWW-Authenticate``;
- an admitted request carries its :class:`~carrier.auth.policy.Identity` in the ASGI scope, where
  the tools read it (``carrier.mcp.tools_ops.caller``), so jobs and audit rows name the caller.

Plain HTTP is refused unless asked for explicitly, and then only on a loopback address.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl
from starlette.types import ASGIApp, Receive, Scope, Send

from carrier.auth.errors import AuthError, RateLimited, TokenError
from carrier.auth.netgate import HttpGuard, bearer_token
from carrier.auth.policy import Identity
from carrier.auth.service import Trust
from carrier.config import Config
from carrier.errors import CarrierError
from carrier.jobs.system import JobSystem
from carrier.mcp.edges import GuardedH11Protocol
from carrier.mcp.server import ServerContext, build_server
from carrier.mcp.tools_ops import IDENTITY_SCOPE_KEY, Services, attach_services
from carrier.store import Store

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
#: The identity the guard admitted for the request being handled (read by the token verifier).
_admitted: contextvars.ContextVar[tuple[str, Identity] | None] = contextvars.ContextVar(
    "carrier_admitted", default=None
)


class HttpDoorError(CarrierError):
    """The HTTP door cannot start as configured."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GuardVerifier:
    """The SDK's token verifier: accepts exactly the token the guard admitted for this request."""

    async def verify_token(self, token: str) -> AccessToken | None:
        admitted = _admitted.get()
        if admitted is None or admitted[0] != token:
            return None
        identity = admitted[1]
        return AccessToken(
            token=token,
            client_id=identity.name,
            scopes=list(identity.scopes or ()),
            claims={"role": identity.role, "token_id": identity.token_id},
        )


async def _plain(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Gate, rate limits and token check before the SDK app sees a request (see the module doc)."""

    def __init__(self, app: ASGIApp, trust: Trust) -> None:
        self.app = app
        self.trust = trust
        self.guard: HttpGuard = trust.http_guard

    def _admit(self, peer: str, authorization: str | None) -> Identity:
        try:
            return self.guard.admit(peer, authorization)
        except TokenError as exc:
            # The client gets one answer for every token failure; the reason is kept here. Only
            # token failures are audited: they come after the address rate limit, so a flood
            # cannot grow the audit trail without bound (refused addresses are only logged).
            self.trust.audit.record(
                "anonymous",
                "mcp",
                "http:admit",
                target=peer,
                outcome=exc.reason,
                detail={"message": str(exc)},
            )
            raise
        except AuthError as exc:
            log.warning("mcp http request refused", extra={"peer": peer, "reason": exc.reason})
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = client[0] if client else ""
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
        try:
            identity = await anyio.to_thread.run_sync(self._admit, peer, authorization)
        except RateLimited as exc:
            await _plain(
                send,
                429,
                "too many requests: slow down",
                [(b"retry-after", str(max(1, int(exc.retry_after + 0.999))).encode())],
            )
            return
        except TokenError:
            # The SDK answers 401 with WWW-Authenticate (the verifier admits nothing here).
            await self.app(scope, receive, send)
            return
        except AuthError as exc:
            status = 403 if exc.reason == "ip_denied" else 401
            await _plain(send, status, "forbidden" if status == 403 else "unauthorized")
            return
        scope[IDENTITY_SCOPE_KEY] = identity
        reset = _admitted.set((bearer_token(authorization) or "", identity))
        try:
            await self.app(scope, receive, send)
        finally:
            _admitted.reset(reset)


def base_url(config: Config, *, plain: bool = False) -> str:
    host = config.mcp.bind_host
    shown = f"[{host}]" if ":" in host else host
    return f"{'http' if plain else 'https'}://{shown}:{config.mcp.port}"


def build_http_app(
    config: Config, services: Services, *, context: ServerContext | None = None, plain: bool = False
) -> tuple[ASGIApp, ServerContext]:
    """The guarded streamable HTTP app and the server context behind it."""
    context = context or ServerContext(config)
    attach_services(context, services)
    url = base_url(config, plain=plain)
    auth = AuthSettings(
        issuer_url=AnyHttpUrl(url),
        resource_server_url=AnyHttpUrl(f"{url}{MCP_PATH}"),
        validate_token_resource=False,  # Carrier's tokens are its own: the guard checks them
    )
    server, context = build_server(
        config, context=context, auth=auth, token_verifier=GuardVerifier()
    )
    app = server.streamable_http_app(streamable_http_path=MCP_PATH, host=config.mcp.bind_host)
    return GuardMiddleware(app, services.trust), context


@dataclass
class HttpDoor:
    """A running HTTP door; ``stop()`` ends it (and what it built itself)."""

    server: uvicorn.Server
    thread: threading.Thread
    context: ServerContext
    url: str
    #: The store, trust and jobs the door uses (``services.trust.tokens`` issues tokens in-process).
    services: Services

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.context.close()
        self.services.close()  # closes only the parts it built itself


def _check_listen(config: Config, plain: bool) -> None:
    mcp = config.mcp
    if plain:
        if not is_loopback(mcp.bind_host):
            raise HttpDoorError(
                f"plain HTTP is only allowed on a loopback address, not {mcp.bind_host}: "
                "set mcp.tls_cert and mcp.tls_key (`carrier cert` makes them)"
            )
        return
    if mcp.tls_cert is None or mcp.tls_key is None:
        raise HttpDoorError(
            "the MCP HTTP door needs TLS: set mcp.tls_cert and mcp.tls_key "
            "(`carrier cert` makes a self-signed pair)"
        )
    for path in (mcp.tls_cert, mcp.tls_key):
        if not path.is_file():
            raise HttpDoorError(f"{path} does not exist: run `carrier cert` or fix mcp.tls_cert/tls_key")


def _port_problem(config: Config) -> str | None:
    from carrier.ports import port_taken

    return port_taken("the MCP HTTP door", config.mcp.bind_host, config.mcp.port,
                      "Stop that process, or give the door a free port: mcp.port in carrier.yml "
                      "(or MCP_PORT).")


def start_http_door(
    config: Config,
    context: ServerContext | None = None,
    *,
    store: Store | None = None,
    trust: Trust | None = None,
    jobs: JobSystem | None = None,
    plain: bool = False,
    ready_timeout: float = 20.0,
) -> HttpDoor:
    """Serve MCP over HTTPS on ``mcp.bind_host:mcp.port`` in a background thread until ``stop()``.

    ``carrier serve`` passes its store, trust and job system so one manager runs all jobs;
    otherwise they are built here (and closed by ``stop``).
    """
    _check_listen(config, plain)
    taken = _port_problem(config)
    if taken is not None:
        raise HttpDoorError(taken)
    services = Services(config, store=store, trust=trust, jobs=jobs)
    app, context = build_http_app(config, services, context=context, plain=plain)
    ssl: dict[str, Any] = (
        {} if plain else {"ssl_certfile": str(config.mcp.tls_cert), "ssl_keyfile": str(config.mcp.tls_key)}
    )
    mcp = config.mcp
    trusted = [str(network) for network in mcp.trusted_proxies]
    uv_config = uvicorn.Config(
        app,
        host=mcp.bind_host,
        port=mcp.port,
        # No logging config of uvicorn's own: its loggers propagate to Carrier's JSON handler.
        log_config=None,
        log_level="warning",
        lifespan="on",
        access_log=False,
        server_header=False,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: only configured proxies.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
        timeout_keep_alive=mcp.keepalive_timeout,
        http=GuardedH11Protocol.configured(request_timeout=mcp.request_timeout,
                                           max_connections=mcp.max_connections),
        **ssl,
    )
    server = uvicorn.Server(uv_config)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # reported to the caller below
            failed.append(exc)

    thread = threading.Thread(target=run, name="carrier-mcp-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            context.close()
            services.close()
            why = f": {failed[0]}" if failed else " (see the log)"
            raise HttpDoorError(  # taken since the check above, or another failure
                _port_problem(config)
                or f"the MCP HTTP door did not start on {config.mcp.bind_host}:{config.mcp.port}{why}"
            )
        time.sleep(0.02)
    url = f"{base_url(config, plain=plain)}{MCP_PATH}"
    log.info("mcp http door listening", extra={"url": url, "tls": not plain})
    return HttpDoor(server, thread, context, url, services)


def serve_http(config: Config, *, plain: bool = False) -> None:
    """``carrier mcp --http``: serve until interrupted."""
    door = start_http_door(config, plain=plain)
    try:
        while door.thread.is_alive():
            door.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        door.stop()
