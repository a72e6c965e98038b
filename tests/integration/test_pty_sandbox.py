"""PTY jobs driving real programs on the sandbox hosts over their ControlPersist masters.

Done-when checks: a ``dialog --menu`` navigated with arrow keys (in tmux, and plainly through
``ssh -tt``, where the keys must follow the program's application cursor mode), ``vim`` edited
and saved, ``top``'s header read from the screen, and a tmux-backed job driven across a Carrier
restart. Also: signals vs ssh errors, many jobs on one host over one ssh channel (no new logins
beyond MaxSessions), another process driving a job it does not supervise, bad input, no zombies.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_support import short_tmpdir
from pty_support import kill_tmux_server, until, zombie_children

from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl
from carrier.jobs.errors import JobError, JobNotFound
from carrier.jobs.keys import UnknownKey
from carrier.jobs.manager import Manager
from carrier.jobs.pty import PtyError, PtyJob, PtyRunner, PtySpec
from carrier.jobs.ptyengine import PtyEngine, PtyJobs
from carrier.sandbox.layout import LOGIN_USER
from carrier.sandbox.manager import Sandbox
from carrier.store import Store, new_job_id

pytestmark = pytest.mark.sandbox

SOCKET = f"carrier-test-{os.getpid()}"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = short_tmpdir("cpty-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ssh(workdir: Path, sandbox: Sandbox) -> Iterator[SshControl]:
    control = SshControl(workdir / "state")
    yield control
    # Stop the test's tmux server on the hosts (all three are this machine, same login user).
    kill_tmux_server(SOCKET, ["ssh", "-F", str(sandbox.layout.ssh_config), "web1"])
    control.close_all()


@pytest.fixture(scope="module")
def inventory(sandbox: Sandbox) -> Inventory:
    return Inventory(sandbox.layout.inventory_dir)


@pytest.fixture(scope="module")
def runner(ssh: SshControl) -> Iterator[PtyRunner]:
    r = PtyRunner(ssh, tmux_socket=SOCKET)
    yield r
    r.close()


def run(runner: PtyRunner, inventory: Inventory, workdir: Path, host: str, command: str | list[str], *,
        mode: str = "auto", cols: int = 100, rows: int = 30) -> PtyJob:
    job_id = new_job_id()
    shell = isinstance(command, str)
    spec = PtySpec(job_id, host, command if shell else tuple(command), shell=shell, mode=mode,
                   cols=cols, rows=rows)
    return runner.start(spec, inventory.conn(host), workdir / "jobs" / job_id)


def remote(sandbox: Sandbox, host: str, command: str) -> str:
    done = subprocess.run(["ssh", "-F", str(sandbox.layout.ssh_config), host, command],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=True)
    return done.stdout


# --------------------------------------------------------------------------- done when


@pytest.mark.parametrize("mode", ["tmux", "plain"])
def test_dialog_menu_driven_with_arrow_keys(runner: PtyRunner, inventory: Inventory, workdir: Path,
                                             mode: str) -> None:
    tag = new_job_id()
    choice = f"$HOME/.dialog-{tag}"
    job = run(runner, inventory, workdir, "web2",
              f"dialog --menu 'Pick a fruit' 14 40 4 a Apple b Banana c Cherry d Date 2>{choice}; "
              f'echo "rc=$? choice=$(cat {choice})"; rm -f {choice}', mode=mode)
    assert job.mode == mode
    assert job.wait("Cherry", timeout=20).reason == "match"
    job.wait(idle_ms=300, timeout=5)
    screen = job.screen()
    assert "Pick a fruit" in screen.text
    assert "┌" in screen.text and "│" in screen.text  # line drawing, not "lqqk"
    assert screen.app_cursor  # dialog turned on keypad mode: arrows must be ESC O B
    cursor = job.input(keys=["down", "down", "down", "up"])  # Apple -> Banana -> Cherry -> Date -> Cherry
    job.wait(idle_ms=300, timeout=5, since=cursor)
    job.input(keys=["enter"])
    found = job.wait(r"rc=\d+ choice=\w*", timeout=20)
    assert found.match == "rc=0 choice=c"
    info = job.wait_exit(20)
    assert info is not None and info.succeeded


def test_vim_edits_and_saves_a_file(runner: PtyRunner, inventory: Inventory, workdir: Path,
                                    sandbox: Sandbox) -> None:
    path = f"{pwd.getpwnam(LOGIN_USER).pw_dir}/vim-{new_job_id()}.txt"
    job = run(runner, inventory, workdir, "web1", ["vi", "-u", "NONE", "-i", "NONE", "-n", path])
    assert job.wait(r"^~", timeout=20).reason == "match"  # empty-buffer tildes: vim is up
    assert job.screen().alternate
    job.input("ihello from carrier")
    job.input("\nsecond line ünïcode", ["esc"])
    job.wait(idle_ms=300, timeout=5)
    job.input(":wq", ["enter"])
    info = job.wait_exit(20)
    assert info is not None and info.succeeded, info
    try:
        assert remote(sandbox, "web1", f"cat {path}") == "hello from carrier\nsecond line ünïcode\n"
    finally:
        remote(sandbox, "web1", f"rm -f {path}")


def test_top_header_read_from_the_screen(runner: PtyRunner, inventory: Inventory, workdir: Path) -> None:
    job = run(runner, inventory, workdir, "db1", ["top", "-d", "1"], cols=120, rows=30)
    assert job.wait(r"^top - \d\d:\d\d:\d\d", timeout=20).reason == "match"
    job.wait(r"^Tasks:", timeout=10)
    screen = job.screen()
    assert screen.source == "tmux" and screen.app_cursor  # top turns on keypad mode (no alternate screen)
    assert screen.rows[0].startswith("top - ")
    assert any(row.startswith("Tasks:") for row in screen.rows[:5])
    assert any("Mem" in row for row in screen.rows[:6])
    job.input("q")
    info = job.wait_exit(20)
    assert info is not None and info.succeeded


def _manager(store: Store, state: Path, inventory: Inventory, ssh: SshControl) -> tuple[Manager, PtyEngine]:
    engine = PtyEngine(inventory, ssh, runner=PtyRunner(ssh, tmux_socket=SOCKET))
    manager = Manager(store, state, engines=[engine], max_jobs=40, max_jobs_per_host=20, poll=0.05)
    return manager, engine


def test_tmux_job_survives_a_carrier_restart(workdir: Path, inventory: Inventory, ssh: SshControl) -> None:
    state = workdir / "restart-state"
    store = Store.open(state)
    manager, engine = _manager(store, state, inventory, ssh)
    manager.start(adopt=True)
    doors = PtyJobs(manager, engine)
    view = doors.start("web1", ["sh", "-c", "echo ready; while read l; do echo got:$l; done"],
                       owner="test", door="cli")
    assert view.status == "running"
    assert doors.wait(view.id, "ready", timeout=20).reason == "match"
    doors.input(view.id, "before", ["enter"])
    assert doors.wait(view.id, "got:before", timeout=20).reason == "match"
    cursor_before = doors.output(view.id).next_cursor
    # Carrier stops: the job is handed back, its program goes on in tmux.
    manager.close()
    engine.close()
    store.close()

    store = Store.open(state)
    manager, engine = _manager(store, state, inventory, ssh)
    manager.start(adopt=True)  # what `carrier serve` does: adopt jobs whose Carrier is gone
    try:
        doors = PtyJobs(manager, engine)
        until(lambda: engine.live(view.id) is not None, 20, "re-attach")
        assert manager.get(view.id).status == "running"
        cursor = doors.input(view.id, "after", ["enter"])
        assert cursor == cursor_before  # the output cursors carry on where they were
        assert doors.wait(view.id, "got:after", timeout=20).reason == "match"
        assert "got:before" in doors.screen(view.id).text
        doors.input(view.id, keys=["ctrl-d"])
        final = manager.wait(view.id, timeout=30)
        assert (final.status, final.rc) == ("succeeded", 0)
        text = doors.output(view.id).text()
        assert "got:before" in text and "got:after" in text
        types = [e.type for e in store.events_since(view.id, 0, 100)[0]]
        assert "pty.reattached" in types and types[-1] == "job.finished"
        # A finished job still answers: output from the kept log, its last screen.
        assert "got:after" in doors.screen(view.id).text
        with pytest.raises(PtyError, match="has ended"):
            doors.input(view.id, "late")
    finally:
        manager.close()
        engine.close()
        store.close()


def test_another_process_drives_a_job_it_does_not_supervise(workdir: Path, inventory: Inventory,
                                                           ssh: SshControl) -> None:
    state = workdir / "observer-state"
    store = Store.open(state)
    manager, engine = _manager(store, state, inventory, ssh)
    manager.start()
    # A second manager on the same store (a CLI beside `carrier serve`).
    other_store = Store.open(state)
    other, other_engine = _manager(other_store, state, inventory, ssh)
    try:
        doors = PtyJobs(manager, engine)
        view = doors.start("web2", ["sh", "-c", "while read l; do echo got:$l; done"], owner="t", door="mcp")
        cli = PtyJobs(other, other_engine)
        cursor = cli.input(view.id, "from the cli", ["enter"])
        assert engine.live(view.id) is not None and other_engine.live(view.id) is None  # not taken over
        assert cli.wait(view.id, "got:from the cli", timeout=20, since=cursor).reason == "match"
        until(lambda: "got:from the cli" in cli.output(view.id).text(), 10, "log written by the supervisor")
        assert "got:from the cli" in cli.screen(view.id).text
        doors.input(view.id, keys=["ctrl-d"])
        assert manager.wait(view.id, timeout=30).status == "succeeded"
    finally:
        other.close()
        other_engine.close()
        other_store.close()
        manager.close()
        engine.close()
        store.close()


# --------------------------------------------------------------------------- exit, signals, limits


@pytest.mark.parametrize("mode", ["tmux", "plain"])
@pytest.mark.parametrize("signal", ["TERM", "INT", "HUP"])
def test_signal_death_is_recorded(runner: PtyRunner, inventory: Inventory, workdir: Path, mode: str,
                                  signal: str) -> None:
    job = run(runner, inventory, workdir, "web1", "echo started; exec sleep 300", mode=mode)
    assert job.wait("started", timeout=20).reason == "match"
    job.kill(signal)
    info = job.wait_exit(60)  # generous: a full suite on 2 cores once took over 20 s here
    assert info is not None and info.reason == "signal", (info, job.output(0).text()[-500:])
    assert info.to_dict()["signal_name"] == signal


def test_ssh_failure_is_not_a_signal(runner: PtyRunner, inventory: Inventory, workdir: Path,
                                     ssh: SshControl, sandbox: Sandbox) -> None:
    job = run(runner, inventory, workdir, "db1", "echo started; exec sleep 300", mode="plain")
    assert job.wait("started", timeout=20).reason == "match"
    assert ssh.disconnect(inventory.conn("db1"))  # the master goes away under the session
    info = job.wait_exit(20)
    assert info is not None and info.reason == "ssh_error" and info.code == 255
    # The hangup reached the remote program: nothing is left running there.
    pidfile = f"$HOME/.carrier-pty/{job.job_id}.pid"
    check = f'kill -0 "$(cat {pidfile})" 2>/dev/null && echo alive || echo gone; rm -f {pidfile}'
    until(lambda: remote(sandbox, "db1", check).strip() == "gone", 10, "remote program gone")


def _logins(sandbox: Sandbox, host: str) -> int:
    text = sandbox.layout.log_file(f"sshd-{host}").read_text(errors="replace")
    return text.count("Accepted publickey")


def test_many_jobs_on_one_host_share_one_ssh_channel(runner: PtyRunner, inventory: Inventory, workdir: Path,
                                                     sandbox: Sandbox, ssh: SshControl) -> None:
    ssh.ensure_master(inventory.conn("web2"))
    first = run(runner, inventory, workdir, "web2", "while read l; do echo got:$l; done")
    assert first.mode == "tmux"
    logins = _logins(sandbox, "web2")
    jobs = [first] + [run(runner, inventory, workdir, "web2", "while read l; do echo got:$l; done")
                      for _ in range(11)]  # 12 jobs: more than sshd's MaxSessions (10)
    for n, job in enumerate(jobs):
        job.input(f"n{n}", ["enter"])
    for n, job in enumerate(jobs):
        assert job.wait(f"got:n{n}$", timeout=30).reason == "match"
    # One control channel for all of them: no extra login was needed.
    assert _logins(sandbox, "web2") == logins
    for job in jobs:
        job.input(keys=["ctrl-d"])
    for job in jobs:
        info = job.wait_exit(30)
        assert info is not None and info.succeeded


def test_bad_input_through_the_doors(workdir: Path, inventory: Inventory, ssh: SshControl) -> None:
    state = workdir / "bad-state"
    store = Store.open(state)
    manager, engine = _manager(store, state, inventory, ssh)
    manager.start()
    doors = PtyJobs(manager, engine)
    try:
        with pytest.raises(JobNotFound, match="no job j-aaaaaaaaaaaa"):
            doors.screen("j-aaaaaaaaaaaa")
        with pytest.raises(JobError, match="invalid job id"):
            doors.input("../../etc/passwd", "x")
        with pytest.raises(Exception, match="selects 2"):
            doors.start("web", ["top"], owner="t", door="cli")
        view = doors.start("web1", ["cat"], owner="t", door="cli")
        with pytest.raises(UnknownKey, match="unknown key 'uparrow'"):
            doors.input(view.id, keys=["uparrow"])
        with pytest.raises(PtyError, match="cols must be a whole number from 10 to 1000"):
            doors.resize(view.id, 0, 40)
        with pytest.raises(PtyError, match="cols must be a whole number from 10 to 1000"):
            doors.resize(view.id, 10000, 40)
        doors.input(view.id, keys=["ctrl-d"])
        assert manager.wait(view.id, timeout=30).status == "succeeded"
        with pytest.raises(PtyError, match="has ended"):
            doors.input(view.id, "x")
        with pytest.raises(PtyError, match="has ended"):
            doors.kill(view.id, "TERM", by="t")
    finally:
        manager.close()
        engine.close()
        store.close()


def test_cancel_and_a_plain_job_at_shutdown(workdir: Path, inventory: Inventory, ssh: SshControl) -> None:
    state = workdir / "cancel-state"
    store = Store.open(state)
    manager, engine = _manager(store, state, inventory, ssh)
    manager.start()
    doors = PtyJobs(manager, engine)
    try:
        # A cancel stops the program (TERM, then KILL if it insists) and records "cancelled".
        stubborn = doors.start("web1", ["sh", "-c", "trap '' TERM; echo up; while :; do sleep 1; done"],
                               owner="t", door="cli")
        assert doors.wait(stubborn.id, "up", timeout=20).reason == "match"
        manager.kill(stubborn.id, by="tester")
        final = manager.wait(stubborn.id, timeout=30)
        assert final.status == "cancelled" and "tester" in final.message
        # A job without tmux cannot outlive its Carrier: closing the manager records it lost.
        plain = doors.start("web2", ["sleep", "300"], owner="t", door="cli", mode="plain")
        assert engine.live(plain.id) is not None
    finally:
        manager.close()
        engine.close()
    assert store.get_job(plain.id).status == "lost"  # type: ignore[union-attr]
    store.close()


def test_no_zombies_left(runner: PtyRunner) -> None:
    until(lambda: not zombie_children(), 10, "children reaped")
    assert zombie_children() == []


def test_output_of_a_plain_job_that_ends_while_it_is_read(workdir: Path, inventory: Inventory,
                                                          ssh: SshControl) -> None:
    """A reader that saw the job running when it looked, and finds it finished a moment later,
    gets the kept output: not a claim that another Carrier process runs it."""
    state = workdir / "race-state"
    store = Store.open(state)
    manager, engine = _manager(store, state, inventory, ssh)
    manager.start()
    doors = PtyJobs(manager, engine)
    try:
        job = doors.start("web2", ["sh", "-c", "echo one; echo two; exit 3"], owner="t", door="cli",
                          mode="plain")
        running_view = manager.get(job.id)
        assert manager.wait(job.id, timeout=30).status == "failed"
        # Replay the window: the reader's view was taken while the job still ran.
        doors._view = lambda _job_id: running_view  # type: ignore[method-assign]
        read = doors.output(job.id, 0)
        assert b"one\r\ntwo" in read.data and read.done
    finally:
        manager.close()
        engine.close()
        store.close()


def test_screen_of_an_ended_job_without_a_kept_screen_is_rebuilt_from_its_output(
        workdir: Path, inventory: Inventory, ssh: SshControl) -> None:
    """The last screen is rendered at exit and can be missing (a tmux pane gone first): the
    screen then comes from the kept output, never an error for a job that printed."""
    state = workdir / "rebuild-state"
    store = Store.open(state)
    manager, engine = _manager(store, state, inventory, ssh)
    manager.start()
    doors = PtyJobs(manager, engine)
    try:
        job = doors.start("web1", ["sh", "-c", "echo first-line; echo last-line"], owner="t", door="cli")
        assert manager.wait(job.id, timeout=30).status == "succeeded"
        (manager.run_dir_of(job.id) / "screen.json").unlink(missing_ok=True)
        text = doors.screen(job.id).text
        assert "first-line" in text and "last-line" in text
    finally:
        manager.close()
        engine.close()
        store.close()
