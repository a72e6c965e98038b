"""carrier.yml: typed values, defaults, every problem with its fix, environment overrides, secrets."""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from carrier.config import (
    Admin,
    Config,
    Folders,
    ImapSettings,
    Role,
    SmtpSettings,
    User,
    check_config,
    load_config,
    resolve_config_path,
)
from carrier.errors import ConfigError

FPR_ADMIN = "0123456789ABCDEF0123456789ABCDEF01234567"
FPR_OPS = "89ABCDEF0123456789ABCDEF0123456789ABCDEF"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with an inventory, a playbook dir and a 0600 password file (as the files reference)."""
    write(tmp_path / "inventory" / "hosts.yml", "all: {hosts: {web1: {}}}\n", 0o644)
    (tmp_path / "playbooks").mkdir()
    write(tmp_path / "carrier.pass", "s3cret-mail\n")
    return tmp_path


ACCOUNT = """\
accounts:
  - name: carrier
    address: carrier@example.test
    password_file: carrier.pass
    imap: {host: imap.example.test}
    smtp: {host: smtp.example.test}
"""
MINIMAL = "inventory: inventory\n" + ACCOUNT

FULL = f"""\
state_dir: state
inventory: inventory
playbook_dirs: [playbooks]
gnupg_home: /srv/gnupg

accounts:
  - name: carrier
    address: carrier@example.test
    username: carrier-login
    password_file: carrier.pass
    imap:
      host: imap.example.test
      port: 10993
      tls: implicit
      ca_file: ca.pem
      allow_self_signed: true
    smtp:
      host: smtp.example.test
      port: 10587
      tls: starttls
      auth: false
    folders: {{inbox: INBOX, sent: Sent Items, drafts: Drafts, trash: Bin, archive: Archive, junk: Spam}}
    idle: false
    check_interval: 30
  - name: ops
    address: ops@example.test
    password_env: OPS_MAIL_PASSWORD
    imap: {{host: 127.0.0.1, tls: none}}
    smtp: {{host: localhost, tls: none}}

mcp:
  bind_host: 192.0.2.1
  port: 19443
  tls_cert: tls/cert.pem
  tls_key: tls/key.pem
  ip_allow: [10.0.0.0/8, "2001:db8::/32"]
  ip_deny: [10.6.6.6]

admins:
  - {{email: admin@example.test, fingerprint: "0123 4567 89ab cdef 0123  4567 89AB CDEF 0123 4567"}}
users:
  - {{email: ops@example.test, fingerprint: {FPR_OPS}, role: deployer}}
roles:
  deployer: {{playbooks: ["deploy_*", restart_nginx], hosts: web, exec: true, shell: false, pty: true}}
  viewer: {{}}
  lab: {{exec: true, local: true}}
allowed_senders: [ops@example.test, admin@example.test]
admin_contacts: [boss@example.test]

limits: {{rate_limit: 10, rate_limit_window: 30, max_jobs: 4, max_jobs_per_host: 1, output_max_bytes: 2048}}
keyserver: {{url: "http://127.0.0.1:10080", timeout: 2.5}}
llm: {{enabled: true, api_url: "https://llm.example.test/v1", api_key_env: LLM_KEY, model: small}}
logging: {{level: debug}}
"""

ENV: dict[str, str] = {"HOME": "/home/tester"}


def env(**extra: str) -> dict[str, str]:
    return {**ENV, **extra}


def problems_for(path: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    return check_config(path, ENV if environ is None else environ)


def only_problem(path: Path, environ: Mapping[str, str] | None = None) -> str:
    found = problems_for(path, environ)
    assert len(found) == 1, found
    return found[0]


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# ---------------------------------------------------------------------------------------------
# A good file
# ---------------------------------------------------------------------------------------------


def test_full_file_loads_with_typed_values(site: Path) -> None:
    write(site / "ca.pem", "cert\n", 0o644)
    path = write(site / "carrier.yml", FULL)
    cfg = load_config(path, env(OPS_MAIL_PASSWORD="ops-pw", LLM_KEY="llm-key"))

    assert cfg.path == path
    assert cfg.state_dir == site / "state"
    assert cfg.inventory == site / "inventory"
    assert cfg.playbook_dirs == (site / "playbooks",)
    assert cfg.gnupg_home == Path("/srv/gnupg")

    first, second = cfg.accounts
    assert cfg.default_account is first
    assert (first.name, first.address, first.username) == ("carrier", "carrier@example.test", "carrier-login")
    assert first.password_file == site / "carrier.pass" and first.password_env is None
    assert first.imap == ImapSettings(
        host="imap.example.test", port=10993, tls="implicit", ca_file=site / "ca.pem", allow_self_signed=True
    )
    assert first.smtp == SmtpSettings(host="smtp.example.test", port=10587, tls="starttls", auth=False)
    assert first.folders == Folders(sent="Sent Items", trash="Bin", junk="Spam")
    assert first.idle is False and first.check_interval == 30
    assert first.commands is True and cfg.accounts[1].commands is False  # default: first account only
    assert first.password() == "s3cret-mail"

    assert second.password_env == "OPS_MAIL_PASSWORD" and second.password() == "ops-pw"
    assert (second.imap.tls, second.imap.port, second.smtp.tls, second.smtp.port) == ("none", 143, "none", 25)
    assert cfg.account("ops") is second

    assert cfg.mcp.bind_host == "192.0.2.1" and cfg.mcp.port == 19443
    assert (cfg.mcp.tls_cert, cfg.mcp.tls_key) == (site / "tls/cert.pem", site / "tls/key.pem")
    assert cfg.mcp.ip_allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert cfg.mcp.ip_deny == (ipaddress.ip_network("10.6.6.6/32"),)

    assert cfg.admins == (Admin(email="admin@example.test", fingerprint=FPR_ADMIN),)
    assert cfg.users == (User(email="ops@example.test", fingerprint=FPR_OPS, role="deployer"),)
    assert dict(cfg.roles) == {
        "deployer": Role(
            playbooks=("deploy_*", "restart_nginx"), hosts="web", exec=True, shell=False, pty=True
        ),
        "viewer": Role(playbooks=(), hosts="all", exec=False, shell=False, pty=False),
        "lab": Role(exec=True, local=True),
    }
    assert cfg.allowed_senders == ("ops@example.test", "admin@example.test")
    assert cfg.admin_contacts == ("boss@example.test",)

    limits = cfg.limits
    assert (limits.rate_limit, limits.rate_limit_window, limits.max_jobs) == (10, 30, 4)
    assert (limits.max_jobs_per_host, limits.output_max_bytes) == (1, 2048)
    assert (cfg.keyserver.url, cfg.keyserver.timeout) == ("http://127.0.0.1:10080", 2.5)
    assert cfg.llm.enabled is True and cfg.llm.model == "small"
    assert cfg.llm.api_url == "https://llm.example.test/v1" and cfg.llm.api_key() == "llm-key"
    assert cfg.logging.level == "DEBUG"
    assert check_config(path, env(OPS_MAIL_PASSWORD="ops-pw", LLM_KEY="llm-key")) == []


def test_minimal_file_gets_the_documented_defaults(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", MINIMAL), ENV)

    assert cfg.state_dir == Path("/home/tester/.local/state/carrier")
    assert cfg.gnupg_home == Path("/home/tester/.local/state/carrier/gnupg")
    assert cfg.playbook_dirs == ()
    account = cfg.default_account
    assert account.username == "carrier@example.test"  # default: the address
    assert (account.imap.tls, account.imap.port) == ("implicit", 993)
    assert (account.smtp.tls, account.smtp.port, account.smtp.auth) == ("starttls", 587, True)
    assert account.imap.ca_file is None and account.imap.allow_self_signed is False
    assert account.folders == Folders()
    assert (account.folders.inbox, account.folders.junk) == ("INBOX", "Junk")
    assert account.idle is True and account.check_interval == 60
    assert (cfg.mcp.bind_host, cfg.mcp.port, cfg.mcp.ip_allow, cfg.mcp.ip_deny) == (
        "127.0.0.1",
        18443,
        (),
        (),
    )
    assert cfg.mcp.tls_cert is None and cfg.mcp.tls_key is None
    assert cfg.admins == () and cfg.users == () and cfg.allowed_senders == () and cfg.admin_contacts == ()
    assert cfg.roles["operator"] == Role(playbooks=("*",), hosts="all", exec=True, shell=False, pty=True)
    assert cfg.roles["viewer"] == Role()
    limits = cfg.limits
    assert (limits.rate_limit, limits.rate_limit_window, limits.max_jobs) == (60, 60, 8)
    assert (limits.max_jobs_per_host, limits.output_max_bytes) == (2, 1048576)
    assert (cfg.keyserver.url, cfg.keyserver.timeout) == ("https://keys.openpgp.org", 10.0)
    assert cfg.llm.enabled is False and cfg.llm.api_key() is None
    assert cfg.logging.level == "INFO"


def test_account_display_name_defaults_to_carrier_and_can_be_set(site: Path) -> None:
    assert load_config(write(site / "carrier.yml", MINIMAL), ENV).default_account.display_name == "Carrier"
    named = "address: carrier@example.test\n    display_name: Ops Bot"
    text = edit(MINIMAL, "address: carrier@example.test", named)
    assert load_config(write(site / "carrier.yml", text), ENV).default_account.display_name == "Ops Bot"


def test_account_imap_id_save_sent_and_read_only(site: Path) -> None:
    from carrier import __version__

    account = load_config(write(site / "carrier.yml", MINIMAL), ENV).default_account
    assert dict(account.imap_id or {}) == {"name": "Carrier", "version": __version__, "vendor": "Carrier"}
    assert account.save_sent and not account.read_only
    extra = "address: carrier@example.test\n    imap_id: {name: Foxmail, version: 7.2}\n" \
            "    save_sent: false\n    read_only: true"
    text = edit(MINIMAL, "address: carrier@example.test", extra)
    account = load_config(write(site / "carrier.yml", text), ENV).default_account
    assert dict(account.imap_id or {}) == {"name": "Foxmail", "version": "7.2"}
    assert not account.save_sent and account.read_only
    off = edit(MINIMAL, "address: carrier@example.test", "address: carrier@example.test\n    imap_id: false")
    assert load_config(write(site / "carrier.yml", off), ENV).default_account.imap_id is None
    for value, words in (("{os: {x: 1}}", "ID field os must be text"), ("[a]", "expected false, true"),
                         ("{nick: x}", "unknown ID field 'nick'")):
        line = f"address: carrier@example.test\n    imap_id: {value}"
        bad = edit(MINIMAL, "address: carrier@example.test", line)
        with pytest.raises(ConfigError, match="imap_id") as info:
            load_config(write(site / "carrier.yml", bad), ENV)
        assert words in str(info.value)


def test_mail_download_dir_defaults_under_the_state_dir(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", "state_dir: /var/lib/carrier\n" + MINIMAL), ENV)
    assert cfg.mail.download_dir == Path("/var/lib/carrier/downloads")


def test_mail_download_dir_is_resolved_against_the_config_directory(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", MINIMAL + "mail: {download_dir: dl}\n"), ENV)
    assert cfg.mail.download_dir == site / "dl"
    assert not (site / "dl").exists()  # created on first use by the mail tools, not by loading


def test_mail_door_limits_default_and_can_be_set(site: Path) -> None:
    mail = load_config(write(site / "carrier.yml", MINIMAL), ENV).mail
    assert (mail.max_commands, mail.progress_interval, mail.body_limit) == (20, 300.0, 20000)
    assert mail.max_message_bytes == 10 * 1024 * 1024
    limits = "{max_commands: 5, progress_interval: 1.5, body_limit: 4000, max_message_bytes: 2048}"
    text = MINIMAL + f"mail: {limits}\n"
    mail = load_config(write(site / "carrier.yml", text), ENV).mail
    assert (mail.max_commands, mail.progress_interval, mail.body_limit, mail.max_message_bytes) == (
        5, 1.5, 4000, 2048,
    )


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        ("mail: {max_commands: 0}", "mail.max_commands", "1-1000"),
        ("mail: {progress_interval: 0}", "mail.progress_interval", "seconds"),
        ("mail: {body_limit: 10}", "mail.body_limit", ">= 1000"),
        ("mail: {max_message_bytes: lots}", "mail.max_message_bytes", "whole number"),
    ],
)
def test_wrong_mail_door_limits_name_the_key(site: Path, extra: str, where: str, message: str) -> None:
    problem = only_problem(write(site / "carrier.yml", MINIMAL + extra + "\n"))
    assert problem.startswith(where + " ") and message in problem, problem


def test_account_commands_can_be_turned_on_or_off_explicitly(site: Path) -> None:
    text = edit(FULL, "    check_interval: 30\n", "    check_interval: 30\n    commands: false\n")
    ops = "    password_env: OPS_MAIL_PASSWORD\n"
    text = edit(text, ops, ops + "    commands: yes\n")
    write(site / "ca.pem", "cert\n", 0o644)
    cfg = load_config(write(site / "carrier.yml", text), env(OPS_MAIL_PASSWORD="pw", LLM_KEY="k"))
    assert [a.commands for a in cfg.accounts] == [False, True]
    bad = edit(MINIMAL, "address: carrier@example.test", "address: carrier@example.test\n    commands: maybe")
    problem = only_problem(write(site / "carrier.yml", bad))
    assert problem.startswith("accounts[0].commands ") and "true or false" in problem, problem


def test_mail_section_refuses_unknown_keys(site: Path) -> None:
    found = check_config(write(site / "carrier.yml", MINIMAL + "mail: {downloads: x}\n"), ENV)
    assert len(found) == 1 and "mail.downloads" in found[0] and "download_dir" in found[0], found


def test_gnupg_home_defaults_under_the_configured_state_dir(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", "state_dir: /var/lib/carrier\n" + MINIMAL), ENV)
    assert cfg.state_dir == Path("/var/lib/carrier")
    assert cfg.gnupg_home == Path("/var/lib/carrier/gnupg")


@pytest.mark.parametrize(
    ("imap_tls", "imap_port", "smtp_tls", "smtp_port"),
    [("implicit", 993, "implicit", 465), ("starttls", 143, "starttls", 587), ("none", 143, "none", 25)],
)
def test_ports_default_by_tls_mode(
    site: Path, imap_tls: str, imap_port: int, smtp_tls: str, smtp_port: int
) -> None:
    text = edit(MINIMAL, "{host: imap.example.test}", f"{{host: 127.0.0.1, tls: {imap_tls}}}")
    text = edit(text, "{host: smtp.example.test}", f"{{host: localhost, tls: {smtp_tls}}}")
    account = load_config(write(site / "carrier.yml", text), ENV).default_account
    assert (account.imap.tls, account.imap.port) == (imap_tls, imap_port)
    assert (account.smtp.tls, account.smtp.port) == (smtp_tls, smtp_port)


def test_relative_paths_resolve_against_the_config_directory(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = site / "etc"
    write(conf_dir / "inv.yml", "all: {}\n")
    write(conf_dir / "secrets" / "mail.pass", "pw\n")
    text = MINIMAL.replace("inventory: inventory", "inventory: inv.yml\nstate_dir: ../var\ngnupg_home: ~/gpg")
    text = text.replace("password_file: carrier.pass", "password_file: secrets/mail.pass")
    elsewhere = site / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(write(conf_dir / "carrier.yml", text), ENV)
    assert cfg.inventory == conf_dir / "inv.yml"
    assert cfg.state_dir == site / "var"
    assert cfg.gnupg_home == Path("/home/tester/gpg")  # ~ is the HOME of the env given
    assert cfg.default_account.password_file == conf_dir / "secrets" / "mail.pass"


def test_load_creates_no_directories(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", "state_dir: state\n" + MINIMAL), ENV)
    assert not cfg.state_dir.exists() and not cfg.gnupg_home.exists()
    assert sorted(p.name for p in site.iterdir()) == ["carrier.pass", "carrier.yml", "inventory", "playbooks"]


def test_yes_no_and_quoted_numbers_are_accepted(site: Path) -> None:
    text = edit(MINIMAL, "{host: imap.example.test}", '{host: imap.example.test, port: "1993"}')
    text += "    idle: no\n"
    account = load_config(write(site / "carrier.yml", text), ENV).default_account
    assert account.imap.port == 1993 and account.idle is False


# ---------------------------------------------------------------------------------------------
# The file itself: missing, mode, syntax, shape
# ---------------------------------------------------------------------------------------------


def test_missing_file_says_where_and_how_to_create_one(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "carrier.yml"
    problem = only_problem(path)
    assert str(path) in problem
    assert "`carrier sandbox up`" in problem and "--config" in problem and "CARRIER_CONFIG" in problem
    with pytest.raises(ConfigError) as caught:
        load_config(path, ENV)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(("mode", "word"), [(0o644, "readable"), (0o640, "readable"), (0o620, "writable")])
def test_loose_config_mode_is_refused_first_and_alone(site: Path, mode: int, word: str) -> None:
    path = write(site / "carrier.yml", "inventory: [unclosed\nnonsense: {", mode)
    assert problems_for(path) == [
        f"carrier.yml is {word} by group/others (mode {mode:04o}): run `chmod 600 {path}`"
    ]


def test_owner_only_modes_are_accepted(site: Path) -> None:
    assert problems_for(write(site / "carrier.yml", MINIMAL, 0o400)) == []
    assert problems_for(write(site / "carrier.yml", MINIMAL, 0o700)) == []


def test_environment_never_weakens_the_mode_rule(site: Path) -> None:
    path = write(site / "carrier.yml", MINIMAL, 0o644)
    full_env = env(IMAP_SERVER="h", SMTP_SERVER="h", EMAIL_USER="a@b.test", EMAIL_PASS="pw", MCP_PORT="1")
    problem = only_problem(path, full_env)
    assert "chmod 600" in problem


def test_yaml_syntax_error_names_the_line(site: Path) -> None:
    path = write(site / "carrier.yml", MINIMAL + "mcp:\n  port: [1\n  bind_host: x\n")
    problem = only_problem(path)
    assert problem.startswith("YAML syntax error at line ")
    line = int(problem.split("line ")[1].split(",")[0])
    assert line in (9, 10)


def test_duplicate_yaml_keys_are_a_syntax_problem(site: Path) -> None:
    problem = only_problem(write(site / "carrier.yml", MINIMAL + "inventory: other\n"))
    assert "duplicate key" in problem and "inventory" in problem and "line" in problem


def test_file_that_is_not_a_mapping(site: Path) -> None:
    assert "mapping" in only_problem(write(site / "carrier.yml", "- a\n- b\n"))


def test_empty_file_reports_what_is_required(site: Path) -> None:
    found = problems_for(write(site / "carrier.yml", ""))
    assert any(p.startswith("inventory: missing (required)") for p in found), found
    assert any("no mail account" in p and "IMAP_SERVER" in p for p in found), found


# ---------------------------------------------------------------------------------------------
# Keys and types
# ---------------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one(site: Path) -> None:
    text = MINIMAL.replace("inventory: inventory", "inventory: inventory\nplaybook_dir: [playbooks]")
    text = edit(text, "{host: imap.example.test}", "{host: imap.example.test, prot: 993}")
    found = problems_for(write(site / "carrier.yml", text))
    assert "playbook_dir (line 2): unknown key 'playbook_dir' (did you mean 'playbook_dirs'?)" in found
    assert any("accounts[0].imap.prot" in p and "did you mean 'port'?" in p for p in found), found
    assert len(found) == 2


def test_unknown_key_without_a_close_match_lists_the_known_ones(site: Path) -> None:
    problem = only_problem(write(site / "carrier.yml", MINIMAL + "mcp: {zzz: 1}\n"))
    assert "unknown key 'zzz'" in problem and "bind_host" in problem and "ip_deny" in problem


@pytest.mark.parametrize(
    ("old", "new", "where", "message"),
    [
        (
            "{host: imap.example.test}",
            "{host: imap.example.test, port: abc}",
            "accounts[0].imap.port",
            "'abc'",
        ),
        (
            "{host: imap.example.test}",
            "{host: imap.example.test, port: 70000}",
            "accounts[0].imap.port",
            "1-65535",
        ),
        (
            "{host: imap.example.test}",
            "{host: imap.example.test, port: 0}",
            "accounts[0].imap.port",
            "1-65535",
        ),
        (
            "{host: smtp.example.test}",
            "{host: smtp.example.test, tls: ssl}",
            "accounts[0].smtp.tls",
            "implicit",
        ),
        (
            "{host: smtp.example.test}",
            "{host: smtp.example.test, auth: sometimes}",
            "smtp.auth",
            "true or false",
        ),
        ("{host: imap.example.test}", "{host: 'imap example'}", "accounts[0].imap.host", "host name"),
        ("name: carrier", "name: Carrier Main", "accounts[0].name", "lower-case"),
        ("address: carrier@example.test", "address: carrier", "accounts[0].address", "email address"),
        ("password_file: carrier.pass", "password_env: 'bad name'", "password_env", "variable name"),
    ],
)
def test_wrong_account_values_name_the_key(site: Path, old: str, new: str, where: str, message: str) -> None:
    problem = only_problem(write(site / "carrier.yml", edit(MINIMAL, old, new)))
    assert where in problem and message in problem


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        ("mcp: {port: abc}", "mcp.port", "not a port number"),
        ("mcp: 5", "mcp", "expected a mapping"),
        ("limits: {max_jobs: 0}", "limits.max_jobs", ">= 1"),
        ("limits: {rate_limit: -3}", "limits.rate_limit", ">= 1"),
        ("keyserver: {url: ftp://keys.example}", "keyserver.url", "http"),
        ("keyserver: {timeout: never}", "keyserver.timeout", "seconds"),
        ("logging: {level: loud}", "logging.level", "DEBUG, INFO"),
        ("playbook_dirs: playbooks", "playbook_dirs", "expected a list"),
        ("allowed_senders: [ops@example.test, nobody]", "allowed_senders[1]", "email address"),
        ("roles: {ops: {exec: maybe}}", "roles.ops.exec", "true or false"),
        ("roles: [a, b]", "roles", "mapping"),
        ("llm: {enabled: perhaps}", "llm.enabled", "true or false"),
        ("mcp: {tls_cert: cert.pem}", "mcp", "tls_key"),
    ],
)
def test_wrong_values_elsewhere_name_the_key(site: Path, extra: str, where: str, message: str) -> None:
    problem = only_problem(write(site / "carrier.yml", MINIMAL + extra + "\n"))
    assert problem.startswith(where + " ") and message in problem, problem


def test_problems_carry_line_numbers(site: Path) -> None:
    text = edit(MINIMAL, "{host: imap.example.test}", "\n      host: imap.example.test\n      port: abc")
    problem = only_problem(write(site / "carrier.yml", text))
    assert problem.startswith("accounts[0].imap.port (line 8): 'abc' is not a port number")


@pytest.mark.parametrize(
    ("text", "where", "hint"),
    [
        (
            edit(MINIMAL, "password_file: carrier.pass", "password: hunter2"),
            "accounts[0].password",
            "password_file",
        ),
        (
            edit(MINIMAL, "{host: smtp.example.test}", "{host: smtp.example.test, password: x}"),
            "accounts[0].smtp.password",
            "password_env",
        ),
        (MINIMAL + "llm: {api_key: sk-123}\n", "llm.api_key", "use api_key_file or api_key_env"),
        (MINIMAL + "token: abc\n", "token", "environment variable"),
        (MINIMAL + "mcp: {secret: abc}\n", "mcp.secret", "mode 0600 file"),
    ],
)
def test_inline_secrets_are_refused_without_echoing_them(
    site: Path, text: str, where: str, hint: str
) -> None:
    found = problems_for(write(site / "carrier.yml", text))
    (problem,) = [p for p in found if p.startswith(where + " ")]
    assert "not allowed" in problem and hint in problem
    assert not any("hunter2" in p or "sk-123" in p for p in found)


def test_inline_password_message_is_the_documented_one(site: Path) -> None:
    text = edit(MINIMAL, "password_file: carrier.pass", "password_file: carrier.pass\n    password: x")
    assert only_problem(write(site / "carrier.yml", text)).endswith(
        "inline passwords are not allowed: use password_file or password_env"
    )


# ---------------------------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------------------------


def test_both_password_env_and_file_is_a_problem(site: Path) -> None:
    text = edit(MINIMAL, "password_file: carrier.pass", "password_file: carrier.pass\n    password_env: X")
    problem = only_problem(write(site / "carrier.yml", text), env(X="pw"))
    assert problem.startswith("accounts[0] ") and "both password_env and password_file" in problem


def test_no_password_at_all_is_a_problem(site: Path) -> None:
    path = write(site / "carrier.yml", edit(MINIMAL, "    password_file: carrier.pass\n", ""))
    problem = only_problem(path)
    assert "no password" in problem and "password_file" in problem and "EMAIL_PASS" in problem


def test_email_pass_supplies_the_default_accounts_password(site: Path) -> None:
    path = write(site / "carrier.yml", edit(MINIMAL, "    password_file: carrier.pass\n", ""))
    cfg = load_config(path, env(EMAIL_PASS="from-env"))
    assert cfg.default_account.password() == "from-env"
    assert cfg.secrets() == ["from-env"]
    assert "from-env" not in repr(cfg)


def test_email_pass_wins_over_the_file_and_is_not_checked_against_it(site: Path) -> None:
    path = write(
        site / "carrier.yml", edit(MINIMAL, "password_file: carrier.pass", "password_env: UNSET_VAR")
    )
    cfg = load_config(path, env(EMAIL_PASS="override"))
    assert cfg.default_account.password() == "override"


def test_password_env_naming_an_unset_variable(site: Path) -> None:
    path = write(site / "carrier.yml", edit(MINIMAL, "password_file: carrier.pass", "password_env: MAIL_PW"))
    problem = only_problem(path)
    assert problem.startswith("accounts[0].password_env (line 5): environment variable MAIL_PW is not set")
    assert load_config(path, env(MAIL_PW="pw")).default_account.password() == "pw"


def test_password_file_missing(site: Path) -> None:
    path = write(site / "carrier.yml", edit(MINIMAL, "carrier.pass", "missing.pass"))
    problem = only_problem(path)
    assert "accounts[0].password_file" in problem and str(site / "missing.pass") in problem
    assert "does not exist" in problem


def test_password_file_with_loose_mode_is_refused(site: Path) -> None:
    os.chmod(site / "carrier.pass", 0o644)
    problem = only_problem(write(site / "carrier.yml", MINIMAL))
    assert problem.endswith(
        f"carrier.pass is readable by group/others (mode 0644): run `chmod 600 {site / 'carrier.pass'}`"
    )


def test_password_file_empty(site: Path) -> None:
    write(site / "carrier.pass", "\n")
    assert "is empty" in only_problem(write(site / "carrier.yml", MINIMAL))


def test_password_file_trailing_newline_is_stripped_but_spaces_kept(site: Path) -> None:
    (site / "carrier.pass").write_text(" pass word \r\n")
    cfg = load_config(write(site / "carrier.yml", MINIMAL), ENV)
    assert cfg.default_account.password() == " pass word "


def test_password_raises_an_actionable_error_when_the_secret_goes_away(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", MINIMAL), ENV)
    os.chmod(site / "carrier.pass", 0o640)
    with pytest.raises(ConfigError, match=r"account carrier: carrier.pass is readable.*chmod 600"):
        cfg.default_account.password()
    (site / "carrier.pass").unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.default_account.password()
    assert cfg.secrets() == []


def test_secrets_lists_every_resolvable_secret_once(site: Path) -> None:
    text = FULL.replace("      ca_file: ca.pem\n", "")
    environ = env(OPS_MAIL_PASSWORD="ops-pw", LLM_KEY="llm-key")
    cfg = load_config(write(site / "carrier.yml", text), environ)
    assert cfg.secrets() == ["s3cret-mail", "ops-pw", "llm-key"]
    del environ["OPS_MAIL_PASSWORD"]  # the accounts read the env they were loaded with
    environ["LLM_KEY"] = ""
    assert cfg.secrets() == ["s3cret-mail"]


def test_secrets_include_the_in_memory_overrides(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", MINIMAL), env(EMAIL_PASS="mail-pw", LLM_API_KEY="llm-pw"))
    assert cfg.secrets() == ["mail-pw", "llm-pw"]
    assert cfg.llm.api_key() == "llm-pw"
    assert "mail-pw" not in repr(cfg) and "llm-pw" not in repr(cfg)


# ---------------------------------------------------------------------------------------------
# Checks that span fields or files
# ---------------------------------------------------------------------------------------------


def test_tls_none_for_a_remote_host_is_refused(site: Path) -> None:
    path = write(
        site / "carrier.yml",
        edit(MINIMAL, "{host: smtp.example.test}", "{host: smtp.example.test, tls: none}"),
    )
    problem = only_problem(path)
    assert problem.startswith("accounts[0].smtp.tls")
    assert "loopback" in problem and "smtp.example.test" in problem and "use implicit or starttls" in problem


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.11", "localhost", "::1"])
def test_tls_none_for_loopback_is_allowed(site: Path, host: str) -> None:
    text = edit(MINIMAL, "{host: imap.example.test}", f'{{host: "{host}", tls: none}}')
    assert load_config(write(site / "carrier.yml", text), ENV).default_account.imap.host == host


def test_inventory_missing(site: Path) -> None:
    problem = only_problem(
        write(site / "carrier.yml", edit(MINIMAL, "inventory: inventory", "inventory: nope"))
    )
    assert problem.startswith("inventory (line 1):") and str(site / "nope") in problem
    assert "Ansible inventory" in problem


def test_inventory_unreadable(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(dir="/var/tmp")) if os.geteuid() == 0 else tmp_path
    try:
        base.chmod(0o755)
        site = base / "site"
        write(site / "inventory" / "hosts.yml", "all: {}\n", 0o644)
        write(site / "carrier.pass", "s3cret-mail\n")
        write(site / "inv.yml", "all: {}\n", 0o000)
        config = write(site / "carrier.yml", edit(MINIMAL, "inventory: inventory", "inventory: inv.yml"))
        if os.geteuid() != 0:
            problems = check_config(config, ENV)
        else:
            for path in (site, *site.rglob("*")):
                os.chown(path, 65534, 65534)
            # Root reads any file: check with the effective ids of `nobody`, then switch back.
            os.setegid(65534)
            os.seteuid(65534)
            try:
                problems = check_config(config, ENV)
            finally:
                os.seteuid(0)
                os.setegid(0)
        assert len(problems) == 1, problems
        assert "cannot read" in problems[0] and "inv.yml" in problems[0]
    finally:
        if base != tmp_path:
            shutil.rmtree(base)


def test_playbook_dir_missing(site: Path) -> None:
    problem = only_problem(write(site / "carrier.yml", MINIMAL + "playbook_dirs: [playbooks, gone]\n"))
    assert (
        problem.startswith("playbook_dirs[1]")
        and str(site / "gone") in problem
        and "not a directory" in problem
    )


def test_ca_file_missing(site: Path) -> None:
    text = edit(MINIMAL, "{host: imap.example.test}", "{host: imap.example.test, ca_file: ca.pem}")
    problem = only_problem(write(site / "carrier.yml", text))
    assert problem.startswith("accounts[0].imap.ca_file") and str(site / "ca.pem") in problem


def test_duplicate_account_names(site: Path) -> None:
    second = ACCOUNT.replace("accounts:\n", "")
    problem = only_problem(write(site / "carrier.yml", MINIMAL + second))
    assert problem.startswith("accounts[1]") and "duplicate account name 'carrier'" in problem


def test_user_role_must_exist(site: Path) -> None:
    text = MINIMAL + f"users: [{{email: ops@example.test, fingerprint: {FPR_OPS}, role: operater}}]\n"
    problem = only_problem(write(site / "carrier.yml", text))
    assert problem.startswith("users[0]") and "role 'operater' is not defined" in problem
    assert "did you mean 'operator'?" in problem


def test_mcp_stdio_role(site: Path) -> None:
    assert load_config(write(site / "carrier.yml", MINIMAL), ENV).mcp.stdio_role is None
    chosen = load_config(write(site / "carrier.yml", MINIMAL + "mcp: {stdio_role: viewer}\n"), ENV)
    assert chosen.mcp.stdio_role == "viewer"
    problem = only_problem(write(site / "carrier.yml", MINIMAL + "mcp: {stdio_role: root}\n"))
    assert problem.startswith("mcp.stdio_role") and "role 'root' is not defined" in problem


@pytest.mark.parametrize(
    ("fingerprint", "message"),
    [("0123ABCD", "40 hex digits"), ("Z" * 40, "40 hex digits"), ("1234567890", "quotes")],
)
def test_bad_fingerprint(site: Path, fingerprint: str, message: str) -> None:
    text = MINIMAL + f"admins: [{{email: admin@example.test, fingerprint: {fingerprint}}}]\n"
    problem = only_problem(write(site / "carrier.yml", text))
    assert problem.startswith("admins[0].fingerprint") and message in problem


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.0/33", "not an IP network"),
        ("banana", "not an IP network"),
        ("10.1.2.3/8", "did you mean 10.0.0.0/8"),
    ],
)
def test_bad_cidr(site: Path, value: str, message: str) -> None:
    found = problems_for(
        write(site / "carrier.yml", MINIMAL + f"mcp: {{ip_allow: [{value}], ip_deny: [{value}]}}\n")
    )
    assert [p.split(" ")[0] for p in found] == ["mcp.ip_allow[0]", "mcp.ip_deny[0]"]
    assert all(message in p for p in found)


def test_llm_enabled_needs_url_model_and_a_readable_key(site: Path) -> None:
    found = problems_for(
        write(site / "carrier.yml", MINIMAL + "llm: {enabled: true, api_key_env: LLM_KEY}\n")
    )
    assert any("api_url is not set" in p and "LLM_API_URL" in p for p in found), found
    assert any("model is not set" in p for p in found), found
    assert any(p.startswith("llm.api_key_env") and "LLM_KEY is not set" in p for p in found), found


def test_llm_key_settings_are_not_checked_while_disabled(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", MINIMAL + "llm: {api_key_env: LLM_KEY}\n"), ENV)
    with pytest.raises(ConfigError, match="LLM_KEY is not set"):
        cfg.llm.api_key()


def test_llm_both_key_sources(site: Path) -> None:
    write(site / "llm.key", "k\n")
    problem = only_problem(
        write(site / "carrier.yml", MINIMAL + "llm: {api_key_env: K, api_key_file: llm.key}\n")
    )
    assert "both api_key_env and api_key_file" in problem


def test_check_config_lists_several_problems_at_once(site: Path) -> None:
    text = """\
    inventory: no-such-inventory
    playbook_dir: [playbooks]
    accounts:
      - name: carrier
        address: carrier@example.test
        password: hunter2
        imap: {host: imap.example.test, port: abc}
        smtp: {host: smtp.example.test, tls: none}
      - name: carrier
        address: second@example.test
        password_env: NOT_SET_ANYWHERE
        imap: {host: imap.example.test}
        smtp: {host: smtp.example.test}
    users: [{email: ops@example.test, fingerprint: 1234, role: ghost}]
    mcp: {ip_allow: [300.0.0.0/8]}
    """
    found = problems_for(write(site / "carrier.yml", text))
    expected = [
        "inventory (line 1)",
        "unknown key 'playbook_dir'",
        "inline passwords are not allowed",
        "accounts[0].imap.port",
        "accounts[0].smtp.tls",
        "NOT_SET_ANYWHERE",
        "users[0].fingerprint",
        "mcp.ip_allow[0]",
    ]
    for fragment in expected:
        assert any(fragment in p for p in found), (fragment, found)
    assert len(found) >= len(expected)
    with pytest.raises(ConfigError) as caught:
        load_config(site / "carrier.yml", ENV)
    error: Any = caught.value
    assert error.problems == found
    lines = str(error).splitlines()
    assert lines[0] == f"{site / 'carrier.yml'}: {len(found)} problems:"
    assert lines[1:] == [f"  - {p}" for p in found]


def test_check_config_is_empty_for_a_good_file(site: Path) -> None:
    assert check_config(write(site / "carrier.yml", MINIMAL), ENV) == []


# ---------------------------------------------------------------------------------------------
# Environment overrides
# ---------------------------------------------------------------------------------------------

Getter = Callable[[Config], Any]


def imap_of(cfg: Config) -> tuple[str, int]:
    return cfg.default_account.imap.host, cfg.default_account.imap.port


def smtp_of(cfg: Config) -> tuple[str, int]:
    return cfg.default_account.smtp.host, cfg.default_account.smtp.port


def login_of(cfg: Config) -> tuple[str, str]:
    return cfg.default_account.username, cfg.default_account.address


OVERRIDES: list[tuple[str, str, Getter, Any]] = [
    ("IMAP_SERVER", "mail.other.test", imap_of, ("mail.other.test", 993)),
    ("IMAP_SERVER", "mail.other.test:1993", imap_of, ("mail.other.test", 1993)),
    ("IMAP_SERVER", "[::1]:143", imap_of, ("::1", 143)),
    ("SMTP_SERVER", "out.other.test:2525", smtp_of, ("out.other.test", 2525)),
    ("EMAIL_USER", "login@other.test", login_of, ("login@other.test", "carrier@example.test")),
    ("EMAIL_PASS", "pw-from-env", lambda c: c.default_account.password(), "pw-from-env"),
    ("USE_IMAP_IDLE", "no", lambda c: c.default_account.idle, False),
    ("USE_IMAP_IDLE", "0", lambda c: c.default_account.idle, False),
    ("EMAIL_CHECK_INTERVAL", "15", lambda c: c.default_account.check_interval, 15),
    ("ADMIN_EMAIL", "a@x.test, b@x.test", lambda c: c.admin_contacts, ("a@x.test", "b@x.test")),
    ("ALLOWED_SENDERS", "ops@x.test,dev@x.test", lambda c: c.allowed_senders, ("ops@x.test", "dev@x.test")),
    ("MCP_PORT", "8443", lambda c: c.mcp.port, 8443),
    ("MCP_BIND_HOST", "192.0.2.1", lambda c: c.mcp.bind_host, "192.0.2.1"),
    ("IP_WHITELIST", "10.0.0.0/8, 192.168.1.7", lambda c: c.mcp.ip_allow,
     (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.7/32"))),
    ("IP_BLACKLIST", "::/0", lambda c: c.mcp.ip_deny, (ipaddress.ip_network("::/0"),)),
    ("RATE_LIMIT", "5", lambda c: c.limits.rate_limit, 5),
    ("RATE_LIMIT_WINDOW", "120", lambda c: c.limits.rate_limit_window, 120),
    ("LLM_ENABLED", "false", lambda c: c.llm.enabled, False),
    ("LLM_API_URL", "http://127.0.0.1:8000/v1", lambda c: c.llm.api_url, "http://127.0.0.1:8000/v1"),
    ("LLM_API_KEY", "sk-env", lambda c: c.llm.api_key(), "sk-env"),
    ("LLM_MODEL", "tiny", lambda c: c.llm.model, "tiny"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("var", "value", "get", "expected"), OVERRIDES, ids=[f"{o[0]}={o[1]}" for o in OVERRIDES]
)
def test_each_environment_variable_overrides_its_setting(
    site: Path, var: str, value: str, get: Getter, expected: Any
) -> None:
    text = (
        MINIMAL + "mcp: {port: 1}\nlimits: {rate_limit: 1}\nllm: {model: big}\nadmin_contacts: [z@x.test]\n"
    )
    cfg = load_config(write(site / "carrier.yml", text), env(**{var: value}))
    assert get(cfg) == expected


def test_llm_enabled_from_the_environment(site: Path) -> None:
    environ = env(LLM_ENABLED="yes", LLM_API_URL="https://llm.test/v1", LLM_MODEL="m", LLM_API_KEY="k")
    cfg = load_config(write(site / "carrier.yml", MINIMAL), environ)
    assert (cfg.llm.enabled, cfg.llm.api_url, cfg.llm.model, cfg.llm.api_key()) == (
        True,
        "https://llm.test/v1",
        "m",
        "k",
    )


def test_email_user_fills_a_missing_address(site: Path) -> None:
    path = write(site / "carrier.yml", edit(MINIMAL, "    address: carrier@example.test\n", ""))
    assert "EMAIL_USER" in only_problem(path)
    account = load_config(path, env(EMAIL_USER="me@example.test")).default_account
    assert (account.address, account.username) == ("me@example.test", "me@example.test")


def test_overrides_touch_only_the_first_account(site: Path) -> None:
    text = MINIMAL + ACCOUNT.replace("accounts:\n", "").replace("name: carrier", "name: second")
    cfg = load_config(write(site / "carrier.yml", text), env(IMAP_SERVER="other.test", EMAIL_PASS="pw"))
    assert cfg.accounts[0].imap.host == "other.test" and cfg.accounts[0].password() == "pw"
    assert cfg.accounts[1].imap.host == "imap.example.test" and cfg.accounts[1].password() == "s3cret-mail"


def test_account_made_from_the_environment_when_the_file_has_none(site: Path) -> None:
    path = write(site / "carrier.yml", "inventory: inventory\n")
    environ = env(
        IMAP_SERVER="imap.seed.test",
        SMTP_SERVER="smtp.seed.test",
        EMAIL_USER="bot@seed.test",
        EMAIL_PASS="pw",
    )
    cfg = load_config(path, environ)
    (account,) = cfg.accounts
    assert (account.name, account.address, account.username) == ("default", "bot@seed.test", "bot@seed.test")
    assert account.imap == ImapSettings(host="imap.seed.test", port=993, tls="implicit")
    assert account.smtp == SmtpSettings(host="smtp.seed.test", port=587, tls="starttls")
    assert account.password() == "pw" and cfg.secrets() == ["pw"]


def test_account_from_the_environment_without_email_pass(site: Path) -> None:
    path = write(site / "carrier.yml", "inventory: inventory\n")
    environ = env(IMAP_SERVER="imap.seed.test", SMTP_SERVER="smtp.seed.test", EMAIL_USER="bot@seed.test")
    problem = only_problem(path, environ)
    assert (
        problem.startswith("IMAP_SERVER/SMTP_SERVER/EMAIL_USER (sets accounts[0])")
        and "EMAIL_PASS" in problem
    )


def test_no_account_and_partial_environment_says_what_is_unset(site: Path) -> None:
    problem = only_problem(
        write(site / "carrier.yml", "inventory: inventory\n"), env(IMAP_SERVER="imap.test")
    )
    assert "no mail account" in problem and "unset: SMTP_SERVER, EMAIL_USER" in problem


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("MCP_PORT", "abc", "'abc' is not a port number"),
        ("USE_IMAP_IDLE", "maybe", "true or false"),
        ("EMAIL_CHECK_INTERVAL", "soon", "whole number"),
        ("RATE_LIMIT", "-1", "whole number"),
        ("RATE_LIMIT_WINDOW", "0", "whole number"),
        ("LLM_ENABLED", "perhaps", "true or false"),
        ("LLM_API_URL", "llm.test", "URL"),
        ("IMAP_SERVER", "imap.test:99999", "port number"),
        ("SMTP_SERVER", "smtp.test:xx", "port number"),
        ("IP_WHITELIST", "10.0.0.0/8,nope", "not an IP network"),
        ("IP_BLACKLIST", "1.2.3.4/40", "not an IP network"),
        ("ADMIN_EMAIL", "boss", "email address"),
        ("ALLOWED_SENDERS", "a@x.test,b", "email address"),
        ("MCP_BIND_HOST", "a b", "host name"),
    ],
)
def test_bad_environment_values_name_the_variable(site: Path, var: str, value: str, message: str) -> None:
    problem = only_problem(write(site / "carrier.yml", MINIMAL), env(**{var: value}))
    assert problem.startswith(f"{var} (sets ") and message in problem


def test_empty_environment_variables_count_as_unset(site: Path) -> None:
    blank = {var: "" for var in ("MCP_PORT", "IMAP_SERVER", "EMAIL_PASS", "IP_WHITELIST", "USE_IMAP_IDLE")}
    cfg = load_config(
        write(site / "carrier.yml", MINIMAL + "mcp: {ip_allow: [10.0.0.0/8]}\n"), env(**blank)
    )
    assert cfg.mcp.port == 18443 and cfg.mcp.ip_allow == (ipaddress.ip_network("10.0.0.0/8"),)
    assert cfg.default_account.imap.host == "imap.example.test"
    assert cfg.default_account.password() == "s3cret-mail"


def test_environment_host_is_still_checked_against_tls_none(site: Path) -> None:
    text = edit(MINIMAL, "{host: imap.example.test}", "{host: 127.0.0.1, tls: none}")
    problem = only_problem(write(site / "carrier.yml", text), env(IMAP_SERVER="imap.remote.test"))
    assert "loopback" in problem and "imap.remote.test" in problem


# ---------------------------------------------------------------------------------------------
# Where the file is
# ---------------------------------------------------------------------------------------------


def test_resolve_config_path_order(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert resolve_config_path(None, home) == tmp_path / ".config/carrier/carrier.yml"
    assert resolve_config_path(None, {**home, "CARRIER_CONFIG": "/etc/carrier.yml"}) == Path(
        "/etc/carrier.yml"
    )
    assert resolve_config_path("cli.yml", {**home, "CARRIER_CONFIG": "/etc/carrier.yml"}) == Path("cli.yml")
    assert resolve_config_path(Path("/x/c.yml"), home) == Path("/x/c.yml")
    assert resolve_config_path("~/c.yml", home) == tmp_path / "c.yml"
    assert (
        resolve_config_path(None, {**home, "CARRIER_CONFIG": ""}) == tmp_path / ".config/carrier/carrier.yml"
    )


def test_unknown_account_name(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", MINIMAL), ENV)
    with pytest.raises(ConfigError, match="no mail account named 'nope' \\(accounts: carrier\\)"):
        cfg.account("nope")


# ---------------------------------------------------------------------------------------------
# Trust settings (auth:, keyserver WKD, role modules and mail tools)
# ---------------------------------------------------------------------------------------------


def test_auth_and_wkd_defaults(site: Path) -> None:
    cfg = load_config(write(site / "carrier.yml", MINIMAL), ENV)
    auth = cfg.auth
    assert (auth.challenge_ttl, auth.signature_max_age, auth.clock_skew) == (86400, 900, 300)
    assert (auth.strict_commands, auth.default_role) == (False, "viewer")
    assert (auth.token_ttl, auth.token_max_ttl) == (2592000, 31536000)
    assert (cfg.keyserver.wkd, cfg.keyserver.wkd_url) == (True, None)
    assert cfg.roles["operator"].modules == () and cfg.roles["operator"].mail == ()


def test_auth_section_and_role_fields_are_typed(site: Path) -> None:
    text = MINIMAL + textwrap.dedent("""\
        auth: {challenge_ttl: 600, signature_max_age: "120", clock_skew: 0, strict_commands: yes,
               default_role: ops, token_ttl: 60, token_max_ttl: 3600}
        keyserver: {wkd: false, wkd_url: "http://127.0.0.1:8080"}
        roles:
          ops: {modules: [ping, "service*"], mail: ["mail_inbox_*"], exec: true}
        """)
    cfg = load_config(write(site / "carrier.yml", text), ENV)
    assert (cfg.auth.challenge_ttl, cfg.auth.signature_max_age, cfg.auth.clock_skew) == (600, 120, 0)
    assert cfg.auth.strict_commands is True and cfg.auth.default_role == "ops"
    assert (cfg.auth.token_ttl, cfg.auth.token_max_ttl) == (60, 3600)
    assert (cfg.keyserver.wkd, cfg.keyserver.wkd_url) == (False, "http://127.0.0.1:8080")
    assert cfg.roles["ops"] == Role(exec=True, modules=("ping", "service*"), mail=("mail_inbox_*",))


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        ("auth: {challenge_ttl: 0}", "auth.challenge_ttl", "whole number"),
        ("auth: {clock_skew: -1}", "auth.clock_skew", "whole number"),
        ("auth: {token_ttl: 7200, token_max_ttl: 3600}", "auth.token_ttl", "longer than token_max_ttl"),
        ("auth: {nonce_ttl: 5}", "auth", "unknown key 'nonce_ttl'"),
        ("keyserver: {wkd_url: ftp://wkd.example}", "keyserver.wkd_url", "http"),
        ("roles: {ops: {modules: ping}}", "roles.ops.modules", "list"),
    ],
)
def test_wrong_trust_values_name_the_key(site: Path, extra: str, where: str, message: str) -> None:
    problem = only_problem(write(site / "carrier.yml", MINIMAL + extra + "\n"))
    assert problem.startswith(where) and message in problem, problem
