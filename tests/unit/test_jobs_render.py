"""Jobs as terminal text and JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from carrier.jobs.manager import JobView
from carrier.jobs.render import event_text, exec_block, job_text, jobs_table, junit_xml
from carrier.store import EventRecord


def view(**kw: Any) -> JobView:
    base: dict[str, Any] = dict(
        id="j-aaaaaaaaaaaa", kind="playbook", owner="cli:root", door="cli", target="web", status="failed",
        reason="task_failed", message="task failed: 'Restart' on web2: boom", rc=2, hosts=("web1", "web2"),
        spec={"playbook": "deploy"},
        summary={"recap": {"web1": {"ok": 2, "changed": 1}, "web2": {"failures": 1}}},
        created_at=1_700_000_000.0, started_at=1_700_000_001.0, finished_at=1_700_000_004.5, cursor=9,
    )
    base.update(kw)
    return JobView(**base)


def ev(seq: int, type_: str, **data: Any) -> EventRecord:
    return EventRecord(job_id="j-aaaaaaaaaaaa", seq=seq, ts=0.0, type=type_, data=data)


EVENTS = [
    ev(1, "job.queued"),
    ev(2, "ansible.runner_on_ok", host="web1", task="Install", stdout="ok: [web1]", res={"changed": False}),
    ev(3, "ansible.runner_on_failed", host="web2", task="Restart", stdout="fatal: [web2]: FAILED!",
       res={"msg": "boom"}),
    ev(4, "ansible.runner_on_skipped", host="web1", task="Only db",
       res={"skip_reason": "Conditional result was False"}),
    ev(5, "job.finished", status="failed", message="task failed: 'Restart' on web2: boom"),
]


def test_junit_has_a_case_per_host_and_task() -> None:
    root = ET.fromstring(junit_xml(view(), EVENTS).split("\n", 1)[1])  # noqa: S314 (our own output)
    assert root.tag == "testsuite" and root.get("name") == "carrier playbook deploy"
    counts = (root.get("tests"), root.get("failures"), root.get("skipped"), root.get("time"))
    assert counts == ("3", "1", "1", "3.500")
    cases = [(c.get("classname"), c.get("name")) for c in root.iter("testcase")]
    assert cases == [("web1", "Install"), ("web2", "Restart"), ("web1", "Only db")]
    failure = root.find("testcase[@name='Restart']/failure")
    assert failure is not None and failure.get("message") == "boom"
    assert failure.text == "fatal: [web2]: FAILED!"


def test_junit_for_a_job_without_task_results_is_one_failed_case() -> None:
    doc = junit_xml(view(reason="syntax_error", message="syntax error in playbook bad: [ERROR]: YAML"), [])
    root = ET.fromstring(doc.split("\n", 1)[1])  # noqa: S314 (our own output)
    assert (root.get("tests"), root.get("failures")) == ("1", "1")
    failure = root.find("testcase/failure")
    assert failure is not None and failure.get("type") == "syntax_error"
    assert "syntax error in playbook bad" in (failure.get("message") or "")


def test_event_text() -> None:
    assert event_text(EVENTS[1]) == "ok: [web1]"
    assert event_text(EVENTS[0]) is None
    assert event_text(EVENTS[4]) == "== failed: task failed: 'Restart' on web2: boom"
    block = exec_block({"host": "web1", "status": "failed", "rc": 1, "stdout": "out\n", "stderr": "err\n"})
    assert block == "== web1: failed (rc 1)\nout\n-- stderr:\nerr"


def test_job_text_and_table() -> None:
    text = job_text(view())
    assert "status   failed (task_failed)" in text
    assert "hosts    web1, web2" in text
    assert "web1                 ok=2 changed=1 dark=0 failures=0" in text
    table = jobs_table([view(), view(id="j-bbbbbbbbbbbb", status="succeeded", message="succeeded: ok")])
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "KIND", "STATUS", "OWNER", "TARGET", "CREATED", "MESSAGE"]
    assert lines[2].startswith("j-bbbbbbbbbbbb  playbook  succeeded")
    assert jobs_table([]) == "no jobs"
