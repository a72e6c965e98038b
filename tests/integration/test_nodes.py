"""Execution nodes against the sandbox: db1 (a real sshd host with Debian's ansible-runner) runs the
plays for the ``web`` group through transmit / worker / process over Carrier's ssh master."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_support import (
    BUNDLED,
    carrier_cli,
    processes_with_env,
    short_tmpdir,
    until,
    write_config,
    write_inventory,
    write_playbooks,
)
from ruamel.yaml import YAML

from carrier.config import ExecutionNode
from carrier.jobs.system import JobSystem, assemble_job_system
from carrier.nodes.transport import NODE_MARK_ENV
from carrier.sandbox import procs
from carrier.sandbox.manager import Sandbox
from carrier.sandbox.sshd import SshHosts
from carrier.store import Store

pytestmark = pytest.mark.sandbox

NODE = ExecutionNode(name="exec1", target="db1", groups=("web",), capacity=1,
                     ansible_runner="/usr/bin/ansible-runner", work_dir="/tmp")
WHERE = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Where am I
      ansible.builtin.debug:
        msg: "controller-side mark={{ lookup('env', 'CARRIER_NODE_RUN') or 'none' }}"
    - name: Sleep
      ansible.builtin.command: "sleep {{ seconds }}"
"""
WHERE_META = """\
description: says where the play's controller side runs, then sleeps
vars:
  seconds: {type: int, default: 0, min: 0, max: 600}
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = short_tmpdir("cnd-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def system(sandbox: Sandbox, workdir: Path) -> Iterator[JobSystem]:
    inventory = write_inventory(sandbox, workdir / "inventory")
    books = _books(workdir)
    state = workdir / "state"
    js = assemble_job_system(Store.open(state), state, inventory, [books, BUNDLED], poll=0.05,
                             execution_nodes=[NODE], max_jobs=8, max_jobs_per_host=4)
    js.manager.start()
    try:
        yield js
    finally:
        js.manager.close()
        js.ssh.close_all()
        js.manager.store.close()


def _books(workdir: Path) -> Path:
    books = write_playbooks(workdir / "playbooks")
    (books / "where.yml").write_text(WHERE)
    (books / "where.meta.yml").write_text(WHERE_META)
    return books


def _texts(system: JobSystem, job_id: str) -> list[str]:
    events, _ = system.manager.output(job_id, 0, 10_000)
    return [str(e.data.get("stdout", "")) for e in events]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its parent's wait() is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _base(job_id: str) -> str:
    return f"/tmp/carrier-{job_id}"


def test_a_play_for_a_node_group_runs_on_the_node_with_live_events(system: JobSystem) -> None:
    view = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web")
    assert view.spec["node"] == "exec1"
    done = system.manager.wait(view.id, 180)
    assert (done.status, done.reason) == ("succeeded", "ok"), done.message
    assert done.message == "succeeded: web1 ok=2 changed=1; web2 ok=2 changed=1"
    events, cursor = system.manager.output(view.id, 0, 10_000)
    started = next(e for e in events if e.type == "runner.started")
    assert started.data["node"] == "exec1"
    # The lookup ran in the play's controller process: on the node, which carries the run's mark.
    marks = [t for t in _texts(system, view.id) if "controller-side mark=" in t]
    assert marks and all(f"mark={_base(view.id)}" in t for t in marks), marks
    # Events by cursor, in small pages: nothing twice, nothing skipped, counters in order.
    seen, at = [], 0
    while True:
        page, at = system.manager.output(view.id, at, 3)
        if not page:
            break
        seen.extend(page)
    assert [e.seq for e in seen] == [e.seq for e in events] and at == cursor
    counters = [e.data["counter"] for e in events if e.type.startswith("ansible.")]
    assert counters == sorted(counters) and len(counters) == len(set(counters)) > 5
    # Artifacts came back; the node's run directory is gone.
    run_dir = system.manager.run_dir_of(view.id)
    assert (run_dir / "artifacts" / "run" / "rc").read_text().strip() == "0"
    assert "Where am I" in (run_dir / "artifacts" / "run" / "stdout").read_text()
    assert not Path(_base(view.id)).exists()


def test_a_play_for_other_hosts_stays_on_the_controller(system: JobSystem) -> None:
    view = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="db1")
    assert "node" not in view.spec
    done = system.manager.wait(view.id, 180)
    assert done.status == "succeeded", done.message
    assert any("mark=none" in t for t in _texts(system, view.id))


def test_cancel_stops_the_remote_worker_and_its_children(system: JobSystem) -> None:
    view = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web1",
                                       extra_vars={"seconds": 300})
    until(lambda: any("sleep 300" in t or "Sleep" in t for t in _texts(system, view.id)), 120, "the sleep")
    base = _base(view.id)
    remote = processes_with_env(NODE_MARK_ENV, base)
    assert remote, "no process of the run on the node"
    pid_file = Path(base) / "pid"
    group = int(pid_file.read_text())
    assert group in remote and os.getpgid(group) == group  # the worker leads its own group
    system.manager.kill(view.id, by="ops@example.test")
    done = system.manager.wait(view.id, 60)
    assert done.status == "cancelled", done.message
    assert processes_with_env(NODE_MARK_ENV, base) == []
    until(lambda: not any(_running(pid) for pid in remote), 10, "the node's processes to end")
    assert not Path(base).exists()


def test_a_killed_local_worker_leaves_nothing_on_the_node(system: JobSystem) -> None:
    view = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web1",
                                       extra_vars={"seconds": 300})
    until(lambda: any("Sleep" in t for t in _texts(system, view.id)), 120, "the sleep")
    base = _base(view.id)
    remote = processes_with_env(NODE_MARK_ENV, base)
    assert remote
    run = system.manager.get(view.id)
    worker = next(e for e in system.manager.output(run.id, 0, 10_000)[0] if e.type == "runner.started")
    os.killpg(int(worker.data["pid"]), signal.SIGKILL)  # the controller's half dies, ssh with it
    done = system.manager.wait(view.id, 60)
    assert (done.status, done.reason) == ("lost", "lost"), done.message
    until(lambda: not any(_running(pid) for pid in remote), 10, "the node's processes to end")
    assert not Path(base).exists()


def test_capacity_one_queues_the_second_job(system: JobSystem) -> None:
    first = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web1",
                                        extra_vars={"seconds": 4})
    until(lambda: system.manager.get(first.id).status == "running", 60, "the first job running")
    second = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web2")
    until(lambda: any("Sleep" in t for t in _texts(system, first.id)), 120, "the first job's sleep")
    if not system.manager.get(first.id).done:  # the first still holds the node's one slot
        assert system.manager.get(second.id).status == "queued"
    assert system.manager.wait(first.id, 120).status == "succeeded"
    assert system.manager.wait(second.id, 120).status == "succeeded"
    one, two = system.manager.get(first.id), system.manager.get(second.id)
    assert two.started_at is not None and one.finished_at is not None
    assert two.started_at >= one.finished_at  # it waited for the slot; it did not run beside the first


def test_a_node_that_dies_mid_run_ends_the_job_clearly(sandbox: Sandbox, system: JobSystem) -> None:
    view = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web1",
                                       extra_vars={"seconds": 300})
    until(lambda: any("Sleep" in t for t in _texts(system, view.id)), 120, "the sleep")
    base = _base(view.id)
    hosts = SshHosts(sandbox.layout)
    sshd_pid = procs.read_pid(sandbox.layout.pid_file("sshd-db1"))
    assert sshd_pid is not None
    try:
        # The node goes away: its sshd and every session it carries (Carrier's master among them).
        for pid in [*procs.child_pids(sshd_pid), sshd_pid]:
            os.kill(pid, signal.SIGKILL)
        done = system.manager.wait(view.id, 60)
        assert done.done, "the job still runs after its node died"
        assert (done.status, done.reason) == ("failed", "node_unreachable")
        assert done.message.startswith("failed: node exec1 unreachable"), done.message
    finally:
        for pid in processes_with_env(NODE_MARK_ENV, base):  # the orphaned run on the dead "node"
            with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        hosts.start()


def _descendants(pid: int) -> list[int]:
    out = []
    for child in procs.child_pids(pid):
        out += [child, *_descendants(child)]
    return out


def test_a_node_that_hangs_mid_run_ends_the_job_by_heartbeat(sandbox: Sandbox, system: JobSystem) -> None:
    view = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web1",
                                       extra_vars={"seconds": 300})
    until(lambda: any("Sleep" in t for t in _texts(system, view.id)), 120, "the sleep")
    base = _base(view.id)
    sshd_pid = procs.read_pid(sandbox.layout.pid_file("sshd-db1"))
    assert sshd_pid is not None
    frozen = [sshd_pid, *_descendants(sshd_pid)]
    try:
        # The node stops answering but its connection stays up (a hung machine, a dropped route).
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        done = system.manager.wait(view.id, 90)
        assert done.done, "the job still runs after its node hung"
        assert (done.status, done.reason) == ("failed", "node_unreachable")
        assert done.message.startswith("failed: node exec1 unreachable: node exec1: a heartbeat did not "
                                       "answer within 10 s"), done.message
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for pid in processes_with_env(NODE_MARK_ENV, base):
            with contextlib.suppress(ProcessLookupError):  # the thawed node's clean-up may be quicker
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        system.ssh.close_all()  # the master to the thawed node may be half dead: start afresh


def test_carrier_nodes_lists_health_and_running_jobs(sandbox: Sandbox, system: JobSystem,
                                                    workdir: Path) -> None:
    config = write_config(sandbox, workdir / "carrier.yml", state=workdir / "state",
                          inventory=workdir / "inventory", playbook_dirs=[_books(workdir), BUNDLED])
    data = YAML().load(config.read_text())
    data["execution_nodes"] = [
        {"name": NODE.name, "target": NODE.target, "groups": list(NODE.groups), "capacity": NODE.capacity,
         "ansible_runner": NODE.ansible_runner},
        {"name": "gone", "target": "ghost", "groups": ["lab"]},  # nothing listens there
    ]
    with open(config, "w") as fh:
        YAML().dump(data, fh)
    view = system.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web1",
                                       extra_vars={"seconds": 60})
    try:
        until(lambda: system.manager.get(view.id).status == "running", 60, "the job running")
        done = carrier_cli("nodes", "--config", str(config))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        exec1 = next(line for line in lines if line.startswith("exec1 "))
        assert " ok " in exec1 and "groups: web" in exec1 and "running 1/1" in exec1, exec1
        assert "ansible-runner 2." in exec1
        assert f"    {view.id}" in lines
        gone = next(line for line in lines if line.startswith("gone "))
        assert " DOWN " in gone and "node gone" not in gone and "127.0.0.14" in gone, gone
        as_json = carrier_cli("nodes", "--config", str(config), "--json")
        listed = {n["name"]: n for n in json.loads(as_json.stdout)}
        assert listed["exec1"]["healthy"] is True and listed["exec1"]["running"] == [view.id]
        assert listed["gone"]["healthy"] is False and listed["gone"]["running"] == []
    finally:
        system.manager.kill(view.id, by="test")
        system.manager.wait(view.id, 60)


def test_an_unknown_group_stops_carrier_nodes_with_a_clear_error(sandbox: Sandbox, workdir: Path) -> None:
    config = write_config(sandbox, workdir / "bad.yml", state=workdir / "state-bad",
                          inventory=workdir / "inventory", playbook_dirs=[BUNDLED])
    data = YAML().load(config.read_text())
    data["execution_nodes"] = [{"name": "exec1", "target": "db1", "groups": ["webz"]}]
    with open(config, "w") as fh:
        YAML().dump(data, fh)
    done = carrier_cli("nodes", "--config", str(config))
    assert done.returncode == 1
    assert "execution_nodes[0] (exec1).groups: no inventory group 'webz'" in done.stderr, done.stderr


def test_a_node_run_survives_a_carrier_restart(system: JobSystem, workdir: Path) -> None:
    """(``system`` first: it writes the inventory this test shares.)"""
    state = workdir / "state-restart"
    inventory = workdir / "inventory"
    books = _books(workdir)

    def build() -> JobSystem:
        return assemble_job_system(Store.open(state), state, inventory, [books], poll=0.05,
                                   execution_nodes=[NODE])

    first = build()
    first.manager.start()
    view = first.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web",
                                      extra_vars={"seconds": 4})
    until(lambda: any("Sleep" in t for t in _texts(first, view.id)), 120, "the sleep")
    first.manager.close()  # Carrier stops; the detached worker and the node run go on
    first.manager.store.close()
    second = build()
    try:
        second.manager.start(adopt=True)
        assert view.id in second.manager.active()
        done = second.manager.wait(view.id, 120)
        events, _ = second.manager.output(view.id, 0, 10_000)
    finally:
        second.manager.close()
        second.ssh.close_all()
        second.manager.store.close()
    assert (done.status, done.reason) == ("succeeded", "ok"), done.message
    types = [e.type for e in events]
    assert types.count("job.resumed") == 1 and types.count("job.finished") == 1
    counters = [e.data["counter"] for e in events if e.type.startswith("ansible.")]
    assert counters == list(range(1, len(counters) + 1))  # none lost, none twice across the restart
    assert not Path(_base(view.id)).exists()


def test_a_job_ending_on_a_node_leaves_the_shared_master_to_the_jobs_still_there(system: JobSystem,
                                                                                 workdir: Path) -> None:
    """Two jobs on one node share Carrier's ssh master to it; the first job's worker starts that
    master, and its end (which stops every process of that run) must not take the master, and the
    second job's stream with it, along. (``system`` first: it writes the inventory.)"""
    state = workdir / "state-shared"
    inventory = workdir / "inventory"
    node = dataclasses.replace(NODE, capacity=2)
    js = assemble_job_system(Store.open(state), state, inventory, [_books(workdir)], poll=0.05,
                             execution_nodes=[node], max_jobs=4, max_jobs_per_host=4)
    js.manager.start()
    try:
        conn = js.nodes.nodes[0].conn
        assert not js.ssh.master_alive(conn)  # a new state dir: the first job's worker starts it
        first = js.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web1",
                                        extra_vars={"seconds": 8})
        until(lambda: any("Sleep" in t for t in _texts(js, first.id)), 120, "the first job's sleep")
        second = js.manager.run_playbook("where", owner="ops@example.test", door="cli", limit="web2",
                                         extra_vars={"seconds": 12})
        until(lambda: any("Sleep" in t for t in _texts(js, second.id)), 120, "the second job's sleep")
        assert not js.manager.get(first.id).done, "the first job ended before the second was under way"
        done = js.manager.wait(first.id, 120)
        assert (done.status, done.reason) == ("succeeded", "ok"), done.message
        assert js.ssh.master_alive(conn)
        done = js.manager.wait(second.id, 120)
        assert (done.status, done.reason) == ("succeeded", "ok"), done.message
    finally:
        js.manager.close()
        js.ssh.close_all()
        js.manager.store.close()
