"""The job manager: one model for playbook, adhoc, exec and pty jobs.

Doors ask the manager, never an engine. The manager owns what every job shares: the record in
SQLite, events with sequence numbers and cursors, queueing with global, per-host and
per-execution-node concurrency limits (counted in the store, so every Carrier process shares them),
cancel, wait, and surviving a restart. What a kind of job actually does lives in an **engine**
(``Engine`` below):

- ``prepare(request)`` checks a request and says what the job targets (hosts, spec), or how it ends
  at once (``Submission.outcome``, e.g. a missing playbook);
- ``start(ctx)`` runs the job to its end in a manager thread and returns an ``Outcome``; it watches
  ``ctx.cancel`` and, if the engine is ``detachable``, ``ctx.detach`` (the manager is closing: leave
  the run going and return None);
- ``resume(ctx)`` re-attaches after a restart (or returns a ``lost`` outcome);
- ``cancel_orphan(job, run)`` stops a run nobody supervises (its Carrier died).

Supervision: each unfinished job names the Carrier process watching it (pid + start time). A
manager started with ``adopt=True`` (``carrier serve``) takes over jobs whose supervisor is gone:
queued ones are queued again, running ones are resumed by their engine. ``close()`` hands its jobs
back (detachable runs keep going), so a restart loses no job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from carrier.errors import CarrierError
from carrier.jobs.errors import JobError, JobNotFound
from carrier.store import (
    FINAL_JOB_STATUSES,
    JOB_KINDS,
    EventRecord,
    JobRecord,
    Store,
    approvals,
    check_job_id,
    jobruns,
)
from carrier.store.jobruns import JobRunRecord

log = logging.getLogger(__name__)

DEFAULT_POLL = 0.2
ADOPT_INTERVAL = 5.0
#: How often a manager renews the lease on the jobs it watches, and after how long without a
#: renewal another machine's instance takes them over (same machine: the pid tells at once).
HEARTBEAT_INTERVAL = 5.0
JOB_LEASE_TTL = 30.0
DEFAULT_KEEP_RUNS = 200
#: Event types never slimmed by the output budget (they carry the verdict).
_ALWAYS_KEPT = ("job.queued", "job.started", "job.finished", "job.cancel", "output.truncated",
                "ansible.playbook_on_stats")
_BULKY = ("stdout", "stderr", "res", "output", "screen")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended. ``reason`` is a stable code (ok, task_failed, unreachable, syntax_error,
    missing_playbook, timeout, cancelled, failed, lost, error); ``message`` one readable sentence."""

    status: str
    reason: str
    message: str
    rc: int | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Submission:
    """What ``Engine.prepare`` made of a request."""

    target: str
    spec: Mapping[str, Any]
    hosts: tuple[str, ...]
    #: Set when the job ends before it runs (it is still recorded, with this outcome).
    outcome: Outcome | None = None


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the doors show it."""

    id: str
    kind: str
    owner: str
    door: str
    target: str
    status: str
    reason: str
    message: str
    rc: int | None
    hosts: tuple[str, ...]
    spec: Mapping[str, Any]
    summary: Mapping[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    cursor: int
    #: The job's approval (state, requester, role of the approvers, needed, votes), when it needs one.
    approval: Mapping[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL_JOB_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "owner": self.owner, "door": self.door,
            "target": self.target, "status": self.status, "reason": self.reason,
            "message": self.message, "rc": self.rc, "hosts": list(self.hosts), "spec": dict(self.spec),
            "summary": dict(self.summary), "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "cursor": self.cursor,
            **({"approval": dict(self.approval)} if self.approval is not None else {}),
        }


#: The status shown for a queued job whose approval is pending (the store keeps it ``queued``).
AWAITING_APPROVAL = "awaiting_approval"


def _view(job: JobRecord, run: JobRunRecord | None,
          approval: approvals.ApprovalRecord | None = None) -> JobView:
    status = job.status
    shown: dict[str, Any] | None = None
    if approval is not None:
        if approval.state == "pending" and status == "queued":
            status = AWAITING_APPROVAL
        shown = {"state": approval.state, "requester": approval.requester, "by": approval.by_role,
                 "needed": approval.needed, "approvals": approval.approvals,
                 "votes": [{"approver": v.approver, "vote": v.vote, "at": v.at} for v in approval.votes],
                 "expires_at": approval.expires_at}
    return JobView(
        id=job.id, kind=job.kind, owner=job.owner, door=job.door, target=job.target,
        status=status, reason=run.reason if run else "", message=job.message, rc=job.rc,
        hosts=run.hosts if run else (), spec=job.spec, summary=run.summary if run else {},
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        cursor=job.last_seq, approval=shown,
    )


# --------------------------------------------------------------------------- the engine protocol


class Engine(Protocol):
    """What the manager drives; one engine per job kind (see the module docstring)."""

    kind: str
    #: True when a run outlives Carrier (a detached process) and can be resumed after a restart.
    detachable: bool

    def prepare(self, request: Mapping[str, Any]) -> Submission: ...

    def start(self, ctx: JobContext) -> Outcome | None: ...

    def resume(self, ctx: JobContext) -> Outcome | None: ...

    def cancel_orphan(self, job: JobRecord, run: JobRunRecord) -> bool: ...


class JobContext:
    """What an engine gets for one job: the records, its private directory, events, cancel/detach."""

    def __init__(self, manager: Manager, job: JobRecord, run: JobRunRecord) -> None:
        self.manager = manager
        self.store = manager.store
        self.job = job
        self.run = run
        self.run_dir = Path(run.run_dir) if run.run_dir else manager.run_dir_of(job.id)
        self.cancel = threading.Event()
        self.detach = threading.Event()
        self.cancelled_by: str | None = None
        self.output_budget = manager.output_max_bytes
        self._lock = threading.Lock()
        self._used = jobruns.event_bytes(self.store, job.id)
        self._truncated = self._used >= self.output_budget

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.run.hosts

    def _budgeted(
        self, events: Sequence[tuple[str, Mapping[str, Any] | None]]
    ) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        with self._lock:
            for type_, data in events:
                payload = dict(data or {})
                size = len(json.dumps(payload, default=str))
                if type_ not in _ALWAYS_KEPT and self._used + size > self.output_budget:
                    if not self._truncated:
                        self._truncated = True
                        out.append(("output.truncated", {
                            "message": f"output limit of {self.output_budget} bytes reached: "
                                       "later events are kept without their output",
                            "limit": self.output_budget,
                        }))
                    payload = _slim(payload)
                    size = len(json.dumps(payload, default=str))
                self._used += size
                out.append((type_, payload))
        return out

    def emit(self, type_: str, data: Mapping[str, Any] | None = None) -> int:
        """Append one event (within the job's output budget); return its sequence number."""
        return self.store.append_events(self.job.id, self._budgeted([(type_, data)]))[-1]

    def ingest(self, events: Sequence[tuple[str, Mapping[str, Any] | None]], cursor: int) -> None:
        """Append events read from an engine's own stream and move the ingest cursor, atomically."""
        jobruns.append_with_cursor(self.store, self.job.id, self._budgeted(events), cursor)
        self.run = _replace_cursor(self.run, cursor)

    def set_process(self, pid: int, start: str) -> None:
        """Record the detached process running this job (found again after a restart)."""
        jobruns.update_job_run(self.store, self.job.id, pid=pid, pid_start=start)
        self.run = jobruns.get_job_run(self.store, self.job.id) or self.run


def _slim(payload: Mapping[str, Any]) -> dict[str, Any]:
    """An event without its bulky output; a result keeps its status fields and a short message."""
    out = {k: v for k, v in payload.items() if k not in _BULKY}
    res = payload.get("res")
    if isinstance(res, Mapping):
        small = {k: res[k] for k in ("changed", "failed", "unreachable", "skipped", "rc") if k in res}
        if "msg" in res:
            small["msg"] = str(res["msg"])[:300]
        out["res"] = small
    out["truncated"] = True
    return out


def _replace_cursor(run: JobRunRecord, cursor: int) -> JobRunRecord:
    from dataclasses import replace

    return replace(run, cursor=cursor)


# --------------------------------------------------------------------------- the manager


def _self_supervisor() -> tuple[int, str]:
    from carrier.procid import process_start

    pid = os.getpid()
    return pid, process_start(pid) or "unknown"


def _supervisor_alive(run: JobRunRecord, now: float) -> bool:
    """Whether the job's supervisor runs: by pid on this machine, by its lease (``heartbeat``)
    for an instance on another machine sharing the PostgreSQL store."""
    from carrier.procid import on_this_machine, process_start

    if run.supervisor_pid is None:
        return False
    if not on_this_machine(run.supervisor_start or ""):
        return now - run.updated_at < JOB_LEASE_TTL
    return process_start(run.supervisor_pid) == run.supervisor_start


class Manager:
    """Jobs for one state directory. Thread-safe. ``start()`` begins running queued jobs."""

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        *,
        engines: Sequence[Engine] = (),
        max_jobs: int = 8,
        max_jobs_per_host: int = 2,
        output_max_bytes: int = 1_048_576,
        keep_runs: int = DEFAULT_KEEP_RUNS,
        poll: float = DEFAULT_POLL,
        node_capacity: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.max_jobs = max_jobs
        self.max_jobs_per_host = max_jobs_per_host
        self.output_max_bytes = output_max_bytes
        self.keep_runs = keep_runs
        self.poll = poll
        #: Execution node name -> how many of its jobs may run at once (the rest wait, queued).
        self.node_capacity = dict(node_capacity or {})
        self.engines: dict[str, Engine] = {}
        for engine in engines:
            self.register(engine)
        self._supervisor = _self_supervisor()
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._active: dict[str, JobContext] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._adopt = False
        self._last_adopt = 0.0
        self._last_beat = 0.0
        self._prune_due = False

    # ----------------------------------------------------------------- setup

    def register(self, engine: Engine) -> None:
        """Add the engine for ``engine.kind`` (one of the store's job kinds)."""
        if engine.kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {engine.kind!r}: kinds are {', '.join(JOB_KINDS)}")
        self.engines[engine.kind] = engine

    def run_dir_of(self, job_id: str) -> Path:
        return self.jobs_dir / check_job_id(job_id)

    def start(self, *, adopt: bool = False) -> Manager:
        """Start running queued jobs. With ``adopt``, also take over jobs whose Carrier is gone
        (at once and every few seconds): what ``carrier serve`` does after a restart."""
        if self._loop_thread is not None:
            return self
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._adopt = adopt
        if adopt:
            self.adopt_orphans()
        self._loop_thread = threading.Thread(target=self._loop, name="carrier-jobs", daemon=True)
        self._loop_thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop supervising. Detachable runs keep going and are handed back (another manager adopts
        them); other running jobs are cancelled; queued jobs stay queued for the next manager."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            active = list(self._active.items())
            queued = list(self._queue)
            self._queue.clear()
        for job_id, ctx in active:
            engine = self.engines.get(ctx.job.kind)
            if engine is not None and engine.detachable:
                ctx.detach.set()
            else:
                jobruns.request_cancel(self.store, job_id, "Carrier shutdown")
                ctx.cancelled_by = ctx.cancelled_by or "Carrier shutdown"
                ctx.cancel.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._loop_thread is not None:
            self._loop_thread.join(max(0.0, deadline - time.monotonic()))
        for job_id in [j for j, _ in active] + queued:
            job = self.store.get_job(job_id)
            if job is not None and job.status not in FINAL_JOB_STATUSES:
                jobruns.set_supervisor(self.store, job_id, None, expect=self._supervisor)

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- submit

    def _engine(self, kind: str) -> Engine:
        engine = self.engines.get(kind)
        if engine is None:
            known = ", ".join(sorted(self.engines)) or "none"
            raise JobError(f"this Carrier cannot run {kind} jobs (engines: {known})")
        return engine

    def submit(self, kind: str, request: Mapping[str, Any], *, owner: str, door: str) -> JobView:
        """Check ``request`` with the kind's engine, record the job and queue it.

        Bad input raises a CarrierError before any job exists. A request the engine can only
        answer with a failure (a missing playbook) is recorded as a finished job.
        """
        engine = self._engine(kind)
        submission = engine.prepare(request)
        job = self.store.create_job(kind, owner, door, target=submission.target, spec=dict(submission.spec))
        run_dir = self.run_dir_of(job.id)
        jobruns.create_job_run(self.store, job.id, engine=kind, hosts=submission.hosts, run_dir=str(run_dir),
                               supervisor=self._supervisor)
        self.store.append_event(job.id, "job.queued", {"kind": kind, "target": submission.target,
                                                       "hosts": list(submission.hosts), "owner": owner})
        if submission.outcome is not None:
            self._finish(job.id, submission.outcome)
        else:
            with self._cond:
                self._queue.append(job.id)
                self._cond.notify_all()
        log.info("job submitted", extra={"job": job.id, "kind": kind, "owner": owner, "door": door})
        return self.get(job.id)

    def run_playbook(self, playbook: str, *, owner: str, door: str, **options: Any) -> JobView:
        """A playbook job (options: limit, extra_vars, tags, skip_tags, check, diff, forks, timeout,
        controller)."""
        return self.submit("playbook", {"playbook": playbook, **options}, owner=owner, door=door)

    def run_adhoc(self, module: str, pattern: str, *, owner: str, door: str, **options: Any) -> JobView:
        """An ad-hoc module job (options: args, shell, check, forks, timeout, controller)."""
        return self.submit("adhoc", {"module": module, "pattern": pattern, **options}, owner=owner, door=door)

    def run_exec(self, pattern: str, command: Sequence[str] | str, *, owner: str, door: str,
                 shell: bool = False, timeout: float | None = None, controller: bool = False) -> JobView:
        """An exec job over the ControlPersist fast path (argv unless ``shell``; on the controller's own
        hosts only with ``controller``, which the caller sets when the policy allowed it)."""
        request: dict[str, Any] = {"pattern": pattern, "command": command, "shell": shell,
                                   "controller": controller}
        if timeout is not None:
            request["timeout"] = timeout
        return self.submit("exec", request, owner=owner, door=door)

    # ----------------------------------------------------------------- reads

    def _job(self, job_id: str) -> JobRecord:
        try:
            check_job_id(job_id)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        job = self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}: `carrier jobs` lists the jobs there are")
        return job

    def get(self, job_id: str) -> JobView:
        """The job's status (JobError for a malformed id, JobNotFound for an unknown one)."""
        job = self._job(job_id)
        return _view(job, jobruns.get_job_run(self.store, job.id), approvals.get(self.store, job.id))

    def output(self, job_id: str, cursor: int = 0, limit: int = 500) -> tuple[list[EventRecord], int]:
        """Events after ``cursor`` and the cursor to ask with next (nothing twice, nothing skipped)."""
        job = self._job(job_id)
        if cursor < 0:
            raise JobError(f"cursor must be 0 or more, got {cursor}")
        return self.store.events_since(job.id, cursor, max(1, min(limit, 10_000)))

    def list_jobs(self, *, owner: str | None = None, status: str | Sequence[str] | None = None,
             kind: str | None = None, limit: int = 100) -> list[JobView]:
        """Jobs matching the filters, newest first."""
        try:
            jobs = self.store.list_jobs(owner=owner, status=status, kind=kind, limit=max(1, min(limit, 1000)))
        except ValueError as exc:
            raise JobError(str(exc)) from None
        return [_view(job, jobruns.get_job_run(self.store, job.id), approvals.get(self.store, job.id))
                for job in jobs]

    def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        """Block until the job is finished or ``timeout`` seconds passed; return its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.get(job_id)
            if view.done:
                return view
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return view
            with self._cond:
                # Local jobs notify; jobs run by another process are polled.
                self._cond.wait(self.poll if remaining is None else min(self.poll, remaining))

    def wake(self) -> None:
        """Look at the queue again now (a held job was released)."""
        with self._cond:
            self._cond.notify_all()

    def end_unstarted(self, job_id: str, reason: str, message: str) -> JobView:
        """End a job that has not started (its approval was denied) as cancelled."""
        job = self._job(job_id)
        with self._cond:
            if job.id in self._queue:
                self._queue.remove(job.id)
        self._finish(job.id, Outcome("cancelled", reason, message), expect=("queued",))
        return self.get(job.id)

    def kill(self, job_id: str, *, by: str) -> JobView:
        """Cancel a job: a queued one ends at once, a running one is stopped by its engine."""
        job = self._job(job_id)
        if job.status in FINAL_JOB_STATUSES:
            return self.get(job.id)
        jobruns.request_cancel(self.store, job.id, by)
        if job.status == "queued":
            with self._cond:
                if job.id in self._queue:
                    self._queue.remove(job.id)
            self._finish(job.id, Outcome("cancelled", "cancelled", f"cancelled by {by} before it started"),
                         expect=("queued",))
        with self._cond:
            ctx = self._active.get(job.id)
        if ctx is not None:
            ctx.cancelled_by = ctx.cancelled_by or by
            ctx.cancel.set()
            return self.get(job.id)
        run = jobruns.get_job_run(self.store, job.id)
        current = self.store.get_job(job.id)
        orphan = run is not None and not _supervisor_alive(run, self.store.clock())
        if run is not None and orphan and current is not None and current.status == "running":
            engine = self.engines.get(job.kind)
            # Nobody watches it: stop the run directly; the next manager records the end.
            if engine is None or not engine.cancel_orphan(current, run):
                self._finish(job.id, Outcome("cancelled", "cancelled",
                                             f"cancelled by {by} (no Carrier was watching the job)"))
        return self.get(job.id)

    # ----------------------------------------------------------------- running

    def _finish(self, job_id: str, outcome: Outcome, *, expect: Sequence[str] | None = None) -> bool:
        done = jobruns.finish_job(
            self.store, job_id, status=outcome.status, rc=outcome.rc, message=outcome.message,
            reason=outcome.reason, summary=outcome.summary, expect=expect,
            event=("job.finished", {"status": outcome.status, "reason": outcome.reason,
                                    "message": outcome.message, "rc": outcome.rc,
                                    "summary": dict(outcome.summary)}),
        )
        if done:
            self._prune_due = True
            log.info("job finished",
                     extra={"job": job_id, "status": outcome.status, "reason": outcome.reason})
        with self._cond:
            self._cond.notify_all()
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._dispatch()
                self._watch_cancels()
                if time.monotonic() - self._last_beat >= HEARTBEAT_INTERVAL:
                    self._last_beat = time.monotonic()
                    jobruns.heartbeat(self.store, self._supervisor)
                if self._adopt and time.monotonic() - self._last_adopt >= ADOPT_INTERVAL:
                    self.adopt_orphans()
                if self._prune_due:
                    self._prune_due = False
                    self.prune_runs()
                from carrier.ansible.runner import reap_children

                reap_children()
            except Exception:  # the loop must survive anything one job throws at it
                log.exception("job manager loop error")
            with self._cond:
                if self._stop.is_set():
                    break
                self._cond.wait(self.poll)

    def _dispatch(self) -> None:
        with self._cond:
            queued = list(self._queue)
        for job_id in queued:
            if self._stop.is_set():
                return
            claimed = jobruns.claim_slot(self.store, job_id, max_jobs=self.max_jobs,
                                         max_per_host=self.max_jobs_per_host,
                                         node_capacity=self.node_capacity)
            if claimed:
                with self._cond:
                    if job_id in self._queue:
                        self._queue.remove(job_id)
                self._launch(job_id, resume=False)
                continue
            job = self.store.get_job(job_id)
            if job is not None and job.status == "queued" and approvals.expire_due(self.store, job_id):
                self._finish(job_id, Outcome("cancelled", "approval_expired",
                                             "cancelled: nobody approved it in time"), expect=("queued",))
                job = self.store.get_job(job_id)
            if job is None or job.status != "queued":
                with self._cond:  # cancelled (maybe by another process) or taken over
                    if job_id in self._queue:
                        self._queue.remove(job_id)

    def _watch_cancels(self) -> None:
        """Pass cancel requests recorded in the store (by any process) to the running engines."""
        with self._cond:
            active = list(self._active.items())
        for job_id, ctx in active:
            if ctx.cancel.is_set():
                continue
            by = jobruns.cancel_requested(self.store, job_id)
            if by is not None:
                ctx.cancelled_by = ctx.cancelled_by or by
                ctx.cancel.set()

    def _launch(self, job_id: str, *, resume: bool) -> None:
        job = self.store.get_job(job_id)
        run = jobruns.get_job_run(self.store, job_id)
        if job is None or run is None:
            return
        ctx = JobContext(self, job, run)
        by = jobruns.cancel_requested(self.store, job_id)
        if by is not None:
            ctx.cancelled_by = by
            ctx.cancel.set()
        thread = threading.Thread(target=self._run, args=(ctx, resume), name=f"carrier-job-{job_id}",
                                  daemon=True)
        with self._cond:  # registered and started together: close() never joins an unstarted thread
            self._active[job_id] = ctx
            self._threads[job_id] = thread
            thread.start()

    def _run(self, ctx: JobContext, resume: bool) -> None:
        job_id = ctx.job.id
        outcome: Outcome | None
        try:
            engine = self._engine(ctx.job.kind)
            ctx.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if resume:
                ctx.emit("job.resumed", {"by_pid": self._supervisor[0]})
                outcome = engine.resume(ctx)
            else:
                ctx.emit("job.started", {"hosts": list(ctx.hosts)})
                outcome = engine.start(ctx)
        except CarrierError as exc:
            outcome = Outcome("failed", "error", str(exc))
        except Exception as exc:
            log.exception("job engine error", extra={"job": job_id})
            outcome = Outcome("failed", "error", f"internal error: {type(exc).__name__}: {exc}")
        try:
            if outcome is not None:
                self._finish(job_id, outcome)
        finally:
            with self._cond:
                self._active.pop(job_id, None)
                self._threads.pop(job_id, None)
                self._cond.notify_all()

    # ----------------------------------------------------------------- restart survival

    def adopt_orphans(self) -> list[str]:
        """Take over unfinished jobs whose supervising Carrier process is gone; return their ids."""
        self._last_adopt = time.monotonic()
        taken = []
        for job, run in jobruns.unfinished(self.store, kinds=self.engines):
            with self._cond:
                if job.id in self._active or job.id in self._queue:
                    continue
            if _supervisor_alive(run, self.store.clock()):
                continue
            if not jobruns.set_supervisor(self.store, job.id, self._supervisor,
                                          expect=(run.supervisor_pid, run.supervisor_start)):
                continue  # another manager was faster
            taken.append(job.id)
            log.info("job adopted", extra={"job": job.id, "status": job.status})
            if job.status == "queued":
                with self._cond:
                    self._queue.append(job.id)
                    self._cond.notify_all()
            else:
                self._launch(job.id, resume=True)
        return taken

    def attach(self, job_id: str) -> bool:
        """Take over one job if nobody supervises it (a CLI following a job ``serve`` is not
        running); True when this manager now supervises it. ``close()`` hands it back."""
        job = self._job(job_id)
        run = jobruns.get_job_run(self.store, job.id)
        if job.status in FINAL_JOB_STATUSES or run is None or job.kind not in self.engines:
            return False
        with self._cond:
            if job.id in self._active or job.id in self._queue:
                return True
        if _supervisor_alive(run, self.store.clock()):
            return False
        if not jobruns.set_supervisor(self.store, job.id, self._supervisor,
                                      expect=(run.supervisor_pid, run.supervisor_start)):
            return False
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if job.status == "queued":
            with self._cond:
                self._queue.append(job.id)
                self._cond.notify_all()
        else:
            self._launch(job.id, resume=True)
        return True

    def prune_runs(self) -> int:
        """Delete the private directories of finished jobs beyond the newest ``keep_runs``."""
        removed = 0
        jobs_root = self.jobs_dir.resolve()
        for job_id, run_dir in jobruns.finished_runs_beyond(self.store, self.keep_runs):
            path = Path(run_dir)
            # Only directories Carrier made: <state_dir>/jobs/<valid job id>.
            if path.resolve().parent == jobs_root and path.name == check_job_id(job_id):
                shutil.rmtree(path, ignore_errors=True)
            jobruns.update_job_run(self.store, job_id, run_dir="")
            removed += 1
        return removed

    # ----------------------------------------------------------------- introspection

    def active(self) -> list[str]:
        """Ids of the jobs this manager is running now."""
        with self._cond:
            return sorted(self._active)

    def queued(self) -> list[str]:
        with self._cond:
            return list(self._queue)
