"""The SQLite schema as an ordered list of migrations.

Each migration is a tuple of single SQL statements (not one script: ``executescript`` would commit
the open transaction first, and a migration must apply entirely or not at all). ``Store.migrate``
applies the missing ones in order, each in its own ``BEGIN IMMEDIATE`` transaction, and records the
version in ``schema_version``. Never edit a released migration: append a new one.

Conventions used by every table:
- timestamps are REAL seconds since the Unix epoch (UTC by definition), as ``time.time()`` returns;
- JSON columns are TEXT written by ``json.dumps`` (the store never interpolates them into SQL);
- enumerations are TEXT with a CHECK constraint, mirrored by the tuples below for Python-side checks.
"""

from __future__ import annotations

from dataclasses import dataclass

JOB_KINDS = ("playbook", "adhoc", "exec", "pty")
DOORS = ("mail", "mcp", "cli")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")
#: Statuses after which a job never changes again.
FINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled", "lost")
MESSAGE_STATES = ("received", "processing", "done", "failed")
ENROLLMENT_STATES = ("requested", "challenged", "verified", "approved", "denied", "revoked", "expired")
OUTBOX_STATES = ("pending", "sent", "failed")
#: When a schedule's result mail goes to its owner.
SCHEDULE_NOTIFY = ("always", "failure", "never")
#: What became of one slot of a schedule: claimed (about to start), started (its job exists),
#: refused (the policy said no at fire time), missed (Carrier was not running: reported, not run).
SCHEDULE_RUN_STATES = ("claimed", "started", "refused", "missed")
#: Whether Carrier encrypts its replies to a user: always, never, or auto (when the user's mail came
#: encrypted, Autocrypt-style).
ENCRYPT_MODES = ("always", "never", "auto")
#: Audit rows may also come from Carrier itself (start-up, expiry sweeps, the sandbox).
AUDIT_DOORS = (*DOORS, "system")


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_V1 = Migration(
    1,
    "jobs, job events, processed mail, enrollments, tokens, audit, outbox",
    (
        f"""
        CREATE TABLE jobs (
            id          TEXT PRIMARY KEY NOT NULL CHECK (id GLOB 'j-[a-z2-7]*' AND length(id) = 14),
            kind        TEXT NOT NULL CHECK (kind IN {_in(JOB_KINDS)}),
            owner       TEXT NOT NULL,
            door        TEXT NOT NULL CHECK (door IN {_in(DOORS)}),
            target      TEXT NOT NULL DEFAULT '',
            spec        TEXT NOT NULL DEFAULT '{{}}',
            status      TEXT NOT NULL DEFAULT 'queued' CHECK (status IN {_in(JOB_STATUSES)}),
            rc          INTEGER,
            message     TEXT NOT NULL DEFAULT '',
            created_at  REAL NOT NULL,
            started_at  REAL,
            finished_at REAL,
            last_seq    INTEGER NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
        )
        """,
        "CREATE INDEX jobs_by_created ON jobs (created_at)",
        "CREATE INDEX jobs_by_owner ON jobs (owner, created_at)",
        "CREATE INDEX jobs_by_status ON jobs (status, created_at)",
        """
        CREATE TABLE job_events (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            seq    INTEGER NOT NULL CHECK (seq > 0),
            ts     REAL NOT NULL,
            type   TEXT NOT NULL,
            data   TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (job_id, seq)
        ) WITHOUT ROWID
        """,
        f"""
        CREATE TABLE messages (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            account     TEXT NOT NULL,
            message_id  TEXT NOT NULL,
            sig_digest  TEXT UNIQUE,
            state       TEXT NOT NULL DEFAULT 'received' CHECK (state IN {_in(MESSAGE_STATES)}),
            job_id      TEXT REFERENCES jobs (id) ON DELETE SET NULL,
            error       TEXT,
            received_at REAL NOT NULL,
            done_at     REAL,
            UNIQUE (account, message_id)
        )
        """,
        "CREATE INDEX messages_by_state ON messages (state, received_at)",
        f"""
        CREATE TABLE enrollments (
            id               TEXT PRIMARY KEY NOT NULL CHECK (id GLOB 'r-[a-z2-7]*' AND length(id) = 14),
            email            TEXT NOT NULL,
            fingerprint      TEXT,
            state            TEXT NOT NULL DEFAULT 'requested' CHECK (state IN {_in(ENROLLMENT_STATES)}),
            nonce_hash       TEXT CHECK (nonce_hash IS NULL OR length(nonce_hash) = 64),
            nonce_expires_at REAL,
            role             TEXT,
            decided_by       TEXT,
            created_at       REAL NOT NULL,
            updated_at       REAL NOT NULL
        )
        """,
        "CREATE INDEX enrollments_by_email ON enrollments (email, state)",
        "CREATE INDEX enrollments_by_fingerprint ON enrollments (fingerprint, state)",
        """
        CREATE TABLE tokens (
            id           TEXT PRIMARY KEY NOT NULL CHECK (id GLOB 't-[a-z2-7]*' AND length(id) = 14),
            token_hash   TEXT NOT NULL UNIQUE
                         CHECK (length(token_hash) = 64 AND token_hash NOT GLOB '*[^0-9a-f]*'),
            owner        TEXT NOT NULL,
            role         TEXT NOT NULL,
            scopes       TEXT NOT NULL DEFAULT '[]',
            created_at   REAL NOT NULL,
            expires_at   REAL,
            revoked_at   REAL,
            last_used_at REAL
        )
        """,
        "CREATE INDEX tokens_by_owner ON tokens (owner)",
        f"""
        CREATE TABLE audit (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            ts      REAL NOT NULL,
            actor   TEXT NOT NULL,
            door    TEXT NOT NULL CHECK (door IN {_in(AUDIT_DOORS)}),
            action  TEXT NOT NULL,
            target  TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL,
            detail  TEXT NOT NULL DEFAULT '{{}}'
        )
        """,
        "CREATE INDEX audit_by_actor ON audit (actor, id)",
        "CREATE INDEX audit_by_action ON audit (action, id)",
        f"""
        CREATE TABLE outbox (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            account         TEXT NOT NULL,
            message_id      TEXT NOT NULL,
            recipients      TEXT NOT NULL,
            raw             BLOB NOT NULL,
            state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN {_in(OUTBOX_STATES)}),
            attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            next_attempt_at REAL NOT NULL,
            last_error      TEXT,
            created_at      REAL NOT NULL,
            sent_at         REAL,
            UNIQUE (account, message_id)
        )
        """,
        "CREATE INDEX outbox_due ON outbox (state, next_attempt_at)",
    ),
)

_V2 = Migration(
    2,
    "trust: hash-chained audit, persisted rate-limit buckets, seen signature digests",
    (
        # Each audit row's hash covers the previous row's hash and its own content (carrier.auth.audit).
        "ALTER TABLE audit ADD COLUMN prev_hash TEXT CHECK (prev_hash IS NULL OR length(prev_hash) = 64)",
        "ALTER TABLE audit ADD COLUMN row_hash TEXT CHECK (row_hash IS NULL OR length(row_hash) = 64)",
        # The newest chained row and how many there are: a deleted tail row is found too.
        """
        CREATE TABLE audit_head (
            id        INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
            last_id   INTEGER NOT NULL,
            last_hash TEXT NOT NULL CHECK (length(last_hash) = 64),
            row_count INTEGER NOT NULL CHECK (row_count >= 0)
        )
        """,
        """
        CREATE TABLE rate_buckets (
            key        TEXT PRIMARY KEY NOT NULL,
            tokens     REAL NOT NULL,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE seen_signatures (
            digest      TEXT PRIMARY KEY NOT NULL CHECK (length(digest) = 64),
            fingerprint TEXT NOT NULL,
            message_key TEXT NOT NULL,
            signed_at   REAL NOT NULL,
            seen_at     REAL NOT NULL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX seen_signatures_by_time ON seen_signatures (signed_at)",
    ),
)

_V3 = Migration(
    3,
    "jobs: how each job runs (engine, hosts, detached process, ingest cursor, cancel, supervisor)",
    (
        # One row per job that was handed to an engine (carrier.jobs.manager, SQL in store/jobruns.py).
        """
        CREATE TABLE job_runs (
            job_id           TEXT PRIMARY KEY NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            engine           TEXT NOT NULL,
            hosts            TEXT NOT NULL DEFAULT '[]',
            run_dir          TEXT NOT NULL DEFAULT '',
            pid              INTEGER,
            pid_start        TEXT,
            cursor           INTEGER NOT NULL DEFAULT 0 CHECK (cursor >= 0),
            reason           TEXT NOT NULL DEFAULT '',
            summary          TEXT NOT NULL DEFAULT '{}',
            cancel_at        REAL,
            cancel_by        TEXT,
            supervisor_pid   INTEGER,
            supervisor_start TEXT,
            updated_at       REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ),
)

_V4 = Migration(
    4,
    "email door: message leases between Carrier processes, per-command steps, jobs awaiting a result mail",
    (
        # Who works on a claimed mail now (carrier.mail.gateway, SQL in store/gateway.py).
        """
        CREATE TABLE mail_leases (
            account    TEXT NOT NULL,
            message_id TEXT NOT NULL,
            owner      TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (account, message_id)
        ) WITHOUT ROWID
        """,
        # What each command of a mail did (its reply section, its job): a resumed mail never
        # runs a recorded step again.
        """
        CREATE TABLE mail_steps (
            account    TEXT NOT NULL,
            message_id TEXT NOT NULL,
            idx        INTEGER NOT NULL CHECK (idx >= 0),
            job_id     TEXT,
            section    TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            PRIMARY KEY (account, message_id, idx)
        ) WITHOUT ROWID
        """,
        # Jobs started by mail whose result mail is still to be queued.
        """
        CREATE TABLE mail_jobs (
            job_id         TEXT PRIMARY KEY NOT NULL,
            account        TEXT NOT NULL,
            message_id     TEXT NOT NULL,
            reply          TEXT NOT NULL DEFAULT '{}',
            state          TEXT NOT NULL DEFAULT 'watching' CHECK (state IN ('watching', 'done')),
            progress_at    REAL NOT NULL,
            progress_count INTEGER NOT NULL DEFAULT 0,
            created_at     REAL NOT NULL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX mail_jobs_by_state ON mail_jobs (state)",
        # Commands an LLM proposed, waiting for a signed `confirm <code>` (only the code's sha256).
        """
        CREATE TABLE mail_proposals (
            code_hash  TEXT PRIMARY KEY NOT NULL CHECK (length(code_hash) = 64),
            owner      TEXT NOT NULL,
            line       TEXT NOT NULL,
            expires_at REAL NOT NULL,
            used_at    REAL
        ) WITHOUT ROWID
        """,
    ),
)

_V5 = Migration(
    5,
    "outbox: who holds a send claim (a dead sender's claim is taken over at once)",
    ("ALTER TABLE outbox ADD COLUMN claimed_by TEXT",),
)

#: How an audit row's hash is made: ``sha256`` (unkeyed, rows written before migration 6) or
#: ``hmac-sha256`` (keyed with the audit key kept outside the state directory).
AUDIT_SCHEMES = ("sha256", "hmac-sha256")

_V6 = Migration(
    6,
    "audit: keyed (HMAC-SHA256) chain hashes, the switch point, a keyed head",
    (
        # Every row written before this migration keeps its unkeyed hash and says so: old rows are
        # never rewritten; new rows are keyed (carrier.auth.audit).
        f"ALTER TABLE audit ADD COLUMN scheme TEXT NOT NULL DEFAULT 'sha256' "
        f"CHECK (scheme IN {_in(AUDIT_SCHEMES)})",
        # A MAC over the head (last id, hash, count): cutting the newest rows needs the key too.
        "ALTER TABLE audit_head ADD COLUMN head_mac TEXT CHECK (head_mac IS NULL OR length(head_mac) = 64)",
        # Where the chain switched to keyed hashes, MACed with the key: an unkeyed row at or after
        # ``from_id`` is a rewrite by someone without the key. ``key_id`` names the key (not secret).
        """
        CREATE TABLE audit_keyed (
            id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
            from_id INTEGER NOT NULL CHECK (from_id >= 1),
            key_id  TEXT NOT NULL,
            mac     TEXT NOT NULL CHECK (length(mac) = 64),
            made_at REAL NOT NULL
        )
        """,
    ),
)

_V7 = Migration(
    7,
    "approvals: jobs held until enough approvers other than the requester said yes (store/approvals.py)",
    (
        # One row per job that needs approval; the job stays 'queued' and is not claimed while its
        # approval is pending (jobruns.claim_slot).
        """
        CREATE TABLE approvals (
            job_id      TEXT PRIMARY KEY NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            requester   TEXT NOT NULL,
            by_role     TEXT NOT NULL,
            needed      INTEGER NOT NULL CHECK (needed >= 1),
            state       TEXT NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'approved', 'denied', 'expired')),
            summary     TEXT NOT NULL DEFAULT '',
            reason      TEXT NOT NULL DEFAULT '',
            notified_at REAL,
            created_at  REAL NOT NULL,
            expires_at  REAL NOT NULL,
            decided_at  REAL,
            -- the check-mode (--check --diff) run whose recap goes into the approval request
            preview_job TEXT
        ) WITHOUT ROWID
        """,
        "CREATE INDEX approvals_by_state ON approvals (state, expires_at)",
        """
        CREATE TABLE approval_votes (
            job_id    TEXT NOT NULL REFERENCES approvals (job_id) ON DELETE CASCADE,
            approver  TEXT NOT NULL,
            vote      TEXT NOT NULL CHECK (vote IN ('approve', 'deny')),
            signature TEXT NOT NULL DEFAULT '',
            reason    TEXT NOT NULL DEFAULT '',
            at        REAL NOT NULL,
            PRIMARY KEY (job_id, approver)
        ) WITHOUT ROWID
        """,
    ),
)

_V8 = Migration(
    8,
    "schedules and their slots (one row per slot: a slot fires once across restarts and processes)",
    (
        f"""
        CREATE TABLE schedules (
            name          TEXT PRIMARY KEY NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            owner         TEXT NOT NULL,
            door          TEXT NOT NULL CHECK (door IN {_in(DOORS)}),
            playbook      TEXT NOT NULL,
            limit_pattern TEXT,
            extra_vars    TEXT NOT NULL DEFAULT '{{}}',
            cron          TEXT NOT NULL,
            notify        TEXT NOT NULL DEFAULT 'failure' CHECK (notify IN {_in(SCHEDULE_NOTIFY)}),
            created_at    REAL NOT NULL,
            checked_at    REAL NOT NULL
        ) WITHOUT ROWID
        """,
        # The (schedule, slot) key is the claim: whoever inserts the row fires (or reports) the slot.
        f"""
        CREATE TABLE schedule_runs (
            schedule     TEXT NOT NULL,
            slot         REAL NOT NULL,
            state        TEXT NOT NULL CHECK (state IN {_in(SCHEDULE_RUN_STATES)}),
            job_id       TEXT,
            claimed_by   TEXT NOT NULL,
            reason       TEXT NOT NULL DEFAULT '',
            missed_count INTEGER NOT NULL DEFAULT 0 CHECK (missed_count >= 0),
            first_missed REAL,
            notified     INTEGER NOT NULL DEFAULT 0 CHECK (notified IN (0, 1)),
            created_at   REAL NOT NULL,
            PRIMARY KEY (schedule, slot)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX schedule_runs_to_notify ON schedule_runs (state, notified)",
    ),
)

_V9 = Migration(
    9,
    "per-user settings chosen by the user (by a signed `settings` mail): encrypt replies",
    (
        f"""
        CREATE TABLE user_settings (
            identity   TEXT PRIMARY KEY NOT NULL CHECK (length(identity) BETWEEN 1 AND 320),
            encrypt    TEXT NOT NULL DEFAULT 'auto' CHECK (encrypt IN {_in(ENCRYPT_MODES)}),
            updated_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ),
)

#: All migrations, in order; versions are 1..N with no gaps (checked by the tests).
MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9)

#: The schema version this Carrier writes and understands.
LATEST_VERSION = MIGRATIONS[-1].version

#: Created outside the migrations: it records which of them were applied.
SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY NOT NULL,
    applied_at REAL NOT NULL
)
"""
