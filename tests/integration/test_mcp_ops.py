"""The operations tools in-process (the stdio door's identity: the local user, role from the config):
real exec jobs on the sandbox hosts, bounded output read on by cursor, and bad input as tool errors."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer
from mcp_http_support import data_of, error_of, load, write_door_config

from carrier.config import Config
from carrier.mcp.server import ServerContext, build_server
from carrier.mcp.tools_ops import local_identity
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def config(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Config:
    return load(write_door_config(sandbox, tmp_path_factory.mktemp("mcp-ops"), port_shift=8))


@pytest.fixture(scope="module")
def served(config: Config) -> Iterator[tuple[MCPServer, ServerContext]]:
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    yield server, context
    context.close()


def test_stdio_identity_runs_exec_with_bounded_output(
    served: tuple[MCPServer, ServerContext], config: Config
) -> None:
    server, _ = served
    me = local_identity(config)

    async def session() -> None:
        async with Client(server) as client:
            big = data_of(
                await client.call_tool(
                    "ssh_exec", {"host_or_pattern": "web1", "command": "seq 1 20000", "max_bytes": 1024}
                )
            )
            assert big["status"] == "succeeded"
            [web1] = big["hosts"]
            assert web1["truncated"] is True and len(web1["stdout"].encode()) <= 512
            assert web1["stdout"].startswith("1\n2\n3\n")
            status = data_of(await client.call_tool("job_status", {"job_id": big["job_id"]}))
            assert status["owner"] == me.name and status["door"] == "mcp"
            # The whole result is there through job_output, page by page, each page within its cap.
            page = data_of(
                await client.call_tool("job_output", {"job_id": big["job_id"], "since": 0, "max_bytes": 4096})
            )
            assert page["events"] and page["events"][0]["seq"] == 1
            for event in page["events"]:
                if event["type"] == "exec.result":
                    assert event.get("truncated") is True  # cut to fit, and said so
            listed = data_of(await client.call_tool("job_list", {"kind": "exec"}))
            assert big["job_id"] in [j["job_id"] for j in listed["jobs"]]
            hosts = data_of(await client.call_tool("inventory_hosts", {}))
            web = {h["name"]: h for h in hosts["hosts"]}
            assert web["web1"]["master_running"] is True
            masters = data_of(await client.call_tool("ssh_list", {}))
            assert any(m["host"] == "web1" and m["running"] for m in masters["masters"])
            closed = data_of(await client.call_tool("ssh_disconnect", {"host": "web1"}))
            assert closed == {"host": "web1", "was_running": True}
            again = data_of(await client.call_tool("ssh_list", {}))
            assert not any(m["host"] == "web1" and m["running"] for m in again["masters"])

    anyio.run(session)


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("job_status", {"job_id": "../../etc/passwd"}, "job id"),
        ("job_status", {"job_id": "j-aaaaaaaaaaaa"}, "no job j-aaaaaaaaaaaa"),
        ("ssh_exec", {"host_or_pattern": "web1;rm -rf /", "command": "true"}, "pattern"),
        ("ssh_exec", {"host_or_pattern": "-oProxyCommand=x", "command": "true"}, "pattern"),
        ("ssh_exec", {"host_or_pattern": "web1", "command": "echo 'unbalanced"}, "cannot split"),
        ("ssh_exec", {"host_or_pattern": "nosuchhost", "command": "true"}, "unknown host or group"),
        ("playbook_run", {"playbook": "../etc/passwd"}, "playbook"),
        ("job_list", {"status": "weird"}, "status must be one of"),
        ("job_list", {"kind": "weird"}, "kind must be one of"),
        ("ssh_disconnect", {"host": "web"}, "not a single inventory host"),
        ("job_start", {"host": "web", "command": "top"}, "not a single inventory host"),
        ("job_output", {"job_id": "j-aaaaaaaaaaaa", "max_bytes": 10}, "max_bytes"),
        ("ssh_exec", {"host_or_pattern": ["web1"], "command": "true"}, "host_or_pattern"),
    ],
)
def test_bad_input_is_a_tool_error(
    served: tuple[MCPServer, ServerContext], tool: str, args: dict[str, object], expected: str
) -> None:
    server, _ = served

    async def session() -> None:
        async with Client(server) as client:
            text = error_of(await client.call_tool(tool, args))
            assert expected.lower() in text.lower(), text

    anyio.run(session)
