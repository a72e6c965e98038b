"""The keyed audit chain's parts: hash functions, the key file, the switch marker, the keyed head,
checkpoints. The store is real SQLite; the attacker edits it with sqlite3."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from carrier.auth.audit import (
    Audit,
    AuditKey,
    AuditKeyError,
    Checkpoint,
    checkpoint_problems,
    keyed_row_hash,
    load_audit_key,
    row_hash,
)
from carrier.auth.errors import AuthError
from carrier.store import DB_NAME, Store
from carrier.store.auth import ChainedAuditRow, read_audit_state

KEY = AuditKey(b"k" * 32)
OTHER = AuditKey(b"o" * 32)
ROW = ChainedAuditRow(7, 1_800_000_000.5, "ops@example.test", "mail", "decide:exec", "web1", "allowed",
                      '{"command":"uptime"}', "a" * 64, None, "hmac-sha256")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    s = Store.open(state_dir)
    yield s
    s.close()


def sql(state_dir: Path, statement: str, *args: object) -> None:
    conn = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
    try:
        conn.execute(statement, args)
    finally:
        conn.close()


def fill(audit: Audit, n: int = 4) -> None:
    for i in range(n):
        audit.record(f"u{i}@example.test", "cli", "token:issue", target=f"t-{i}", detail={"i": i})


# --------------------------------------------------------------------------- hash functions


def _canonical(version: int, prev: str, row: ChainedAuditRow) -> bytes:
    return json.dumps({"v": version, "prev": prev, "id": row.id, "ts": row.ts, "actor": row.actor,
                       "door": row.door, "action": row.action, "target": row.target, "outcome": row.outcome,
                       "detail": row.detail_json}, sort_keys=True, separators=(",", ":")).encode()


def test_keyed_row_hash_is_hmac_sha256_over_prev_and_content() -> None:
    expected = hmac.new(b"k" * 32, _canonical(2, "a" * 64, ROW), hashlib.sha256).hexdigest()
    assert keyed_row_hash(b"k" * 32, "a" * 64, ROW) == expected == KEY.row_hash("a" * 64, ROW)


def test_unkeyed_row_hash_is_unchanged_sha256() -> None:
    assert row_hash("a" * 64, ROW) == hashlib.sha256(_canonical(1, "a" * 64, ROW)).hexdigest()


def test_keyed_hash_depends_on_key_prev_and_every_field() -> None:
    base = KEY.row_hash("a" * 64, ROW)
    assert OTHER.row_hash("a" * 64, ROW) != base
    assert KEY.row_hash("b" * 64, ROW) != base
    assert KEY.row_hash("a" * 64, ROW) != row_hash("a" * 64, ROW)
    for name, value in (("id", 8), ("ts", 1.0), ("actor", "x"), ("door", "cli"), ("action", "y"),
                        ("target", "z"), ("outcome", "denied"), ("detail_json", "{}")):
        assert KEY.row_hash("a" * 64, dataclasses.replace(ROW, **{name: value})) != base, name


def test_key_macs_are_distinct_and_the_secret_is_not_in_repr() -> None:
    values = {KEY.id, KEY.marker_mac(1), KEY.marker_mac(2), KEY.head_mac(1, "a" * 64, 1),
              KEY.head_mac(1, "a" * 64, 2)}
    assert len(values) == 5 and KEY.id != OTHER.id
    assert "kkkk" not in repr(KEY)
    with pytest.raises(ValueError):
        AuditKey(b"short")


# --------------------------------------------------------------------------- the key file


def test_key_file_is_made_0600_and_read_back(tmp_path: Path, store: Store, state_dir: Path) -> None:
    path = tmp_path / "conf" / "audit.key"
    key, made = load_audit_key(path, state_dir, store)
    assert made and path.stat().st_mode & 0o777 == 0o600
    again, made_again = load_audit_key(path, state_dir, store)
    assert not made_again and again.secret == key.secret and len(key.secret) == 32
    assert [p.name for p in path.parent.iterdir()] == ["audit.key"]  # no temp file left


def test_loose_key_file_is_refused(tmp_path: Path, store: Store, state_dir: Path) -> None:
    path = tmp_path / "audit.key"
    load_audit_key(path, state_dir, store)
    os.chmod(path, 0o640)
    with pytest.raises(AuditKeyError, match=rf"chmod 600 {path}"):
        load_audit_key(path, state_dir, store)


def test_key_inside_the_state_dir_is_refused(store: Store, state_dir: Path) -> None:
    with pytest.raises(AuditKeyError, match="inside the state directory"):
        load_audit_key(state_dir / "audit.key", state_dir, store)


def test_garbage_key_file_is_refused(tmp_path: Path, store: Store, state_dir: Path) -> None:
    path = tmp_path / "audit.key"
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(AuditKeyError, match="is not an audit key"):
        load_audit_key(path, state_dir, store)


def test_missing_key_of_a_keyed_chain_is_not_made_again(
    tmp_path: Path, store: Store, state_dir: Path
) -> None:
    path = tmp_path / "audit.key"
    key, _ = load_audit_key(path, state_dir, store)
    fill(Audit(store, key))
    path.unlink()
    with pytest.raises(AuditKeyError, match="restore the key from your backup"):
        load_audit_key(path, state_dir, store)
    assert not path.exists()


# --------------------------------------------------------------------------- marker and head


def test_new_chain_is_keyed_from_row_one(store: Store) -> None:
    audit = Audit(store, KEY)
    fill(audit)
    chain = read_audit_state(store)
    assert chain.keyed is not None and chain.keyed.from_id == 1 and chain.keyed.key_id == KEY.id
    assert {r.scheme for r in chain.rows} == {"hmac-sha256"}
    assert chain.head is not None and chain.head.head_mac == KEY.head_mac(4, chain.rows[-1].row_hash or "", 4)
    assert audit.verify().ok


def test_wrong_key_is_named(store: Store) -> None:
    fill(Audit(store, KEY))
    report = Audit(store, OTHER).verify()
    assert len(report.problems) == 1 and "is not the key this audit chain is keyed with" in report.problems[0]
    with pytest.raises(AuditKeyError):
        Audit(store, OTHER).record("x", "cli", "y")


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("UPDATE audit_keyed SET from_id = 3", "the keyed-chain marker was changed"),
        ("DELETE FROM audit_keyed", "the audit chain was never keyed with it"),
        ("UPDATE audit_head SET head_mac = NULL", "the audit head (row 4, 4 rows) was replaced"),
        ("DELETE FROM audit_head", "the audit head record is missing"),
    ],
)
def test_marker_and_head_tampering_is_found(
    store: Store, state_dir: Path, statement: str, expected: str
) -> None:
    fill(Audit(store, KEY))
    sql(state_dir, statement)
    problems = Audit(store, KEY).verify().problems
    assert any(expected in p for p in problems), problems


def test_cutting_the_newest_rows_needs_the_key(store: Store, state_dir: Path) -> None:
    audit = Audit(store, KEY)
    fill(audit)
    rows = read_audit_state(store).rows
    sql(state_dir, "DELETE FROM audit WHERE id = 4")
    sql(state_dir, "UPDATE audit_head SET last_id = 3, last_hash = ?, row_count = 3", rows[2].row_hash)
    problems = Audit(store, KEY).verify().problems
    assert problems == ["the audit head (row 3, 3 rows) was replaced: its keyed MAC does not match (the "
                        "newest rows may have been cut)"]


def _legacy_rows(store: Store, state_dir: Path, n: int) -> None:
    """Rows as the pre-key code wrote them: unkeyed sha256, scheme 'sha256', no marker."""
    prev = "0" * 64
    for i in range(n):
        row = ChainedAuditRow(i + 1, 1.0 + i, "old", "cli", "x", "", "ok", "{}", prev, None)
        digest = row_hash(prev, row)
        sql(state_dir, "INSERT INTO audit (id, ts, actor, door, action, target, outcome, detail, prev_hash, "
                       "row_hash) VALUES (?, ?, 'old', 'cli', 'x', '', 'ok', '{}', ?, ?)",
            i + 1, 1.0 + i, prev, digest)
        prev = digest
    sql(state_dir, "INSERT INTO audit_head (id, last_id, last_hash, row_count) VALUES (1, ?, ?, ?)",
        n, prev, n)


def test_legacy_rows_verify_and_a_downgrade_after_the_switch_is_found(store: Store, state_dir: Path) -> None:
    _legacy_rows(store, state_dir, 3)
    with pytest.raises(AuditKeyError, match="--adopt-key"):
        Audit(store, KEY).record("x", "cli", "y")  # an existing key never adopts old rows by itself
    audit = Audit(store, KEY, adopt=True)
    assert audit.verify().ok
    fill(audit, 2)
    chain = read_audit_state(store)
    assert chain.keyed is not None and chain.keyed.from_id == 4
    assert [r.scheme for r in chain.rows] == ["sha256"] * 3 + ["hmac-sha256"] * 2
    assert Audit(store, KEY).verify().ok
    # Row 5 rewritten as an unkeyed row (what someone without the key can compute):
    row5 = chain.rows[4]
    forged = dataclasses.replace(row5, outcome="denied")
    sql(state_dir, "UPDATE audit SET outcome = 'denied', scheme = 'sha256', row_hash = ? WHERE id = 5",
        row_hash(row5.prev_hash or "", forged))
    problems = Audit(store, KEY).verify().problems
    assert "row 5: it has an unkeyed hash but the chain is keyed from row 4 (rewritten by someone without " \
           "the audit key)" in problems, problems


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_text_round_trips() -> None:
    point = Checkpoint(12, 14, "c" * 64, 1_800_000_000.0)
    assert Checkpoint.parse(point.text()) == point
    assert point.text().splitlines()[0] == "Carrier audit checkpoint v1"


@pytest.mark.parametrize("text", [
    "hello\nrows: 1\n",
    "Carrier audit checkpoint v1\nrows: 1\nlast_id: 1\nlast_hash: zz\ntaken_at: 2027-01-01T00:00:00Z\n",
    "Carrier audit checkpoint v1\nrows: 1\nlast_id: 1\n",
    "Carrier audit checkpoint v1\nrows: 1\nrows: 2\nlast_id: 1\nlast_hash: " + "a" * 64 + "\ntaken_at: x\n",
])
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(AuthError):
        Checkpoint.parse(text)


def test_checkpoint_against_the_chain(store: Store, state_dir: Path) -> None:
    audit = Audit(store, KEY)
    fill(audit, 3)
    point = audit.head()
    fill(audit, 2)
    assert audit.verify(point).ok
    # Rewritten by a key holder: row 2 changed, every hash after it and the head recomputed.
    chain = read_audit_state(store)
    prev = chain.rows[0].row_hash or ""
    for row in chain.rows[1:]:
        changed = dataclasses.replace(row, detail_json='{"i":99}') if row.id == 2 else row
        digest = KEY.row_hash(prev, changed)
        sql(state_dir, "UPDATE audit SET detail = ?, prev_hash = ?, row_hash = ? WHERE id = ?",
            changed.detail_json, prev, digest, row.id)
        prev = digest
    sql(state_dir, "UPDATE audit_head SET last_hash = ?, head_mac = ?", prev, KEY.head_mac(5, prev, 5))
    assert Audit(store, KEY).verify().ok  # the key holder fooled the chain...
    problems = Audit(store, KEY).verify(point).problems  # ...not the checkpoint kept elsewhere
    assert len(problems) == 1 and problems[0].startswith("row 3: its hash is not the head in the checkpoint")


def test_checkpoint_finds_deleted_rows(store: Store) -> None:
    audit = Audit(store, KEY)
    fill(audit, 3)
    chain = read_audit_state(store)
    point = Checkpoint(4, 3, chain.rows[-1].row_hash or "", 0.0)
    assert any("counts 4 rows up to row 3, the table has 3" in p for p in checkpoint_problems(chain, point))
    gone = Checkpoint(9, 9, "a" * 64, 0.0)
    assert any("row 9, the head in the checkpoint" in p for p in checkpoint_problems(chain, gone))


def test_no_checkpoint_of_a_broken_chain(store: Store, state_dir: Path) -> None:
    audit = Audit(store, KEY)
    fill(audit, 2)
    sql(state_dir, "UPDATE audit SET outcome = 'denied' WHERE id = 1")
    with pytest.raises(AuthError, match="no checkpoint is taken of a broken chain"):
        audit.head()


def test_first_starts_at_once_make_one_key(tmp_path: Path, state_dir: Path) -> None:
    """Processes starting together all end up with the same key (the link into place is exclusive)."""
    import multiprocessing

    path = tmp_path / "audit.key"
    Store.open(state_dir).close()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(6) as pool:
        secrets = pool.starmap(_load_in_process, [(path, state_dir)] * 12)
    assert len(set(secrets)) == 1 and bytes.fromhex(path.read_text()) == secrets[0]
    assert [p.name for p in tmp_path.iterdir() if p.name != "state"] == ["audit.key"]
    with Store.open(state_dir) as store:
        report = Audit(store, AuditKey(secrets[0])).verify()
    assert report.ok and report.rows == 12, report.problems


def _load_in_process(path: Path, state_dir: Path) -> bytes:
    store = Store.open(state_dir)
    try:
        key, _ = load_audit_key(path, state_dir, store)
        Audit(store, key, adopt=True).record("p", "system", "start")
        return key.secret
    finally:
        store.close()
