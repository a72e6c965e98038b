"""Local and plain-ssh PTY jobs: a program on a local PTY (``local``), or ``ssh -tt -q -e none``
through the host's ControlPersist master on one (``plain``: TERM and the window size reach the
remote side, a resize sends SIGWINCH; ``-e none`` so a typed ``~.`` cannot kill the session, ``-q``
so mux chatter stays out of the output).

Exit status: a local job's comes from ``waitpid`` (a signal is exact). A plain job runs under a
small ``sh`` wrapper (``carrier.jobs.pty.PLAIN_WRAPPER``) that outlives the signals meant for the
program and exits with its status, so ``128+N`` means "killed by signal N" (the shell convention)
while 255 from ``ssh`` itself means ssh failed (through a ControlMaster a remote death by signal
would read 255 too, which is why the wrapper is there).

The screen is rendered by pyte only when asked (``LazyScreen``); the reader thread only scans
for the cursor-key and alternate-screen modes on its way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal as _signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Sequence

from carrier.jobs import keys as keymod
from carrier.jobs.ptybase import ExitInfo, PtyError, PtyJob, PtySpec, signame, status_from_shell
from carrier.jobs.ptylog import OutputLog
from carrier.jobs.screen import AnsiText, LazyScreen, ScreenView

#: Environment a local program or our ssh gets (Carrier's own may hold secrets from overrides).
_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "SSH_AUTH_SOCK")


def clean_env(term: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["TERM"] = term
    return env


def _winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ProcessPtyJob(PtyJob):
    """A program on a local PTY: the program itself (``local``) or ``ssh -tt`` (``plain``)."""

    def __init__(
        self,
        spec: PtySpec,
        output: OutputLog,
        argv: Sequence[str],
        *,
        mode: str,
        remote_kill: Callable[[str], bool] | None = None,
        remote_status: Callable[[], int | None] | None = None,
        cwd: str | None = None,
    ) -> None:
        super().__init__(spec, output)
        self.mode = mode
        self.argv = list(argv)
        self.remote_kill = remote_kill
        self.remote_status = remote_status
        self.modes = keymod.ModeTracker()
        self._screen_lazy = LazyScreen(spec.cols, spec.rows, self._read_for_screen)
        self._write_lock = threading.Lock()
        self._killed: str | None = None
        master, slave = os.openpty()
        try:
            _winsize(master, spec.cols, spec.rows)
            # setsid -c: the program leads a new session with the PTY as its controlling
            # terminal, so the kernel sends it SIGWINCH and ^C as a terminal would.
            self.proc = subprocess.Popen(
                ["setsid", "-c", *self.argv], stdin=slave, stdout=slave, stderr=slave,
                env=clean_env(spec.term), cwd=cwd or os.path.expanduser("~"), close_fds=True,
            )
        except OSError as exc:
            os.close(master)
            raise PtyError(f"cannot start {self.argv[0]}: {exc.strerror}") from exc
        finally:
            os.close(slave)
        self.master = master
        os.set_blocking(master, False)
        self._reader = threading.Thread(target=self._read_loop, name=f"carrier-pty-{spec.job_id}",
                                        daemon=True)
        self._reader.start()

    def _read_for_screen(self, since: int, limit: int) -> tuple[bytes, int, int]:
        chunk = self.log.read(since, limit)
        return chunk.data, chunk.next_cursor, chunk.dropped

    def _read_loop(self) -> None:
        fd = self.master
        exited_at: float | None = None
        try:
            while True:
                data, ended = _drain(fd)
                if data:
                    self.modes.feed(data)
                    self._feed(data)
                if ended:
                    break
                if data:
                    continue
                if select.select([fd], [], [], 0.2)[0]:
                    continue
                if self.proc.poll() is not None:
                    # The program is gone but something it started still holds the terminal.
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > 0.5:
                        break
        finally:
            rc = self.proc.wait()
            with self._write_lock:
                os.close(fd)
                self.master = -1
            info = self._exit_info(rc)
            self._finish(info, render=self._screen_now)

    def _exit_info(self, rc: int) -> ExitInfo:
        if self.mode == "local":
            if rc < 0:
                return ExitInfo("signal", None, -rc, f"killed by signal {signame(-rc)}")
            return ExitInfo("exited", rc, None, f"exited with status {rc}")
        if rc == 255:
            # ssh says 255 for its own failures and for a program that exited 255: the wrapper
            # leaves a note in the second case.
            if self.remote_status is not None and self.remote_status() == 255:
                return ExitInfo("exited", 255, None, "exited with status 255")
            if self._killed == "HUP":  # a hangup ends the wrapper too, which reads 255 through the mux
                return ExitInfo("signal", None, _signal.SIGHUP, "killed by signal HUP (sent by Carrier)")
            tail = AnsiText().feed(self.log.tail(300).data, final=True).strip().splitlines()
            detail = tail[-1][:200] if tail else "no detail"
            return ExitInfo("ssh_error", 255, None, f"ssh failed (status 255): {detail}")
        if rc < 0:  # our own ssh was killed
            return ExitInfo("signal", None, -rc, f"the ssh client was killed by signal {signame(-rc)}")
        return status_from_shell(rc, via="remote")

    def _screen_now(self) -> ScreenView:
        return self._screen_lazy.snapshot(self.log.end, app_cursor=self.modes.app_cursor,
                                          alternate=self.modes.alternate)

    def _screen(self) -> ScreenView:
        return self._screen_now()

    def _send(self, text: str, keys: list[keymod.Key]) -> None:
        data = text.encode("utf-8") + keymod.encode_keys(keys, app_cursor=self.modes.app_cursor)
        deadline = time.monotonic() + 10.0
        with self._write_lock:
            view = memoryview(data)
            while view:
                if self.master < 0:
                    raise PtyError(f"job {self.job_id} has ended: input goes only to a running job")
                try:
                    written = os.write(self.master, view)
                    view = view[written:]
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise PtyError(f"job {self.job_id}: cannot write to its terminal: "
                                   f"{exc.strerror}") from exc
                if time.monotonic() > deadline:
                    raise PtyError(f"job {self.job_id} is not reading its input: "
                                   f"{len(view)} of {len(data)} bytes not sent")
                select.select([], [self.master], [], 0.1)

    def _resize(self, cols: int, rows: int) -> None:
        with self._write_lock:
            if self.master < 0:
                raise PtyError(f"job {self.job_id} has ended: resize goes only to a running job")
            _winsize(self.master, cols, rows)  # the kernel sends SIGWINCH; ssh passes it on
        self._screen_lazy.resize(cols, rows)

    def _kill(self, name: str, number: int) -> None:
        self._killed = name
        if self.mode == "plain" and self.remote_kill is not None and self.remote_kill(name):
            return
        # Local, or the remote side cannot be reached: signal from here.
        pid = self.proc.pid
        ours = os.getpgrp()
        try:
            leader = os.getpgid(pid) == pid
        except ProcessLookupError:
            return  # already gone: the reader records how it ended
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if leader:
                os.killpg(pid, number)
            else:
                os.kill(pid, number)  # setsid has not run yet: its group is still ours
        foreground = 0
        with contextlib.suppress(OSError):
            if self.master >= 0:
                foreground = os.tcgetpgrp(self.master)  # a shell's foreground job, if any
        # Never our own group (or 0, which means "the caller's group" to killpg).
        if foreground > 1 and foreground not in (ours, pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(foreground, number)

    def detach(self) -> None:
        if self.done:
            return
        self._kill("HUP", _signal.SIGHUP)
        if self.wait_exit(3.0) is None:
            self._kill("KILL", _signal.SIGKILL)
            self.wait_exit(5.0)


def _drain(fd: int, most: int = 262144) -> tuple[bytes, bool]:
    """What a non-blocking PTY master has now (up to ``most`` bytes, several reads in one chunk so
    the log and the waiters are touched once); True once the other side is closed for good."""
    parts: list[bytes] = []
    size = 0
    while size < most:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(parts), False
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b"".join(parts), True  # every holder of the terminal's other side closed it
            raise
        if not data:
            return b"".join(parts), True
        parts.append(data)
        size += len(data)
    return b"".join(parts), False
