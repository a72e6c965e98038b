"""PTY jobs in the job model: the ``pty`` engine for the manager, and ``PtyJobs``, what the doors call.

``PtyEngine`` (``kind = "pty"``, detachable) runs a job with ``PtyRunner`` in a manager thread and
supervises it until the program ends, the job is cancelled (TERM, then KILL after a grace time), or
the manager closes. On close a tmux-backed job keeps running and the next manager re-attaches to it
by job id (``resume``); a plain or local one is stopped and recorded ``lost``.

``PtyJobs`` gives the doors one call per tool (``start``, ``output``, ``input``, ``screen``,
``wait``, ``resize``, ``kill``). A job supervised by this process is driven directly. A running
job nobody supervises is taken over first (``Manager.attach``). A tmux-backed job supervised by
another Carrier process (``carrier serve`` while the CLI asks) is driven through its tmux server
as an *observer*: input, screen, resize and signals work, output is read from the log that process
writes, and the job is never ended from here. A finished job still answers ``output`` (the kept
log) and ``screen`` (its last screen).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from carrier.ansible.errors import EngineError
from carrier.ansible.inventory import Inventory, check_pattern
from carrier.ansible.ssh import SshControl
from carrier.errors import ConfigError
from carrier.jobs.errors import JobError
from carrier.jobs.manager import JobContext, JobView, Manager, Outcome, Submission
from carrier.jobs.pty import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    DEFAULT_TERM,
    ExitInfo,
    OutputRead,
    PtyError,
    PtyJob,
    PtyRunner,
    PtySpec,
    WaitResult,
    check_signal,
    load_final,
    load_state,
)
from carrier.jobs.ptylog import OutputLog
from carrier.jobs.screen import ScreenView, render_bytes
from carrier.store import JobRecord
from carrier.store.jobruns import JobRunRecord

CANCEL_GRACE = 5.0
_SUPERVISE_TICK = 0.2
_SCREEN_SUMMARY_MAX = 20000


def _spec_from(job_id: str, spec: Mapping[str, Any]) -> PtySpec:
    command = spec.get("command")
    return PtySpec(
        job_id=job_id,
        host=str(spec.get("host", "")),
        command=command if isinstance(command, str) else tuple(command or ()),
        shell=bool(spec.get("shell", False)),
        term=str(spec.get("term", DEFAULT_TERM)),
        cols=int(spec.get("cols", DEFAULT_COLS)),
        rows=int(spec.get("rows", DEFAULT_ROWS)),
        mode=str(spec.get("mode", "auto")),
    )


def _outcome(info: ExitInfo, screen: ScreenView | None, *, mode: str, cancelled_by: str | None) -> Outcome:
    summary: dict[str, Any] = {"exit": info.to_dict(), "mode": mode}
    if screen is not None:
        summary["screen"] = screen.text[:_SCREEN_SUMMARY_MAX]
    if cancelled_by is not None:
        return Outcome("cancelled", "cancelled", f"cancelled by {cancelled_by}: {info.message}", info.rc,
                       summary)
    if info.succeeded:
        return Outcome("succeeded", "ok", "succeeded: exited with status 0", 0, summary)
    if info.reason == "ssh_error":
        return Outcome("failed", "unreachable", f"failed: {info.message}", info.rc, summary)
    if info.reason == "lost":
        return Outcome("lost", "lost", f"lost: {info.message}", None, summary)
    return Outcome("failed", "failed", f"failed: {info.message}", info.rc, summary)


#: How much of an ended job's output is replayed to rebuild its last screen.
_SCREEN_REBUILD_BYTES = 256 * 1024


class PtyEngine:
    """The manager's engine for ``pty`` jobs (see the module docstring)."""

    kind = "pty"
    detachable = True

    def __init__(self, inventory: Inventory, ssh: SshControl, *, runner: PtyRunner | None = None,
                 memory_bytes: int | None = None, disk_bytes: int | None = None,
                 secrets: Callable[[str], str] | None = None, tmux_output: str | None = None) -> None:
        self.inventory = inventory
        self.ssh = ssh
        #: Reads a named secret's value (for ``auto_sudo``); None: no secrets in this job system.
        self.secrets = secrets
        kwargs: dict[str, Any] = {}
        if memory_bytes is not None:
            kwargs["memory_bytes"] = memory_bytes
        if disk_bytes is not None:
            kwargs["disk_bytes"] = disk_bytes
        if tmux_output is not None:
            kwargs["tmux_output"] = tmux_output
        self.runner = runner or PtyRunner(ssh, **kwargs)
        self._lock = threading.Lock()
        self._live: dict[str, PtyJob] = {}
        self._observers: dict[str, PtyJob] = {}

    # ----------------------------------------------------------------- engine protocol

    def prepare(self, request: Mapping[str, Any]) -> Submission:
        host = check_pattern(request.get("host"))
        controller = request.get("controller", False)
        if not isinstance(controller, bool):
            raise EngineError("controller must be true or false")
        resolved = self.inventory.targets(host, controller=controller)
        if resolved != [host]:
            raise EngineError(f"a PTY job runs on one host: {host!r} selects {len(resolved)} "
                              f"({', '.join(resolved[:5])}); name a single host")
        self.inventory.conn(host)  # a broken host entry is refused now
        command = request.get("command")
        if isinstance(command, list | tuple):
            if not all(isinstance(a, str) for a in command):
                raise EngineError("command must be a list of strings (or one string when shell is allowed)")
            command = list(command)
        elif not isinstance(command, str):
            raise EngineError("command must be a list of arguments (or a string when shell is allowed)")
        shell = request.get("shell", False)
        if not isinstance(shell, bool):
            raise EngineError("shell must be true or false")
        spec = {
            "host": host, "command": command, "shell": shell,
            "term": request.get("term") or DEFAULT_TERM,
            "cols": request.get("cols") if request.get("cols") is not None else DEFAULT_COLS,
            "rows": request.get("rows") if request.get("rows") is not None else DEFAULT_ROWS,
            "mode": request.get("mode") or "auto",
        }
        auto = request.get("auto_sudo")
        if auto is not None:
            if not isinstance(auto, str) or not auto:
                raise EngineError("auto_sudo must be the name of a secret under secrets:")
            spec["auto_sudo"] = auto  # its name only: the value is read when the job starts
        _spec_from("j-aaaaaaaaaaaa", spec)  # every check of PtySpec, before a job exists
        return Submission(target=host, spec=spec, hosts=(host,))

    def start(self, ctx: JobContext) -> Outcome | None:
        if ctx.cancel.is_set():
            return Outcome("cancelled", "cancelled", f"cancelled by {ctx.cancelled_by or 'someone'} "
                                                     "before it started")
        spec = _spec_from(ctx.job.id, ctx.job.spec)
        try:
            answer = self._auto_sudo_value(ctx)
        except ConfigError as exc:  # names the secret and its file, never a value
            return Outcome("failed", "secret", f"failed before it started: {exc}")
        job = self.runner.start(spec, self.inventory.conn(spec.host), ctx.run_dir)
        ctx.emit("pty.started", {"mode": job.mode, "host": spec.host, "term": spec.term,
                                 "cols": spec.cols, "rows": spec.rows})
        self._arm(ctx, job, answer)
        return self._supervise(ctx, job)

    def _auto_sudo_value(self, ctx: JobContext) -> str | None:
        name = ctx.job.spec.get("auto_sudo")
        if not name:
            return None
        if self.secrets is None:
            raise ConfigError(f"secret {name!r} is not available to this job system")
        return self.secrets(str(name))

    def _arm(self, ctx: JobContext, job: PtyJob, answer: str | None) -> None:
        """Let ``job`` answer sudo's prompt with the role's secret (the event names the secret only)."""
        if answer is None:
            return
        name = str(ctx.job.spec.get("auto_sudo"))

        def answered(count: int) -> None:
            ctx.emit("pty.auto_sudo", {"secret": name, "count": count})

        job.auto_sudo(answer, answered)

    def resume(self, ctx: JobContext) -> Outcome | None:
        state = load_state(ctx.run_dir)
        if not state:
            return self.start(ctx)  # claimed but never started: nothing ran yet
        exit_info, screen = load_final(ctx.run_dir)
        if exit_info is not None:
            return _outcome(exit_info, screen, mode=str(state.get("mode")), cancelled_by=ctx.cancelled_by)
        if state.get("mode") != "tmux":
            return Outcome("lost", "lost", "lost: Carrier stopped while the job ran, and a PTY job "
                                           "without tmux does not outlive it")
        host = str(state.get("host") or ctx.job.spec.get("host"))
        try:
            job = self.runner.reattach(ctx.job.id, self.inventory.conn(host), ctx.run_dir)
        except PtyError as exc:
            return Outcome("lost", "lost", f"lost: {exc}")
        ctx.emit("pty.reattached", {"host": host, "cursor": job.log.end})
        try:
            self._arm(ctx, job, self._auto_sudo_value(ctx))
        except ConfigError as exc:  # the job goes on; only the automatic answer is off
            ctx.emit("pty.auto_sudo_off", {"secret": str(ctx.job.spec.get("auto_sudo")), "error": str(exc)})
        return self._supervise(ctx, job)

    def cancel_orphan(self, job: JobRecord, run: JobRunRecord) -> bool:
        if not run.run_dir:
            return False
        state = load_state(Path(run.run_dir))
        if state.get("mode") != "tmux":
            return False
        try:
            handle = self.runner.reattach(job.id, self.inventory.conn(str(state.get("host"))),
                                          Path(run.run_dir), observer=True)
        except (PtyError, EngineError):
            return False
        try:
            handle.kill("TERM")
        except PtyError:
            return False
        finally:
            handle.detach()
        return True

    def _supervise(self, ctx: JobContext, job: PtyJob) -> Outcome | None:
        with self._lock:
            self._live[ctx.job.id] = job
        signalled: float | None = None
        forced = False
        try:
            while True:
                info = job.wait_exit(_SUPERVISE_TICK)
                if info is not None:
                    break
                if ctx.detach.is_set():
                    if job.mode == "tmux":
                        job.detach()  # the program goes on; the next manager re-attaches
                        return None
                    job.detach()
                    return Outcome("lost", "lost", "lost: Carrier stopped, and a PTY job without tmux "
                                                   "cannot outlive it")
                if ctx.cancel.is_set() and signalled is None:
                    signalled = time.monotonic()
                    ctx.emit("job.cancel", {"by": ctx.cancelled_by or "someone"})
                    _quietly_kill(job, "TERM")
                elif signalled is not None and not forced and time.monotonic() - signalled > CANCEL_GRACE:
                    forced = True
                    _quietly_kill(job, "KILL")
        finally:
            with self._lock:
                self._live.pop(ctx.job.id, None)
        ctx.emit("pty.exit", info.to_dict())
        screen: ScreenView | None = None
        with contextlib.suppress(JobError):
            screen = job.screen()
        return _outcome(info, screen, mode=job.mode,
                        cancelled_by=(ctx.cancelled_by or "someone") if signalled is not None else None)

    # ----------------------------------------------------------------- handles for the doors

    def live(self, job_id: str) -> PtyJob | None:
        with self._lock:
            return self._live.get(job_id)

    def observe(self, job_id: str, run_dir: Path) -> PtyJob:
        """A handle on a tmux job another Carrier process supervises."""
        with self._lock:
            cached = self._observers.get(job_id)
        if cached is not None and not cached.done:
            return cached
        state = load_state(run_dir)
        if state.get("mode") != "tmux":
            raise PtyError(f"job {job_id} runs in another Carrier process without tmux: "
                           "drive it through that process (its MCP server), or wait for it to end")
        handle = self.runner.reattach(job_id, self.inventory.conn(str(state.get("host"))), run_dir,
                                      observer=True)
        with self._lock:
            self._observers[job_id] = handle
        return handle

    def close(self) -> None:
        """Drop observers and control connections (jobs supervised elsewhere keep running)."""
        with self._lock:
            observers = list(self._observers.values())
            self._observers.clear()
        for handle in observers:
            handle.detach()
        self.runner.close()


def _quietly_kill(job: PtyJob, signal: str) -> None:
    # The job may have ended meanwhile, or its host gone away: the wait loop sees the result.
    with contextlib.suppress(PtyError):
        job.kill(signal)


class PtyJobs:
    """The doors' calls for PTY jobs (``job_start``, ``job_output``, ``job_input``, ``job_screen``,
    ``job_wait``, ``job_kill`` and resize). Every call takes a job id and checks it."""

    def __init__(self, manager: Manager, engine: PtyEngine) -> None:
        self.manager = manager
        self.engine = engine

    def start(
        self,
        host: str,
        command: Sequence[str] | str,
        *,
        owner: str,
        door: str,
        shell: bool = False,
        term: str = DEFAULT_TERM,
        cols: int = DEFAULT_COLS,
        rows: int = DEFAULT_ROWS,
        mode: str = "auto",
        wait: float = 15.0,
    ) -> JobView:
        """Submit a PTY job and wait (up to ``wait`` s) until its terminal exists; a job that must
        queue (concurrency limits) comes back ``queued``."""
        request = {"host": host, "command": list(command) if not isinstance(command, str) else command,
                   "shell": shell, "term": term, "cols": cols, "rows": rows, "mode": mode}
        view = self.manager.submit("pty", request, owner=owner, door=door)
        return self.started(view, wait=wait)

    def started(self, view: JobView, *, wait: float = 10.0) -> JobView:
        """``view`` once its terminal exists (or it ended, or it must queue), waiting up to ``wait`` s."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            view = self.manager.get(view.id)
            if view.done or self.engine.live(view.id) is not None:
                return view
            if view.status == "queued" and time.monotonic() > deadline - wait + 1.0:
                return view
            time.sleep(0.02)
        return self.manager.get(view.id)

    # ----------------------------------------------------------------- finding the job

    def _view(self, job_id: str) -> JobView:
        view = self.manager.get(job_id)  # JobError / JobNotFound for a bad or unknown id
        if view.kind != "pty":
            raise PtyError(f"job {job_id} is a {view.kind} job, not a PTY job")
        return view

    def _run_dir(self, job_id: str) -> Path:
        return self.manager.run_dir_of(job_id)

    def handle(self, job_id: str) -> PtyJob | None:
        """The live job (None when it has finished); PtyError when it has no terminal yet."""
        view = self._view(job_id)
        live = self.engine.live(job_id)
        if live is not None:
            return live
        if view.done:
            return None
        if view.status == "queued":
            raise PtyError(f"job {job_id} is queued (limits on concurrent jobs): it has no terminal yet")
        if job_id in self.manager.active():
            # Ours, between its engine and its record (starting, or ending right now).
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and job_id in self.manager.active():
                live = self.engine.live(job_id)
                if live is not None:
                    return live
                time.sleep(0.01)
            if self.manager.get(job_id).done:
                return None
        if self.manager.get(job_id).done:
            # It ended after `view` was read (and left `active()` before we looked): the caller
            # reads its kept output and screen; observe() would wrongly call it someone else's.
            return None
        if self.manager.attach(job_id):
            self.manager.start()
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline:
                live = self.engine.live(job_id)
                if live is not None:
                    return live
                view = self.manager.get(job_id)
                if view.done:
                    return None
                time.sleep(0.02)
            raise PtyError(f"job {job_id}: could not re-attach to it within 20 s")
        return self.engine.observe(job_id, self._run_dir(job_id))

    def _running(self, job_id: str, what: str) -> PtyJob:
        job = self.handle(job_id)
        if job is None:
            view = self.manager.get(job_id)
            raise PtyError(f"job {job_id} has ended ({view.status}: {view.message}): "
                           f"{what} goes only to a running job")
        return job

    # ----------------------------------------------------------------- calls

    def output(self, job_id: str, since: int = 0, limit: int = 65536) -> OutputRead:
        job = self.handle(job_id)
        if job is not None:
            return job.output(since, limit)
        log = OutputLog(self._run_dir(job_id) / "output", readonly=True)
        chunk = log.read(since, limit)
        return OutputRead(chunk.data, chunk.start, chunk.next_cursor, chunk.dropped,
                          chunk.next_cursor >= log.end)

    def input(self, job_id: str, text: str = "", keys: str | Sequence[str] = ()) -> int:
        return self._running(job_id, "input").input(text, keys)

    def input_secret(self, job_id: str, value: str) -> int:
        """Type a secret + Enter (masked in the job's kept output and screens)."""
        return self._running(job_id, "input").input_secret(value)

    def screen(self, job_id: str) -> ScreenView:
        job = self.handle(job_id)
        if job is not None:
            return job.screen()
        run_dir = self._run_dir(job_id)
        _, screen = load_final(run_dir)
        if screen is None:
            # The last screen is rendered at exit (capture-pane for tmux), which can fail when the
            # pane is already gone; the kept output still holds what the terminal showed.
            screen = self._screen_from_log(job_id, run_dir)
        return screen

    def _screen_from_log(self, job_id: str, run_dir: Path) -> ScreenView:
        """The last screen rebuilt with pyte from the tail of the kept output (bounded)."""
        log = OutputLog(run_dir / "output", readonly=True)
        chunk = log.read(max(0, log.end - _SCREEN_REBUILD_BYTES), _SCREEN_REBUILD_BYTES)
        if not chunk.data:
            raise PtyError(f"job {job_id} has ended and neither its last screen nor its output was kept")
        state = load_state(run_dir)
        return render_bytes(chunk.data, int(state.get("cols", DEFAULT_COLS)),
                            int(state.get("rows", DEFAULT_ROWS)))

    def wait(self, job_id: str, pattern: str | None = None, *, timeout: float = 30.0,
             idle_ms: int | None = None, since: int | None = None) -> WaitResult:
        job = self.handle(job_id)
        if job is None:
            exit_info, _ = load_final(self._run_dir(job_id))
            return WaitResult("exit", 0, exit=exit_info)
        return job.wait(pattern, timeout=timeout, idle_ms=idle_ms, since=since)

    def resize(self, job_id: str, cols: int, rows: int) -> None:
        self._running(job_id, "resize").resize(cols, rows)

    def kill(self, job_id: str, signal: str = "TERM", *, by: str) -> JobView:
        """Send ``signal`` (TERM, INT, KILL, HUP) to the job's program; the exit is recorded as it
        comes (``Manager.kill`` is the cancel that ends a job whatever it takes)."""
        name, _ = check_signal(signal)
        job = self._running(job_id, "a signal")
        job.kill(name)
        self.manager.store.append_event(job_id, "pty.signal", {"signal": name, "by": by})
        return self.manager.get(job_id)
