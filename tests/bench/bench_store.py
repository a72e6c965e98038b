"""State store overhead: Carrier's Store vs raw sqlite3 with the same settings, and CLI start-up.

Baselines run interleaved with the measured code in this process, so the ratios hold on a
noisy machine.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from carrier.store import Store

EVENTS = 2000
ROUNDS = 5


def _raw_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE ev (job TEXT, seq INTEGER, ts REAL, type TEXT, data TEXT, "
                 "PRIMARY KEY(job, seq))")
    return conn


def _time(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _store_round(store: Store, batch: bool) -> Callable[[], None]:
    job = store.create_job("exec", "bench", "cli", "web1").id
    payload = {"host": "web1", "stdout": "x" * 80}

    def run() -> None:
        if batch:
            store.append_events(job, [("output", payload)] * EVENTS)
        else:
            for _ in range(EVENTS):
                store.append_event(job, "output", payload)

    return run


def _raw_round(conn: sqlite3.Connection, batch: bool, round_no: int) -> Callable[[], None]:
    job = f"raw-{batch}-{round_no}"
    data = json.dumps({"host": "web1", "stdout": "x" * 80})

    def run() -> None:
        if batch:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO ev VALUES (?, ?, ?, 'output', ?)",
                             ((job, i, time.time(), data) for i in range(1, EVENTS + 1)))
            conn.execute("COMMIT")
        else:
            for i in range(1, EVENTS + 1):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO ev VALUES (?, ?, ?, 'output', ?)", (job, i, time.time(), data))
                conn.execute("COMMIT")

    return run


def _startup() -> tuple[float, float]:
    def cmd(*argv: str) -> float:
        return _time(lambda: subprocess.run(argv, check=True, capture_output=True))

    carrier, bare = [], []
    for _ in range(ROUNDS):
        carrier.append(cmd(sys.executable, "-m", "carrier", "--version"))
        bare.append(cmd(sys.executable, "-c", "pass"))
    return statistics.median(carrier), statistics.median(bare)


def main() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "state")
        raw = _raw_db(Path(tmp) / "raw.db")
        for batch in (False, True):
            ours, base = [], []
            for r in range(ROUNDS):
                base.append(_time(_raw_round(raw, batch, r)))
                ours.append(_time(_store_round(store, batch)))
            o, b = statistics.median(ours), statistics.median(base)
            label = "append_events (one transaction)" if batch else "append_event (one commit each)"
            rows.append(f"| {label} | {EVENTS / o:,.0f} ev/s | {EVENTS / b:,.0f} ev/s | {o / b:.2f}x |")
        store.close()
        raw.close()
    c, b = _startup()
    rows.append(f"| `carrier --version` start-up | {c * 1000:.0f} ms | {b * 1000:.0f} ms (`python -c pass`) "
                f"| {c / b:.2f}x |")
    return (
        "### Store and start-up (foundation)\n\n"
        f"{EVENTS} job events per round, median of {ROUNDS} rounds, "
        "WAL + synchronous=NORMAL on both sides.\n\n"
        "| what | Carrier | baseline (raw sqlite3) | ratio (time) |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )
