"""The operations layer: one method per operation, the same for every door.

Each method takes the caller's :class:`~carrier.auth.policy.Identity` and does, in this order:

1. check the input (formats from :mod:`carrier.formats`; a refusal is audited too),
2. resolve the hosts once (only hosts that are in the inventory),
3. ``policy.decide`` — the only caller of it for operations,
4. write exactly one audit row for that decision (allowed or denied),
5. call the job system (``jobs``), and write the job's start row when one was started.

Doors (mail, MCP, CLI) turn their input into one call here and render what comes back; they never
decide and never touch an engine. Operations that a door may want to check for a whole batch before
any of them runs (a mail is one request: all of its lines run, or none) come as ``plan_*`` methods
returning a :class:`Planned` whose ``run()`` does the work; the plain methods are ``plan_*(...).run()``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from carrier import secretstore
from carrier.ansible.catalog import PlaybookInfo, check_playbook_name
from carrier.ansible.ssh import MasterInfo
from carrier.auth.audit import Audit
from carrier.auth.enrollment import Outcome as EnrollOutcome
from carrier.auth.errors import AuthError
from carrier.auth.policy import Decision, HostRef, Identity, Policy, Request, auto_sudo_secret, become_secret
from carrier.auth.tokens import IssuedToken
from carrier.config import SECRET_NAME, Config
from carrier.errors import CarrierError
from carrier.formats import FormatError, check_job_id, check_token_id, pattern_problem
from carrier.jobs.engines import check_controller_use
from carrier.jobs.manager import JobView
from carrier.jobs.pty import OutputRead, WaitResult
from carrier.jobs.ptyengine import PtyJobs
from carrier.jobs.screen import ScreenView
from carrier.jobs.system import JobSystem
from carrier.mail.crypto import key_can_encrypt
from carrier.nodes.status import NodeStatus
from carrier.ops.errors import Denied, OpsError
from carrier.ops.pages import EventPage, read_events
from carrier.store import EventRecord, Store, TokenRecord, approvals
from carrier.store import settings as user_settings
from carrier.store.schema import ENCRYPT_MODES
from carrier.store.settings import UserSettings

T = TypeVar("T")
U = TypeVar("U")
#: Called with the new job inside the transaction that records it (the mail door records its step
#: there, so a crash never leaves a job without its step or a step without its job).
Within = Callable[[JobView], None]

JOB_KINDS = ("playbook", "adhoc", "exec", "pty")
JOB_STATUSES = ("queued", "awaiting_approval", "running", "succeeded", "failed", "cancelled", "lost")
PTY_SIGNALS = ("TERM", "INT", "KILL", "HUP")


@dataclass(frozen=True)
class HostInfo:
    """An inventory host as the doors list it."""

    name: str
    groups: tuple[str, ...]
    connection: str
    master_running: bool | None = None


@dataclass
class Planned(Generic[T]):
    """A decided, audited operation waiting to run (``run()`` does it)."""

    request: Request
    decision: Decision
    _run: Callable[[Within | None], T]

    def run(self, within: Within | None = None) -> T:
        return self._run(within)

    def then(self, fn: Callable[[T], U]) -> Planned[U]:
        """The same operation, its result passed through ``fn``."""
        inner = self._run
        return Planned(self.request, self.decision, lambda within: fn(inner(within)))


@dataclass(frozen=True)
class Watch:
    """Reads of one job after a single decision (a terminal following a job polls many times; one
    audit row says it was allowed to)."""

    job_id: str
    _ops: Ops

    def get(self) -> JobView:
        return self._ops.jobs.manager.get(self.job_id)

    def output(self, cursor: int = 0, limit: int = 500) -> tuple[list[EventRecord], int]:
        return self._ops.jobs.manager.output(self.job_id, cursor, limit)

    def wait(self, timeout: float | None = None) -> JobView:
        return self._ops.jobs.manager.wait(self.job_id, timeout=timeout)

    def pty_output(self, since: int = 0, limit: int = 65536) -> OutputRead:
        return self._ops.ptys.output(self.job_id, since, limit)

    def pty_wait(self, pattern: str | None = None, *, timeout: float = 30.0, idle_ms: int | None = None,
                 since: int | None = None) -> WaitResult:
        return self._ops.ptys.wait(self.job_id, pattern, timeout=timeout, idle_ms=idle_ms, since=since)

    def screen(self) -> ScreenView:
        return self._ops.ptys.screen(self.job_id)

    def settled_screen(self, settle_ms: int) -> ScreenView:
        """The screen once output paused for ``settle_ms`` (at most 5 s) or the job ended."""
        if not self.get().done:
            self.pty_wait(idle_ms=settle_ms, timeout=5.0)
        return self.screen()

    def handle(self) -> Any:
        """The live terminal (None when the job has ended)."""
        return self._ops.ptys.handle(self.job_id)


class Ops:
    """The operations of one Carrier (its config, store, trust layer and job system)."""

    def __init__(self, config: Config, store: Store, policy: Policy, audit: Audit,
                 jobs: JobSystem | Callable[[], JobSystem], *, trust: Any = None) -> None:
        self.config = config
        self.store = store
        self.policy = policy
        self.audit = audit
        # A callable builds the job system on first use: mail-only callers never start it.
        self._jobs = jobs
        self._ptys: PtyJobs | None = None
        #: The trust layer (tokens, enrollment); only the token and enrollment operations use it.
        self.trust = trust

    @property
    def jobs(self) -> JobSystem:
        if not isinstance(self._jobs, JobSystem):
            self._jobs = self._jobs()
        return self._jobs

    @property
    def ptys(self) -> PtyJobs:
        if self._ptys is None:
            self._ptys = PtyJobs(self.jobs.manager, self.jobs.pty)
        return self._ptys

    # ================================================================= the steps every operation takes

    def _record(self, who: Identity, request: Request, decision: Decision) -> None:
        self.audit.decision(who, request, decision)

    def refuse(self, who: Identity, request: Request, message: str) -> OpsError:
        """Audit a refusal of bad input as a denied decision; the error to raise."""
        self._record(who, request, Decision(False, f"invalid input: {message}"))
        return OpsError(message)

    def decide(self, who: Identity, request: Request) -> Decision:
        """``policy.decide`` and its audit row; Denied when it says no."""
        decision = self.policy.decide(who, request)
        self._record(who, request, decision)
        if not decision.allowed:
            raise Denied(f"not allowed: {decision.reason}")
        return decision

    def _plan(self, who: Identity, request: Request, run: Callable[[Within | None], T]) -> Planned[T]:
        return Planned(request, self.decide(who, request), run)

    def _hosts(self, who: Identity, request: Request, pattern: object) -> tuple[HostRef, ...]:
        """Resolve ``pattern`` (checked first) to inventory hosts with their groups."""
        problem = pattern_problem(pattern)
        if problem is not None:
            raise self.refuse(who, request, problem)
        assert isinstance(pattern, str)
        inventory = self.jobs.inventory
        try:
            names = inventory.resolve(pattern)
            groups = inventory.groups()
        except CarrierError as exc:
            raise self.refuse(who, request, str(exc)) from None
        member: dict[str, list[str]] = {}
        for group, hosts in groups.items():
            for host in hosts:
                member.setdefault(host, []).append(group)
        # ``local``: running there means running on this machine (the policy wants `local: true`).
        return tuple(HostRef(n, tuple(sorted(member.get(n, ()))), local=inventory.is_controller(n))
                     for n in names)

    def _controller(self, who: Identity) -> bool:
        """Whether the engines may run on the controller's own hosts for ``who`` (the policy has
        already refused a controller host to a role without ``local: true``)."""
        role = self.policy.role_of(who)
        return bool(role and role.local)

    def _submit(self, who: Identity, submit: Callable[[], JobView], within: Within | None,
                detail: Mapping[str, Any] | None = None) -> JobView:
        with self.store.transaction():
            view = submit()
            if within is not None:
                within(view)
        self.audit.job(who, view.id, "start", hosts=view.hosts, outcome="accepted", detail=detail)
        return view

    def _job(self, who: Identity, action: str, job_id: object, tool: str | None,
             *, kind: str | None = None, secret: str | None = None) -> JobView:
        """The job ``job_id`` once the policy let ``who`` do ``action`` on it."""
        request = Request(action, tool=tool)  # type: ignore[arg-type]
        try:
            check_job_id(job_id)
        except FormatError as exc:
            raise self.refuse(who, request, str(exc)) from None
        assert isinstance(job_id, str)
        try:
            view = self.jobs.manager.get(job_id)
        except CarrierError as exc:
            raise self.refuse(who, request, str(exc)) from None
        self.decide(who, Request(action, job_owner=view.owner, tool=tool, secret=secret))  # type: ignore[arg-type]
        if kind is not None and view.kind != kind:
            raise OpsError(f"job {view.id} is a {view.kind} job: this works on {kind} jobs only")
        return view

    def _argv(self, who: Identity, request: Request, command: Sequence[str] | str) -> list[str]:
        if isinstance(command, str):
            try:
                argv = shlex.split(command)
            except ValueError as exc:
                raise self.refuse(who, request, f"cannot split the command: {exc}") from None
        else:
            argv = list(command)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise self.refuse(who, request, "no command given")
        return argv

    # ================================================================= inventory and catalog

    def hosts(self, who: Identity, pattern: str = "all", *, tool: str | None = None,
              masters: bool = False) -> list[HostInfo]:
        """The hosts ``pattern`` selects (with groups; with ``masters``, whether each ssh master runs)."""
        request = Request("inventory", tool=tool)
        refs = self._hosts(who, request, pattern)
        self.decide(who, request)
        out = []
        for ref in refs:
            conn = self.jobs.inventory.conn(ref.name)
            running = self.jobs.ssh.master_alive(conn) if masters and conn.connection == "ssh" else None
            out.append(HostInfo(ref.name, tuple(g for g in ref.groups if g not in ("all", "ungrouped")),
                                conn.connection, running))
        return out

    def groups(self, who: Identity) -> dict[str, list[str]]:
        """Inventory groups and their hosts (for the LLM's context)."""
        self.decide(who, Request("inventory"))
        return self.jobs.inventory.groups()

    def playbooks(self, who: Identity, *, tool: str | None = None) -> list[PlaybookInfo]:
        """The catalog entries ``who`` may run (admins' only ones for admins)."""
        self.decide(who, Request("inventory", tool=tool))
        return [info for info in self.jobs.catalog.list()
                if self.policy.may_run_playbook(who, info.name, info.admin_only)]

    # ================================================================= running things

    def plan_playbook(self, who: Identity, playbook: str, *, limit: str | None = None,
                      extra_vars: Mapping[str, Any] | None = None, check: bool = False, diff: bool = False,
                      tags: Sequence[str] = (), skip_tags: Sequence[str] = (), forks: int | None = None,
                      timeout: int | None = None, tool: str | None = None) -> Planned[JobView]:
        """Decide a playbook run (hosts from ``limit``, else the playbook's default_limit, else all)."""
        request = Request("playbook", playbook=str(playbook)[:100], tool=tool)
        try:
            stem = check_playbook_name(playbook)
        except CarrierError as exc:
            raise self.refuse(who, request, str(exc)) from None
        info = self.jobs.catalog.get(stem)
        if info is None:
            raise self.refuse(who, request, f"no playbook named {stem!r}: `playbooks` lists the ones "
                              "you may run")
        try:  # a playbook that reaches the controller says so in its metadata, and needs a local role
            check_controller_use(info, controller=self._controller(who))
        except CarrierError as exc:
            raise self.refuse(who, request, str(exc)) from None
        pattern = limit or info.default_limit or "all"
        hosts = self._hosts(who, request, pattern)
        request = Request("playbook", hosts, playbook=info.name, tool=tool, admin_only=info.admin_only,
                          controller=info.controller)
        options: dict[str, Any] = {"limit": pattern, "extra_vars": dict(extra_vars or {}), "check": check,
                                   "diff": diff, "controller": self._controller(who)}
        if tags:
            options["tags"] = ",".join(tags)
        if skip_tags:
            options["skip_tags"] = ",".join(skip_tags)
        if forks is not None:
            options["forks"] = forks
        if timeout is not None:
            options["timeout"] = timeout
        secret = become_secret(self.policy.role_of(who))
        if secret:
            options["become_secret"] = secret  # its name: the engine reads the value at start
        manager = self.jobs.manager
        rule = info.approval
        names = ", ".join(h.name for h in hosts)

        def submit() -> JobView:
            view = manager.run_playbook(info.name, owner=who.name, door=who.door, **options)
            if rule is not None and not view.done:
                preview = None
                if rule.preview and not check:
                    # What the run would change, for the approvers: the same run in check mode
                    # (decided with it: check mode changes nothing the run itself may not).
                    preview = manager.run_playbook(info.name, owner=who.name, door=who.door,
                                                   **{**options, "check": True, "diff": True})
                    self.audit.job(who, preview.id, "start", hosts=preview.hosts, outcome="accepted",
                                   detail={"playbook": info.name, "limit": pattern, "preview_of": view.id})
                # In the job's own transaction: the job is never claimable before it is held.
                approvals.create(self.store, view.id, requester=who.name, by_role=rule.by, needed=rule.count,
                                 ttl=rule.expires, summary=f"playbook {info.name} on {names}"
                                 + (" (check mode)" if check else ""),
                                 preview_job=preview.id if preview is not None else None)
                view = manager.get(view.id)
            return view

        detail: dict[str, Any] = {"playbook": info.name, "limit": pattern}
        if secret:
            detail["become_secret"] = secret
        if rule is not None:
            detail["approval"] = rule.to_dict()
        return self._plan(who, request, lambda within: self._submit(who, submit, within, detail))

    def run_playbook(self, who: Identity, playbook: str, *, wait: float | None = None,
                     **options: Any) -> JobView:
        """Run a playbook; with ``wait``, return its status after at most that many seconds (reading
        back the job one just started is part of the same decision)."""
        view = self.plan_playbook(who, playbook, **options).run()
        return view if wait is None else self.jobs.manager.wait(view.id, timeout=wait)

    def plan_adhoc(self, who: Identity, module: str, pattern: str, *, args: str = "",
                   check: bool = False, tool: str | None = None) -> Planned[JobView]:
        """Decide an ad-hoc module run on ``pattern``."""
        request = Request("adhoc", module=str(module)[:100], tool=tool)
        hosts = self._hosts(who, request, pattern)
        request = Request("adhoc", hosts, module=module, command=args or None, tool=tool)
        manager = self.jobs.manager
        secret = become_secret(self.policy.role_of(who))
        extra: dict[str, Any] = {"become_secret": secret} if secret else {}
        return self._plan(who, request, lambda within: self._submit(
            who, lambda: manager.run_adhoc(module, pattern, owner=who.name, door=who.door, args=args,
                                           check=check, **extra), within, {"module": module, **extra}))

    def run_adhoc(self, who: Identity, module: str, pattern: str, **options: Any) -> JobView:
        return self.plan_adhoc(who, module, pattern, **options).run()

    def plan_exec(self, who: Identity, pattern: str, command: Sequence[str] | str, *, shell: bool = False,
                  timeout: float | None = None, tool: str | None = None) -> Planned[JobView]:
        """Decide a command on the hosts of ``pattern`` (an argv; one string for the shell when
        ``shell``, which the role must allow)."""
        request = Request("exec", shell=shell, tool=tool)
        if shell:
            if not isinstance(command, str):
                command = shlex.join(command)
            text = command
            cmd: Sequence[str] | str = command
        else:
            argv = self._argv(who, request, command)
            text, cmd = shlex.join(argv), argv
        hosts = self._hosts(who, request, pattern)
        request = Request("exec", hosts, command=text, shell=shell, tool=tool)
        manager = self.jobs.manager
        return self._plan(who, request, lambda within: self._submit(
            who, lambda: manager.run_exec(pattern, cmd, owner=who.name, door=who.door, shell=shell,
                                          timeout=timeout, controller=self._controller(who)),
            within, {"command": text[:200]}))

    def exec(self, who: Identity, pattern: str, command: Sequence[str] | str, **options: Any) -> JobView:
        return self.plan_exec(who, pattern, command, **options).run()

    def exec_wait(self, who: Identity, pattern: str, command: Sequence[str] | str, *, timeout: float,
                  max_bytes: int, tool: str | None = None) -> tuple[JobView, EventPage]:
        """Run a command and wait for it (``timeout`` + a margin); its events, at most ``max_bytes``."""
        view = self.plan_exec(who, pattern, command, timeout=timeout, tool=tool).run()
        view = self.jobs.manager.wait(view.id, timeout=timeout + 30)
        return view, read_events(self.jobs.manager, view.id, 0, max_bytes)

    # ================================================================= approvals

    def plan_vote(self, who: Identity, job_id: str, vote: str, *, signature: str = "",
                  reason: str = "") -> Planned[JobView]:
        """Decide ``who``'s ``approve``/``deny`` of a job that waits for approval (the policy wants a
        signed mail of someone of the approving role other than the requester); the vote, with the
        signature's digest, goes into the audit chain."""
        request = Request("approve")
        if vote not in ("approve", "deny"):
            raise self.refuse(who, request, f"a vote is approve or deny, not {vote!r}")
        try:
            check_job_id(job_id)
            view = self.jobs.manager.get(job_id)
        except (FormatError, CarrierError) as exc:
            raise self.refuse(who, request, str(exc)) from None
        held = approvals.get(self.store, view.id)
        if held is None:
            raise self.refuse(who, request, f"job {view.id} does not wait for an approval")
        request = Request("approve", tuple(HostRef(h) for h in view.hosts), playbook=view.target,
                          job_owner=held.requester, approval_by=held.by_role)
        if held.state != "pending":
            raise self.refuse(who, request, f"job {view.id} was {held.state} already ({view.status})")
        decision = self.decide(who, request)
        manager = self.jobs.manager

        def run(_: Within | None) -> JobView:
            after = approvals.vote(self.store, view.id, who.name, vote, signature=signature, reason=reason)
            self.audit.job(who, view.id, vote, hosts=view.hosts, outcome=after.state,
                           detail={"signature": signature, "reason": reason[:200],
                                   "approvals": after.approvals, "needed": after.needed})
            if after.state == "denied":
                why = f": {reason}" if reason else ""
                return manager.end_unstarted(view.id, "approval_denied", f"denied by {who.name}{why}")
            if after.state == "approved":
                manager.wake()
            return manager.get(view.id)

        return Planned(request, decision, run)

    def approval_requests(self, limit: int = 20) -> list[tuple[approvals.ApprovalRecord, list[str]]]:
        """Approvals whose approvers were not told yet, each with the addresses to tell (enrolled
        people of the approving role other than the requester); the caller mails them and marks
        each told with ``approvals.mark_notified``."""
        out = []
        for held in approvals.to_notify(self.store, limit):
            out.append((held, self.approvers(held.by_role, exclude=held.requester)))
        return out

    def approvers(self, role: str, *, exclude: str = "") -> list[str]:
        """The enrolled addresses of role ``role`` (admins for ``admin``), without ``exclude``."""
        if self.trust is None:
            raise OpsError("approvals need the trust layer (who is enrolled)")
        return [a for a in self.trust.directory.with_role(role) if a != exclude.lower()]

    # ================================================================= jobs

    def job(self, who: Identity, job_id: str, *, tool: str | None = None) -> JobView:
        """A job's status."""
        return self._job(who, "job_read", job_id, tool)

    def plan_job(self, who: Identity, job_id: str, *, tool: str | None = None) -> Planned[JobView]:
        view = self.job(who, job_id, tool=tool)
        return Planned(Request("job_read", job_owner=view.owner, tool=tool), Decision(True, "read"),
                       lambda _: self.jobs.manager.get(view.id))

    def events(self, who: Identity, job_id: str, since: int = 0, limit: int = 500,
               *, tool: str | None = None) -> tuple[JobView, list[EventRecord], int]:
        """A job, its events after ``since`` and the cursor to ask with next."""
        view = self._job(who, "job_read", job_id, tool)
        if since < 0:
            raise OpsError(f"the cursor must be 0 or more, not {since}")
        events, cursor = self.jobs.manager.output(view.id, since, limit)
        return view, events, cursor

    def event_page(self, who: Identity, job_id: str, since: int = 0, max_bytes: int = 65536,
                   *, tool: str | None = None) -> tuple[JobView, EventPage]:
        """A job and its events after ``since``, at most ``max_bytes`` of JSON (see ``read_events``)."""
        view = self._job(who, "job_read", job_id, tool)
        if since < 0:
            raise OpsError(f"the cursor must be 0 or more, not {since}")
        return view, read_events(self.jobs.manager, view.id, since, max_bytes)

    def watch(self, who: Identity, job_id: str, *, tool: str | None = None) -> Watch:
        """A handle to read a job (status, events, terminal output and screen) as it goes on.
        A job nobody supervises is taken over, so it is seen to end."""
        view = self._job(who, "job_read", job_id, tool)
        if not view.done and self.jobs.manager.attach(view.id):
            self.jobs.manager.start()
        return Watch(view.id, self)

    def own_watch(self, who: Identity, view: JobView) -> Watch:
        """A handle on a job ``who`` has just started (its start was the decision: reading it back
        is part of the same request, so no new decision and no audit row)."""
        if view.owner != who.name:
            raise Denied("not allowed: the job belongs to someone else")
        return Watch(view.id, self)

    def wait(self, who: Identity, job_id: str, timeout: float | None = None,
             *, tool: str | None = None) -> JobView:
        """Wait until the job ends or ``timeout`` s passed; its status then."""
        view = self._job(who, "job_read", job_id, tool)
        if not view.done and self.jobs.manager.attach(view.id):
            self.jobs.manager.start()  # nobody supervises it: take it over to see it end
        return self.jobs.manager.wait(view.id, timeout=timeout)

    def plan_kill(self, who: Identity, job_id: str, signal: str = "TERM",
                  *, tool: str | None = None) -> Planned[JobView]:
        """Decide stopping a job (terminal jobs: with ``signal``; TERM is the cancel that ends any job)."""
        view = self._job(who, "job_control", job_id, tool)
        request = Request("job_control", job_owner=view.owner, tool=tool)
        if signal not in PTY_SIGNALS:
            raise self.refuse(who, request, f"signal must be one of {', '.join(PTY_SIGNALS)}, not {signal!r}")

        def run(_: Within | None) -> JobView:
            current = self.jobs.manager.get(view.id)
            if current.done:
                return current
            if current.kind == "pty" and signal != "TERM":
                return self.ptys.kill(view.id, signal, by=who.name)
            if self.jobs.manager.attach(view.id):
                self.jobs.manager.start()
            killed = self.jobs.manager.kill(view.id, by=who.name)
            self.audit.job(who, view.id, "kill", hosts=killed.hosts, outcome="requested")
            return killed

        return Planned(request, Decision(True, "checked"), run)

    def kill(self, who: Identity, job_id: str, signal: str = "TERM", *, tool: str | None = None) -> JobView:
        return self.plan_kill(who, job_id, signal, tool=tool).run()

    def list_jobs(self, who: Identity, *, owner: str | None = None, status: str | None = None,
                  kind: str | None = None, limit: int = 50, tool: str | None = None) -> list[JobView]:
        """Jobs newest first: the caller's own (an admin's: everyone's, or ``owner``'s)."""
        request = Request("job_list", job_owner=owner, tool=tool)
        if status is not None and status not in JOB_STATUSES:
            raise self.refuse(who, request,
                              f"status must be one of {', '.join(JOB_STATUSES)}, not {status!r}")
        if kind is not None and kind not in JOB_KINDS:
            raise self.refuse(who, request, f"kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
        self.decide(who, request)
        shown = owner if (owner is not None or who.admin) else who.name
        return self.jobs.manager.list_jobs(owner=shown, status=status, kind=kind, limit=limit)

    # ================================================================= terminal (PTY) jobs

    def plan_pty_start(self, who: Identity, host: str, command: Sequence[str] | str, *,
                       shell: bool | None = None, term: str | None = None, cols: int | None = None,
                       rows: int | None = None, mode: str = "auto", tool: str | None = None,
                       wait: float = 15.0) -> Planned[JobView]:
        """Decide a terminal job running ``command`` on one host. ``shell=None``: a role with shell
        gets the command as shell text, others as an argv."""
        request = Request("pty", tool=tool)
        role = self.policy.role_of(who)
        use_shell = bool(role and role.shell) if shell is None else shell
        if use_shell:
            text = command if isinstance(command, str) else shlex.join(command)
            cmd: Sequence[str] | str = text
        else:
            argv = self._argv(who, request, command)
            text, cmd = shlex.join(argv), argv
        refs = self._hosts(who, request, host)
        if [r.name for r in refs] != [host]:
            raise self.refuse(who, request, f"{host!r} is not a single inventory host: a terminal job runs "
                              "on one host")
        request = Request("pty", refs, command=text, shell=use_shell and shell is True, tool=tool)
        options: dict[str, Any] = {"mode": mode}
        for name, value in (("term", term), ("cols", cols), ("rows", rows)):
            if value is not None:
                options[name] = value
        spec = {"host": host, "command": cmd if isinstance(cmd, str) else list(cmd), "shell": use_shell,
                "controller": self._controller(who), **options}
        detail: dict[str, Any] = {"command": text[:200]}
        answer = auto_sudo_secret(role)
        if answer:  # the role's policy: sudo's prompt is answered with its become secret
            spec["auto_sudo"] = detail["auto_sudo"] = answer

        def run(within: Within | None) -> JobView:
            view = self._submit(who, lambda: self.jobs.manager.submit("pty", spec, owner=who.name,
                                                                       door=who.door),
                                within, detail)
            return self.ptys.started(view, wait=wait) if wait > 0 else view

        return self._plan(who, request, run)

    def pty_start(self, who: Identity, host: str, command: Sequence[str] | str, **options: Any) -> JobView:
        return self.plan_pty_start(who, host, command, **options).run()

    def plan_pty_input(self, who: Identity, job_id: str, text: str = "", keys: Sequence[str] = (),
                       *, secret: str | None = None, tool: str | None = None) -> Planned[int]:
        """Decide typing ``text`` and then pressing ``keys`` in a terminal job (the cursor after it);
        or, with ``secret``, typing that named secret + Enter (the policy decides which a role may)."""
        if secret is not None:
            return self._plan_secret_input(who, job_id, secret, text, keys, tool)
        view = self._job(who, "pty_input", job_id, tool, kind="pty")
        if not text and not keys:
            raise OpsError("nothing to send: give text and/or keys")
        return Planned(Request("pty_input", job_owner=view.owner, tool=tool), Decision(True, "checked"),
                       lambda _: self.ptys.input(view.id, text, list(keys)))

    def _plan_secret_input(self, who: Identity, job_id: str, secret: str, text: str, keys: Sequence[str],
                           tool: str | None) -> Planned[int]:
        request = Request("pty_input", tool=tool, secret=str(secret)[:64])
        if not isinstance(secret, str) or not SECRET_NAME.fullmatch(secret):
            raise self.refuse(who, request, "secret must be the name of a secret (letters, digits, _ and -)")
        if text or keys:
            raise self.refuse(who, request, "give a secret, or text/keys, not both: the secret is typed "
                              "with Enter after it")
        view = self._job(who, "pty_input", job_id, tool, kind="pty", secret=secret)

        def run(_: Within | None) -> int:
            return self.ptys.input_secret(view.id, secretstore.lookup(self.config, secret))

        return Planned(Request("pty_input", job_owner=view.owner, tool=tool, secret=secret),
                       Decision(True, "checked"), run)

    def pty_input(self, who: Identity, job_id: str, text: str = "", keys: Sequence[str] = (),
                  *, secret: str | None = None, tool: str | None = None) -> int:
        return self.plan_pty_input(who, job_id, text, keys, secret=secret, tool=tool).run()

    def plan_pty_type(self, who: Identity, job_id: str, text: str = "", keys: Sequence[str] = (),
                      *, settle_ms: int = 400, secret: str | None = None,
                      tool: str | None = None) -> Planned[tuple[JobView, ScreenView]]:
        """Decide typing into a terminal job; running it returns the screen once the program has
        answered (its output after the input paused for ``settle_ms``, at most 5 s, or it ended)."""
        planned = self.plan_pty_input(who, job_id, text, keys, secret=secret, tool=tool)

        def screen_after(cursor: int) -> tuple[JobView, ScreenView]:
            self.ptys.wait(job_id, idle_ms=settle_ms, timeout=5.0, since=cursor)
            return self.jobs.manager.get(job_id), self.ptys.screen(job_id)

        return planned.then(screen_after)

    def plan_pty_screen(self, who: Identity, job_id: str, *, tool: str | None = None,
                        settle_ms: int = 0) -> Planned[tuple[JobView, ScreenView]]:
        """A terminal job and what it shows (after output paused for ``settle_ms``, at most 5 s)."""
        view = self._job(who, "job_read", job_id, tool, kind="pty")

        def run(_: Within | None) -> tuple[JobView, ScreenView]:
            if settle_ms and not self.jobs.manager.get(view.id).done:
                self.ptys.wait(view.id, idle_ms=settle_ms, timeout=5.0)
            screen = self.ptys.screen(view.id)
            return self.jobs.manager.get(view.id), screen

        return Planned(Request("job_read", job_owner=view.owner, tool=tool), Decision(True, "read"), run)

    def pty_screen(self, who: Identity, job_id: str, *, tool: str | None = None,
                   settle_ms: int = 0) -> tuple[JobView, ScreenView]:
        return self.plan_pty_screen(who, job_id, tool=tool, settle_ms=settle_ms).run()

    def pty_output(self, who: Identity, job_id: str, since: int = 0, limit: int = 65536,
                   *, tool: str | None = None) -> tuple[JobView, OutputRead]:
        view = self._job(who, "job_read", job_id, tool, kind="pty")
        return view, self.ptys.output(view.id, since, limit)

    def pty_wait(self, who: Identity, job_id: str, pattern: str | None = None, *, timeout: float = 30.0,
                 idle_ms: int | None = None, since: int | None = None,
                 tool: str | None = None) -> tuple[JobView, WaitResult]:
        """Wait for ``pattern`` on a terminal job's screen (or output idle, or its end)."""
        view = self._job(who, "job_read", job_id, tool, kind="pty")
        result = self.ptys.wait(view.id, pattern, timeout=timeout, idle_ms=idle_ms, since=since)
        return self.jobs.manager.get(view.id), result

    def pty_resize(self, who: Identity, job_id: str, cols: int, rows: int,
                   *, tool: str | None = None) -> None:
        view = self._job(who, "job_control", job_id, tool, kind="pty")
        self.ptys.resize(view.id, cols, rows)

    def pty_handle(self, who: Identity, job_id: str) -> Any:
        """The live terminal of a job, to put a local terminal on it (``carrier job attach``)."""
        view = self._job(who, "pty_input", job_id, None, kind="pty")
        return self.ptys.handle(view.id)

    # ================================================================= ssh masters

    def ssh_masters(self, who: Identity, *, tool: str | None = None) -> list[MasterInfo]:
        from carrier.ansible.ssh import ssh_list

        self.decide(who, Request("inventory", tool=tool))
        return ssh_list(self.jobs.ssh, self.jobs.inventory)

    def nodes(self, who: Identity, *, tool: str | None = None) -> list[NodeStatus]:
        """The execution nodes: health (``ansible-runner --version`` over the master) and running jobs."""
        from carrier.nodes.status import node_status
        from carrier.nodes.transport import SshTransport
        from carrier.store import jobruns

        self.decide(who, Request("inventory", tool=tool))
        return node_status(self.jobs.nodes, SshTransport(self.jobs.ssh), jobruns.running_on_nodes(self.store))

    def ssh_disconnect(self, who: Identity, host: str, *, tool: str | None = None) -> bool:
        """Close one host's ssh master (True when one ran)."""
        from carrier.ansible.ssh import ssh_disconnect

        request = Request("ssh_control", tool=tool)
        refs = self._hosts(who, request, host)
        if [r.name for r in refs] != [host]:
            raise self.refuse(who, request, f"{host!r} is not a single inventory host: name one host")
        self.decide(who, Request("ssh_control", refs, tool=tool))
        return ssh_disconnect(self.jobs.ssh, self.jobs.inventory, host)

    # ================================================================= mail tools

    def mail_tool(self, who: Identity, tool: str, account: str | None = None) -> None:
        """Decide one MCP mail tool call on ``account`` (None: the default one); the mail service
        does the work (and names an unknown account itself)."""
        name = account.strip() if isinstance(account, str) and account.strip() else None
        target = next((a for a in self.config.accounts if a.name == name), None) if name else \
            (self.config.default_account if self.config.accounts else None)
        self.decide(who, Request("mail", tool=tool, account=target.name if target else name,
                                 read_only_account=bool(target and target.read_only)))

    # ================================================================= tokens and enrollment

    def _trust(self) -> Any:
        if self.trust is None:
            raise OpsError("this Carrier was built without its trust layer: tokens and enrollment are "
                           "not available here")
        return self.trust

    def token_for_mail(self, who: Identity, ttl: int | None = None) -> IssuedToken:
        """A token for the enrolled sender of a mail (to be sent encrypted to their key)."""
        self.decide(who, Request("token"))
        trust = self._trust()
        if not key_can_encrypt(trust.keyring, who.fingerprint, trust.clock()):
            raise OpsError("your key has no usable encryption subkey: add one, then ask again "
                           "(a token is only ever sent encrypted)")
        return self._issue(who, who.name, who.role, (), ttl)

    def token_issue(self, who: Identity, owner: str, role: str | None = None, *, scopes: Sequence[str] = (),
                    ttl: int | None = None) -> IssuedToken:
        """A token for ``owner`` with ``role`` (default: the owner's enrolled role); an admin's operation."""
        self.decide(who, Request("admin"))
        if role is None:
            enrolled = self._trust().directory.identity(owner, door="mcp")
            if enrolled is None:
                raise OpsError(f"{owner} is not enrolled: name a role with --role")
            role = str(enrolled.role)
        return self._issue(who, owner, role, scopes, ttl)

    def _issue(self, who: Identity, owner: str, role: str, scopes: Sequence[str],
               ttl: int | None) -> IssuedToken:
        try:
            issued: IssuedToken = self._trust().tokens.issue(owner, role, scopes=scopes, ttl=ttl)
        except AuthError as exc:
            raise OpsError(str(exc)) from None
        self.audit.record(who.name, who.door, "token:issue", target=issued.record.id, outcome="issued",
                          detail={"owner": owner, "role": role, "scopes": list(scopes),
                                  "expires_at": issued.record.expires_at})
        return issued

    def token_list(self, who: Identity, owner: str | None = None) -> list[TokenRecord]:
        self.decide(who, Request("admin"))
        tokens: list[TokenRecord] = self._trust().tokens.list_tokens(owner)
        return tokens

    def token_revoke(self, who: Identity, token_id: str) -> bool:
        """Revoke a token by id; False when there was no live token with that id."""
        request = Request("admin")
        try:
            check_token_id(token_id)
        except FormatError as exc:
            raise self.refuse(who, request, str(exc)) from None
        self.decide(who, request)
        done = bool(self._trust().tokens.revoke(token_id))
        self.audit.record(who.name, who.door, "token:revoke", target=token_id,
                          outcome="revoked" if done else "unchanged")
        return done

    def settings(self, who: Identity) -> UserSettings:
        """``who``'s own settings (``settings`` with no argument)."""
        self.decide(who, Request("settings"))
        return user_settings.get_settings(self.store, who.name)

    def plan_settings(self, who: Identity, *, encrypt: str) -> Planned[UserSettings]:
        """``settings encrypt on|off|auto``: how Carrier's replies to ``who`` are encrypted."""
        request = Request("settings")
        if encrypt not in ENCRYPT_MODES:
            raise self.refuse(who, request, f"encrypt must be one of {', '.join(ENCRYPT_MODES)}")
        trust = self._trust()
        if encrypt == "always" and not key_can_encrypt(trust.keyring, who.fingerprint, trust.clock()):
            raise self.refuse(who, request, "your key has no usable encryption subkey: add one to your "
                              "key (and enroll it again), then ask for encrypted replies")

        def run(_: Within | None) -> UserSettings:
            done = user_settings.set_encrypt(self.store, who.name, encrypt)
            self.audit.record(who.name, who.door, "settings:encrypt", target=who.name, outcome=encrypt)
            return done

        return self._plan(who, request, run)

    def enroll_again(self, who: Identity) -> EnrollOutcome:
        """``enroll`` from someone already enrolled (tells them so, or starts a key change)."""
        self.decide(who, Request("enroll"))
        outcome: EnrollOutcome = self._trust().enrollment.request(who.name)
        return outcome

    def confirm_enrollment(self, raw: bytes, *, message_key: str, received_at: float) -> EnrollOutcome:
        """A signed ``confirm <nonce>`` (the mail proves who sent it: the enrollment layer verifies
        the signature against the key being enrolled)."""
        outcome: EnrollOutcome = self._trust().enrollment.respond(raw, message_key=message_key,
                                                                  received_at=received_at)
        return outcome

    def approve_enrollment(self, who: Identity, request_id: str, role: str | None = None) -> EnrollOutcome:
        self.decide(who, Request("admin"))
        outcome: EnrollOutcome = self._enrollment().approve(
            request_id, by=who.fingerprint or who.name, door=who.door, role=role)
        return outcome

    def deny_enrollment(self, who: Identity, request_id: str) -> EnrollOutcome:
        self.decide(who, Request("admin"))
        outcome: EnrollOutcome = self._enrollment().deny(request_id, by=who.fingerprint or who.name,
                                                         door=who.door)
        return outcome

    def revoke_key(self, who: Identity, fingerprint: str) -> EnrollOutcome:
        self.decide(who, Request("admin"))
        outcome: EnrollOutcome = self._enrollment().revoke(fingerprint, by=who.fingerprint or who.name,
                                                           door=who.door)
        return outcome

    def enrollments(self, who: Identity, states: Sequence[str] | None = None,
                    *, limit: int = 100) -> list[Any]:
        self.decide(who, Request("admin"))
        return list(self._enrollment().pending(states, limit=limit))

    def _enrollment(self) -> Any:
        # approve/deny/revoke/list need no keyring (the CLI may run without a GnuPG home).
        return self._trust().local_enrollment
