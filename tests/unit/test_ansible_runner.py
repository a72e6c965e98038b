"""ansible-runner plumbing without hosts: run specs, event files, compact events, and the verdict for
every failure mode (each a distinct, readable reason and message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from carrier.ansible import runner as ar
from carrier.ansible.errors import EngineError
from carrier.ansible.fastpath import CappedBuffer, truncation_mark


def stats(**hosts: dict[str, int]) -> tuple[str, dict[str, Any]]:
    full = {}
    for host, counts in hosts.items():
        full[host] = {k: counts.get(k, 0) for k in ("ok", "changed", "dark", "failures", "skipped", "ignored",
                                                     "rescued")}
    return ("ansible.playbook_on_stats", {"stats": full})


def failed(host: str, task: str, msg: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return ("ansible.runner_on_failed", {"host": host, "task": task, "res": {"msg": msg}, **extra})


def unreachable(host: str, msg: str) -> tuple[str, dict[str, Any]]:
    return ("ansible.runner_on_unreachable", {"host": host, "res": {"msg": msg, "unreachable": True}})


# --------------------------------------------------------------------------- verdicts


def test_success_summarises_the_recap() -> None:
    v = ar.judge(ar.RunResult("successful", 0), [stats(web1={"ok": 2, "changed": 1}, db1={"ok": 2})])
    assert (v.status, v.reason, v.rc) == ("succeeded", "ok", 0)
    assert v.message == "succeeded: db1 ok=2 changed=0; web1 ok=2 changed=1"


def test_failed_task_names_task_host_and_message() -> None:
    events = [failed("web2", "Restart nginx", "Unable to restart service nginx"),
              stats(web1={"ok": 1}, web2={"failures": 1})]
    v = ar.judge(ar.RunResult("failed", 2), events, what="playbook deploy")
    assert (v.status, v.reason) == ("failed", "task_failed")
    assert v.message == "task failed: 'Restart nginx' on web2: Unable to restart service nginx"


def test_failures_on_several_hosts_and_unreachable_ones_are_all_named() -> None:
    events = [failed("web1", "t", "boom"), failed("web2", "t", "boom"), unreachable("db1", "refused"),
              stats(web1={"failures": 1}, web2={"failures": 1}, db1={"dark": 1})]
    v = ar.judge(ar.RunResult("failed", 2), events)
    assert v.reason == "task_failed"
    assert "(failed hosts: web1, web2)" in v.message and v.message.endswith("unreachable: db1")


def test_ignored_failures_do_not_fail_the_verdict() -> None:
    events = [failed("web1", "t", "boom", ignore_errors=True), stats(web1={"ok": 1, "ignored": 1})]
    assert ar.judge(ar.RunResult("successful", 0), events).status == "succeeded"


def test_unreachable() -> None:
    events = [unreachable("web2", "ssh: connect to host 10.0.0.2 port 22: Connection refused"),
              stats(web1={"ok": 1}, web2={"dark": 1})]
    v = ar.judge(ar.RunResult("failed", 4), events)
    assert (v.status, v.reason) == ("failed", "unreachable")
    assert v.message == "unreachable: web2 (ssh: connect to host 10.0.0.2 port 22: Connection refused)"


def test_syntax_error_quotes_ansibles_own_words() -> None:
    out = "[ERROR]: YAML parsing failed: did not find expected '-' indicator.\nOrigin: /p/bad.yml:4:6\n"
    v = ar.judge(ar.RunResult("failed", 4), [], stdout=out, what="playbook bad")
    assert (v.status, v.reason) == ("failed", "syntax_error")
    assert v.message == (
        "syntax error in playbook bad: [ERROR]: YAML parsing failed: did not find expected '-' indicator."
    )


def test_missing_playbook() -> None:
    v = ar.judge(ar.RunResult("failed", 1), [], stdout="[ERROR]: the playbook: nope.yml could not be found\n")
    assert (v.reason, v.message) == ("missing_playbook",
                                     "missing playbook: [ERROR]: the playbook: nope.yml could not be found")


def test_timeout_and_cancel() -> None:
    t = ar.judge(ar.RunResult("timeout", 254), [], what="playbook slow", timeout=30)
    assert (t.status, t.reason) == ("failed", "timeout")
    assert t.message == "timed out after 30 s: playbook slow was stopped"
    c = ar.judge(ar.RunResult("canceled", 254), [], what="playbook slow", cancelled_by="cli:root")
    assert (c.status, c.reason) == ("cancelled", "cancelled")
    assert c.message == "cancelled by cli:root: playbook slow was stopped"


def test_other_errors_keep_the_rc_and_the_error() -> None:
    v = ar.judge(ar.RunResult("error", None, "TypeError: bad option"), [])
    assert (v.reason, v.message) == ("error", "the run failed (rc None): TypeError: bad option")


def test_every_failure_mode_has_its_own_reason() -> None:
    reasons = {
        ar.judge(ar.RunResult("failed", 2), [failed("h", "t", "m")]).reason,
        ar.judge(ar.RunResult("failed", 4), [unreachable("h", "m")]).reason,
        ar.judge(ar.RunResult("failed", 4), [], stdout="[ERROR]: YAML parsing failed").reason,
        ar.judge(ar.RunResult("failed", 1), [], stdout="[ERROR]: the playbook: x could not be found").reason,
        ar.judge(ar.RunResult("timeout", 254), []).reason,
        ar.judge(ar.RunResult("canceled", 254), []).reason,
    }
    assert reasons == {"task_failed", "unreachable", "syntax_error", "missing_playbook", "timeout",
                       "cancelled"}


# --------------------------------------------------------------------------- events


def test_compact_event_keeps_the_useful_fields_and_caps_text() -> None:
    raw = {
        "event": "runner_on_ok", "counter": 7, "stdout": "ok: [web1]",
        "event_data": {"host": "web1", "task": "Run", "play": "P", "task_action": "command",
                       "res": {"rc": 0, "stdout": "x" * 20000, "changed": True, "invocation": {"huge": 1},
                               "_ansible_no_log": False}},
    }
    type_, data = ar.compact_event(raw, text_cap=100)
    assert type_ == "ansible.runner_on_ok"
    assert data["counter"] == 7 and data["host"] == "web1" and data["task"] == "Run"
    assert data["stdout"] == "ok: [web1]"
    assert set(data["res"]) == {"rc", "stdout", "changed"}
    assert data["res"]["stdout"].startswith("x" * 100) and "19900 characters cut" in data["res"]["stdout"]


def test_compact_stats_fills_every_counter() -> None:
    raw = {"event": "playbook_on_stats", "counter": 9,
           "event_data": {"ok": {"web1": 2}, "changed": {"web1": 1}, "dark": {"db1": 1}}}
    _, data = ar.compact_event(raw)
    assert data["stats"]["web1"] == {"ok": 2, "changed": 1, "dark": 0, "failures": 0, "skipped": 0,
                                     "ignored": 0, "rescued": 0}
    assert data["stats"]["db1"]["dark"] == 1


def test_read_events_in_counter_order_skipping_partials(tmp_path: Path) -> None:
    events = ar.events_dir(tmp_path)
    events.mkdir(parents=True)
    for counter in (10, 2, 1, 3):
        (events / f"{counter}-0000-aaaa.json").write_text(json.dumps({"event": "verbose", "uuid": "u"}))
    (events / "0000-bbbb-partial.json").write_text("{}")
    (events / "4-0000-cccc.json.tmp").write_text("{")
    got = ar.read_events(tmp_path, 0)
    assert [e["counter"] for e in got] == [1, 2, 3, 10]
    assert [e["counter"] for e in ar.read_events(tmp_path, 2)] == [3, 10]
    assert ar.read_events(tmp_path / "none", 0) == []


def test_run_spec_round_trips_and_builds_the_cmdline() -> None:
    spec = ar.RunSpec(kind="playbook", inventory="/inv", project_dir="/pb", playbook="x.yml", limit="web1",
                      extra_vars={"n": 1}, tags=("a",), skip_tags=("b", "c"), check=True, diff=True,
                      env={"A": "1"})
    assert ar.RunSpec.from_json(spec.to_json()) == spec
    assert spec.cmdline() == "--check --diff --skip-tags=b,c"


def test_result_file_wins_over_runner_status_files(tmp_path: Path) -> None:
    assert ar.read_result(tmp_path) is None
    art = tmp_path / "artifacts" / ar.IDENT
    art.mkdir(parents=True)
    (art / "status").write_text("failed")
    (art / "rc").write_text("2")
    assert ar.read_result(tmp_path) == ar.RunResult("failed", 2)
    ar.write_result(tmp_path, "successful", 0)
    assert ar.read_result(tmp_path) == ar.RunResult("successful", 0)


def test_tags_are_checked() -> None:
    assert ar.check_tags(["web", "db-1", "a.b"]) == ("web", "db-1", "a.b")
    with pytest.raises(EngineError, match="invalid tag"):
        ar.check_tags(["x --extra-vars=@/etc/passwd"])


def test_process_identity_detects_exit_and_pid_reuse() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ident = ar.ProcessId.of(proc.pid)
        assert ident is not None and ident.alive()
        assert not ar.ProcessId(proc.pid, ident.start + "0").alive()  # same pid, other start: reused
    finally:
        proc.kill()
        proc.wait()
    assert not ident.alive()
    assert ar.ProcessId.of(proc.pid) is None
    assert ar.process_start(os.getpid()) is not None


def test_the_worker_refuses_to_run_without_a_spec(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "carrier.ansible.worker"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2 and "usage" in done.stderr


# --------------------------------------------------------------------------- output caps


def test_capped_buffer_keeps_head_and_tail_and_says_how_much_was_dropped() -> None:
    buf = CappedBuffer(100)
    for i in range(1000):
        buf.feed(f"{i:04d}\n".encode())
    text = buf.text()
    assert text.startswith("0000\n0001\n")
    assert text.endswith("0998\n0999\n")
    assert buf.truncated and buf.dropped == 5000 - 100
    assert truncation_mark(4900, 100) in text
    small = CappedBuffer(100)
    small.feed(b"short")
    assert (small.text(), small.truncated) == ("short", False)
