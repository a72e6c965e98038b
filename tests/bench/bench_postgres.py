"""PostgreSQL store (issue 14): SQLite vs PostgreSQL for event ingestion, and N concurrent short
jobs on one, two and three Carrier instances sharing a PostgreSQL store.

Ingestion: the same job events through the same code (``Store.append_event`` and
``Store.append_events``) on a SQLite store (WAL, synchronous=NORMAL: the embedded default) and on a
PostgreSQL store (the sandbox's cluster on loopback, default durability: a commit waits for the
WAL flush), rounds alternating.

Throughput: ``JOBS`` exec jobs (``true`` over the ssh master on web1/web2/db1) submitted at once
and run to the end, by one instance, then by two and by three instances (separate processes, each
with its own state directory, on one fresh PostgreSQL schema per side; each submits its share, as
instances each taking a share of the mail would). The store-wide limits (``MAX_JOBS``,
``PER_HOST``) are the same on every side; sides alternate after a warm-up of each instance's ssh
masters.

Starts its own sandbox with PostgreSQL (port offset 400 + CARRIER_TEST_PORT_OFFSET, under
/var/tmp) and destroys it.
``python tests/bench/bench_postgres.py instance ...`` is the child an instance runs in.
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from timing_support import alternate, timed

PORT_OFFSET = 400 + int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
EVENTS = 1000
ROUNDS = 5
JOBS = 48
JOB_ROUNDS = 3
INSTANCES = (1, 2, 3)
MAX_JOBS = 8
PER_HOST = 4
HOSTS = ("web1", "web2", "db1")


def _fresh_url(base: str) -> str:
    """A URL whose search_path is a new, empty schema."""
    import psycopg

    schema = f"b_{secrets.token_hex(4)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[arg-type]  # a generated name
    return f"{base}?options=-csearch_path%3D{schema}"


# --------------------------------------------------------------------------- ingestion


def _ingest_round(store: object, batch: bool) -> Callable[[], None]:
    from carrier.store import Store

    assert isinstance(store, Store)
    job = store.create_job("exec", "bench", "cli", "web1").id
    payload = {"host": "web1", "stdout": "x" * 80}

    def run() -> None:
        if batch:
            store.append_events(job, [("output", payload)] * EVENTS)
        else:
            for _ in range(EVENTS):
                store.append_event(job, "output", payload)

    return run


def _measure(store: object, batch: bool) -> Callable[[], float]:
    """One timed ingestion round on ``store`` (each on a new job)."""
    return lambda: timed(_ingest_round(store, batch))


def _ingestion(root: Path, base_url: str) -> list[str]:
    from carrier.store import Store

    lite = Store.open(root / "state-sqlite")
    pg = Store.open(root / "state-pg", url=_fresh_url(base_url))
    rows = []
    try:
        for batch in (False, True):
            took = alternate({"sqlite": _measure(lite, batch), "pg": _measure(pg, batch)}, ROUNDS)
            p, s = statistics.median(took["pg"]), statistics.median(took["sqlite"])
            label = "append_events (one transaction)" if batch else "append_event (one commit each)"
            rows.append(f"| {label} | {EVENTS / p:,.0f} ev/s | {EVENTS / s:,.0f} ev/s | {p / s:.2f}x |")
    finally:
        lite.close()
        pg.close()
    return rows


# --------------------------------------------------------------------------- throughput


def instance(url: str, state: str, inventory: str, count: int) -> None:
    """One instance (a child process): warm its ssh masters, say ``ready``, on ``go`` submit
    ``count`` jobs, run jobs until none in the store is unfinished, say ``done``; stop on EOF."""
    from carrier.jobs.system import assemble_job_system
    from carrier.store import Store

    store = Store.open(Path(state), url=url)
    system = assemble_job_system(store, Path(state), Path(inventory), [], poll=0.02,
                                 max_jobs=MAX_JOBS, max_jobs_per_host=PER_HOST)
    manager = system.manager.start()
    try:
        for host in HOSTS:
            view = manager.run_exec(host, ["true"], owner="bench", door="cli")
            if manager.wait(view.id, 120).status != "succeeded":
                raise RuntimeError(f"warm-up on {host} failed")
        print("ready", flush=True)
        while sys.stdin.readline().strip() == "go":
            for i in range(count):
                manager.run_exec(HOSTS[i % len(HOSTS)], ["true"], owner="bench", door="cli")
            while store._conn().execute(
                    "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]:
                time.sleep(0.02)
            print("done", flush=True)
    finally:
        manager.close()
        system.ssh.close_all()
        store.close()


def _spawn(url: str, state: Path, inventory: Path, count: int) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "instance", url, str(state), str(inventory), str(count)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _expect(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        raise RuntimeError(f"instance said {line!r}, not {word!r} (exit {proc.poll()})")


class _Side:
    """``n`` instances on one fresh schema, kept running across rounds."""

    def __init__(self, root: Path, base_url: str, inventory: Path, n: int) -> None:
        self.url = _fresh_url(base_url)
        self.procs = [_spawn(self.url, root / f"state-{n}-{i}", inventory, JOBS // n) for i in range(n)]
        for proc in self.procs:
            _expect(proc, "ready")

    def round(self) -> float:
        started = time.perf_counter()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in self.procs:
            _expect(proc, "done")
        return time.perf_counter() - started

    def ran_by(self) -> list[int]:
        """Jobs run per supervising instance (by pid), and a check that every one succeeded."""
        import psycopg

        with psycopg.connect(self.url) as conn:
            bad = conn.execute("SELECT count(*) FROM jobs WHERE status <> 'succeeded'").fetchone()
            rows = conn.execute("SELECT r.supervisor_pid, count(*) FROM job_runs r "
                                "GROUP BY r.supervisor_pid ORDER BY 2 DESC").fetchall()
        if bad is None or bad[0]:
            raise RuntimeError(f"{bad} jobs did not succeed")
        return [int(n) for _, n in rows]

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _throughput(root: Path, base_url: str, inventory: Path) -> tuple[list[str], str]:
    sides: dict[int, _Side] = {}
    try:
        for n in INSTANCES:
            sides[n] = _Side(root, base_url, inventory, n)
        took = alternate({str(n): side.round for n, side in sides.items()}, JOB_ROUNDS, warmup=0)
        split = {n: side.ran_by() for n, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()
    median = {n: statistics.median(took[str(n)]) for n in INSTANCES}
    rows = [f"| {n} | {median[n]:.2f} s | {JOBS / median[n]:.1f} jobs/s | {median[1] / median[n]:.2f}x | "
            f"{split[n]} |" for n in INSTANCES]
    note = "Jobs per instance: over all rounds, with each instance's warm-up jobs."
    return rows, note


def main() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from carrier.sandbox.manager import Sandbox

    root = Path(tempfile.mkdtemp(prefix="carrier-bench-pg-", dir="/var/tmp"))
    root.chmod(0o755)
    box = Sandbox(root, port_offset=PORT_OFFSET, with_postgres=True)
    try:
        box.up()
        pg = box.postgres()
        assert pg is not None
        base_url = pg.url()
        ingest = _ingestion(root, base_url)
        jobs, note = _throughput(root, base_url, box.layout.inventory_dir)
    finally:
        box.destroy()
        shutil.rmtree(root, ignore_errors=True)
    return (
        "### PostgreSQL store (issue 14)\n\n"
        f"Event ingestion: {EVENTS} job events per round through the same `Store` code, median of "
        f"{ROUNDS} alternating rounds after a warm-up. SQLite: WAL, synchronous=NORMAL (a commit does "
        "not wait for the disk). PostgreSQL: the sandbox's cluster on loopback, default durability "
        "(a commit waits for its WAL flush), one connection per thread.\n\n"
        "| what | PostgreSQL | SQLite | ratio (time) |\n|---|---|---|---|\n"
        + "\n".join(ingest) + "\n\n"
        f"Throughput: {JOBS} short exec jobs (`true` over the ssh master, spread over web1, web2, db1) "
        f"submitted at once; store-wide limits {MAX_JOBS} jobs, {PER_HOST} per host on every side; "
        f"median of {JOB_ROUNDS} alternating rounds. Several instances are as many processes, each "
        "with its own state directory, on one PostgreSQL schema, each submitting its share.\n\n"
        f"| instances | {JOBS} exec jobs, submit to last verdict | throughput | vs 1 instance | "
        "jobs run per instance |\n|---|---|---|---|---|\n"
        + "\n".join(jobs) + "\n\n"
        f"{note} The limits are counted over the whole store, so more instances on the same "
        "machine add availability (one takes over a dead one's jobs and mail), not job slots: what "
        "bounds throughput here is the two cores and the per-host limit, and the ratios show what "
        "sharing the claim and the limits between processes costs or gains.\n"
    )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "instance":
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        instance(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        print(main())
