"""Playbook jobs: a 5-task play on the 3 sandbox hosts, Carrier vs ``ansible-playbook`` with
Ansible's default settings; and 20 concurrent jobs on 3 hosts (all complete, one master per host).

Carrier's side is the whole job: submit, detached ansible-runner worker, events into the store,
verdict. The baseline is ``ansible-playbook`` on the same play and hosts with ansible-core's
defaults (ssh args ``-C -o ControlMaster=auto -o ControlPersist=60s``, pipelining off, forks 5),
host key checking on. Runs alternate, and each side's first run is a discarded warm-up, so both
measure warm connections (Carrier's masters, Ansible's ControlPersist from its previous run).

Masters are counted from the sandbox sshd logs: every new connection is one ``Accepted publickey``
line, so a second master for a host (or any connection that bypassed the master) would show.

Starts its own sandbox (port offset 1500, under /var/tmp) and destroys it at the end.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ruamel.yaml import YAML

from carrier.ansible.catalog import Catalog
from carrier.ansible.inventory import Inventory
from carrier.ansible.runner import ansible_env
from carrier.ansible.ssh import SshControl
from carrier.ansible.strategy import DEFAULT_STRATEGY
from carrier.ansible.zygote import DEFAULT_WORKER, live_zygotes
from carrier.jobs.engines import AdhocEngine, ExecEngine, PlaybookEngine
from carrier.jobs.manager import Manager
from carrier.sandbox.layout import HOSTS
from carrier.sandbox.manager import Sandbox
from carrier.store import Store

PORT_OFFSET = 1500 + int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))  # timed runs per side, after one warm-up each
CONCURRENT = 20
TARGET = 0.4
PLAY = """\
- name: Five tasks
  hosts: all
  gather_facts: false
  tasks:
    - name: Kernel
      ansible.builtin.command: uname -sr
    - name: Hostname file
      ansible.builtin.stat:
        path: /etc/hostname
    - name: Home size
      ansible.builtin.shell: du -sk "$HOME" | cut -f1
    - name: Python answers
      ansible.builtin.ping:
    - name: Temporary file
      ansible.builtin.tempfile:
        state: file
      register: tmp
"""
TWENTY = "- name: Twenty tasks\n  hosts: all\n  gather_facts: false\n  tasks:\n" + "".join(
    f"    - name: Task {i}\n      ansible.builtin.command: echo {i}\n" for i in range(1, 21))
PLAYS = {"five": PLAY, "twenty": TWENTY}
#: Bare ``ansible-playbook`` variants with Carrier's environment (strategy differs).
TUNED = ("linear", "free", "mitogen")
#: Why ``ansible.strategy`` and ``ansible.worker`` default to what they do
#: (carrier.ansible.strategy.DEFAULT_STRATEGY, carrier.ansible.zygote.DEFAULT_WORKER): the
#: measurement below and the integration runs with them as the defaults. Update both together.
DEFAULT_CHOICE = (
    "**The defaults, `ansible.strategy: mitogen` and `ansible.worker: warm`**, chosen by this "
    "measurement (Mitogen: the fastest strategy on both plays, and the only one whose gain grows with"
    " the number of tasks; the warm worker: faster than the cold one on both plays, by about the "
    "controller's start-up) and by the integration tests passing with them as the defaults. "
    "Mitogen: 2026-12-07, 176 tests in four batches (events, recap, check/diff, become, cancel, "
    "timeout, unreachable hosts, unknown host keys, restart re-attach, execution nodes, approvals, "
    "playbooks by signed mail and by schedule). The warm worker: 2026-12-07, 142 tests in three "
    "batches on this machine (test_ansible_engine, test_ansible_strategy_runs, test_jobs_ansible, "
    "test_jobs_cli, test_cli, test_approvals, test_secrets_become, test_nodes, "
    "test_controller_refused, test_mcp_ops, test_email_door, test_schedule_doors and "
    "test_warm_worker: a CLI process and a real MCP client running warm, a Carrier restart with the "
    "warm worker killed mid-run, cancel, the socket refusing another uid and bad requests); they "
    "found one difference, fixed before this run: pre-importing ansible-runner's callback patched "
    "Ansible's Display twice, so the recap came as verbose events after `playbook_on_stats`. Runs "
    "Carrier keeps on `linear` whatever the setting: jobs on an execution node (the node's "
    "ansible-runner has no Mitogen; they also start cold), runs of a role with a `become_secret` "
    "(the password stays on Ansible's own become path; with the warm worker it reaches the run over "
    "the 0600 socket instead of a pipe, then the same FIFO) and ad-hoc `raw` (Mitogen needs Python "
    "on the host). Since 2026-12-07 the warm worker also keeps Mitogen's multiplexers, so the "
    "Python Mitogen starts on each host serves the next run (`carrier.ansible.zygote`, "
    "docs/configuration.md): one run at a time (a run beside another starts its own, the row "
    "*beside a run*, which is also what the first run after the warm worker starts pays), and a "
    "cancelled or timed-out run stops them; test_warm_worker checks the reuse, the run beside and "
    "the cancel. What is left per run: ansible-runner's set-up, Ansible parsing the inventory and "
    "the playbook and loading its plugins (kept per run on purpose: a changed inventory, playbook "
    "or ansible.cfg is read again), and the tasks themselves."
)
#: Carrier's rows: the strategy by the playbook's catalog ``strategy:``, the worker
#: (``ansible.worker``) set on the engine for the run.
CARRIER_ROWS = {"Carrier, linear": ("linear", DEFAULT_WORKER),
                "Carrier, mitogen, cold worker": ("mitogen", "cold"),
                "Carrier, mitogen, warm worker": ("mitogen", "warm")}
#: The row of Carrier's defaults (``ansible.strategy``, ``ansible.worker``).
CARRIER_DEFAULT = next(row for row, choice in CARRIER_ROWS.items()
                       if choice == (DEFAULT_STRATEGY, DEFAULT_WORKER))
PING = "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n"
#: A run that holds the warm worker's shared interpreters while the measured one runs beside it.
HOLD = "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.command: sleep 15\n"
BESIDE = "Carrier, mitogen, warm worker, beside a run"


def _inventory(box: Sandbox, root: Path) -> Path:
    """The sandbox inventory without its ``ansible_pipelining: true``: the baseline must get
    Ansible's default (off); Carrier turns pipelining on itself."""
    target = root / "bench-inventory"
    shutil.copytree(box.layout.inventory_dir, target)
    yaml = YAML()
    path = target / "group_vars" / "all.yml"
    data = yaml.load(path.read_text())
    data.pop("ansible_pipelining", None)
    with open(path, "w") as fh:
        yaml.dump(data, fh)
    return target


def _accepted(box: Sandbox) -> dict[str, int]:
    return {
        host: box.layout.log_file(f"sshd-{host}").read_text(errors="replace").count("Accepted publickey")
        for host in HOSTS
    }


def _baseline(inventory: Path, playbooks: Path, home: Path, tuned: dict[str, str] | None = None,
              play: str = "five") -> float:
    """``ansible-playbook`` with Ansible's defaults, or (``tuned``) with Carrier's environment."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_RETRY_FILES_ENABLED": "False"}
    if tuned is not None:
        env = {**tuned, "HOME": str(home)}
    binary = Path(sys.executable).with_name("ansible-playbook")
    started = time.perf_counter()
    done = subprocess.run([str(binary), "-i", str(inventory), str(playbooks / f"{play}.yml")],
                          capture_output=True, text=True, env=env, cwd=str(home), timeout=300, check=False)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"baseline ansible-playbook failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return took


def _carrier(manager: Manager, play: str = "five", engine: PlaybookEngine | None = None,
             worker: str = DEFAULT_WORKER) -> float:
    if engine is not None:  # runs are one at a time: the setting of this one
        engine.worker = worker
    started = time.perf_counter()
    view = manager.wait(manager.run_playbook(play, owner="bench", door="cli").id, 300)
    took = time.perf_counter() - started
    if view.status != "succeeded":
        raise RuntimeError(f"Carrier run failed: {view.message}")
    return took


def _beside(manager: Manager, play: str, engine: PlaybookEngine) -> float:
    """A warm run while another holds the shared interpreters: it starts its own (the cost the
    first run after the warm worker starts, or any run beside another, pays)."""
    engine.worker = "warm"
    hold = manager.run_playbook("hold", owner="bench", door="cli")
    deadline = time.monotonic() + 60
    while not any(e.type == "runner.started" for e in manager.output(hold.id, 0, 100)[0]):  # forked
        if time.monotonic() > deadline:
            raise RuntimeError("the holding run did not start")
        time.sleep(0.02)
    took = _carrier(manager, play, engine, "warm")
    if manager.get(hold.id).finished_at is not None:
        raise RuntimeError("the holding run ended before the measured one")
    if manager.wait(hold.id, 120).status != "succeeded":
        raise RuntimeError("the holding run failed")
    return took


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="carrier-bench-pb-", dir="/var/tmp"))
    root.chmod(0o755)
    box = Sandbox(root, port_offset=PORT_OFFSET)
    state = root / "state"
    home = root / "home"
    home.mkdir()
    playbooks = root / "playbooks"
    playbooks.mkdir()
    for name, text in PLAYS.items():
        (playbooks / f"{name}.yml").write_text(textwrap.dedent(text))
        (playbooks / f"{name}_linear.yml").write_text(textwrap.dedent(text))
        (playbooks / f"{name}_linear.meta.yml").write_text("strategy: linear\n")
        (playbooks / f"{name}_mitogen.yml").write_text(textwrap.dedent(text))
        (playbooks / f"{name}_mitogen.meta.yml").write_text("strategy: mitogen\n")
    (playbooks / "ping.yml").write_text(PING)
    (playbooks / "hold.yml").write_text(HOLD)
    (playbooks / "hold.meta.yml").write_text("strategy: mitogen\n")
    control: SshControl | None = None
    try:
        box.up()
        inventory_dir = _inventory(box, root)
        store = Store.open(state)
        inventory = Inventory(inventory_dir)
        control = SshControl(state)
        catalog = Catalog([playbooks])
        playbook_engine = PlaybookEngine(inventory, control, catalog)
        engines = [playbook_engine, AdhocEngine(inventory, control), ExecEngine(inventory, control)]

        # --- 5- and 20-task plays, every variant alternating, warm-up first
        manager = Manager(store, state, engines=engines, poll=0.05).start()
        envs = {name: ansible_env(ssh_env=control.ansible_env(), local_temp=home / "tuned-tmp", forks=10,
                                  strategy=name) for name in TUNED}
        times: dict[tuple[str, str], list[float]] = {}
        bench_started = time.perf_counter()
        try:
            for play in PLAYS:
                sides = {"defaults": lambda p=play: _baseline(inventory_dir, playbooks, home, play=p),
                         **{f"bare {n}": lambda p=play, e=envs[n]: _baseline(inventory_dir, playbooks, home,
                                                                             e, play=p) for n in TUNED},
                         **{row: lambda p=play, c=choice: _carrier(manager, f"{p}_{c[0]}", playbook_engine,
                                                                   c[1])
                            for row, choice in CARRIER_ROWS.items()},
                         BESIDE: lambda p=play: _beside(manager, f"{p}_mitogen", playbook_engine)}
                for run in range(RUNS + 1):
                    for side, call in sides.items():
                        took = call()
                        if run:  # the first round is the warm-up
                            times.setdefault((play, side), []).append(took)
        finally:
            manager.close()
            playbook_engine.worker = DEFAULT_WORKER
        bench_took = time.perf_counter() - bench_started
        control.close_all()
        _kill_ansible_masters(home)
        warm_phase_masters = dict(control.started)

        # --- 20 concurrent jobs on 3 hosts, no master before, none twice
        before = _accepted(box)
        limits = Manager(store, state, engines=engines, max_jobs=CONCURRENT, max_jobs_per_host=CONCURRENT,
                         poll=0.05).start()
        try:
            started = time.perf_counter()
            ids = []
            for i in range(CONCURRENT):
                if i % 2:
                    ids.append(limits.run_exec("all", ["uname", "-n"], owner="bench", door="cli").id)
                else:
                    ids.append(limits.run_playbook("ping", owner="bench", door="cli").id)
            views = [limits.wait(job, 600) for job in ids]
            wall = time.perf_counter() - started
        finally:
            limits.close()
        after = _accepted(box)
        logins = {h: after[h] - before[h] for h in HOSTS}
        succeeded = sum(v.status == "succeeded" for v in views)
        busy = sum((v.finished_at or 0) - (v.started_at or 0) for v in views)
        started_by_us = {h: control.started[h] - warm_phase_masters.get(h, 0) for h in HOSTS}
        store.close()
    finally:
        if control is not None:
            control.close_all()
        for pid in live_zygotes(state):
            os.kill(pid, 15)
        _kill_ansible_masters(home)
        box.destroy()
        shutil.rmtree(root, ignore_errors=True)

    med = {key: statistics.median(values) for key, values in times.items()}
    ratio = med[("five", CARRIER_DEFAULT)] / med[("five", "defaults")]
    verdict = "meets" if ratio <= TARGET else "misses"
    overhead = {row: med[("five", row)] - med[("five", "bare mitogen")]
                for row in ("Carrier, mitogen, cold worker", "Carrier, mitogen, warm worker")}
    same_worker = f"Carrier, mitogen, {DEFAULT_WORKER} worker"
    versus = {play: med[(play, same_worker)] / med[(play, "Carrier, linear")] for play in PLAYS}
    warm = {play: med[(play, "Carrier, mitogen, warm worker")] - med[(play, "Carrier, mitogen, cold worker")]
            for play in PLAYS}
    one_each = all(n == 1 for n in logins.values()) and all(started_by_us.get(h) == 1 for h in HOSTS)
    rows = []
    for side in ("defaults", *(f"bare {n}" for n in TUNED), *CARRIER_ROWS, BESIDE):
        cells = []
        for play in PLAYS:
            values = times[(play, side)]
            cells.append(f"{med[(play, side)]:.2f} s ({min(values):.2f}-{max(values):.2f}) | "
                         f"{med[(play, side)] / med[(play, 'defaults')]:.2f}x")
        rows.append(f"| {side} | " + " | ".join(cells) + " |")
    return (
        "### Playbook jobs (issue 3, 16): 5- and 20-task plays vs ansible-playbook defaults; 20 concurrent "
        "jobs\n\n"
        f"On web1, web2, db1; 5 tasks (command, stat, shell, ping, tempfile) and 20 `command` tasks. "
        f"Every variant in turn, {RUNS} timed rounds after one warm-up round, median (min-max); "
        f"{bench_took:.0f} s in all. Target: Carrier's default ({DEFAULT_STRATEGY}, {DEFAULT_WORKER} worker) "
        f"≤ {TARGET}x of "
        "defaults on the 5-task play: "
        f"{verdict} it ({ratio:.2f}x).\n\n"
        "| what | 5-task play | ratio | 20-task play | ratio |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        "defaults = `ansible-playbook` with ansible-core's defaults (ControlPersist 60s, no pipelining, "
        "forks 5, linear). bare X = `ansible-playbook` with Carrier's environment (pipelining, its warm "
        "ControlPath masters, forks 10) and strategy X. Carrier = the whole job: submit, detached "
        "ansible-runner worker, events into SQLite, verdict; the strategy by the playbook's catalog "
        "`strategy:`; cold worker = `ansible.worker: cold` (a new Python per run, ansible-runner "
        "spawning a new `ansible-playbook`), warm worker = `ansible.worker: warm` (the run forked from "
        "a worker that has imported Ansible, ansible-runner and Mitogen, `ansible-playbook` run "
        f"in-process in a fork of it); Carrier, linear uses the default worker ({DEFAULT_WORKER}). "
        "mitogen = Mitogen for Ansible's `mitogen_linear` (one Python per host "
        "per run). The sandbox hosts are this machine: controller and hosts share the same 2 cores "
        "(and other work on it runs alongside: compare rows of one run, not runs).\n\n"
        f"Mitogen against linear, both as Carrier jobs ({DEFAULT_WORKER} worker): {versus['five']:.2f}x on "
        f"the 5-task play, {versus['twenty']:.2f}x on the 20-task play. On the 5-task play a Carrier job "
        f"with Mitogen adds {overhead['Carrier, mitogen, cold worker']:+.2f} s to the bare "
        f"`ansible-playbook` with the cold worker and {overhead['Carrier, mitogen, warm worker']:+.2f} s "
        "with the warm one; the warm worker against the cold one: "
        f"{warm['five']:+.2f} s on the 5-task play, {warm['twenty']:+.2f} s on the 20-task play.\n\n"
        f"{DEFAULT_CHOICE}\n\n"
        f"{CONCURRENT} concurrent jobs ({CONCURRENT // 2} ping playbooks + {CONCURRENT // 2} exec, each on "
        f"all 3 hosts, limits {CONCURRENT}/{CONCURRENT}) from cold: {succeeded}/{CONCURRENT} succeeded in "
        f"{wall:.1f} s wall ({busy:.1f} s of job time, {busy / wall:.1f}x overlap). ssh logins per host "
        f"(sshd log): {', '.join(f'{h} {n}' for h, n in logins.items())}; masters Carrier started: "
        f"{', '.join(f'{h} {started_by_us.get(h, 0)}' for h in HOSTS)} — "
        f"{'no master created twice' if one_each else 'MORE THAN ONE master or login for a host'}.\n"
    )


def _kill_ansible_masters(home: Path) -> None:
    """The baseline's masters live in ~/.ansible/cp of its HOME: close them (by their sockets)."""
    cp = home / ".ansible" / "cp"
    if not cp.is_dir():
        return
    for sock in cp.iterdir():
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True,
                       timeout=20, check=False)


if __name__ == "__main__":
    print(main())
