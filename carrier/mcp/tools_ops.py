"""The operations tools: ``inventory_hosts``, ``playbook_list``, ``playbook_run``, ``ssh_exec``,
``ssh_list``, ``ssh_disconnect`` and the ``job_*`` tools, thin wrappers over the job manager.

Every call is decided by the policy for the caller's identity (the token's over HTTP, the local
user's over stdio) and the decision is audited before anything runs. Results are JSON objects with
stable field names. Outputs are bounded by ``max_bytes`` and carry a cursor to read on, plus a
``truncated``/``more`` flag: nothing is cut without saying so.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from carrier.auth.policy import HostRef, Identity, Request
from carrier.auth.service import Trust
from carrier.config import Config
from carrier.errors import CarrierError
from carrier.jobs.manager import JobView
from carrier.jobs.ptyengine import PtyJobs
from carrier.jobs.system import JobSystem
from carrier.mcp.server import ServerContext
from carrier.mcp.tooling import tool_errors
from carrier.store import Store

#: Where the HTTP door puts the caller's identity in the ASGI scope (see carrier.mcp.http).
IDENTITY_SCOPE_KEY = "carrier.identity"
DEFAULT_MAX_BYTES = 65_536
MAX_MAX_BYTES = 1_048_576
MAX_WAIT = 3600.0
JOB_KINDS = ("playbook", "adhoc", "exec", "pty")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")

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


class OpsError(CarrierError):
    """An operations tool cannot do what was asked (denied, not available, bad input)."""


# --------------------------------------------------------------------------- shared services


class Services:
    """The store, trust layer and job system the tools use; built on first use unless given
    (``carrier serve`` passes its own so one manager runs every door's jobs)."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        trust: Trust | None = None,
        jobs: JobSystem | None = None,
    ) -> None:
        self.config = config
        self._store, self._trust, self._jobs = store, trust, jobs
        self._owned: list[Any] = []
        self._lock = threading.Lock()

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store.open(self.config.state_dir)
                self._owned.append(self._store)
            return self._store

    @property
    def trust(self) -> Trust:
        store = self.store
        with self._lock:
            if self._trust is None:
                self._trust = Trust(self.config, store)
            return self._trust

    @property
    def jobs(self) -> JobSystem:
        store = self.store
        with self._lock:
            if self._jobs is None:
                from carrier.jobs.system import build_job_system

                self._jobs = build_job_system(self.config, store)
                self._jobs.manager.start(adopt=False)
                self._owned.append(self._jobs)
            return self._jobs

    def close(self) -> None:
        with self._lock:
            owned, self._owned = self._owned, []
        for part in reversed(owned):  # jobs before the store they write to
            part.close()


def pty_jobs(jobs: JobSystem) -> PtyJobs:
    """The doors' PTY calls for ``jobs`` (its pty engine, registered by build_job_system)."""
    return PtyJobs(jobs.manager, jobs.pty)


_SERVICES_ATTR = "carrier_ops_services"


def services_for(context: ServerContext) -> Services:
    """The services attached to ``context`` (made and closed with it when none were attached)."""
    services = getattr(context, _SERVICES_ATTR, None)
    if isinstance(services, Services):
        return services
    services = Services(context.config)
    attach_services(context, services, owned=True)
    return services


def attach_services(context: ServerContext, services: Services, *, owned: bool = False) -> None:
    setattr(context, _SERVICES_ATTR, services)
    if owned:
        context.on_close(services.close)


def local_identity(config: Config) -> Identity:
    """The stdio door's identity: the local user, with ``mcp.stdio_role`` (default ``operator``
    when the config has it). Stdio is the user's own door: whoever can start ``carrier mcp`` can
    run ``carrier`` itself, so it is trusted as a local admin; the role still bounds what it runs."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    role = config.mcp.stdio_role or ("operator" if "operator" in config.roles else sorted(config.roles)[0])
    return Identity(name=f"local:{user}", role=role, door="mcp", admin=True)


def caller(ctx: Context, config: Config) -> Identity:
    """Who is calling: the HTTP door's authenticated identity, or the local user over stdio."""
    try:
        request = ctx.request_context.request
    except ValueError:
        request = None
    if request is None:
        return local_identity(config)
    scope = getattr(request, "scope", None)
    identity = scope.get(IDENTITY_SCOPE_KEY) if isinstance(scope, Mapping) else None
    if not isinstance(identity, Identity):
        # Only the HTTP door builds requests, and it always sets the identity: refuse otherwise.
        raise ToolError("not authenticated: this request carries no Carrier identity")
    return identity


# --------------------------------------------------------------------------- bounded output


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str, ensure_ascii=False).encode("utf-8"))


def _clip_text(text: str, limit: int) -> tuple[str, bool]:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode("utf-8", "ignore"), True


def _clip_event(data: Mapping[str, Any], limit: int) -> tuple[dict[str, Any], bool]:
    """An event's data with its long string fields cut to ``limit`` bytes (flagged when cut)."""
    out: dict[str, Any] = {}
    cut = False
    for key, value in data.items():
        if isinstance(value, str):
            value, was = _clip_text(value, limit)
            cut = cut or was
        elif isinstance(value, Mapping | list) and _size(value) > limit:
            value, cut = f"({_size(value)} bytes of {key}: too large for one result)", True
        out[key] = value
    return out, cut


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[dict[str, Any]]
    next_cursor: int
    more: bool
    truncated: bool


def read_events(jobs: JobSystem, job_id: str, since: int, max_bytes: int) -> EventPage:
    """Events after ``since`` up to ``max_bytes`` of JSON; the cursor points past the last one
    returned. An event too large alone is returned with its long fields cut (``truncated``)."""
    events: list[dict[str, Any]] = []
    used, cursor, truncated = 0, since, False
    while True:
        batch, _ = jobs.manager.output(job_id, cursor, 200)
        if not batch:
            return EventPage(events, cursor, False, truncated)
        for event in batch:
            item: dict[str, Any] = {
                "seq": event.seq,
                "ts": event.ts,
                "type": event.type,
                "data": dict(event.data or {}),
            }
            size = _size(item)
            if used + size > max_bytes:
                if events:
                    return EventPage(events, cursor, True, truncated)
                item["data"], cut = _clip_event(item["data"], max(128, max_bytes // 4))
                item["truncated"] = cut
                truncated = truncated or cut
                size = _size(item)
            events.append(item)
            used += size
            cursor = event.seq


# --------------------------------------------------------------------------- the tools


def register(server: MCPServer, context: ServerContext) -> None:
    """Add the operations tools; they share ``services_for(context)``."""
    config = context.config

    def svc() -> Services:
        return services_for(context)

    def hosts_of(pattern: str) -> tuple[HostRef, ...]:
        inventory = svc().jobs.inventory
        names = inventory.resolve(pattern)
        groups: dict[str, list[str]] = {}
        for group, members in inventory.groups().items():
            for member in members:
                groups.setdefault(member, []).append(group)
        return tuple(HostRef(n, tuple(sorted(groups.get(n, ())))) for n in names)

    def decide(identity: Identity, request: Request) -> None:
        trust = svc().trust
        decision = trust.policy.decide(identity, request)
        trust.audit.decision(identity, request, decision)
        if not decision.allowed:
            raise OpsError(f"denied: {decision.reason}")

    def started(identity: Identity, view: JobView) -> None:
        svc().trust.audit.job(identity, view.id, "start", hosts=view.hosts, outcome="accepted")

    def job_for(identity: Identity, job_id: str, action: str, tool: str) -> JobView:
        view = svc().jobs.manager.get(job_id)
        decide(identity, Request(action, job_owner=view.owner, tool=tool))  # type: ignore[arg-type]
        return view

    def ptys() -> Any:
        return pty_jobs(svc().jobs)

    @server.tool(name="inventory_hosts", annotations=READ_ONLY)
    @tool_errors
    def inventory_hosts(
        ctx: Context,
        pattern: Annotated[
            str, Field(description="an inventory pattern: all, a group, a host, globs")
        ] = "all",
    ) -> dict[str, Any]:
        """The inventory hosts a pattern selects, each with its groups and whether its ssh master runs."""
        identity = caller(ctx, config)
        decide(identity, Request("inventory", tool="inventory_hosts"))
        jobs = svc().jobs
        out = []
        for ref in hosts_of(pattern):
            conn = jobs.inventory.conn(ref.name)
            master = jobs.ssh.master_alive(conn) if conn.connection == "ssh" else None
            out.append(
                {
                    "name": ref.name,
                    "groups": list(ref.groups),
                    "connection": conn.connection,
                    "master_running": master,
                }
            )
        return {"pattern": pattern, "hosts": out}

    @server.tool(name="playbook_list", annotations=READ_ONLY)
    @tool_errors
    def playbook_list(ctx: Context) -> dict[str, Any]:
        """The playbook catalog: name, description, default_limit and the variables each allows."""
        identity = caller(ctx, config)
        decide(identity, Request("inventory", tool="playbook_list"))
        return {"playbooks": [info.to_dict() for info in svc().jobs.catalog.list()]}

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
        identity = caller(ctx, config)
        jobs = svc().jobs
        info = jobs.catalog.get(playbook)
        if info is None:
            raise OpsError(f"no playbook {playbook!r}: playbook_list shows the catalog")
        pattern = limit or info.default_limit or "all"
        decide(identity, Request("playbook", hosts_of(pattern), playbook=info.name, tool="playbook_run"))
        options: dict[str, Any] = {
            "extra_vars": extra_vars or {},
            "check": check,
            "diff": diff,
            "limit": pattern,
        }
        if tags:
            options["tags"] = ",".join(tags)
        view = jobs.manager.run_playbook(info.name, owner=identity.name, door="mcp", **options)
        started(identity, view)
        if wait:
            view = jobs.manager.wait(view.id, timeout=timeout)
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
        identity = caller(ctx, config)
        argv = _split(command)
        decide(identity, Request("exec", hosts_of(host_or_pattern), command=command, tool="ssh_exec"))
        jobs = svc().jobs
        view = jobs.manager.run_exec(host_or_pattern, argv, owner=identity.name, door="mcp", timeout=timeout)
        started(identity, view)
        view = jobs.manager.wait(view.id, timeout=timeout + 30)
        page = read_events(jobs, view.id, 0, MAX_MAX_BYTES * 4)
        results = [e["data"] for e in page.events if e["type"] == "exec.result"]
        per_host = max(256, max_bytes // (2 * max(1, len(results))))
        hosts = []
        for r in results:
            out, cut_out = _clip_text(str(r.get("stdout", "")), per_host)
            err, cut_err = _clip_text(str(r.get("stderr", "")), per_host)
            hosts.append(
                {
                    "host": r.get("host"),
                    "status": r.get("status"),
                    "rc": r.get("rc"),
                    "stdout": out,
                    "stderr": err,
                    "truncated": bool(r.get("truncated")) or cut_out or cut_err,
                }
            )
        return {"job_id": view.id, "status": view.status, "message": view.message, "hosts": hosts}

    @server.tool(name="ssh_list", annotations=READ_ONLY)
    @tool_errors
    def ssh_list(ctx: Context) -> dict[str, Any]:
        """The ssh ControlMasters of the inventory hosts: running or not, pid."""
        from carrier.ansible.ssh import ssh_list as _list

        identity = caller(ctx, config)
        decide(identity, Request("inventory", tool="ssh_list"))
        jobs = svc().jobs
        return {
            "masters": [
                {"host": m.host, "running": m.running, "pid": m.pid, "detail": m.detail}
                for m in _list(jobs.ssh, jobs.inventory)
            ]
        }

    @server.tool(name="ssh_disconnect", annotations=CONTROLS)
    @tool_errors
    def ssh_disconnect(
        ctx: Context, host: Annotated[str, Field(description="one inventory host")]
    ) -> dict[str, Any]:
        """Close a host's ssh master (the next command opens a new one)."""
        from carrier.ansible.ssh import ssh_disconnect as _disconnect

        identity = caller(ctx, config)
        # Closing a master interrupts what runs over it: the caller must be allowed to exec there.
        decide(identity, Request("exec", hosts_of(host), command="ssh -O exit", tool="ssh_disconnect"))
        jobs = svc().jobs
        return {"host": host, "was_running": _disconnect(jobs.ssh, jobs.inventory, host)}

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
        identity = caller(ctx, config)
        terminals = ptys()
        refs = hosts_of(host)
        if [r.name for r in refs] != [host]:
            raise OpsError(f"{host!r} is not a single inventory host: name one host")
        decide(identity, Request("pty", refs, command=command, tool="job_start"))
        # A role with shell gets the command as shell text; others get it split into an argv.
        role = config.roles.get(identity.role)
        shell = bool(role and role.shell)
        argv: str | list[str] = command if shell else _split(command)
        view = terminals.start(
            host, argv, owner=identity.name, door="mcp", shell=shell, cols=cols, rows=rows
        )
        started(identity, view)
        return _job_result(view)

    @server.tool(name="job_status", annotations=READ_ONLY)
    @tool_errors
    def job_status(ctx: Context, job_id: JobId) -> dict[str, Any]:
        """A job's status, target hosts, message, rc and summary (the recap for playbooks)."""
        identity = caller(ctx, config)
        return _job_result(job_for(identity, job_id, "job_read", "job_status"))

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
        identity = caller(ctx, config)
        view = job_for(identity, job_id, "job_read", "job_output")
        if view.kind == "pty":
            read = ptys().output(view.id, since, max_bytes)
            return {
                "job_id": view.id,
                "kind": view.kind,
                "status": view.status,
                "text": read.text(),
                "cursor": read.start,
                "next_cursor": read.next_cursor,
                "dropped": read.dropped,
                "more": not read.done,
            }
        page = read_events(svc().jobs, view.id, since, max_bytes)
        return {
            "job_id": view.id,
            "kind": view.kind,
            "status": view.status,
            "events": page.events,
            "next_cursor": page.next_cursor,
            "more": page.more or not view.done,
            "truncated": page.truncated,
        }

    @server.tool(name="job_input", annotations=CONTROLS)
    @tool_errors
    def job_input(
        ctx: Context,
        job_id: JobId,
        text: Annotated[str, Field(description="text to type")] = "",
        keys: Annotated[
            list[str] | None, Field(description="named keys pressed after the text: Enter, Up, C-c")
        ] = None,
    ) -> dict[str, Any]:
        """Type text and/or press named keys in a running terminal job."""
        identity = caller(ctx, config)
        view = job_for(identity, job_id, "job_control", "job_input")
        if view.kind != "pty":
            raise OpsError(f"job {view.id} is a {view.kind} job: input goes to terminal jobs only")
        cursor = ptys().input(view.id, text, keys or ())
        return {"job_id": view.id, "cursor": cursor}

    @server.tool(name="job_screen", annotations=READ_ONLY)
    @tool_errors
    def job_screen(ctx: Context, job_id: JobId) -> dict[str, Any]:
        """What a terminal job's screen shows now: rows, cursor position, size."""
        identity = caller(ctx, config)
        view = job_for(identity, job_id, "job_read", "job_screen")
        if view.kind != "pty":
            raise OpsError(f"job {view.id} is a {view.kind} job: only terminal jobs have a screen")
        screen = ptys().screen(view.id).to_dict()
        return {"job_id": view.id, "status": view.status, "screen": screen}

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
        identity = caller(ctx, config)
        view = job_for(identity, job_id, "job_read", "job_wait")
        if view.kind == "pty" and pattern is not None:
            result = ptys().wait(view.id, pattern, timeout=timeout)
            return {
                "job_id": view.id,
                "wait": result.to_dict(),
                "job": _job_result(svc().jobs.manager.get(job_id)),
            }
        view = svc().jobs.manager.wait(view.id, timeout=timeout)
        return {"job_id": view.id, "done": view.done, "job": _job_result(view)}

    @server.tool(name="job_kill", annotations=CONTROLS)
    @tool_errors
    def job_kill(
        ctx: Context,
        job_id: JobId,
        signal: Annotated[str, Field(description="terminal jobs: TERM, INT, KILL or HUP")] = "TERM",
    ) -> dict[str, Any]:
        """Stop a job (queued: cancelled at once; running: stopped by its engine)."""
        identity = caller(ctx, config)
        view = job_for(identity, job_id, "job_control", "job_kill")
        if view.kind == "pty" and signal != "TERM" and not view.done:
            view = ptys().kill(view.id, signal, by=identity.name)
        else:
            view = svc().jobs.manager.kill(view.id, by=identity.name)
        return _job_result(view)

    @server.tool(name="job_list", annotations=READ_ONLY)
    @tool_errors
    def job_list(
        ctx: Context,
        status: Annotated[str | None, Field(description=f"one of {', '.join(JOB_STATUSES)}")] = None,
        kind: Annotated[str | None, Field(description=f"one of {', '.join(JOB_KINDS)}")] = None,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
    ) -> dict[str, Any]:
        """Jobs newest first: yours (an admin sees everyone's)."""
        identity = caller(ctx, config)
        if status is not None and status not in JOB_STATUSES:
            raise OpsError(f"status must be one of {', '.join(JOB_STATUSES)}, not {status!r}")
        if kind is not None and kind not in JOB_KINDS:
            raise OpsError(f"kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
        owner = None if identity.admin else identity.name
        views = svc().jobs.manager.list_jobs(owner=owner, status=status, kind=kind, limit=limit)
        return {"jobs": [_job_brief(v) for v in views]}


def _split(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise OpsError(f"cannot split the command: {exc}") from None
    if not argv:
        raise OpsError("no command given")
    return argv


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
    if _size(summary) > DEFAULT_MAX_BYTES:
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
    "read_events",
    "register",
    "services_for",
]
