"""SQL for the trust layer (``carrier.auth``): the audit hash chain, rate-limit buckets, seen signatures.

Functions take the process's ``Store`` and run in ``store.transaction()`` (``BEGIN IMMEDIATE``; the audit
chain on PostgreSQL under its own advisory lock, so concurrent instances append to one chain), so
each read-modify-write is atomic across threads and processes. The tables come from schema
migrations 2 and 6. What a hash covers and what a bucket means is decided in ``carrier.auth``; this module
only keeps the rows consistent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from carrier.store import schema
from carrier.store.db import Connection, Store
from carrier.store.dialect import AUDIT_LOCK

#: ``prev_hash`` of the first chained audit row.
GENESIS_HASH = "0" * 64


@dataclass(frozen=True, slots=True)
class ChainedAuditRow:
    """An audit row with its chain columns (``None`` for a row written outside the chain)."""

    id: int
    ts: float
    actor: str
    door: str
    action: str
    target: str
    outcome: str
    detail_json: str  # as stored: the hash covers these exact characters
    prev_hash: str | None
    row_hash: str | None
    scheme: str = "sha256"  # how row_hash was made (schema.AUDIT_SCHEMES)

    @property
    def detail(self) -> dict[str, Any]:
        value = json.loads(self.detail_json)
        return value if isinstance(value, dict) else {"value": value}


@dataclass(frozen=True, slots=True)
class AuditHead:
    last_id: int
    last_hash: str
    row_count: int
    head_mac: str | None = None  # keyed MAC over the three fields above (None before the switch)


@dataclass(frozen=True, slots=True)
class AuditKeyed:
    """Where the chain switched to keyed hashes: rows with ``id >= from_id`` must be keyed."""

    from_id: int
    key_id: str
    mac: str


@dataclass(frozen=True, slots=True)
class AuditChain:
    """One consistent snapshot of the audit table, its head and its switch marker."""

    rows: list[ChainedAuditRow]
    head: AuditHead | None
    keyed: AuditKeyed | None


#: (prev_hash, row without hashes) -> row_hash
RowHasher = Callable[[str, ChainedAuditRow], str]
#: (last_id, last_hash, row_count) -> head_mac
HeadMac = Callable[[int, str, int], str]


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


def append_audit(
    store: Store,
    hasher: RowHasher,
    *,
    actor: str,
    door: str,
    action: str,
    target: str,
    outcome: str,
    detail: Mapping[str, Any],
    scheme: str = "sha256",
    head_mac: HeadMac | None = None,
) -> ChainedAuditRow:
    """Insert an audit row chained to the head, move the head; all in one write transaction.

    The head row is read and written inside the same ``BEGIN IMMEDIATE`` transaction, so writers
    in any number of threads and processes extend one chain.
    """
    if door not in schema.AUDIT_DOORS:
        raise ValueError(f"invalid door {door!r}: expected one of {', '.join(schema.AUDIT_DOORS)}")
    if scheme not in schema.AUDIT_SCHEMES:
        raise ValueError(f"invalid audit scheme {scheme!r}")
    for name, value in (("actor", actor), ("action", action), ("outcome", outcome)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    detail_json = _dumps(detail)
    with store.transaction(lock=AUDIT_LOCK) as conn:
        head = conn.execute("SELECT last_hash, row_count FROM audit_head WHERE id = 1").fetchone()
        prev_hash, count = (head[0], int(head[1])) if head is not None else (GENESIS_HASH, 0)
        ts = store.clock()
        cur = conn.execute(
            "INSERT INTO audit (ts, actor, door, action, target, outcome, detail, prev_hash, scheme) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ts, actor, door, action, target, outcome, detail_json, prev_hash, scheme),
        )
        row_id = int(cur.lastrowid or 0)
        unhashed = ChainedAuditRow(row_id, ts, actor, door, action, target, outcome, detail_json,
                                   prev_hash, None, scheme)
        row_hash = hasher(prev_hash, unhashed)
        mac = head_mac(row_id, row_hash, count + 1) if head_mac is not None else None
        conn.execute("UPDATE audit SET row_hash = ? WHERE id = ?", (row_hash, row_id))
        conn.execute(
            "INSERT INTO audit_head (id, last_id, last_hash, row_count, head_mac) VALUES (1, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET last_id = excluded.last_id, last_hash = excluded.last_hash, "
            "row_count = excluded.row_count, head_mac = excluded.head_mac",
            (row_id, row_hash, count + 1, mac),
        )
    return ChainedAuditRow(row_id, ts, actor, door, action, target, outcome, detail_json, prev_hash, row_hash,
                           scheme)


def _keyed(conn: Connection) -> AuditKeyed | None:
    row = conn.execute("SELECT from_id, key_id, mac FROM audit_keyed WHERE id = 1").fetchone()
    return AuditKeyed(int(row[0]), row[1], row[2]) if row is not None else None


def _last_issued_id(store: Store) -> str:
    """SQL for the highest audit id ever handed out (deleted rows included), or 0."""
    if store.dialect == "postgresql":
        return ("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM audit_id_seq")
    return "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'audit'"


def read_audit_keyed(store: Store) -> AuditKeyed | None:
    """The switch marker, or None while the chain has never been keyed."""
    with store.transaction(lock=AUDIT_LOCK) as conn:
        return _keyed(conn)


def bind_audit_key(
    store: Store, key_id: str, marker_mac: Callable[[int], str], head_mac: HeadMac, *,
    allow_existing_rows: bool,
) -> AuditKeyed | None:
    """The switch marker. When there is none it is made now, with a keyed MAC on the head (the
    current one, or an empty head), if the table is empty or ``allow_existing_rows``; else None."""
    with store.transaction(lock=AUDIT_LOCK) as conn:
        found = _keyed(conn)
        if found is not None:
            return found
        sql = f"SELECT COALESCE(MAX(id), 0), ({_last_issued_id(store)}) FROM audit"  # noqa: S608 (fixed)
        last = conn.execute(sql).fetchone()
        if int(last[0]) and not allow_existing_rows:
            return None
        from_id = max(int(last[0]), int(last[1])) + 1  # AUTOINCREMENT: the next row's id is above both
        marker = AuditKeyed(from_id, key_id, marker_mac(from_id))
        conn.execute("INSERT INTO audit_keyed (id, from_id, key_id, mac, made_at) VALUES (1, ?, ?, ?, ?)",
                     (marker.from_id, marker.key_id, marker.mac, store.clock()))
        head = conn.execute("SELECT last_id, last_hash, row_count FROM audit_head WHERE id = 1").fetchone()
        last_id, last_hash, count = (int(head[0]), head[1], int(head[2])) if head else (0, GENESIS_HASH, 0)
        # From now on the head always carries a MAC: cutting every keyed row needs the key as well.
        conn.execute(
            "INSERT INTO audit_head (id, last_id, last_hash, row_count, head_mac) VALUES (1, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET head_mac = excluded.head_mac",
            (last_id, last_hash, count, head_mac(last_id, last_hash, count)),
        )
        return marker


def read_audit_state(store: Store) -> AuditChain:
    """Every audit row (oldest first), the head and the switch marker, read in one transaction."""
    with store.transaction(lock=AUDIT_LOCK) as conn:
        rows = conn.execute(
            "SELECT id, ts, actor, door, action, target, outcome, detail, prev_hash, row_hash, scheme "
            "FROM audit ORDER BY id"
        ).fetchall()
        head = conn.execute(
            "SELECT last_id, last_hash, row_count, head_mac FROM audit_head WHERE id = 1"
        ).fetchone()
        keyed = _keyed(conn)
    chain = [
        ChainedAuditRow(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10])
        for r in rows
    ]
    return AuditChain(chain, AuditHead(int(head[0]), head[1], int(head[2]), head[3]) if head else None, keyed)


def read_audit_chain(store: Store) -> tuple[list[ChainedAuditRow], AuditHead | None]:
    """Every audit row (oldest first) and the head, read in one transaction (a consistent snapshot)."""
    state = read_audit_state(store)
    return state.rows, state.head


# --------------------------------------------------------------------------- rate limits


@dataclass(frozen=True, slots=True)
class BucketState:
    allowed: bool
    tokens: float  # left after this request
    retry_after: float  # seconds until one token is back (0 when allowed)


def take_from_bucket(
    store: Store, key: str, *, capacity: float, refill_per_second: float, cost: float = 1.0
) -> BucketState:
    """Token bucket ``key``: refill by elapsed time, then take ``cost`` if there is that much.

    A new key starts full. The state is in the database, so a restart keeps an attacker's budget.
    """
    if not key:
        raise ValueError("a rate-limit key must be non-empty")
    if capacity <= 0 or refill_per_second <= 0 or cost <= 0:
        raise ValueError("capacity, refill rate and cost must be positive")
    with store.transaction() as conn:
        now = store.clock()
        row = conn.execute("SELECT tokens, updated_at FROM rate_buckets WHERE key = ?", (key,)).fetchone()
        if row is None:
            tokens = capacity
        else:
            elapsed = max(0.0, now - float(row[1]))  # a clock step backwards refills nothing
            tokens = min(capacity, float(row[0]) + elapsed * refill_per_second)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        conn.execute(
            "INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
            (key, tokens, now),
        )
    retry = 0.0 if allowed else (cost - tokens) / refill_per_second
    return BucketState(allowed, tokens, retry)


def prune_buckets(store: Store, idle_before: float) -> int:
    """Forget buckets untouched since ``idle_before`` (they would be full again anyway)."""
    with store.transaction() as conn:
        return conn.execute("DELETE FROM rate_buckets WHERE updated_at < ?", (idle_before,)).rowcount


# --------------------------------------------------------------------------- seen signatures


def remember_signature(
    store: Store, digest: str, *, fingerprint: str, message_key: str, signed_at: float
) -> bool:
    """Record a signature digest; False when it was seen with another ``message_key`` (a replay).

    The same mail (same ``message_key``) may be checked again, e.g. when processing resumes after
    a crash; any other mail carrying that signature is a replay.
    """
    if len(digest) != 64:
        raise ValueError("a signature digest is a sha256 hex digest")
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO seen_signatures (digest, fingerprint, message_key, signed_at, seen_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
            (digest, fingerprint, message_key, signed_at, store.clock()),
        )
        row = conn.execute("SELECT message_key FROM seen_signatures WHERE digest = ?", (digest,)).fetchone()
    return bool(row is not None and row[0] == message_key)


def forget_signatures(store: Store, signed_before: float) -> int:
    """Drop digests of signatures older than ``signed_before`` (freshness rejects those anyway)."""
    with store.transaction() as conn:
        return conn.execute("DELETE FROM seen_signatures WHERE signed_at < ?", (signed_before,)).rowcount
