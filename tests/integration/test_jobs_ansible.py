"""Jobs through ansible-runner against the sandbox hosts: events and recap by cursor, every failure
mode with its own reason, kill, concurrency limits, restart survival (re-attach, lost), the bundled
catalog, and secrets kept out of the artifacts."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_support import (
    BUNDLED,
    REPO,
    job_system,
    short_tmpdir,
    until,
    write_inventory,
    write_playbooks,
)

from carrier.ansible.errors import EngineError, ExtraVarsError, PatternError, PlaybookError
from carrier.ansible.runner import ProcessId, run_processes
from carrier.jobs.errors import JobError
from carrier.jobs.manager import JobView
from carrier.jobs.system import JobSystem
from carrier.sandbox.manager import Sandbox
from carrier.store import jobruns

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = short_tmpdir("cjt-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inventory_dir(sandbox: Sandbox, workdir: Path) -> Path:
    return write_inventory(sandbox, workdir / "inventory")


@pytest.fixture(scope="module")
def playbooks(workdir: Path) -> Path:
    return write_playbooks(workdir / "playbooks")


@pytest.fixture(scope="module")
def system(workdir: Path, inventory_dir: Path, playbooks: Path) -> Iterator[JobSystem]:
    with job_system(workdir / "state", inventory_dir, [playbooks, BUNDLED], max_jobs=8,
                    max_jobs_per_host=4) as js:
        js.manager.start()
        yield js
        js.ssh.close_all()


def run(system: JobSystem, playbook: str, wait: float = 120, **options: object) -> JobView:
    view = system.manager.run_playbook(playbook, owner="ops@example.test", door="mail", **options)
    return system.manager.wait(view.id, wait)


# --------------------------------------------------------------------------- a run, its events, its recap


def test_playbook_events_and_recap_are_stored_and_read_by_cursor(system: JobSystem) -> None:
    view = run(system, "ping", limit="web")
    assert (view.status, view.reason) == ("succeeded", "ok")
    assert view.message == "succeeded: web1 ok=1 changed=0; web2 ok=1 changed=0"
    assert view.hosts == ("web1", "web2") and view.target == "web"
    assert view.summary["recap"]["web1"]["ok"] == 1 and view.summary["recap"]["web2"]["dark"] == 0
    # Read in small pages: nothing twice, nothing skipped.
    seen = []
    cursor = 0
    while True:
        batch, cursor = system.manager.output(view.id, cursor, limit=4)
        if not batch:
            break
        seen.extend(batch)
    assert [e.seq for e in seen] == list(range(1, view.cursor + 1))
    types = [e.type for e in seen]
    assert types[:3] == ["job.queued", "job.started", "runner.started"]
    assert types[-2:] == ["ansible.playbook_on_stats", "job.finished"]
    ok = [e.data for e in seen if e.type == "ansible.runner_on_ok"]
    assert sorted(d["host"] for d in ok) == ["web1", "web2"]
    assert all(d["task"] == "Reach the host and run Python" and d["res"]["ping"] == "pong" for d in ok)
    assert "ok: [web1]" in " ".join(str(d.get("stdout")) for d in ok)
    counters = [e.data["counter"] for e in seen if e.type.startswith("ansible.")]
    assert counters == list(range(1, len(counters) + 1))  # every runner event once, in order


def test_adhoc_module_job(system: JobSystem) -> None:
    view = system.manager.run_adhoc("command", "db", owner="o", door="cli", args="uname -s")
    view = system.manager.wait(view.id, 120)
    assert (view.status, view.message) == ("succeeded", "succeeded: db1 ok=1 changed=1")
    events, _ = system.manager.output(view.id)
    ok = [e.data for e in events if e.type == "ansible.runner_on_ok"]
    assert ok[0]["res"]["stdout"] == "Linux"


@pytest.mark.parametrize(
    ("module", "options", "message"),
    [
        ("copy", {"args": "src=/etc/shadow dest=/tmp/x"}, "not available for ad-hoc jobs"),
        ("shell", {"args": "id"}, "not allowed without shell permission"),
        ("command", {"args": "echo {{ lookup('pipe', 'id') }}"}, "template delimiter"),
        ("command", {"args": "id", "pattern_override": "web;id"}, "';'"),
    ],
)
def test_adhoc_refusals(system: JobSystem, module: str, options: dict[str, object], message: str) -> None:
    pattern = str(options.pop("pattern_override", "web"))
    before = len(system.manager.list_jobs(limit=1000))
    with pytest.raises((EngineError, PatternError), match=message):
        system.manager.run_adhoc(module, pattern, owner="o", door="cli", **options)
    assert len(system.manager.list_jobs(limit=1000)) == before


# --------------------------------------------------------------------------- failure modes


def test_failed_task(system: JobSystem) -> None:
    view = run(system, "fail", limit="web")
    assert (view.status, view.reason, view.rc) == ("failed", "task_failed", 2)
    assert view.message == "task failed: 'Fail on web2' on web2: non-zero return code"
    assert view.summary["recap"]["web2"]["failures"] == 1


def test_syntax_error(system: JobSystem) -> None:
    view = run(system, "bad")
    assert (view.status, view.reason) == ("failed", "syntax_error")
    assert view.message.startswith("syntax error in playbook bad: [ERROR]: YAML parsing failed")


def test_missing_playbook(system: JobSystem) -> None:
    view = system.manager.run_playbook("nope", owner="o", door="cli")
    assert (view.status, view.reason) == ("failed", "missing_playbook")
    assert view.message.startswith("missing playbook: no playbook named 'nope' in ")
    assert "`carrier playbooks` lists" in view.message


def test_playbook_removed_after_it_was_queued(system: JobSystem, playbooks: Path) -> None:
    doomed = playbooks / "doomed.yml"
    shutil.copy(playbooks / "fail.yml", doomed)
    engine = system.manager.engines["playbook"]
    submission = engine.prepare({"playbook": "doomed"})
    doomed.unlink()
    job = system.manager.store.create_job("playbook", "o", "cli", target="all", spec=dict(submission.spec))
    jobruns.create_job_run(system.manager.store, job.id, engine="playbook", hosts=submission.hosts,
                           run_dir=str(system.manager.run_dir_of(job.id)), supervisor=None)
    assert system.manager.attach(job.id)
    view = system.manager.wait(job.id, 60)
    assert (view.status, view.reason) == ("failed", "missing_playbook")
    assert view.message.endswith("doomed.yml is gone (it was there when the job was queued)")


def test_unreachable_host(system: JobSystem) -> None:
    view = run(system, "ping", limit="ghost,web1")
    assert (view.status, view.reason) == ("failed", "unreachable")
    assert view.message.startswith("unreachable: ghost (")
    assert "Connection refused" in view.message
    assert view.summary["recap"]["web1"]["ok"] == 1


def test_unknown_host_key_makes_the_host_unreachable(system: JobSystem, workdir: Path,
                                                     inventory_dir: Path, playbooks: Path) -> None:
    # A fresh state dir: no master to web1's address exists that could skip the key check.
    with job_system(workdir / "state-hostkey", inventory_dir, [BUNDLED]) as js:
        js.manager.start()
        job = js.manager.run_playbook("ping", owner="o", door="cli", limit="stranger")
        view = js.manager.wait(job.id, 120)
        js.ssh.close_all()
    assert (view.status, view.reason) == ("failed", "unreachable")
    assert "Host key verification failed" in view.message


def test_timeout(system: JobSystem) -> None:
    view = run(system, "slow", limit="web1", extra_vars={"seconds": 60}, timeout=2)
    assert (view.status, view.reason) == ("failed", "timeout")
    assert view.message == "timed out after 2 s: playbook slow was stopped"


def test_kill_stops_a_long_task(system: JobSystem) -> None:
    manager = system.manager
    view = manager.run_playbook("slow", owner="o", door="cli", limit="web1", extra_vars={"seconds": 300})

    def sleeping() -> bool:
        events, _ = manager.output(view.id, 0, 1000)
        return any(e.type == "ansible.runner_on_start" and e.data.get("task") == "Sleep" for e in events)

    until(sleeping, what="the Sleep task to start")
    run_dir = manager.run_dir_of(view.id)
    assert len(run_processes(run_dir)) >= 3  # the worker, ansible-playbook, its fork, ssh...
    manager.kill(view.id, by="ops@example.test")
    done = manager.wait(view.id, 60)
    assert (done.status, done.reason) == ("cancelled", "cancelled")
    assert done.message == "cancelled by ops@example.test: playbook slow was stopped"
    types = [e.type for e in manager.output(view.id, 0, 1000)[0]]
    assert "job.cancel" in types and "ansible.runner_on_ok" not in types
    # Nothing of the run is left: not the worker, not ansible-playbook or its forks.
    run = jobruns.get_job_run(manager.store, view.id)
    assert run is not None and run.pid is not None and run.pid_start is not None
    until(lambda: not ProcessId(run.pid, run.pid_start).alive(), what="the worker to exit")  # type: ignore[arg-type]
    until(lambda: not run_processes(run_dir), what="every process of the run to exit")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("playbook", "options", "error", "message"),
    [
        ("../../etc/passwd", {}, PlaybookError, "no '/', no '..'"),
        ("ping", {"limit": "web1;id"}, PatternError, "';'"),
        ("ping", {"limit": "nosuch"}, PatternError, "unknown host or group 'nosuch'"),
        ("ping", {"extra_vars": {"ansible_ssh_common_args": "-oProxyCommand=id"}}, ExtraVarsError,
         "unknown extra var 'ansible_ssh_common_args' for playbook ping"),
        ("slow", {"extra_vars": {"seconds": "{{ lookup('pipe','id') }}"}}, ExtraVarsError, "whole number"),
        ("ping", {"tags": "a b"}, EngineError, "invalid tag"),
        ("ping", {"forks": 0}, EngineError, "forks must be between"),
    ],
)
def test_bad_requests_make_no_job(system: JobSystem, playbook: str, options: dict[str, object],
                                  error: type[Exception], message: str) -> None:
    before = len(system.manager.list_jobs(limit=1000))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        system.manager.run_playbook(playbook, owner="o", door="cli", **options)
    assert len(system.manager.list_jobs(limit=1000)) == before


@pytest.mark.parametrize("job_id", ["../../../etc", "j-/../../x", "j-aaaaaaaaaaa/", "J-AAAAAAAAAAAA"])
def test_job_ids_from_outside_are_checked_before_any_path(system: JobSystem, job_id: str) -> None:
    with pytest.raises(JobError, match="invalid job id"):
        system.manager.get(job_id)
    with pytest.raises(JobError, match="invalid job id"):
        system.manager.run_dir_of(job_id) if False else system.manager.kill(job_id, by="x")
    with pytest.raises(ValueError, match="invalid job id"):
        system.manager.run_dir_of(job_id)


# --------------------------------------------------------------------------- secrets and artifacts


def test_secrets_stay_out_of_the_run_directory(system: JobSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hunter2-carrier-secret-value"
    monkeypatch.setenv("EMAIL_PASS", secret)
    monkeypatch.setenv("LLM_API_KEY", secret + "-llm")
    view = run(system, "ping", limit="db1")
    assert view.status == "succeeded"
    run_dir = system.manager.run_dir_of(view.id)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "command" for p in files)  # runner wrote its command and environment
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    command = (run_dir / "artifacts" / "run" / "command").read_text()
    assert '"ANSIBLE_HOST_KEY_CHECKING": "True"' in command
    assert (run_dir / "spec.json").stat().st_mode & 0o777 == 0o600
    assert run_dir.stat().st_mode & 0o777 == 0o700


def test_output_limit_marks_truncation(workdir: Path, inventory_dir: Path, playbooks: Path) -> None:
    with job_system(workdir / "state-cap", inventory_dir, [playbooks], output_max_bytes=10000) as js:
        js.manager.start()
        view = js.manager.wait(js.manager.run_playbook("noisy", owner="o", door="cli", limit="web").id, 120)
        events, _ = js.manager.output(view.id, 0, 1000)
        js.ssh.close_all()
    assert view.status == "succeeded"
    assert [e.type for e in events].count("output.truncated") == 1
    assert events[-1].type == "job.finished"
    assert sum(len(str(e.data)) for e in events) < 20000  # 20000 lines per host were printed
    ok = [e for e in events if e.type == "ansible.runner_on_ok"]
    assert any("characters cut" in str(e.data.get("res", {}).get("stdout", "")) or e.data.get("truncated")
               for e in ok)


# --------------------------------------------------------------------------- concurrency


def test_per_host_limit_serialises_jobs_on_a_host(workdir: Path, inventory_dir: Path,
                                                  playbooks: Path) -> None:
    with job_system(workdir / "state-limit", inventory_dir, [playbooks], max_jobs=8,
                    max_jobs_per_host=1) as js:
        js.manager.start()
        ids = [js.manager.run_playbook("slow", owner="o", door="cli", limit="web1",
                                       extra_vars={"seconds": 1}).id for _ in range(3)]
        other = js.manager.run_playbook("slow", owner="o", door="cli", limit="db1",
                                        extra_vars={"seconds": 1}).id
        views = [js.manager.wait(j, 180) for j in [*ids, other]]
        js.ssh.close_all()
    assert [v.status for v in views] == ["succeeded"] * 4
    spans = sorted((v.started_at, v.finished_at) for v in views[:3])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end is not None and start is not None and start >= end  # one at a time on web1


# --------------------------------------------------------------------------- restart survival

_DRIVER = textwrap.dedent("""\
    import sys, time
    sys.path[:0] = [{repo!r}, {support!r}]
    from pathlib import Path
    from ansible_support import build
    system = build(Path({state!r}), Path({inventory!r}), [Path({playbooks!r})])
    manager = system.manager.start()
    view = manager.run_playbook("slow", owner="restart-test", door="cli", limit="web",
                                extra_vars={{"seconds": {seconds}}})
    while True:
        events, _ = manager.output(view.id, 0, 1000)
        if any(e.type == "ansible.runner_on_start" and e.data.get("task") == "Sleep" for e in events):
            break
        time.sleep(0.05)
    print(view.id, flush=True)
    time.sleep(600)
    """)


def start_driver(
    workdir: Path, state: Path, inventory_dir: Path, playbooks: Path, seconds: int
) -> tuple[subprocess.Popen[str], str]:
    script = workdir / f"driver-{state.name}.py"
    script.write_text(_DRIVER.format(repo=str(REPO), support=str(Path(__file__).parent), state=str(state),
                                     inventory=str(inventory_dir), playbooks=str(playbooks), seconds=seconds))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip()
    assert job_id.startswith("j-"), job_id
    return proc, job_id


def test_restarting_carrier_mid_run_reattaches_and_the_job_succeeds(
    workdir: Path, inventory_dir: Path, playbooks: Path
) -> None:
    state = workdir / "state-restart"
    proc, job_id = start_driver(workdir, state, inventory_dir, playbooks, seconds=4)
    proc.kill()  # Carrier dies hard (SIGKILL) in the middle of the Sleep task
    proc.wait()
    with job_system(state, inventory_dir, [playbooks]) as js:
        before = js.manager.get(job_id)
        assert before.status == "running"
        run = jobruns.get_job_run(js.manager.store, job_id)
        assert run is not None and run.pid is not None and run.pid_start is not None
        assert ProcessId(run.pid, run.pid_start).alive()  # the run went on without Carrier
        js.manager.start(adopt=True)
        assert job_id in js.manager.active()
        view = js.manager.wait(job_id, 120)
        events, _ = js.manager.output(job_id, 0, 5000)
        js.ssh.close_all()
    assert (view.status, view.reason) == ("succeeded", "ok")
    assert view.message == "succeeded: web1 ok=2 changed=2; web2 ok=2 changed=2"
    types = [e.type for e in events]
    assert types.count("job.resumed") == 1 and types.count("job.finished") == 1
    counters = [e.data["counter"] for e in events if e.type.startswith("ansible.")]
    assert counters == list(range(1, len(counters) + 1))  # none lost, none twice across the restart
    after = [e.data.get("task") for e in events if e.type == "ansible.runner_on_ok"]
    assert after.count("After") == 2


def test_a_run_that_vanished_with_carrier_is_lost(workdir: Path, inventory_dir: Path,
                                                  playbooks: Path) -> None:
    state = workdir / "state-lost"
    proc, job_id = start_driver(workdir, state, inventory_dir, playbooks, seconds=300)
    proc.kill()
    proc.wait()
    with job_system(state, inventory_dir, [playbooks]) as js:
        run = jobruns.get_job_run(js.manager.store, job_id)
        assert run is not None and run.pid is not None
        # The machine "rebooted": the worker and ansible are gone too.
        for pid in [run.pid, *run_processes(Path(run.run_dir))]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        until(lambda: not ProcessId(run.pid, run.pid_start or "").alive(), what="the worker to die")  # type: ignore[arg-type]
        js.manager.start(adopt=True)
        view = js.manager.wait(job_id, 60)
        js.ssh.close_all()
    assert (view.status, view.reason) == ("lost", "lost")
    assert view.message.startswith(f"lost: the ansible-runner worker (pid {run.pid}) ended without a result")


# --------------------------------------------------------------------------- the bundled catalog


@pytest.mark.parametrize(
    ("playbook", "options", "expect"),
    [
        ("ping", {}, "pong"),
        ("facts", {}, "% used"),
        ("disk_usage", {"extra_vars": {"path": "/", "warn_percent": 100}}, "/ is "),
        ("service_status", {"extra_vars": {"service": "ssh"}}, "ssh: "),
        ("log_tail", {"extra_vars": {"file": "/var/log/dpkg.log", "lines": 3}}, ""),
        ("updates_check", {}, ""),
        ("service_restart", {"check": True, "extra_vars": {"service": "ssh", "use_become": False}}, ""),
    ],
)
def test_bundled_playbooks_run_on_the_sandbox(system: JobSystem, playbook: str, options: dict[str, object],
                                              expect: str) -> None:
    view = run(system, playbook, limit="db1", **options)
    assert (view.status, view.reason) == ("succeeded", "ok"), view.message
    events, _ = system.manager.output(view.id, 0, 5000)
    texts = " ".join(str(e.data.get("res", {})) for e in events if e.type == "ansible.runner_on_ok")
    assert expect in texts


def test_disk_usage_fails_above_the_threshold(system: JobSystem) -> None:
    view = run(system, "disk_usage", limit="web1", extra_vars={"warn_percent": 1})
    assert (view.status, view.reason) == ("failed", "task_failed")
    assert "task failed: 'Below 1%' on web1: / is " in view.message and "(limit 1%)" in view.message
