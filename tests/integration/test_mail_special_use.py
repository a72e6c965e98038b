"""A server without SPECIAL-USE folders: Sent/Trash/Archive fall back to the configured names, and a
clear error (or warning) when neither exists. Needs its own Dovecot (the sandbox one flags them all)."""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mail_support import imap_as, simple_message, token, write_secret

from carrier.config import load_config
from carrier.mail.imap import MailNotFound
from carrier.mail.service import MailService
from carrier.sandbox.dovecot import Dovecot
from carrier.sandbox.layout import IDENTITIES, LOOPBACK, Layout, Ports, address
from carrier.sandbox.manager import Sandbox, dump_yaml

pytestmark = pytest.mark.sandbox


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def plain_dovecot(sandbox: Sandbox) -> Iterator[Layout]:
    """A second Dovecot whose folders carry no SPECIAL-USE flags; same passwords as the sandbox."""
    root = Path(tempfile.mkdtemp(prefix="carrier-nospecial-", dir="/var/tmp"))
    root.chmod(0o755)
    layout = Layout(root, Ports(imap=free_port(), imaps=free_port(), lmtp=free_port()))
    layout.secrets_dir.mkdir(mode=0o700)
    for identity in IDENTITIES:
        shutil.copy2(sandbox.layout.password_file(identity), layout.password_file(identity))
    dovecot = Dovecot(layout)
    try:
        dovecot.prepare()
        text = dovecot.config.read_text()
        stripped = re.sub(
            r"  mailbox \w+ \{\n    special_use = \\\w+\n    auto = subscribe\n  \}\n", "", text
        )
        assert "special_use" not in stripped
        dovecot.config.write_text(stripped)
        dovecot.start()
        yield layout
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mail(
    sandbox: Sandbox, plain_dovecot: Layout, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MailService]:
    work = tmp_path_factory.mktemp("nospecial")
    config = {
        "state_dir": str(work / "state"),
        "inventory": str(sandbox.layout.inventory_dir),
        "accounts": [
            {
                "name": "plain",
                "address": address("carrier"),
                "password_file": str(sandbox.layout.password_file("carrier")),
                "imap": {"host": LOOPBACK, "port": plain_dovecot.ports.imap, "tls": "none"},
                # Sending goes through the session sandbox's submission port (same password).
                "smtp": {
                    "host": LOOPBACK,
                    "port": sandbox.layout.ports.submission,
                    "tls": "starttls",
                    "ca_file": str(sandbox.layout.tls_cert),
                },
                "folders": {"trash": "Bin", "archive": "Old"},
            }
        ],
    }
    service = MailService(load_config(write_secret(work / "carrier.yml", dump_yaml(config)), {}))
    yield service
    service.close()


def test_no_special_use_flags_are_reported(mail: MailService) -> None:
    assert [(f.name, f.special_use) for f in mail.folder_list().folders] == [("INBOX", None)]


def test_archive_without_special_use_or_configured_folder_is_a_clear_error(
    mail: MailService, plain_dovecot: Layout
) -> None:
    with imap_as(plain_dovecot, "carrier") as client:
        client.append("INBOX", simple_message(token("keep-")).as_bytes())
    uid = mail.inbox_list(limit=1).messages[0].uid
    with pytest.raises(MailNotFound) as caught:
        mail.mark(uid=uid, action="archive")
    assert str(caught.value) == (
        "account plain has no \\Archive folder: the server marks none with SPECIAL-USE and folders.archive "
        "('Old') does not exist; create it or set folders.archive"
    )
    assert mail.inbox_list().total >= 1  # nothing moved, the pool still fine


def test_trash_falls_back_to_the_configured_folder(mail: MailService, plain_dovecot: Layout) -> None:
    tag = token("trash-")
    with imap_as(plain_dovecot, "carrier") as client:
        client.create_folder("Bin")
        client.append("INBOX", simple_message(tag).as_bytes())
    uid = mail.search(subject=tag).messages[0].uid
    assert mail.mark(uid=uid, action="trash").moved_to == "Bin"
    assert [m.subject for m in mail.inbox_list(folder="Bin").messages] == [tag]


def test_sent_copy_needs_a_sent_folder_and_falls_back_to_folders_sent(
    mail: MailService, plain_dovecot: Layout
) -> None:
    first = mail.send(to="ops@example.test", subject=token("nosent-"), body="x")
    assert first.saved_to is None and first.recipients == ["ops@example.test"]
    assert first.warning == "sent, but no Sent folder found (no \\Sent SPECIAL-USE and no 'Sent')"
    with imap_as(plain_dovecot, "carrier") as client:
        client.create_folder("Sent")
    tag = token("sent-")
    second = mail.send(to="ops@example.test", subject=tag, body="x")
    assert second.saved_to == "Sent" and second.warning is None
    assert [m.message_id for m in mail.inbox_list(folder="Sent").messages] == [second.message_id]
