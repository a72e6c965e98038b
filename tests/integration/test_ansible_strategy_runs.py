"""The Ansible strategy against the sandbox hosts: the mitogen default really runs tasks in Mitogen's
one Python per host, a catalog `strategy: linear` really runs without it, Mitogen's connection goes
through Carrier's ControlPath masters (no new ssh login) and keeps host key checking on; through
the doors (the `carrier run` process, a real MCP client): `ansible.strategy: linear` in carrier.yml,
a run on an execution node and a run with a role's become secret really run without Mitogen, and
ansible-core's warning about third-party strategy plugins is not in a job's output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from ansible_support import BUNDLED, REPO, job_system, short_tmpdir, write_config, write_inventory
from mail_support import write_secret
from mcp.client.client import Client
from mcp_http_support import ROLES, data_of, load, write_door_config
from ruamel.yaml import YAML

from carrier.jobs.system import JobSystem
from carrier.mcp.server import build_server
from carrier.sandbox.layout import HOSTS
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

#: Prints the command lines of the task's ancestors on the host: Mitogen's interpreter names
#: itself ``python3(mitogen:...)``; Ansible's own modules run in a fresh ``python3``.
WHO = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Ancestors
      ansible.builtin.shell: >-
        p=$PPID; for i in 1 2 3 4 5 6; do [ "$p" -gt 1 ] || break;
        tr '\\0' ' ' < /proc/$p/cmdline; echo; p=$(awk '{print $4}' /proc/$p/stat); done
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = short_tmpdir("cst-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inventory_dir(sandbox: Sandbox, workdir: Path) -> Path:
    return write_inventory(sandbox, workdir / "inventory")


@pytest.fixture(scope="module")
def playbooks(workdir: Path) -> Path:
    root = workdir / "playbooks"
    root.mkdir()
    (root / "who.yml").write_text(WHO)
    (root / "who_linear.yml").write_text(WHO)
    (root / "who_linear.meta.yml").write_text(textwrap.dedent("strategy: linear\n"))
    (root / "who_root.yml").write_text(WHO.replace("gather_facts: false", "gather_facts: false\n"
                                                                          "  become: true"))
    return root


@pytest.fixture(scope="module")
def system(workdir: Path, inventory_dir: Path, playbooks: Path) -> Iterator[JobSystem]:
    with job_system(workdir / "state", inventory_dir, [playbooks, BUNDLED]) as js:
        js.manager.start()
        yield js
        js.ssh.close_all()


def _ancestors(system: JobSystem, playbook: str, limit: str = "web1") -> tuple[str, str]:
    view = system.manager.run_playbook(playbook, owner="o", door="cli", limit=limit)
    view = system.manager.wait(view.id, 120)
    assert (view.status, view.reason) == ("succeeded", "ok"), view.message
    events, _ = system.manager.output(view.id, 0, 1000)
    started = next(e.data for e in events if e.type == "runner.started")
    out = " ".join(str(e.data["res"].get("stdout", "")) for e in events if e.type == "ansible.runner_on_ok")
    return str(started["strategy"]), out


def _logins(sandbox: Sandbox) -> dict[str, int]:
    return {h: sandbox.layout.log_file(f"sshd-{h}").read_text(errors="replace").count("Accepted publickey")
            for h in HOSTS}


def test_the_default_strategy_runs_tasks_in_mitogen(system: JobSystem) -> None:
    strategy, out = _ancestors(system, "who")
    assert strategy == "mitogen"
    assert "(mitogen:" in out, out


def test_a_catalog_strategy_linear_runs_without_mitogen(system: JobSystem) -> None:
    strategy, out = _ancestors(system, "who_linear")
    assert strategy == "linear"
    assert "mitogen" not in out and "sshd" in out, out


def test_mitogen_goes_through_carriers_masters(system: JobSystem, sandbox: Sandbox) -> None:
    _ancestors(system, "who", limit="all:!lab")  # every master is up after this
    before = _logins(sandbox)
    for _ in range(2):
        strategy, out = _ancestors(system, "who", limit="all:!lab")
        assert strategy == "mitogen" and out.count("(mitogen:") >= 3
    assert _logins(sandbox) == before  # no new ssh login: every session rode a ControlPath master


def test_mitogen_keeps_host_key_checking_on(workdir: Path, inventory_dir: Path, playbooks: Path) -> None:
    # A fresh state dir: no master to web1's address exists that could skip the key check.
    with job_system(workdir / "state-hostkey", inventory_dir, [playbooks]) as js:
        js.manager.start()
        job = js.manager.run_playbook("who", owner="o", door="cli", limit="stranger")
        view = js.manager.wait(job.id, 120)
        events, _ = js.manager.output(view.id, 0, 1000)
        js.ssh.close_all()
    assert next(e.data for e in events if e.type == "runner.started")["strategy"] == "mitogen"
    assert (view.status, view.reason) == ("failed", "unreachable")
    assert "Host key verification failed" in view.message


def test_an_unreachable_host_under_mitogen_reads_clearly(system: JobSystem) -> None:
    view = system.manager.run_playbook("who", owner="o", door="cli", limit="ghost,web1")
    view = system.manager.wait(view.id, 120)
    events, _ = system.manager.output(view.id, 0, 1000)
    assert next(e.data for e in events if e.type == "runner.started")["strategy"] == "mitogen"
    assert (view.status, view.reason) == ("failed", "unreachable")
    # Mitogen's own "EOF on stream; last 100 lines received: ..." comes out as ssh's last word.
    assert view.message.startswith("unreachable: ghost (Task failed: the ssh connection ended: ssh: connect "
                                   "to host 127.0.0.14 port "), view.message
    assert view.message.endswith(": Connection refused)") and "EOF on stream" not in view.message


def test_an_adhoc_raw_job_runs_linear(system: JobSystem) -> None:
    options = {"args": "echo raw-ok", "shell": True}  # the job's shell permission, no local shell
    view = system.manager.run_adhoc("raw", "web1", owner="o", door="cli", **options)
    view = system.manager.wait(view.id, 120)
    assert (view.status, view.reason) == ("succeeded", "ok"), view.message
    events, _ = system.manager.output(view.id, 0, 1000)
    assert next(e.data for e in events if e.type == "runner.started")["strategy"] == "linear"


# --------------------------------------------------------------------------- through the doors

#: Ansible-core 2.19's deprecation warning when a play runs under a strategy plugin from outside
#: ansible.builtin (Mitogen's); Carrier's run environment keeps it out of job output.
PLUGIN_WARNING = "strategy plugins not included in ansible.builtin"
#: An execution node as in test_nodes: db1's sshd, serving the web group, Debian's ansible-runner.
NODE = {"name": "exec1", "target": "db1", "groups": ["web"], "capacity": 2,
        "ansible_runner": "/usr/bin/ansible-runner"}


def _cli_config(sandbox: Sandbox, workdir: Path, playbooks: Path, name: str, **extra: Any) -> Path:
    path = write_config(sandbox, workdir / f"{name}.yml", state=workdir / f"state-{name}",
                        inventory=workdir / "inventory", playbook_dirs=[playbooks])
    yaml = YAML()
    data = yaml.load(path.read_text())
    data.update(extra)
    with open(path, "w") as fh:
        yaml.dump(data, fh)
    return path


def _carrier_run(config: Path, playbook: str, limit: str) -> tuple[dict[str, Any], str, str]:
    """``carrier run PLAYBOOK --wait --json`` as a process: the runner.started event's data, the
    tasks' stdout, and everything the command printed."""
    done = subprocess.run(
        [sys.executable, "-m", "carrier", "run", playbook, "--config", str(config), "-l", limit, "--wait",
         "--json"], capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"seq"')]
    started = next(e["data"] for e in events if e["type"] == "runner.started")
    out = " ".join(str(e["data"].get("res", {}).get("stdout", "")) for e in events
                   if e["type"] == "ansible.runner_on_ok")
    return started, out, done.stdout + done.stderr


def test_carrier_run_uses_mitogen_by_default_without_the_plugin_warning(
        sandbox: Sandbox, workdir: Path, inventory_dir: Path, playbooks: Path) -> None:
    config = _cli_config(sandbox, workdir, playbooks, "cli-default")
    started, out, printed = _carrier_run(config, "who", "web1")
    assert started["strategy"] == "mitogen" and "(mitogen:" in out, out
    assert PLUGIN_WARNING not in printed and "DEPRECATION" not in printed, printed


def test_carrier_run_with_strategy_linear_in_carrier_yml_runs_without_mitogen(
        sandbox: Sandbox, workdir: Path, inventory_dir: Path, playbooks: Path) -> None:
    config = _cli_config(sandbox, workdir, playbooks, "cli-linear", ansible={"strategy": "linear"})
    started, out, _ = _carrier_run(config, "who", "web1")
    assert started["strategy"] == "linear"
    assert "mitogen" not in out and "sshd" in out, out


def test_carrier_run_on_an_execution_node_runs_linear_there(
        sandbox: Sandbox, workdir: Path, inventory_dir: Path, playbooks: Path) -> None:
    # The default is mitogen, but the node's own ansible-runner has no Mitogen.
    config = _cli_config(sandbox, workdir, playbooks, "cli-node", execution_nodes=[NODE])
    started, out, printed = _carrier_run(config, "who", "web1")
    assert (started["node"], started["strategy"]) == ("exec1", "linear"), printed
    assert "mitogen" not in out and "sshd" in out, out
    here, out, _ = _carrier_run(config, "who", "db1")  # db1 is not in the node's groups: controller
    assert "node" not in here and here["strategy"] == "mitogen" and "(mitogen:" in out, out


def _mcp_config(sandbox: Sandbox, workdir: Path, playbooks: Path, role: str) -> Any:
    directory = workdir / f"mcp-{role}"
    password = sandbox.layout.password_file("sudo").read_text().strip()
    secret = write_secret(directory / "web_sudo.pass", password)
    roles = {**ROLES,
             "web": {"playbooks": ["*"], "hosts": "all", "become_secret": "web_sudo",
                     "secrets": ["web_sudo"]},
             "nosecret": {"playbooks": ["*"], "hosts": "all"}}
    return load(write_door_config(
        sandbox, directory, port_shift=37, mcp={"stdio_role": role},
        extra={"inventory": str(workdir / "inventory"), "playbook_dirs": [str(playbooks)], "roles": roles,
               "secrets": {"web_sudo": {"file": str(secret)}}}))


def _mcp_run(config: Any, playbook: str) -> tuple[dict[str, Any], str, str]:
    """``playbook_run`` then ``job_output`` over a real MCP client session: the run's result, the
    strategy in its runner.started event, and its whole output as text."""
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))

    async def session() -> tuple[dict[str, Any], str, str]:
        async with Client(server) as client:
            ran = data_of(await client.call_tool(
                "playbook_run", {"playbook": playbook, "limit": "web1", "wait": True, "timeout": 240}))
            output = data_of(await client.call_tool("job_output", {"job_id": ran["job_id"],
                                                                  "max_bytes": 1 << 20}))
            started = next(e for e in output["events"] if e["type"] == "runner.started")
            return ran, str(started["data"]["strategy"]), json.dumps(output)

    try:
        return anyio.run(session)
    finally:
        context.close()


def test_a_become_secret_run_over_mcp_runs_linear(sandbox: Sandbox, workdir: Path, inventory_dir: Path,
                                                  playbooks: Path) -> None:
    ran, strategy, output = _mcp_run(_mcp_config(sandbox, workdir, playbooks, "web"), "who_root")
    assert (ran["status"], strategy) == ("succeeded", "linear"), ran
    assert "sudo" in output and "mitogen" not in output, output[:4000]
    # The same play by a role without a become secret: the default, Mitogen.
    ran, strategy, output = _mcp_run(_mcp_config(sandbox, workdir, playbooks, "nosecret"), "who")
    assert (ran["status"], strategy) == ("succeeded", "mitogen"), ran
    assert "(mitogen:" in output and PLUGIN_WARNING not in output, output[:4000]
