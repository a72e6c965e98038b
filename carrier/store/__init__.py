"""Carrier's state: one SQLite database (WAL) with jobs, events, processed mail, enrollments,
tokens, audit and the outbox. ``Store`` is the only way in; SQL lives in ``carrier.store.db``."""

from carrier.store.db import (
    DB_NAME,
    KEEP,
    Store,
    check_enrollment_id,
    check_job_id,
    check_token_id,
    new_job_id,
)
from carrier.store.records import (
    AuditRecord,
    EnrollmentRecord,
    EventRecord,
    JobRecord,
    MessageRecord,
    OutboxRecord,
    TokenRecord,
)
from carrier.store.schema import (
    DOORS,
    ENROLLMENT_STATES,
    FINAL_JOB_STATUSES,
    JOB_KINDS,
    JOB_STATUSES,
    LATEST_VERSION,
    MESSAGE_STATES,
    OUTBOX_STATES,
)

__all__ = [
    "DB_NAME",
    "DOORS",
    "ENROLLMENT_STATES",
    "FINAL_JOB_STATUSES",
    "JOB_KINDS",
    "JOB_STATUSES",
    "KEEP",
    "LATEST_VERSION",
    "MESSAGE_STATES",
    "OUTBOX_STATES",
    "AuditRecord",
    "EnrollmentRecord",
    "EventRecord",
    "JobRecord",
    "MessageRecord",
    "OutboxRecord",
    "Store",
    "TokenRecord",
    "check_enrollment_id",
    "check_job_id",
    "check_token_id",
    "new_job_id",
]
