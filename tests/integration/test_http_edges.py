"""The HTTP door's own edges against a real uvicorn door with TLS: X-Forwarded-For is believed only
from configured proxies, a client that sends half a request is cut off, connections beyond the cap
are closed, and `carrier serve` writes nothing to stderr but JSON lines (uvicorn's included)."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx2
import pytest
from door_support import serving
from mcp_http_support import issue, load, running_door, tls_context, write_door_config
from ruamel.yaml import YAML
from test_mcp_http import HEADERS, INIT

from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

FORGED = "10.9.9.9"


def _post_forwarded(url: str, ca: Path) -> httpx2.Response:
    headers = {**HEADERS, "X-Forwarded-For": FORGED}
    with httpx2.Client(verify=tls_context(ca), timeout=30) as http:
        return http.post(url, json=INIT, headers=headers)


def _tls(port: int, ca: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return tls_context(ca).wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_within(sock: ssl.SSLSocket, seconds: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) before ``seconds`` pass, having sent nothing."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except (ConnectionResetError, ssl.SSLError):
        return True


@pytest.mark.parametrize(("trusted", "status"), [([], 403), (["127.0.0.0/8"], 401)])
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    sandbox: Sandbox, tmp_path: Path, trusted: list[str], status: int
) -> None:
    """Only 10.9.9.9 may connect. A local process claiming to be it is refused (403) unless loopback
    is a configured proxy, when the claim is believed and the request reaches the token check (401)."""
    mcp = {"ip_allow": [f"{FORGED}/32"], "trusted_proxies": trusted}
    config = load(write_door_config(sandbox, tmp_path, port_shift=21, mcp=mcp))
    with running_door(config) as door:
        response = _post_forwarded(door.url, sandbox.layout.tls_cert)
    assert response.status_code == status, response.text


def test_half_a_request_is_cut_off_and_a_whole_one_is_served(sandbox: Sandbox, tmp_path: Path) -> None:
    config = load(write_door_config(sandbox, tmp_path, port_shift=22, mcp={"request_timeout": 2}))
    token, _ = issue(config, "ci@example.test", "operator")  # so the body is read, not refused first
    with running_door(config) as door:
        silent = _tls(config.mcp.port, sandbox.layout.tls_cert)
        partial = _tls(config.mcp.port, sandbox.layout.tls_cert)
        partial.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: applic")
        body = _tls(config.mcp.port, sandbox.layout.tls_cert)
        body.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token.encode()
                     + b"\r\nAccept: application/json, text/event-stream\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"js")
        try:
            # 30 s is far beyond the 2 s deadline: without one these stay open (uvicorn waits for ever).
            assert _closed_within(silent, 30)
            assert _closed_within(partial, 30)
            assert _closed_within(body, 30)
        finally:
            for sock in (silent, partial, body):
                sock.close()
        # A client that takes its time between whole requests is not cut off by the deadline.
        with httpx2.Client(verify=tls_context(sandbox.layout.tls_cert), timeout=30) as http:
            first = http.post(door.url, json=INIT, headers=HEADERS)
            time.sleep(1)
            second = http.post(door.url, json=INIT, headers=HEADERS)
        assert first.status_code == second.status_code == 401


def test_connections_beyond_the_cap_are_closed(sandbox: Sandbox, tmp_path: Path) -> None:
    mcp = {"max_connections": 3, "request_timeout": 120}
    config = load(write_door_config(sandbox, tmp_path, port_shift=23, mcp=mcp))
    with running_door(config):
        held = [_tls(config.mcp.port, sandbox.layout.tls_cert) for _ in range(3)]
        extra = _tls(config.mcp.port, sandbox.layout.tls_cert)
        try:
            assert _closed_within(extra, 30)  # well before the 120 s request deadline
            # The held ones are still served: a whole request on one gets its answer.
            held[0].settimeout(30)
            held[0].sendall(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert held[0].recv(64).startswith(b"HTTP/1.1 ")
        finally:
            for sock in (*held, extra):
                sock.close()


def test_serve_stderr_is_json_lines_only(sandbox: Sandbox) -> None:
    """uvicorn's own warnings (an invalid request) come out as Carrier JSON lines, nothing raw."""
    mcp = YAML(typ="safe").load(sandbox.layout.config_file.read_text())["mcp"]
    mcp["port"] = int(mcp["port"]) + 24
    with serving(sandbox, mcp=mcp) as (serve, _):
        serve.start()
        sock = _tls(mcp["port"], sandbox.layout.tls_cert)
        try:
            sock.settimeout(30)
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 400")
        finally:
            sock.close()
        line = serve.wait_log("Invalid HTTP request received.", timeout=30)
        assert line["logger"] == "uvicorn.error" and line["level"] == "WARNING"
        assert serve.stop() == 0
    assert serve.raw == [], serve.raw
