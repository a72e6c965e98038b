"""tmux-backed PTY jobs: the program runs in a pane of its host's Carrier tmux server
(``carrier.jobs.tmuxctl``), so it survives a Carrier restart and is found again by job id
(``PtyRunner.reattach``). Output arrives through the host's control connection; the screen comes
from ``capture-pane``; keys go by tmux key names (tmux knows the pane's cursor-key mode).

A watcher thread per job notices the end (the wrapper's end marker, a pane-died hint, or a poll
each second), reads the status tmux recorded, keeps the last screen and removes the pane.

With ``pty.tmux_output: pipe`` (``carrier.jobs.ptypipe``) the job's bytes come raw from the file
tmux's ``pipe-pane`` appends to, over a reader channel of its own; the control connection then
gets no ``%output`` for the pane (``refresh-client -A <pane>:off``) and serves the rest as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from carrier.ansible.inventory import HostConn
from carrier.jobs import keys as keymod
from carrier.jobs import ptypipe, tmuxctl
from carrier.jobs.ptybase import ExitInfo, PtyError, PtyJob, PtySpec, signame, status_from_shell
from carrier.jobs.ptylog import OutputLog
from carrier.jobs.screen import ScreenView

if TYPE_CHECKING:
    from carrier.jobs.pty import PtyRunner

log = logging.getLogger(__name__)

#: Seconds a possible start of the end marker is held back before it counts as plain output.
_HOLD_MAX = 0.1
#: Seconds an ended pipe-output job waits for the last bytes of the host's file.
_DRAIN_TIMEOUT = 10.0
#: New readers a job gets when its reader channel goes away while the program runs.
_PIPE_RETRIES = 5


def quiet_pane(pane: str) -> str:
    """The tmux command that stops ``%output`` of ``pane`` to this control client (pipe output)."""
    return f"refresh-client -A {tmuxctl.quote(pane + ':off')}"


class TmuxPtyJob(PtyJob):
    """A program in a pane of the host's Carrier tmux server (see ``carrier.jobs.tmuxctl``)."""

    mode = "tmux"

    def __init__(self, spec: PtySpec, output: OutputLog, runner: PtyRunner, host: HostConn,
                 server: tmuxctl.TmuxServer, pane: tmuxctl.PaneInfo, *, observer: bool = False) -> None:
        super().__init__(spec, output)
        self.runner = runner
        self.host = host
        self.server = server
        self.pane = pane.pane
        self.window = pane.window
        self.pane_pid = pane.pid
        self.observer = observer
        self._mark = tmuxctl.END_MARK + spec.job_id.encode() + b";"
        self._hold = b""
        self._hold_at = 0.0
        self.marker_status: int | None = None
        self._hint = threading.Event()
        self._fast_until = 0.0
        self._stop = threading.Event()
        self._feed_lock = threading.RLock()
        self._watcher: threading.Thread | None = None
        #: ``pipe`` (raw bytes from the host's pipe-pane file) or ``control`` (``%output``).
        self.output_mode = "control"
        self._pipe: ptypipe.PipeReader | None = None
        self._offsets: ptypipe.OffsetFile | None = None
        self._consumed = 0  # bytes of the host's file handed to on_output
        self._punched = 0
        self._stream_marker = False  # the end marker came in the output itself
        self._pipe_retries = 0
        self._released = False
        self._release_lock = threading.Lock()

    # ----------------------------------------------------------------- PaneSink (reader thread)

    def on_output(self, data: bytes) -> None:
        with self._feed_lock:
            buf = self._hold + data if self._hold else data
            self._hold = b""
            idx = buf.find(self._mark)
            if idx >= 0:
                end = buf.find(b"\x07", idx)
                if end < 0 and len(buf) - idx < 64:
                    self._emit(buf[:idx])
                    self._hold = buf[idx:]
                    return
                self._emit(buf[:idx])
                self._stream_marker = True
                digits = buf[idx + len(self._mark):end] if end >= 0 else b""
                self.marker_status = int(digits) if digits.isdigit() else -1
                self._release_wrapper()
                self._fast_until = time.monotonic() + 5.0
                self._hint.set()
                if end >= 0:
                    self._emit(buf[end + 1:])
                return
            # Hold back a tail that could be the start of the marker (the rest comes with the next
            # read; if nothing comes soon, the watcher lets it go: it was not the marker).
            start = buf.rfind(b"\x1b", max(0, len(buf) - len(self._mark)))
            if start >= 0 and self._mark.startswith(buf[start:]):
                self._emit(buf[:start])
                self._hold = buf[start:]
                self._hold_at = time.monotonic()
                self._hint.set()
            else:
                self._emit(buf)

    def _flush_stale_hold(self) -> None:
        with self._feed_lock:
            if self._hold and not self._hold.startswith(self._mark) \
                    and time.monotonic() - self._hold_at > _HOLD_MAX:
                held, self._hold = self._hold, b""
                self._emit(held)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self.observer:
            # The supervising process writes the log; we only see that it grew.
            self.log.refresh()
            self._last_output = time.monotonic()
            with self._cond:
                self._cond.notify_all()
            return
        self._feed(data)

    def on_hint(self) -> None:
        self._hint.set()

    def _release_wrapper(self) -> None:
        """Let the wrapper exit (its end marker was seen, or its status recorded), exactly once: a
        second ``wait-for -S`` before the wrapper waits would delete the channel's wake-up (tmux
        removes a woken channel nobody waits on), and the wrapper would wait for ever. The reader
        (marker) and the watcher (status option) may both get here."""
        if self.observer:
            return
        with self._release_lock:
            if self._released:
                return
            try:
                self.server.release(self.job_id)
            except tmuxctl.TmuxError as exc:
                log.info("pty release not sent: tried again", extra={"job": self.job_id, "error": str(exc)})
                return
            self._released = True

    # ----------------------------------------------------------------- pipe output (reader thread)

    def attach_pipe(self, reader: ptypipe.PipeReader, offsets: ptypipe.OffsetFile, start: int) -> None:
        """Take the output from ``reader`` (which starts at byte ``start`` of the host's file)."""
        self.output_mode = "pipe"
        self._pipe = reader
        self._offsets = offsets
        self._consumed = self._punched = start
        offsets.save(self._pipe_offset())
        reader.go(self.on_pipe, self._hint.set)

    def _pipe_offset(self) -> ptypipe.PipeOffset:
        # Bytes still held back (a possible marker or secret start) are read again after a restart.
        return ptypipe.PipeOffset(self._consumed - len(self._hold) - len(self._held), self.log.end)

    def on_pipe(self, data: bytes) -> None:
        with self._feed_lock:
            self.on_output(data)
            self._consumed += len(data)
            saved = self._pipe_offset()
            if self._offsets is not None:
                self._offsets.save(saved)
        if self._pipe is not None and saved.host - self._punched >= ptypipe.PUNCH_EVERY:
            self._punched = saved.host
            self._pipe.punch(saved.host)

    def _resume_pipe(self) -> None:
        """A new reader from the first byte not yet taken (a dropped channel loses nothing); after
        ``_PIPE_RETRIES`` the job goes on in control mode (output printed meanwhile is not read)."""
        offsets = self._offsets
        start = self._consumed
        self._close_pipe()
        self._pipe_retries += 1
        log.warning("pty pipe reader ended while the job runs: reading again",
                    extra={"job": self.job_id, "offset": start, "attempt": self._pipe_retries})
        if offsets is not None and self._pipe_retries <= _PIPE_RETRIES and \
                self.runner._open_pipe(self, self.host, offsets.path.parent, start, fresh=False):
            return
        log.warning("pty pipe output given up: control mode", extra={"job": self.job_id})
        self.output_mode = "control"
        with contextlib.suppress(tmuxctl.TmuxError):
            self.server.command(f"refresh-client -A {tmuxctl.quote(self.pane + ':on')}")

    def _close_pipe(self) -> None:
        """Stop the reader and save where it got to (the host's file stays for a re-attach)."""
        reader = self._pipe
        if reader is None:
            return
        reader.close()
        with self._feed_lock:
            self._pipe = None
            if self._offsets is not None:
                with contextlib.suppress(OSError):
                    self._offsets.save(self._pipe_offset())
                self._offsets.close()
                self._offsets = None

    def on_link_lost(self) -> None:
        self._hint.set()

    # ----------------------------------------------------------------- supervision

    def watch(self) -> TmuxPtyJob:
        self._watcher = threading.Thread(target=self._watch_loop, name=f"carrier-pty-{self.job_id}",
                                         daemon=True)
        self._watcher.start()
        return self

    def _watch_loop(self) -> None:
        dead_since: float | None = None
        nudged = False
        while not self._stop.is_set() and self.exit is None:
            self._hint.wait(_HOLD_MAX if self._hold else 1.0)
            self._hint.clear()
            if self._stop.is_set():
                return
            if self._hold:
                self._flush_stale_hold()
            try:
                if not self.server.alive:
                    if self.runner.closed:
                        return
                    self._reconnect()
                info = self.server.pane_info(self.pane)
            except tmuxctl.TmuxError as exc:
                if self._gone(exc):
                    if self._pipe is not None:
                        self._pipe.wait_end(_DRAIN_TIMEOUT)  # its writer is gone: what is left comes
                        self._close_pipe()
                        self._remove_pipe_files()
                    self._finish(ExitInfo("lost", None, None, "the job's tmux pane is gone "
                                          "(its tmux server was stopped)"), None)
                    self.server.unregister(self.pane)
                    self.runner._release(self.host.name, self)
                    return
                time.sleep(0.5)
                continue
            except Exception:  # the host went away, the state dir vanished...: try again later
                log.warning("pty watch error", exc_info=True, extra={"job": self.job_id})
                time.sleep(1.0)
                continue
            self.pane_pid = info.pid
            if self._pipe is not None and self._pipe.ended.is_set() and not info.dead and not self.observer:
                self._resume_pipe()  # the reader's channel went away while the pane runs
            if not info.dead and info.ended is not None and self.marker_status is None:
                # The command ended while no Carrier listened (the marker went by): let the
                # wrapper go; its own end follows.
                self.marker_status = info.ended
                self._release_wrapper()
                self._fast_until = time.monotonic() + 5.0
            elif not info.dead and info.ended is not None and not self._released:
                self._release_wrapper()  # the first try could not be sent
            if not info.dead:
                if time.monotonic() < self._fast_until:
                    time.sleep(0.03)  # an end is expected (marker seen, signal sent): look again soon
                    self._hint.set()
                continue
            if info.status is None and info.signal is None:
                now = time.monotonic()
                if dead_since is None:
                    dead_since = now
                elif not nudged and now - dead_since > 0.1:
                    nudged = True
                    with contextlib.suppress(tmuxctl.TmuxError):
                        self.server.nudge()
                if now - dead_since < 3.0:
                    self._hint.set()  # tmux learns the status a moment after the pane closes
                    time.sleep(0.03)
                    continue
            self._conclude(info)
            return

    def _gone(self, exc: Exception) -> bool:
        text = str(exc)
        return "can't find pane" in text or "no pane" in text or "can't find" in text

    def _reconnect(self) -> None:
        self.server = self.runner._server(self.host)
        if self.output_mode == "pipe":
            self.server.command(quiet_pane(self.pane))  # before any %output of it could reach us
        self.server.register(self.pane, self.window, self)

    def _conclude(self, info: tmuxctl.PaneInfo) -> None:
        if info.signal is not None:
            exit_info = ExitInfo("signal", None, info.signal, f"killed by signal {signame(info.signal)}")
        elif info.status is not None:
            exit_info = status_from_shell(info.status, via="exit")
        elif self.marker_status is not None and self.marker_status >= 0:
            exit_info = status_from_shell(self.marker_status, via="exit")
        else:
            exit_info = ExitInfo("unknown", None, None, "the program ended; tmux did not say how")
        screen: ScreenView | None = None
        with contextlib.suppress(tmuxctl.TmuxError):
            screen = self._capture()
        self.server.unregister(self.pane)
        if not self.observer:
            # The pipe's file goes first (tail and cat keep reading and writing it by their open
            # descriptors): once the pane is gone, another Carrier may stop the emptied server.
            self._remove_pipe_files()
            with contextlib.suppress(tmuxctl.TmuxError):
                self.server.kill_pane(self.pane, self.job_id)
        self._drain_pipe()
        if self._hold:
            with self._feed_lock:
                held, self._hold = self._hold, b""
            self._emit(held)
        self._finish(exit_info, screen)
        self.runner._release(self.host.name, self)

    def _drain_pipe(self) -> None:
        """Pipe output: everything the pane printed is read before the end is recorded (the end
        marker in the stream says so; else the reader ends once the pane's pipe is closed), then
        the host's file is removed."""
        reader = self._pipe
        if reader is None:
            return
        if not self._stream_marker and not reader.wait_end(_DRAIN_TIMEOUT):
            log.warning("pty pipe output not drained", extra={"job": self.job_id})
        self._close_pipe()

    def _remove_pipe_files(self) -> None:
        """Remove the job's pipe file on the host (by its tmux server, else over ssh)."""
        if self.output_mode != "pipe" or self.observer:
            return
        script = ptypipe.cleanup_script(self.job_id)
        try:
            self.server.command(f"run-shell {tmuxctl.quote(script)}")
        except tmuxctl.TmuxError:
            self.runner._run_on_host(self.host, script)

    # ----------------------------------------------------------------- operations

    def _capture(self) -> ScreenView:
        info, rows = self.server.capture(self.pane)
        facts = next((line for line in info if line.startswith("carrier:")), "")
        parts = facts.split(":")
        if len(parts) != 7:
            raise tmuxctl.TmuxError(f"unexpected reply from tmux: {facts[:80]!r}")
        cx, cy, width, height, alt, app = (int(p or 0) for p in parts[1:])
        lines = tmuxctl.screen_rows(rows, height)
        return ScreenView(rows=tuple(lines), cols=width, lines=height, cursor_x=cx, cursor_y=cy,
                          alternate=bool(alt), app_cursor=bool(app), source="tmux")

    def _screen(self) -> ScreenView:
        try:
            return self._capture()
        except tmuxctl.TmuxError as exc:
            if self.final_screen is not None:
                return self.final_screen
            raise PtyError(f"job {self.job_id}: cannot read the screen: {exc}") from exc

    def _send(self, text: str, keys: list[keymod.Key]) -> None:
        target = tmuxctl.quote(self.pane)
        lines: list[str] = []
        for run_ascii, run in _split_ascii(text):
            if run_ascii:
                data = run.encode("ascii")
                for i in range(0, len(data), 256):
                    hexes = " ".join(f"{b:02x}" for b in data[i:i + 256])
                    lines.append(f"send-keys -t {target} -H {hexes}")
            else:
                lines.append(f"send-keys -t {target} -l {tmuxctl.quote(run)}")
        if keys:
            lines.append(f"send-keys -t {target} " + " ".join(tmuxctl.quote(k.tmux) for k in keys))
        try:
            self.server.commands(lines)
        except tmuxctl.TmuxError as exc:
            raise PtyError(f"job {self.job_id}: input not delivered: {exc}") from exc

    def _resize(self, cols: int, rows: int) -> None:
        try:
            self.server.command(f"resize-window -t {tmuxctl.quote(self.pane)} -x {cols} -y {rows}")
        except tmuxctl.TmuxError as exc:
            raise PtyError(f"job {self.job_id}: resize failed: {exc}") from exc

    def _kill(self, name: str, number: int) -> None:
        try:
            self.server.signal_pane(self.pane_pid, name)
        except tmuxctl.TmuxError as exc:
            raise PtyError(f"job {self.job_id}: cannot send {name}: {exc}") from exc
        self._fast_until = time.monotonic() + 5.0
        self._hint.set()

    def detach(self) -> None:
        """Stop watching; the program keeps running in tmux (``PtyRunner.reattach`` finds it)."""
        self._stop.set()
        self._hint.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5.0)
        self.server.unregister(self.pane)
        self._close_pipe()
        self.log.close()
        self.runner._release(self.host.name, self)


def _split_ascii(text: str) -> list[tuple[bool, str]]:
    """``text`` cut into runs of ASCII and of other characters."""
    runs: list[tuple[bool, str]] = []
    for ch in text:
        is_ascii = ord(ch) < 128
        if runs and runs[-1][0] == is_ascii:
            runs[-1] = (is_ascii, runs[-1][1] + ch)
        else:
            runs.append((is_ascii, ch))
    return runs
