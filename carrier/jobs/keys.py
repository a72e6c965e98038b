"""Named keys for PTY jobs: what a key name means as bytes on a terminal, and as a tmux key name.

Pure tables, no I/O. A key is written as the program expects it *now*: the cursor keys and
Home/End depend on the cursor-key mode (DECCKM). A program that calls ncurses ``keypad()``
switches the terminal to application mode (``ESC [ ? 1 h``) and then only understands
``ESC O A`` for Up; a fixed ``ESC [ A`` is ignored there (a known bug elsewhere). Plain jobs track
the mode from the output (``ModeTracker``); tmux-backed jobs use ``send-keys`` with tmux's key
names, and tmux picks the sequence from the pane's own mode.

Names: enter, tab, esc, backspace, space, up, down, left, right, home, end, pgup, pgdn, insert,
delete, f1-f12, ctrl-a..ctrl-z (also ctrl-@ [ \\ ] ^ _ and ctrl-space), alt-<character>, and
alt-<named key> (alt-enter, alt-up, ...). Case and ``_``/``+`` separators are accepted
(``Ctrl+C`` = ``ctrl-c``); a few aliases (return, escape, pageup, del, ...) too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from carrier.jobs.errors import JobError

MAX_KEYS = 200

# name -> (normal-mode bytes, application-mode bytes, tmux key name)
_SPECIAL: dict[str, tuple[bytes, bytes, str]] = {
    "enter": (b"\r", b"\r", "Enter"),
    "tab": (b"\t", b"\t", "Tab"),
    "esc": (b"\x1b", b"\x1b", "Escape"),
    "backspace": (b"\x7f", b"\x7f", "BSpace"),
    "space": (b" ", b" ", "Space"),
    "up": (b"\x1b[A", b"\x1bOA", "Up"),
    "down": (b"\x1b[B", b"\x1bOB", "Down"),
    "right": (b"\x1b[C", b"\x1bOC", "Right"),
    "left": (b"\x1b[D", b"\x1bOD", "Left"),
    "home": (b"\x1b[H", b"\x1bOH", "Home"),
    "end": (b"\x1b[F", b"\x1bOF", "End"),
    "pgup": (b"\x1b[5~", b"\x1b[5~", "PPage"),
    "pgdn": (b"\x1b[6~", b"\x1b[6~", "NPage"),
    "insert": (b"\x1b[2~", b"\x1b[2~", "IC"),
    "delete": (b"\x1b[3~", b"\x1b[3~", "DC"),
    "f1": (b"\x1bOP", b"\x1bOP", "F1"),
    "f2": (b"\x1bOQ", b"\x1bOQ", "F2"),
    "f3": (b"\x1bOR", b"\x1bOR", "F3"),
    "f4": (b"\x1bOS", b"\x1bOS", "F4"),
    "f5": (b"\x1b[15~", b"\x1b[15~", "F5"),
    "f6": (b"\x1b[17~", b"\x1b[17~", "F6"),
    "f7": (b"\x1b[18~", b"\x1b[18~", "F7"),
    "f8": (b"\x1b[19~", b"\x1b[19~", "F8"),
    "f9": (b"\x1b[20~", b"\x1b[20~", "F9"),
    "f10": (b"\x1b[21~", b"\x1b[21~", "F10"),
    "f11": (b"\x1b[23~", b"\x1b[23~", "F11"),
    "f12": (b"\x1b[24~", b"\x1b[24~", "F12"),
}
_ALIASES = {
    "return": "enter", "ret": "enter", "cr": "enter", "escape": "esc", "bs": "backspace",
    "bspace": "backspace", "pageup": "pgup", "page-up": "pgup", "pgdown": "pgdn",
    "pagedown": "pgdn", "page-down": "pgdn", "ins": "insert", "del": "delete",
    "arrow-up": "up", "arrow-down": "down", "arrow-left": "left", "arrow-right": "right",
}
# ctrl-<char> -> byte, for the characters that have a control code besides letters
_CTRL_EXTRA = {"@": 0x00, "space": 0x00, "[": 0x1B, "\\": 0x1C, "]": 0x1D, "^": 0x1E, "_": 0x1F}
_PREFIX_RE = re.compile(r"(ctrl|control|c|alt|meta|m)[-+_](.+)", re.IGNORECASE)


class UnknownKey(JobError):
    """A key name that is not in the table."""


@dataclass(frozen=True, slots=True)
class Key:
    """One resolved key: its canonical name, how to write it in both cursor-key modes, and the
    tmux ``send-keys`` name."""

    name: str
    normal: bytes
    application: bytes
    tmux: str

    def encode(self, *, app_cursor: bool) -> bytes:
        return self.application if app_cursor else self.normal


def _hint() -> str:
    return ("known keys: enter, tab, esc, backspace, space, up, down, left, right, home, end, pgup, "
            "pgdn, insert, delete, f1-f12, ctrl-a..ctrl-z, alt-<char>, alt-<key>")


def key(name: object) -> Key:
    """The key called ``name``; UnknownKey (with the list of names) for anything else."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownKey(f"a key name must be a non-empty string; {_hint()}")
    raw = name.strip()
    if len(raw) > 32:
        raise UnknownKey(f"unknown key {raw[:32]!r}...; {_hint()}")
    lowered = raw.lower().replace("_", "-")
    lowered = _ALIASES.get(lowered, lowered)
    if lowered in _SPECIAL:
        normal, app, tmux = _SPECIAL[lowered]
        return Key(lowered, normal, app, tmux)
    match = _PREFIX_RE.fullmatch(raw)
    if match is not None:
        mod = match.group(1).lower()
        rest = match.group(2)
        if mod in ("ctrl", "control", "c"):
            return _ctrl(raw, rest)
        return _alt(raw, rest)
    raise UnknownKey(f"unknown key {raw!r}; {_hint()}")


def _ctrl(raw: str, rest: str) -> Key:
    low = rest.lower()
    if len(low) == 1 and "a" <= low <= "z":
        code = ord(low) & 0x1F  # ctrl-x is x & 0x1f
        return Key(f"ctrl-{low}", bytes([code]), bytes([code]), f"C-{low}")
    if low in _CTRL_EXTRA:
        code = _CTRL_EXTRA[low]
        tmux = "C-Space" if low in ("space", "@") else f"C-{rest}"
        return Key(f"ctrl-{low}", bytes([code]), bytes([code]), tmux)
    raise UnknownKey(f"unknown key {raw!r}: ctrl- goes with a letter a-z or one of @ [ \\ ] ^ _ space; "
                     f"{_hint()}")


def _alt(raw: str, rest: str) -> Key:
    # alt-x is ESC followed by x (the xterm "metaSendsEscape" convention tmux also uses).
    if len(rest) == 1 and " " < rest < "\x7f":
        return Key(f"alt-{rest}", b"\x1b" + rest.encode(), b"\x1b" + rest.encode(), f"M-{rest}")
    inner = key(rest)
    if inner.name.startswith("alt-"):
        raise UnknownKey(f"unknown key {raw!r}: alt- twice; {_hint()}")
    return Key(f"alt-{inner.name}", b"\x1b" + inner.normal, b"\x1b" + inner.application, f"M-{inner.tmux}")


def keys(names: str | Iterable[str]) -> list[Key]:
    """Resolve a comma-separated string or a list of names (all or nothing)."""
    if isinstance(names, str):
        items = [n for n in (part.strip() for part in names.split(",")) if n]
    else:
        items = list(names)
    if len(items) > MAX_KEYS:
        raise UnknownKey(f"too many keys in one input ({len(items)}): send at most {MAX_KEYS} at a time")
    return [key(n) for n in items]


# --------------------------------------------------------------------------- cursor-key mode


_MODE_RE = re.compile(rb"\x1b\[\?([0-9;]*)([hl])")
_ALT_MODES = frozenset({"47", "1047", "1049"})
#: Bytes kept between chunks so a mode sequence split by a read is still seen.
_CARRY = 16


class ModeTracker:
    """Follows DECCKM (``?1``) and the alternate screen (``?47/1047/1049``) in a byte stream.

    Cheap enough for the hot path: one C-level regex scan per chunk, plus a few carried bytes.
    """

    def __init__(self) -> None:
        self.app_cursor = False
        self.alternate = False
        self._carry = b""

    def feed(self, data: bytes) -> None:
        if b"\x1b[?" not in data and b"\x1b" not in self._carry:
            if data:
                self._carry = data[-_CARRY:]
            return
        chunk = self._carry + data
        end = 0
        for match in _MODE_RE.finditer(chunk):
            end = match.end()
            on = match.group(2) == b"h"
            for param in match.group(1).split(b";"):
                text = param.decode("ascii")
                if text == "1":
                    self.app_cursor = on
                elif text in _ALT_MODES:
                    self.alternate = on
        self._carry = chunk[max(end, len(chunk) - _CARRY):]

    def reset(self) -> None:
        self.app_cursor = False
        self.alternate = False
        self._carry = b""


def encode_keys(items: Sequence[Key], *, app_cursor: bool) -> bytes:
    """The bytes for ``items`` in the given cursor-key mode."""
    return b"".join(k.encode(app_cursor=app_cursor) for k in items)
