"""Jobs as text for a terminal and as JUnit XML for CI. Pure functions (no I/O)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from carrier.jobs.manager import JobView
from carrier.store import EventRecord

#: What each ansible event adds to a JUnit test case.
_CASE_EVENTS = {
    "ansible.runner_on_ok": "ok",
    "ansible.runner_on_failed": "failed",
    "ansible.runner_on_unreachable": "unreachable",
    "ansible.runner_on_skipped": "skipped",
}


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def event_text(event: EventRecord) -> str | None:
    """The line(s) a terminal shows for one event, or None for events with nothing to show."""
    data = event.data
    if event.type.startswith("ansible."):
        text = str(data.get("stdout") or "").strip("\n")
        return text or None
    if event.type == "exec.result":
        return exec_block(data)
    if event.type == "job.finished":
        return f"== {data.get('status')}: {data.get('message')}"
    if event.type == "output.truncated":
        return f"== {data.get('message')}"
    if event.type == "job.cancel":
        return f"== cancel requested by {data.get('by')}"
    return None


def exec_block(result: Mapping[str, Any]) -> str:
    """One host's exec result: a header line, stdout, and stderr marked as such."""
    rc = result.get("rc")
    head = f"== {result.get('host')}: {result.get('status')}" + (f" (rc {rc})" if rc is not None else "")
    lines = [head]
    stdout = str(result.get("stdout") or "")
    stderr = str(result.get("stderr") or "")
    if stdout:
        lines.append(stdout.rstrip("\n"))
    if stderr:
        lines.append("-- stderr:")
        lines.append(stderr.rstrip("\n"))
    return "\n".join(lines)


def job_text(view: JobView) -> str:
    """``carrier job show``: the job's fields and, for Ansible jobs, the recap."""
    lines = [
        f"job      {view.id}",
        f"kind     {view.kind}",
        f"status   {view.status}" + (f" ({view.reason})" if view.reason else ""),
        f"message  {view.message or '-'}",
        f"owner    {view.owner} via {view.door}",
        f"target   {view.target or '-'}",
        f"hosts    {', '.join(view.hosts) or '-'}",
        f"created  {_when(view.created_at)}   started {_when(view.started_at)}   "
        f"finished {_when(view.finished_at)}",
        f"events   {view.cursor}",
    ]
    if view.rc is not None:
        lines.append(f"rc       {view.rc}")
    recap = view.summary.get("recap")
    if isinstance(recap, Mapping) and recap:
        lines.append("recap")
        for host, counts in sorted(recap.items()):
            fields = " ".join(f"{k}={counts.get(k, 0)}" for k in ("ok", "changed", "dark", "failures",
                                                                  "skipped", "ignored", "rescued"))
            lines.append(f"  {host:<20} {fields}")
    return "\n".join(lines)


def jobs_table(views: Sequence[JobView]) -> str:
    """``carrier jobs``: one line per job, newest first."""
    if not views:
        return "no jobs"
    rows = [("ID", "KIND", "STATUS", "OWNER", "TARGET", "CREATED", "MESSAGE")]
    for v in views:
        message = v.message if len(v.message) <= 60 else v.message[:57] + "..."
        rows.append((v.id, v.kind, v.status, v.owner, v.target or "-", _when(v.created_at), message))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:6])) + "  " + row[6] for row in rows
    ).rstrip()


def junit_xml(view: JobView, events: Iterable[EventRecord]) -> str:
    """A JUnit report: one test case per (host, task) result, failures and skips marked.

    A job that ended without task results (a syntax error, a missing playbook) is one failed case
    carrying the job's message, so CI never reads "0 tests, 0 failures" as success.
    """
    suite = ET.Element("testsuite", name=f"carrier {view.kind} {view.spec.get('playbook') or view.target}")
    cases = 0
    failures = 0
    skipped = 0
    for event in events:
        outcome = _CASE_EVENTS.get(event.type)
        if outcome is None:
            continue
        data = event.data
        case = ET.SubElement(suite, "testcase", classname=str(data.get("host", "?")),
                             name=str(data.get("task") or data.get("task_action") or "task"))
        cases += 1
        res = data.get("res") if isinstance(data.get("res"), Mapping) else {}
        assert isinstance(res, Mapping)
        message = str(res.get("msg") or "")
        if outcome in ("failed", "unreachable"):
            failures += 1
            node = ET.SubElement(case, "failure", message=message or outcome, type=outcome)
            node.text = str(data.get("stdout") or message)
        elif outcome == "skipped":
            skipped += 1
            ET.SubElement(case, "skipped", message=str(res.get("skip_reason") or message or "skipped"))
    if view.status != "succeeded" and failures == 0:
        case = ET.SubElement(suite, "testcase", classname="carrier", name=f"job {view.id}")
        ET.SubElement(case, "failure", message=view.message, type=view.reason or view.status)
        cases += 1
        failures += 1
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    if view.started_at and view.finished_at:
        suite.set("time", f"{view.finished_at - view.started_at:.3f}")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
