"""`auth: oauth2` accounts in carrier.yml, and the pure parts of carrier.mail.oauth (presets, SASL
strings, renewal margin, the 0600 token file)."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from carrier.config import ConfigError, check_config, load_config
from carrier.mail import oauth

ENV = {"HOME": "/home/tester"}
SECTION = "    oauth2: {provider: google, client_id: 123.apps.example, client_secret_file: client.secret}\n"
OAUTH = """\
inventory: inventory
accounts:
  - name: gmail
    address: me@example.test
    auth: oauth2
""" + SECTION + """\
    password_file: gmail.token
    imap: {host: imap.example.test}
    smtp: {host: smtp.example.test}
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    write(tmp_path / "inventory" / "hosts.yml", "all: {hosts: {web1: {}}}\n", 0o644)
    write(tmp_path / "gmail.token", "1//refresh-token\n")
    write(tmp_path / "client.secret", "client-secret\n")
    return tmp_path


def problems(site: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    return check_config(write(site / "carrier.yml", text), environ or ENV)


def only(site: Path, text: str) -> str:
    found = problems(site, text)
    assert len(found) == 1, found
    return found[0]


def test_an_oauth2_account_loads_with_its_preset(site: Path) -> None:
    account = load_config(write(site / "carrier.yml", OAUTH), ENV).default_account
    assert account.auth == "oauth2" and account.oauth2 is not None
    assert account.oauth2.client_secret() == "client-secret"
    assert account.password() == "1//refresh-token"
    ends = oauth.endpoints(account.oauth2)
    assert ends.token_url == "https://oauth2.googleapis.com/token"
    assert ends.scope == "https://mail.google.com/" and ends.device_url is None


def test_the_refresh_token_and_client_secret_are_redacted_from_logs(site: Path) -> None:
    config = load_config(write(site / "carrier.yml", OAUTH), ENV)
    assert {"1//refresh-token", "client-secret"} <= set(config.secrets())


def test_the_microsoft_preset_uses_the_tenant(site: Path) -> None:
    text = OAUTH.replace("provider: google", "provider: microsoft, tenant: consumers")
    settings = load_config(write(site / "carrier.yml", text), ENV).default_account.oauth2
    assert settings is not None
    ends = oauth.endpoints(settings)
    assert ends.token_url == "https://login.microsoftonline.com/consumers/oauth2/v2.0/token"
    assert ends.device_url == "https://login.microsoftonline.com/consumers/oauth2/v2.0/devicecode"
    assert ends.scope is not None and "offline_access" in ends.scope and "IMAP.AccessAsUser.All" in ends.scope


@pytest.mark.parametrize("key", ["refresh_token", "access_token", "client_secret"])
def test_inline_tokens_and_client_secrets_are_refused(site: Path, key: str) -> None:
    text = OAUTH.replace("client_id: 123.apps.example", f"client_id: 123.apps.example, {key}: hunter2")
    found = problems(site, text)
    assert len(found) == 1, found
    assert f"accounts[0].oauth2.{key}" in found[0]
    assert "inline secrets are not allowed" in found[0] and "password_file" in found[0]
    assert "hunter2" not in found[0]


def test_an_inline_refresh_token_on_the_account_is_refused(site: Path) -> None:
    text = OAUTH.replace("password_file: gmail.token", "password_file: gmail.token\n    refresh_token: x2")
    problem = only(site, text)
    assert "inline passwords are not allowed" in problem and "x2" not in problem


def test_a_loose_refresh_token_file_is_refused(site: Path) -> None:
    os.chmod(site / "gmail.token", 0o644)
    problem = only(site, OAUTH)
    assert "accounts[0].password_file" in problem
    assert problem.endswith(f"gmail.token is readable by group/others (mode 0644): "
                            f"run `chmod 600 {site / 'gmail.token'}`")


def test_a_loose_client_secret_file_is_refused(site: Path) -> None:
    os.chmod(site / "client.secret", 0o640)
    problem = only(site, OAUTH)
    assert "accounts[0].oauth2.client_secret_file" in problem and "chmod 600" in problem


def test_no_refresh_token_yet_loads_and_says_to_run_mail_login(site: Path) -> None:
    (site / "gmail.token").unlink()
    account = load_config(write(site / "carrier.yml", OAUTH), ENV).default_account
    with pytest.raises(ConfigError, match=r"refresh token yet .* `carrier auth mail-login gmail`"):
        account.password()


def test_a_missing_password_file_of_a_password_account_is_still_a_problem(site: Path) -> None:
    text = OAUTH.replace("    auth: oauth2\n", "").replace(SECTION, "")
    (site / "gmail.token").unlink()
    assert "does not exist" in only(site, text)


def test_auth_oauth2_needs_its_section_and_the_section_needs_it(site: Path) -> None:
    no_section = OAUTH.replace(SECTION, "")
    assert "auth: oauth2 needs an oauth2: section" in only(site, no_section)
    no_auth = OAUTH.replace("    auth: oauth2\n", "")
    assert "set auth: oauth2" in only(site, no_auth)


def test_custom_needs_a_token_url_and_http_only_on_loopback(site: Path) -> None:
    custom = OAUTH.replace("provider: google", "provider: custom")
    assert "provider: custom needs token_url" in only(site, custom)
    remote = OAUTH.replace("provider: google", "provider: custom, token_url: 'http://idp.example.test/token'")
    assert "http:// sends tokens in clear text" in only(site, remote)
    local = OAUTH.replace("provider: google", "provider: custom, token_url: 'http://127.0.0.1:9/token'")
    assert problems(site, local) == []


def test_wrong_provider_and_mechanism_name_the_choices(site: Path) -> None:
    assert "not one of: google, microsoft, custom" in only(site, OAUTH.replace("google", "yahoo"))
    text = OAUTH.replace("client_id: 123.apps.example", "client_id: 123.apps.example, mechanism: plain")
    assert "not one of: xoauth2, oauthbearer" in only(site, text)


def test_the_client_secret_may_come_from_the_environment(site: Path) -> None:
    text = OAUTH.replace("client_secret_file: client.secret", "client_secret_env: GMAIL_CLIENT_SECRET")
    assert "GMAIL_CLIENT_SECRET is not set" in only(site, text)
    path = write(site / "carrier.yml", text)
    account = load_config(path, {**ENV, "GMAIL_CLIENT_SECRET": "s"}).default_account
    assert account.oauth2 is not None and account.oauth2.client_secret() == "s"


def test_sasl_strings_and_renewal_margin(site: Path) -> None:
    account = load_config(write(site / "carrier.yml", OAUTH), ENV).default_account
    assert oauth.sasl_mechanism(account) == "XOAUTH2"
    assert oauth.sasl_response(account, "tok") == "user=me@example.test\x01auth=Bearer tok\x01\x01"
    text = OAUTH.replace("client_id: 123.apps.example", "client_id: 123.apps.example, mechanism: oauthbearer")
    bearer = load_config(write(site / "carrier.yml", text), ENV).default_account
    assert oauth.sasl_response(bearer, "tok") == "n,a=me@example.test,\x01auth=Bearer tok\x01\x01"
    assert oauth.margin(3600) == 120 and oauth.margin(8) == 2
    token = oauth.AccessToken("secret", expires_at=100.0, lifetime=8.0)
    assert token.renew_at == 98.0 and "secret" not in repr(token)


def test_save_refresh_token_writes_mode_0600(tmp_path: Path) -> None:
    path = oauth.save_refresh_token(tmp_path / "new" / "x.token", "rt-1")
    assert path.read_text() == "rt-1\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    oauth.save_refresh_token(path, "rt-2")  # replaced, not rewritten in place: the mode is 0600 again
    assert path.read_text() == "rt-2\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
