"""What the MCP mail tool tests share: issue 15's mailbox tool names, reading a tool's JSON result
(the text block and the structured content must agree), and running a client session in process."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from mcp.client.client import Client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult

#: Issue 15's mailbox toolset (tests/integration/test_mcp_mailbox.py drives each).
MAILBOX = {
    "mail_accounts",
    "mail_forward",
    "mail_draft_save",
    "mail_draft_send",
    "mail_delete",
    "mail_archive",
    "mail_flags",
    "mail_folder_create",
    "mail_folder_rename",
    "mail_folder_delete",
    "mail_attachment_save",
}


def ok(result: CallToolResult) -> dict[str, Any]:
    """The structured result of a call that must have succeeded."""
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    text = result.content[0].text  # type: ignore[union-attr]
    assert json.loads(text) == result.structured_content  # the text block carries the same JSON
    return result.structured_content


def in_process(server: MCPServer, body: Callable[[Client], Awaitable[None]]) -> None:
    """Run ``body`` with a real MCP client session on ``server`` (in this process)."""
    async def main() -> None:
        async with Client(server) as client:
            await body(client)

    anyio.run(main)
