"""Mail tools benchmark: Carrier's mail_* tools vs the `mcp-email-server` package on one 10,000-message
Dovecot mailbox, both driven as an MCP client drives them (stdio subprocess, repeated calls, so
connection reuse counts), with raw imapclient on one connection as the floor. Also the peak memory
of the server process while it reads a message just under the 20 MB cap, and the mailbox-keeping
operations both servers offer (issue 15): forward one message, move a batch of UIDs, delete a batch
for good. For the batch operations each side works on its own fresh INBOX messages, so both see the
same mailbox state.

Run: ``python -m tests.bench.bench_mail`` (prints the markdown section); ``main()`` returns it.
The comparison package is installed into its own venv under /var/tmp (never Carrier's .venv); if
that fails, the section says why and compares with imapclient only.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import anyio
from imapclient import IMAPClient
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from ruamel.yaml import YAML

from carrier.sandbox.layout import LOOPBACK, address
from carrier.sandbox.manager import Sandbox, dump_yaml

MESSAGES = 10_000
REPEATS = 20
PORT_OFFSET = 2500 + int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
BATCH = 50  # UIDs per move / delete call
NEEDLE = "needle"
MCES_VENV = Path(os.environ.get("CARRIER_BENCH_MCES_VENV", "/var/tmp/carrier-bench-mces"))
REPO = Path(__file__).resolve().parents[2]
BIG_ATTACHMENT = 14_500_000  # ~19.6 MB once base64-encoded: just under the 20 MiB reading cap


def _message(i: int) -> bytes:
    msg = EmailMessage()
    sender = ("ops", "admin", "newbie")[i % 3]
    msg["From"] = f"{sender.title()} <{address(sender)}>"
    msg["To"] = address("carrier")
    topic = NEEDLE if i % 100 == 0 else ("deploy", "backup", "alert", "report")[i % 4]
    msg["Subject"] = f"{topic} #{i}: nightly status for web{i % 7}"
    msg["Date"] = email.utils.formatdate(1_700_000_000 + i * 60)
    msg["Message-ID"] = f"<bench-{i}@example.test>"
    body = f"Message {i}.\n" + "All services nominal; details follow.\n" * 20
    msg.set_content(body)
    if i % 10 == 0:
        msg.add_alternative(
            f"<html><body><p>Message <b>{i}</b></p>{'<p>row</p>' * 20}</body></html>", subtype="html"
        )
    if i % 20 == 0:
        msg.add_attachment(b"x" * 2048, maintype="application", subtype="octet-stream", filename=f"f{i}.bin")
    return msg.as_bytes()


def _fill(box: Sandbox) -> None:
    """10,000 messages into carrier@'s INBOX with MULTIAPPEND, 500 per command."""
    layout = box.layout
    client = IMAPClient(LOOPBACK, port=layout.ports.imap, ssl=False, timeout=120)
    client.login(address("carrier"), layout.password_file("carrier").read_text().splitlines()[0])
    try:
        for start in range(0, MESSAGES, 500):
            client.multiappend("INBOX", [_message(i) for i in range(start, min(start + 500, MESSAGES))])
        big = EmailMessage()
        big["From"], big["To"], big["Subject"] = address("ops"), address("carrier"), "big one"
        big["Message-ID"] = "<bench-big@example.test>"
        big.set_content("A large attachment follows.\n")
        big.add_attachment(
            os.urandom(BIG_ATTACHMENT), maintype="application", subtype="octet-stream", filename="big.bin"
        )
        client.create_folder("Big")
        client.append("Big", big.as_bytes())
        client.select_folder("INBOX")  # let Dovecot build its indexes before anything is timed
        client.search(["SUBJECT", NEEDLE])
        client.fetch(client.search("ALL"), ["FLAGS"])
    finally:
        client.logout()


def _carrier_config(box: Sandbox, directory: Path) -> Path:
    """The sandbox config with IMAP over plain loopback, the same transport the others get."""
    data = YAML(typ="safe").load(box.layout.config_file.read_text())
    data["accounts"][0]["imap"] = {"host": LOOPBACK, "port": box.layout.ports.imap, "tls": "none"}
    path = directory / "carrier.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(dump_yaml(data))
    return path


def _install_mces() -> tuple[Path | None, str]:
    """The mcp-email-server executable in its own venv (installed if missing), or None and why."""
    exe = MCES_VENV / "bin" / "mcp-email-server"
    if exe.exists():
        return exe, ""
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(MCES_VENV)], check=True, capture_output=True, timeout=120
        )
        subprocess.run(
            [str(MCES_VENV / "bin" / "pip"), "install", "-q", "mcp-email-server"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        tail = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else [str(exc)]
        return None, f"pip install mcp-email-server into {MCES_VENV} failed: {' '.join(tail)}"
    return (exe, "") if exe.exists() else (None, f"{exe} missing after pip install")


def _mces_version() -> str:
    """The installed mcp-email-server version (its API changes between releases)."""
    probe = subprocess.run(
        [str(MCES_VENV / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('mcp-email-server'))"],
        capture_output=True, text=True, timeout=60,
    )
    return probe.stdout.strip() or "unknown version"


def _mces_params(exe: Path, box: Sandbox, home: Path) -> StdioServerParameters:
    layout = box.layout
    env = {
        "HOME": str(home),
        "MCP_EMAIL_SERVER_CONFIG_PATH": str(home / "config.toml"),
        "MCP_EMAIL_SERVER_CREDENTIAL_STORAGE": "plaintext",
        "MCP_EMAIL_SERVER_ACCOUNT_NAME": "carrier",
        "MCP_EMAIL_SERVER_EMAIL_ADDRESS": address("carrier"),
        "MCP_EMAIL_SERVER_PASSWORD": layout.password_file("carrier").read_text().splitlines()[0],
        "MCP_EMAIL_SERVER_IMAP_HOST": LOOPBACK,
        "MCP_EMAIL_SERVER_IMAP_PORT": str(layout.ports.imap),
        "MCP_EMAIL_SERVER_IMAP_SSL": "false",
        "MCP_EMAIL_SERVER_SMTP_HOST": LOOPBACK,
        "MCP_EMAIL_SERVER_SMTP_PORT": str(layout.ports.submission),
        "MCP_EMAIL_SERVER_SMTP_SSL": "false",
        "MCP_EMAIL_SERVER_SMTP_START_SSL": "true",
        "MCP_EMAIL_SERVER_SMTP_VERIFY_SSL": "false",
        "MCP_EMAIL_SERVER_ALLOWED_RECIPIENTS": address("ops"),  # the one address the forwards go to
    }
    return StdioServerParameters(command=str(exe), args=["stdio"], env=env, cwd=str(home))


# --- process memory (the stdio servers are children of this process) ---


def _children() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pid_of(marker: str) -> int | None:
    return next((pid for pid, cmd in _children().items() if marker in cmd), None)


# --- timing ---


@dataclass
class Series:
    samples: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000

    @property
    def p90_ms(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))] * 1000


Call = Callable[[int], Awaitable[Any]]


async def _time(call: Call, repeats: int) -> Series:
    await call(0)  # warm: connect, log in, select
    samples = []
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    return Series(samples)


def _checked(result: Any) -> Any:
    if result.is_error:
        raise RuntimeError(f"tool call failed: {result.content[0].text[:300]}")
    return result.structured_content


def _read_uid(i: int) -> int:
    return 9_000 + (i * 37) % 900  # a spread of messages, the same ones for every tool


def _batch(side: int, op: int, i: int) -> list[int]:
    """Fresh INBOX UIDs for call ``i`` of batch operation ``op`` (0 move, 1 delete) on ``side``
    (0 Carrier, 1 mcp-email-server, 2 imapclient): disjoint blocks of BATCH from UID 1 up, never
    touched by the list/read/search calls (which use the newest and 9000+)."""
    block = ((op * 3 + side) * (REPEATS + 1) + i) * BATCH
    return list(range(block + 1, block + BATCH + 1))


def _forward_uid(side: int, i: int) -> int:
    """The message each side forwards on call ``i``: the same spread, a different block per side."""
    return 7_001 + side * 200 + i


async def _bench(
    carrier: StdioServerParameters, mces: StdioServerParameters | None, raw: IMAPClient
) -> tuple[dict[str, dict[str, Series]], dict[str, str]]:
    results: dict[str, dict[str, Series]] = {"list": {}, "read": {}, "search": {}}
    memory: dict[str, str] = {}
    async with AsyncExitStack() as stack:
        c = await stack.enter_async_context(Client(carrier))
        m = await stack.enter_async_context(Client(mces)) if mces else None

        async def c_list(i: int) -> None:
            page = _checked(await c.call_tool("mail_inbox_list", {"limit": 50}))
            assert len(page["messages"]) == 50

        async def c_read(i: int) -> None:
            _checked(await c.call_tool("mail_inbox_read", {"uid": _read_uid(i)}))

        async def c_search(i: int) -> None:
            found = _checked(await c.call_tool("mail_search", {"subject": NEEDLE, "limit": 50}))
            assert found["total"] == MESSAGES // 100

        results["list"]["carrier"] = await _time(c_list, REPEATS)
        results["read"]["carrier"] = await _time(c_read, REPEATS)
        results["search"]["carrier"] = await _time(c_search, REPEATS)

        if m is not None:

            async def m_list(i: int) -> None:
                page = _checked(
                    await m.call_tool(
                        "list_emails_metadata", {"account_name": "carrier", "page_size": 50, "order": "desc"}
                    )
                )
                assert len(page["emails"]) == 50

            async def m_read(i: int) -> None:
                _checked(
                    await m.call_tool(
                        "get_emails_content", {"account_name": "carrier", "email_ids": [str(_read_uid(i))]}
                    )
                )

            async def m_search(i: int) -> None:
                _checked(
                    await m.call_tool(
                        "list_emails_metadata",
                        {"account_name": "carrier", "subject": NEEDLE, "page_size": 50},
                    )
                )

            results["list"]["mcp-email-server"] = await _time(m_list, REPEATS)
            results["read"]["mcp-email-server"] = await _time(m_read, REPEATS)
            results["search"]["mcp-email-server"] = await _time(m_search, REPEATS)

        # Peak memory of each server process while it reads the ~19.6 MB message.
        pid = _pid_of("carrier.mcp.cli")
        if pid:
            before = _status_kb(pid, "VmRSS")
            _checked(await c.call_tool("mail_inbox_read", {"uid": 1, "folder": "Big"}))
            text_peak = _status_kb(pid, "VmHWM")
            _checked(
                await c.call_tool(
                    "mail_inbox_read", {"uid": 1, "folder": "Big", "format": "raw_eml", "max_chars": 2_000}
                )
            )
            raw_peak = _status_kb(pid, "VmHWM")
            memory["carrier"] = (
                f"RSS {before / 1024:.0f} MB before; peak +{(text_peak - before) / 1024:.0f} MB "
                f"reading it as text, +{(raw_peak - before) / 1024:.0f} MB as raw_eml"
            )
        mpid = _pid_of("mcp-email-server")
        if m is not None and mpid:
            before = _status_kb(mpid, "VmRSS")
            _checked(
                await m.call_tool(
                    "get_emails_content", {"account_name": "carrier", "email_ids": ["1"], "mailbox": "Big"}
                )
            )
            memory["mcp-email-server"] = (
                f"RSS {before / 1024:.0f} MB before; peak "
                f"+{(_status_kb(mpid, 'VmHWM') - before) / 1024:.0f} MB (get_emails_content)"
            )

    # The floor: the same IMAP commands on one open imapclient connection with INBOX kept selected,
    # no MCP, no MIME parsing.
    top = raw.select_folder("INBOX", readonly=True)[b"EXISTS"]

    async def r_list(i: int) -> None:
        raw.noop()
        raw.use_uid = False
        try:
            raw.fetch(
                list(range(top - 49, top + 1)),
                ["UID", "FLAGS", "RFC822.SIZE", "BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)]"],
            )
        finally:
            raw.use_uid = True

    async def r_read(i: int) -> None:
        raw.noop()
        raw.fetch([_read_uid(i)], ["BODY.PEEK[]"])

    async def r_search(i: int) -> None:
        raw.noop()
        uids = raw.search(["SUBJECT", NEEDLE])
        raw.fetch(sorted(uids)[-50:], ["UID", "BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)]"])

    results["list"]["imapclient"] = await _time(r_list, REPEATS)
    results["read"]["imapclient"] = await _time(r_read, REPEATS)
    results["search"]["imapclient"] = await _time(r_search, REPEATS)
    results.update(await _bench_keeping(carrier, mces, raw))
    return results, memory


async def _bench_keeping(
    carrier: StdioServerParameters, mces: StdioServerParameters | None, raw: IMAPClient
) -> dict[str, dict[str, Series]]:
    """Forward / move batch / delete batch, after the read-only figures (they shrink the INBOX)."""
    results: dict[str, dict[str, Series]] = {"forward": {}, "move": {}, "delete": {}}
    async with AsyncExitStack() as stack:
        c = await stack.enter_async_context(Client(carrier))
        m = await stack.enter_async_context(Client(mces)) if mces else None

        async def c_forward(i: int) -> None:
            _checked(await c.call_tool("mail_forward", {"uid": _forward_uid(0, i), "to": [address("ops")]}))

        async def c_move(i: int) -> None:
            done = _checked(await c.call_tool("mail_archive", {"uids": _batch(0, 0, i)}))
            assert len(done["uids"]) == BATCH

        async def c_delete(i: int) -> None:
            done = _checked(await c.call_tool("mail_delete", {"uids": _batch(0, 1, i), "expunge": True}))
            assert len(done["uids"]) == BATCH

        results["forward"]["carrier"] = await _time(c_forward, REPEATS)
        results["move"]["carrier"] = await _time(c_move, REPEATS)
        results["delete"]["carrier"] = await _time(c_delete, REPEATS)

        if m is not None:

            def m_ok(result: Any, word: str) -> None:
                """Clean success, or every effect succeeded and only its local metadata cache asks
                for "reconciliation" (it could not invalidate its index; IMAP/SMTP are done)."""
                text = result.content[0].text if result.content else ""
                effects_done = (
                    "succeeded" in text and "failed" not in text and "unknown" not in text
                    and "reconciliation needed" in text
                )
                if result.is_error or not (text.startswith(word) or effects_done):
                    raise RuntimeError(f"mcp-email-server call failed: {text[:300]}")

            async def m_forward(i: int) -> None:
                m_ok(
                    await m.call_tool(
                        "forward_email",
                        {"account_name": "carrier", "email_id": str(_forward_uid(1, i)),
                         "recipients": [address("ops")]},
                    ),
                    "Email forwarded successfully",
                )

            async def m_move(i: int) -> None:
                m_ok(
                    await m.call_tool(
                        "move_emails",
                        {"account_name": "carrier", "email_ids": [str(u) for u in _batch(1, 0, i)],
                         "destination_mailbox": "Archive"},
                    ),
                    f"Successfully moved {BATCH}",
                )

            async def m_delete(i: int) -> None:
                m_ok(
                    await m.call_tool(
                        "delete_emails",
                        {"account_name": "carrier", "email_ids": [str(u) for u in _batch(1, 1, i)]},
                    ),
                    f"Successfully deleted {BATCH}",
                )

            results["forward"]["mcp-email-server"] = await _time(m_forward, REPEATS)
            results["move"]["mcp-email-server"] = await _time(m_move, REPEATS)
            results["delete"]["mcp-email-server"] = await _time(m_delete, REPEATS)

    raw.select_folder("INBOX")

    async def r_move(i: int) -> None:
        raw.noop()
        raw.move(_batch(2, 0, i), "Archive")

    async def r_delete(i: int) -> None:
        raw.noop()
        uids = _batch(2, 1, i)
        raw.delete_messages(uids)
        raw.uid_expunge(uids)

    results["move"]["imapclient"] = await _time(r_move, REPEATS)
    results["delete"]["imapclient"] = await _time(r_delete, REPEATS)
    return results


def _render(
    results: dict[str, dict[str, Series]], memory: dict[str, str], note: str, fill_s: float, version: str
) -> str:
    what = {
        "list": "50 newest (`mail_inbox_list` / `list_emails_metadata`)",
        "read": "read one message (`mail_inbox_read` / `get_emails_content`)",
        "search": f"search subject `{NEEDLE}`, 100 hits (`mail_search` / `list_emails_metadata`)",
        "forward": "forward one message to one address (`mail_forward` / `forward_email`)",
        "move": f"move {BATCH} UIDs to Archive (`mail_archive` / `move_emails`)",
        "delete": f"delete {BATCH} UIDs for good (`mail_delete` expunge / `delete_emails`)",
    }
    lines = [
        "### Mail tools (issue 5): Carrier vs mcp-email-server, 10,000-message mailbox",
        "",
        f"Dovecot 2.3 on loopback, plain IMAP for every client, {MESSAGES:,} messages "
        f"(filled in {fill_s:.1f} s by MULTIAPPEND). Each MCP server runs as a stdio subprocess "
        "driven by the MCP SDK client; "
        f"{REPEATS} timed calls after one warm-up call, so connection reuse counts. Target: Carrier ≤ 0.5x "
        "mcp-email-server. imapclient = the same IMAP commands on one open connection with the folder "
        "kept selected (no MCP, no MIME parsing): the floor.",
        "",
        "Mailbox-keeping rows (issue 15), run after the read-only ones: mcp-email-server offers all "
        "three — `forward_email`, `move_emails` (up to 100 UIDs) and `delete_emails` (UID EXPUNGE, for "
        "good) — so each is compared with Carrier's tool that has the same effect. Carrier's "
        "`mail_move` takes one UID; its batch move is `mail_archive` (the same IMAP MOVE to the "
        "\\\\Archive folder), and `mail_delete` with `expunge: true` is the for-good delete "
        f"(its default moves to Trash). Each side moves/deletes its own fresh {BATCH}-UID blocks of "
        "the same INBOX (disjoint UIDs, same messages' shapes), so both see the same mailbox state; "
        "each forward goes through the sandbox SMTP submission port to one address and saves a Sent "
        "copy (both servers do), each side forwarding its own messages; Carrier's forward also "
        "sets $Forwarded on the original (a STORE on the folder its read left selected, which the "
        "peer does not make); the <= 0.5x target is for list, read and search. No "
        "imapclient floor for forward (it is SMTP). mcp-email-server reports some forwards/moves as "
        "succeeded with \"reconciliation needed\" (its local metadata index could not be "
        "invalidated); those count as done when every IMAP/SMTP effect it lists succeeded.",
        "",
        "| operation | Carrier median (p90) | mcp-email-server median (p90) | ratio | imapclient median |",
        "|---|---|---|---|---|",
    ]
    for key, label in what.items():
        row = results[key]
        carrier = row["carrier"]
        other = row.get("mcp-email-server")
        floor = row.get("imapclient")
        other_text = f"{other.median_ms:.1f} ms ({other.p90_ms:.1f})" if other else "n/a"
        ratio = f"{carrier.median_ms / other.median_ms:.2f}x" if other else "n/a"
        lines.append(
            f"| {label} | {carrier.median_ms:.1f} ms ({carrier.p90_ms:.1f}) | {other_text} | {ratio} "
            f"| {f'{floor.median_ms:.1f} ms' if floor else 'n/a'} |"
        )
    if version:
        lines += ["", f"mcp-email-server {version}."]
    lines += ["", "Peak memory of the server process reading a 19.6 MB message (14.5 MB attachment):", ""]
    lines += [f"- {name}: {text}" for name, text in memory.items()] or ["- not measured"]
    if note:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="carrier-bench-mail-", dir="/var/tmp"))
    root.chmod(0o755)
    box = Sandbox(root, port_offset=PORT_OFFSET)
    try:
        box.up()
        started = time.perf_counter()
        _fill(box)
        fill_s = time.perf_counter() - started
        work = root / "bench"
        work.mkdir()
        carrier = StdioServerParameters(
            command=sys.executable,
            args=["-m", "carrier.mcp.cli", "--config", str(_carrier_config(box, work))],
            cwd=str(REPO),
        )
        exe, note = _install_mces()
        home = work / "mces-home"
        home.mkdir()
        mces = _mces_params(exe, box, home) if exe else None
        raw = IMAPClient(LOOPBACK, port=box.layout.ports.imap, ssl=False, timeout=120)
        raw.login(address("carrier"), box.layout.password_file("carrier").read_text().splitlines()[0])
        try:
            results, memory = anyio.run(_bench, carrier, mces, raw)
        finally:
            raw.logout()
        return _render(results, memory, note, fill_s, _mces_version() if exe else "")
    finally:
        box.destroy()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    print(main())
