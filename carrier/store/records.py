"""Typed rows returned by the store. Immutable snapshots: change state through ``Store`` methods.

Timestamps are float seconds since the Unix epoch (UTC), ``None`` when the event has not happened.
JSON columns come back decoded (``spec``, ``data``, ``detail`` are dicts; lists are tuples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    kind: str
    owner: str
    door: str
    target: str
    spec: dict[str, Any]
    status: str
    rc: int | None
    message: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    #: Sequence number of the newest event (0: none yet); the cursor a reader starts after.
    last_seq: int


@dataclass(frozen=True, slots=True)
class EventRecord:
    job_id: str
    seq: int
    ts: float
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MessageRecord:
    account: str
    message_id: str
    sig_digest: str | None
    state: str
    job_id: str | None
    error: str | None
    received_at: float
    done_at: float | None


@dataclass(frozen=True, slots=True)
class EnrollmentRecord:
    id: str
    email: str
    fingerprint: str | None
    state: str
    nonce_hash: str | None
    nonce_expires_at: float | None
    role: str | None
    decided_by: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    token_hash: str
    owner: str
    role: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    ts: float
    actor: str
    door: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    id: int
    account: str
    message_id: str
    recipients: tuple[str, ...]
    raw: bytes
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None
