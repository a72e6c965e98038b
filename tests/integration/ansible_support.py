"""Shared pieces for the Ansible engine and job tests against the sandbox hosts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ruamel.yaml import YAML

from carrier.jobs.system import JobSystem, assemble_job_system
from carrier.sandbox.manager import Sandbox
from carrier.store import Store

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "playbooks"
#: An address on loopback where nothing listens: connection refused.
GHOST_ADDRESS = "127.0.0.14"

TEST_PLAYBOOKS = {
    "fail.yml": """\
        - hosts: all
          gather_facts: false
          tasks:
            - name: Fail on web2
              ansible.builtin.command: "false"
              when: inventory_hostname == 'web2'
        """,
    "bad.yml": """\
        - hosts: all
          tasks:
            - ansible.builtin.ping:
             foo: [
        """,
    "slow.yml": """\
        - hosts: all
          gather_facts: false
          tasks:
            - name: Sleep
              ansible.builtin.command: "sleep {{ seconds }}"
            - name: After
              ansible.builtin.command: echo after
        """,
    "slow.meta.yml": """\
        description: sleeps
        vars:
          seconds: {type: int, default: 3, min: 0, max: 600}
        """,
    "five.yml": """\
        - name: Five tasks
          hosts: all
          gather_facts: false
          tasks:
            - name: One
              ansible.builtin.command: uname -n
            - name: Two
              ansible.builtin.stat:
                path: /etc/hostname
            - name: Three
              ansible.builtin.shell: echo "$HOME" | wc -c
            - name: Four
              ansible.builtin.ping:
            - name: Five
              ansible.builtin.set_fact:
                seen: true
        """,
    "noisy.yml": """\
        - hosts: all
          gather_facts: false
          tasks:
            - name: Print a lot
              ansible.builtin.command: seq 1 20000
        """,
}


def short_tmpdir(prefix: str) -> Path:
    """A directory under /var/tmp with a short path (control sockets live in it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o700)
    return path


def write_playbooks(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in TEST_PLAYBOOKS.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def write_inventory(sandbox: Sandbox, root: Path) -> Path:
    """The sandbox inventory plus ``ghost`` (nothing listens) and ``stranger`` (web1 with an empty
    known_hosts file: its host key is unknown)."""
    shutil.copytree(sandbox.layout.inventory_dir, root, dirs_exist_ok=True)
    empty_known = root.parent / "empty_known_hosts"
    empty_known.write_text("")
    yaml = YAML()
    hosts_file = root / "hosts.yml"
    data = yaml.load(hosts_file.read_text())
    port = sandbox.layout.ports.ssh
    key = str(sandbox.layout.ssh_client_key)
    data["all"]["children"]["lab"] = {
        "hosts": {
            "ghost": {"ansible_host": GHOST_ADDRESS, "ansible_port": port, "ansible_user": "carrier-sbx",
                      "ansible_ssh_private_key_file": key},
            "stranger": {"ansible_host": "127.0.0.11", "ansible_port": port, "ansible_user": "carrier-sbx",
                         "ansible_ssh_private_key_file": key,
                         "ansible_ssh_extra_args": f"-o UserKnownHostsFile={empty_known} "
                                                   "-o StrictHostKeyChecking=yes"},
        }
    }
    with open(hosts_file, "w") as fh:
        yaml.dump(data, fh)
    return root


def build(state: Path, inventory: Path, playbook_dirs: list[Path], **limits: int) -> JobSystem:
    """The product's own assembly, on a fresh store, polling fast for tests."""
    return assemble_job_system(Store.open(state), state, inventory, playbook_dirs, poll=0.05, **limits)


@contextmanager
def job_system(state: Path, inventory: Path, playbook_dirs: list[Path], **limits: int) -> Iterator[JobSystem]:
    system = build(state, inventory, playbook_dirs, **limits)
    try:
        yield system
    finally:
        system.manager.close()
        system.manager.store.close()


def until(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value`` (zombies have none)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def carrier_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The ``carrier`` CLI as a process, from this tree."""
    return subprocess.run([sys.executable, "-m", "carrier", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})


def write_config(
    sandbox: Sandbox, path: Path, *, state: Path, inventory: Path, playbook_dirs: list[Path]
) -> Path:
    """A carrier.yml like the sandbox's, with this test's state dir, inventory and playbooks."""
    yaml = YAML()
    data = yaml.load(sandbox.layout.config_file.read_text())
    data["state_dir"] = str(state)
    data["inventory"] = str(inventory)
    data["playbook_dirs"] = [str(p) for p in playbook_dirs]
    with open(path, "w") as fh:
        yaml.dump(data, fh)
    os.chmod(path, 0o600)
    return path
