"""What a PTY job's terminal shows: rows of text, the cursor, and whether the alternate screen is on.

Two sources: tmux-backed jobs ask tmux (``capture-pane``, see ``carrier.jobs.tmuxctl``); plain
jobs render their output with pyte, a VT100 emulator, **on demand**. pyte is ~30x slower than a
PTY, so it is never fed on the output hot path: ``LazyScreen`` catches up from the job's output
log when someone asks for the screen, and when more than ``CATCHUP_MAX`` bytes arrived since the
last look it starts again from the newest ``CATCHUP_MAX`` bytes (full-screen programs redraw
often, and a scrolling program's last screen is in its last bytes).

pyte has no alternate screen; ``AltScreen`` adds it (``?47``, ``?1047``, ``?1049``), so that the
shell prompt reappears as it was when ``vim`` or ``top`` exits.
"""

from __future__ import annotations

import codecs
import copy
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyte

CATCHUP_MAX = 256 * 1024
_ALT_PRIVATE = (47, 1047, 1049)
_DECCKM = 1 << 5  # pyte keeps private modes shifted left by 5


@dataclass(frozen=True, slots=True)
class ScreenView:
    """The terminal as it looks now. ``cursor_x``/``cursor_y`` count from 0 (column, row)."""

    rows: tuple[str, ...]
    cols: int
    lines: int
    cursor_x: int
    cursor_y: int
    alternate: bool
    app_cursor: bool
    #: ``tmux`` or ``pyte``: who rendered it.
    source: str

    @property
    def text(self) -> str:
        """The rows joined by newlines, trailing blank rows dropped."""
        rows = list(self.rows)
        while rows and not rows[-1].strip():
            rows.pop()
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = list(self.rows)
        data["text"] = self.text
        return data

    def framed(self) -> str:
        """The screen in a box, fixed width (for mail replies and the CLI)."""
        width = self.cols
        top = "+" + "-" * width + "+"
        body = [f"|{row[:width].ljust(width)}|" for row in self.rows]
        return "\n".join([top, *body, top])


class AltScreen(pyte.Screen):
    """pyte's Screen with the alternate screen buffer (what xterm does with ``?1049h``) and REP
    (``CSI n b``, repeat the last character: ncurses uses it for xterm-256color)."""

    def __init__(self, columns: int, lines: int) -> None:
        super().__init__(columns, lines)
        self.alternate = False
        self._saved: tuple[Any, Any] | None = None
        self._last = ""

    def draw(self, data: str) -> None:
        if data:
            self._last = data[-1]
        super().draw(data)

    def repeat_last(self, count: int = 1, **_: Any) -> None:
        if self._last and 0 < count <= 10 * self.columns * self.lines:
            super().draw(self._last * count)

    def set_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private") and any(m in _ALT_PRIVATE for m in modes) and not self.alternate:
            # Save the main screen (and, for 1049, the cursor), then show a clear one.
            self._saved = (copy.deepcopy(dict(self.buffer)), copy.copy(self.cursor))
            self.alternate = True
            self.buffer.clear()
            self.dirty.update(range(self.lines))
        super().set_mode(*modes, **kwargs)

    def reset_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private") and any(m in _ALT_PRIVATE for m in modes) and self.alternate:
            self.alternate = False
            self.buffer.clear()
            if self._saved is not None:
                saved_buffer, saved_cursor = self._saved
                self.buffer.update(saved_buffer)
                if 1049 in modes:
                    self.cursor = saved_cursor
                    self.ensure_hbounds()
                    self.ensure_vbounds()
            self._saved = None
            self.dirty.update(range(self.lines))
        super().reset_mode(*modes, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.alternate = False
        self._saved = None


class ByteStream(pyte.Stream):
    """Bytes into an ``AltScreen``: UTF-8 decoded incrementally (a character split between two
    reads is whole), and charset designations honoured. pyte's own ByteStream ignores ``ESC ( 0``
    in UTF-8 mode, so the line-drawing characters of dialog or menuconfig came out as letters."""

    csi = {**pyte.Stream.csi, "b": "repeat_last"}  # noqa: RUF012 (pyte reads it as an instance attribute)

    def __init__(self, screen: AltScreen) -> None:
        super().__init__(screen)
        self.use_utf8 = False  # what pyte checks before applying a charset; we decode UTF-8 here
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed_bytes(self, data: bytes) -> None:
        self.feed(self._decoder.decode(data))


def render_bytes(data: bytes, cols: int, lines: int) -> ScreenView:
    """The screen after a terminal of ``cols`` x ``lines`` received ``data`` (for tests and one-offs)."""
    screen = AltScreen(cols, lines)
    ByteStream(screen).feed_bytes(data)
    return _view(screen, app_cursor=_DECCKM in screen.mode)


def _view(screen: AltScreen, *, app_cursor: bool) -> ScreenView:
    rows = tuple(line.rstrip() for line in screen.display)
    return ScreenView(
        rows=rows, cols=screen.columns, lines=screen.lines,
        cursor_x=min(screen.cursor.x, screen.columns - 1), cursor_y=screen.cursor.y,
        alternate=screen.alternate, app_cursor=app_cursor, source="pyte",
    )


class LazyScreen:
    """A pyte screen fed from an output log only when asked (see the module docstring).

    ``read(since, limit)`` is the log's reader: it returns ``(data, next_cursor, dropped)``.
    """

    def __init__(self, cols: int, lines: int, read: Callable[[int, int], tuple[bytes, int, int]],
                 *, catchup_max: int = CATCHUP_MAX) -> None:
        self._lock = threading.Lock()
        self._read = read
        self.catchup_max = catchup_max
        self._screen = AltScreen(cols, lines)
        self._stream = ByteStream(self._screen)
        self._fed = 0

    def resize(self, cols: int, lines: int) -> None:
        with self._lock:
            self._screen.resize(lines=lines, columns=cols)

    def snapshot(self, end: int, *, app_cursor: bool, alternate: bool | None = None) -> ScreenView:
        """The screen once every byte up to cursor ``end`` was rendered."""
        with self._lock:
            if end - self._fed > self.catchup_max:
                self._restart(end - self.catchup_max)
            while self._fed < end:
                data, nxt, dropped = self._read(self._fed, min(end - self._fed, 65536))
                if dropped:
                    self._restart(nxt - len(data))
                if not data:
                    break
                self._stream.feed_bytes(data)
                self._fed = nxt
            view = _view(self._screen, app_cursor=app_cursor)
        if alternate is not None and alternate != view.alternate:
            # The hot-path tracker saw the mode switch even when pyte restarted after it.
            view = ScreenView(view.rows, view.cols, view.lines, view.cursor_x, view.cursor_y,
                              alternate, view.app_cursor, view.source)
        return view

    def _restart(self, position: int) -> None:
        """Forget the screen and render again from ``position`` (older bytes are too many or gone)."""
        cols, lines = self._screen.columns, self._screen.lines
        self._screen = AltScreen(cols, lines)
        self._stream = ByteStream(self._screen)
        self._fed = position


# --------------------------------------------------------------------------- text for pattern waits

_ANSI_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"          # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL or ST
    r"|\x1b[PX^_][^\x1b]*\x1b\\"         # DCS / SOS / PM / APC ... ST
    r"|\x1b[()*+][0-9A-Za-z]"            # charset designation
    r"|\x1b[@-Z\\-_=>78]"                # other two-byte escapes
    r"|[\x00-\x08\x0b-\x1a\x1c-\x1f\x7f]"  # other control characters (\t, \n kept; \r dropped)
)
#: An escape sequence this long without its end is not one: stop holding it back.
_MAX_PENDING_ESCAPE = 256


class AnsiText:
    """Turns raw terminal output into plain text, chunk by chunk (UTF-8 and escapes split across
    chunks included), for matching a pattern against new output."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""

    def feed(self, data: bytes, *, final: bool = False) -> str:
        text = self._pending + self._decoder.decode(data, final=final)
        self._pending = ""
        cut = text.rfind("\x1b")
        if cut >= 0 and not final and len(text) - cut < _MAX_PENDING_ESCAPE:
            tail = text[cut:]
            if _ANSI_RE.match(tail) is None:  # an unfinished sequence: wait for its end
                self._pending, text = tail, text[:cut]
        return _ANSI_RE.sub("", text)


# --------------------------------------------------------------------------- tmux captures

_SO, _SI = "\x0e", "\x0f"  # shift out / shift in: the line-drawing set on / off
_CAPTURE_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b.|[\x0e\x0f]|[^\x1b\x0e\x0f]+", re.DOTALL)


def capture_rows(lines: list[str]) -> list[str]:
    """Rows of ``tmux capture-pane -p -e`` as plain text: attributes dropped, and the line-drawing
    runs tmux marks with SO/SI (the DEC special graphics set) turned into box-drawing characters.
    The SO state carries over from one row to the next, as tmux writes it."""
    graphics = False
    rows = []
    for line in lines:
        out = []
        for match in _CAPTURE_RE.finditer(line):
            token = match.group(0)
            if token == _SO:
                graphics = True
            elif token == _SI:
                graphics = False
            elif token[0] != "\x1b":
                out.append(token.translate(pyte.charsets.VT100_MAP) if graphics else token)
        rows.append("".join(out).rstrip())
    return rows
