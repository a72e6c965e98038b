"""What real providers need from the mail layer, against the sandbox Dovecot: the RFC 2971 ID after
login (seen in Dovecot's log through `imap_id_log`), and a copy of every mail Carrier sends in the
account's Sent folder: the MCP tools' mail and the command replies `carrier serve` sends from its
outbox. A Sent folder that cannot be written never loses or repeats a mail; the failure is logged."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from door_support import identities, send_signed, serving, wait_replies
from mail_support import find_uids, imap_as, token, write_config
from mcp.client.client import Client
from ruamel.yaml import YAML

from carrier import __version__
from carrier.config import load_config
from carrier.mail.service import MailService
from carrier.mcp.server import build_server
from carrier.sandbox.layout import DOMAIN, Layout
from carrier.sandbox.manager import Sandbox, dump_yaml

pytestmark = pytest.mark.sandbox


def dovecot_log(layout: Layout) -> Path:
    return layout.log_file("dovecot")


def log_since(layout: Layout, offset: int, needle: str, timeout: float = 20) -> str:
    """Dovecot's log after ``offset`` once it holds ``needle`` (its log process writes a little later)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = dovecot_log(layout).read_bytes()[offset:].decode("utf-8", "replace")
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in Dovecot's log: {text[-2000:]}")


def config_with(sandbox: Sandbox, directory: Path, **account: Any) -> Path:
    """write_config's carrier.yml with ``account`` keys set on the first account (carrier@)."""
    path = write_config(sandbox, directory)
    data = YAML(typ="safe").load(path.read_text())
    data["accounts"][0].update(account)
    path.write_text(dump_yaml(data))
    return path


def ids_sent(text: str) -> list[str]:
    return [line for line in text.splitlines() if "ID sent:" in line]


# --------------------------------------------------------------------------------------------
# IMAP ID
# --------------------------------------------------------------------------------------------


def test_imap_id_default_custom_and_off(sandbox: Sandbox, tmp_path: Path) -> None:
    layout = sandbox.layout
    vendor = token("vendor")
    # Default: Carrier says its name and version.
    offset = dovecot_log(layout).stat().st_size
    service = MailService(load_config(config_with(sandbox, tmp_path / "a"), {}))
    try:
        service.folder_list()
    finally:
        service.close()
    text = log_since(layout, offset, "ID sent:")
    line = ids_sent(text)[0]
    assert f"name=Carrier, version={__version__}, vendor=Carrier" in line, line
    # Custom fields, as a user sets them for a provider.
    offset = dovecot_log(layout).stat().st_size
    fields = {"name": "Carrier", "version": "9.9", "vendor": vendor}
    custom = config_with(sandbox, tmp_path / "b", imap_id=fields)
    service = MailService(load_config(custom, {}))
    try:
        service.inbox_list(limit=1)
    finally:
        service.close()
    line = ids_sent(log_since(layout, offset, vendor))[0]
    assert f"version=9.9, vendor={vendor}" in line
    # Off: a session without ID, then a fence session with one, so the log is known to be written.
    offset = dovecot_log(layout).stat().st_size
    off = load_config(config_with(sandbox, tmp_path / "c", imap_id=False), {})
    assert off.accounts[0].imap_id is None
    service = MailService(off)
    try:
        assert service.inbox_list(limit=1).account == "carrier"
    finally:
        service.close()
    fence = token("fence")
    service = MailService(load_config(config_with(sandbox, tmp_path / "d", imap_id={"name": fence}), {}))
    try:
        service.folder_list()
    finally:
        service.close()
    text = log_since(layout, offset, fence)
    assert [line for line in ids_sent(text) if fence not in line] == []  # only the fence said who it is


def test_imap_id_bad_settings_are_named(sandbox: Sandbox, tmp_path: Path) -> None:
    from carrier.errors import ConfigError

    for value, words in (
        ({"nick": "x"}, "unknown ID field 'nick'"),
        ("yes please", "expected false, true or a mapping"),
        ({"name": "a\u2028b"}, "printable text"),
    ):
        path = config_with(sandbox, tmp_path / token("bad"), imap_id=value)
        with pytest.raises(ConfigError) as info:
            load_config(path, {})
        assert words in str(info.value) and "imap_id" in str(info.value)


# --------------------------------------------------------------------------------------------
# Sent copies
# --------------------------------------------------------------------------------------------


def sent_with(layout: Layout, message_id: str) -> list[int]:
    with imap_as(layout, "carrier") as client:
        client.select_folder("Sent", readonly=True)
        return list(client.search(["HEADER", "Message-ID", message_id]))


def wait_sent(layout: Layout, message_id: str, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sent_with(layout, message_id)
        if found:
            return found
        time.sleep(0.1)
    return []


@contextlib.contextmanager
def sent_unwritable(layout: Layout) -> Iterator[None]:
    """carrier@'s Sent Maildir made read-only for Dovecot: APPEND fails on the server, for real."""
    with imap_as(layout, "carrier") as client:  # Dovecot makes the (auto) Sent Maildir on first use
        client.select_folder("Sent", readonly=True)
    base = layout.mail_dir / DOMAIN / "carrier" / "Maildir" / ".Sent"
    dirs = [base / sub for sub in ("tmp", "new", "cur")]
    modes = {d: d.stat().st_mode & 0o7777 for d in dirs}
    for d in dirs:
        d.chmod(0o555)
    try:
        yield
    finally:
        for d, mode in modes.items():
            d.chmod(mode)


def mcp_send(config_path: Path, **args: Any) -> dict[str, Any]:
    server, context = build_server(load_config(config_path, {}))

    async def main() -> dict[str, Any]:
        async with Client(server) as client:
            result = await client.call_tool("mail_send", args)
            assert not result.is_error, result.content
            assert isinstance(result.structured_content, dict)
            return result.structured_content

    try:
        return anyio.run(main)
    finally:
        context.close()


def test_mcp_mail_send_saves_to_sent_unless_save_sent_is_off(sandbox: Sandbox, tmp_path: Path) -> None:
    layout = sandbox.layout
    tag = token("sentcopy")
    sent = mcp_send(config_with(sandbox, tmp_path / "on"), to="ops@example.test", subject=tag, body="x")
    assert sent["saved_to"] == "Sent" and sent["warning"] is None
    assert len(sent_with(layout, sent["message_id"])) == 1
    off = token("nosent")
    result = mcp_send(
        config_with(sandbox, tmp_path / "off", save_sent=False), to="ops@example.test", subject=off, body="x"
    )
    assert result["saved_to"] is None and result["warning"] is None
    assert sent_with(layout, result["message_id"]) == []
    assert len(find_uids(layout, "ops", "INBOX", off)) == 1  # delivered all the same


def test_mcp_mail_send_with_an_unwritable_sent_is_delivered_once_and_says_so(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    layout = sandbox.layout
    tag = token("rosent")
    with sent_unwritable(layout):
        result = mcp_send(config_with(sandbox, tmp_path), to="ops@example.test", subject=tag, body="x")
    assert result["saved_to"] is None
    assert "sent, but the copy was not saved to Sent" in result["warning"]
    assert sent_with(layout, result["message_id"]) == []
    assert len(find_uids(layout, "ops", "INBOX", tag)) == 1


def test_command_replies_are_copied_to_sent(sandbox: Sandbox) -> None:
    layout = sandbox.layout
    with serving(sandbox) as (serve, _directory), identities(sandbox) as people:
        serve.start()
        tag = token("replycopy")
        send_signed(sandbox, people["ops"], "jobs", tag)
        (reply,) = wait_replies(sandbox, "ops", tag, 1)
        copies = wait_sent(layout, str(reply["Message-ID"]))
        assert len(copies) == 1
        with imap_as(layout, "carrier") as client:
            client.select_folder("Sent", readonly=True)
            data = client.fetch(copies, ["FLAGS", "BODY.PEEK[]"])[copies[0]]
        assert b"\\Seen" in data[b"FLAGS"]
        assert tag.encode() in data[b"BODY[]"]


def test_a_failed_sent_copy_of_a_reply_is_logged_and_the_reply_goes_once(sandbox: Sandbox) -> None:
    layout = sandbox.layout
    with serving(sandbox) as (serve, directory), identities(sandbox) as people:
        serve.start()
        tag = token("replyro")
        with sent_unwritable(layout):
            send_signed(sandbox, people["ops"], "jobs", tag)
            line = serve.wait_log("reply sent, but its copy was not saved to Sent", timeout=120)
            (reply,) = wait_replies(sandbox, "ops", tag, 1, settle=3.0)
        assert line["account"] == "carrier" and line["message_id"] == str(reply["Message-ID"])
        assert "append failed" in line["error"]  # the server's own answer to the APPEND
        assert sent_with(layout, str(reply["Message-ID"])) == []
        rows = json.dumps([r for r in serve.lines if r.get("outbox") == line["outbox"]])
        assert rows.count('"reply sent"') == 1  # marked sent once; never queued for a resend
        assert "will retry" not in rows
        assert directory.exists()
