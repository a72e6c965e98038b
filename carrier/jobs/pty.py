"""The dedicated PTY runner: interactive programs (``top``, ``vim``, ``dialog``, ``make menuconfig``,
REPLs) in a real terminal on an inventory host, driven by named keys and text.

Three ways to run, one interface (``PtyJob``, ``carrier.jobs.ptybase``):

- **tmux** (the default when the host has tmux; ``carrier.jobs.ptytmux``): survives a Carrier
  restart, found again by job id (``PtyRunner.reattach``);
- **plain** (no tmux on the host; ``carrier.jobs.ptyproc``): ``ssh -tt -q -e none`` through the
  host's ControlPersist master, from a local PTY; a restart loses the job;
- **local** (``localhost``, ``connection: local``): the program in a local PTY.

``PtyRunner`` keeps one tmux control connection per host while it has jobs there, and writes each
job's ``pty.json`` (how it runs), ``exit.json`` and ``screen.json`` (how it ended) in its directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carrier.ansible.errors import SshError
from carrier.ansible.inventory import HostConn
from carrier.ansible.ssh import SshControl
from carrier.jobs import ptypipe, tmuxctl
from carrier.jobs.ptybase import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    DEFAULT_TERM,
    MAX_COLS,
    MAX_ROWS,
    MIN_COLS,
    MIN_ROWS,
    ExitInfo,
    OutputRead,
    PtyError,
    PtyJob,
    PtySpec,
    WaitResult,
    check_id,
    check_signal,
    check_size,
    check_term,
    status_from_shell,
)
from carrier.jobs.ptylog import DEFAULT_DISK, DEFAULT_MEMORY, OutputLog
from carrier.jobs.ptyproc import ProcessPtyJob
from carrier.jobs.ptytmux import TmuxPtyJob, quiet_pane
from carrier.jobs.screen import ScreenView

__all__ = [
    "DEFAULT_COLS", "DEFAULT_ROWS", "DEFAULT_TERM", "MAX_COLS", "MAX_ROWS", "MIN_COLS", "MIN_ROWS",
    "ExitInfo", "OutputRead", "PtyError", "PtyJob", "PtyRunner", "PtySpec", "WaitResult", "check_id",
    "check_signal", "check_size", "check_term", "load_final", "load_state", "status_from_shell",
]

log = logging.getLogger(__name__)

STATE_FILE = "pty.json"
EXIT_FILE = "exit.json"
SCREEN_FILE = "screen.json"
#: Plain remote jobs: the wrapper records its pid (= session and group id) for ``kill``.
PLAIN_WRAPPER = (
    'd="$HOME/.carrier-pty"; umask 077; mkdir -p "$d" 2>/dev/null; echo $$ >"$d/$1.pid" 2>/dev/null; '
    # Not HUP: when the connection drops, the kernel hangs up only the session leader (us);
    # dying then passes the hangup on to the program.
    "trap : INT QUIT TERM; "
    'c=$(printf "$2"); "${SHELL:-/bin/sh}" -c "$c"; s=$?; '
    'rm -f "$d/$1.pid"; [ "$s" = 255 ] && echo 255 >"$d/$1.status"; exit "$s"'
)
#: Reads (and removes) that note: a program's own status 255, as opposed to an ssh failure.
PLAIN_STATUS = ('d="$HOME/.carrier-pty"; rm -f "$d/$1.pid"; '
                'f="$d/$1.status"; [ -f "$f" ] || exit 3; cat "$f"; rm -f "$f"')
PLAIN_KILL = (
    'p=$(cat "$HOME/.carrier-pty/$1.pid" 2>/dev/null) || exit 3; '
    'pkill -"$2" -s "$p" 2>/dev/null || kill -s "$2" -- "-$p"'
)




@dataclass
class _HostServer:
    server: tmuxctl.TmuxServer
    jobs: dict[str, PtyJob] = field(default_factory=dict)


class PtyRunner:
    """Starts and re-attaches PTY jobs; keeps one tmux control connection per host while it has jobs.

    ``ssh`` is the ControlMaster manager (None: local jobs only). ``tmux_socket`` names the tmux
    server on every host (one per host and remote user). ``tmux_output`` is how tmux jobs' bytes
    reach us: ``pipe`` (raw, ``carrier.jobs.ptypipe``) or ``control`` (tmux's ``%output``).
    """

    def __init__(
        self,
        ssh: SshControl | None,
        *,
        tmux_socket: str = tmuxctl.DEFAULT_SOCKET,
        memory_bytes: int = DEFAULT_MEMORY,
        disk_bytes: int = DEFAULT_DISK,
        tmux_output: str = ptypipe.DEFAULT_OUTPUT,
    ) -> None:
        self.ssh = ssh
        self.tmux_socket = tmuxctl.check_socket_name(tmux_socket)
        self.tmux_output = ptypipe.check_output(tmux_output)
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._lock = threading.Lock()
        self._servers: dict[str, _HostServer] = {}
        # Per host: starting a job and closing the last one's connection never overlap.
        self._host_locks: dict[str, threading.RLock] = {}
        self._no_tmux: set[str] = set()
        self.closed = False

    # ----------------------------------------------------------------- hosts

    def _argv_for(self, host: HostConn) -> Callable[[str], list[str]]:
        if host.connection == "local":
            return lambda command: ["/bin/sh", "-c", command]
        if host.connection != "ssh" or self.ssh is None:
            raise PtyError(f"host {host.name} uses connection {host.connection!r}: "
                           "PTY jobs need ssh or local")
        ssh = self.ssh
        try:
            ssh.ensure_master(host)
        except SshError as exc:
            raise PtyError(f"host {host.name} is unreachable: {exc}") from exc
        return lambda command: ssh.argv(host, command, flags=("-T", "-q", "-e", "none"))

    def _host_lock(self, name: str) -> threading.RLock:
        with self._lock:
            return self._host_locks.setdefault(name, threading.RLock())

    def _server(self, host: HostConn) -> tmuxctl.TmuxServer:
        """The host's control connection (started when missing or dead)."""
        with self._host_lock(host.name):
            with self._lock:
                current = self._servers.get(host.name)
            if current is not None and current.server.alive:
                return current.server
            stderr = None
            if self.ssh is not None:
                stderr = self.ssh.log_dir / f"tmux-{host.name}.log"
            last: Exception | None = None
            for _ in range(2):  # the hub may vanish between bootstrap and attach: try once more
                try:
                    server = tmuxctl.connect(self._argv_for(host), self.tmux_socket, name=host.name,
                                             stderr_path=stderr)
                    break
                except tmuxctl.NoTmux:
                    self._no_tmux.add(host.name)
                    raise
                except tmuxctl.TmuxError as exc:
                    last = exc
            else:
                raise PtyError(str(last))
            with self._lock:
                jobs = current.jobs if current is not None else {}
                self._servers[host.name] = _HostServer(server, jobs)
            if current is not None:
                current.server.close()
            return server

    def _track(self, host: str, job: PtyJob) -> None:
        with self._lock:
            entry = self._servers.get(host)
            if entry is not None:
                entry.jobs[job.job_id] = job

    def _release(self, host: str, job: PtyJob) -> None:
        """A job of ``host`` ended or was detached: close the connection when it was the last."""
        with self._host_lock(host):
            with self._lock:
                entry = self._servers.get(host)
                if entry is None:
                    return
                if entry.jobs.get(job.job_id) is job:
                    del entry.jobs[job.job_id]
                if entry.jobs:
                    return
                del self._servers[host]
            _close_server(entry.server)

    def has_tmux(self, host: HostConn) -> bool:
        if host.name in self._no_tmux:
            return False
        try:
            self._server(host)
        except tmuxctl.NoTmux:
            return False
        return True

    # ----------------------------------------------------------------- jobs

    def _log(self, run_dir: Path, *, readonly: bool = False) -> OutputLog:
        return OutputLog(run_dir / "output", memory_bytes=self.memory_bytes, disk_bytes=self.disk_bytes,
                         readonly=readonly)

    def start(self, spec: PtySpec, host: HostConn, run_dir: Path) -> PtyJob:
        """Start ``spec`` on ``host``; its state and output live in ``run_dir``."""
        if host.name != spec.host:
            raise PtyError(f"the spec names host {spec.host}, not {host.name}")
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = spec.mode
        if mode == "auto":
            mode = "plain" if host.connection == "local" or host.name in self._no_tmux else "tmux"
        job: PtyJob
        if mode == "tmux":
            try:
                job = self._start_tmux(spec, host, run_dir)
            except tmuxctl.NoTmux:
                if spec.mode == "tmux":
                    raise PtyError(f"host {host.name} has no tmux: install it, "
                                   "or ask for mode plain") from None
                job = self._start_plain(spec, host, run_dir)
        else:
            job = self._start_plain(spec, host, run_dir)
        self._save_state(run_dir, spec, job)
        job.on_exit(lambda j: self._save_end(run_dir, j))
        log.info("pty job started", extra={"job": spec.job_id, "host": host.name, "mode": job.mode})
        return job

    def _start_plain(self, spec: PtySpec, host: HostConn, run_dir: Path) -> ProcessPtyJob:
        output = self._log(run_dir)
        if host.connection == "local":
            argv = ["/bin/sh", "-c", spec.text] if spec.shell or isinstance(spec.command, str) \
                else list(spec.command)
            return ProcessPtyJob(spec, output, argv, mode="local")
        argv_for = self._argv_for(host)  # checks the connection, starts the master
        assert self.ssh is not None
        wrapper = shlex.join(["exec", "sh", "-c", PLAIN_WRAPPER, "carrier-pty", spec.job_id,
                              tmuxctl.octal(spec.text)])
        argv = self.ssh.argv(host, wrapper, flags=("-tt", "-q", "-e", "none"))
        del argv_for
        return ProcessPtyJob(spec, output, argv, mode="plain",
                             remote_kill=lambda name: self._remote_kill(host, spec.job_id, name),
                             remote_status=lambda: self._remote_status(host, spec.job_id))

    def _remote(self, host: HostConn, script: str, *args: str) -> subprocess.CompletedProcess[bytes] | None:
        """A small fixed script on ``host`` over its master (None when ssh cannot run it)."""
        assert self.ssh is not None
        command = shlex.join(["sh", "-c", script, "carrier-pty", *args])
        try:
            # The master first: an ssh that became one itself would hold our pipes for its lifetime.
            self.ssh.ensure_master(host)
            return subprocess.run(self.ssh.argv(host, command, flags=("-T", "-q")), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20, check=False)
        except (OSError, SshError, subprocess.TimeoutExpired):
            return None

    def _run_on_host(self, host: HostConn, script: str) -> bool:
        """Best effort: a small fixed script on ``host`` (over its master, or locally)."""
        try:
            argv = self._argv_for(host)(shlex.join(["sh", "-c", script]))
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=20, check=False)
        except (OSError, PtyError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def _remote_kill(self, host: HostConn, job_id: str, name: str) -> bool:
        done = self._remote(host, PLAIN_KILL, job_id, name)
        return done is not None and done.returncode == 0

    def _remote_status(self, host: HostConn, job_id: str) -> int | None:
        done = self._remote(host, PLAIN_STATUS, job_id)
        if done is None or done.returncode != 0 or not done.stdout.strip().isdigit():
            return None
        return int(done.stdout.strip())

    def _start_tmux(self, spec: PtySpec, host: HostConn, run_dir: Path) -> TmuxPtyJob:
        with self._host_lock(host.name):
            for attempt in (1, 2):
                server = self._server(host)
                try:
                    pane = server.create_job(spec.job_id, cols=spec.cols, lines=spec.rows, term=spec.term)
                    break
                except tmuxctl.TmuxError as exc:
                    # Another Carrier process may have stopped the emptied server just now: once more.
                    if attempt == 2 or server.alive:
                        raise PtyError(f"host {host.name}: cannot create the job's tmux session: "
                                       f"{exc}") from exc
            job = TmuxPtyJob(spec, self._log(run_dir), self, host, server, pane)
            pipe = self.tmux_output == "pipe" and self._pipes(host.name) < ptypipe.MAX_PIPES_PER_HOST
            self._track(host.name, job)
        if pipe:
            self._open_pipe(job, host, run_dir, 0, fresh=True)
        server.register(pane.pane, pane.window, job)
        try:
            server.spawn(pane.pane, spec.job_id, spec.text, term=spec.term)
            job.pane_pid = server.pane_info(pane.pane).pid
        except tmuxctl.TmuxError as exc:
            server.unregister(pane.pane)
            job._remove_pipe_files()
            with contextlib.suppress(tmuxctl.TmuxError):
                server.kill_pane(pane.pane, spec.job_id)
            job._drain_pipe()
            self._release(host.name, job)
            raise PtyError(f"host {host.name}: cannot start the program in tmux: {exc}") from exc
        return job.watch()

    def _pipes(self, host: str) -> int:
        """Pipe readers (ssh channels) this runner has open to ``host``."""
        with self._lock:
            entry = self._servers.get(host)
            jobs = list(entry.jobs.values()) if entry is not None else []
        return sum(1 for j in jobs if isinstance(j, TmuxPtyJob) and j.output_mode == "pipe")

    def _open_pipe(self, job: TmuxPtyJob, host: HostConn, run_dir: Path, start: int, *, fresh: bool) -> bool:
        """Switch ``job`` to pipe output (False: it stays on control mode, say why in the log).
        ``fresh``: a new job, whose pane gets its pipe-pane now (before the program runs)."""
        stderr = self.ssh.log_dir / f"pipe-{host.name}.log" if self.ssh is not None else None
        try:
            argv = self._argv_for(host)(ptypipe.reader_command(job.job_id, start))
        except PtyError as exc:
            log.warning("pty pipe output unavailable", extra={"job": job.job_id, "error": str(exc)})
            return False
        reader = ptypipe.PipeReader(argv, name=f"{host.name}/{job.job_id}", stderr_path=stderr)
        header = reader.open()
        if not header.ok or not header.punch:
            why = header.detail or "the host cannot punch holes in files (fallocate) or has no GNU tail"
            log.warning("pty pipe output unavailable: control mode", extra={"job": job.job_id, "error": why})
            if header.ok:
                reader.drop()
            return False
        lines = [quiet_pane(job.pane)]
        if fresh:
            lines.append(f"pipe-pane -O -t {tmuxctl.quote(job.pane)} "
                         f"{tmuxctl.quote(ptypipe.pipe_command(job.job_id))}")
        try:
            job.server.commands(lines)
        except tmuxctl.TmuxError as exc:
            log.warning("pty pipe output unavailable: control mode",
                        extra={"job": job.job_id, "error": str(exc)})
            reader.drop()
            with contextlib.suppress(tmuxctl.TmuxError):
                job.server.command(f"refresh-client -A {tmuxctl.quote(job.pane + ':on')}")
            return False
        job.attach_pipe(reader, ptypipe.OffsetFile(run_dir), start)
        return True

    def reattach(self, job_id: str, host: HostConn, run_dir: Path, *, observer: bool = False) -> TmuxPtyJob:
        """Find a tmux-backed job again by its id (after a restart, or from another process with
        ``observer``: then nothing is written to ``run_dir`` and the job is never ended from here)."""
        check_id(job_id)
        state = load_state(run_dir)
        if state.get("mode") != "tmux":
            raise PtyError(f"job {job_id} did not run under tmux: it cannot be found again after a restart")
        spec = PtySpec(job_id, host.name, ("true",), term=state.get("term", DEFAULT_TERM),
                       cols=int(state.get("cols", DEFAULT_COLS)), rows=int(state.get("rows", DEFAULT_ROWS)),
                       mode="tmux")
        server = self._server(host)
        try:
            pane = server.pane_info(f"={job_id}:")
        except tmuxctl.TmuxError as exc:
            if state.get("output") == "pipe" and not observer:
                self._run_on_host(host, ptypipe.cleanup_script(job_id))  # nothing will read it now
            raise PtyError(f"job {job_id}: its tmux session is gone from {host.name}") from exc
        output = self._log(run_dir, readonly=observer)
        job = TmuxPtyJob(spec, output, self, host, server, pane, observer=observer)
        job.cols, job.rows = pane.cols, pane.lines
        self._track(host.name, job)
        if state.get("output") == "pipe" and not observer:
            # The file on the host holds what the program printed meanwhile: read on from the
            # byte last kept (an observer reads the log its supervisor writes instead).
            start = ptypipe.resume_at(ptypipe.OffsetFile(run_dir).load(), output.end)
            if not self._open_pipe(job, host, run_dir, start, fresh=False):
                log.warning("pty job re-attached without its pipe output: what it printed while "
                            "no Carrier read is not in the log", extra={"job": job_id})
                with contextlib.suppress(tmuxctl.TmuxError):  # the file would only grow now
                    server.commands([f"pipe-pane -t {tmuxctl.quote(pane.pane)}",
                                     f"run-shell {tmuxctl.quote(ptypipe.cleanup_script(job_id))}"])
        server.register(pane.pane, pane.window, job)
        if not observer:
            job.on_exit(lambda j: self._save_end(run_dir, j))
        job._hint.set()  # it may have ended while nobody watched
        job.watch()
        if pane.dead or pane.ended is not None:
            job.wait_exit(5.0)  # hand back a job that has ended as ended, not as one to type into
        return job

    def close(self) -> None:
        """Stop watching this runner's tmux jobs and close every control connection (the jobs
        keep running; a new runner re-attaches to them)."""
        self.closed = True
        with self._lock:
            jobs = [job for entry in self._servers.values() for job in entry.jobs.values()]
        for job in jobs:
            job.detach()
        with self._lock:
            entries = list(self._servers.values())
            self._servers.clear()
        for entry in entries:
            _close_server(entry.server)

    # ----------------------------------------------------------------- state files

    def _save_state(self, run_dir: Path, spec: PtySpec, job: PtyJob) -> None:
        state = {"version": 1, "job": spec.job_id, "host": spec.host, "mode": job.mode, "term": spec.term,
                 "cols": spec.cols, "rows": spec.rows, "socket": self.tmux_socket, "started_at": time.time(),
                 "output": job.output_mode if isinstance(job, TmuxPtyJob) else "pty"}
        _write_json(run_dir / STATE_FILE, state)

    def _save_end(self, run_dir: Path, job: PtyJob) -> None:
        if job.exit is not None:
            _write_json(run_dir / EXIT_FILE, job.exit.to_dict())
        if job.final_screen is not None:
            _write_json(run_dir / SCREEN_FILE, job.final_screen.to_dict())


def _close_server(server: tmuxctl.TmuxServer) -> None:
    """Close a control connection; stop the tmux server too when only the hub is left in it."""
    with contextlib.suppress(tmuxctl.TmuxError):
        if server.alive:
            server.command(tmuxctl.KILL_IF_EMPTY, timeout=5.0)
    server.close()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def load_state(run_dir: Path) -> dict[str, Any]:
    """``pty.json`` of a job ({} when missing or unreadable)."""
    try:
        data = json.loads((run_dir / STATE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_final(run_dir: Path) -> tuple[ExitInfo | None, ScreenView | None]:
    """The saved exit and last screen of a finished job."""
    exit_info: ExitInfo | None = None
    screen: ScreenView | None = None
    with contextlib.suppress(OSError, ValueError, TypeError):
        exit_info = ExitInfo.from_dict(json.loads((run_dir / EXIT_FILE).read_text("utf-8")))
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        data = json.loads((run_dir / SCREEN_FILE).read_text("utf-8"))
        screen = ScreenView(rows=tuple(data["rows"]), cols=data["cols"], lines=data["lines"],
                            cursor_x=data["cursor_x"], cursor_y=data["cursor_y"], alternate=data["alternate"],
                            app_cursor=data["app_cursor"], source=data["source"])
    return exit_info, screen
