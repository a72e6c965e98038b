"""Screens: the pyte renderer with the alternate screen, the lazy catch-up from an output log, and
plain text from terminal output for pattern waits."""

from __future__ import annotations

from pathlib import Path

from carrier.jobs.ptylog import OutputLog
from carrier.jobs.screen import AnsiText, LazyScreen, ScreenView, render_bytes


def test_render_rows_and_cursor() -> None:
    view = render_bytes(b"hello\r\nworld\x1b[3;5Hx", 20, 5)
    assert view.rows[:3] == ("hello", "world", "    x")
    assert (view.cursor_x, view.cursor_y) == (5, 2)
    assert view.text == "hello\nworld\n    x"
    assert view.source == "pyte" and view.cols == 20 and view.lines == 5


def test_alternate_screen_restores_the_shell_screen() -> None:
    data = b"$ vim\r\n\x1b[?1049h\x1b[H\x1b[2Jfull screen app"
    view = render_bytes(data, 30, 6)
    assert view.alternate
    assert view.rows[0] == "full screen app"
    view = render_bytes(data + b"\x1b[?1049l$ ", 30, 6)
    assert not view.alternate
    assert view.rows[0] == "$ vim"
    assert "full screen app" not in view.text


def test_application_cursor_mode_is_reported() -> None:
    assert render_bytes(b"\x1b[?1h", 20, 5).app_cursor
    assert not render_bytes(b"\x1b[?1h\x1b[?1l", 20, 5).app_cursor


def test_utf8_split_across_feeds(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    data = "héllo wörld €".encode()
    for i in range(len(data)):  # one byte at a time: every character is split
        log.append(data[i:i + 1])
    lazy = LazyScreen(30, 5, _reader(log))
    assert lazy.snapshot(log.end, app_cursor=False).rows[0] == "héllo wörld €"


def _reader(log: OutputLog):  # type: ignore[no-untyped-def]
    def read(since: int, limit: int) -> tuple[bytes, int, int]:
        chunk = log.read(since, limit)
        return chunk.data, chunk.next_cursor, chunk.dropped
    return read


def test_lazy_screen_catches_up_only_when_asked(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    lazy = LazyScreen(40, 5, _reader(log))
    log.append(b"first\r\n")
    assert lazy.snapshot(log.end, app_cursor=False).rows[0] == "first"
    log.append(b"second\r\n")
    view = lazy.snapshot(log.end, app_cursor=False)
    assert view.rows[:2] == ("first", "second")


def test_lazy_screen_restarts_from_the_newest_bytes(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", memory_bytes=4096, disk_bytes=8192)
    lazy = LazyScreen(40, 5, _reader(log), catchup_max=2048)
    for i in range(5000):
        log.append(f"line {i}\r\n".encode())
    view = lazy.snapshot(log.end, app_cursor=False)
    # Only the newest bytes were rendered, and they make the right last screen.
    assert view.rows[3] == "line 4999"
    assert view.rows[0] == "line 4996"


def test_framed_screen() -> None:
    view = ScreenView(("ab", "c"), 4, 2, 0, 0, False, False, "pyte")
    assert view.framed() == "+----+\n|ab  |\n|c   |\n+----+"
    assert view.to_dict()["text"] == "ab\nc"


def test_ansi_text_strips_escapes_split_across_chunks() -> None:
    text = AnsiText()
    out = text.feed(b"\x1b[1;3") + text.feed(b"2mred\x1b[0m pl")
    out += text.feed(b"ain\r\n\x1b]0;title\x07ok \xc3")
    out += text.feed(b"\xa9")
    assert out == "red plain\nok é"


def test_ansi_text_keeps_going_after_a_broken_escape() -> None:
    text = AnsiText()
    out = text.feed(b"a\x1b" + b"z" * 300)
    assert out.startswith("a") and out.endswith("z")
