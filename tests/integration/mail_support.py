"""Helpers for the mail and MCP-mail integration tests: a carrier.yml with extra accounts, delivery
through the sandbox MX, a second IMAP connection to check what the tools did, and a TCP proxy that
can drop connections or play a server that is down."""

from __future__ import annotations

import contextlib
import os
import secrets
import smtplib
import socket
import threading
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from imapclient import IMAPClient
from ruamel.yaml import YAML

from carrier.sandbox.layout import LOOPBACK, Layout, address
from carrier.sandbox.manager import Sandbox, dump_yaml


def token(tag: str = "t") -> str:
    """A unique word to find a test's own messages among everyone else's."""
    return f"{tag}{uuid.uuid4().hex[:10]}"


def write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return path


def write_config(
    sandbox: Sandbox, directory: Path, *, proxy_port: int | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """The sandbox carrier.yml plus accounts ``ops`` (ops@), ``wrong`` (a bad password) and, with
    ``proxy_port``, ``proxied`` (carrier@ over plain IMAP through the proxy); downloads in ``directory``."""
    layout = sandbox.layout
    data = YAML(typ="safe").load(layout.config_file.read_text())
    base = data["accounts"][0]
    wrong = write_secret(directory / "wrong.pass", "not-the-password-" + secrets.token_hex(4))
    data["accounts"].append(
        {
            **base,
            "name": "ops",
            "address": address("ops"),
            "username": address("ops"),
            "password_file": str(layout.password_file("ops")),
            "display_name": "Ops Team",
        }
    )
    data["accounts"].append({**base, "name": "wrong", "password_file": str(wrong)})
    if proxy_port is not None:
        data["accounts"].append(
            {**base, "name": "proxied", "imap": {"host": LOOPBACK, "port": proxy_port, "tls": "none"}}
        )
    data["mail"] = {"download_dir": str(directory / "downloads")}
    data.update(extra or {})
    path = directory / "carrier.yml"
    write_secret(path, dump_yaml(data))
    return path


def deliver(layout: Layout, message: EmailMessage | bytes, *, sender: str, to: list[str]) -> None:
    """Hand a message to the sandbox MX; it is in the mailbox when this returns (LMTP is synchronous)."""
    data = message.as_bytes() if isinstance(message, EmailMessage) else message
    with smtplib.SMTP(LOOPBACK, layout.ports.smtp, timeout=30) as smtp:
        smtp.sendmail(sender, to, data)


def simple_message(
    subject: str,
    body: str = "hello",
    *,
    sender: str = "ops",
    to: str = "carrier",
    message_id: str | None = None,
    **headers: str,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{sender.title()} <{address(sender)}>"
    msg["To"] = address(to)
    msg["Subject"] = subject
    msg["Date"] = "Mon, 06 Jan 2025 10:00:00 +0000"
    msg["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@example.test>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


@contextlib.contextmanager
def imap_as(layout: Layout, identity: str) -> Iterator[IMAPClient]:
    """A second, independent IMAP connection (plain, loopback) to check what the tools did."""
    client = IMAPClient(LOOPBACK, port=layout.ports.imap, ssl=False, timeout=30)
    client.login(address(identity), layout.password_file(identity).read_text().splitlines()[0])
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def find_uids(layout: Layout, identity: str, folder: str, subject_token: str) -> list[int]:
    with imap_as(layout, identity) as client:
        client.select_folder(folder, readonly=True)
        return list(client.search(["SUBJECT", subject_token]))


class TcpProxy:
    """Forwards a local port to ``target``; can drop every live connection or refuse new ones."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepting = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def drop_all(self) -> None:
        """Cut every live connection (what a server restart or a network drop looks like)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._stopped = True
        self.drop_all()
        self.listener.close()
