"""PTY jobs: the records, the checks on what comes from outside, and ``PtyJob``, the one interface
every way of running a job has (``carrier.jobs.ptyproc`` for local and plain-ssh jobs,
``carrier.jobs.ptytmux`` for tmux-backed ones; ``carrier.jobs.pty`` starts them).

Output goes to the job's ``OutputLog`` (ring in memory + capped segments on disk, read by byte
cursors). ``wait`` matches new output as it comes and the screen when output pauses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import signal as _signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from carrier.ansible.errors import SshError
from carrier.ansible.ssh import remote_command
from carrier.jobs import keys as keymod
from carrier.jobs.errors import JobError
from carrier.jobs.ptylog import OutputChunk, OutputLog, utf8_head_skip, utf8_tail_start
from carrier.jobs.screen import AnsiText, ScreenView
from carrier.store import check_job_id

log = logging.getLogger(__name__)

DEFAULT_TERM = "xterm-256color"
DEFAULT_COLS, DEFAULT_ROWS = 120, 40
MIN_COLS, MAX_COLS = 10, 1000
MIN_ROWS, MAX_ROWS = 5, 500
MAX_INPUT = 65536
#: What a typed secret shows as, should the program echo it.
SECRET_MASK = "********"  # noqa: S105 (a mask, not a password)
MAX_WAIT = 3600.0
MODES = ("auto", "tmux", "plain")
SIGNALS: dict[str, int] = {"TERM": _signal.SIGTERM, "INT": _signal.SIGINT, "KILL": _signal.SIGKILL,
                           "HUP": _signal.SIGHUP}
_TERM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
#: sudo's own prompt (its default ``[sudo] password for %p: ``) at the very end of the output.
SUDO_PROMPT = re.compile(rb"\[sudo\] password for [\w.@-]{1,64}: ?\Z")
#: sudo says this after a wrong password; the same secret is not typed again.
_SUDO_WRONG = re.compile(rb"Sorry, try again|incorrect password attempt")
#: How many times one job answers sudo's prompt by itself (a long session may ask again).
AUTO_SUDO_MAX = 5
_PROMPT_TAIL = 512
_SETTLE = 0.03
_SCREEN_EVERY = 0.25


class PtyError(JobError):
    """A PTY job cannot do what was asked (bad input, finished job, unreachable host)."""


@dataclass(slots=True)
class AutoSudo:
    """The secret a job answers sudo's prompt with, and how often it has."""

    value: str = dataclasses.field(repr=False)
    on_answer: Callable[[int], None] | None = None
    count: int = 0


# --------------------------------------------------------------------------- records and checks


@dataclass(frozen=True, slots=True)
class PtySpec:
    """What to run. ``command`` is an argv (``shell=False``) or one string for the shell."""

    job_id: str
    host: str
    command: tuple[str, ...] | str
    shell: bool = False
    term: str = DEFAULT_TERM
    cols: int = DEFAULT_COLS
    rows: int = DEFAULT_ROWS
    mode: str = "auto"

    def __post_init__(self) -> None:
        check_id(self.job_id)
        check_term(self.term)
        check_size(self.cols, self.rows)
        if self.mode not in MODES:
            raise PtyError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        try:
            remote_command(list(self.command) if not isinstance(self.command, str) else self.command,
                           shell=self.shell)
        except SshError as exc:
            raise PtyError(str(exc)) from None

    @property
    def text(self) -> str:
        """The command as the remote shell gets it."""
        cmd = self.command if isinstance(self.command, str) else list(self.command)
        return remote_command(cmd, shell=self.shell)


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How the program ended. ``reason``: exited, signal, ssh_error, lost, unknown."""

    reason: str
    code: int | None = None
    signal: int | None = None
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return self.reason == "exited" and self.code == 0

    @property
    def rc(self) -> int | None:
        """One number for the job record: the exit code, or 128+N for signal N (None when unknown)."""
        if self.reason == "exited":
            return self.code
        if self.reason == "signal" and self.signal is not None:
            return 128 + self.signal
        return self.code

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.signal is not None:
            data["signal_name"] = signame(self.signal)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitInfo:
        return cls(str(data.get("reason", "unknown")), data.get("code"), data.get("signal"),
                   str(data.get("message", "")))


@dataclass(frozen=True, slots=True)
class WaitResult:
    """Why ``wait`` returned: ``match`` (``match`` is the text, ``where`` output|screen), ``exit``,
    ``idle`` (no output for the idle time) or ``timeout``. ``cursor``: output end at return."""

    reason: str
    cursor: int
    match: str | None = None
    where: str | None = None
    exit: ExitInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "cursor": self.cursor, "match": self.match, "where": self.where,
                "exit": self.exit.to_dict() if self.exit else None}


@dataclass(frozen=True, slots=True)
class OutputRead:
    """``job_output``: raw bytes ``[start, next_cursor)``, ``dropped`` bytes no longer kept, ``done``
    when the job has ended and everything was read."""

    data: bytes
    start: int
    next_cursor: int
    dropped: int
    done: bool

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.text(), "start": self.start, "next_cursor": self.next_cursor,
                "dropped": self.dropped, "done": self.done}


def signame(number: int) -> str:
    try:
        return _signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return str(number)


def check_id(job_id: object) -> str:
    try:
        return check_job_id(job_id)
    except ValueError as exc:
        raise PtyError(str(exc)) from None


def check_term(term: object) -> str:
    if not isinstance(term, str) or _TERM_RE.fullmatch(term) is None:
        raise PtyError(f"TERM {str(term)[:40]!r} is not a terminal type name (e.g. xterm-256color)")
    return term


def check_size(cols: object, rows: object) -> tuple[int, int]:
    for name, value, low, high in (("cols", cols, MIN_COLS, MAX_COLS), ("rows", rows, MIN_ROWS, MAX_ROWS)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PtyError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(cols), int(rows)  # type: ignore[call-overload]


def check_signal(name: object) -> tuple[str, int]:
    text = str(name).upper().removeprefix("SIG") if isinstance(name, str) else ""
    if text not in SIGNALS:
        raise PtyError(f"signal must be one of {', '.join(SIGNALS)}, got {name!r}")
    return text, SIGNALS[text]


def status_from_shell(code: int, *, via: str) -> ExitInfo:
    """An exit status reported by a shell: 128+N is a death by signal N (the shell convention)."""
    if 128 < code <= 128 + 64:
        sig = code - 128
        return ExitInfo("signal", None, sig, f"killed by signal {signame(sig)} ({via} status {code})")
    return ExitInfo("exited", code, None, f"exited with status {code}")


# --------------------------------------------------------------------------- the job interface


class PtyJob:
    """One running (or finished) PTY job. Thread-safe; the doors call it from any thread."""

    mode = ""

    def __init__(self, spec: PtySpec, output: OutputLog) -> None:
        self.spec = spec
        self.job_id = spec.job_id
        self.log = output
        self.cols, self.rows = spec.cols, spec.rows
        self.exit: ExitInfo | None = None
        self.final_screen: ScreenView | None = None
        self._cond = threading.Condition()
        self._exited = threading.Event()
        self._ended = False  # the end is recorded and the on_exit callbacks have run
        self._last_output = time.monotonic()
        self._input_cursor = output.end
        self._on_exit: list[Callable[[PtyJob], None]] = []
        #: Secrets typed into this job (job_input secret=...): masked in its kept output and screens.
        self._masks: list[str] = []
        self._held = b""  # output that may be the start of a secret (see _mask_bytes)
        self._auto: AutoSudo | None = None
        self._tail = b""  # the last output bytes, where sudo's prompt is looked for

    # ----------------------------------------------------------------- secrets

    def _mask_bytes(self, data: bytes, *, final: bool = False) -> bytes:
        """``data`` with every typed secret replaced by the mask; a tail that may be the start of
        a secret split across chunks is held back until the next chunk (or the end)."""
        data = self._held + data
        self._held = b""
        masks = [value.encode("utf-8") for value in self._masks]
        for mask in masks:
            data = data.replace(mask, SECRET_MASK.encode())
        if not final:
            for size in range(min(len(data), max(map(len, masks)) - 1), 0, -1):
                if any(m.startswith(data[-size:]) for m in masks):
                    data, self._held = data[:-size], data[-size:]
                    break
        return data

    def _mask_screen(self, view: ScreenView) -> ScreenView:
        if not self._masks or not any(v in row for v in self._masks for row in view.rows):
            return view
        rows = list(view.rows)
        for value in self._masks:
            rows = [row.replace(value, SECRET_MASK) for row in rows]
        return dataclasses.replace(view, rows=tuple(rows))

    def input_secret(self, value: str) -> int:
        """Type a secret and press Enter; should the program echo it, the kept output and the
        screens show ``SECRET_MASK`` instead. The cursor from before the input."""
        if not value:
            raise PtyError("the secret is empty")
        if value not in self._masks:
            self._masks.append(value)
        return self.input(value, ["Enter"])

    def auto_sudo(self, value: str, on_answer: Callable[[int], None] | None = None) -> None:
        """Answer sudo's password prompt with ``value`` whenever it shows at the end of the output
        (masked like ``input_secret``), until sudo says the password was wrong or ``AUTO_SUDO_MAX``
        answers; ``on_answer(count)`` is told each time (for the job's events)."""
        if not value:
            raise PtyError("the secret is empty")
        if value not in self._masks:
            self._masks.append(value)
        self._auto = AutoSudo(value, on_answer)

    def _watch_prompt(self, data: bytes) -> None:
        auto = self._auto
        if auto is None:
            return
        self._tail = (self._tail + data)[-_PROMPT_TAIL:]
        if auto.count and _SUDO_WRONG.search(self._tail):
            self._auto = None  # the secret is wrong: typing it again would only lock the account
            log.warning("pty auto_sudo stopped: sudo refused the password", extra={"job": self.job_id})
            return
        if not SUDO_PROMPT.search(self._tail) or auto.count >= AUTO_SUDO_MAX:
            return
        auto.count += 1
        self._tail = b""
        # Typed from another thread: this one reads the output the typing may need to flow.
        threading.Thread(target=self._answer, args=(auto,), name=f"carrier-sudo-{self.job_id}",
                         daemon=True).start()

    def _answer(self, auto: AutoSudo) -> None:
        try:
            self.input(auto.value, ["Enter"])
        except JobError as exc:  # ended meanwhile
            log.info("pty auto_sudo answer not sent", extra={"job": self.job_id, "error": str(exc)})
            return
        if auto.on_answer is not None:
            with contextlib.suppress(Exception):
                auto.on_answer(auto.count)

    # ----------------------------------------------------------------- hot path and end

    def _feed(self, data: bytes) -> None:
        if self._auto is not None:
            self._watch_prompt(data)
        if self._masks:
            data = self._mask_bytes(data)
        self.log.append(data)
        self._last_output = time.monotonic()
        with self._cond:
            self._cond.notify_all()

    def _finish(self, info: ExitInfo, screen: ScreenView | None = None,
                render: Callable[[], ScreenView] | None = None) -> None:
        """Record the end: waiters wake at once; the last screen (``render``, which may be slow) is
        made after that, then the ``on_exit`` callbacks run."""
        if self._held:
            self.log.append(self._mask_bytes(b"", final=True))
        with self._cond:
            if self.exit is not None:
                return
            self.final_screen = screen
            self.exit = info
            self._exited.set()
            self._cond.notify_all()
        if self.final_screen is None and render is not None:
            try:
                self.final_screen = render()
            except Exception:  # the exit stands without its last screen
                log.warning("pty last screen failed", exc_info=True, extra={"job": self.job_id})
        if self.final_screen is not None:
            self.final_screen = self._mask_screen(self.final_screen)
        with self._cond:
            callbacks = list(self._on_exit)
            self._on_exit.clear()
            self._ended = True
        log.info("pty job ended", extra={"job": self.job_id, "reason": info.reason, "rc": info.rc})
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback(self)

    def on_exit(self, callback: Callable[[PtyJob], None]) -> None:
        """Call ``callback(job)`` once the job has ended and its last screen is kept."""
        with self._cond:
            if not self._ended:
                self._on_exit.append(callback)
                return
        callback(self)

    @property
    def done(self) -> bool:
        return self.exit is not None

    def wait_exit(self, timeout: float | None = None) -> ExitInfo | None:
        """The exit once the program ended (None if still running after ``timeout`` seconds)."""
        # Its own event: waking on every output chunk would cost the reader a thread switch each.
        self._exited.wait(timeout)
        return self.exit

    # ----------------------------------------------------------------- door operations

    def output(self, since: int = 0, limit: int = 65536) -> OutputRead:
        """Raw output from cursor ``since``; the chunk never ends inside a UTF-8 character
        (unless the job has ended), and never starts inside one."""
        chunk: OutputChunk = self.log.read(since, limit)
        data, start = chunk.data, chunk.start
        if chunk.dropped and data:
            skip = utf8_head_skip(data)  # the cut may have landed inside a character
            data, start = data[skip:], start + skip
        done_now = self.done
        cut = utf8_tail_start(data)
        if cut < len(data) and not (done_now and start + len(data) >= self.log.end):
            data = data[:cut]
        nxt = start + len(data)
        return OutputRead(data, start, nxt, chunk.dropped, done_now and nxt >= self.log.end)

    def input(self, text: str = "", keys: str | Sequence[str] = ()) -> int:
        """Type ``text``, then press ``keys``; return the output cursor from before the input
        (what ``wait`` starts from by default)."""
        if not isinstance(text, str):
            raise PtyError("text must be a string")
        if len(text.encode("utf-8", "replace")) > MAX_INPUT:
            raise PtyError(f"input text is longer than {MAX_INPUT} bytes: send it in parts")
        resolved = keymod.keys(keys)
        if not text and not resolved:
            raise PtyError("nothing to send: give text, keys, or both")
        self._require_running("input")
        cursor = self.log.end
        self._input_cursor = cursor
        self._send(text, resolved)
        return cursor

    def screen(self) -> ScreenView:
        """What the terminal shows now (the last screen, for a finished job)."""
        if self.final_screen is not None:
            return self.final_screen
        return self._mask_screen(self._screen())

    def resize(self, cols: int, rows: int) -> None:
        cols, rows = check_size(cols, rows)
        self._require_running("resize")
        self._resize(cols, rows)
        self.cols, self.rows = cols, rows

    def kill(self, signal: str = "TERM") -> None:
        name, number = check_signal(signal)
        if self.done:
            return
        self._kill(name, number)

    def wait(
        self,
        pattern: str | None = None,
        *,
        timeout: float = 30.0,
        idle_ms: int | None = None,
        since: int | None = None,
    ) -> WaitResult:
        """Until ``pattern`` (a regex) is on the screen or in output after ``since`` (default: the
        cursor of the last input), the job ends, or no output came for ``idle_ms``."""
        regex = _compile(pattern)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= MAX_WAIT:
            raise PtyError(f"timeout must be 0 to {MAX_WAIT:g} seconds, got {timeout!r}")
        if idle_ms is not None and (isinstance(idle_ms, bool) or not isinstance(idle_ms, int)
                                    or not 1 <= idle_ms <= 3_600_000):
            raise PtyError(f"idle_ms must be 1 to 3600000, got {idle_ms!r}")
        if regex is None and idle_ms is None and timeout == 0:
            raise PtyError("wait for what? give a pattern, idle_ms, or a timeout")
        start = self._input_cursor if since is None else since
        if start < 0 or start > self.log.end:
            raise PtyError(f"since must be an output cursor from 0 to {self.log.end}, got {start}")
        return _Waiter(self, regex, start, idle_ms).run(timeout)

    # ----------------------------------------------------------------- for subclasses

    def _require_running(self, what: str) -> None:
        if self.exit is not None:
            raise PtyError(f"job {self.job_id} has ended ({self.exit.message or self.exit.reason}): "
                           f"{what} goes only to a running job")

    def _send(self, text: str, keys: list[keymod.Key]) -> None:
        raise NotImplementedError

    def _screen(self) -> ScreenView:
        raise NotImplementedError

    def _resize(self, cols: int, rows: int) -> None:
        raise NotImplementedError

    def _kill(self, name: str, number: int) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        """Stop watching the job in this process (a tmux job keeps running; others are stopped)."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        return {"job": self.job_id, "mode": self.mode, "host": self.spec.host, "cols": self.cols,
                "rows": self.rows, "term": self.spec.term, "cursor": self.log.end, "done": self.done,
                "exit": self.exit.to_dict() if self.exit else None}


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None or pattern == "":
        return None
    if not isinstance(pattern, str) or len(pattern) > 1000:
        raise PtyError("pattern must be a regular expression of at most 1000 characters")
    try:
        return re.compile(pattern, re.MULTILINE)
    except re.error as exc:
        raise PtyError(f"pattern {pattern[:60]!r} is not a valid regular expression: {exc}") from None


class _Waiter:
    """One ``wait`` call: new output is matched as it comes (escapes stripped); the screen is
    checked at the start, whenever output pauses, at least every ``_SCREEN_EVERY`` seconds
    while output flows, and once more at the end."""

    _WINDOW = 1 << 20

    def __init__(self, job: PtyJob, regex: re.Pattern[str] | None, start: int, idle_ms: int | None) -> None:
        self.job = job
        self.regex = regex
        self.cursor = start
        self.idle = idle_ms / 1000 if idle_ms is not None else None
        self.text = AnsiText()
        self.window = ""
        self.scanned = 0
        self.screen_at = -1  # output end when the screen was last checked

    def _scan_output(self) -> str | None:
        while True:
            chunk = self.job.log.read(self.cursor, 1 << 20)
            if not chunk.data:
                return None
            self.cursor = chunk.next_cursor
            self.window += self.text.feed(chunk.data)
            if self.regex is not None:
                found = self.regex.search(self.window, max(0, self.scanned - 4096))
                if found is not None:
                    return found.group(0)
            self.scanned = len(self.window)
            if len(self.window) > self._WINDOW:
                drop = len(self.window) - self._WINDOW // 2
                self.window = self.window[drop:]
                self.scanned = max(0, self.scanned - drop)

    def _scan_screen(self) -> str | None:
        if self.regex is None:
            return None
        end = self.job.log.end
        if end == self.screen_at:
            return None
        self.screen_at = end
        try:
            found = self.regex.search(self.job.screen().text)
        except JobError:
            return None
        return found.group(0) if found is not None else None

    def run(self, timeout: float) -> WaitResult:
        job = self.job
        started = time.monotonic()
        deadline = started + timeout
        last_screen = started
        while True:
            hit = self._scan_output()
            if hit is not None:
                return WaitResult("match", self.cursor, hit, "output")
            now = time.monotonic()
            quiet = now - job._last_output
            # The screen costs more than new output (a pyte render, or a tmux round trip): look at
            # it once output pauses, but not in the first moments (an echo is usually on its way).
            settled = quiet >= _SETTLE and now - started >= _SETTLE
            if self.regex is not None and (settled or now - last_screen >= _SCREEN_EVERY or timeout == 0):
                last_screen = now
                hit = self._scan_screen()
                if hit is not None:
                    return WaitResult("match", job.log.end, hit, "screen")
            if job.done:
                hit = self._scan_output()
                if hit is not None:
                    return WaitResult("match", job.log.end, hit, "output")
                hit = self._scan_screen()
                if hit is not None:
                    return WaitResult("match", job.log.end, hit, "screen")
                return WaitResult("exit", job.log.end, exit=job.exit)
            if self.idle is not None and quiet >= self.idle and self.cursor >= job.log.end:
                return WaitResult("idle", job.log.end)
            remaining = deadline - now
            if remaining <= 0:
                return WaitResult("timeout", job.log.end)
            nap = min(remaining, _SCREEN_EVERY)
            if self.idle is not None:
                nap = min(nap, max(0.001, self.idle - quiet))
            if self.regex is not None and quiet < _SETTLE:
                nap = min(nap, _SETTLE)
            if self.regex is not None and now - started < _SETTLE:
                nap = min(nap, max(0.001, _SETTLE - (now - started)))
            with job._cond:
                if job.log.end == self.cursor and not job.done:
                    job._cond.wait(nap)
