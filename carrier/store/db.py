"""SQLite state store: connections, transactions, migrations, and every SQL query Carrier runs.

One ``Store`` per process, shared by all threads. Each thread gets its own ``sqlite3`` connection
(a connection is not meant to be shared across threads); ``close()`` closes all of them, and the
connection of a thread that ends is closed when the thread's local storage goes away.

Writes go through ``transaction()``, which starts ``BEGIN IMMEDIATE``: the write lock is taken at the
start, so concurrent writers (threads or processes) wait on the busy timeout instead of failing with
SQLITE_BUSY when a read transaction tries to upgrade. Transactions nest (inner ones are savepoints),
so ``with store.transaction(): store.outbox_put(...); store.finish_message(...)`` is atomic.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. In WAL mode NORMAL never
corrupts the database and a committed transaction survives a crash of Carrier itself; only an OS
crash or power loss can roll back the last few commits (the WAL is fsynced at checkpoints). That is
right for the high-volume writes (job events, audit, outbox bookkeeping): FULL would add an fsync
per PTY output chunk. The one write whose loss would break a promise is the exactly-once guard: if
a mail claim vanished after its command ran, the mail would run again after a reboot. So
``claim_message`` and ``mark_message_processing`` commit with ``synchronous=FULL`` (``durable=True``),
one fsync per incoming mail, which is cheap at mail rates. An fsync of the WAL also makes every
earlier NORMAL commit durable, since the WAL is append-only.

Timestamps are float seconds since the Unix epoch (``time.time()``), UTC by definition; they sort
and subtract without parsing. Ids are a prefix and 12 random base32 characters (60 bits):
``j-`` jobs, ``r-`` enrollment requests, ``t-`` tokens. Ids that come from outside are checked
against that format before they reach SQL or a file path.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from carrier.errors import StoreError

# One place for id formats; re-exported for the store's callers.
from carrier.formats import check_enrollment_id as check_enrollment_id
from carrier.formats import check_job_id as check_job_id
from carrier.formats import check_token_id as check_token_id
from carrier.store import dialect, schema
from carrier.store.dialect import PgConnection
from carrier.store.records import (
    AuditRecord,
    EnrollmentRecord,
    EventRecord,
    JobRecord,
    MessageRecord,
    OutboxRecord,
    TokenRecord,
)

log = logging.getLogger(__name__)

DB_NAME = "carrier.db"
DEFAULT_BUSY_TIMEOUT = 10.0
MAX_PAGE = 10_000

_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- ids and checks


def new_id(prefix: str) -> str:
    """``prefix-`` and 12 random lowercase base32 characters (60 bits from ``secrets``)."""
    body = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:12]
    return f"{prefix}-{body}"


def new_job_id() -> str:
    return new_id("j")


def _check_sha256_hex(value: object, what: str) -> str:
    if not isinstance(value, str) or _SHA256_HEX_RE.fullmatch(value) is None:
        raise ValueError(f"{what} must be a sha256 hex digest (64 characters 0-9a-f), never the secret")
    return value


def _check_choice(what: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"invalid {what} {value!r}: expected one of {', '.join(choices)}")
    return value


class _Filter:
    """The WHERE clause of a listing, built from fixed column names (never from input) and bound
    parameters: one place for the filter shape every ``list_*``/``find_*`` query shares."""

    def __init__(self) -> None:
        self.terms: list[str] = []
        self.params: list[Any] = []

    def eq(self, column: str, value: object, op: str = "=") -> None:
        """``column op ?`` when ``value`` is given (None means no filter)."""
        if value is not None:
            self.terms.append(f"{column} {op} ?")
            self.params.append(value)

    def one_of(self, column: str, value: str | Sequence[str] | None, what: str,
               choices: Sequence[str]) -> bool:
        """``column IN (...)`` over checked choices; False when an empty set was asked for (no rows)."""
        if value is None:
            return True
        values = (value,) if isinstance(value, str) else tuple(value)
        for v in values:
            _check_choice(what, v, choices)
        if not values:
            return False
        self.terms.append(f"{column} IN ({', '.join('?' for _ in values)})")
        self.params.extend(values)
        return True

    @property
    def clause(self) -> str:
        return f"WHERE {' AND '.join(self.terms)}" if self.terms else ""


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    return limit


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _loads_dict(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}


def _loads_strs(text: str) -> tuple[str, ...]:
    value = json.loads(text)
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


class _Keep(enum.Enum):
    """Sentinel for "leave this column as it is" in updates where ``None`` is a real value."""

    KEEP = 0


KEEP = _Keep.KEEP


# --------------------------------------------------------------------------- row conversion


def _job(row: Any) -> JobRecord:
    return JobRecord(
        id=row["id"],
        kind=row["kind"],
        owner=row["owner"],
        door=row["door"],
        target=row["target"],
        spec=_loads_dict(row["spec"]),
        status=row["status"],
        rc=row["rc"],
        message=row["message"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        last_seq=row["last_seq"],
    )


def _event(row: Any) -> EventRecord:
    return EventRecord(
        job_id=row["job_id"], seq=row["seq"], ts=row["ts"], type=row["type"], data=_loads_dict(row["data"])
    )


def _message(row: Any) -> MessageRecord:
    return MessageRecord(
        account=row["account"],
        message_id=row["message_id"],
        sig_digest=row["sig_digest"],
        state=row["state"],
        job_id=row["job_id"],
        error=row["error"],
        received_at=row["received_at"],
        done_at=row["done_at"],
    )


def _enrollment(row: Any) -> EnrollmentRecord:
    return EnrollmentRecord(
        id=row["id"],
        email=row["email"],
        fingerprint=row["fingerprint"],
        state=row["state"],
        nonce_hash=row["nonce_hash"],
        nonce_expires_at=row["nonce_expires_at"],
        role=row["role"],
        decided_by=row["decided_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _token(row: Any) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        token_hash=row["token_hash"],
        owner=row["owner"],
        role=row["role"],
        scopes=_loads_strs(row["scopes"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
    )


def _audit(row: Any) -> AuditRecord:
    return AuditRecord(
        id=row["id"],
        ts=row["ts"],
        actor=row["actor"],
        door=row["door"],
        action=row["action"],
        target=row["target"],
        outcome=row["outcome"],
        detail=_loads_dict(row["detail"]),
    )


def _outbox(row: Any) -> OutboxRecord:
    return OutboxRecord(
        id=row["id"],
        account=row["account"],
        message_id=row["message_id"],
        recipients=_loads_strs(row["recipients"]),
        raw=bytes(row["raw"]),
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        sent_at=row["sent_at"],
    )


# --------------------------------------------------------------------------- files


def _prepare_dir(state_dir: Path) -> None:
    try:
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            state_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(state_dir, 0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise StoreError(
            f"cannot create the state directory {state_dir}: {exc.strerror}: "
            "create it (mode 0700, owned by the Carrier user) or set another state_dir"
        ) from exc
    if not state_dir.is_dir():
        raise StoreError(
            f"the state directory {state_dir} exists but is not a directory: set another state_dir"
        )
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreError(
            f"the state directory {state_dir} is not writable by uid {os.getuid()}: "
            "fix its owner or mode, or set another state_dir"
        )
    mode = state_dir.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("state directory %s has mode %o; 0700 is recommended", state_dir, mode)


def _prepare_file(path: Path) -> None:
    """Create ``carrier.db`` as 0600 before SQLite opens it (SQLite gives -wal/-shm the same mode).

    An existing file is never opened here: closing any descriptor of a file drops every POSIX
    lock this process holds on it, so another Store already open in this process would lose its
    SQLite locks and a concurrent writer could corrupt the database. Only a missing file is
    created (O_EXCL), and modes are fixed by path.
    """
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            os.close(fd)  # nothing else can hold locks on a file that did not exist
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            with contextlib.suppress(FileNotFoundError):
                if name.stat().st_mode & 0o077:
                    os.chmod(name, 0o600)  # it holds token hashes, enrollments and the audit trail
    except OSError as exc:
        raise StoreError(
            f"cannot open {path}: {exc.strerror}: check that the file and its directory belong to "
            "the user running Carrier"
        ) from exc


# --------------------------------------------------------------------------- the store


#: A connection of either dialect (``PgConnection`` offers the part of sqlite3's interface used here).
Connection = sqlite3.Connection | PgConnection

#: Tables whose ``id`` is an autoincrement/identity column (an INSERT into them returns its id).
_IDENTITY_TABLES = dialect.identity_tables(s for m in schema.MIGRATIONS for s in m.statements)


def is_postgres_url(url: str | None) -> bool:
    return url is not None and url.startswith(("postgresql://", "postgres://"))


class _Conn:
    """A thread's connection, how deep its transaction nesting is, and the advisory locks it holds."""

    __slots__ = ("__weakref__", "conn", "depth", "locks")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.depth = 0
        self.locks: set[str] = set()


class Store:
    """Carrier's state in ``<state_dir>/carrier.db`` or a PostgreSQL database (``url``).
    Create with ``Store.open``; thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        url: str | None = None,
    ) -> None:
        self.path = path
        #: The PostgreSQL URL (None: SQLite at ``path``).
        self.url = url if is_postgres_url(url) else None
        #: ``sqlite`` or ``postgresql``.
        self.dialect = "postgresql" if self.url else "sqlite"
        #: Where the data is, for messages (never with a password).
        self.where = dialect.redact_url(self.url) if self.url else str(path)
        self.clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._closed = False

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        url: str | None = None,
    ) -> Store:
        """Open (creating if needed) ``state_dir/carrier.db``, switch it to WAL and migrate it;
        with a ``postgresql://`` ``url``, that database instead (``store.url`` in carrier.yml).

        Raises StoreError with what to do when the directory or file cannot be used, the file is
        not a SQLite database, the server cannot be reached, or it was written by a newer Carrier.
        """
        if url is not None and not is_postgres_url(url):
            raise StoreError(
                f"store.url {dialect.redact_url(url)!r} is not a postgresql:// URL: give "
                "postgresql://user@host:port/dbname, or leave store.url out for the embedded SQLite file"
            )
        state_dir = Path(state_dir)
        _prepare_dir(state_dir)
        path = state_dir / DB_NAME
        if url is None:
            _prepare_file(path)
        store = cls(path, clock=clock, busy_timeout=busy_timeout, url=url)
        try:
            if store.url is None:
                store._enable_wal()
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Close every thread's connection. The store cannot be used afterwards."""
        with self._lock:
            self._closed = True
            finalizers, self._finalizers = self._finalizers, []
        for finalizer in finalizers:
            finalizer()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> Connection:
        if self.url is not None:
            try:
                return dialect.connect_pg(self.url, _IDENTITY_TABLES, timeout=self._busy_timeout)
            except sqlite3.Error as exc:
                raise StoreError(
                    f"cannot connect to the PostgreSQL store {self.where}: {exc}: check store.url, "
                    "that the server runs and that the user may log in"
                ) from exc
        try:
            # check_same_thread=False only so that close() may close it from another thread;
            # each connection is otherwise used by the one thread that opened it.
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")  # see the module docstring
            conn.execute("PRAGMA trusted_schema = OFF")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(
                f"{self.path} cannot be used as Carrier's database ({exc}): move it away and start again"
            ) from exc
        return conn

    def _holder(self) -> _Conn:
        if self._closed:
            raise StoreError("the state store is closed")
        holder: _Conn | None = getattr(self._local, "holder", None)
        if holder is None:
            conn = self._connect()
            holder = _Conn(conn)
            # Closes the connection when the thread ends (its local storage is dropped) or at close().
            finalizer = weakref.finalize(holder, conn.close)
            with self._lock:
                if self._closed:
                    finalizer()
                    raise StoreError("the state store is closed")
                self._finalizers = [f for f in self._finalizers if f.alive]
                self._finalizers.append(finalizer)
            self._local.holder = holder
        return holder

    def _conn(self) -> Connection:
        return self._holder().conn

    def _enable_wal(self) -> None:
        # Switching the journal mode does not wait on the busy handler: when several processes
        # open a new file at once, the losers see SQLITE_BUSY. Retry until the busy timeout.
        conn = self._conn()
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.005
        while True:
            try:
                mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
                if mode != "wal":
                    mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreError(f"cannot switch {self.path} to write-ahead logging: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"{self.path} stayed locked by another process for more than "
                        f"{self._busy_timeout:g} s: check for a stuck Carrier process"
                    ) from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            except sqlite3.DatabaseError as exc:
                raise StoreError(
                    f"{self.path} cannot be used as Carrier's database ({exc}): move it away and start again"
                ) from exc
        if mode != "wal":
            raise StoreError(
                f"{self.path} cannot use write-ahead logging (journal_mode is {mode}): put the state "
                "directory on a local file system"
            )

    @contextlib.contextmanager
    def transaction(
        self, *, durable: bool = False, lock: str | None = dialect.STORE_LOCK
    ) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): commit on success, roll back on exception.

        Nested calls on the same thread become savepoints of the outer transaction; durability is
        then the outer transaction's. ``durable=True`` commits with ``synchronous=FULL``.

        On PostgreSQL the transaction first takes the advisory lock ``lock`` (default: the
        store-wide one, which makes it ``BEGIN IMMEDIATE``: one such writer at a time across every
        instance); ``lock=None`` relies on row locks alone (the statements must be safe so).
        A nested call takes its lock if the outer one did not hold it. SQLite ignores ``lock``.
        """
        holder = self._holder()
        conn = holder.conn
        if isinstance(conn, PgConnection):
            with self._pg_transaction(holder, conn, lock) as pg:
                yield pg
            return
        if holder.depth:
            name = f"carrier_sp{holder.depth}"
            conn.execute(f"SAVEPOINT {name}")
            holder.depth += 1
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            else:
                conn.execute(f"RELEASE {name}")
            finally:
                holder.depth -= 1
            return

        if durable:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreError(
                        f"{self.path} stayed locked by another writer for more than "
                        f"{self._busy_timeout:g} s: check for a stuck Carrier process"
                    ) from exc
                raise
            holder.depth = 1
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            finally:
                holder.depth = 0
        finally:
            if durable:
                conn.execute("PRAGMA synchronous = NORMAL")

    @contextlib.contextmanager
    def _pg_transaction(self, holder: _Conn, conn: PgConnection, lock: str | None) -> Iterator[PgConnection]:
        if holder.depth:
            name = f"carrier_sp{holder.depth}"
            conn.execute(f"SAVEPOINT {name}")
            holder.depth += 1
            try:
                if lock is not None and lock not in holder.locks:
                    conn.lock(lock)
                    holder.locks.add(lock)
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"ROLLBACK TO {name}")
                    conn.execute(f"RELEASE {name}")
                raise
            else:
                conn.execute(f"RELEASE {name}")
            finally:
                holder.depth -= 1
            return
        conn.execute("BEGIN")
        holder.depth = 1
        try:
            if lock is not None:
                try:
                    conn.lock(lock)
                except sqlite3.OperationalError as exc:
                    raise StoreError(
                        f"the PostgreSQL store {self.where} stayed locked by another writer for more "
                        f"than {self._busy_timeout:g} s: check for a stuck Carrier instance"
                    ) from exc
                holder.locks.add(lock)
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        finally:
            holder.depth = 0
            holder.locks.clear()

    def lock(self, name: str) -> None:
        """Inside ``transaction()``: also hold the advisory lock ``name`` (PostgreSQL; SQLite holds
        the one write lock already)."""
        holder = self._holder()
        if not holder.depth:
            raise RuntimeError("Store.lock is for use inside transaction()")
        if isinstance(holder.conn, PgConnection) and name not in holder.locks:
            holder.conn.lock(name)
            holder.locks.add(name)

    def skip_locked(self, table: str) -> str:
        """`` FOR UPDATE OF table SKIP LOCKED`` on PostgreSQL (a row another instance is claiming
        is passed over, not waited for); empty on SQLite, where the write lock already serialises."""
        return f" FOR UPDATE OF {table} SKIP LOCKED" if self.url is not None else ""

    @property
    def for_update(self) -> str:
        """`` FOR UPDATE`` on PostgreSQL (lock the rows read until commit); empty on SQLite."""
        return " FOR UPDATE" if self.url is not None else ""

    # ----------------------------------------------------------------- schema

    def schema_version(self) -> int:
        """The highest migration applied to this file (0 for a new file)."""
        row = self._conn().execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> int:
        """Apply missing migrations, each in its own transaction; return the resulting version.

        Safe to run concurrently from several processes: each migration re-checks the version
        after taking the write lock.
        """
        try:
            if self.url is not None:
                with self.transaction() as conn:  # two instances starting at once: one creates it
                    conn.execute(schema.SCHEMA_VERSION_TABLE)
            else:
                self._conn().execute(schema.SCHEMA_VERSION_TABLE)
            current = self.schema_version()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.where} cannot be used as Carrier's database ({exc}): move it away and start again"
            ) from exc
        if current > schema.LATEST_VERSION:
            raise StoreError(
                f"{DB_NAME} is at schema version {current} but this Carrier knows "
                f"{schema.LATEST_VERSION}: upgrade Carrier"
            )
        for migration in schema.MIGRATIONS:
            if migration.version <= current:
                continue
            try:
                with self.transaction() as conn:
                    if self.schema_version() >= migration.version:
                        continue  # another process applied it while we waited for the lock
                    for statement in migration.statements:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                        (migration.version, self.clock()),
                    )
            except sqlite3.Error as exc:
                raise StoreError(
                    f"cannot migrate {self.where} to schema version {migration.version} "
                    f"({migration.description}): {exc}"
                ) from exc
            log.info("state store migrated to schema version %d", migration.version)
        return self.schema_version()

    def integrity_check(self) -> str:
        """``ok``, or SQLite's description of what is damaged (PostgreSQL: ``ok`` when it answers)."""
        if self.url is not None:
            self._conn().execute("SELECT 1").fetchone()
            return "ok"
        rows = self._conn().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    # ----------------------------------------------------------------- jobs

    def create_job(
        self,
        kind: str,
        owner: str,
        door: str,
        target: str = "",
        spec: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Insert a queued job with a fresh random id."""
        _check_choice("job kind", kind, schema.JOB_KINDS)
        _check_choice("door", door, schema.DOORS)
        _check_text("owner", owner)
        spec_json = _dumps(dict(spec or {}))
        now = self.clock()
        for _ in range(8):  # 60 random bits: a collision is practically impossible, but cheap to handle
            job_id = new_job_id()
            with self.transaction() as conn:
                cur = conn.execute(
                    "INSERT INTO jobs (id, kind, owner, door, target, spec, status, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?) ON CONFLICT (id) DO NOTHING",
                    (job_id, kind, owner, door, target, spec_json, now),
                )
            if cur.rowcount == 1:
                return JobRecord(
                    id=job_id,
                    kind=kind,
                    owner=owner,
                    door=door,
                    target=target,
                    spec=_loads_dict(spec_json),
                    status="queued",
                    rc=None,
                    message="",
                    created_at=now,
                    started_at=None,
                    finished_at=None,
                    last_seq=0,
                )
        raise StoreError("could not allocate a unique job id")  # pragma: no cover

    def get_job(self, job_id: str) -> JobRecord | None:
        """The job, or None. A malformed id raises ValueError before any query."""
        check_job_id(job_id)
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def update_job_status(
        self,
        job_id: str,
        status: str,
        *,
        rc: int | None = None,
        message: str | None = None,
        expect: Iterable[str] | None = None,
    ) -> bool:
        """Move a job to ``status``; True if it changed.

        Only applies when the current status is in ``expect`` (default: any non-final status, so a
        late "running" or "failed" never overwrites "cancelled"). ``running`` sets ``started_at``
        and a final status sets ``finished_at`` (each only the first time). ``rc``/``message`` are
        written when given.
        """
        check_job_id(job_id)
        _check_choice("job status", status, schema.JOB_STATUSES)
        if expect is None:
            allowed = tuple(s for s in schema.JOB_STATUSES if s not in schema.FINAL_JOB_STATUSES)
        else:
            allowed = tuple(_check_choice("job status", s, schema.JOB_STATUSES) for s in expect)
            if not allowed:
                return False
        now = self.clock()
        sets = ["status = ?"]
        params: list[Any] = [status]
        if status == "running":
            sets.append("started_at = coalesce(started_at, ?)")
            params.append(now)
        if status in schema.FINAL_JOB_STATUSES:
            sets.append("finished_at = coalesce(finished_at, ?)")
            params.append(now)
        if rc is not None:
            sets.append("rc = ?")
            params.append(int(rc))
        if message is not None:
            sets.append("message = ?")
            params.append(message)
        marks = ", ".join("?" for _ in allowed)
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND status IN ({marks})"  # noqa: S608 (fixed fragments)
        with self.transaction() as conn:
            cur = conn.execute(sql, (*params, job_id, *allowed))
        return cur.rowcount == 1

    def list_jobs(
        self,
        *,
        owner: str | None = None,
        status: str | Sequence[str] | None = None,
        kind: str | None = None,
        door: str | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """Jobs matching every given filter, newest first."""
        _check_limit(limit)
        f = _Filter()
        f.eq("owner", owner)
        if not f.one_of("status", status, "job status", schema.JOB_STATUSES):
            return []
        f.eq("kind", None if kind is None else _check_choice("job kind", kind, schema.JOB_KINDS))
        f.eq("door", None if door is None else _check_choice("door", door, schema.DOORS))
        sql = f"SELECT * FROM jobs {f.clause} ORDER BY created_at DESC, rowid DESC LIMIT ?"  # noqa: S608
        rows = self._conn().execute(sql, (*f.params, limit)).fetchall()
        return [_job(r) for r in rows]

    # ----------------------------------------------------------------- job events

    def append_event(self, job_id: str, type: str, data: Mapping[str, Any] | None = None) -> int:
        """Append an event; return its sequence number (1, 2, 3, ... per job, no gaps)."""
        return self.append_events(job_id, [(type, data)])[0]

    def append_events(
        self, job_id: str, events: Iterable[tuple[str, Mapping[str, Any] | None]]
    ) -> list[int]:
        """Append several events in one transaction; return their sequence numbers, in order.

        Raises LookupError when the job does not exist.
        """
        check_job_id(job_id)
        items = [(_check_text("event type", t), _dumps(dict(d or {}))) for t, d in events]
        if not items:
            return []
        now = self.clock()
        # Row locks suffice on PostgreSQL (lock=None): the UPDATE locks the job's row until commit.
        with self.transaction(lock=None) as conn:
            # The seq is taken from jobs.last_seq under the write lock, so concurrent writers
            # (threads or processes) get distinct, consecutive numbers, committed in order.
            cur = conn.execute("UPDATE jobs SET last_seq = last_seq + ? WHERE id = ?", (len(items), job_id))
            if cur.rowcount != 1:
                raise LookupError(f"no job {job_id}")
            last = int(conn.execute("SELECT last_seq FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            first = last - len(items) + 1
            conn.executemany(
                "INSERT INTO job_events (job_id, seq, ts, type, data) VALUES (?, ?, ?, ?, ?)",
                [(job_id, first + i, now, t, d) for i, (t, d) in enumerate(items)],
            )
        return list(range(first, last + 1))

    def events_since(
        self, job_id: str, cursor: int = 0, limit: int = 1000
    ) -> tuple[list[EventRecord], int]:
        """Events with ``seq > cursor`` in order (at most ``limit``), and the cursor to ask with next.

        Pass the returned cursor back to get only newer events: nothing is sent twice or skipped.
        With no new events the cursor comes back unchanged. An unknown job has no events.
        """
        check_job_id(job_id)
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor}")
        _check_limit(limit)
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, cursor, limit),
            )
            .fetchall()
        )
        events = [_event(r) for r in rows]
        return events, (events[-1].seq if events else cursor)

    def trim_events(self, job_id: str, keep_last: int) -> int:
        """Delete all but the newest ``keep_last`` events of a job; return how many were deleted.

        Sequence numbers are not reused: a reader whose cursor fell behind sees a jump in ``seq``.
        """
        check_job_id(job_id)
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        with self.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM job_events WHERE job_id = ? "
                "AND seq <= (SELECT last_seq FROM jobs WHERE id = ?) - ?",
                (job_id, job_id, keep_last),
            )
        return cur.rowcount

    # ----------------------------------------------------------------- processed mail

    def claim_message(self, account: str, message_id: str, sig_digest: str | None = None) -> bool:
        """Record a mail before acting on it; True only the first time (the exactly-once guard).

        False when this ``(account, message_id)`` was seen before, or when ``sig_digest`` (the
        digest of the signature) was already used by any mail (a replay). The claim is committed
        durably before this returns, so it must not be called inside ``transaction()``.
        """
        _check_text("account", account)
        _check_text("message_id", message_id)
        if sig_digest is not None:
            _check_text("sig_digest", sig_digest)
        if self._holder().depth:
            raise RuntimeError("claim_message commits on its own: do not call it inside transaction()")
        with self.transaction(durable=True) as conn:
            cur = conn.execute(
                "INSERT INTO messages (account, message_id, sig_digest, state, received_at) "
                "VALUES (?, ?, ?, 'received', ?) ON CONFLICT DO NOTHING",
                (account, message_id, sig_digest, self.clock()),
            )
        return cur.rowcount == 1

    def get_message(self, account: str, message_id: str) -> MessageRecord | None:
        row = (
            self._conn()
            .execute("SELECT * FROM messages WHERE account = ? AND message_id = ?", (account, message_id))
            .fetchone()
        )
        return _message(row) if row is not None else None

    def mark_message_processing(self, account: str, message_id: str, *, job_id: str | None = None) -> bool:
        """State ``processing`` (and the job it started, if given); durable. False if not open."""
        if job_id is not None:
            check_job_id(job_id)
        with self.transaction(durable=True) as conn:
            cur = conn.execute(
                "UPDATE messages SET state = 'processing', job_id = coalesce(?, job_id) "
                "WHERE account = ? AND message_id = ? AND state IN ('received', 'processing')",
                (job_id, account, message_id),
            )
        return cur.rowcount == 1

    def finish_message(
        self,
        account: str,
        message_id: str,
        *,
        ok: bool = True,
        job_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        """State ``done`` (or ``failed`` when not ``ok``); False if it was not open.

        Call it in the same transaction as the ``outbox_put`` of the reply.
        """
        if job_id is not None:
            check_job_id(job_id)
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE messages SET state = ?, job_id = coalesce(?, job_id), error = ?, done_at = ? "
                "WHERE account = ? AND message_id = ? AND state IN ('received', 'processing')",
                ("done" if ok else "failed", job_id, error, self.clock(), account, message_id),
            )
        return cur.rowcount == 1

    def unfinished_messages(self, account: str | None = None) -> list[MessageRecord]:
        """Claimed mail not yet done or failed (to resume after a crash), oldest first."""
        sql = "SELECT * FROM messages WHERE state IN ('received', 'processing')"
        params: tuple[Any, ...] = ()
        if account is not None:
            sql += " AND account = ?"
            params = (account,)
        rows = self._conn().execute(sql + " ORDER BY received_at, id", params).fetchall()
        return [_message(r) for r in rows]

    # ----------------------------------------------------------------- enrollments

    def create_enrollment(
        self,
        email: str,
        *,
        fingerprint: str | None = None,
        state: str = "requested",
        nonce_hash: str | None = None,
        nonce_expires_at: float | None = None,
    ) -> EnrollmentRecord:
        """A new enrollment request with a fresh ``r-`` id. ``nonce_hash`` is a sha256 hex digest."""
        _check_text("email", email)
        _check_choice("enrollment state", state, schema.ENROLLMENT_STATES)
        if nonce_hash is not None:
            _check_sha256_hex(nonce_hash, "nonce_hash")
        now = self.clock()
        request_id = new_id("r")
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO enrollments (id, email, fingerprint, state, nonce_hash, nonce_expires_at, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, email, fingerprint, state, nonce_hash, nonce_expires_at, now, now),
            )
        record = self.get_enrollment(request_id)
        assert record is not None
        return record

    def get_enrollment(self, request_id: str) -> EnrollmentRecord | None:
        check_enrollment_id(request_id)
        row = self._conn().execute("SELECT * FROM enrollments WHERE id = ?", (request_id,)).fetchone()
        return _enrollment(row) if row is not None else None

    def update_enrollment(
        self,
        request_id: str,
        *,
        state: str,
        expect: Iterable[str] | None = None,
        fingerprint: str | _Keep | None = KEEP,
        nonce_hash: str | _Keep | None = KEEP,
        nonce_expires_at: float | _Keep | None = KEEP,
        role: str | _Keep | None = KEEP,
        decided_by: str | _Keep | None = KEEP,
    ) -> bool:
        """Set ``state`` and the given columns; True if it changed.

        With ``expect``, only when the current state is one of them (compare-and-set, so two
        admins approving and denying at once cannot both win).
        """
        check_enrollment_id(request_id)
        _check_choice("enrollment state", state, schema.ENROLLMENT_STATES)
        if isinstance(nonce_hash, str):
            _check_sha256_hex(nonce_hash, "nonce_hash")
        sets = ["state = ?", "updated_at = ?"]
        params: list[Any] = [state, self.clock()]
        columns: dict[str, object] = {
            "fingerprint": fingerprint,
            "nonce_hash": nonce_hash,
            "nonce_expires_at": nonce_expires_at,
            "role": role,
            "decided_by": decided_by,
        }
        for column, value in columns.items():
            if value is not KEEP:
                sets.append(f"{column} = ?")
                params.append(value)
        sql = f"UPDATE enrollments SET {', '.join(sets)} WHERE id = ?"  # noqa: S608 (fixed column names)
        params.append(request_id)
        if expect is not None:
            states = tuple(_check_choice("enrollment state", s, schema.ENROLLMENT_STATES) for s in expect)
            if not states:
                return False
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            params.extend(states)
        with self.transaction() as conn:
            cur = conn.execute(sql, params)
        return cur.rowcount == 1

    def find_enrollments(
        self,
        *,
        email: str | None = None,
        fingerprint: str | None = None,
        state: str | Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[EnrollmentRecord]:
        """Enrollments matching every given filter, newest first."""
        _check_limit(limit)
        f = _Filter()
        f.eq("email", email)
        f.eq("fingerprint", fingerprint)
        if not f.one_of("state", state, "enrollment state", schema.ENROLLMENT_STATES):
            return []
        sql = f"SELECT * FROM enrollments {f.clause} ORDER BY created_at DESC, rowid DESC LIMIT ?"  # noqa: S608
        rows = self._conn().execute(sql, (*f.params, limit)).fetchall()
        return [_enrollment(r) for r in rows]

    # ----------------------------------------------------------------- tokens

    def add_token(
        self,
        token_hash: str,
        *,
        owner: str,
        role: str,
        scopes: Iterable[str] = (),
        expires_at: float | None = None,
    ) -> TokenRecord:
        """Store a bearer token by its sha256 hex digest (the token itself is never stored)."""
        _check_sha256_hex(token_hash, "token_hash")
        _check_text("owner", owner)
        _check_text("role", role)
        scope_list = [_check_text("scope", s) for s in scopes]
        token_id = new_id("t")
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO tokens (id, token_hash, owner, role, scopes, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, token_hash, owner, role, _dumps(scope_list), self.clock(), expires_at),
            )
        record = self.find_token(token_hash)
        assert record is not None
        return record

    def find_token(self, token_hash: str) -> TokenRecord | None:
        """The token with this digest, revoked or expired ones included (``auth`` decides)."""
        _check_sha256_hex(token_hash, "token_hash")
        row = self._conn().execute("SELECT * FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return _token(row) if row is not None else None

    def touch_token(self, token_id: str) -> None:
        """Record that the token was just used."""
        check_token_id(token_id)
        with self.transaction() as conn:
            conn.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (self.clock(), token_id))

    def revoke_token(self, token_id: str) -> bool:
        """Revoke one token; False if unknown or already revoked."""
        check_token_id(token_id)
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self.clock(), token_id),
            )
        return cur.rowcount == 1

    def revoke_tokens_of(self, owner: str) -> int:
        """Revoke every live token of ``owner``; return how many."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE owner = ? AND revoked_at IS NULL",
                (self.clock(), owner),
            )
        return cur.rowcount

    def list_tokens(self, owner: str | None = None) -> list[TokenRecord]:
        """Tokens (of ``owner``, or all), newest first."""
        if owner is None:
            rows = self._conn().execute("SELECT * FROM tokens ORDER BY created_at DESC").fetchall()
        else:
            rows = (
                self._conn()
                .execute("SELECT * FROM tokens WHERE owner = ? ORDER BY created_at DESC", (owner,))
                .fetchall()
            )
        return [_token(r) for r in rows]

    # ----------------------------------------------------------------- audit

    def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Audit rows matching the filters.

        Without ``after_id``: the newest ``limit`` rows, newest first. With ``after_id``: the rows
        after it, oldest first (to follow the trail).
        """
        _check_limit(limit)
        f = _Filter()
        f.eq("actor", actor)
        f.eq("action", action)
        f.eq("id", None if after_id is None else int(after_id), ">")
        order = "ASC" if after_id is not None else "DESC"
        sql = f"SELECT * FROM audit {f.clause} ORDER BY id {order} LIMIT ?"  # noqa: S608 (fixed fragments)
        rows = self._conn().execute(sql, (*f.params, limit)).fetchall()
        return [_audit(r) for r in rows]

    # ----------------------------------------------------------------- outbox

    def outbox_put(
        self, account: str, message_id: str, recipients: Sequence[str], raw: bytes
    ) -> int:
        """Queue a composed mail for sending now; return its outbox id.

        Idempotent per ``(account, message_id)``: queuing the same message again returns the
        existing id (so a resumed mail does not send its reply twice).
        """
        _check_text("account", account)
        _check_text("message_id", message_id)
        rcpts = [_check_text("recipient", r) for r in recipients]
        if not rcpts:
            raise ValueError("an outbox message needs at least one recipient")
        now = self.clock()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO outbox (account, message_id, recipients, raw, state, attempts, "
                "next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?) "
                "ON CONFLICT (account, message_id) DO NOTHING",
                (account, message_id, _dumps(rcpts), bytes(raw), now, now),
            )
            row = conn.execute(
                "SELECT id FROM outbox WHERE account = ? AND message_id = ?", (account, message_id)
            ).fetchone()
        return int(row[0])

    def outbox_get(self, outbox_id: int) -> OutboxRecord | None:
        row = self._conn().execute("SELECT * FROM outbox WHERE id = ?", (int(outbox_id),)).fetchone()
        return _outbox(row) if row is not None else None

    def outbox_due(self, now: float | None = None, *, limit: int = 50) -> list[OutboxRecord]:
        """Pending messages whose next attempt is due at ``now`` (default: the clock), oldest first."""
        _check_limit(limit)
        when = self.clock() if now is None else now
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id LIMIT ?",
                (when, limit),
            )
            .fetchall()
        )
        return [_outbox(r) for r in rows]

    def outbox_mark_sent(self, outbox_id: int) -> bool:
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1, last_error = NULL "
                "WHERE id = ? AND state = 'pending'",
                (self.clock(), int(outbox_id)),
            )
        return cur.rowcount == 1

    def outbox_mark_failed(self, outbox_id: int, error: str, *, retry_at: float | None = None) -> bool:
        """Count a failed attempt. With ``retry_at`` it stays pending until then; else it gives up."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, "
                "state = CASE WHEN ? IS NULL THEN 'failed' ELSE 'pending' END, "
                "next_attempt_at = coalesce(?, next_attempt_at) "
                "WHERE id = ? AND state = 'pending'",
                (error, retry_at, retry_at, int(outbox_id)),
            )
        return cur.rowcount == 1
