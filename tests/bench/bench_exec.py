"""Exec fast path: warm latency of one command vs raw ``ssh`` over the same ControlMaster socket.

Both sides run ``true`` on web1 through the one master ``SshControl`` keeps for it; the baseline is
the very argv Carrier builds, run by ``subprocess.run`` with nothing around it. Calls alternate
(Carrier, raw, Carrier, raw, ...) so a noisy machine moves both. Also shown, without a target: the
same command as an exec *job* (store record, events, wait), the path the doors use.

Starts its own sandbox (port offset 1500, under /var/tmp) and destroys it at the end.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from carrier.ansible.fastpath import exec_command
from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl, remote_command
from carrier.jobs.engines import ExecEngine
from carrier.jobs.manager import Manager
from carrier.sandbox.manager import Sandbox
from carrier.store import Store

PORT_OFFSET = 1500
ROUNDS = 7
CALLS = 30
JOB_CALLS = 40
TARGET = 1.3


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def measure(box: Sandbox, state: Path) -> dict[str, float]:
    inventory = Inventory(box.layout.inventory_dir)
    control = SshControl(state)
    web1 = inventory.conn("web1")
    argv = control.argv(web1, remote_command(["true"], shell=False), flags=("-T",))
    try:
        control.ensure_master(web1)
        for _ in range(5):  # warm both paths (page cache, ssh binary, the master's first sessions)
            exec_command(control, web1, ["true"])
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True)
        ours: list[float] = []
        raw: list[float] = []
        for _ in range(ROUNDS):
            for _ in range(CALLS):
                started = time.perf_counter()
                result = exec_command(control, web1, ["true"])
                ours.append(time.perf_counter() - started)
                assert result.status == "ok", result
                started = time.perf_counter()
                subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True)
                raw.append(time.perf_counter() - started)
        store = Store.open(state)
        manager = Manager(store, state, engines=[ExecEngine(inventory, control)], poll=0.05).start()
        jobs: list[float] = []
        try:
            for _ in range(JOB_CALLS):
                started = time.perf_counter()
                view = manager.wait(manager.run_exec("web1", ["true"], owner="bench", door="cli").id, 30)
                jobs.append(time.perf_counter() - started)
                assert view.status == "succeeded", view.message
        finally:
            manager.close()
            store.close()
        return {
            "ours": statistics.median(ours), "raw": statistics.median(raw),
            "ours_p90": statistics.quantiles(ours, n=10)[-1], "raw_p90": statistics.quantiles(raw, n=10)[-1],
            "job": statistics.median(jobs), "masters": float(control.started["web1"]),
        }
    finally:
        control.close_all()


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="carrier-bench-exec-", dir="/var/tmp"))
    root.chmod(0o755)
    box = Sandbox(root, port_offset=PORT_OFFSET)
    try:
        box.up()
        state = root / "state"
        r = measure(box, state)
    finally:
        box.destroy()
        shutil.rmtree(root, ignore_errors=True)
    ratio = r["ours"] / r["raw"]
    verdict = "meets" if ratio <= TARGET else "misses"
    return (
        "### Exec fast path (issue 3): warm latency vs raw ssh on the same ControlMaster\n\n"
        f"`true` on web1 over one warm master; {ROUNDS} rounds of {CALLS} alternating calls, "
        f"median (p90). Target ≤ {TARGET}x: {verdict} it.\n\n"
        "| what | Carrier | baseline (raw `ssh` argv, same socket) | ratio (time) |\n"
        "|---|---|---|---|\n"
        f"| `exec_command` (fast path) | {_ms(r['ours'])} ({_ms(r['ours_p90'])}) | "
        f"{_ms(r['raw'])} ({_ms(r['raw_p90'])}) | {ratio:.2f}x |\n"
        f"| exec job (record, events, wait) | {_ms(r['job'])} | {_ms(r['raw'])} | "
        f"{r['job'] / r['raw']:.2f}x |\n"
        f"\nMasters started for web1 during the run: {int(r['masters'])}.\n"
    )


if __name__ == "__main__":
    print(main())
