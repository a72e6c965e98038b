"""The job manager with real engines on this machine (no ssh): queueing and limits, events and
cursors, kill, wait, the output budget, bad ids, and restart survival (hand-back, adoption, lost).

``ScriptEngine`` is a small engine for these tests: it runs ``sh`` for real. Its detached mode
starts the script in its own session writing a result file, like the ansible-runner worker does,
so a new manager can re-attach to it by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from carrier.ansible.runner import ProcessId
from carrier.jobs.errors import JobError, JobNotFound
from carrier.jobs.manager import JOB_LEASE_TTL, JobContext, Manager, Outcome, Submission
from carrier.procid import boot_id
from carrier.store import JobRecord, Store, jobruns
from carrier.store.jobruns import JobRunRecord


def until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class ScriptEngine:
    """Runs ``request["script"]`` with sh. ``gate`` (a threading.Event per job name) holds a job
    in ``running`` until the test releases it."""

    def __init__(self, kind: str = "adhoc", *, detachable: bool = False) -> None:
        self.kind = kind
        self.detachable = detachable
        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []

    def prepare(self, request: Mapping[str, Any]) -> Submission:
        if request.get("refuse"):
            from carrier.errors import CarrierError

            raise CarrierError("refused by the engine")
        outcome = None
        if request.get("missing"):
            outcome = Outcome("failed", "missing_playbook", "missing playbook: nope")
        return Submission(target=str(request.get("name", "")), spec=dict(request),
                          hosts=tuple(request.get("hosts", ("h1",))), outcome=outcome)

    def start(self, ctx: JobContext) -> Outcome | None:
        spec = ctx.job.spec
        self.started.append(str(spec.get("name")))
        if spec.get("explode"):
            raise RuntimeError("engine bug")
        for i in range(int(spec.get("events", 0))):
            ctx.emit("work.chunk", {"i": i, "stdout": "x" * int(spec.get("size", 10))})
        gate = self.gates.get(str(spec.get("name")))
        if gate is not None:
            while not gate.wait(0.02):
                if ctx.cancel.is_set():
                    return Outcome("cancelled", "cancelled", f"cancelled by {ctx.cancelled_by}")
        if self.detachable:
            result = ctx.run_dir / "result"
            proc = subprocess.Popen(["sh", "-c", f"{spec.get('script', 'true')}; echo $? > {result}"],
                                    start_new_session=True, stdin=subprocess.DEVNULL)
            ident = ProcessId.of(proc.pid) or ProcessId(proc.pid, "exited already")
            ctx.set_process(ident.pid, ident.start)
            threading.Thread(target=proc.wait, daemon=True).start()  # reap it
            return self._watch(ctx, ident)
        done = subprocess.run(["sh", "-c", str(spec.get("script", "true"))], capture_output=True, text=True,
                              check=False)
        ctx.emit("work.done", {"rc": done.returncode, "stdout": done.stdout})
        if done.returncode:
            return Outcome("failed", "failed", f"exit {done.returncode}", done.returncode)
        return Outcome("succeeded", "ok", "all good", 0)

    def _watch(self, ctx: JobContext, ident: ProcessId) -> Outcome | None:
        while ident.alive():
            if ctx.detach.is_set():
                return None
            if ctx.cancel.is_set():
                os.killpg(ident.pid, signal.SIGTERM)
            time.sleep(0.02)
        result = ctx.run_dir / "result"
        if not result.exists():
            return Outcome("cancelled", "cancelled", "stopped") if ctx.cancel.is_set() else \
                Outcome("lost", "lost", "lost: no result")
        rc = int(result.read_text())
        ctx.emit("work.done", {"rc": rc})
        return Outcome("succeeded" if rc == 0 else "failed", "ok" if rc == 0 else "failed", f"rc {rc}", rc)

    def resume(self, ctx: JobContext) -> Outcome | None:
        assert ctx.run.pid is not None and ctx.run.pid_start is not None
        return self._watch(ctx, ProcessId(ctx.run.pid, ctx.run.pid_start))

    def cancel_orphan(self, job: JobRecord, run: JobRunRecord) -> bool:
        if run.pid is None or run.pid_start is None or not ProcessId(run.pid, run.pid_start).alive():
            return False
        os.killpg(run.pid, signal.SIGTERM)
        return True


@pytest.fixture
def store(tmp_path: Path, store_url: str | None) -> Iterator[Store]:
    s = Store.open(tmp_path / "state", url=store_url)
    yield s
    s.close()


@pytest.fixture
def engine() -> ScriptEngine:
    return ScriptEngine()


@pytest.fixture
def manager(store: Store, tmp_path: Path, engine: ScriptEngine) -> Iterator[Manager]:
    m = Manager(store, tmp_path / "state", engines=[engine], max_jobs=4, max_jobs_per_host=1, poll=0.02)
    m.start()
    yield m
    for gate in engine.gates.values():
        gate.set()
    m.close()


def submit(m: Manager, name: str = "j", **request: Any) -> str:
    return m.submit("adhoc", {"name": name, **request}, owner="alice", door="cli").id


# --------------------------------------------------------------------------- life of a job


def test_a_job_runs_and_its_events_come_in_order(manager: Manager) -> None:
    job_id = submit(manager, script="echo hello", hosts=["h1"])
    view = manager.wait(job_id, 20)
    assert (view.status, view.reason, view.message, view.rc) == ("succeeded", "ok", "all good", 0)
    assert (view.owner, view.door, view.kind, view.hosts) == ("alice", "cli", "adhoc", ("h1",))
    assert view.started_at is not None and view.finished_at is not None
    events, cursor = manager.output(job_id)
    assert [e.type for e in events] == ["job.queued", "job.started", "work.done", "job.finished"]
    assert [e.seq for e in events] == [1, 2, 3, 4] and cursor == 4 == view.cursor
    assert events[2].data == {"rc": 0, "stdout": "hello\n"}
    assert events[3].data["status"] == "succeeded"


def test_reading_by_cursor_sends_nothing_twice_and_skips_nothing(manager: Manager) -> None:
    job_id = submit(manager, events=7)
    manager.wait(job_id, 20)
    seen = []
    cursor = 0
    while True:
        batch, cursor = manager.output(job_id, cursor, limit=3)
        if not batch:
            break
        seen.extend(e.seq for e in batch)
    assert seen == list(range(1, manager.get(job_id).cursor + 1))
    assert manager.output(job_id, cursor) == ([], cursor)


def test_failure_and_engine_errors_end_the_job(manager: Manager) -> None:
    failed = manager.wait(submit(manager, script="exit 3"), 20)
    assert (failed.status, failed.rc, failed.message) == ("failed", 3, "exit 3")
    broken = manager.wait(submit(manager, explode=True), 20)
    assert (broken.status, broken.reason) == ("failed", "error")
    assert broken.message == "internal error: RuntimeError: engine bug"


def test_refused_requests_create_no_job_and_immediate_outcomes_are_recorded(manager: Manager) -> None:
    from carrier.errors import CarrierError

    with pytest.raises(CarrierError, match="refused by the engine"):
        submit(manager, refuse=True)
    assert manager.list_jobs() == []
    view = manager.get(submit(manager, missing=True))
    assert (view.status, view.reason) == ("failed", "missing_playbook")
    assert view.message == "missing playbook: nope"


def test_unknown_kind(manager: Manager) -> None:
    with pytest.raises(JobError, match="cannot run exec jobs"):
        manager.submit("exec", {}, owner="a", door="cli")


# --------------------------------------------------------------------------- ids from outside


@pytest.mark.parametrize("bad", ["../../etc/passwd", "j-../../../tmp", "j-AAAAAAAAAAAA", "", "j-abc", 7])
def test_malformed_job_ids_are_refused_before_any_lookup(manager: Manager, bad: Any) -> None:
    calls = (manager.get, manager.output, lambda j: manager.kill(j, by="x"), manager.wait, manager.attach)
    for call in calls:
        with pytest.raises(JobError, match="invalid job id"):
            call(bad)
    assert not (manager.jobs_dir / "..").resolve().joinpath("etc").exists()


def test_unknown_job(manager: Manager) -> None:
    with pytest.raises(JobNotFound, match="no job j-aaaaaaaaaaaa"):
        manager.get("j-aaaaaaaaaaaa")


# --------------------------------------------------------------------------- limits and queueing


def test_per_host_limit_queues_and_other_hosts_go_ahead(manager: Manager, engine: ScriptEngine) -> None:
    for name in ("a", "b", "c"):
        engine.gates[name] = threading.Event()
    a = submit(manager, "a", hosts=["web1"])
    b = submit(manager, "b", hosts=["web1", "db1"])
    c = submit(manager, "c", hosts=["db2"])
    until(lambda: manager.get(a).status == "running" and manager.get(c).status == "running", what="a and c")
    assert manager.get(b).status == "queued"  # web1 is busy (max 1 per host)
    engine.gates["a"].set()
    until(lambda: manager.get(b).status == "running", what="b to start after a")
    engine.gates["b"].set()
    engine.gates["c"].set()
    for job in (a, b, c):
        assert manager.wait(job, 20).status == "succeeded"
    assert sorted(engine.started[:2]) == ["a", "c"] and engine.started[2] == "b"


def test_global_limit(store: Store, tmp_path: Path) -> None:
    engine = ScriptEngine()
    m = Manager(store, tmp_path / "state", engines=[engine], max_jobs=2, max_jobs_per_host=10, poll=0.02)
    m.start()
    try:
        names = [f"g{i}" for i in range(4)]
        for name in names:
            engine.gates[name] = threading.Event()
        ids = [submit(m, name, hosts=[name]) for name in names]
        until(lambda: [m.get(j).status for j in ids].count("running") == 2, what="two running")
        time.sleep(0.2)
        assert [m.get(j).status for j in ids] == ["running", "running", "queued", "queued"]
        for name in names:
            engine.gates[name].set()
        assert all(m.wait(j, 20).status == "succeeded" for j in ids)
    finally:
        m.close()


def test_limits_are_shared_by_managers_on_one_store(store: Store, tmp_path: Path) -> None:
    e1, e2 = ScriptEngine(), ScriptEngine()
    m1 = Manager(store, tmp_path / "state", engines=[e1], max_jobs=5, max_jobs_per_host=1, poll=0.02).start()
    m2 = Manager(store, tmp_path / "state", engines=[e2], max_jobs=5, max_jobs_per_host=1, poll=0.02).start()
    try:
        e1.gates["one"] = threading.Event()
        first = submit(m1, "one", hosts=["web1"])
        until(lambda: m1.get(first).status == "running", what="first running")
        second = submit(m2, "two", hosts=["web1"])
        time.sleep(0.3)
        assert m2.get(second).status == "queued"
        e1.gates["one"].set()
        assert m2.wait(second, 20).status == "succeeded"
    finally:
        m1.close()
        m2.close()


# --------------------------------------------------------------------------- kill and wait


def test_kill_a_queued_job_ends_it_at_once(manager: Manager, engine: ScriptEngine) -> None:
    engine.gates["busy"] = threading.Event()
    busy = submit(manager, "busy", hosts=["web1"])
    until(lambda: manager.get(busy).status == "running")
    waiting = submit(manager, "waiting", hosts=["web1"])
    view = manager.kill(waiting, by="bob")
    assert (view.status, view.reason) == ("cancelled", "cancelled")
    assert view.message == "cancelled by bob before it started"
    engine.gates["busy"].set()
    manager.wait(busy, 20)
    assert "waiting" not in engine.started


def test_kill_a_running_job(manager: Manager, engine: ScriptEngine) -> None:
    engine.gates["long"] = threading.Event()
    job = submit(manager, "long")
    until(lambda: manager.get(job).status == "running")
    manager.kill(job, by="bob")
    view = manager.wait(job, 20)
    assert (view.status, view.message) == ("cancelled", "cancelled by bob")
    again = manager.kill(job, by="carol")  # already final: nothing changes
    assert again.message == "cancelled by bob"


def test_kill_from_another_manager_reaches_the_running_engine(
    manager: Manager, engine: ScriptEngine, store: Store, tmp_path: Path
) -> None:
    engine.gates["far"] = threading.Event()
    job = submit(manager, "far")
    until(lambda: manager.get(job).status == "running")
    other = Manager(store, tmp_path / "state", engines=[ScriptEngine()])  # a CLI process, say
    other.kill(job, by="cli:root")
    assert manager.wait(job, 20).message == "cancelled by cli:root"


def test_wait_returns_the_current_state_after_its_timeout(manager: Manager, engine: ScriptEngine) -> None:
    engine.gates["slow"] = threading.Event()
    job = submit(manager, "slow")
    view = manager.wait(job, timeout=0.1)
    assert view.status in ("queued", "running") and not view.done


def test_list_filters(manager: Manager, store: Store) -> None:
    a = submit(manager, script="true")
    b = submit(manager, script="exit 1")
    manager.wait(a, 20)
    manager.wait(b, 20)
    other = manager.submit("adhoc", {"name": "x"}, owner="zed", door="mail").id
    manager.wait(other, 20)
    assert [v.id for v in manager.list_jobs()] == [other, b, a]
    assert [v.id for v in manager.list_jobs(owner="alice")] == [b, a]
    assert [v.id for v in manager.list_jobs(status="failed")] == [b]
    assert manager.list_jobs(kind="exec") == []
    with pytest.raises(JobError, match="invalid job status"):
        manager.list_jobs(status="weird")


# --------------------------------------------------------------------------- output budget


def test_output_beyond_the_budget_is_kept_without_its_bulk(store: Store, tmp_path: Path) -> None:
    m = Manager(store, tmp_path / "state", engines=[ScriptEngine()], output_max_bytes=5000, poll=0.02).start()
    try:
        job = submit(m, events=20, size=1000)
        assert m.wait(job, 20).status == "succeeded"
        events, _ = m.output(job, 0, 1000)
    finally:
        m.close()
    chunks = [e for e in events if e.type == "work.chunk"]
    assert len(chunks) == 20  # every event is kept...
    full = [e for e in chunks if "stdout" in e.data]
    assert 1 <= len(full) <= 5
    assert all(e.data.get("truncated") is True for e in chunks[len(full):])  # ...later ones slim
    marks = [e for e in events if e.type == "output.truncated"]
    assert len(marks) == 1 and "5000 bytes" in marks[0].data["message"]
    assert events[-1].type == "job.finished"


# --------------------------------------------------------------------------- restart survival


def test_close_hands_back_a_detached_run_and_a_new_manager_finishes_it(store: Store, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = Manager(store, state, engines=[ScriptEngine(detachable=True)], poll=0.02).start()
    flag = tmp_path / "go"
    job = submit(first, script=f"while [ ! -e {flag} ]; do sleep 0.02; done")
    until(lambda: (jobruns.get_job_run(store, job) or _no_run()).pid is not None, what="process recorded")
    first.close()  # Carrier stops: the run keeps going
    run = jobruns.get_job_run(store, job)
    assert run is not None and run.supervisor_pid is None
    assert store.get_job(job).status == "running"  # type: ignore[union-attr]
    second = Manager(store, state, engines=[ScriptEngine(detachable=True)], poll=0.02)
    second.start(adopt=True)
    try:
        assert second.active() == [job]
        flag.touch()
        view = second.wait(job, 20)
        assert (view.status, view.message) == ("succeeded", "rc 0")
        types = [e.type for e in second.output(job)[0]]
        assert types == ["job.queued", "job.started", "job.resumed", "work.done", "job.finished"]
    finally:
        second.close()


def _no_run() -> JobRunRecord:
    raise AssertionError("no run row")


def test_jobs_of_a_dead_carrier_are_adopted(store: Store, tmp_path: Path) -> None:
    state = tmp_path / "state"
    engine = ScriptEngine(detachable=True)
    queued_only = Manager(store, state, engines=[engine])  # never started: its job stays queued
    queued = submit(queued_only, script="true")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # The process that supervised the job is gone (its pid no longer runs on this machine).
    jobruns.set_supervisor(store, queued, (dead.pid, f"{boot_id()}/0"))
    m = Manager(store, state, engines=[engine], poll=0.02)
    m.start(adopt=True)
    try:
        assert m.wait(queued, 20).status == "succeeded"
    finally:
        m.close()


def test_another_machines_supervisor_is_judged_by_its_lease(store: Store, tmp_path: Path) -> None:
    """An instance on another machine (another boot id: its pid means nothing here) keeps its
    job while it renews the lease; once the lease is older than JOB_LEASE_TTL the job is taken over."""
    state = tmp_path / "state"
    engine = ScriptEngine(detachable=True)
    queued = submit(Manager(store, state, engines=[engine]), script="true")
    remote = (os.getpid(), "another-machines-boot-id/12345")
    jobruns.set_supervisor(store, queued, remote)
    assert jobruns.heartbeat(store, remote) == 1
    m = Manager(store, state, engines=[engine], poll=0.02)
    assert m.adopt_orphans() == []  # its lease is fresh
    with store.transaction() as conn:  # the remote instance stopped renewing a while ago
        conn.execute("UPDATE job_runs SET updated_at = ? WHERE job_id = ?",
                     (time.time() - JOB_LEASE_TTL - 1, queued))
    m.start(adopt=True)
    try:
        assert m.wait(queued, 20).status == "succeeded"
        run = jobruns.get_job_run(store, queued)
        assert run is not None and run.supervisor_pid == os.getpid() and run.supervisor_start != remote[1]
    finally:
        m.close()


def test_a_live_supervisor_keeps_its_jobs(manager: Manager, engine: ScriptEngine, store: Store,
                                          tmp_path: Path) -> None:
    engine.gates["mine"] = threading.Event()
    job = submit(manager, "mine")
    until(lambda: manager.get(job).status == "running")
    thief = Manager(store, tmp_path / "state", engines=[ScriptEngine()], poll=0.02)
    assert thief.adopt_orphans() == []
    assert thief.attach(job) is False


def test_an_in_process_job_whose_carrier_died_is_lost(store: Store, tmp_path: Path) -> None:
    state = tmp_path / "state"

    class InProcess(ScriptEngine):
        def resume(self, ctx: JobContext) -> Outcome | None:
            return Outcome("lost", "lost", "lost: Carrier stopped while it ran")

    m0 = Manager(store, state, engines=[InProcess()])
    job = submit(m0, script="true")
    assert jobruns.claim_slot(store, job, max_jobs=1, max_per_host=1)  # it was running...
    jobruns.set_supervisor(store, job, None)  # ...when its Carrier died
    m = Manager(store, state, engines=[InProcess()], poll=0.02).start(adopt=True)
    try:
        view = m.wait(job, 20)
    finally:
        m.close()
    assert (view.status, view.reason, view.message) == ("lost", "lost", "lost: Carrier stopped while it ran")


def test_a_non_detachable_job_is_cancelled_when_its_manager_closes(store: Store, tmp_path: Path) -> None:
    engine = ScriptEngine()
    m = Manager(store, tmp_path / "state", engines=[engine], poll=0.02).start()
    engine.gates["inproc"] = threading.Event()
    job = submit(m, "inproc")
    until(lambda: m.get(job).status == "running")
    m.close()
    view = Manager(store, tmp_path / "state").get(job)
    assert (view.status, view.message) == ("cancelled", "cancelled by Carrier shutdown")


def test_kill_an_orphaned_detached_run(store: Store, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = Manager(store, state, engines=[ScriptEngine(detachable=True)], poll=0.02).start()
    job = submit(first, script="sleep 30")
    until(lambda: (jobruns.get_job_run(store, job) or _no_run()).pid is not None)
    first.close()
    run = jobruns.get_job_run(store, job)
    assert run is not None and run.pid is not None and run.pid_start is not None
    worker = ProcessId(run.pid, run.pid_start)
    cli = Manager(store, state, engines=[ScriptEngine(detachable=True)])
    cli.kill(job, by="cli:root")  # nobody supervises: the engine stops the process itself
    until(lambda: not worker.alive(), what="the orphaned run to stop")
    later = Manager(store, state, engines=[ScriptEngine(detachable=True)], poll=0.02).start(adopt=True)
    try:
        assert later.wait(job, 20).status == "cancelled"
    finally:
        later.close()


# --------------------------------------------------------------------------- housekeeping


def test_old_run_directories_are_pruned(store: Store, tmp_path: Path) -> None:
    m = Manager(store, tmp_path / "state", engines=[ScriptEngine()], keep_runs=2, poll=0.02).start()
    try:
        ids = [submit(m, f"p{i}") for i in range(4)]
        for job in ids:
            m.wait(job, 20)
        until(lambda: sum(m.run_dir_of(j).exists() for j in ids) == 2, what="pruning")
    finally:
        m.close()
    assert [m.run_dir_of(j).exists() for j in ids] == [False, False, True, True]
    assert jobruns.get_job_run(store, ids[0]).run_dir == ""  # type: ignore[union-attr]
