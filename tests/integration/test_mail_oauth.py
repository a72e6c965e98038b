"""OAuth2 mail accounts (issue 15.2) against the sandbox: Dovecot's real ``oauth2`` passdb and the
sandbox submission server check XOAUTH2/OAUTHBEARER access tokens by introspection at the sandbox
token server (the stand-in for Google's or Microsoft's token service). Carrier gets the tokens
from the refresh token in the account's password_file: logins through the MCP mail tools and
`carrier serve`, a refresh when the token expires, a listener that re-authenticates mid-IDLE, a
revoked refresh token, and `carrier auth mail-login` (the device flow) as a CLI process."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from door_support import Serve, identities, send_signed, serving, wait_replies
from mail_support import find_uids, token, write_config, write_secret
from mcp.client.client import Client
from mcp_types import CallToolResult
from ruamel.yaml import YAML

from carrier.config import load_config
from carrier.mail.service import MailService
from carrier.mcp.server import build_server
from carrier.sandbox.layout import LOOPBACK, Layout, address
from carrier.sandbox.manager import Sandbox, dump_yaml
from carrier.sandbox.tokenserver import CONFIDENTIAL_CLIENT, DEFAULT_LIFETIME

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[2]
#: Every access token the stand-in issues looks like this: none may show up in a log or a reply.
ACCESS_TOKEN = re.compile(r"at-[A-Za-z0-9_-]{20,}")


class Provider:
    """The sandbox token server, seen from a test: the provider's admin console and consent page."""

    def __init__(self, layout: Layout) -> None:
        self.url = f"http://{LOOPBACK}:{layout.ports.oauth}"

    def post(self, path: str, **form: str) -> dict[str, Any]:
        response = httpx2.post(self.url + path, data=form, timeout=30)
        data: dict[str, Any] = response.json()
        assert response.status_code == 200, data
        return data

    def grant(self, identity: str) -> str:
        """A refresh token for ``identity`` (as if it had approved Carrier once)."""
        return str(self.post("/admin/grant", username=address(identity),
                             client_id=CONFIDENTIAL_CLIENT)["refresh_token"])

    def count(self, what: str, identity: str) -> int:
        """How many ``refreshes`` (refresh grants) or ``introspections`` ``identity`` had."""
        data = httpx2.get(self.url + "/admin/stats", timeout=30).json()
        return int(data[what].get(address(identity), 0))

    def refreshes(self, identity: str) -> int:
        return self.count("refreshes", identity)

    @property
    def lifetime(self) -> float:
        return float(httpx2.get(self.url + "/admin/stats", timeout=30).json()["lifetime"])

    @lifetime.setter
    def lifetime(self, seconds: float) -> None:
        self.post("/admin/lifetime", seconds=str(seconds))


@pytest.fixture
def provider(sandbox: Sandbox) -> Iterator[Provider]:
    found = Provider(sandbox.layout)
    try:
        yield found
    finally:
        found.lifetime = DEFAULT_LIFETIME


def oauth_keys(layout: Layout, refresh_file: Path, **oauth2: str) -> dict[str, Any]:
    """The ``auth``/``oauth2``/``password_file`` keys of an account that logs in with the stand-in."""
    base = f"http://{LOOPBACK}:{layout.ports.oauth}"
    return {
        "auth": "oauth2",
        "oauth2": {"provider": "custom", "token_url": f"{base}/token", "device_url": f"{base}/device",
                   "client_id": CONFIDENTIAL_CLIENT,
                   "client_secret_file": str(layout.oauth_client_secret_file), **oauth2},
        "password_file": str(refresh_file),
    }


def oauth_config(sandbox: Sandbox, directory: Path, refresh_file: Path, **oauth2: str) -> Path:
    """write_config's carrier.yml plus account ``oauthops``: ops@ with OAuth2 for IMAP and SMTP."""
    path = write_config(sandbox, directory)
    data = YAML(typ="safe").load(path.read_text())
    ops = next(a for a in data["accounts"] if a["name"] == "ops")
    data["accounts"].append({**ops, "name": "oauthops", **oauth_keys(sandbox.layout, refresh_file, **oauth2)})
    write_secret(path, dump_yaml(data))
    return path


def log_size(layout: Layout, name: str) -> int:
    return layout.log_file(name).stat().st_size


def log_since(layout: Layout, name: str, offset: int, needle: str, count: int = 1,
              timeout: float = 20) -> str:
    """The log of sandbox service ``name`` after ``offset`` once ``needle`` is in it ``count`` times."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = layout.log_file(name).read_bytes()[offset:].decode("utf-8", "replace")
        if text.count(needle) >= count:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not {count}x in the {name} log: {text[-3000:]}")


def kick(layout: Layout, identity: str) -> None:
    """End ``identity``'s IMAP sessions, as a provider does when their token is revoked or expires."""
    config = str(layout.dovecot_dir / "dovecot.conf")
    done = subprocess.run(["doveadm", "-c", config, "kick", address(identity)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def tool_error(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    text: str = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    return text


# --------------------------------------------------------------------------------------------
# XOAUTH2 login and send through the MCP mail tools
# --------------------------------------------------------------------------------------------


def test_mcp_tools_log_in_and_send_with_xoauth2(sandbox: Sandbox, provider: Provider, tmp_path: Path) -> None:
    layout = sandbox.layout
    refresh = provider.grant("ops")
    config_path = oauth_config(sandbox, tmp_path, write_secret(tmp_path / "ops.token", refresh))
    tag = token("oauth")
    dovecot_at, smtp_at = log_size(layout, "dovecot"), log_size(layout, "smtp")
    before = provider.refreshes("ops")
    checked = provider.count("introspections", "ops")

    async def session() -> tuple[dict[str, Any], dict[str, Any]]:
        server, context = build_server(load_config(config_path, {}))
        try:
            async with Client(server) as client:
                folders = ok(await client.call_tool("mail_folder_list", {"account": "oauthops"}))
                sent = ok(await client.call_tool("mail_send", {
                    "account": "oauthops", "to": [address("carrier")], "subject": tag, "body": "by XOAUTH2"}))
                return folders, sent
        finally:
            context.close()

    folders, sent = anyio.run(session)
    assert "INBOX" in {f["name"] for f in folders["folders"]}
    assert sent  # the tool reported the message sent
    text = log_since(layout, "dovecot", dovecot_at, "method=XOAUTH2")
    assert f"user=<{address('ops')}>, method=XOAUTH2" in text
    # Dovecot's oauth2 passdb and the submission server both asked the provider about the token.
    assert provider.count("introspections", "ops") >= checked + 2
    smtp = log_since(layout, "smtp", smtp_at, f"AUTH XOAUTH2 for {address('ops')}")
    assert "ok" in smtp.split(f"AUTH XOAUTH2 for {address('ops')}")[1].splitlines()[0]
    assert find_uids(layout, "carrier", "INBOX", tag)  # delivered
    assert find_uids(layout, "ops", "Sent", tag)  # and its Sent copy APPENDed over the XOAUTH2 session
    assert provider.refreshes("ops") > before  # the access token came from the refresh grant
    assert not ACCESS_TOKEN.search(json.dumps([folders, sent]))
    assert refresh not in json.dumps([folders, sent])


def test_oauthbearer_logs_in_to_imap_and_smtp(sandbox: Sandbox, provider: Provider, tmp_path: Path) -> None:
    layout = sandbox.layout
    config_path = oauth_config(sandbox, tmp_path, write_secret(tmp_path / "ops.token", provider.grant("ops")),
                               mechanism="oauthbearer")
    tag = token("bearer")
    dovecot_at, smtp_at = log_size(layout, "dovecot"), log_size(layout, "smtp")
    service = MailService(load_config(config_path, {}))
    try:
        assert service.folder_list("oauthops")
        service.send("oauthops", to=[address("carrier")], subject=tag, body="by OAUTHBEARER")
    finally:
        service.close()
    assert f"user=<{address('ops')}>, method=OAUTHBEARER" in log_since(layout, "dovecot", dovecot_at,
                                                                      "method=OAUTHBEARER")
    log_since(layout, "smtp", smtp_at, f"AUTH OAUTHBEARER for {address('ops')} from")
    assert find_uids(layout, "carrier", "INBOX", tag)


# --------------------------------------------------------------------------------------------
# Refresh before expiry; a revoked refresh token
# --------------------------------------------------------------------------------------------


def test_pool_logs_in_again_with_a_new_token_when_the_old_one_nears_expiry(
    sandbox: Sandbox, provider: Provider, tmp_path: Path
) -> None:
    layout = sandbox.layout
    config_path = oauth_config(sandbox, tmp_path, write_secret(tmp_path / "ops.token", provider.grant("ops")))
    provider.lifetime = 4  # renewed 1 s before its end: a quarter of its lifetime
    before = provider.refreshes("ops")
    offset = log_size(layout, "dovecot")
    service = MailService(load_config(config_path, {}))
    try:
        service.folder_list("oauthops")
        assert provider.refreshes("ops") == before + 1
        time.sleep(4.5)  # the token has expired at the provider
        assert service.folder_list("oauthops")  # the pool's connection is replaced, not used
        assert provider.refreshes("ops") == before + 2
    finally:
        service.close()
    log_since(layout, "dovecot", offset, f"user=<{address('ops')}>, method=XOAUTH2", count=2)


def test_a_revoked_refresh_token_gives_an_error_naming_mail_login(
    sandbox: Sandbox, provider: Provider, tmp_path: Path
) -> None:
    refresh = provider.grant("ops")
    config_path = oauth_config(sandbox, tmp_path, write_secret(tmp_path / "ops.token", refresh))

    async def session() -> tuple[str, str]:
        server, context = build_server(load_config(config_path, {}))
        try:
            async with Client(server) as client:
                ok(await client.call_tool("mail_folder_list", {"account": "oauthops"}))
                provider.post("/revoke", token=refresh)  # the user removed Carrier's access
                kick(sandbox.layout, "ops")  # and the provider ends the sessions it had
                listing = tool_error(await client.call_tool("mail_inbox_list", {"account": "oauthops"}))
                sending = tool_error(await client.call_tool("mail_send", {
                    "account": "oauthops", "to": [address("carrier")], "subject": "x", "body": "y"}))
                return listing, sending
        finally:
            context.close()

    for text in anyio.run(session):
        assert "refused the refresh token" in text, text
        assert "run `carrier auth mail-login oauthops`" in text, text
        assert refresh not in text and not ACCESS_TOKEN.search(text)


def wait_count(serve: Serve, msg: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(line.get("msg") == msg for line in serve.lines) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {msg!r} lines: {serve.lines[-20:]}"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# `carrier serve`: XOAUTH2 for the listener (IDLE) and the replies; re-authentication mid-IDLE
# --------------------------------------------------------------------------------------------


def test_listener_re_authenticates_mid_idle_and_keeps_receiving(sandbox: Sandbox, provider: Provider) -> None:
    layout = sandbox.layout
    provider.lifetime = 8  # the listener must log in again every 6 s
    before = provider.refreshes("carrier")
    with serving(sandbox) as (serve, directory), identities(sandbox) as people:
        refresh = provider.grant("carrier")
        refresh_file = write_secret(directory / "carrier.token", refresh)
        data = YAML(typ="safe").load(serve.config.read_text())
        data["accounts"][0].update(oauth_keys(layout, refresh_file))
        write_secret(serve.config, dump_yaml(data))
        offset = log_size(layout, "dovecot")
        serve.start()
        first = token("idle")
        send_signed(sandbox, people["ops"], "jobs", first)
        wait_replies(sandbox, "ops", first, 1)
        # The token nears expiry while the listener sits in IDLE: it logs in again with a new one.
        serve.wait_log("mail listener re-authenticating", timeout=60)
        wait_count(serve, "mail listener connected", 2)
        assert provider.refreshes("carrier") >= before + 2
        time.sleep(3)  # now the first token has expired at the provider
        # The provider ends the sessions of the expired token (Exchange Online does): a listener
        # still on it would have to log in with a refused token.
        kick(layout, "carrier")
        second = token("idle")
        send_signed(sandbox, people["ops"], "jobs", second)
        (reply,) = wait_replies(sandbox, "ops", second, 1)
        assert "Subject" in reply
        assert serve.stop() == 0
    text = log_since(layout, "dovecot", offset, f"user=<{address('carrier')}>, method=XOAUTH2", count=3)
    assert "method=PLAIN" not in text.split(f"user=<{address('carrier')}>")[-1][:40]
    logged = json.dumps(serve.lines)
    assert refresh not in logged and not ACCESS_TOKEN.search(logged)


# --------------------------------------------------------------------------------------------
# `carrier auth mail-login`: the device flow as a CLI process
# --------------------------------------------------------------------------------------------


def mail_login(config_path: Path, account: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "carrier", "auth", "mail-login", account, "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def read_user_code(proc: subprocess.Popen[str]) -> tuple[str, list[str]]:
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        match = re.search(r"enter the code (\S+)", line)
        if match:
            return match.group(1), lines
    raise AssertionError(f"no user code in the output: {lines} {proc.stderr.read() if proc.stderr else ''}")


def test_mail_login_walks_through_the_device_flow_and_saves_the_token(
    sandbox: Sandbox, provider: Provider, tmp_path: Path
) -> None:
    refresh_file = tmp_path / "tokens" / "ops.token"
    config_path = oauth_config(sandbox, tmp_path, refresh_file)
    # No refresh token yet: the config loads, and using the account says what to run.
    service = MailService(load_config(config_path, {}))
    try:
        with pytest.raises(Exception, match=r"run `carrier auth mail-login oauthops`"):
            service.folder_list("oauthops")
    finally:
        service.close()

    proc = mail_login(config_path, "oauthops")
    code, lines = read_user_code(proc)
    approve_at = f"open http://{LOOPBACK}:{sandbox.layout.ports.oauth}/device/approve"
    assert any(approve_at in line for line in lines)
    provider.post("/device/approve", user_code=code, username=address("ops"))  # the user approves
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"Refresh token saved to {refresh_file} (mode 0600)" in out
    assert f"IMAP login as {address('ops')} with XOAUTH2: ok" in out
    assert stat.S_IMODE(refresh_file.stat().st_mode) == 0o600
    saved = refresh_file.read_text().strip()
    assert saved.startswith("rt-") and saved not in out + err + "".join(lines)
    service = MailService(load_config(config_path, {}))
    try:
        assert service.folder_list("oauthops")
    finally:
        service.close()


def test_mail_login_refused_by_the_user_says_so_and_writes_nothing(
    sandbox: Sandbox, provider: Provider, tmp_path: Path
) -> None:
    refresh_file = tmp_path / "ops.token"
    config_path = oauth_config(sandbox, tmp_path, refresh_file)
    proc = mail_login(config_path, "oauthops")
    code, _ = read_user_code(proc)
    provider.post("/device/approve", user_code=code, username=address("ops"), deny="1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "was refused by the user: run it again and approve the request" in err
    assert not refresh_file.exists()


def test_mail_login_of_a_password_account_names_the_fix(sandbox: Sandbox, tmp_path: Path) -> None:
    config_path = write_config(sandbox, tmp_path)
    proc = mail_login(config_path, "ops")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "account ops uses auth: password: set auth: oauth2" in err
