"""SQL for two-person approvals: a job held until enough approvers other than its requester said yes.

The tables come from schema migration 7. A job that needs approval is recorded ``queued`` with a
``pending`` approval row in the same transaction; ``jobruns.claim_slot`` does not start it while the
row is pending. Votes are one per approver (a second vote of the same person changes nothing). The
state moves ``pending`` → ``approved`` | ``denied`` | ``expired`` exactly once (compare-and-set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from carrier.store.db import Store, check_job_id

APPROVAL_STATES = ("pending", "approved", "denied", "expired")


@dataclass(frozen=True, slots=True)
class VoteRecord:
    approver: str
    vote: str
    #: Digest of the approver's signature (the signed mail that carried the vote).
    signature: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    job_id: str
    requester: str
    by_role: str
    needed: int
    state: str
    summary: str
    reason: str
    notified_at: float | None
    created_at: float
    expires_at: float
    decided_at: float | None
    #: The check-mode run made for the approvers to look at, if the catalog asked for one.
    preview_job: str | None = None
    votes: tuple[VoteRecord, ...] = ()

    @property
    def approvals(self) -> int:
        return sum(1 for v in self.votes if v.vote == "approve")


def _record(row: Any, votes: Sequence[VoteRecord]) -> ApprovalRecord:
    return ApprovalRecord(
        job_id=row["job_id"], requester=row["requester"], by_role=row["by_role"], needed=row["needed"],
        state=row["state"], summary=row["summary"], reason=row["reason"], notified_at=row["notified_at"],
        created_at=row["created_at"], expires_at=row["expires_at"], decided_at=row["decided_at"],
        preview_job=row["preview_job"], votes=tuple(votes),
    )


def create(store: Store, job_id: str, *, requester: str, by_role: str, needed: int, ttl: float,
           summary: str, preview_job: str | None = None) -> ApprovalRecord:
    """Hold ``job_id`` for approval (call it in the transaction that records the job)."""
    check_job_id(job_id)
    if preview_job is not None:
        check_job_id(preview_job)
    now = store.clock()
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO approvals (job_id, requester, by_role, needed, summary, created_at, expires_at, "
            "preview_job) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, requester, by_role, max(1, int(needed)), summary, now, now + ttl, preview_job),
        )
    got = get(store, job_id)
    assert got is not None
    return got


def get(store: Store, job_id: str) -> ApprovalRecord | None:
    check_job_id(job_id)
    conn = store._conn()
    row = conn.execute("SELECT * FROM approvals WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    votes = [VoteRecord(v["approver"], v["vote"], v["signature"], v["reason"], v["at"]) for v in conn.execute(
        "SELECT * FROM approval_votes WHERE job_id = ? ORDER BY at, approver", (job_id,)).fetchall()]
    return _record(row, votes)


def vote(store: Store, job_id: str, approver: str, vote_: str, *, signature: str = "",
         reason: str = "") -> ApprovalRecord:
    """Record ``approver``'s vote on a pending approval and settle the state: one deny ends it,
    ``needed`` approvals release it. Returns the approval as it is afterwards."""
    if vote_ not in ("approve", "deny"):
        raise ValueError(f"a vote is approve or deny, not {vote_!r}")
    check_job_id(job_id)
    now = store.clock()
    with store.transaction() as conn:
        row = conn.execute("SELECT state, needed FROM approvals WHERE job_id = ?", (job_id,)).fetchone()
        if row is not None and row["state"] == "pending":
            conn.execute(
                "INSERT OR IGNORE INTO approval_votes (job_id, approver, vote, signature, reason, at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (job_id, approver, vote_, signature, reason[:500], now))
            if vote_ == "deny":
                conn.execute("UPDATE approvals SET state = 'denied', reason = ?, decided_at = ? "
                             "WHERE job_id = ? AND state = 'pending'", (reason[:500], now, job_id))
            else:
                yes = conn.execute("SELECT count(*) FROM approval_votes "
                                   "WHERE job_id = ? AND vote = 'approve'", (job_id,)).fetchone()[0]
                if yes >= row["needed"]:
                    conn.execute("UPDATE approvals SET state = 'approved', decided_at = ? "
                                 "WHERE job_id = ? AND state = 'pending'", (now, job_id))
    got = get(store, job_id)
    assert got is not None
    return got


def expire_due(store: Store, job_id: str) -> bool:
    """Mark the approval of ``job_id`` expired if it is pending past its time; True if it did now."""
    check_job_id(job_id)
    now = store.clock()
    with store.transaction() as conn:
        cur = conn.execute("UPDATE approvals SET state = 'expired', decided_at = ? "
                           "WHERE job_id = ? AND state = 'pending' AND expires_at <= ?", (now, job_id, now))
        return cur.rowcount == 1


def to_notify(store: Store, limit: int = 20) -> list[ApprovalRecord]:
    """Pending approvals whose approvers were not mailed yet, oldest first."""
    rows = store._conn().execute(
        "SELECT job_id FROM approvals WHERE state = 'pending' AND notified_at IS NULL "
        "ORDER BY created_at LIMIT ?", (max(1, limit),)).fetchall()
    found = [get(store, r["job_id"]) for r in rows]
    return [a for a in found if a is not None]


def mark_notified(store: Store, job_id: str) -> bool:
    """Claim the approval mail of ``job_id`` (True once: two Carrier processes never both send it)."""
    check_job_id(job_id)
    with store.transaction() as conn:
        cur = conn.execute("UPDATE approvals SET notified_at = ? WHERE job_id = ? AND notified_at IS NULL",
                           (store.clock(), job_id))
        return cur.rowcount == 1
