"""The warm worker (``ansible.worker: warm``, carrier/ansible/zygote.py) against the sandbox hosts:
jobs through the CLI process and a real MCP client run warm (their ``runner.started`` event says
so), a Carrier restart mid-run re-attaches and a killed warm worker does not stop the run (the next
job starts a new one), cancel stops the child and its ansible forks, and the socket refuses another
uid and bad requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from ansible_support import BUNDLED, REPO, short_tmpdir, until, write_config, write_inventory, write_playbooks
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp_http_support import data_of
from ruamel.yaml import YAML

from carrier.ansible.runner import ProcessId, run_processes
from carrier.ansible.ssh import SshControl
from carrier.ansible.zygote import live_zygotes, zygote_dir
from carrier.jobs.system import JobSystem, assemble_job_system
from carrier.sandbox.manager import Sandbox
from carrier.store import Store, jobruns

pytestmark = pytest.mark.sandbox


def zygotes(state: Path) -> list[int]:
    """Live warm workers of ``state``."""
    return live_zygotes(state)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = short_tmpdir("cww-")
    yield root
    for state in root.glob("state*"):
        SshControl(state).close_all()
        for pid in zygotes(state):
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inventory_dir(sandbox: Sandbox, workdir: Path) -> Path:
    return write_inventory(sandbox, workdir / "inventory")


@pytest.fixture(scope="module")
def playbooks(workdir: Path) -> Path:
    return write_playbooks(workdir / "playbooks")


@pytest.fixture(scope="module")
def config(sandbox: Sandbox, workdir: Path, inventory_dir: Path, playbooks: Path) -> Path:
    path = write_config(sandbox, workdir / "carrier.yml", state=workdir / "state", inventory=inventory_dir,
                        playbook_dirs=[playbooks, BUNDLED])
    yaml = YAML()
    data = yaml.load(path.read_text())
    data["ansible"] = {"worker": "warm"}
    with open(path, "w") as fh:
        yaml.dump(data, fh)
    return path


def started(events: list[dict[str, object]]) -> dict[str, object]:
    return next(e["data"] for e in events if e["type"] == "runner.started")  # type: ignore[return-value]


def stored_events(state: Path, job_id: str) -> list[dict[str, object]]:
    store = Store.open(state)
    try:
        events, _ = store.events_since(job_id, 0, 5000)
    finally:
        store.close()
    return [{"type": e.type, "data": e.data} for e in events]


@contextmanager
def warm_system(state: Path, inventory: Path, playbooks: Path) -> Iterator[JobSystem]:
    system = assemble_job_system(Store.open(state), state, inventory, [playbooks], poll=0.05, worker="warm")
    try:
        yield system
    finally:
        system.manager.close()
        system.manager.store.close()


# --------------------------------------------------------------------------- through the doors


def test_cli_process_runs_a_playbook_warm_and_the_worker_outlives_it(config: Path, workdir: Path) -> None:
    argv = [sys.executable, "-m", "carrier", "run", "five", "--limit", "web", "--wait", "--json",
            "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=str(REPO), timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    view = json.loads(done.stdout[done.stdout.index('{\n  "id"'):])
    assert view["status"] == "succeeded"
    assert view["message"] == "succeeded: web1 ok=5 changed=2; web2 ok=5 changed=2"
    state = workdir / "state"
    events = stored_events(state, view["id"])
    assert started(events)["worker"] == "warm"
    ansible = [e for e in events if str(e["type"]).startswith("ansible.")]
    assert ansible[-1]["type"] == "ansible.playbook_on_stats"  # the recap is in the stats event
    assert "PLAY RECAP" in str(ansible[-1]["data"]["stdout"])  # type: ignore[index]
    assert len(zygotes(state)) == 1  # started by that CLI run, still there for the next one
    sockets = list(zygote_dir(state).glob("*.sock"))
    assert len(sockets) == 1 and sockets[0].stat().st_mode & 0o777 == 0o600
    assert zygote_dir(state).stat().st_mode & 0o777 == 0o700


def test_mcp_client_runs_a_playbook_warm(config: Path) -> None:
    server = StdioServerParameters(command=sys.executable,
                                   args=["-m", "carrier", "mcp", "--config", str(config)],
                                   cwd=str(REPO), env={"PYTHONUNBUFFERED": "1"})

    async def session() -> None:
        async with Client(server) as client:
            run = data_of(await client.call_tool("playbook_run", {"playbook": "ping", "limit": "web1"}))
            waited = data_of(await client.call_tool("job_wait", {"job_id": run["job_id"], "timeout": 120}))
            assert waited["job"]["status"] == "succeeded", waited
            out = data_of(await client.call_tool("job_output", {"job_id": run["job_id"], "since": 0}))
            assert started(out["events"])["worker"] == "warm"
            oks = [e["data"]["host"] for e in out["events"] if e["type"] == "ansible.runner_on_ok"]
            assert oks == ["web1"]

    anyio.run(session)


# --------------------------------------------------------------------------- survival and cancel


def _sleeping(system: JobSystem, job_id: str) -> bool:
    events, _ = system.manager.output(job_id, 0, 1000)
    return any(e.type == "ansible.runner_on_start" and e.data.get("task") == "Sleep" for e in events)


def test_restart_and_a_killed_worker_leave_the_run_going_and_the_next_job_starts_a_new_one(
    workdir: Path, inventory_dir: Path, playbooks: Path
) -> None:
    state = workdir / "state-restart"
    with warm_system(state, inventory_dir, playbooks) as first:
        first.manager.start()
        view = first.manager.run_playbook("slow", owner="o", door="cli", limit="web",
                                          extra_vars={"seconds": 4})
        until(lambda: _sleeping(first, view.id), what="the Sleep task to start")
        job_id = view.id
    # Carrier is gone (its manager detached) and now the warm worker is killed too.
    [zygote] = zygotes(state)
    os.kill(zygote, signal.SIGKILL)
    until(lambda: not zygotes(state), what="the warm worker to die")
    with warm_system(state, inventory_dir, playbooks) as second:
        run = jobruns.get_job_run(second.manager.store, job_id)
        assert run is not None and run.pid is not None and run.pid_start is not None
        assert ProcessId(run.pid, run.pid_start).alive()  # the run went on without either
        second.manager.start(adopt=True)
        done = second.manager.wait(job_id, 120)
        events, _ = second.manager.output(job_id, 0, 5000)
        assert done.status == "succeeded"
        assert done.message == "succeeded: web1 ok=2 changed=2; web2 ok=2 changed=2"
        types = [e.type for e in events]
        assert types.count("job.resumed") == 1 and types.count("job.finished") == 1
        counters = [e.data["counter"] for e in events if e.type.startswith("ansible.")]
        assert counters == list(range(1, len(counters) + 1))  # none lost, none twice
        next_job = second.manager.run_playbook("five", owner="o", door="cli", limit="web1")
        again = second.manager.wait(next_job.id, 120)
        assert again.status == "succeeded", again.message
        [new] = zygotes(state)
        assert new != zygote
        later, _ = second.manager.output(again.id, 0, 100)
        assert next(e.data for e in later if e.type == "runner.started")["worker"] == "warm"
        second.ssh.close_all()


def test_cancel_stops_the_child_and_its_ansible_forks(workdir: Path, inventory_dir: Path,
                                                      playbooks: Path) -> None:
    state = workdir / "state-cancel"
    with warm_system(state, inventory_dir, playbooks) as system:
        manager = system.manager.start()
        view = manager.run_playbook("slow", owner="o", door="cli", limit="web1", extra_vars={"seconds": 300})
        until(lambda: _sleeping(system, view.id), what="the Sleep task to start")
        run_dir = manager.run_dir_of(view.id)
        assert len(run_processes(run_dir)) >= 3  # the child, in-process ansible-playbook, its fork, ssh
        manager.kill(view.id, by="ops@example.test")
        done = manager.wait(view.id, 60)
        assert done.status == "cancelled"
        assert done.message == "cancelled by ops@example.test: playbook slow was stopped"
        run = jobruns.get_job_run(manager.store, view.id)
        assert run is not None and run.pid is not None and run.pid_start is not None
        until(lambda: not ProcessId(run.pid, run.pid_start).alive(), what="the child to exit")  # type: ignore[arg-type]
        until(lambda: not run_processes(run_dir), what="every process of the run to exit")
        assert len(zygotes(state)) == 1  # the warm worker itself goes on
        system.ssh.close_all()


# --------------------------------------------------------------------------- the hosts' interpreters

INTERPRETER = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Interpreter
      ansible.builtin.shell: echo $PPID
"""


def test_runs_reuse_the_hosts_interpreters_one_at_a_time_and_a_cancelled_run_stops_them(
    workdir: Path, inventory_dir: Path, playbooks: Path
) -> None:
    """Mitogen's interpreter on web1 (the parent of the task's shell) outlives a run and serves the
    next; a run beside one that holds them gets its own (so it does not wait on the other's task);
    cancelling a run that holds them (its task may go on there) stops them."""
    (playbooks / "interpreter.yml").write_text(INTERPRETER)
    state = workdir / "state-interpreters"
    with warm_system(state, inventory_dir, playbooks) as system:
        manager = system.manager.start()

        def interpreter() -> str:
            job = manager.run_playbook("interpreter", owner="o", door="cli", limit="web1")
            view = manager.wait(job.id, 120)
            assert view.status == "succeeded", view.message
            events, _ = manager.output(view.id, 0, 1000)
            [pid] = [str(e.data["res"]["stdout"]) for e in events
                     if e.type == "ansible.runner_on_ok" and e.data["task"] == "Interpreter"]
            assert pid.isdigit()
            return pid

        first = interpreter()
        assert interpreter() == first  # the second run used the first one's interpreter
        slow = manager.run_playbook("slow", owner="o", door="cli", limit="web1", extra_vars={"seconds": 300})
        until(lambda: _sleeping(system, slow.id), what="the Sleep task to start")
        beside = interpreter()  # done while slow sleeps in the shared interpreter
        assert beside != first
        assert manager.get(slow.id).status == "running"
        manager.kill(slow.id, by="ops@example.test")
        assert manager.wait(slow.id, 60).status == "cancelled"
        after = interpreter()  # not stuck behind slow's sleep: a new shared interpreter
        assert after not in (first, beside)
        assert interpreter() == after
        system.ssh.close_all()


# --------------------------------------------------------------------------- the socket


def _ask(path: Path, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    answer: dict[str, object] = json.loads(data)
    return answer


def test_the_socket_refuses_another_uid_and_bad_requests(config: Path, workdir: Path) -> None:
    state = workdir / "state"
    path = sorted(zygote_dir(state).glob("*.sock"))[0]  # a warm worker of the tests above
    job_dir = next((state / "jobs").iterdir())
    for payload, why in [
        (b'{"run_dir": "/etc"}\n', "not a job directory of this state directory"),
        (json.dumps({"run_dir": str(state / "jobs" / ".." / "jobs" / job_dir.name)}).encode() + b"\n",
         "not a job directory"),
        (json.dumps({"run_dir": str(job_dir), "argv": ["id"]}).encode() + b"\n",
         "run_dir (and become_password) only"),
        (b"not json\n", "refused"),
    ]:
        answer = _ask(path, payload)
        assert "pid" not in answer and why in str(answer["error"]), answer
    # The zygote answers another uid at once, without reading: the request may meet a closed socket.
    client = ("import contextlib, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
              "with contextlib.suppress(BrokenPipeError): s.sendall(sys.argv[2].encode() + b'\\n')\n"
              "print(s.recv(4096).decode())")
    request = json.dumps({"run_dir": str(job_dir)})

    def as_nobody() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/usr/bin/python3", "-c", client, str(path), request], user=65534, cwd="/",
                              capture_output=True, text=True, timeout=30, check=False)

    assert "PermissionError" in as_nobody().stderr  # the 0700 directories and the 0600 socket
    # Even with every mode on the way opened up, another uid is refused (SO_PEERCRED).
    opened = [workdir, state, state / "run", zygote_dir(state)]
    modes = [p.stat().st_mode & 0o777 for p in opened]
    for directory in opened:
        directory.chmod(0o711)
    path.chmod(0o666)
    try:
        done = as_nobody()
    finally:
        path.chmod(0o600)
        for directory, mode in zip(opened, modes, strict=True):
            directory.chmod(mode)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"error": "refused: not the owning user"}
