"""One Carrier-owned tmux server per host, driven through a single control-mode connection.

Layout on the host (socket ``tmux -L <socket>``, default ``carrier``, config ``/dev/null``):

- a hub session ``carrier`` with one idle placeholder window, which our control client attaches to;
- one session per job, named by the job id, whose window is also linked into the hub, so the
  one control client sees every job's output (``%output``) and one ssh channel serves all the
  jobs of a host, however many there are (sshd's ``MaxSessions`` counts channels, not jobs).

Per job window: ``window-size manual`` (set after the window exists: tmux 3.3 crashes when a window
is created under a global ``manual`` while a control client is attached), ``remain-on-exit on``
with an empty ``remain-on-exit-format`` (the dead pane keeps its last screen, unscrolled, and
``#{pane_dead_status}`` / ``#{pane_dead_signal}`` say how it ended).

tmux 3.3 drops a dead pane's output that a control client has not been sent yet, so the pane runs
``WRAPPER``: after the command it prints an end marker (``END_MARK``) and waits on a tmux
``wait-for`` channel; everything before the marker has reached us when we see it, and only then do
we let the wrapper exit. The command text reaches the wrapper octal-escaped (only digits and
backslashes cross tmux's command parser and the wrapper's ``printf`` gives back the exact bytes),
and runs under the login shell like an ssh command would.

The control connection: ``ssh -T -q -e none ... '<bootstrap>'`` (``bootstrap_command``), which
creates the server and hub if needed and ``exec``s ``tmux -C attach``; or the same locally. Command
replies are ``%begin``/``%end``|``%error`` blocks answered in order; ``%output %<pane> <data>`` has
bytes below 32 and ``\\`` escaped as ``\\ooo`` (``codecs.escape_decode`` undoes that at C speed).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from carrier.jobs.errors import JobError
from carrier.jobs.screen import capture_rows

log = logging.getLogger(__name__)

HUB = "carrier"
DEFAULT_SOCKET = "carrier"
COMMAND_TIMEOUT = 15.0
CONNECT_TIMEOUT = 30.0
#: Exit status of the bootstrap when the host has no tmux (the runner then runs the job plainly).
NO_TMUX = 127
_SOCKET_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_NOTICE_RE = re.compile(r"%[a-z][a-z-]*( |$)")
#: Marker the wrapper prints when the command has ended (an OSC tmux and terminals ignore).
END_MARK = b"\x1b]7777;carrier-exit;"
#: Stops the server when only the hub session is left (one tmux command: no race with a new job).
KILL_IF_EMPTY = "if-shell -F '#{==:#{S:x},x}' kill-server"

WRAPPER = (
    # The wrapper survives the signals meant for the command (a trapped signal is reset to the
    # default in the child), then reports the command's status. Not HUP: a hangup reaches only
    # the session leader (us), and our death passes it on to the program.
    "trap : INT QUIT TERM; "
    'c=$(printf "$1"); '
    '"${SHELL:-/bin/sh}" -c "$c"; '
    "s=$?; "
    # Also as a pane option: a Carrier that was away when the marker went by still learns it.
    'tmux set-option -p -t "$TMUX_PANE" @carrier_status "$s" 2>/dev/null; '
    r"printf '\033]7777;carrier-exit;%s;%s\007' " '"$2" "$s"; '
    'tmux wait-for "carrier-$2" 2>/dev/null; '
    'exit "$s"'
)


class TmuxError(JobError):
    """tmux refused a command, or the control connection is gone."""


class NoTmux(TmuxError):
    """The host has no tmux."""


def check_socket_name(name: str) -> str:
    if not isinstance(name, str) or _SOCKET_RE.fullmatch(name) is None:
        raise TmuxError(f"invalid tmux socket name {name!r}: use 1-40 letters, digits, _ or -")
    return name


def quote(arg: str) -> str:
    """``arg`` as one word for tmux's command parser (single quotes, like sh)."""
    if any(ord(c) < 32 for c in arg):
        raise TmuxError("a tmux argument cannot hold control characters")
    return "'" + arg.replace("'", "'\\''") + "'"


def octal(text: str | bytes) -> str:
    """Every byte as ``\\ooo``: a printf format that gives back exactly ``text``."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return "".join(f"\\{b:03o}" for b in data)


def bootstrap_command(socket: str) -> str:
    """The shell command that starts the server and hub when missing, then attaches in control mode."""
    sock = check_socket_name(socket)
    tmux = f"tmux -L {sock}"
    return (
        f"command -v tmux >/dev/null 2>&1 || exit {NO_TMUX}; "
        f"{tmux} -f /dev/null new-session -d -s {HUB} -x 80 -y 24 'exec sleep 2147483647' 2>/dev/null; "
        f"{tmux} set -g status off \\; set -g history-limit 2000 \\; set -s escape-time 0 "
        ">/dev/null 2>&1; "
        f"exec {tmux} -C attach -t ={HUB}"
    )


class PaneSink(Protocol):
    """What a job gives the server to receive its pane's events (called on the reader thread)."""

    def on_output(self, data: bytes) -> None: ...

    def on_hint(self) -> None: ...

    def on_link_lost(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PaneInfo:
    pane: str
    window: str
    pid: int
    dead: bool
    #: ``#{pane_dead_status}`` / ``#{pane_dead_signal}`` (None until tmux has the status).
    status: int | None
    signal: int | None
    cols: int
    lines: int
    #: The command's status as the wrapper recorded it once the command ended (None before).
    ended: int | None = None


_PANE_FORMAT = ("carrier:#{pane_id}:#{window_id}:#{pane_pid}:#{pane_dead}:#{pane_dead_status}:"
                "#{pane_dead_signal}:#{pane_width}:#{pane_height}:#{@carrier_status}")


def _opt_int(text: str) -> int | None:
    return int(text) if text.strip().lstrip("-").isdigit() else None


def parse_pane_info(line: str) -> PaneInfo:
    parts = line.split(":")
    if len(parts) != 10 or parts[0] != "carrier":
        raise TmuxError(f"unexpected reply from tmux: {line[:80]!r}")
    return PaneInfo(
        pane=parts[1], window=parts[2], pid=int(parts[3] or 0), dead=parts[4] == "1",
        status=_opt_int(parts[5]), signal=_opt_int(parts[6]), cols=int(parts[7] or 0),
        lines=int(parts[8] or 0), ended=_opt_int(parts[9]),
    )


class _Pending:
    __slots__ = ("done", "error", "lines")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.lines: list[str] = []
        self.error = False


class TmuxServer:
    """The control connection to one host's Carrier tmux server. Thread-safe.

    ``argv`` runs ``bootstrap_command`` (through ssh for a remote host). Output of registered
    panes goes to their ``PaneSink``; ``command`` sends one tmux command and returns its lines.
    """

    def __init__(self, argv: Sequence[str], *, name: str, stderr_path: Path | None = None) -> None:
        self.argv = list(argv)
        self.name = name
        self.stderr_path = stderr_path
        self._lock = threading.Lock()  # orders writes with the pending queue
        self._pending: deque[_Pending] = deque()
        self._sinks: dict[str, PaneSink] = {}
        self._windows: dict[str, str] = {}  # window id -> pane id
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._attached = threading.Event()
        self._closed = threading.Event()
        self.exit_reason = ""

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> TmuxServer:
        """Connect; NoTmux when the host has no tmux, TmuxError when the connection fails."""
        err = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                bufsize=0, start_new_session=True,
            )
        except OSError as exc:
            raise TmuxError(f"{self.name}: cannot start the tmux connection: {exc.strerror}") from exc
        finally:
            if self.stderr_path:
                err.close()  # type: ignore[union-attr]
        self._reader = threading.Thread(target=self._read_loop, name=f"carrier-tmux-{self.name}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self._attached.wait(0.05):
            if self._closed.is_set() or time.monotonic() > deadline:
                rc = self._reap(timeout=2.0)
                if rc == NO_TMUX:
                    raise NoTmux(f"{self.name}: tmux is not installed")
                detail = self.exit_reason or self._stderr_tail() or f"exit status {rc}"
                raise TmuxError(f"{self.name}: cannot attach to the Carrier tmux server: {detail}")
        return self

    @property
    def alive(self) -> bool:
        return self._attached.is_set() and not self._closed.is_set()

    def close(self) -> None:
        """Drop the connection (the server and its jobs keep running)."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()  # an empty read ends `tmux -C`; ssh then exits
        if self._reap(timeout=3.0) is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            self._reap(timeout=5.0)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5.0)

    def _reap(self, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _stderr_tail(self) -> str:
        if not self.stderr_path:
            return ""
        try:
            lines = self.stderr_path.read_text("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""

    # ----------------------------------------------------------------- panes

    def register(self, pane: str, window: str, sink: PaneSink) -> None:
        with self._lock:
            self._sinks[pane] = sink
            self._windows[window] = pane

    def unregister(self, pane: str) -> None:
        with self._lock:
            self._sinks.pop(pane, None)
            for window, owner in list(self._windows.items()):
                if owner == pane:
                    del self._windows[window]

    def panes(self) -> list[str]:
        with self._lock:
            return list(self._sinks)

    # ----------------------------------------------------------------- commands

    def send(self, *lines: str) -> list[_Pending]:
        """Write commands (one per line) without waiting; replies come in the same order."""
        if self._closed.is_set() or self._proc is None or self._proc.stdin is None:
            raise TmuxError(f"{self.name}: the tmux connection is closed{self._why()}")
        waiters = []
        with self._lock:
            payload = b""
            for line in lines:
                if "\n" in line or not line.strip():
                    raise TmuxError("a tmux command is one non-empty line")
                waiter = _Pending()
                self._pending.append(waiter)
                waiters.append(waiter)
                payload += line.encode("utf-8") + b"\n"
            try:
                self._proc.stdin.write(payload)
            except (OSError, ValueError) as exc:
                for waiter in waiters:
                    self._pending.remove(waiter)
                raise TmuxError(f"{self.name}: the tmux connection is closed{self._why()}") from exc
        return waiters

    def _why(self) -> str:
        return f" ({self.exit_reason})" if self.exit_reason else ""

    def result(self, waiter: _Pending, *, timeout: float = COMMAND_TIMEOUT, what: str = "") -> list[str]:
        if not waiter.done.wait(timeout):
            raise TmuxError(f"{self.name}: tmux did not answer {what or 'a command'} within {timeout:g} s")
        if waiter.error:
            detail = " | ".join(waiter.lines)[:300] or "no detail"
            raise TmuxError(f"{self.name}: tmux refused {what or 'a command'}: {detail}")
        return waiter.lines

    def command(self, line: str, *, timeout: float = COMMAND_TIMEOUT) -> list[str]:
        """Run one tmux command; its output lines (TmuxError if tmux refused it)."""
        (waiter,) = self.send(line)
        return self.result(waiter, timeout=timeout, what=line.split(" ", 1)[0])

    def commands(self, lines: Sequence[str], *, timeout: float = COMMAND_TIMEOUT) -> list[list[str]]:
        """Several commands in one write; all their outputs (the first refusal raises)."""
        waiters = self.send(*lines)
        return [self.result(w, timeout=timeout, what=line.split(" ", 1)[0])
                for w, line in zip(waiters, lines, strict=True)]

    # ----------------------------------------------------------------- reading

    def _read_loop(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        block: _Pending | None = None
        ours = False
        guard = b""
        try:
            while True:
                try:
                    data = os.read(fd, 262144)
                except OSError:
                    break
                if not data:
                    break
                buf += data
                lines = buf.split(b"\n")
                buf = lines.pop()
                for raw in lines:
                    if block is not None or guard:
                        # Inside a command block: everything up to the matching guard is its output.
                        if raw.startswith((b"%end ", b"%error ")) and raw.split(b" ", 1)[1] == guard:
                            if ours and block is not None:
                                block.error = raw.startswith(b"%error")
                                block.done.set()
                            block, ours, guard = None, False, b""
                        elif ours and block is not None:
                            block.lines.append(raw.decode("utf-8", "replace"))
                        continue
                    if raw.startswith(b"%output "):
                        self._output(raw)
                    elif raw.startswith(b"%begin "):
                        guard = raw.split(b" ", 1)[1]
                        ours = guard.rsplit(b" ", 1)[-1] == b"1"
                        if ours:
                            with self._lock:
                                block = self._pending.popleft() if self._pending else None
                            if block is None:
                                ours = False
                        if not ours:
                            block = None
                    elif raw.startswith(b"%exit"):
                        self.exit_reason = raw[6:].decode("utf-8", "replace").strip() or "tmux exited"
                    elif raw.startswith(b"%session-changed"):
                        self._attached.set()
                    else:
                        self._notice(raw)
        finally:
            self._closed.set()
            with self._lock:
                pending = list(self._pending)
                self._pending.clear()
                sinks = list(self._sinks.values())
            for waiter in pending:
                waiter.error = True
                waiter.lines = [f"the tmux connection closed{self._why()}"]
                waiter.done.set()
            if block is not None and not block.done.is_set():
                block.error = True
                block.done.set()
            for sink in sinks:
                with contextlib.suppress(Exception):
                    sink.on_link_lost()

    def _output(self, raw: bytes) -> None:
        try:
            _, pane, escaped = raw.split(b" ", 2)
        except ValueError:
            return
        sink = self._sinks.get(pane.decode("ascii", "replace"))
        if sink is None:
            return
        try:
            data = codecs.escape_decode(escaped)[0]
        except ValueError:
            data = escaped
        sink.on_output(data)

    def _notice(self, raw: bytes) -> None:
        """Notifications that may mean a pane died: tell its job to look."""
        parts = raw.decode("utf-8", "replace").split(" ")
        kind = parts[0]
        if kind in ("%window-renamed", "%unlinked-window-renamed", "%window-close",
                    "%unlinked-window-close") and len(parts) > 1:
            if kind.endswith("renamed") and not parts[-1].endswith("[dead]"):
                return
            pane = self._windows.get(parts[1])
            sink = self._sinks.get(pane) if pane else None
            if sink is not None:
                sink.on_hint()

    # ----------------------------------------------------------------- job helpers

    def pane_info(self, target: str, *, timeout: float = COMMAND_TIMEOUT) -> PaneInfo:
        lines = self.command(f"display-message -p -t {quote(target)} {quote(_PANE_FORMAT)}", timeout=timeout)
        found = [line for line in lines if line.startswith("carrier:")]
        info = parse_pane_info(found[-1]) if found else None
        if info is None or not info.pane.startswith("%"):
            # display-message answers with empty fields for a target that does not exist
            raise TmuxError(f"{self.name}: no pane {target}")
        return info

    def create_job(self, job_id: str, *, cols: int, lines: int, term: str) -> PaneInfo:
        """The job's session (an idle placeholder pane for now), configured and linked into the hub."""
        sess = quote(job_id)
        env = quote(f"TERM={term}")
        target = quote(f"={job_id}:")
        self.commands([
            f"new-session -d -s {sess} -x {cols} -y {lines} -e {env} {quote('exec sleep 2147483647')}",
            f"set-option -w -t {target} window-size manual",
            f"set-option -w -t {target} remain-on-exit on",
            f"set-option -w -t {target} remain-on-exit-format ''",
            f"set-option -t {target} status off",
            f"resize-window -t {target} -x {cols} -y {lines}",
            f"link-window -d -s {target} -t {quote('=' + HUB + ':')}",
        ])
        return self.pane_info(f"={job_id}:")

    def spawn(self, pane: str, job_id: str, command: str, *, term: str) -> None:
        """Replace the placeholder with the wrapper running ``command`` (the remote shell string)."""
        args = " ".join(quote(a) for a in ("/bin/sh", "-c", WRAPPER, "carrier-pty", octal(command), job_id))
        self.command(f"respawn-pane -k -t {quote(pane)} -e {quote('TERM=' + term)} {args}")

    def release(self, job_id: str) -> None:
        """Let the wrapper of ``job_id`` exit (its end marker was received)."""
        self.send(f"wait-for -S {quote('carrier-' + job_id)}")

    def capture(self, pane: str) -> tuple[list[str], list[str]]:
        """The pane's visible rows and a line of cursor/mode facts, in one round trip."""
        fmt = ("carrier:#{cursor_x}:#{cursor_y}:#{pane_width}:#{pane_height}:#{alternate_on}:"
               "#{keypad_cursor_flag}")
        info, rows = self.commands([
            f"display-message -p -t {quote(pane)} {quote(fmt)}",
            f"capture-pane -p -e -t {quote(pane)}",
        ])
        return info, rows

    def kill_pane(self, pane: str, job_id: str) -> None:
        """Remove a finished job's pane (its window and session go with it)."""
        self.release(job_id)
        self.command(f"kill-pane -t {quote(pane)}")

    def nudge(self) -> None:
        """SIGCHLD to the tmux server. tmux before 3.5 can miss one and then never reaps a pane's
        process: the pane is dead without a status (and a zombie) until the next SIGCHLD."""
        self.command("run-shell 'kill -CHLD #{pid}'")

    def signal_pane(self, pane_pid: int, signame: str) -> None:
        """Send a signal to every process of the pane's session (the wrapper traps TERM/INT/QUIT and
        reports the command's status; HUP and KILL end the wrapper too, and tmux reports that)."""
        script = (f"pkill -{signame} -s {int(pane_pid)} 2>/dev/null || "
                  f"kill -s {signame} -- -{int(pane_pid)} 2>/dev/null; true")
        self.command(f"run-shell {quote(script)}")


def connect(
    argv_for: Callable[[str], list[str]], socket: str, *, name: str, stderr_path: Path | None = None,
) -> TmuxServer:
    """Start a control connection: ``argv_for(shell_command)`` says how to run a command on the host."""
    return TmuxServer(argv_for(bootstrap_command(socket)), name=name, stderr_path=stderr_path).start()


def screen_rows(rows: list[str], lines: int) -> list[str]:
    """capture-pane output as exactly ``lines`` rows (a stray notification line inside the block is
    dropped: tmux 3.3 may write one there)."""
    out = list(rows)
    while len(out) > lines:
        for i in range(len(out) - 1, -1, -1):
            if _NOTICE_RE.match(out[i]):
                del out[i]
                break
        else:
            out = out[:lines]
    while len(out) < lines:
        out.append("")
    return capture_rows(out)
