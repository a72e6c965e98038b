"""The keyed audit chain and signed checkpoints, as an admin and an attacker meet them.

Carrier runs as a real process (`python -m carrier audit ...`) on its own store over the sandbox's
configuration; Carrier's OpenPGP key is a private copy of the sandbox's (real gpg). The attacker's
tools are independent of Carrier's code: sqlite3, hashlib and hmac over the documented row format,
so a change to what the hashes cover fails here as well.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from auth_support import copy_home
from mail_support import write_secret
from ruamel.yaml import YAML

from carrier.sandbox.manager import Sandbox, dump_yaml
from carrier.store import DB_NAME
from carrier.store.schema import MIGRATIONS


@dataclass
class Site:
    directory: Path  # holds carrier.yml and, by default, audit.key
    config: Path
    state: Path
    gnupg: Path

    @property
    def key_file(self) -> Path:
        return self.directory / "audit.key"

    @property
    def db(self) -> Path:
        return self.state / DB_NAME

    def carrier(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "carrier", *args, "--config", str(self.config)],
            input=stdin.decode() if stdin is not None else None, capture_output=True, text=True,
            env=dict(os.environ), timeout=120, check=False,
        )
        return done

    def issue_tokens(self, n: int) -> None:
        """Audit rows the ordinary way: each `token issue` decides and records."""
        for i in range(n):
            done = self.carrier("token", "issue", f"user{i}@tokens.test", "--role", "operator",
                                "--ttl", "600")
            assert done.returncode == 0, done.stderr


@pytest.fixture
def site(sandbox: Sandbox) -> Iterator[Site]:
    directory = Path(tempfile.mkdtemp(prefix="caud-", dir="/var/tmp"))
    directory.chmod(0o700)
    state = directory / "state"
    state.mkdir(mode=0o700)
    gnupg = copy_home(sandbox.layout.gnupg_home("carrier"), directory, "gnupg")
    data = YAML(typ="safe").load(sandbox.layout.config_file.read_text())
    data.update(state_dir=str(state), gnupg_home=str(gnupg))
    data.pop("auth", None)  # the default key location: audit.key beside this carrier.yml
    config = write_secret(directory / "carrier.yml", dump_yaml(data))
    try:
        yield Site(directory, config, state, gnupg)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "all"], capture_output=True,
                       check=False, timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- the attacker's tools


def _content(version: int, prev: str, row: sqlite3.Row) -> bytes:
    content = {"v": version, "prev": prev, "id": row["id"], "ts": row["ts"], "actor": row["actor"],
               "door": row["door"], "action": row["action"], "target": row["target"],
               "outcome": row["outcome"], "detail": row["detail"]}
    return json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def rewrite(db: Path, row_id: int, detail: str, *, key: bytes | None = None, downgrade: bool = False) -> None:
    """Change one row's detail and recompute every hash after it, and the head: with plain sha256
    as the pre-key code did, or with the real HMAC key (an attacker who stole it)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    columns = {r[1] for r in conn.execute("PRAGMA table_info(audit)")}
    with conn:
        conn.execute("UPDATE audit SET detail = ? WHERE id = ?", (detail, row_id))
        prev = "0" * 64
        rows = conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
        for row in rows:
            if key is not None:
                digest = hmac.new(key, _content(2, prev, row), hashlib.sha256).hexdigest()
            else:
                digest = hashlib.sha256(_content(1, prev, row)).hexdigest()
            conn.execute("UPDATE audit SET prev_hash = ?, row_hash = ? WHERE id = ?",
                         (prev, digest, row["id"]))
            if downgrade and "scheme" in columns:
                conn.execute("UPDATE audit SET scheme = 'sha256' WHERE id = ?", (row["id"],))
            prev = digest
        last = rows[-1]["id"]
        conn.execute("UPDATE audit_head SET last_id = ?, last_hash = ?, row_count = ?",
                     (last, prev, len(rows)))
        if key is not None:
            mac = hmac.new(key, f"carrier audit head {last} {prev} {len(rows)}".encode(), hashlib.sha256)
            conn.execute("UPDATE audit_head SET head_mac = ?", (mac.hexdigest(),))
    conn.close()


def token_row(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT MIN(id) FROM audit WHERE action = 'token:issue'").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- (a) a writer without the key


@pytest.mark.parametrize("downgrade", [False, True], ids=["plain-sha256", "sha256-and-scheme"])
def test_rewrite_recomputed_with_plain_sha256_is_found(site: Site, downgrade: bool) -> None:
    """Before the key, this rewrite verified as "ok" (the chain was plain sha256 over the rows)."""
    site.issue_tokens(3)
    assert site.carrier("audit", "--verify").returncode == 0
    target = token_row(site.db)
    rewrite(site.db, target, '{"forged":"yes"}', downgrade=downgrade)
    done = site.carrier("audit", "--verify")
    assert done.returncode == 1, done.stdout
    assert "audit chain BROKEN" in done.stderr
    expected = "unkeyed hash but the chain is keyed" if downgrade else "its content was changed"
    assert f"row {target}: " in done.stdout and expected in done.stdout, done.stdout


# --------------------------------------------------------------------------- (b), (c) the key file


def test_key_is_made_0600_at_first_start_outside_the_state(site: Site) -> None:
    assert not site.key_file.exists()
    site.issue_tokens(1)
    mode = site.key_file.stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
    assert re.fullmatch(r"[0-9a-f]{64}\n", site.key_file.read_text())
    key = site.key_file.read_text().strip()
    assert not any(key in p.read_bytes().decode("latin-1") for p in site.state.rglob("*") if p.is_file())
    done = site.carrier("audit", "--verify")
    assert done.returncode == 0 and done.stdout.startswith("audit chain ok: "), done.stdout
    assert site.key_file.read_text().strip() == key  # kept, not made again


def test_loose_key_file_is_refused_naming_the_fix(site: Site) -> None:
    site.issue_tokens(1)
    site.key_file.chmod(0o644)
    done = site.carrier("audit", "--verify")
    assert done.returncode == 1
    assert f"chmod 600 {site.key_file}" in done.stderr and "readable by group/others" in done.stderr
    assert site.key_file.read_text().strip() not in done.stderr + done.stdout
    refused = site.carrier("token", "issue", "late@tokens.test", "--role", "operator")
    assert refused.returncode == 1 and f"chmod 600 {site.key_file}" in refused.stderr


def test_lost_key_of_a_keyed_chain_is_not_made_again(site: Site) -> None:
    site.issue_tokens(1)
    site.key_file.unlink()
    done = site.carrier("audit", "--verify")
    assert done.returncode == 1
    assert f"the audit key {site.key_file} is missing" in done.stderr and "restore the key" in done.stderr
    assert not site.key_file.exists()


# --------------------------------------------------------------------------- (d) checkpoints


def test_checkpoint_finds_a_rewrite_by_someone_with_the_key(site: Site) -> None:
    site.issue_tokens(3)
    checkpoint = site.directory / "checkpoint.asc"
    taken = site.carrier("audit", "--checkpoint", str(checkpoint))
    assert taken.returncode == 0, taken.stderr
    text = checkpoint.read_text()
    assert text.startswith("-----BEGIN PGP SIGNED MESSAGE-----") and "Carrier audit checkpoint v1" in text
    fine = site.carrier("audit", "--verify", "--checkpoint", str(checkpoint))
    assert fine.returncode == 0 and "holds the checkpoint at row" in fine.stdout, fine.stdout + fine.stderr

    site.issue_tokens(1)  # rows after the checkpoint are fine
    assert site.carrier("audit", "--verify", "--checkpoint", str(checkpoint)).returncode == 0

    last_id = int(re.search(r"last_id: (\d+)", text).group(1))  # type: ignore[union-attr]
    rewrite(site.db, token_row(site.db), '{"forged":"yes"}', key=bytes.fromhex(site.key_file.read_text()))
    plain = site.carrier("audit", "--verify")
    assert plain.returncode == 0, plain.stdout  # with the key the chain itself is consistent again
    done = site.carrier("audit", "--verify", "--checkpoint", str(checkpoint))
    assert done.returncode == 1
    assert f"row {last_id}: its hash is not the head in the checkpoint" in done.stdout, done.stdout


def test_checkpoint_to_stdout_and_back(site: Site) -> None:
    site.issue_tokens(1)
    taken = site.carrier("audit", "--checkpoint", "-")
    assert taken.returncode == 0 and "BEGIN PGP SIGNATURE" in taken.stdout
    done = site.carrier("audit", "--verify", "--checkpoint", "-", stdin=taken.stdout.encode())
    assert done.returncode == 0, done.stdout + done.stderr


def _flip_signature(text: str) -> str:
    head, sig = text.split("-----BEGIN PGP SIGNATURE-----")
    lines = sig.split("\n")
    body = max(range(len(lines)), key=lambda i: len(lines[i]))  # the longest base64 line
    line = lines[body]
    lines[body] = line[:10] + ("A" if line[10] != "A" else "B") + line[11:]
    return head + "-----BEGIN PGP SIGNATURE-----" + "\n".join(lines)


def test_checkpoint_with_a_tampered_signature_or_text_fails(site: Site) -> None:
    site.issue_tokens(2)
    checkpoint = site.directory / "checkpoint.asc"
    assert site.carrier("audit", "--checkpoint", str(checkpoint)).returncode == 0
    text = checkpoint.read_text()
    forged = site.directory / "forged.asc"
    forged.write_text(_flip_signature(text))
    done = site.carrier("audit", "--verify", "--checkpoint", str(forged))
    assert done.returncode == 1 and "audit chain ok" not in done.stdout
    assert "signature" in done.stderr.lower(), done.stderr
    # A checkpoint edited to match a rewritten chain no longer carries Carrier's signature.
    forged.write_text(re.sub(r"rows: \d+", "rows: 999", text))
    done = site.carrier("audit", "--verify", "--checkpoint", str(forged))
    assert done.returncode == 1 and "bad signature" in done.stderr, done.stderr


def test_no_checkpoint_of_a_broken_chain(site: Site) -> None:
    site.issue_tokens(1)
    rewrite(site.db, token_row(site.db), '{"forged":"yes"}')
    done = site.carrier("audit", "--checkpoint", str(site.directory / "c.asc"))
    assert done.returncode == 1 and "no checkpoint is taken of a broken chain" in done.stderr
    assert not (site.directory / "c.asc").exists()


# --------------------------------------------------------------------------- (e) upgrade


def _legacy_store(state: Path, n: int) -> None:
    """A store as Carrier left it before the key (schema 5), with an unkeyed sha256 chain."""
    conn = sqlite3.connect(state / DB_NAME)
    conn.row_factory = sqlite3.Row
    with conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY NOT NULL, "
                     "applied_at REAL NOT NULL)")
        for migration in MIGRATIONS[:5]:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (migration.version,))
        prev = "0" * 64
        for i in range(n):
            cur = conn.execute(
                "INSERT INTO audit (ts, actor, door, action, target, outcome, detail, prev_hash) "
                "VALUES (?, 'old@example.test', 'cli', 'token:issue', ?, 'ok', '{}', ?)",
                (1_700_000_000.0 + i, f"t-{i}", prev),
            )
            row = conn.execute("SELECT * FROM audit WHERE id = ?", (cur.lastrowid,)).fetchone()
            prev = hashlib.sha256(_content(1, prev, row)).hexdigest()
            conn.execute("UPDATE audit SET row_hash = ? WHERE id = ?", (prev, cur.lastrowid))
        conn.execute("INSERT INTO audit_head (id, last_id, last_hash, row_count) VALUES (1, ?, ?, ?)",
                     (n, prev, n))
    conn.close()


def test_old_unkeyed_chain_still_verifies_after_the_upgrade(site: Site) -> None:
    _legacy_store(site.state, 4)
    done = site.carrier("audit", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("audit chain ok: 4 rows"), done.stdout
    site.issue_tokens(1)
    done = site.carrier("audit", "--verify")
    assert done.returncode == 0, done.stdout
    conn = sqlite3.connect(site.db)
    schemes = [r[0] for r in conn.execute("SELECT scheme FROM audit ORDER BY id")]
    conn.close()
    assert schemes[:4] == ["sha256"] * 4 and set(schemes[4:]) == {"hmac-sha256"}
    # An old row is still only as strong as sha256 (documented); a new one is keyed.
    rewrite(site.db, 2, '{"forged":"yes"}', key=None)
    done = site.carrier("audit", "--verify")
    assert done.returncode == 1 and "row 5: its content was changed" in done.stdout, done.stdout


def test_a_key_put_in_place_by_hand_is_adopted_only_on_request(site: Site) -> None:
    _legacy_store(site.state, 2)
    fd = os.open(site.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(os.urandom(32).hex() + "\n")
    done = site.carrier("audit", "--verify")
    assert done.returncode == 1 and "carrier audit --adopt-key" in done.stderr + done.stdout
    adopted = site.carrier("audit", "--adopt-key")
    assert adopted.returncode == 0 and "keyed from row 3" in adopted.stdout, adopted.stderr
    assert site.carrier("audit", "--verify").returncode == 0
