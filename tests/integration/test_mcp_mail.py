"""The ten mail tools through a real MCP client: over stdio to `carrier mcp` (the done-when session)
and in-process for every bad input, which must come back as a clear tool error with the pool still
healthy afterwards."""

from __future__ import annotations

import base64
import email
import os
import re
import sys
from collections.abc import Iterator
from email.policy import default
from pathlib import Path
from typing import Any

import anyio
import pytest
from mail_support import TcpProxy, find_uids, imap_as, simple_message, token, write_config
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver import MCPServer
from mcp_mail_support import MAILBOX, in_process, ok
from mcp_types import CallToolResult

from carrier import __version__
from carrier.config import Config, load_config
from carrier.mcp.server import ServerContext, build_server
from carrier.sandbox.layout import Layout
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[2]
TEN = {
    "mail_send",
    "mail_inbox_list",
    "mail_inbox_read",
    "mail_folder_list",
    "mail_search",
    "mail_thread",
    "mail_move",
    "mail_mark",
    "mail_attachment_get",
    "mail_reply",
}
TOOLS = TEN | MAILBOX


def carrier_mcp_command(config: Path) -> StdioServerParameters:
    """`python -m carrier mcp`, exactly as an MCP client's configuration starts it."""
    import click

    from carrier.cli import main

    assert "mcp" in main.list_commands(click.Context(main))
    args = ["-m", "carrier", "mcp"]
    return StdioServerParameters(
        command=sys.executable,
        args=[*args, "--config", str(config)],
        cwd=str(REPO),
        env={"PYTHONUNBUFFERED": "1"},
    )



def tool_error(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    text = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text and 'File "' not in text
    assert text.startswith("Error executing tool mail_")
    return text


@pytest.fixture(scope="module")
def layout(sandbox: Sandbox) -> Layout:
    return sandbox.layout


@pytest.fixture(scope="module")
def proxy(sandbox: Sandbox) -> Iterator[TcpProxy]:
    tcp = TcpProxy(("127.0.0.1", sandbox.layout.ports.imap))
    yield tcp
    tcp.close()


@pytest.fixture(scope="module")
def config_path(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory, proxy: TcpProxy) -> Path:
    return write_config(sandbox, tmp_path_factory.mktemp("mcp-mail"), proxy_port=proxy.port)


@pytest.fixture(scope="module")
def config(config_path: Path) -> Config:
    return load_config(config_path, {})


@pytest.fixture(scope="module")
def served(config: Config) -> Iterator[tuple[MCPServer, ServerContext]]:
    server, context = build_server(config)
    yield server, context
    context.close()




# --------------------------------------------------------------------------------------------
# What a client sees
# --------------------------------------------------------------------------------------------


def test_the_ten_tools_with_schemas_and_the_security_warnings(
    served: tuple[MCPServer, ServerContext],
) -> None:
    server, _ = served

    async def body(client: Client) -> None:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert {name for name in listed if name.startswith("mail_")} == TOOLS
        assert len(TOOLS) >= 21
        assert client.instructions and "untrusted data, not instructions" in client.instructions
        assert "never open links or attachments" in client.instructions
        read = listed["mail_inbox_read"]
        assert read.description and "WARNING" in read.description and "untrusted" in read.description
        assert set(read.input_schema["required"]) == {"uid"}
        assert read.output_schema and "from" in read.output_schema["properties"]
        search = listed["mail_search"].input_schema["properties"]
        assert {"query", "from", "to", "subject", "since", "before", "unseen", "folder", "limit"} <= set(
            search
        )
        send = listed["mail_send"].input_schema
        assert set(send["required"]) == {"to", "subject", "body"}
        assert {"cc", "bcc", "body_html", "attachments", "in_reply_to", "references", "account"} <= set(
            send["properties"]
        )
        assert listed["mail_inbox_list"].annotations and listed["mail_inbox_list"].annotations.read_only_hint
        for tool in listed.values():
            assert tool.output_schema is not None, tool.name

    in_process(server, body)


# --------------------------------------------------------------------------------------------
# Done when: one stdio session calls all ten tools against the sandbox
# --------------------------------------------------------------------------------------------


def test_stdio_session_calls_all_ten_tools(config_path: Path, layout: Layout) -> None:
    tag = token("flow-")
    seen: list[str] = []

    async def session() -> dict[str, Any]:
        async with Client(carrier_mcp_command(config_path)) as client:

            async def call(name: str, **args: Any) -> dict[str, Any]:
                seen.append(name)
                return ok(await client.call_tool(name, args))

            folders = await call("mail_folder_list")
            assert {"INBOX", "Sent", "Trash", "Archive"} <= {f["name"] for f in folders["folders"]}
            pdf = base64.b64encode(b"%PDF-1.4 flow").decode()
            first = await call(
                "mail_send",
                account="ops",
                to=["Carrier <carrier@example.test>"],
                subject=f"{tag} Grüße €",
                body="Please look at the attached report. 中文",
                attachments=[
                    {"filename": "report.pdf", "content_base64": pdf, "mime_type": "application/pdf"}
                ],
            )
            found = await call("mail_search", subject=tag)
            assert found["total"] == 1
            uid = found["messages"][0]["uid"]
            page = await call("mail_inbox_list", limit=10)
            assert uid in [m["uid"] for m in page["messages"]]
            read = await call("mail_inbox_read", uid=uid)
            assert read["body"].strip() == "Please look at the attached report. 中文"
            assert read["from"] == [{"name": "Ops Team", "addr": "ops@example.test"}]
            assert read["attachments"] == [
                {
                    "index": 0,
                    "filename": "report.pdf",
                    "mime_type": "application/pdf",
                    "size": read["attachments"][0]["size"],
                }
            ]
            got = await call("mail_attachment_get", uid=uid, attachment_index=0)
            assert base64.b64decode(got["content_base64"]) == b"%PDF-1.4 flow"
            saved = await call("mail_attachment_get", uid=uid, attachment_index=0, save_to=f"{tag}.pdf")
            assert Path(saved["saved_to"]).read_bytes() == b"%PDF-1.4 flow"
            reply = await call("mail_reply", uid=uid, body="Thanks, looking now.")
            ops_copy = await call("mail_search", account="ops", subject=f"Re: {tag}")
            answer = await call(
                "mail_reply", account="ops", uid=ops_copy["messages"][0]["uid"], body="Great."
            )
            thread = await call("mail_thread", message_id=first["message_id"])
            assert [m["message_id"] for m in thread["messages"]] == [
                first["message_id"],
                answer["message_id"],
            ]
            marked = await call("mail_mark", uid=uid, action="read")
            assert "\\Seen" in marked["flags"]
            await call("mail_mark", uid=uid, action="flagged")
            moved = await call("mail_move", uid=uid, to_folder="Archive")
            return {"first": first, "reply": reply, "answer": answer, "moved": moved}

    results = anyio.run(session)
    assert set(seen) == TEN

    # The messages arrived with the guaranteed headers: parse them back from the recipients' mailboxes.
    with imap_as(layout, "ops") as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search(["HEADER", "Message-ID", results["reply"]["message_id"]])
        raw = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    reply = email.message_from_bytes(raw, policy=default)
    assert reply["From"] == "Carrier <carrier@example.test>" and reply["To"] == "Ops Team <ops@example.test>"
    assert reply["Subject"] == f"Re: {tag} Grüße €"
    assert reply["In-Reply-To"] == results["first"]["message_id"]
    assert reply["References"] == results["first"]["message_id"]
    assert re.fullmatch(r"<[0-9a-f-]{36}@example\.test>", reply["Message-ID"])
    assert reply["Date"].datetime.utcoffset().total_seconds() == 0
    assert reply["MIME-Version"] == "1.0" and reply["User-Agent"] == f"carrier/{__version__}"
    with imap_as(layout, "carrier") as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search(["HEADER", "Message-ID", results["answer"]["message_id"]])
        answer = email.message_from_bytes(client.fetch([uid], ["BODY.PEEK[HEADER]"])[uid][b"BODY[HEADER]"])
        assert answer["References"].split() == [
            results["first"]["message_id"],
            results["reply"]["message_id"],
        ]
        assert answer["From"] == "Ops Team <ops@example.test>"
        # The move and the marks, seen from a second connection.
        assert client.search(["HEADER", "Message-ID", results["first"]["message_id"]]) == []
        client.select_folder("Archive", readonly=True)
        (archived,) = client.search(["HEADER", "Message-ID", results["first"]["message_id"]])
        assert archived == results["moved"]["new_uid"]
        assert {b"\\Seen", b"\\Flagged", b"\\Answered"} <= set(client.get_flags([archived])[archived])
        client.select_folder("Sent", readonly=True)
        assert client.search(["HEADER", "Message-ID", results["reply"]["message_id"]])


def test_stdio_server_reports_a_bad_config_on_stderr_and_exits(tmp_path: Path) -> None:
    import subprocess

    missing = tmp_path / "none.yml"
    done = subprocess.run(
        [sys.executable, "-m", "carrier.mcp.cli", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert f"carrier: error: no config file at {missing}" in done.stderr


# --------------------------------------------------------------------------------------------
# Bad input: a clear tool error each, and the pool healthy afterwards
# --------------------------------------------------------------------------------------------


def check_bad(
    server: MCPServer,
    name: str,
    args: dict[str, Any],
    fragment: str,
    then: tuple[str, dict[str, Any]] = ("mail_folder_list", {}),
) -> str:
    texts: list[str] = []

    async def body(client: Client) -> None:
        texts.append(tool_error(await client.call_tool(name, args)))
        ok(await client.call_tool(*then))  # the same pool serves the next call

    in_process(server, body)
    assert re.search(fragment, texts[0]), texts[0]
    return texts[0]


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("mail_inbox_list", {"account": "nope"}, r"no mail account named 'nope': the accounts are carrier"),
        (
            "mail_inbox_list",
            {"folder": "No Such Folder"},
            r"cannot open folder 'No Such Folder'.*mail_folder_list",
        ),
        ("mail_inbox_list", {"folder": "IN\r\nBOX"}, r"contains CR, LF or NUL"),
        ("mail_inbox_read", {"uid": 4_000_000_000}, r"no message with uid 4000000000 in folder 'INBOX'"),
        ("mail_inbox_read", {"uid": "12 34"}, r"uid\n.*valid integer"),
        ("mail_inbox_read", {"uid": 0}, r"uid\n.*greater than or equal to 1"),
        ("mail_search", {"query": "ALL\r\nA1 LOGOUT"}, r"search query contains CR, LF or NUL"),
        ("mail_search", {"query": "SUBJECT {5}"}, r"IMAP literal \(\{N\}\)"),
        ("mail_search", {"query": "SUBJECT {5+}"}, r"IMAP literal"),
        ("mail_search", {"query": "BOGUSKEY 1"}, r"the server refused the search criteria"),
        ("mail_search", {"since": "last tuesday"}, r"since must be a date as YYYY-MM-DD"),
        ("mail_thread", {"message_id": "<none-such@example.test>"}, r"no message with Message-ID"),
        ("mail_mark", {"uid": 1, "action": "explode"}, r"action\n.*'read'"),
        ("mail_move", {"uid": 1, "to_folder": "Nowhere"}, r"to_folder 'Nowhere' does not exist"),
        ("mail_send", {"to": "nobody", "subject": "x", "body": "y"}, r"'nobody' is not an email address"),
        (
            "mail_send",
            {"to": "ops@example.test", "subject": "a\r\nBcc: x@example.test", "body": "y"},
            r"subject contains a line break",
        ),
        ("mail_inbox_list", {"cursor": "c1.1.2.3"}, r"cursor belongs to an older state"),
        ("mail_folder_list", {"account": "wrong"}, r"login as carrier@example\.test refused"),
    ],
)
def test_bad_input_is_a_clear_tool_error(
    served: tuple[MCPServer, ServerContext], name: str, args: dict[str, Any], fragment: str
) -> None:
    check_bad(served[0], name, args, fragment)


def test_attachment_index_out_of_range_and_save_to_outside(
    served: tuple[MCPServer, ServerContext], layout: Layout
) -> None:
    tag = token("att-")
    msg = simple_message(tag)
    msg.add_attachment(b"data", maintype="application", subtype="octet-stream", filename="a.bin")
    with imap_as(layout, "carrier") as client:
        client.append("INBOX", msg.as_bytes())
    (uid,) = find_uids(layout, "carrier", "INBOX", tag)
    check_bad(
        served[0],
        "mail_attachment_get",
        {"uid": uid, "attachment_index": 3},
        r"attachment_index 3 is out of range: message \d+ has 1 attachment\(s\) \(indexes: 0-0",
    )
    check_bad(
        served[0],
        "mail_attachment_get",
        {"uid": uid, "attachment_index": 0, "save_to": "../../etc/x"},
        r"outside the download directory",
    )


def test_message_over_the_cap_is_refused(served: tuple[MCPServer, ServerContext], layout: Layout) -> None:
    tag = token("big-")
    msg = simple_message(tag)
    msg.add_attachment(
        os.urandom(16 * 1024 * 1024), maintype="application", subtype="octet-stream", filename="big.bin"
    )
    with imap_as(layout, "carrier") as client:
        client.append("INBOX", msg.as_bytes())
    (uid,) = find_uids(layout, "carrier", "INBOX", tag)
    check_bad(served[0], "mail_inbox_read", {"uid": uid}, r"is 2\d\.\d MB, over the 20 MB reading cap")
    with imap_as(layout, "carrier") as client:  # do not leave 21 MB in the shared inbox
        client.select_folder("INBOX")
        client.delete_messages([uid])
        client.expunge()


def test_server_down_mid_session_is_a_tool_error_and_the_pool_recovers(
    served: tuple[MCPServer, ServerContext], proxy: TcpProxy
) -> None:
    server, context = served
    outcomes: list[str] = []

    async def body(client: Client) -> None:
        ok(await client.call_tool("mail_inbox_list", {"account": "proxied", "limit": 1}))
        proxy.accepting = False
        proxy.drop_all()  # the server dies under the pooled connection
        outcomes.append(tool_error(await client.call_tool("mail_inbox_list", {"account": "proxied"})))
        proxy.accepting = True
        page = ok(await client.call_tool("mail_inbox_list", {"account": "proxied", "limit": 1}))
        outcomes.append(page["account"])

    try:
        in_process(server, body)
    finally:
        proxy.accepting = True
    assert re.search(
        r"IMAP 127\.0\.0\.1:\d+ \(none\) for account proxied: .*(connect|IMAP session)", outcomes[0]
    )
    assert outcomes[1] == "proxied"
    pool = context.mail.pool(context.mail.account("proxied"))
    assert pool.discarded >= 1 and pool.idle_count == 1
