"""SQL for the job manager (``carrier.jobs``): how each job runs, concurrency slots, cancel requests,
supervision after a restart, and the final status written with its last event.

The table comes from schema migration 3 (``job_runs``, one row per job handed to an engine). Writes
run in ``store.transaction()`` (``BEGIN IMMEDIATE``), so a slot claim, a cursor move with its
events, or a supervisor take-over is atomic across threads and processes. Reads use the calling
thread's connection directly (they are polled often and must not take the write lock).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from carrier.store import schema
from carrier.store.db import KEEP, Store, _Keep, check_job_id
from carrier.store.records import JobRecord


@dataclass(frozen=True, slots=True)
class JobRunRecord:
    job_id: str
    engine: str
    hosts: tuple[str, ...]
    run_dir: str
    #: The process running the job detached (a worker), with its start identity.
    pid: int | None
    pid_start: str | None
    #: Engine-specific position of what was already turned into events (runner event counter).
    cursor: int
    reason: str
    summary: dict[str, Any]
    cancel_at: float | None
    cancel_by: str | None
    #: The Carrier process watching the job (None: nobody; a live manager may adopt it).
    supervisor_pid: int | None
    supervisor_start: str | None
    updated_at: float


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _run(row: Any) -> JobRunRecord:
    hosts = json.loads(row["hosts"])
    summary = json.loads(row["summary"])
    return JobRunRecord(
        job_id=row["job_id"],
        engine=row["engine"],
        hosts=tuple(str(h) for h in hosts) if isinstance(hosts, list) else (),
        run_dir=row["run_dir"],
        pid=row["pid"],
        pid_start=row["pid_start"],
        cursor=row["cursor"],
        reason=row["reason"],
        summary=summary if isinstance(summary, dict) else {},
        cancel_at=row["cancel_at"],
        cancel_by=row["cancel_by"],
        supervisor_pid=row["supervisor_pid"],
        supervisor_start=row["supervisor_start"],
        updated_at=row["updated_at"],
    )


def create_job_run(
    store: Store,
    job_id: str,
    *,
    engine: str,
    hosts: Sequence[str],
    run_dir: str,
    supervisor: tuple[int, str] | None,
) -> None:
    check_job_id(job_id)
    pid, start = supervisor if supervisor is not None else (None, None)
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO job_runs (job_id, engine, hosts, run_dir, supervisor_pid, supervisor_start, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, engine, _dumps(list(hosts)), run_dir, pid, start, store.clock()),
        )


def get_job_run(store: Store, job_id: str) -> JobRunRecord | None:
    check_job_id(job_id)
    row = store._conn().execute("SELECT * FROM job_runs WHERE job_id = ?", (job_id,)).fetchone()
    return _run(row) if row is not None else None


def update_job_run(
    store: Store,
    job_id: str,
    *,
    pid: int | _Keep | None = KEEP,
    pid_start: str | _Keep | None = KEEP,
    cursor: int | _Keep = KEEP,
    reason: str | _Keep = KEEP,
    summary: Mapping[str, Any] | _Keep = KEEP,
    run_dir: str | _Keep = KEEP,
) -> bool:
    check_job_id(job_id)
    sets = ["updated_at = ?"]
    params: list[Any] = [store.clock()]
    columns: dict[str, Any] = {"pid": pid, "pid_start": pid_start, "cursor": cursor, "reason": reason,
                               "run_dir": run_dir}
    for column, value in columns.items():
        if value is not KEEP:
            sets.append(f"{column} = ?")
            params.append(value)
    if not isinstance(summary, _Keep):
        sets.append("summary = ?")
        params.append(_dumps(dict(summary)))
    with store.transaction(lock=None) as conn:  # one row by key: its row lock is enough
        cur = conn.execute(f"UPDATE job_runs SET {', '.join(sets)} WHERE job_id = ?", (*params, job_id))  # noqa: S608
    return cur.rowcount == 1


def _node_of(spec_text: str | None) -> str | None:
    """The execution node a job's spec names (``spec.node``), read in Python: no dialect's JSON
    functions in SQL."""
    try:
        spec = json.loads(spec_text or "{}")
    except ValueError:
        return None
    node = spec.get("node") if isinstance(spec, dict) else None
    return str(node) if node else None


def running_on_nodes(store: Store) -> dict[str, list[str]]:
    """Running jobs per execution node (node name -> job ids, oldest first)."""
    rows = store._conn().execute(
        "SELECT id, spec FROM jobs WHERE status = 'running' AND kind IN ('playbook', 'adhoc') "
        "ORDER BY created_at"
    ).fetchall()
    out: dict[str, list[str]] = {}
    for row in rows:
        node = _node_of(row["spec"])
        if node is not None:
            out.setdefault(node, []).append(str(row["id"]))
    return out


def claim_slot(store: Store, job_id: str, *, max_jobs: int, max_per_host: int,
               node_capacity: Mapping[str, int] | None = None) -> bool:
    """Move a queued job to ``running`` if a global slot, a slot on each of its hosts and, for a job
    placed on an execution node, a slot on that node (``node_capacity``) are free.

    Counts every running job in the store (all Carrier processes share the limits). On PostgreSQL
    the claim takes the store-wide lock like any write (so the counts stay exact, and a job whose
    creating transaction has not committed yet is waited for, not missed) and the job's row
    ``FOR UPDATE SKIP LOCKED``: a job another instance holds locked right now is passed over.
    """
    check_job_id(job_id)
    sql = "SELECT j.status, j.spec, r.hosts FROM jobs j JOIN job_runs r ON r.job_id = j.id WHERE j.id = ?"
    with store.transaction() as conn:
        row = conn.execute(sql + store.skip_locked("j"), (job_id,)).fetchone()
        if row is None or row["status"] != "queued":
            return False
        held = conn.execute("SELECT 1 FROM approvals WHERE job_id = ? AND state = 'pending'",
                            (job_id,)).fetchone()
        if held is not None:  # waits for its approvers (store/approvals.py)
            return False
        total = conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0]
        if total >= max_jobs:
            return False
        busy = conn.execute(
            "SELECT count(*) FROM jobs j JOIN job_runs r ON r.job_id = j.id, json_each(r.hosts) h "
            "WHERE j.status = 'running' AND h.value IN (SELECT value FROM json_each(?)) "
            "GROUP BY h.value HAVING count(*) >= ? LIMIT 1",
            (row["hosts"], max_per_host),
        ).fetchone()
        if busy is not None:
            return False
        node = _node_of(row["spec"])
        if node is not None and node_capacity and node in node_capacity:
            running = conn.execute(
                "SELECT spec FROM jobs WHERE status = 'running' AND kind IN ('playbook', 'adhoc')"
            ).fetchall()
            if sum(_node_of(r["spec"]) == node for r in running) >= node_capacity[node]:
                return False
        now = store.clock()
        conn.execute(
            "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?) "
            "WHERE id = ? AND status = 'queued'",
            (now, job_id),
        )
        conn.execute("UPDATE job_runs SET updated_at = ? WHERE job_id = ?", (now, job_id))
    return True


def request_cancel(store: Store, job_id: str, by: str) -> bool:
    """Record that ``by`` asked to cancel the job (the first request wins); True if recorded now."""
    check_job_id(job_id)
    with store.transaction() as conn:
        cur = conn.execute(
            "UPDATE job_runs SET cancel_at = ?, cancel_by = ?, updated_at = ? "
            "WHERE job_id = ? AND cancel_at IS NULL",
            (store.clock(), by, store.clock(), job_id),
        )
    return cur.rowcount == 1


def cancel_requested(store: Store, job_id: str) -> str | None:
    """Who asked to cancel the job, or None (a cheap read, polled while a job runs)."""
    row = store._conn().execute(
        "SELECT cancel_at, cancel_by FROM job_runs WHERE job_id = ?", (job_id,)
    ).fetchone()
    if row is None or row["cancel_at"] is None:
        return None
    return str(row["cancel_by"] or "someone")


def set_supervisor(
    store: Store,
    job_id: str,
    supervisor: tuple[int, str] | None,
    *,
    expect: tuple[int | None, str | None] | None = None,
) -> bool:
    """Make ``supervisor`` watch the job; with ``expect``, only if the current one is that (CAS)."""
    check_job_id(job_id)
    pid, start = supervisor if supervisor is not None else (None, None)
    sql = "UPDATE job_runs SET supervisor_pid = ?, supervisor_start = ?, updated_at = ? WHERE job_id = ?"
    params: list[Any] = [pid, start, store.clock(), job_id]
    if expect is not None:
        sql += " AND supervisor_pid IS ? AND supervisor_start IS ?"
        params += [expect[0], expect[1]]
    with store.transaction() as conn:
        cur = conn.execute(sql, params)
    return cur.rowcount == 1


def heartbeat(store: Store, supervisor: tuple[int, str]) -> int:
    """Renew the lease of every unfinished job ``supervisor`` watches (``updated_at`` = now).

    Instances on other machines cannot look up this process's pid: they judge it by this lease
    (``carrier.jobs.manager``) and take its jobs over once it has not been renewed for a while.
    """
    with store.transaction(lock=None) as conn:
        return conn.execute(
            "UPDATE job_runs SET updated_at = ? WHERE supervisor_pid = ? AND supervisor_start = ? "
            "AND job_id IN (SELECT id FROM jobs WHERE status IN ('queued', 'running'))",
            (store.clock(), supervisor[0], supervisor[1]),
        ).rowcount


def unfinished(store: Store, kinds: Iterable[str] | None = None) -> list[tuple[JobRecord, JobRunRecord]]:
    """Queued and running jobs with their run rows, oldest first."""
    from carrier.store.db import _job

    rows = store._conn().execute(
        "SELECT j.* FROM jobs j JOIN job_runs r ON r.job_id = j.id "
        "WHERE j.status IN ('queued', 'running') ORDER BY j.created_at, j.rowid"
    ).fetchall()
    wanted = set(kinds) if kinds is not None else None
    out = []
    for row in rows:
        job = _job(row)
        if wanted is not None and job.kind not in wanted:
            continue
        run = get_job_run(store, job.id)
        if run is not None:
            out.append((job, run))
    return out


def append_with_cursor(
    store: Store, job_id: str, events: Sequence[tuple[str, Mapping[str, Any] | None]], cursor: int
) -> list[int]:
    """Append events and move the run's ingest cursor in one transaction (no event twice)."""
    with store.transaction(lock=None):  # row locks (job, job_run) only: ingestion is the hot path
        seqs = store.append_events(job_id, events)
        update_job_run(store, job_id, cursor=cursor)
    return seqs


def event_bytes(store: Store, job_id: str) -> int:
    """Bytes of event data kept for a job (its share of the output budget)."""
    check_job_id(job_id)
    row = store._conn().execute(
        "SELECT coalesce(sum(length(data)), 0) FROM job_events WHERE job_id = ?", (job_id,)
    ).fetchone()
    return int(row[0])


def finish_job(
    store: Store,
    job_id: str,
    *,
    status: str,
    rc: int | None,
    message: str,
    reason: str,
    summary: Mapping[str, Any],
    event: tuple[str, Mapping[str, Any]] | None = None,
    expect: Sequence[str] | None = None,
) -> bool:
    """Final status, reason, summary and the closing event, together; False if already final
    (or, with ``expect``, when the current status is not one of those)."""
    if status not in schema.FINAL_JOB_STATUSES:
        raise ValueError(f"{status!r} is not a final job status")
    with store.transaction() as conn:
        # Lock the job's row first (PostgreSQL): a claim running now cannot change it under us.
        conn.execute("SELECT status FROM jobs WHERE id = ?" + store.for_update, (job_id,))  # noqa: S608
        current = store.get_job(job_id)
        if current is None or current.status in schema.FINAL_JOB_STATUSES:
            return False
        if expect is not None and current.status not in expect:
            return False
        if event is not None:
            store.append_events(job_id, [event])
        update_job_run(store, job_id, reason=reason, summary=summary)
        return store.update_job_status(job_id, status, rc=rc, message=message)


def finished_runs_beyond(store: Store, keep: int) -> list[tuple[str, str]]:
    """``(job_id, run_dir)`` of finished jobs older than the newest ``keep`` that still have a dir."""
    marks = ", ".join("?" for _ in schema.FINAL_JOB_STATUSES)
    sql = (
        "SELECT r.job_id, r.run_dir FROM job_runs r JOIN jobs j ON j.id = r.job_id "  # noqa: S608 (placeholders)
        f"WHERE j.status IN ({marks}) AND r.run_dir != '' "
        "ORDER BY j.created_at DESC, j.rowid DESC LIMIT -1 OFFSET ?"
    )
    rows = store._conn().execute(sql, (*schema.FINAL_JOB_STATUSES, max(0, keep))).fetchall()
    return [(str(r["job_id"]), str(r["run_dir"])) for r in rows]
