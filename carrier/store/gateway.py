"""SQL for the email door (``carrier.mail.gateway`` and ``carrier.mail.outbox``), tables of migration 4.

- ``mail_leases``: which Carrier process works on a claimed mail. A lease expires, so a crashed
  process's mail is taken over; a live process renews it. Two processes never work on one mail.
- ``mail_steps``: what each command of a mail did (its reply section, the job it started),
  written in the same transaction as the job, so a resumed mail never runs a command twice.
- ``mail_jobs``: jobs started by mail that still owe a result mail (and progress mails).
- outbox claims: a short lease on an outbox row (its ``next_attempt_at`` moved forward with a
  compare-and-set, the holder in ``claimed_by``, migration 5) so two senders never send one message
  at once; a dead holder's claim is taken over at once (``take_over_outbox``).
- outbox order: ``outbox_heads`` and ``command_state_of_job`` give what ``carrier.mail.outbox``
  needs to send a thread's mails in order (a command's reply before its jobs' result mails).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from carrier.store.db import Store


def acquire_lease(store: Store, account: str, message_id: str, owner: str, ttl: float) -> bool:
    """Take (or renew) the lease on a mail; False while another owner holds a live one."""
    now = store.clock()
    with store.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO mail_leases (account, message_id, owner, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (account, message_id) DO UPDATE SET owner = excluded.owner, "
            "expires_at = excluded.expires_at WHERE mail_leases.owner = excluded.owner "
            "OR mail_leases.expires_at <= ?",
            (account, message_id, owner, now + ttl, now),
        )
    return cur.rowcount == 1


def renew_lease(store: Store, account: str, message_id: str, owner: str, ttl: float) -> bool:
    """Push the end of ``owner``'s lease on a mail ``ttl`` seconds ahead; False if the lease is
    no longer ``owner``'s. One row under its row lock (no store-wide lock: it runs beside the
    mail's own transactions)."""
    with store.transaction(lock=None) as conn:
        cur = conn.execute(
            "UPDATE mail_leases SET expires_at = ? WHERE account = ? AND message_id = ? AND owner = ?",
            (store.clock() + ttl, account, message_id, owner),
        )
    return cur.rowcount == 1


def lease_owner(store: Store, account: str, message_id: str) -> str | None:
    row = (
        store._conn()
        .execute("SELECT owner FROM mail_leases WHERE account = ? AND message_id = ?", (account, message_id))
        .fetchone()
    )
    return None if row is None else str(row["owner"])


def take_over_lease(store: Store, account: str, message_id: str, old: str, owner: str, ttl: float) -> bool:
    """Take a lease from ``old`` (a process known to be dead); compare-and-set on the owner."""
    with store.transaction() as conn:
        cur = conn.execute(
            "UPDATE mail_leases SET owner = ?, expires_at = ? WHERE account = ? AND message_id = ? "
            "AND owner = ?",
            (owner, store.clock() + ttl, account, message_id, old),
        )
    return cur.rowcount == 1


def release_lease(store: Store, account: str, message_id: str, owner: str) -> None:
    with store.transaction() as conn:
        conn.execute(
            "DELETE FROM mail_leases WHERE account = ? AND message_id = ? AND owner = ?",
            (account, message_id, owner),
        )


def release_leases_of(store: Store, owner: str) -> int:
    """Drop every lease of ``owner`` (a clean shutdown)."""
    with store.transaction() as conn:
        return conn.execute("DELETE FROM mail_leases WHERE owner = ?", (owner,)).rowcount


@dataclass(frozen=True, slots=True)
class StepRecord:
    idx: int
    job_id: str | None
    section: dict[str, Any]


def record_step(
    store: Store,
    account: str,
    message_id: str,
    idx: int,
    section: Mapping[str, Any],
    job_id: str | None = None,
) -> bool:
    """Record what command ``idx`` did; False if recorded before (call in the job's transaction)."""
    with store.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO mail_steps (account, message_id, idx, job_id, section, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (account, message_id, idx, job_id, json.dumps(dict(section), default=str), store.clock()),
        )
    return cur.rowcount == 1


def steps_of(store: Store, account: str, message_id: str) -> dict[int, StepRecord]:
    rows = (
        store._conn()
        .execute(
            "SELECT idx, job_id, section FROM mail_steps WHERE account = ? AND message_id = ? ORDER BY idx",
            (account, message_id),
        )
        .fetchall()
    )
    return {int(r["idx"]): StepRecord(int(r["idx"]), r["job_id"], json.loads(r["section"])) for r in rows}


@dataclass(frozen=True, slots=True)
class MailJobRecord:
    job_id: str
    account: str
    message_id: str
    reply: dict[str, Any]
    state: str
    progress_at: float
    progress_count: int


def _mail_job(row: Any) -> MailJobRecord:
    return MailJobRecord(
        row["job_id"],
        row["account"],
        row["message_id"],
        json.loads(row["reply"]),
        row["state"],
        float(row["progress_at"]),
        int(row["progress_count"]),
    )


def watch_job(store: Store, job_id: str, account: str, message_id: str, reply: Mapping[str, Any]) -> None:
    """Remember that ``job_id`` owes a result mail (``reply``: recipients and thread headers)."""
    now = store.clock()
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO mail_jobs (job_id, account, message_id, reply, state, progress_at, created_at) "
            "VALUES (?, ?, ?, ?, 'watching', ?, ?) ON CONFLICT DO NOTHING",
            (job_id, account, message_id, json.dumps(dict(reply)), now, now),
        )


def watched_jobs(store: Store, limit: int = 200) -> list[MailJobRecord]:
    rows = (
        store._conn()
        .execute("SELECT * FROM mail_jobs WHERE state = 'watching' ORDER BY created_at LIMIT ?", (limit,))
        .fetchall()
    )
    return [_mail_job(r) for r in rows]


def get_watched(store: Store, job_id: str) -> MailJobRecord | None:
    row = store._conn().execute("SELECT * FROM mail_jobs WHERE job_id = ?", (job_id,)).fetchone()
    return _mail_job(row) if row is not None else None


def job_mailed(store: Store, job_id: str) -> bool:
    """The result mail is queued (call in the transaction of its ``outbox_put``)."""
    with store.transaction() as conn:
        cur = conn.execute(
            "UPDATE mail_jobs SET state = 'done' WHERE job_id = ? AND state = 'watching'", (job_id,)
        )
    return cur.rowcount == 1


def progress_sent(store: Store, job_id: str, count: int) -> bool:
    """Progress mail number ``count`` is queued; False if another process queued it first."""
    with store.transaction() as conn:
        cur = conn.execute(
            "UPDATE mail_jobs SET progress_count = ?, progress_at = ? "
            "WHERE job_id = ? AND progress_count = ?",
            (count, store.clock(), job_id, count - 1),
        )
    return cur.rowcount == 1


def claim_outbox(
    store: Store, outbox_id: int, seen_next: float, until: float, owner: str | None = None
) -> bool:
    """Hold a due outbox row until ``until`` for ``owner`` (compare-and-set on ``next_attempt_at``)."""
    with store.transaction() as conn:
        cur = conn.execute(
            "UPDATE outbox SET next_attempt_at = ?, claimed_by = ? "
            "WHERE id = ? AND state = 'pending' AND next_attempt_at = ?",
            (until, owner, int(outbox_id), seen_next),
        )
    return cur.rowcount == 1


def release_outbox_claim(store: Store, outbox_id: int, owner: str) -> None:
    """Forget ``owner``'s claim (the row was sent, failed, or rescheduled by it)."""
    with store.transaction() as conn:
        conn.execute("UPDATE outbox SET claimed_by = NULL WHERE id = ? AND claimed_by = ?",
                     (int(outbox_id), owner))


@dataclass(frozen=True, slots=True)
class OutboxClaim:
    outbox_id: int
    owner: str
    until: float


def outbox_claims(store: Store) -> list[OutboxClaim]:
    """Claims on pending rows that have not run out yet."""
    rows = (
        store._conn()
        .execute(
            "SELECT id, claimed_by, next_attempt_at FROM outbox "
            "WHERE state = 'pending' AND claimed_by IS NOT NULL AND next_attempt_at > ?",
            (store.clock(),),
        )
        .fetchall()
    )
    return [OutboxClaim(int(r["id"]), str(r["claimed_by"]), float(r["next_attempt_at"])) for r in rows]


def take_over_outbox(store: Store, claim: OutboxClaim) -> bool:
    """Make a row claimed by a dead sender due now (compare-and-set on holder and claim end)."""
    with store.transaction() as conn:
        cur = conn.execute(
            "UPDATE outbox SET next_attempt_at = ?, claimed_by = NULL "
            "WHERE id = ? AND state = 'pending' AND claimed_by = ? AND next_attempt_at = ?",
            (store.clock(), claim.outbox_id, claim.owner, claim.until),
        )
    return cur.rowcount == 1


@dataclass(frozen=True, slots=True)
class OutboxHead:
    """A pending outbox row and the start of its bytes (where its headers are)."""

    outbox_id: int
    account: str
    message_id: str
    head: bytes
    created_at: float


def outbox_heads(store: Store, head_bytes: int = 16384) -> list[OutboxHead]:
    """Every pending row with the first ``head_bytes`` of its message, oldest first."""
    rows = (
        store._conn()
        .execute(
            "SELECT id, account, message_id, substr(raw, 1, ?) AS head, created_at FROM outbox "
            "WHERE state = 'pending' ORDER BY id",
            (head_bytes,),
        )
        .fetchall()
    )
    return [OutboxHead(int(r["id"]), str(r["account"]), str(r["message_id"]), bytes(r["head"]),
                       float(r["created_at"])) for r in rows]


def command_state_of_job(store: Store, job_id: str) -> str | None:
    """The state of the mail that started ``job_id`` (None: not started by mail, or unknown)."""
    row = (
        store._conn()
        .execute(
            "SELECT m.state FROM mail_jobs j JOIN messages m "
            "ON m.account = j.account AND m.message_id = j.message_id WHERE j.job_id = ?",
            (job_id,),
        )
        .fetchone()
    )
    return None if row is None else str(row["state"])


def outbox_counts(store: Store) -> dict[str, int]:
    rows = store._conn().execute("SELECT state, count(*) AS n FROM outbox GROUP BY state").fetchall()
    return {r["state"]: int(r["n"]) for r in rows}


def outbox_next_due(store: Store) -> float | None:
    """When the earliest pending outbox row is due (None: nothing pending)."""
    row = store._conn().execute("SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending'").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def add_proposal(store: Store, code_hash: str, owner: str, line: str, expires_at: float) -> None:
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO mail_proposals (code_hash, owner, line, expires_at) VALUES (?, ?, ?, ?)",
            (code_hash, owner, line, expires_at),
        )


def take_proposal(store: Store, code_hash: str, owner: str) -> str | None:
    """The proposed line for this code and owner, used once and only before it expires."""
    now = store.clock()
    with store.transaction() as conn:
        row = conn.execute(
            "SELECT line FROM mail_proposals WHERE code_hash = ? AND owner = ? AND used_at IS NULL "
            "AND expires_at > ?",
            (code_hash, owner, now),
        ).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE mail_proposals SET used_at = ? WHERE code_hash = ?", (now, code_hash))
    return str(row["line"])
