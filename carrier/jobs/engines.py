"""The engines for playbook, adhoc and exec jobs (see ``carrier.jobs.manager.Engine``).

Playbook and adhoc jobs run ansible-runner in a detached worker (``carrier.ansible.runner``): the
engine warms the hosts' ControlPersist masters, starts the worker, then tails its events into the
job's stream until the worker ends, and judges the result. After a restart ``resume`` finds the
worker by pid and start time and goes on tailing from the stored cursor; a worker that vanished
without a result makes the job ``lost``. Exec jobs use the fast path in-process: they are short,
so a restart in the middle of one marks it ``lost``. A playbook or adhoc job whose hosts are all
served by one execution node is placed there at submit (``spec.node``); its worker then runs the
play on the node (``carrier.nodes``) and the engine tails it exactly like a local one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from carrier.ansible import runner as ar
from carrier.ansible.catalog import Catalog, PlaybookInfo, check_playbook_name, validate_extra_vars
from carrier.ansible.controller import controller_uses
from carrier.ansible.errors import ControllerError, EngineError, SshError
from carrier.ansible.fastpath import ExecResult, exec_on_hosts
from carrier.ansible.inventory import Inventory, check_pattern
from carrier.ansible.ssh import SshControl, remote_command
from carrier.ansible.strategy import DEFAULT_STRATEGY, check_strategy, effective_strategy, usable_strategy
from carrier.ansible.zygote import DEFAULT_WORKER, check_worker
from carrier.config import SECRET_NAME
from carrier.errors import ConfigError
from carrier.jobs.manager import JobContext, Outcome, Submission
from carrier.nodes.pool import Node, NodePool
from carrier.nodes.stream import NODE_LOST
from carrier.nodes.transport import SshTransport
from carrier.store import EventRecord, JobRecord
from carrier.store.jobruns import JobRunRecord

DEFAULT_FORKS = 10
MAX_FORKS = 100
DEFAULT_TIMEOUT = 3600
MAX_TIMEOUT = 7 * 24 * 3600
EXEC_DEFAULT_TIMEOUT = 300
TAIL_INTERVAL = 0.05
#: Seconds a cancelled run gets to stop by itself before its processes are killed.
CANCEL_GRACE = 20.0
#: Ad-hoc modules Carrier runs. Modules that read controller files (copy, template, script, fetch,
#: include_vars...) are not here: an ad-hoc request must not reach Carrier's own disk.
ADHOC_MODULES = (
    "ping", "setup", "command", "shell", "raw", "service", "systemd", "systemd_service",
    "service_facts", "package_facts", "stat", "apt", "dnf", "yum", "package", "reboot", "wait_for",
    "wait_for_connection", "gather_facts", "user", "group", "file", "lineinfile", "cron",
)
#: Of those, the ones that hand a string to a shell: allowed only when the policy allows ``shell``.
SHELL_MODULES = ("shell", "raw")
_MODULE_RE = re.compile(r"(?:ansible\.builtin\.)?([a-z0-9_]+)")
_JINJA = ("{{", "{%", "{#")


def _bool(request: Mapping[str, Any], name: str) -> bool:
    value = request.get(name, False)
    if isinstance(value, bool):
        return value
    raise EngineError(f"{name} must be true or false")


def _int(request: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise EngineError(f"{name} must be a number")
    try:
        number = int(value)
    except ValueError:
        raise EngineError(f"{name} must be a whole number, got {str(value)[:20]!r}") from None
    if not low <= number <= high:
        raise EngineError(f"{name} must be between {low} and {high}, got {number}")
    return number


def _tags(request: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = request.get(name) or ()
    if isinstance(value, str):
        value = [t for t in value.split(",") if t.strip()]
    return ar.check_tags(str(t).strip() for t in value)


def _secret_name(request: Mapping[str, Any]) -> str | None:
    """The become secret's name (the policy chose it: the role's ``become_secret``), or None."""
    name = request.get("become_secret")
    if name is None:
        return None
    if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
        raise EngineError("become_secret must be the name of a secret under secrets:")
    return name


class _RunnerEngine:
    """What playbook and adhoc jobs share: the detached worker and its supervision."""

    kind = ""
    detachable = True

    def __init__(self, inventory: Inventory, ssh: SshControl, *, warm_masters: bool = True,
                 secrets: Callable[[str], str] | None = None, nodes: NodePool | None = None,
                 strategy: str = DEFAULT_STRATEGY, worker: str = DEFAULT_WORKER) -> None:
        self.inventory = inventory
        self.ssh = ssh
        self.warm_masters = warm_masters
        #: Named secret -> value (carrier.secretstore.lookup), read when a run starts.
        self.secrets = secrets
        self.nodes = nodes
        #: ``ansible.strategy`` from carrier.yml; each job's own is in its spec (``_strategy``).
        self.strategy = check_strategy(strategy)
        #: ``ansible.worker``: ``warm`` runs are children of the warm worker (``carrier.ansible.zygote``);
        #: runs on an execution node start cold whatever the setting.
        self.worker = check_worker(worker)

    def _placed(self, spec: dict[str, Any], hosts: Sequence[str]) -> dict[str, Any]:
        """``spec`` with the execution node serving all of ``hosts``, when one does."""
        node = self.nodes.node_for(hosts) if self.nodes is not None else None
        return {**spec, "node": node.name} if node is not None else spec

    def _node(self, ctx: JobContext) -> Node | None:
        name = ctx.job.spec.get("node")
        if not name:
            return None
        node = self.nodes.get(str(name)) if self.nodes is not None else None
        if node is None:
            raise EngineError(f"execution node {name!r} is no longer configured: the job was queued for it")
        return node

    # ----------------------------------------------------------------- helpers

    def _warm(self, hosts: Sequence[str]) -> None:
        """Start missing masters, in parallel (ansible then reuses them); failures are ansible's to report."""
        conns = []
        for host in hosts:
            try:
                conn = self.inventory.conn(host)
            except EngineError:
                continue
            if conn.connection == "ssh":
                conns.append(conn)

        def warm(conn: Any) -> None:
            # A host that cannot be reached is ansible's to report, in its own words.
            with contextlib.suppress(SshError):
                self.ssh.ensure_master(conn)

        if conns:
            with ThreadPoolExecutor(min(16, len(conns)), thread_name_prefix="carrier-warm") as pool:
                list(pool.map(warm, conns))

    def _env(self, run_dir: Path, forks: int, strategy: str) -> dict[str, str]:
        return ar.ansible_env(ssh_env=self.ssh.ansible_env(), local_temp=run_dir / "tmp", forks=forks,
                              strategy=strategy)

    def _strategy(self, job: JobRecord) -> str:
        """The job's strategy: the one chosen when it was queued (``_with_strategy``; a job queued
        before there was one: the setting), with the same fallbacks applied again."""
        spec = job.spec
        return effective_strategy(spec.get("strategy") or self.strategy, module=spec.get("module"),
                                  needs_become_password=bool(spec.get("become_secret")),
                                  on_node=bool(spec.get("node")))

    def _with_strategy(self, spec: dict[str, Any], catalog: str | None = None) -> dict[str, Any]:
        """``spec`` (already placed on its node, ``_placed``) with the strategy its run uses."""
        chosen = effective_strategy(self.strategy, catalog, module=spec.get("module"),
                                    needs_become_password=bool(spec.get("become_secret")),
                                    on_node=bool(spec.get("node")))
        return {**spec, "strategy": usable_strategy(chosen)}

    def _runspec(self, ctx: JobContext) -> ar.RunSpec:
        raise NotImplementedError

    def _what(self, job: JobRecord) -> str:
        return "the run"

    # ----------------------------------------------------------------- engine protocol

    def start(self, ctx: JobContext) -> Outcome | None:
        early = self._before_start(ctx)
        if early is not None:
            return early
        if ctx.cancel.is_set():
            who = ctx.cancelled_by or "someone"
            return Outcome("cancelled", "cancelled", f"cancelled by {who} before it started")
        node = self._node(ctx)
        name = ctx.job.spec.get("become_secret")
        password: str | None = None
        if name:
            if node is not None:  # the FIFO hand-over is local to the controller
                return Outcome("failed", "secret",
                               f"become secret {name!r} cannot be used on execution node {node.name!r}: "
                               "run it on the controller (take its group off the node) or without it")
            if self.secrets is None:
                return Outcome("failed", "secret", f"secret {name!r} is not available to this job system")
            try:
                password = self.secrets(str(name))
            except ConfigError as exc:  # names the secret and its file, never a value
                return Outcome("failed", "secret", str(exc))
        spec = self._runspec(ctx)
        if node is not None:  # the node's ansible reaches the hosts; Carrier reaches the node
            spec = replace(spec, node=node.to_dict(), state_dir=str(self.ssh.state_dir))
        elif self.warm_masters:
            self._warm(ctx.hosts)
        if password is not None:
            spec = replace(spec, become_password=True)
        warm = self.worker == "warm" and node is None
        worker = ar.start_worker(ctx.run_dir, spec, become_password=password, warm=warm)
        del password
        ctx.set_process(worker.pid, worker.start)
        ctx.emit("runner.started", {"pid": worker.pid, "strategy": self._strategy(ctx.job),
                                    "worker": "warm" if warm else "cold",
                                    **({"node": node.name} if node else {})})
        return self._supervise(ctx, worker)

    def _before_start(self, ctx: JobContext) -> Outcome | None:
        return None

    def resume(self, ctx: JobContext) -> Outcome | None:
        run = ctx.run
        if run.pid is None or run.pid_start is None:
            if not (ctx.run_dir / ar.SPEC_FILE).exists():
                return self.start(ctx)  # claimed but never started: nothing ran, so start it now
            return self._lost(ctx, "Carrier stopped while starting the run; it may not have run")
        return self._supervise(ctx, ar.ProcessId(run.pid, run.pid_start))

    def cancel_orphan(self, job: JobRecord, run: JobRunRecord) -> bool:
        if not run.run_dir:
            return False
        worker = ar.ProcessId(run.pid, run.pid_start) if run.pid and run.pid_start else None
        if worker is None or not worker.alive():
            return False
        return ar.request_cancel(Path(run.run_dir), worker)

    # ----------------------------------------------------------------- supervision

    def _ingest(self, ctx: JobContext) -> None:
        raw = ar.read_events(ctx.run_dir, ctx.run.cursor)
        if not raw:
            return
        # Only a gap-free run of counters: a later file may land before an earlier one.
        expected = ctx.run.cursor + 1
        batch: list[tuple[str, Mapping[str, Any] | None]] = []
        last = ctx.run.cursor
        for event in raw:
            if event["counter"] != expected:
                break
            batch.append(ar.compact_event(event))
            last = expected
            expected += 1
        if batch:
            ctx.ingest(batch, last)

    def _ingest_all(self, ctx: JobContext) -> None:
        """After the worker ended: everything left, gaps or not."""
        raw = ar.read_events(ctx.run_dir, ctx.run.cursor)
        if raw:
            ctx.ingest([ar.compact_event(e) for e in raw], raw[-1]["counter"])

    def _supervise(self, ctx: JobContext, worker: ar.ProcessId) -> Outcome | None:
        signalled: float | None = None
        forced = False
        while worker.alive():
            self._ingest(ctx)
            if ctx.cancel.is_set() and signalled is None:
                signalled = time.monotonic()
                ctx.emit("job.cancel", {"by": ctx.cancelled_by or "someone"})
                ar.request_cancel(ctx.run_dir, worker)
            elif signalled is not None and not forced and time.monotonic() - signalled > CANCEL_GRACE:
                forced = True  # the worker did not stop on its own: end the whole run
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, signal.SIGKILL)
                ar.stop_run_processes(ctx.run_dir)
                self._stop_on_node(ctx)
            if ctx.detach.is_set():
                return None  # the manager is closing: the worker goes on, the next manager resumes
            ar.reap_children()
            time.sleep(TAIL_INTERVAL)
        ar.reap_children()
        self._ingest_all(ctx)
        result = ar.read_result(ctx.run_dir)
        if result is None and forced:
            who = ctx.cancelled_by or "someone"
            return Outcome("cancelled", "cancelled", f"cancelled by {who}: the run did not stop "
                                                     f"within {CANCEL_GRACE:g} s and was killed")
        if result is None:
            self._stop_on_node(ctx)  # a node run whose worker died here leaves nothing there either
            return self._lost(ctx, f"the ansible-runner worker (pid {worker.pid}) ended without a result")
        if result.status == NODE_LOST:
            return Outcome("failed", "node_unreachable", f"failed: {result.error}", result.rc)
        events = _all_events(ctx)
        pairs = [(e.type, e.data) for e in events if e.type.startswith("ansible.")]
        verdict = ar.judge(
            result, pairs, stdout=ar.stdout_tail(ctx.run_dir), what=self._what(ctx.job),
            timeout=ctx.job.spec.get("timeout"), cancelled_by=ctx.cancelled_by,
        )
        summary: dict[str, Any] = {}
        stats = next((e.data.get("stats") for e in reversed(events)
                      if e.type == "ansible.playbook_on_stats"), None)
        if stats is not None:
            summary["recap"] = stats
        return Outcome(verdict.status, verdict.reason, verdict.message, verdict.rc, summary)

    def _stop_on_node(self, ctx: JobContext) -> None:
        """Kill a node run's processes there and delete its directory (its worker here was killed,
        so nobody else will)."""
        name = ctx.job.spec.get("node")
        node = self.nodes.get(str(name)) if name and self.nodes is not None else None
        if node is None:
            return
        transport = SshTransport(self.ssh)
        base = node.remote_base(ctx.job.id)
        with contextlib.suppress(SshError):
            transport.stop_worker(node, base, "KILL")
            transport.cleanup(node, base)

    def _lost(self, ctx: JobContext, why: str) -> Outcome:
        tail = " ".join(ar.worker_log_tail(ctx.run_dir, 600).split())
        detail = f"; worker log: {tail[-300:]}" if tail else ""
        return Outcome("lost", "lost", f"lost: {why}{detail}")


def _all_events(ctx: JobContext) -> list[EventRecord]:
    out: list[EventRecord] = []
    cursor = 0
    while True:
        events, cursor = ctx.store.events_since(ctx.job.id, cursor, 10_000)
        out.extend(events)
        if len(events) < 10_000:
            return out


class PlaybookEngine(_RunnerEngine):
    """``playbook`` jobs: a catalogued playbook with checked extra vars."""

    kind = "playbook"

    def __init__(self, inventory: Inventory, ssh: SshControl, catalog: Catalog, **kwargs: Any) -> None:
        super().__init__(inventory, ssh, **kwargs)
        self.catalog = catalog

    def prepare(self, request: Mapping[str, Any]) -> Submission:
        name = check_playbook_name(request.get("playbook"))
        info = self.catalog.get(name)
        if info is None:
            dirs = ", ".join(str(d) for d in self.catalog.dirs) or "no playbook_dirs configured"
            limit = request.get("limit")
            return Submission(
                target=str(limit) if isinstance(limit, str) else "",
                spec={"playbook": name},
                hosts=(),
                outcome=Outcome("failed", "missing_playbook",
                                f"missing playbook: no playbook named {name!r} in {dirs}: "
                                "`carrier playbooks` lists the ones there are"),
            )
        limit = request.get("limit") or info.default_limit or "all"
        controller = _bool(request, "controller")
        hosts = self.inventory.targets(check_pattern(limit), controller=controller)
        check_controller_use(info, controller=controller)
        extra = validate_extra_vars(info, request.get("extra_vars"))
        spec = {
            "playbook": info.name,
            "path": str(info.path),
            "project_dir": str(info.directory),
            "limit": limit,
            "extra_vars": extra,
            "tags": list(_tags(request, "tags")),
            "skip_tags": list(_tags(request, "skip_tags")),
            "check": _bool(request, "check"),
            "diff": _bool(request, "diff"),
            "forks": _int(request, "forks", max(DEFAULT_FORKS, min(len(hosts), 50)), 1, MAX_FORKS),
            "timeout": _int(request, "timeout", DEFAULT_TIMEOUT, 1, MAX_TIMEOUT),
            "admin_only": info.admin_only,
            "controller": controller,
            "become_secret": _secret_name(request),
        }
        return Submission(target=limit, spec=self._with_strategy(self._placed(spec, hosts), info.strategy),
                          hosts=tuple(hosts))

    def _what(self, job: JobRecord) -> str:
        return f"playbook {job.spec.get('playbook', '?')}"

    def _before_start(self, ctx: JobContext) -> Outcome | None:
        path = Path(str(ctx.job.spec.get("path", "")))
        if not path.is_file():
            return Outcome("failed", "missing_playbook",
                           f"missing playbook: {path} is gone (it was there when the job was queued)")
        info = self.catalog.get(str(ctx.job.spec.get("playbook", "")))
        try:  # the file may have been edited since the job was queued
            if info is not None:
                check_controller_use(info, controller=bool(ctx.job.spec.get("controller")))
        except ControllerError as exc:
            return Outcome("failed", "denied", str(exc))
        return None

    def _runspec(self, ctx: JobContext) -> ar.RunSpec:
        spec = ctx.job.spec
        project = Path(str(spec["project_dir"]))
        forks = int(spec["forks"])
        return ar.RunSpec(
            kind="playbook",
            inventory=str(self.inventory.source.resolve()),
            project_dir=str(project),
            playbook=Path(str(spec["path"])).name,
            limit=",".join(ctx.hosts),
            extra_vars=dict(spec.get("extra_vars") or {}),
            tags=tuple(spec.get("tags") or ()),
            skip_tags=tuple(spec.get("skip_tags") or ()),
            check=bool(spec.get("check")),
            diff=bool(spec.get("diff")),
            forks=forks,
            timeout=int(spec["timeout"]),
            env=self._env(ctx.run_dir, forks, self._strategy(ctx.job)),
        )


def check_controller_use(info: PlaybookInfo, *, controller: bool) -> None:
    """ControllerError unless ``info`` stays off the controller, or says ``controller: true`` in its
    metadata and the caller's policy allowed the controller (``controller``)."""
    uses = controller_uses(info.path, info.directory)
    if uses and not info.controller:
        raise ControllerError(
            f"playbook {info.name} runs tasks on the Carrier controller ({uses[0]}) and its catalog "
            f"metadata does not say `controller: true`: refused (see docs/trust.md)"
        )
    if info.controller and not controller:
        raise ControllerError(
            f"playbook {info.name} runs tasks on the Carrier controller (its metadata says "
            "`controller: true`): only a role with `local: true` may run it"
        )


class AdhocEngine(_RunnerEngine):
    """``adhoc`` jobs: one module from ``ADHOC_MODULES`` on a host pattern."""

    kind = "adhoc"

    def prepare(self, request: Mapping[str, Any]) -> Submission:
        raw_module = request.get("module")
        match = _MODULE_RE.fullmatch(str(raw_module or ""))
        if match is None or match.group(1) not in ADHOC_MODULES:
            raise EngineError(
                f"module {str(raw_module)[:40]!r} is not available for ad-hoc jobs: use one of "
                f"{', '.join(ADHOC_MODULES)} (or a playbook)"
            )
        module = match.group(1)
        shell = _bool(request, "shell")
        if module in SHELL_MODULES and not shell:
            raise EngineError(f"module {module} runs a shell command: not allowed without shell permission")
        args = request.get("args") or ""
        if not isinstance(args, str):
            raise EngineError("module args must be a string (key=value ...)")
        if any(mark in args for mark in _JINJA):
            raise EngineError("module args contain a template delimiter ({{ {% {#): not allowed")
        if "\0" in args or "\n" in args or len(args) > 4096:
            raise EngineError("module args must be one line of at most 4096 characters")
        pattern = check_pattern(request.get("pattern"))
        hosts = self.inventory.targets(pattern, controller=_bool(request, "controller"))
        spec = {
            "module": module,
            "args": args,
            "pattern": pattern,
            "check": _bool(request, "check"),
            "forks": _int(request, "forks", max(DEFAULT_FORKS, min(len(hosts), 50)), 1, MAX_FORKS),
            "timeout": _int(request, "timeout", DEFAULT_TIMEOUT, 1, MAX_TIMEOUT),
            "shell": shell,
            "become_secret": _secret_name(request),
        }
        return Submission(target=pattern, spec=self._with_strategy(self._placed(spec, hosts)),
                          hosts=tuple(hosts))

    def _what(self, job: JobRecord) -> str:
        return f"module {job.spec.get('module', '?')}"

    def _runspec(self, ctx: JobContext) -> ar.RunSpec:
        spec = ctx.job.spec
        forks = int(spec["forks"])
        return ar.RunSpec(
            kind="adhoc",
            inventory=str(self.inventory.source.resolve()),
            module=f"ansible.builtin.{spec['module']}",
            module_args=str(spec.get("args") or ""),
            pattern=",".join(ctx.hosts),
            check=bool(spec.get("check")),
            forks=forks,
            timeout=int(spec["timeout"]),
            env=self._env(ctx.run_dir, forks, self._strategy(ctx.job)),
        )


class ExecEngine:
    """``exec`` jobs: the ControlPersist fast path, in-process."""

    kind = "exec"
    detachable = False

    def __init__(self, inventory: Inventory, ssh: SshControl) -> None:
        self.inventory = inventory
        self.ssh = ssh

    def prepare(self, request: Mapping[str, Any]) -> Submission:
        pattern = check_pattern(request.get("pattern"))
        shell = _bool(request, "shell")
        command = request.get("command")
        if isinstance(command, list | tuple):
            command = [str(a) for a in command] if all(isinstance(a, str) for a in command) else None
        if not isinstance(command, str | list):
            raise EngineError("command must be a list of arguments (or a string when shell is allowed)")
        remote_command(command, shell=shell)  # raises for an empty or non-argv command
        hosts = self.inventory.targets(pattern, controller=_bool(request, "controller"))
        for host in hosts:
            self.inventory.conn(host)  # a broken host entry is refused now, not half-way
        spec = {"command": command, "shell": shell,
                "timeout": _int(request, "timeout", EXEC_DEFAULT_TIMEOUT, 1, MAX_TIMEOUT)}
        return Submission(target=pattern, spec=spec, hosts=tuple(hosts))

    def start(self, ctx: JobContext) -> Outcome | None:
        spec = ctx.job.spec
        conns = [self.inventory.conn(h) for h in ctx.hosts]
        cap = max(1024, ctx.output_budget // (2 * max(1, len(conns))))

        def on_result(result: ExecResult) -> None:
            ctx.emit("exec.result", result.to_dict())

        results = exec_on_hosts(
            self.ssh, conns, spec["command"], shell=bool(spec.get("shell")),
            timeout=float(spec.get("timeout") or EXEC_DEFAULT_TIMEOUT), cap=cap, cancel=ctx.cancel,
            on_result=on_result,
        )
        return exec_outcome(results, cancelled_by=ctx.cancelled_by)

    def resume(self, ctx: JobContext) -> Outcome | None:
        return Outcome("lost", "lost", "lost: Carrier stopped while the command ran; "
                                       "results not recorded by then are unknown")

    def cancel_orphan(self, job: JobRecord, run: JobRunRecord) -> bool:
        return False


def exec_outcome(results: Sequence[ExecResult], *, cancelled_by: str | None = None) -> Outcome:
    """The verdict of an exec job from its per-host results (pure)."""
    summary = {"hosts": {r.host: {"status": r.status, "rc": r.rc} for r in results}}
    if any(r.status == "cancelled" for r in results):
        who = f" by {cancelled_by}" if cancelled_by else ""
        return Outcome("cancelled", "cancelled", f"cancelled{who}: the command was stopped", None, summary)
    if all(r.status == "ok" for r in results):
        hosts = ", ".join(r.host for r in results)
        return Outcome("succeeded", "ok", f"succeeded: exit 0 on {hosts}", 0, summary)
    parts = []
    failed = [r for r in results if r.status == "failed"]
    if failed:
        by_rc: dict[int | None, list[str]] = {}
        for r in failed:
            by_rc.setdefault(r.rc, []).append(r.host)
        for rc, names in sorted(by_rc.items(), key=lambda item: str(item[0])):
            parts.append(f"exit {rc} on {', '.join(names)}")
    unreachable = [r for r in results if r.status == "unreachable"]
    if unreachable:
        why = [f"{r.host} ({' '.join(r.stderr.split())[:200]})" for r in unreachable]
        parts.append("unreachable: " + "; ".join(why))
    timed_out = [r.host for r in results if r.status == "timeout"]
    if timed_out:
        parts.append(f"timed out on {', '.join(timed_out)}")
    reason = "failed" if failed else "unreachable" if unreachable else "timeout"
    rc = next((r.rc for r in failed), None)
    return Outcome("failed", reason, "failed: " + "; ".join(parts), rc, summary)
