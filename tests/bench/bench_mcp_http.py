"""MCP door: ``ssh_exec`` round trip over HTTPS vs over stdio vs raw ssh on the same ControlMaster,
then 200 concurrent tool calls from 20 HTTPS clients (none may fail; p50/p99), then the rate limiter
under a burst (exactly the budget gets through).

Starts its own sandbox (port offset 3500, under /var/tmp) and destroys it at the end.
"""

from __future__ import annotations

import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from ruamel.yaml import YAML

from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl, remote_command
from carrier.config import Config, load_config
from carrier.mcp.http import HttpDoor, start_http_door
from carrier.sandbox.manager import Sandbox, dump_yaml

PORT_OFFSET = 3500
CALLS = 40
CLIENTS, PER_CLIENT = 20, 10
BURST_BUDGET, BURST = 50, 80
REPO = Path(__file__).resolve().parents[2]


def _config(box: Sandbox, directory: Path, shift: int, limits: dict[str, int]) -> Config:
    data = YAML(typ="safe").load(box.layout.config_file.read_text())
    data["state_dir"] = str(directory / "state")
    data["mcp"]["port"] = int(data["mcp"]["port"]) + shift
    data["limits"] = limits
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "carrier.yml"
    path.write_text(dump_yaml(data))
    path.chmod(0o600)
    return load_config(path, os.environ)


def _token(door: HttpDoor) -> str:
    # Through the door's own store: a second Store on the same file in this process would drop
    # SQLite's POSIX locks of the first (see the report on Store._prepare_file).
    return door.services.trust.tokens.issue("bench@example.test", "operator").token


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _timed_calls(client: Client, n: int, out: list[float]) -> None:
    for _ in range(n):
        started = time.perf_counter()
        result = await client.call_tool("ssh_exec", {"host_or_pattern": "web1", "command": "true"})
        out.append(time.perf_counter() - started)
        assert not result.is_error, result.content


def _https(url: str, token: str, ca: Path) -> tuple[httpx2.AsyncClient, Client]:
    http = httpx2.AsyncClient(verify=ssl.create_default_context(cafile=str(ca)),
                              headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return http, Client(streamable_http_client(url, http_client=http))


def round_trips(box: Sandbox, config: Config, url: str, token: str) -> dict[str, list[float]]:
    ca = box.layout.tls_cert
    times: dict[str, list[float]] = {"https": [], "stdio": [], "raw": []}

    async def over_https() -> None:
        http, client = _https(url, token, ca)
        async with http, client:
            await _timed_calls(client, 3, [])
            await _timed_calls(client, CALLS, times["https"])

    async def over_stdio() -> None:
        params = StdioServerParameters(command=sys.executable, args=["-m", "carrier.mcp.cli"], cwd=str(REPO),
                                       env={"CARRIER_CONFIG": str(config.path), "PATH": os.environ["PATH"]})
        async with Client(params) as client:
            await _timed_calls(client, 3, [])
            await _timed_calls(client, CALLS, times["stdio"])

    anyio.run(over_https)
    anyio.run(over_stdio)
    control = SshControl(config.state_dir)
    web1 = Inventory(config.inventory).conn("web1")
    control.ensure_master(web1)
    argv = control.argv(web1, remote_command(["true"], shell=False), flags=("-T",))
    for _ in range(3 + CALLS):
        started = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True)
        times["raw"].append(time.perf_counter() - started)
    times["raw"] = times["raw"][3:]
    return times


def concurrent(box: Sandbox, url: str, token: str) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = 0
    hosts = ["web1", "web2", "db1"]

    async def one_client(index: int) -> None:
        nonlocal failures
        http, client = _https(url, token, box.layout.tls_cert)
        async with http, client:
            for call in range(PER_CLIENT):
                started = time.perf_counter()
                result = await client.call_tool("ssh_exec", {"host_or_pattern": hosts[(index + call) % 3],
                                                             "command": "true"})
                latencies.append(time.perf_counter() - started)
                failures += bool(result.is_error)

    async def run() -> None:
        async with anyio.create_task_group() as group:
            for index in range(CLIENTS):
                group.start_soon(one_client, index)

    anyio.run(run)
    return latencies, failures


def burst(box: Sandbox, url: str, token: str) -> dict[int, int]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "bench", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {token}"}
    codes: dict[int, int] = {}

    async def run() -> None:
        async with httpx2.AsyncClient(verify=ssl.create_default_context(cafile=str(box.layout.tls_cert)),
                                      timeout=60) as http:
            async def post() -> None:
                response = await http.post(url, json=body, headers=headers)
                codes[response.status_code] = codes.get(response.status_code, 0) + 1

            async with anyio.create_task_group() as group:
                for _ in range(BURST):
                    group.start_soon(post)

    anyio.run(run)
    return codes


def _ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="carrier-bench-mcp-", dir="/var/tmp"))
    root.chmod(0o755)
    box = Sandbox(root, port_offset=PORT_OFFSET)
    stops: list[Callable[[], Any]] = []
    try:
        box.up()
        fast = _config(box, root / "fast", 1, {"rate_limit": 100000, "rate_limit_window": 60})
        door = start_http_door(fast)
        stops.append(door.stop)
        token = _token(door)
        times = round_trips(box, fast, door.url, token)
        latencies, failures = concurrent(box, door.url, token)
        limited = _config(box, root / "limited", 2, {"rate_limit": BURST_BUDGET, "rate_limit_window": 3600})
        door2 = start_http_door(limited)
        stops.append(door2.stop)
        codes = burst(box, door2.url, _token(door2))
    finally:
        try:
            for stop in reversed(stops):
                stop()
        finally:
            box.destroy()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return "\n".join([
        "## MCP door (ssh_exec over HTTPS and stdio, concurrency, rate limit)",
        "",
        f"`ssh_exec` of `true` on web1, warm master, {CALLS} sequential calls each, median:",
        "",
        "| path | median | vs raw ssh |",
        "| --- | --- | --- |",
        f"| raw `ssh` over the ControlMaster | {_ms(med['raw'])} | 1.00x |",
        f"| MCP over stdio (`carrier mcp`) | {_ms(med['stdio'])} | {med['stdio'] / med['raw']:.2f}x |",
        f"| MCP over HTTPS + token | {_ms(med['https'])} | {med['https'] / med['raw']:.2f}x |",
        "",
        f"{CLIENTS} HTTPS clients x {PER_CLIENT} `ssh_exec` calls at once ({len(latencies)} calls, hosts "
        f"rotating, limits.max_jobs defaults): failures {failures}, p50 {_ms(_pct(latencies, 0.5))}, "
        f"p99 {_ms(_pct(latencies, 0.99))}.",
        "",
        f"Burst of {BURST} concurrent requests against a budget of {BURST_BUDGET}: "
        + ", ".join(f"{count}x HTTP {code}" for code, count in sorted(codes.items()))
        + (" (exact)" if codes.get(200) == BURST_BUDGET and codes.get(429) == BURST - BURST_BUDGET
           else " (NOT exact)"),
        "",
    ])


if __name__ == "__main__":
    print(main())
