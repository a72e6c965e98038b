"""`carrier enroll|token|audit` (carrier.auth.cli) against a real store and configuration."""

from __future__ import annotations

import os
import re
import sqlite3
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from carrier.auth.cli import audit, enroll, token
from carrier.store import DB_NAME, Store

OPS = "89ABCDEF0123456789ABCDEF0123456789ABCDEF"
ADMIN = "0123456789ABCDEF0123456789ABCDEF01234567"
NEWBIE = "AAAABBBBCCCCDDDDEEEEFFFF0000111122223333"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv" / "hosts.yml").write_text("all: {hosts: {web1: {}}}\n")
    secret = tmp_path / "pass"
    secret.write_text("s3cret-mail\n")
    os.chmod(secret, 0o600)
    path = tmp_path / "carrier.yml"
    path.write_text(textwrap.dedent(f"""\
        state_dir: {tmp_path / 'state'}
        inventory: inv
        accounts:
          - {{name: carrier, address: carrier@example.test, password_file: pass,
             imap: {{host: 127.0.0.1}}, smtp: {{host: 127.0.0.1}}}}
        admins: [{{email: admin@example.test, fingerprint: "{ADMIN}"}}]
        users: [{{email: ops@example.test, fingerprint: "{OPS}", role: operator}}]
        """))
    os.chmod(path, 0o600)
    return path


def run(cmd: object, cfg: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cmd, [*args, "--config", str(cfg)])  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


def state(cfg: Path) -> Path:
    return cfg.parent / "state"


def test_token_issue_list_revoke(cfg: Path) -> None:
    code, out, err = run(token, cfg, "issue", "ops@example.test", "--scope", "tools:jobs", "--ttl", "600")
    assert code == 0, err
    secret = out.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)
    assert "role operator" in err and "only time the token is shown" in err
    token_id = re.search(r"id (t-[a-z2-7]{12})", err).group(1)  # type: ignore[union-attr]
    code, out, _ = run(token, cfg, "list")
    assert code == 0 and token_id in out and "live" in out and "tools:jobs" in out and secret not in out
    with sqlite3.connect(state(cfg) / DB_NAME) as conn:
        assert secret not in "\n".join(conn.iterdump())
    assert run(token, cfg, "revoke", token_id)[:2] == (0, f"revoked {token_id}\n")
    assert "revoked" in run(token, cfg, "list", "--owner", "ops@example.test")[1]
    code, out, _ = run(token, cfg, "revoke", token_id)
    assert code == 1 and "no live token" in out


def test_token_issue_problems(cfg: Path) -> None:
    code, _, err = run(token, cfg, "issue", "ci-bot")
    assert code == 1 and "ci-bot is not enrolled: name a role with --role" in err
    code, out, err = run(token, cfg, "issue", "ci-bot", "--role", "viewer")
    assert code == 0 and len(out.strip()) == 43
    code, _, err = run(token, cfg, "issue", "ops@example.test", "--scope", "root")
    assert code == 1 and "unknown scope(s) root" in err
    code, _, err = run(token, cfg, "revoke", "../etc/passwd")
    assert code == 1 and "invalid token id" in err


def test_enroll_list_approve_deny_revoke(cfg: Path) -> None:
    assert run(enroll, cfg, "list")[1] == "no enrollment requests\n"
    with Store.open(state(cfg)) as store:
        first = store.create_enrollment("newbie@example.test", fingerprint=NEWBIE, state="verified").id
        second = store.create_enrollment("dev@example.test", fingerprint="B" * 40, state="verified").id
    out = run(enroll, cfg, "list")[1]
    assert first in out and second in out and "verified" in out
    code, out, _ = run(enroll, cfg, "approve", first, "--role", "operator")
    assert code == 0 and f"Approved {first}: newbie@example.test is enrolled as operator" in out
    code, out, _ = run(enroll, cfg, "approve", first)
    assert code == 1 and "already approved" in out
    assert run(enroll, cfg, "deny", second)[0] == 0
    assert first not in run(enroll, cfg, "list")[1]
    assert "approved" in run(enroll, cfg, "list", "--all")[1]
    code, out, _ = run(enroll, cfg, "revoke", NEWBIE)
    assert code == 0 and "Revoked" in out
    code, _, err = run(enroll, cfg, "approve", "r-bad")
    assert code == 1 and "invalid enrollment request id" in err


def test_audit_lists_and_verifies(cfg: Path) -> None:
    run(token, cfg, "issue", "ops@example.test")
    run(token, cfg, "issue", "ops@example.test", "--role", "viewer")
    code, out, _ = run(audit, cfg)
    assert code == 0 and out.count("token:issue") == 2 and "local:" in out
    assert out.count("decide:admin") == 2  # each issue is an admin operation, decided and audited
    code, out, _ = run(audit, cfg, "--verify")
    assert (code, out) == (0, "audit chain ok: 4 rows\n")
    with sqlite3.connect(state(cfg) / DB_NAME) as conn:
        conn.execute("UPDATE audit SET outcome = 'nothing happened' WHERE id = 1")
    code, out, err = run(audit, cfg, "--verify")
    assert code == 1 and "row 1: its content was changed" in out and "BROKEN" in err
