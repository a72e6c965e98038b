"""Issue 15's mailbox toolset through a real MCP client against the sandbox Dovecot: one stdio session
to `carrier mcp` drives every new tool (forward with attachments, drafts, delete, archive, flags,
folders, attachment save, accounts), and an in-process session checks every refusal (bad folder
names and keywords, Trash without expunge, non-empty folders, a read_only account)."""

from __future__ import annotations

import email
import json
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import anyio
import pytest
from mail_support import deliver, find_uids, imap_as, simple_message, token, write_config
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver import MCPServer
from mcp_mail_support import MAILBOX, in_process, ok
from mcp_types import CallToolResult
from ruamel.yaml import YAML

from carrier.auth.policy import MAIL_READ_TOOLS
from carrier.config import load_config
from carrier.mcp.server import ServerContext, build_server
from carrier.sandbox.layout import Layout, address
from carrier.sandbox.manager import Sandbox, dump_yaml

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[2]
DESTRUCTIVE = {"mail_delete", "mail_folder_delete", "mail_folder_rename"}



def refused(result: CallToolResult, *words: str) -> str:
    assert result.is_error, result.structured_content
    text = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    for word in words:
        assert word in text, text
    return text


@pytest.fixture(scope="module")
def layout(sandbox: Sandbox) -> Layout:
    return sandbox.layout


@pytest.fixture(scope="module")
def config_path(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_config(sandbox, tmp_path_factory.mktemp("mcp-mailbox"))
    data = YAML(typ="safe").load(path.read_text())
    data["accounts"].append({**data["accounts"][0], "name": "readonly", "read_only": True, "commands": False})
    path.write_text(dump_yaml(data))
    return path


@pytest.fixture(scope="module")
def served(config_path: Path) -> Iterator[tuple[MCPServer, ServerContext]]:
    server, context = build_server(load_config(config_path, {}))
    yield server, context
    context.close()




def with_attachment(subject: str, payload: bytes) -> EmailMessage:
    msg = simple_message(subject, "Original text of the report.", sender="ops", to="carrier")
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="report.pdf")
    return msg


def inbox_uid(layout: Layout, subject: str) -> int:
    (uid,) = find_uids(layout, "carrier", "INBOX", subject)
    return uid


def flags_of(layout: Layout, folder: str, uid: int) -> set[bytes]:
    with imap_as(layout, "carrier") as client:
        client.select_folder(folder, readonly=True)
        return set(client.get_flags([uid]).get(uid, ()))


# --------------------------------------------------------------------------------------------
# Done when: an MCP client sees >= 21 mail tools, and one stdio session drives each new one
# --------------------------------------------------------------------------------------------


def test_schemas_say_what_destroys(served: tuple[MCPServer, ServerContext]) -> None:
    server, _ = served

    async def body(client: Client) -> None:
        listed = {t.name: t for t in (await client.list_tools()).tools if t.name.startswith("mail_")}
        assert len(listed) >= 21 and set(listed) >= MAILBOX
        for name in DESTRUCTIVE:
            tool = listed[name]
            assert tool.description and "DESTRUCTIVE" in tool.description
            assert tool.annotations and tool.annotations.destructive_hint
        for name, tool in listed.items():
            assert tool.output_schema is not None, name
            read_only = bool(tool.annotations and tool.annotations.read_only_hint)
            if not read_only:
                assert tool.description and "read_only: true" in tool.description, name
        hinted = {n for n, t in listed.items() if t.annotations and t.annotations.read_only_hint}
        assert hinted == MAIL_READ_TOOLS  # what the schema promises is what read_only accounts allow
        assert set(listed["mail_delete"].input_schema["required"]) == {"uids"}
        assert "expunge" in listed["mail_delete"].input_schema["properties"]
        assert {"add", "remove"} <= set(listed["mail_flags"].input_schema["properties"])

    in_process(server, body)


def test_stdio_session_drives_every_mailbox_tool(config_path: Path, layout: Layout) -> None:
    tag = token("box-")
    pdf = b"%PDF-1.4 mailbox " + tag.encode()
    deliver(layout, with_attachment(f"{tag} report", pdf), sender=address("ops"), to=[address("carrier")])
    deliver(layout, simple_message(f"{tag} second"), sender=address("ops"), to=[address("carrier")])
    deliver(layout, simple_message(f"{tag} third"), sender=address("ops"), to=[address("carrier")])
    report, second, third = (inbox_uid(layout, f"{tag} {w}") for w in ("report", "second", "third"))
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "carrier", "mcp", "--config", str(config_path)],
        cwd=str(REPO),
        env={"PYTHONUNBUFFERED": "1"},
    )
    seen: list[str] = []
    folder, renamed = token("Box-"), token("Renamed-")

    async def session() -> dict[str, Any]:
        async with Client(params) as client:

            async def call(tool: str, **args: Any) -> dict[str, Any]:
                seen.append(tool)
                return ok(await client.call_tool(tool, args))

            accounts = await call("mail_accounts")
            by_name = {a["name"]: a for a in accounts["accounts"]}
            assert by_name["carrier"]["default"] and by_name["readonly"]["read_only"]
            assert "password" not in json.dumps(accounts)

            forwarded = await call(
                "mail_forward", uid=report, to="Ops <ops@example.test>", body="FYI, see below."
            )
            assert forwarded["saved_to"] == "Sent"

            draft = await call("mail_draft_save", to="ops@example.test", subject=f"{tag} draft", body="v1")
            again = await call(
                "mail_draft_save",
                to="ops@example.test",
                subject=f"{tag} draft",
                body="v2",
                replace_uid=draft["uid"],
            )
            assert again["replaced_uid"] == draft["uid"] and again["folder"] == "Drafts"
            sent_draft = await call("mail_draft_send", uid=again["uid"])

            tagged = await call(
                "mail_flags", uids=[second, third], add=["$Important", "invoice", "\\Flagged"]
            )
            assert all({"$Important", "invoice", "\\Flagged"} <= set(f) for f in tagged["flags"].values())
            untagged = await call("mail_flags", uids=third, remove=["invoice"])
            assert "invoice" not in untagged["flags"][str(third)]

            archived = await call("mail_archive", uids=[second])
            trashed = await call("mail_delete", uids=[third])
            gone = await call(
                "mail_delete", uids=[trashed["new_uids"][str(third)]], folder="Trash", expunge=True
            )
            assert gone["expunged"]

            created = await call("mail_folder_create", name=folder)
            moved = await call("mail_folder_rename", name=folder, new_name=renamed)
            saved = await call("mail_attachment_save", uid=report, attachment_index=0)
            deleted = await call("mail_folder_delete", name=renamed)
            return {
                "forwarded": forwarded,
                "sent_draft": sent_draft,
                "archived": archived,
                "trashed": trashed,
                "created": created,
                "moved": moved,
                "saved": saved,
                "deleted": deleted,
                "drafts": (draft, again),
            }

    results = anyio.run(session)
    assert set(seen) == MAILBOX

    # Forward: to ops@ with the note, the original inline and its attachment; the original flagged.
    with imap_as(layout, "ops") as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search(["HEADER", "Message-ID", results["forwarded"]["message_id"]])
        fwd = email.message_from_bytes(client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"], policy=default)
        (sent_uid,) = client.search(["HEADER", "Message-ID", results["sent_draft"]["message_id"]])
        got_draft = email.message_from_bytes(
            client.fetch([sent_uid], ["BODY.PEEK[]"])[sent_uid][b"BODY[]"], policy=default
        )
    assert fwd["Subject"] == f"Fwd: {tag} report"
    text = fwd.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.startswith("FYI, see below.") and "---------- Forwarded message ----------" in text
    assert "Original text of the report." in text and "From: Ops <ops@example.test>" in text
    (attachment,) = list(fwd.iter_attachments())
    assert attachment.get_filename() == "report.pdf" and attachment.get_content() == pdf
    assert b"$Forwarded" in flags_of(layout, "INBOX", report)
    # Drafts: the replaced one is gone, the sent one left Drafts, ops@ got v2 once, Sent has it.
    assert got_draft["Subject"] == f"{tag} draft" and got_draft.get_content().strip() == "v2"
    assert len(find_uids(layout, "ops", "INBOX", f"{tag} draft")) == 1
    assert find_uids(layout, "carrier", "Drafts", f"{tag} draft") == []
    assert len(find_uids(layout, "carrier", "Sent", f"{tag} draft")) == 1
    # Flags, archive, delete.
    archived_uid = results["archived"]["new_uids"][str(second)]
    assert results["archived"]["moved_to"] == "Archive"
    assert {b"$Important", b"invoice", b"\\Flagged"} <= flags_of(layout, "Archive", archived_uid)
    assert results["trashed"]["moved_to"] == "Trash"
    assert find_uids(layout, "carrier", "INBOX", f"{tag} second") == []
    assert find_uids(layout, "carrier", "INBOX", f"{tag} third") == []
    assert find_uids(layout, "carrier", "Trash", f"{tag} third") == []  # expunged for good
    # Folders and the saved attachment.
    with imap_as(layout, "carrier") as client:
        names = {name for _, _, name in client.list_folders()}
    assert folder not in names and renamed not in names
    assert results["moved"]["new_name"] == renamed and results["deleted"]["action"] == "deleted"
    assert Path(results["saved"]["saved_to"]).read_bytes() == pdf


# --------------------------------------------------------------------------------------------
# Refusals: each a clear tool error, nothing changed
# --------------------------------------------------------------------------------------------


def test_bad_names_keywords_and_uids_are_refused(
    served: tuple[MCPServer, ServerContext], layout: Layout
) -> None:
    server, _ = served
    tag = token("bad-")
    deliver(layout, simple_message(f"{tag} one"), sender=address("ops"), to=[address("carrier")])
    uid = inbox_uid(layout, f"{tag} one")

    async def body(client: Client) -> None:
        call = client.call_tool
        for name, words in (
            ("a\r\nb", "CR, LF or NUL"),
            ("Box*", "contains *"),
            ("Box%", "contains %"),
            ("x{3}", "contains { }"),
            ('a"b', 'contains "'),
            ("INBOX", "cannot be INBOX"),
            (" padded", "spaces"),
        ):
            refused(await call("mail_folder_create", {"name": name}), words)
        refused(await call("mail_folder_create", {"name": "Sent"}), "already exists")
        refused(
            await call("mail_folder_rename", {"name": "INBOX", "new_name": token("X")}),
            "INBOX cannot be renamed",
        )
        refused(
            await call("mail_folder_rename", {"name": token("Nope-"), "new_name": token("X")}),
            "does not exist",
        )
        refused(await call("mail_folder_rename", {"name": "Archive", "new_name": "Sent"}), "already exists")
        refused(await call("mail_folder_delete", {"name": "INBOX"}), "INBOX cannot be deleted")
        refused(await call("mail_folder_delete", {"name": token("Nope-")}), "does not exist")
        for flag, words in (
            ("two words", "not an IMAP keyword"),
            ("x)", "not an IMAP keyword"),
            ("\\Recent", "not a flag a client can set"),
            ("a\r\nb", "not an IMAP keyword"),
        ):
            refused(await call("mail_flags", {"uids": [uid], "add": [flag]}), words)
        refused(await call("mail_flags", {"uids": [uid]}), "give flags to add and/or remove")
        refused(
            await call("mail_flags", {"uids": [uid], "add": ["x"], "remove": ["X"]}), "both added and removed"
        )
        refused(
            await call("mail_flags", {"uids": [uid, 4294967000], "add": ["x"]}),
            "no message with uid 4294967000",
        )
        refused(await call("mail_delete", {"uids": []}), "uids is empty")
        refused(await call("mail_archive", {"uids": [uid], "folder": "Box*\r\n"}), "CR, LF or NUL")
        refused(await call("mail_draft_send", {"uid": 4294967000}), "no draft with uid 4294967000")
        refused(await call("mail_draft_save", {"to": "not an address", "subject": "s", "body": "b"}), "to")
        refused(
            await call("mail_forward", {"uid": 4294967000, "to": "ops@example.test"}), "no message with uid"
        )
        refused(await call("mail_forward", {"uid": uid, "to": "x\r\nBcc: evil@example.test"}), "line break")
        refused(await call("mail_attachment_save", {"uid": uid, "attachment_index": 0}), "out of range")
        refused(
            await call("mail_attachment_save", {"uid": uid, "attachment_index": 0, "save_to": "../../etc"}),
            "outside the download directory",
        )

    in_process(server, body)
    assert b"x" not in flags_of(layout, "INBOX", uid)  # the refused batch changed nothing
    assert inbox_uid(layout, f"{tag} one") == uid


def test_trash_needs_expunge_and_full_folders_need_force(
    served: tuple[MCPServer, ServerContext], layout: Layout
) -> None:
    server, _ = served
    tag = token("trash-")
    folder = token("Full-")
    with imap_as(layout, "carrier") as client:
        client.append("Trash", simple_message(f"{tag} in trash").as_bytes())
        client.create_folder(folder)
        client.create_folder(f"{folder}/child")
        client.append(folder, simple_message(f"{tag} kept").as_bytes())
    (in_trash,) = find_uids(layout, "carrier", "Trash", f"{tag} in trash")

    async def body(client: Client) -> None:
        refused(
            await client.call_tool("mail_delete", {"uids": [in_trash], "folder": "Trash"}),
            "already in the Trash folder",
            "expunge: true",
        )
        refused(
            await client.call_tool("mail_folder_delete", {"name": folder}),
            "is not empty (1 message(s))",
            "force: true",
        )
        with imap_as(layout, "carrier") as other:
            other.select_folder(folder)
            other.delete_messages(other.search("ALL"))
            other.expunge()
        refused(
            await client.call_tool("mail_folder_delete", {"name": folder}), "subfolders", f"{folder}/child"
        )
        ok(await client.call_tool("mail_folder_delete", {"name": f"{folder}/child"}))
        with imap_as(layout, "carrier") as other:
            other.append(folder, simple_message(f"{tag} again").as_bytes())
        forced = ok(await client.call_tool("mail_folder_delete", {"name": folder, "force": True}))
        assert forced["messages_deleted"] == 1

    in_process(server, body)
    assert find_uids(layout, "carrier", "Trash", f"{tag} in trash") == [in_trash]  # still there
    with imap_as(layout, "carrier") as client:
        assert folder not in {name for _, _, name in client.list_folders()}


def test_a_read_only_account_only_reads(served: tuple[MCPServer, ServerContext], layout: Layout) -> None:
    server, _ = served
    tag = token("ro-")
    deliver(layout, simple_message(f"{tag} one"), sender=address("ops"), to=[address("carrier")])
    uid = inbox_uid(layout, f"{tag} one")
    changing = {
        "mail_delete": {"uids": [uid]},
        "mail_archive": {"uids": [uid]},
        "mail_flags": {"uids": [uid], "add": ["$Seen"]},
        "mail_folder_create": {"name": token("RO-")},
        "mail_folder_rename": {"name": "Archive", "new_name": token("RO-")},
        "mail_folder_delete": {"name": "Archive"},
        "mail_forward": {"uid": uid, "to": "ops@example.test"},
        "mail_draft_save": {"to": "ops@example.test", "subject": tag, "body": "x"},
        "mail_draft_send": {"uid": 1},
        "mail_send": {"to": "ops@example.test", "subject": tag, "body": "x"},
        "mail_reply": {"uid": uid, "body": "x"},
        "mail_move": {"uid": uid, "to_folder": "Archive"},
        "mail_mark": {"uid": uid, "action": "read"},
    }

    async def body(client: Client) -> None:
        for name, args in changing.items():
            refused(
                await client.call_tool(name, {**args, "account": "readonly"}),
                "account readonly is read_only: true",
                name,
            )
        page = ok(await client.call_tool("mail_inbox_list", {"account": "readonly", "limit": 5}))
        assert uid in [m["uid"] for m in page["messages"]]
        ok(await client.call_tool("mail_accounts", {}))

    in_process(server, body)
    assert inbox_uid(layout, f"{tag} one") == uid
    assert b"\\Seen" not in flags_of(layout, "INBOX", uid)
    assert find_uids(layout, "ops", "INBOX", tag) == []  # nothing was sent
