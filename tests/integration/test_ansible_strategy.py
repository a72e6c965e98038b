"""The Ansible strategy against the sandbox hosts: the mitogen default really runs tasks in Mitogen's
one Python per host, a catalog `strategy: linear` really runs without it, Mitogen's connection goes
through Carrier's ControlPath masters (no new ssh login) and keeps host key checking on."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_support import BUNDLED, job_system, short_tmpdir, write_inventory

from carrier.jobs.system import JobSystem
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


def test_an_adhoc_raw_job_runs_linear(system: JobSystem) -> None:
    options = {"args": "echo raw-ok", "shell": True}  # the job's shell permission, no local shell
    view = system.manager.run_adhoc("raw", "web1", owner="o", door="cli", **options)
    view = system.manager.wait(view.id, 120)
    assert (view.status, view.reason) == ("succeeded", "ok"), view.message
    events, _ = system.manager.output(view.id, 0, 1000)
    assert next(e.data for e in events if e.type == "runner.started")["strategy"] == "linear"
