"""Exec jobs on ``connection: local`` hosts (no ssh needed): argv without a shell, shell only when
asked, exit codes, output caps, timeout, cancel, and bad input refused before a job exists."""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carrier.ansible.errors import ControllerError, EngineError, PatternError, SshError
from carrier.ansible.fastpath import ExecResult
from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl
from carrier.jobs.engines import ExecEngine, exec_outcome
from carrier.jobs.manager import Manager
from carrier.store import Store

#: These hosts are the controller (connection local): run as a caller the policy allowed to.
CLI: dict[str, Any] = {"door": "cli", "controller": True}


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    inv = tmp_path / "inventory.yml"
    inv.write_text(textwrap.dedent("""\
        all:
          children:
            local:
              hosts:
                here1: {ansible_connection: local}
                here2: {ansible_connection: local}
        """))
    state = tmp_path / "state"
    store = Store.open(state)
    inventory = Inventory(inv)
    control = SshControl(state)
    m = Manager(store, state, engines=[ExecEngine(inventory, control)], output_max_bytes=4096,
                poll=0.02).start()
    yield m
    m.close()
    store.close()
    control.discard()


def results(m: Manager, job_id: str) -> dict[str, dict[str, object]]:
    events, _ = m.output(job_id)
    return {str(e.data["host"]): e.data for e in events if e.type == "exec.result"}


def test_argv_runs_without_a_shell(manager: Manager, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    view = manager.run_exec("local", ["echo", "$HOME", f";touch {marker}"], owner="o", **CLI)
    view = manager.wait(view.id, 20)
    assert (view.status, view.message) == ("succeeded", "succeeded: exit 0 on here1, here2")
    got = results(manager, view.id)
    assert got["here1"]["stdout"] == f"$HOME ;touch {marker}\n"
    assert got["here2"]["rc"] == 0
    assert not marker.exists()


def test_shell_when_allowed(manager: Manager) -> None:
    job = manager.run_exec("here1", "echo $((6*7)) | tr 4 x", owner="o", **CLI, shell=True)  # noqa: S604
    view = manager.wait(job.id, 20)
    assert view.status == "succeeded"
    assert results(manager, view.id)["here1"]["stdout"] == "x2\n"


def test_exit_codes_and_stderr(manager: Manager) -> None:
    view = manager.wait(manager.run_exec("local", ["sh", "-c", "echo oops >&2; exit 3"], owner="o",
                                         **CLI).id, 20)
    assert (view.status, view.reason, view.rc) == ("failed", "failed", 3)
    assert view.message == "failed: exit 3 on here1, here2"
    assert results(manager, view.id)["here1"]["stderr"] == "oops\n"
    assert view.summary["hosts"]["here1"] == {"status": "failed", "rc": 3}


def test_output_is_capped_with_a_mark(manager: Manager) -> None:
    view = manager.wait(manager.run_exec("here1", ["seq", "1", "100000"], owner="o", **CLI).id, 20)
    out = str(results(manager, view.id)["here1"]["stdout"])
    assert out.startswith("1\n2\n3\n") and out.endswith("99999\n100000\n")
    assert "[... carrier: output truncated," in out
    assert results(manager, view.id)["here1"]["truncated"] is True
    assert len(out) < 3000


def test_timeout_stops_the_command(manager: Manager) -> None:
    view = manager.wait(manager.run_exec("here1", ["sleep", "30"], owner="o", **CLI, timeout=1).id, 20)
    assert (view.status, view.reason) == ("failed", "timeout")
    assert view.message == "failed: timed out on here1"
    assert "timed out after 1 s" in str(results(manager, view.id)["here1"]["stderr"])


def test_kill_stops_a_running_command(manager: Manager) -> None:
    view = manager.run_exec("here1", ["sleep", "30"], owner="o", **CLI)
    deadline = time.monotonic() + 20
    while manager.get(view.id).status != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    manager.kill(view.id, by="ops@example.test")
    done = manager.wait(view.id, 20)
    assert done.status == "cancelled"
    assert done.message == "cancelled by ops@example.test: the command was stopped"


@pytest.mark.parametrize(
    ("pattern", "command", "shell", "error", "message"),
    [
        ("here1;id", ["true"], False, PatternError, "';'"),
        ("nosuch", ["true"], False, PatternError, "unknown host or group"),
        ("here1", "echo hi", False, SshError, "must be a list of arguments"),
        ("here1", [], False, SshError, "empty"),
        ("here1", [1, 2], False, EngineError, "list of arguments"),
    ],
)
def test_bad_input_is_refused_and_no_job_is_made(
    manager: Manager, pattern: str, command: object, shell: bool, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        manager.run_exec(pattern, command, owner="o", **CLI, shell=shell)  # type: ignore[arg-type]
    assert manager.list_jobs() == []


@pytest.mark.parametrize("pattern", ["local", "here1", "all", "here1,here2"])
def test_controller_hosts_are_refused_unless_the_policy_allowed_them(
    manager: Manager, tmp_path: Path, pattern: str
) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ControllerError, match="the Carrier controller itself"):
        manager.run_exec(pattern, ["touch", str(marker)], owner="o", door="cli")
    assert manager.list_jobs() == []
    assert not marker.exists()


@pytest.mark.parametrize("pattern", ["localhost", "127.0.0.1", "::1", "here1,127.0.0.1", "all:localhost"])
def test_implicit_localhost_is_never_a_target_even_when_local_is_allowed(
    manager: Manager, tmp_path: Path, pattern: str
) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ControllerError, match="implicit localhost"):
        manager.run_exec(pattern, ["touch", str(marker)], owner="o", **CLI)
    assert manager.list_jobs() == []
    assert not marker.exists()


def test_exec_outcome_names_every_kind_of_trouble() -> None:
    rs = [
        ExecResult("a", "ok", 0, "", "", False, 0.1),
        ExecResult("b", "failed", 2, "", "", False, 0.1),
        ExecResult("c", "failed", 2, "", "", False, 0.1),
        ExecResult("d", "unreachable", None, "", "ssh: connect to host d port 22:\n Connection refused\n",
                   False, 0),
        ExecResult("e", "timeout", None, "", "", False, 5.0),
    ]
    out = exec_outcome(rs)
    assert (out.status, out.reason, out.rc) == ("failed", "failed", 2)
    assert out.message == ("failed: exit 2 on b, c; unreachable: d (ssh: connect to host d port 22: "
                           "Connection refused); timed out on e")
    only_dark = exec_outcome([ExecResult("d", "unreachable", None, "", "no route", False, 0)])
    assert (only_dark.reason, only_dark.message) == ("unreachable", "failed: unreachable: d (no route)")


def test_results_arrive_as_each_host_finishes(manager: Manager) -> None:
    seen: list[str] = []
    lock = threading.Lock()
    view = manager.run_exec("local", ["sh", "-c", "echo done"], owner="o", **CLI)
    manager.wait(view.id, 20)
    for event in manager.output(view.id)[0]:
        if event.type == "exec.result":
            with lock:
                seen.append(str(event.data["host"]))
    assert sorted(seen) == ["here1", "here2"]
