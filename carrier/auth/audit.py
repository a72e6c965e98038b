"""The audit trail: every trust decision and every job start/end, hash-chained.

Each row's hash is sha256 over the previous row's hash and the row's own content (id, time, actor,
door, action, target, outcome, detail), and a head record keeps the newest hash and the row count.
``verify()`` recomputes the chain: an edited row, a deleted row (in the middle or at the end) or a
row inserted behind Carrier's back is reported by id. Anyone who can rewrite the whole database can
rewrite the chain too: this makes tampering evident, it does not make it impossible.

Rows are written only through ``Audit.record``: the store has no unchained writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from carrier.auth.policy import Decision, Identity, Request
from carrier.store import Store
from carrier.store.auth import GENESIS_HASH, ChainedAuditRow, append_audit, read_audit_chain


def row_hash(prev_hash: str, row: ChainedAuditRow) -> str:
    """The chain hash of ``row`` after ``prev_hash`` (canonical JSON, so it is reproducible)."""
    content = {
        "v": 1,
        "prev": prev_hash,
        "id": row.id,
        "ts": row.ts,
        "actor": row.actor,
        "door": row.door,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "detail": row.detail_json,
    }
    text = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditReport:
    rows: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Audit:
    """Appends chained audit rows to the store and checks the chain."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(
        self,
        actor: str,
        door: str,
        action: str,
        *,
        target: str = "",
        outcome: str = "ok",
        detail: Mapping[str, Any] | None = None,
    ) -> ChainedAuditRow:
        """Append one row: who (``actor``), through which door, did what, to what, with what result."""
        return append_audit(self.store, row_hash, actor=actor or "unknown", door=door, action=action,
                            target=target, outcome=outcome, detail=dict(detail or {}))

    def decision(
        self, identity: Identity, request: Request, decision: Decision, *, target: str = ""
    ) -> ChainedAuditRow:
        """Record a policy decision (allowed or denied) with the hosts and the reason."""
        detail: dict[str, Any] = {"reason": decision.reason, "role": identity.role,
                                  "hosts": [h.name for h in request.hosts]}
        for key in ("playbook", "module", "command", "tool", "job_owner"):
            value = getattr(request, key)
            if value is not None:
                detail[key] = value
        if identity.token_id:
            detail["token"] = identity.token_id
        if identity.fingerprint:
            detail["fingerprint"] = identity.fingerprint
        return self.record(identity.name, identity.door, f"decide:{request.action}", target=target,
                           outcome="allowed" if decision.allowed else "denied", detail=detail)

    def job(
        self,
        identity: Identity,
        job_id: str,
        event: str,
        *,
        hosts: Sequence[str] = (),
        outcome: str = "ok",
        detail: Mapping[str, Any] | None = None,
    ) -> ChainedAuditRow:
        """Record a job's start or end (``event``: start, end, kill...), with its hosts and result."""
        return self.record(identity.name, identity.door, f"job:{event}", target=job_id, outcome=outcome,
                           detail={"hosts": list(hosts), "role": identity.role, **dict(detail or {})})

    def verify(self) -> AuditReport:
        """Recompute the chain; every problem names the row where it shows."""
        rows, head = read_audit_chain(self.store)
        problems: list[str] = []
        prev = GENESIS_HASH
        chained = 0
        last_id = 0
        for row in rows:
            if row.row_hash is None or row.prev_hash is None:
                problems.append(f"row {row.id}: not chained (written outside carrier.auth.audit, or its "
                                "hash was removed)")
                continue
            chained += 1
            if row.prev_hash != prev:
                problems.append(f"row {row.id}: the chain is broken before it (a row was deleted, "
                                "inserted or changed)")
            if row_hash(row.prev_hash, row) != row.row_hash:
                problems.append(f"row {row.id}: its content was changed after it was written")
            prev = row.row_hash
            last_id = row.id
        if head is None:
            if chained:
                problems.append("the audit head record is missing")
        else:
            if head.last_hash != prev or head.last_id != last_id:
                problems.append(f"the newest row(s) are missing or changed: the head names row "
                                f"{head.last_id}, the table ends at row {last_id or 'none'}")
            if head.row_count != chained:
                problems.append(f"the head counts {head.row_count} rows, the table has {chained}")
        return AuditReport(len(rows), problems)
