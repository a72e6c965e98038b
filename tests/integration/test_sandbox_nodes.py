"""`carrier sandbox up --exec-nodes N` through the CLI process: N sshd execution nodes on 127.0.0.21..,
listed healthy by `carrier nodes`, running a playbook job from `carrier run`, stopped by `down`.

The sandbox here is this module's own (a second one beside the session's), at
CARRIER_TEST_PORT_OFFSET + 400.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_support import BUNDLED, REPO, carrier_cli, until, write_config, write_playbooks

from carrier.ansible.ssh import SshControl
from carrier.ansible.zygote import live_zygotes
from carrier.sandbox import procs
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

BASE = int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
OFFSET = BASE + 400
NODES = {"exec1": "127.0.0.21", "exec2": "127.0.0.22"}


def _new_root(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    """A sandbox brought up by ``carrier sandbox up --exec-nodes 2`` (the CLI process)."""
    if os.geteuid() != 0:
        pytest.fail("sandbox tests need root: the sandbox runs sshd and dovecot (CI runs as root)")
    root = _new_root("carrier-sbn-")
    try:
        done = carrier_cli("sandbox", "up", "--dir", str(root), "--port-offset", str(OFFSET),
                           "--exec-nodes", "2")
        assert done.returncode == 0, done.stderr
        yield root
    finally:
        SshControl(root / "state").close_all()
        Sandbox(root).destroy()
        shutil.rmtree(root, ignore_errors=True)


def _config(root: Path) -> str:
    return str(root / "carrier.yml")


def _ours(root: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names the sandbox directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline:
            found.append((int(entry.name), cmdline))
    return found


def test_up_runs_the_nodes_and_records_them_for_status(root: Path) -> None:
    meta = json.loads((root / "sandbox.json").read_text())
    assert meta["exec_nodes"] == 2 and meta["ports"]["ssh"] == 2222 + OFFSET
    status = carrier_cli("sandbox", "status", "--dir", str(root))
    assert status.returncode == 0, status.stdout + status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.strip().startswith("nodes "))
    assert re.search(r"nodes\s+running\s+sshd-exec1=\d+ sshd-exec2=\d+", line), line
    assert f"127.0.0.21:{2222 + OFFSET}" in line and f"127.0.0.22:{2222 + OFFSET}" in line
    # Each node is an ssh host like the others: its own host key in known_hosts and ssh_config.
    known = (root / "ssh" / "known_hosts").read_text()
    assert f"[127.0.0.21]:{2222 + OFFSET},[exec1]:{2222 + OFFSET} ssh-ed25519 " in known
    assert "Host exec2\n    HostName 127.0.0.22\n" in (root / "ssh" / "ssh_config").read_text()
    # A later `up` without --exec-nodes keeps them; `env` still works.
    again = carrier_cli("sandbox", "up", "--dir", str(root))
    assert again.returncode == 0, again.stderr
    assert re.search(r"nodes\s+running\s+sshd-exec1=\d+ sshd-exec2=\d+", again.stdout), again.stdout
    env = carrier_cli("sandbox", "env", "--dir", str(root))
    assert env.returncode == 0 and f"CARRIER_CONFIG={root}/carrier.yml" in env.stdout, env.stderr


def test_carrier_nodes_lists_both_nodes_healthy(root: Path) -> None:
    done = carrier_cli("nodes", "--config", _config(root), "--json")
    assert done.returncode == 0, done.stderr
    listed = {n["name"]: n for n in json.loads(done.stdout)}
    assert set(listed) == set(NODES)
    for name, addr in NODES.items():
        node = listed[name]
        assert node["healthy"] is True, node
        assert node["target"] == f"carrier-sbx@{addr}:{2222 + OFFSET}"
        assert node["groups"] == ["web", "db"] and node["running"] == []
        assert node["detail"].startswith("ansible-runner 2."), node
    text = carrier_cli("nodes", "--config", _config(root))
    assert text.returncode == 0, text.stderr
    assert re.search(r"^exec2\s+ok\s+carrier-sbx@127\.0\.0\.22", text.stdout, re.M), text.stdout


def _sessions(root: Path, node: str) -> int:
    """Sessions the node's sshd has started (its log is VERBOSE: one line per command)."""
    return (root / "log" / f"sshd-{node}.log").read_text().count("Starting session: command")


def test_a_playbook_from_carrier_run_runs_on_a_node(root: Path) -> None:
    before = {node: _sessions(root, node) for node in NODES}
    done = carrier_cli("run", "ping", "--limit", "web", "--wait", "--config", _config(root), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: [web1]" in done.stdout and "ok: [web2]" in done.stdout
    match = re.search(r"== job (j-[a-z0-9]+): playbook ping", done.stderr)
    assert match, done.stderr
    job_id = match.group(1)
    shown = carrier_cli("job", "show", job_id, "--json", "--config", _config(root))
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    node = record["spec"]["node"]
    assert node in NODES and record["status"] == "succeeded", record
    events = json.loads(carrier_cli("job", "output", job_id, "--json", "--config", _config(root)).stdout)
    started = next(e for e in events["events"] if e["type"] == "runner.started")
    assert started["data"]["node"] == node
    # The worker ran over that node's sshd (and not over the other's).
    other = next(n for n in NODES if n != node)
    assert _sessions(root, node) > before[node]
    assert _sessions(root, other) == before[other]
    assert not Path(f"/tmp/carrier-{job_id}").exists()  # the run's directory on the node is gone


def test_a_job_for_a_node_host_itself_runs_on_the_controller(root: Path) -> None:
    done = carrier_cli("run", "ping", "--limit", "exec1", "--wait", "--config", _config(root), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"== job (j-[a-z0-9]+)", done.stderr).group(1)  # type: ignore[union-attr]
    record = json.loads(carrier_cli("job", "show", job_id, "--json", "--config", _config(root)).stdout)
    assert "node" not in record["spec"]  # no node serves the `nodes` group


def test_a_job_goes_to_the_node_with_nothing_running(root: Path) -> None:
    """Two `carrier run` processes: the second job is placed on the node the first one leaves idle."""
    config = write_config(Sandbox(root), root / "carrier-slow.yml", state=root / "state",
                          inventory=root / "inventory",
                          playbook_dirs=[write_playbooks(root / "test-playbooks"), BUNDLED])
    slow = subprocess.Popen([sys.executable, "-m", "carrier", "run", "slow", "--limit", "web1", "-e",
                             "seconds=120", "--wait", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        def running_on() -> dict[str, list[str]]:
            done = carrier_cli("nodes", "--config", str(config), "--json")
            return {n["name"]: n["running"] for n in json.loads(done.stdout)} if done.returncode == 0 else {}

        until(lambda: any(running_on().values()), 120, "the slow job running on a node")
        busy = next(name for name, jobs in running_on().items() if jobs)
        done = carrier_cli("run", "ping", "--limit", "web", "--wait", "--config", str(config), timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        job_id = re.search(r"== job (j-[a-z0-9]+)", done.stderr).group(1)  # type: ignore[union-attr]
        record = json.loads(carrier_cli("job", "show", job_id, "--json", "--config", str(config)).stdout)
        assert record["spec"]["node"] == next(n for n in NODES if n != busy)
        slow_id = running_on()[busy][0]
        assert carrier_cli("job", "kill", slow_id, "--config", str(config)).returncode == 0
        assert slow.wait(120) == 2  # the cancelled job: exit 2
    finally:
        if slow.poll() is None:
            slow.kill()
        slow.communicate(timeout=60)


def test_a_bad_number_of_nodes_is_refused_and_writes_nothing() -> None:
    fresh = _new_root("carrier-sbn-bad-")
    try:
        for bad in ("-1", "10"):
            done = carrier_cli("sandbox", "up", "--dir", str(fresh), "--port-offset", str(OFFSET + 50),
                               "--exec-nodes", bad)
            assert done.returncode == 1
            assert done.stderr.strip() == (
                "carrier: error: the number of execution nodes (--exec-nodes) must be a whole number from "
                f"0 to 9 (the nodes live on 127.0.0.21-127.0.0.29), not {bad}")
        assert list(fresh.iterdir()) == []
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def test_down_stops_everything_by_pid(root: Path) -> None:
    """(Last: it stops the module's sandbox.)"""
    box = Sandbox(root)
    pids = [pid for c in box.components() for pid in c.pids().values()]
    assert len(pids) == 4 + 3 + 2 and all(pid is not None for pid in pids)  # nodes among them
    workers = live_zygotes(box.layout.carrier_state_dir)
    assert workers, "the local runs of this module left no warm Ansible worker to stop"
    done = carrier_cli("sandbox", "down", "--dir", str(root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped: nodes, sshd, keyserver, smtp, dovecot, oauth, warm workers"
    assert not any(procs.pid_alive(pid) for pid in pids + workers if pid is not None)
    # Carrier's ssh masters to the nodes and hosts end with their sshd sessions.
    until(lambda: _ours(root) == [], 20, f"every process of the sandbox to end: {_ours(root)}")
    status = carrier_cli("sandbox", "status", "--dir", str(root))
    assert status.returncode == 3
    assert re.search(r"nodes\s+stopped\s+sshd-exec1=- sshd-exec2=-", status.stdout), status.stdout
