"""Named secrets: config problems (inline values, loose files, unknown names), reading from a file,
the environment and an Ansible Vault file, and the policy on which role may use which secret."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from ansible.parsing.vault import VaultLib, VaultSecret

from carrier.auth.policy import Identity, Policy, Request, auto_sudo_secret, become_secret
from carrier.config import Config, load_config
from carrier.errors import ConfigError
from carrier.secretstore import SecretError, lookup

VALUE = "sudo-Pw-7f3a9c"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    write(tmp_path / "inventory" / "hosts.yml", "all: {hosts: {web1: {}}}\n", 0o644)
    write(tmp_path / "carrier.pass", "mail-pass\n")
    write(tmp_path / "web_sudo.pass", VALUE + "\n")
    return tmp_path


def config_text(secrets: str, roles: str = "") -> str:
    return textwrap.dedent("""\
        inventory: inventory
        accounts:
          - name: carrier
            address: carrier@example.test
            password_file: carrier.pass
            imap: {host: imap.example.test}
            smtp: {host: smtp.example.test}
        """) + secrets + roles


def load(site: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = write(site / "carrier.yml", text)
    return load_config(path, env={"HOME": str(site), **(env or {})})


ROLES = """\
roles:
  web:
    pty: true
    become_secret: web_sudo
    secrets: [db_pass]
    auto_sudo: true
  viewer: {}
"""


def test_secrets_from_a_file_and_the_environment(site: Path) -> None:
    text = config_text("secrets:\n  web_sudo: {file: web_sudo.pass}\n  db_pass: {env: DB_PASS}\n", ROLES)
    config = load(site, text, {"DB_PASS": "db-value-1"})
    assert lookup(config, "web_sudo") == VALUE
    assert lookup(config, "db_pass") == "db-value-1"
    assert config.roles["web"].become_secret == "web_sudo"
    assert VALUE in config.secrets() and "db-value-1" in config.secrets()  # redacted from logs
    assert VALUE not in repr(config)


def test_a_secret_from_an_ansible_vault_file(site: Path) -> None:
    write(site / "vault.pass", "vault-password\n")
    data = VaultLib([("default", VaultSecret(b"vault-password"))]).encrypt(VALUE + "\n")
    (site / "web_sudo.vault").write_bytes(data)
    text = config_text("secrets:\n"
                       "  web_sudo: {vault_file: web_sudo.vault, vault_password_file: vault.pass}\n")
    config = load(site, text)
    assert lookup(config, "web_sudo") == VALUE
    write(site / "vault.pass", "wrong\n")  # changed after load
    with pytest.raises(SecretError, match="wrong vault password"):
        lookup(config, "web_sudo")
    write(site / "web_sudo.vault", "plain text\n")
    with pytest.raises(SecretError, match="not an Ansible Vault file"):
        lookup(config, "web_sudo")


def test_a_loose_secret_file_is_refused_with_the_fix(site: Path) -> None:
    text = config_text("secrets:\n  web_sudo: {file: web_sudo.pass}\n")
    config = load(site, text)
    os.chmod(site / "web_sudo.pass", 0o644)
    with pytest.raises(SecretError, match=r"secret 'web_sudo': .*chmod 600") as info:
        lookup(config, "web_sudo")  # loosened after start: refused when used
    assert VALUE not in str(info.value)
    with pytest.raises(ConfigError, match=r"secrets\.web_sudo\.file .*chmod 600"):
        load(site, text)  # and at load time (carrier check)


def test_a_secret_file_owned_by_someone_else_is_refused(site: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (to chown the file to another user)")
    text = config_text("secrets:\n  web_sudo: {file: web_sudo.pass}\n")
    config = load(site, text)
    os.chown(site / "web_sudo.pass", 65534, 65534)
    with pytest.raises(SecretError, match="owned by uid 65534"):
        lookup(config, "web_sudo")
    with pytest.raises(ConfigError, match=r"owned by uid 65534.*chown"):
        load(site, text)


@pytest.mark.parametrize("entry, message", [
    ("web_sudo: {value: hunter2}", "secrets are not allowed in carrier.yml"),
    ("web_sudo: {password: hunter2}", "secrets are not allowed in carrier.yml"),
    ("web_sudo: {}", "give exactly one of file, env or vault_file"),
    ("web_sudo: {file: a, env: B}", "give exactly one of file, env or vault_file"),
    ("web_sudo: {vault_file: v.vault}", "vault_file and vault_password_file go together"),
    ("web_sudo: hunter2", "secrets are not allowed in carrier.yml"),
    ("'bad name': {env: X}", "a secret name is a letter"),
])
def test_bad_secret_entries_are_clear_errors(site: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(site, config_text(f"secrets:\n  {entry}\n"))
    assert "hunter2" not in str(info.value)


def test_a_role_naming_an_unknown_secret_is_an_error(site: Path) -> None:
    text = config_text("secrets:\n  web_sudo: {file: web_sudo.pass}\n",
                       "roles:\n  web: {become_secret: web_sudoo, secrets: [nope]}\n")
    with pytest.raises(ConfigError) as info:
        load(site, text)
    assert "secret 'web_sudoo' is not defined under secrets: did you mean 'web_sudo'?" in str(info.value)
    assert "secret 'nope' is not defined" in str(info.value)


def test_auto_sudo_needs_a_become_secret(site: Path) -> None:
    with pytest.raises(ConfigError, match="auto_sudo needs become_secret"):
        load(site, config_text("", "roles:\n  web: {pty: true, auto_sudo: true}\n"))


def test_lookup_of_an_unknown_secret_names_the_known_ones(site: Path) -> None:
    config = load(site, config_text("secrets:\n  web_sudo: {file: web_sudo.pass}\n"))
    with pytest.raises(ConfigError, match=r"no secret named 'other' .*secrets: web_sudo"):
        lookup(config, "other")


def test_an_unset_environment_secret_says_so(site: Path) -> None:
    config = load(site, config_text("secrets:\n  db_pass: {env: DB_PASS}\n"))
    with pytest.raises(SecretError, match="secret 'db_pass': environment variable DB_PASS is not set"):
        lookup(config, "db_pass")


def test_policy_lets_a_role_type_only_its_own_secrets(site: Path) -> None:
    text = config_text("secrets:\n  web_sudo: {file: web_sudo.pass}\n  db_pass: {env: DB_PASS}\n"
                       "  other: {env: OTHER}\n", ROLES)
    config = load(site, text)
    policy = Policy.from_config(config)
    web = Identity("ops@example.test", "web", "mcp")
    for name in ("web_sudo", "db_pass"):
        assert policy.decide(web, Request("pty_input", job_owner=web.name, secret=name))
    refused = policy.decide(web, Request("pty_input", job_owner=web.name, secret="other"))
    assert not refused and "may not use secret 'other'" in refused.reason
    assert "db_pass, web_sudo" in refused.reason
    viewer = Identity("v@example.test", "viewer", "mcp")
    assert not policy.decide(viewer, Request("pty_input", job_owner=viewer.name, secret="web_sudo"))
    assert become_secret(config.roles["web"]) == "web_sudo"
    assert auto_sudo_secret(config.roles["web"]) == "web_sudo"
    assert become_secret(config.roles["viewer"]) is None
    assert auto_sudo_secret(config.roles["viewer"]) is None


def test_mail_grammar_job_input_secret() -> None:
    from carrier.mail.commands import CommandError, parse_commands

    job = "j-abcdefghijkm"
    [command] = parse_commands(f"job input {job} secret web_sudo\n").commands
    assert command.verb == "job input" and command.secret == "web_sudo" and command.text is None
    [typed] = parse_commands(f"job input {job} text secret web_sudo\n").commands
    assert typed.secret is None and typed.text == "secret web_sudo"  # the words, typed as text
    [error] = parse_commands(f"job input {job} secret ../etc\n").errors
    assert isinstance(error, CommandError) and "is not a secret name" in error.message
