"""Helpers for the MCP HTTP door tests: a config of its own (state dir, port, roles, limits) next to
the sandbox, a door started on it, tokens issued through the trust layer, and an MCP client over
streamable HTTP with TLS verified against the sandbox's certificate."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
from mail_support import write_secret
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from ruamel.yaml import YAML

from carrier.auth.service import Trust
from carrier.config import Config, load_config
from carrier.mcp.http import HttpDoor, start_http_door
from carrier.sandbox.manager import Sandbox, dump_yaml
from carrier.store import Store

ROLES = {
    "operator": {
        "playbooks": ["*"],
        "hosts": "all",
        "exec": True,
        "shell": False,
        "pty": True,
        "mail": ["mail_*"],
    },
    "admin": {"playbooks": ["*"], "hosts": "all", "exec": True, "shell": True, "pty": True},
    "viewer": {
        "playbooks": ["ping"],
        "hosts": "all",
        "exec": False,
        "shell": False,
        "pty": False,
        "mail": ["mail_folder_list"],
    },
    "webonly": {"playbooks": ["*"], "hosts": "web1", "exec": True, "shell": False, "pty": False},
}


def write_door_config(
    sandbox: Sandbox,
    directory: Path,
    *,
    port_shift: int,
    extra: dict[str, Any] | None = None,
    mcp: dict[str, Any] | None = None,
) -> Path:
    """The sandbox carrier.yml with its own state dir, the MCP port moved by ``port_shift`` and the
    test roles; ``mcp`` entries are merged into the mcp section."""
    data = YAML(typ="safe").load(sandbox.layout.config_file.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    data["state_dir"] = str(directory / "state")
    data["mcp"] = {**data["mcp"], "port": int(data["mcp"]["port"]) + port_shift, **(mcp or {})}
    data["roles"] = ROLES
    data.update(extra or {})
    path = directory / "carrier.yml"
    write_secret(path, dump_yaml(data))
    return path


@contextlib.contextmanager
def running_door(config: Config) -> Iterator[HttpDoor]:
    door = start_http_door(config)
    try:
        yield door
    finally:
        door.stop()


def issue(
    target: Config | HttpDoor, owner: str, role: str, *, ttl: int | None = None, scopes: tuple[str, ...] = ()
) -> tuple[str, str]:
    """A token (and its id) issued through the trust layer: by a running door's own store, or, before
    any door runs, by a store opened for it. (A second Store on a file this process already has open
    would drop SQLite's POSIX locks of the first: never open one beside a running door.)"""
    if isinstance(target, HttpDoor):
        issued = target.services.trust.tokens.issue(owner, role, ttl=ttl, scopes=scopes)
        return issued.token, issued.record.id
    store = Store.open(target.state_dir)
    try:
        issued = Trust(target, store).tokens.issue(owner, role, ttl=ttl, scopes=scopes)
        return issued.token, issued.record.id
    finally:
        store.close()


def revoke(door: HttpDoor, token_id: str) -> None:
    assert door.services.trust.tokens.revoke(token_id)


def tls_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


@contextlib.asynccontextmanager
async def mcp_client(url: str, token: str | None, ca_file: Path) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(
        verify=tls_context(ca_file), headers=headers, timeout=httpx2.Timeout(30.0, read=300.0)
    )
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


def data_of(result: CallToolResult) -> dict[str, Any]:
    """A tool result's JSON object (fails with the tool's error text when it is an error)."""
    text = "".join(getattr(c, "text", "") for c in result.content)
    assert not result.is_error, text
    if result.structured_content is not None:
        structured = dict(result.structured_content)
        return structured.get("result", structured) if set(structured) == {"result"} else structured
    value: dict[str, Any] = json.loads(text)
    return value


def error_of(result: CallToolResult) -> str:
    text = "".join(getattr(c, "text", "") for c in result.content)
    assert result.is_error, f"expected a tool error, got {text}"
    return text


def load(path: Path) -> Config:
    import os

    return load_config(path, os.environ)
