"""The Ansible engine against the sandbox sshd hosts: pattern resolution equal to Ansible's own
CLI, the exec fast path over ControlPersist masters, master lifecycle, host key checking."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_support import GHOST_ADDRESS, short_tmpdir, write_inventory

from carrier.ansible.fastpath import exec_command, exec_on_hosts
from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl, ssh_disconnect, ssh_list
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

PATTERNS = ["all", "web", "db", "web:&web1", "all:!db1", "web:!web2", "w*", "web[1]", "db1,web2",
            "all:!lab", "web:db", "lab", "*1"]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = short_tmpdir("cae-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inventory_dir(sandbox: Sandbox, workdir: Path) -> Path:
    return write_inventory(sandbox, workdir / "inventory")


@pytest.fixture(scope="module")
def inventory(inventory_dir: Path) -> Inventory:
    return Inventory(inventory_dir)


@pytest.fixture(scope="module")
def control(workdir: Path) -> Iterator[SshControl]:
    ssh = SshControl(workdir / "state")
    yield ssh
    ssh.close_all()


def ansible_cli(name: str, *args: str, workdir: Path) -> str:
    binary = Path(sys.executable).with_name(name)
    env = {"PATH": os.environ["PATH"], "HOME": str(workdir), "ANSIBLE_LOCAL_TEMP": str(workdir / "atmp"),
           "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    return done.stdout


# --------------------------------------------------------------------------- inventory == ansible


def test_groups_equal_ansible_inventory_list(inventory: Inventory, inventory_dir: Path,
                                            workdir: Path) -> None:
    out = ansible_cli("ansible-inventory", "-i", str(inventory_dir), "--list", workdir=workdir)
    listed = json.loads(out)

    def members(group: str) -> set[str]:
        node = listed.get(group, {})
        found = set(node.get("hosts", []))
        for child in node.get("children", []):
            found |= members(child)
        return found

    ours = {group: set(hosts) for group, hosts in inventory.groups().items() if hosts}
    theirs = {group: members(group) for group in listed if group != "_meta"}
    assert ours == {group: hosts for group, hosts in theirs.items() if hosts}  # (empty ones are left out)
    assert ours["web"] == {"web1", "web2"} and ours["lab"] == {"ghost", "stranger"}
    hostvars = listed["_meta"]["hostvars"]
    for host in inventory.hosts():
        conn = inventory.conn(host)
        assert conn.address == hostvars[host]["ansible_host"]
        assert conn.port == hostvars[host]["ansible_port"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_resolution_equals_ansible(inventory: Inventory, inventory_dir: Path, workdir: Path,
                                           pattern: str) -> None:
    out = ansible_cli("ansible", "-i", str(inventory_dir), pattern, "--list-hosts", workdir=workdir)
    theirs = [line.strip() for line in out.splitlines()[1:] if line.strip()]
    assert inventory.resolve(pattern) == theirs


# --------------------------------------------------------------------------- exec fast path


def test_exec_reaches_every_host_over_its_own_connection(inventory: Inventory, control: SshControl) -> None:
    conns = [inventory.conn(h) for h in inventory.resolve("web:db")]
    results = exec_on_hosts(control, conns, ["sh", "-c", 'echo "${SSH_CONNECTION##* }" $(id -un)'])
    got = {r.host: (r.status, r.rc, r.stdout, r.stderr) for r in results}
    port = inventory.conn("web1").port
    assert got == {
        "web1": ("ok", 0, f"{port} carrier-sbx\n", ""),
        "web2": ("ok", 0, f"{port} carrier-sbx\n", ""),
        "db1": ("ok", 0, f"{port} carrier-sbx\n", ""),
    }
    addresses = exec_on_hosts(control, conns, ["sh", "-c", 'echo "$SSH_CONNECTION" | cut -d" " -f3'])
    assert [r.stdout for r in addresses] == ["127.0.0.11\n", "127.0.0.12\n", "127.0.0.13\n"]


def test_exec_argv_never_reaches_a_shell(inventory: Inventory, control: SshControl, workdir: Path) -> None:
    marker = Path("/tmp") / f"carrier-pwned-{workdir.name}"
    result = exec_command(control, inventory.conn("web1"), ["echo", f"a; touch {marker}", "$(id)", "`id`"])
    assert (result.status, result.stdout) == ("ok", f"a; touch {marker} $(id) `id`\n")
    assert not marker.exists()


def test_exec_shell_mode_runs_a_pipeline(inventory: Inventory, control: SshControl) -> None:
    result = exec_command(control, inventory.conn("db1"), "echo $((6*7)) | tr 4 x", shell=True)  # noqa: S604
    assert (result.status, result.stdout) == ("ok", "x2\n")


def test_exec_exit_code_stderr_and_output_cap(inventory: Inventory, control: SshControl) -> None:
    failed = exec_command(control, inventory.conn("web2"), ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (failed.status, failed.rc, failed.stdout, failed.stderr) == ("failed", 7, "out\n", "err\n")
    big = exec_command(control, inventory.conn("web2"), ["seq", "1", "200000"], cap=1000)
    assert big.truncated and big.stdout.startswith("1\n2\n") and big.stdout.endswith("199999\n200000\n")
    assert "[... carrier: output truncated," in big.stdout and "(limit 1000 bytes)" in big.stdout


def test_unreachable_host_is_a_result_not_an_exception(inventory: Inventory, control: SshControl) -> None:
    result = exec_command(control, inventory.conn("ghost"), ["true"])
    assert (result.status, result.rc) == ("unreachable", None)
    assert f"connect to host {GHOST_ADDRESS}" in result.stderr and "Connection refused" in result.stderr


def test_host_key_checking_is_enforced(inventory: Inventory, workdir: Path) -> None:
    # Its own control dir: "stranger" is web1's address, port and user, so with a master to web1
    # already up it would share that (%C hashes exactly those) and never check a key.
    control = SshControl(workdir / "state-stranger")
    try:
        result = exec_command(control, inventory.conn("stranger"), ["true"])
    finally:
        control.close_all()
    assert result.status == "unreachable"
    assert "Host key verification failed" in result.stderr


# --------------------------------------------------------------------------- masters


def test_one_master_per_host_reused_then_recreated_after_it_dies(inventory: Inventory, workdir: Path) -> None:
    control = SshControl(workdir / "state-masters")
    web1 = inventory.conn("web1")
    try:
        for _ in range(5):
            assert exec_command(control, web1, ["true"]).status == "ok"
        assert control.started["web1"] == 1
        info = control.check(web1)
        assert info.running and info.pid is not None
        assert Path(info.control_path).parent == control.control_dir
        # The master's stderr is never a pipe back to us (ssh -f points it at /dev/null once
        # connected; until then it is the log file, where a failed start's words are read).
        fd2 = os.readlink(f"/proc/{info.pid}/fd/2")
        assert not fd2.startswith("pipe:") and fd2 in ("/dev/null", str(control.log_file(web1)))
        # It dies (here: asked to exit); the next command starts a new one.
        assert control.disconnect(web1) is True
        assert not control.check(web1).running
        assert exec_command(control, web1, ["echo", "again"]).stdout == "again\n"
        assert control.started["web1"] == 2
        assert control.check(web1).pid != info.pid
    finally:
        control.close_all()
    assert control.sockets() == []


def test_ssh_list_and_disconnect(inventory: Inventory, workdir: Path) -> None:
    control = SshControl(workdir / "state-list")
    try:
        exec_command(control, inventory.conn("web2"), ["true"])
        listed = {m.host: m for m in ssh_list(control, inventory, "web:db")}
        assert set(listed) == {"web1", "web2", "db1"}
        assert listed["web2"].running and not listed["web1"].running
        assert "Master running" in listed["web2"].detail
        assert ssh_disconnect(control, inventory, "web2") is True
        assert ssh_disconnect(control, inventory, "web2") is False
        assert not any(m.running for m in ssh_list(control, inventory, "web"))
    finally:
        control.close_all()


def test_exec_and_ansible_share_the_same_control_socket(inventory: Inventory, inventory_dir: Path,
                                                        workdir: Path) -> None:
    """ansible-playbook with Carrier's environment uses the master the fast path started."""
    from carrier.ansible.runner import ansible_env

    control = SshControl(workdir / "state-share")
    try:
        web1 = inventory.conn("web1")
        control.ensure_master(web1)
        before = control.check(web1).pid
        env = ansible_env(ssh_env=control.ansible_env(), local_temp=workdir / "share-tmp", forks=5)
        env["HOME"] = str(workdir)
        binary = Path(sys.executable).with_name("ansible")
        done = subprocess.run([str(binary), "-i", str(inventory_dir), "web1", "-m", "ping", "-o"],
                              capture_output=True, text=True, env=env, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert control.check(web1).pid == before  # no second master
        assert len(control.sockets()) == 1
    finally:
        control.close_all()
