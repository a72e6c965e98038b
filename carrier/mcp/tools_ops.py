"""The operations tools: ``inventory_hosts``, ``playbook_list``, ``playbook_run``, ``ssh_exec``,
``ssh_list``, ``ssh_disconnect``, the ``job_*`` and the ``schedule_*`` tools: each a few lines over
one call of the operations layer (:mod:`carrier.ops`), which decides, audits and runs.

The caller is the HTTP door's authenticated identity (its token's), or the local user over stdio.
Results are JSON objects with stable field names. Outputs are bounded by ``max_bytes`` and carry a
cursor to read on, plus a ``truncated``/``more`` flag: nothing is cut without saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from carrier.auth.policy import Identity
from carrier.config import Config
from carrier.jobs.manager import JobView
from carrier.mcp.server import ServerContext
from carrier.mcp.tooling import tool_errors
from carrier.ops import JOB_KINDS, JOB_STATUSES, Ops, OpsError, Services
from carrier.ops.identity import local_identity
from carrier.ops.pages import clip_text, json_size
from carrier.ops.schedules import ScheduleOps

#: Where the HTTP door puts the caller's identity in the ASGI scope (see carrier.mcp.http).
IDENTITY_SCOPE_KEY = "carrier.identity"
DEFAULT_MAX_BYTES = 65_536
MAX_MAX_BYTES = 1_048_576
MAX_WAIT = 3600.0

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
RUNS = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
)
CONTROLS = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
)

MaxBytes = Annotated[
    int,
    Field(
        ge=256,
        le=MAX_MAX_BYTES,
        description="at most this many bytes of output in the result; read on with the cursor",
    ),
]
JobId = Annotated[str, Field(description="a job id (from job_list, playbook_run, ssh_exec or job_start)")]

# --------------------------------------------------------------------------- shared services

def services_for(context: ServerContext) -> Services:
    """The services of ``context`` (made and closed with it when none were attached)."""
    return context.services


def attach_services(context: ServerContext, services: Services, *, owned: bool = False) -> None:
    """Make ``services`` (e.g. ``carrier serve``'s) the ones the tools of ``context`` use."""
    context.attach_services(services, owned=owned)


def identity_of(request: Any, config: Config) -> Identity:
    """The caller of one MCP request: the HTTP door's identity, or the local user (stdio: no request)."""
    if request is None:
        return local_identity(config, door="mcp")
    scope = getattr(request, "scope", None)
    identity = scope.get(IDENTITY_SCOPE_KEY) if isinstance(scope, Mapping) else None
    if not isinstance(identity, Identity):
        # Only the HTTP door builds requests, and it always sets the identity: refuse otherwise.
        raise ToolError("not authenticated: this request carries no Carrier identity")
    return identity


def caller(ctx: Context, config: Config) -> Identity:
    """Who is calling: the HTTP door's authenticated identity, or the local user over stdio."""
    try:
        request = ctx.request_context.request
    except ValueError:
        request = None
    return identity_of(request, config)


# --------------------------------------------------------------------------- the tools


def register(server: MCPServer, context: ServerContext) -> None:
    """Add the operations tools; they share ``services_for(context).ops``."""
    config = context.config

    def ops() -> Ops:
        return services_for(context).ops

    @server.tool(name="inventory_hosts", annotations=READ_ONLY)
    @tool_errors
    def inventory_hosts(
        ctx: Context,
        pattern: Annotated[
            str, Field(description="an inventory pattern: all, a group, a host, globs")
        ] = "all",
    ) -> dict[str, Any]:
        """The inventory hosts a pattern selects, each with its groups and whether its ssh master runs."""
        hosts = ops().hosts(caller(ctx, config), pattern, tool="inventory_hosts", masters=True)
        return {"pattern": pattern, "hosts": [
            {"name": h.name, "groups": list(h.groups), "connection": h.connection,
             "master_running": h.master_running} for h in hosts]}

    @server.tool(name="playbook_list", annotations=READ_ONLY)
    @tool_errors
    def playbook_list(ctx: Context) -> dict[str, Any]:
        """The playbooks you may run: name, description, default_limit and the variables each allows."""
        infos = ops().playbooks(caller(ctx, config), tool="playbook_list")
        return {"playbooks": [info.to_dict() for info in infos]}

    @server.tool(name="playbook_run", annotations=RUNS)
    @tool_errors
    def playbook_run(
        ctx: Context,
        playbook: Annotated[str, Field(description="a playbook name from playbook_list")],
        limit: Annotated[
            str | None, Field(description="host pattern; default the playbook's default_limit")
        ] = None,
        extra_vars: Annotated[
            dict[str, Any] | None, Field(description="variables the playbook declares (see playbook_list)")
        ] = None,
        check: Annotated[bool, Field(description="check mode: report, change nothing")] = False,
        diff: Annotated[bool, Field(description="show differences of changed files")] = False,
        tags: Annotated[list[str] | None, Field(description="only tasks with these tags")] = None,
        wait: Annotated[bool, Field(description="wait for the end and return the recap")] = False,
        timeout: Annotated[float, Field(ge=0, le=MAX_WAIT, description="how long to wait (s)")] = 600,
    ) -> dict[str, Any]:
        """Run a catalogued playbook as a job; returns the job id (and its recap with wait=true)."""
        view = ops().run_playbook(caller(ctx, config), playbook, limit=limit, extra_vars=extra_vars,
                                  check=check, diff=diff, tags=tuple(tags or ()), tool="playbook_run",
                                  wait=timeout if wait else None)
        return _job_result(view)

    @server.tool(name="ssh_exec", annotations=RUNS)
    @tool_errors
    def ssh_exec(
        ctx: Context,
        host_or_pattern: Annotated[str, Field(description="a host, group or pattern from the inventory")],
        command: Annotated[
            str, Field(description="the command, split like a shell would (no shell features)")
        ],
        timeout: Annotated[float, Field(gt=0, le=MAX_WAIT, description="seconds before it is stopped")] = 60,
        max_bytes: MaxBytes = DEFAULT_MAX_BYTES,
    ) -> dict[str, Any]:
        """Run a command on hosts over their ssh masters (the fast path); per-host rc/stdout/stderr."""
        view, page = ops().exec_wait(caller(ctx, config), host_or_pattern, command, timeout=timeout,
                                     max_bytes=MAX_MAX_BYTES * 4, tool="ssh_exec")
        results = [e["data"] for e in page.events if e["type"] == "exec.result"]
        per_host = max(256, max_bytes // (2 * max(1, len(results))))
        hosts = []
        for r in results:
            out, cut_out = clip_text(str(r.get("stdout", "")), per_host)
            err, cut_err = clip_text(str(r.get("stderr", "")), per_host)
            hosts.append({"host": r.get("host"), "status": r.get("status"), "rc": r.get("rc"), "stdout": out,
                          "stderr": err, "truncated": bool(r.get("truncated")) or cut_out or cut_err})
        return {"job_id": view.id, "status": view.status, "message": view.message, "hosts": hosts}

    @server.tool(name="ssh_list", annotations=READ_ONLY)
    @tool_errors
    def ssh_list(ctx: Context) -> dict[str, Any]:
        """The ssh ControlMasters of the inventory hosts: running or not, pid."""
        masters = ops().ssh_masters(caller(ctx, config), tool="ssh_list")
        return {"masters": [{"host": m.host, "running": m.running, "pid": m.pid, "detail": m.detail}
                            for m in masters]}

    @server.tool(name="nodes_list", annotations=READ_ONLY)
    @tool_errors
    def nodes_list(ctx: Context) -> dict[str, Any]:
        """Execution nodes: groups served, capacity, health (ansible-runner --version), running jobs."""
        return {"nodes": [n.to_dict() for n in ops().nodes(caller(ctx, config), tool="nodes_list")]}

    @server.tool(name="ssh_disconnect", annotations=CONTROLS)
    @tool_errors
    def ssh_disconnect(
        ctx: Context, host: Annotated[str, Field(description="one inventory host")]
    ) -> dict[str, Any]:
        """Close a host's ssh master (the next command opens a new one)."""
        return {"host": host, "was_running": ops().ssh_disconnect(caller(ctx, config), host,
                                                                  tool="ssh_disconnect")}

    @server.tool(name="job_start", annotations=RUNS)
    @tool_errors
    def job_start(
        ctx: Context,
        host: Annotated[str, Field(description="one inventory host")],
        command: Annotated[str, Field(description="the program to run in a terminal, e.g. top")],
        cols: Annotated[int, Field(ge=10, le=1000)] = 120,
        rows: Annotated[int, Field(ge=5, le=500)] = 40,
    ) -> dict[str, Any]:
        """Start an interactive terminal (PTY) job; drive it with job_input / job_screen / job_wait."""
        view = ops().pty_start(caller(ctx, config), host, command, cols=cols, rows=rows, tool="job_start")
        return _job_result(view)

    @server.tool(name="job_status", annotations=READ_ONLY)
    @tool_errors
    def job_status(ctx: Context, job_id: JobId) -> dict[str, Any]:
        """A job's status, target hosts, message, rc and summary (the recap for playbooks)."""
        return _job_result(ops().job(caller(ctx, config), job_id, tool="job_status"))

    @server.tool(name="job_output", annotations=READ_ONLY)
    @tool_errors
    def job_output(
        ctx: Context,
        job_id: JobId,
        since: Annotated[
            int, Field(ge=0, description="next_cursor of the previous call (0: from the start)")
        ] = 0,
        max_bytes: MaxBytes = DEFAULT_MAX_BYTES,
    ) -> dict[str, Any]:
        """A job's output after a cursor: events (playbook/exec) or terminal bytes (pty), bounded;
        call again with next_cursor while more is true."""
        who = caller(ctx, config)
        view = ops().job(who, job_id, tool="job_output")
        if view.kind == "pty":
            view, read = ops().pty_output(who, view.id, since, max_bytes, tool="job_output")
            return {"job_id": view.id, "kind": view.kind, "status": view.status, "text": read.text(),
                    "cursor": read.start, "next_cursor": read.next_cursor, "dropped": read.dropped,
                    "more": not read.done}
        view, page = ops().event_page(who, view.id, since, max_bytes, tool="job_output")
        return {"job_id": view.id, "kind": view.kind, "status": view.status, "events": page.events,
                "next_cursor": page.next_cursor, "more": page.more or not view.done,
                "truncated": page.truncated}

    @server.tool(name="job_input", annotations=CONTROLS)
    @tool_errors
    def job_input(
        ctx: Context,
        job_id: JobId,
        text: Annotated[str, Field(description="text to type")] = "",
        keys: Annotated[
            list[str] | None, Field(description="named keys pressed after the text: Enter, Up, C-c")
        ] = None,
        secret: Annotated[
            str | None, Field(description="instead of text: the name of a secret your role may use "
                                          "(e.g. a sudo password), typed with Enter; never shown")
        ] = None,
    ) -> dict[str, Any]:
        """Type text and/or press named keys in a running terminal job, or type a named secret."""
        cursor = ops().pty_input(caller(ctx, config), job_id, text, keys or (), secret=secret,
                                 tool="job_input")
        return {"job_id": job_id, "cursor": cursor}

    @server.tool(name="job_screen", annotations=READ_ONLY)
    @tool_errors
    def job_screen(ctx: Context, job_id: JobId) -> dict[str, Any]:
        """What a terminal job's screen shows now: rows, cursor position, size."""
        view, screen = ops().pty_screen(caller(ctx, config), job_id, tool="job_screen")
        return {"job_id": view.id, "status": view.status, "screen": screen.to_dict()}

    @server.tool(name="job_wait", annotations=READ_ONLY)
    @tool_errors
    def job_wait(
        ctx: Context,
        job_id: JobId,
        pattern: Annotated[
            str | None, Field(description="terminal jobs: a regex to wait for on screen")
        ] = None,
        timeout: Annotated[float, Field(ge=0, le=MAX_WAIT, description="seconds")] = 30,
    ) -> dict[str, Any]:
        """Wait until a job ends (or, for a terminal job, until pattern shows); returns its status."""
        who = caller(ctx, config)
        if pattern is not None:
            view, result = ops().pty_wait(who, job_id, pattern, timeout=timeout, tool="job_wait")
            return {"job_id": view.id, "wait": result.to_dict(), "job": _job_result(view)}
        view = ops().wait(who, job_id, timeout=timeout, tool="job_wait")
        return {"job_id": view.id, "done": view.done, "job": _job_result(view)}

    @server.tool(name="job_kill", annotations=CONTROLS)
    @tool_errors
    def job_kill(
        ctx: Context,
        job_id: JobId,
        signal: Annotated[str, Field(description="terminal jobs: TERM, INT, KILL or HUP")] = "TERM",
    ) -> dict[str, Any]:
        """Stop a job (queued: cancelled at once; running: stopped by its engine)."""
        return _job_result(ops().kill(caller(ctx, config), job_id, signal, tool="job_kill"))

    @server.tool(name="job_list", annotations=READ_ONLY)
    @tool_errors
    def job_list(
        ctx: Context,
        status: Annotated[str | None, Field(description=f"one of {', '.join(JOB_STATUSES)}")] = None,
        kind: Annotated[str | None, Field(description=f"one of {', '.join(JOB_KINDS)}")] = None,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
    ) -> dict[str, Any]:
        """Jobs newest first: yours (an admin sees everyone's)."""
        views = ops().list_jobs(caller(ctx, config), status=status, kind=kind, limit=limit, tool="job_list")
        return {"jobs": [_job_brief(v) for v in views]}

    @server.tool(name="schedule_list", annotations=READ_ONLY)
    @tool_errors
    def schedule_list(ctx: Context) -> dict[str, Any]:
        """Schedules (yours; an admin sees everyone's): cron, playbook, limit, next run, last slots."""
        views = ScheduleOps(ops()).list(caller(ctx, config), tool="schedule_list")
        return {"schedules": [v.to_dict() for v in views]}

    @server.tool(name="schedule_add", annotations=RUNS)
    @tool_errors
    def schedule_add(
        ctx: Context,
        name: Annotated[str, Field(description="a new schedule name: letters, digits, _ . -")],
        playbook: Annotated[str, Field(description="a playbook name from playbook_list")],
        cron: Annotated[str, Field(description='UTC cron: "0 3 * * *"; a 6th field is seconds; @daily')],
        limit: Annotated[
            str | None, Field(description="host pattern; default the playbook's default_limit")
        ] = None,
        extra_vars: Annotated[
            dict[str, Any] | None, Field(description="variables the playbook declares (see playbook_list)")
        ] = None,
        notify: Annotated[
            str, Field(description="mail the result to you: always, failure (default) or never")
        ] = "failure",
    ) -> dict[str, Any]:
        """Run a playbook on a cron schedule as you (carrier serve runs it; missed runs are reported)."""
        view = ScheduleOps(ops()).add(caller(ctx, config), name, playbook, cron=cron, limit=limit,
                                      extra_vars=extra_vars, notify=notify, tool="schedule_add")
        return view.to_dict()

    @server.tool(name="schedule_remove", annotations=CONTROLS)
    @tool_errors
    def schedule_remove(
        ctx: Context, name: Annotated[str, Field(description="a schedule name from schedule_list")]
    ) -> dict[str, Any]:
        """Remove a schedule (yours; an admin: anyone's)."""
        ScheduleOps(ops()).remove(caller(ctx, config), name, tool="schedule_remove")
        return {"name": name, "removed": True}


def _job_brief(view: JobView) -> dict[str, Any]:
    return {
        "job_id": view.id,
        "kind": view.kind,
        "owner": view.owner,
        "door": view.door,
        "target": view.target,
        "status": view.status,
        "created_at": view.created_at,
        "finished_at": view.finished_at,
    }


def _job_result(view: JobView) -> dict[str, Any]:
    summary = dict(view.summary)
    if json_size(summary) > DEFAULT_MAX_BYTES:
        summary = {"note": "summary too large for one result: read it with job_output"}
    return {
        "job_id": view.id,
        "kind": view.kind,
        "owner": view.owner,
        "door": view.door,
        "target": view.target,
        "status": view.status,
        "done": view.done,
        "reason": view.reason,
        "message": view.message,
        "rc": view.rc,
        "hosts": list(view.hosts),
        "summary": summary,
        "cursor": view.cursor,
        "created_at": view.created_at,
        "started_at": view.started_at,
        "finished_at": view.finished_at,
    }


__all__ = [
    "IDENTITY_SCOPE_KEY",
    "OpsError",
    "Services",
    "attach_services",
    "caller",
    "local_identity",
    "register",
    "services_for",
]
