"""Named keys: bytes in both cursor-key modes, tmux names, aliases, bad names, and the mode tracker."""

from __future__ import annotations

import pytest

from carrier.jobs import keys as k
from carrier.jobs.errors import JobError


def test_arrows_follow_cursor_key_mode() -> None:
    up = k.key("up")
    assert up.encode(app_cursor=False) == b"\x1b[A"
    # ncurses with keypad() under xterm switches to application mode and expects ESC O A.
    assert up.encode(app_cursor=True) == b"\x1bOA"
    assert k.key("left").encode(app_cursor=True) == b"\x1bOD"
    assert k.key("home").encode(app_cursor=True) == b"\x1bOH"
    assert k.key("end").encode(app_cursor=False) == b"\x1b[F"
    # Keys outside DECCKM are the same in both modes.
    assert k.key("pgdn").encode(app_cursor=True) == k.key("pgdn").encode(app_cursor=False) == b"\x1b[6~"
    assert k.encode_keys(k.keys("down,down,enter"), app_cursor=True) == b"\x1bOB\x1bOB\r"


@pytest.mark.parametrize(
    ("name", "data", "tmux"),
    [
        ("enter", b"\r", "Enter"),
        ("tab", b"\t", "Tab"),
        ("esc", b"\x1b", "Escape"),
        ("backspace", b"\x7f", "BSpace"),
        ("pgup", b"\x1b[5~", "PPage"),
        ("f1", b"\x1bOP", "F1"),
        ("f5", b"\x1b[15~", "F5"),
        ("f12", b"\x1b[24~", "F12"),
        ("ctrl-a", b"\x01", "C-a"),
        ("ctrl-c", b"\x03", "C-c"),
        ("ctrl-z", b"\x1a", "C-z"),
        ("alt-x", b"\x1bx", "M-x"),
        ("alt-enter", b"\x1b\r", "M-Enter"),
    ],
)
def test_key_table(name: str, data: bytes, tmux: str) -> None:
    key = k.key(name)
    assert key.encode(app_cursor=False) == data
    assert key.tmux == tmux


def test_every_function_key_and_ctrl_letter_exists() -> None:
    assert len({k.key(f"f{i}").normal for i in range(1, 13)}) == 12
    letters = "abcdefghijklmnopqrstuvwxyz"
    assert [k.key(f"ctrl-{c}").normal for c in letters] == [bytes([i]) for i in range(1, 27)]


def test_aliases_case_and_separators() -> None:
    assert k.key("Return").name == "enter"
    assert k.key("ESCAPE").name == "esc"
    assert k.key("Ctrl+C").normal == b"\x03"
    assert k.key("C-x").normal == b"\x18"
    assert k.key("page_down").name == "pgdn"
    assert k.key("M-b").normal == b"\x1bb"


def test_unknown_key_names_the_known_ones() -> None:
    with pytest.raises(k.UnknownKey, match=r"unknown key 'upp'.*known keys: enter"):
        k.key("upp")
    with pytest.raises(JobError, match="ctrl- goes with a letter"):
        k.key("ctrl-1")
    with pytest.raises(k.UnknownKey, match="alt- twice"):
        k.key("alt-alt-x")
    with pytest.raises(k.UnknownKey, match="non-empty"):
        k.key("")
    # A list is all or nothing: one bad name refuses the whole input.
    with pytest.raises(k.UnknownKey, match="'bogus'"):
        k.keys(["up", "bogus"])


def test_too_many_keys() -> None:
    with pytest.raises(k.UnknownKey, match="at most"):
        k.keys(["up"] * (k.MAX_KEYS + 1))


def test_mode_tracker_follows_decckm_and_alternate_screen() -> None:
    tracker = k.ModeTracker()
    tracker.feed(b"hello \x1b[?1049h\x1b[22;0;0t\x1b[?1h\x1b=")  # what vim/less send on start (smcup, smkx)
    assert tracker.app_cursor and tracker.alternate
    tracker.feed(b"\x1b[?1l\x1b>")
    assert not tracker.app_cursor and tracker.alternate
    tracker.feed(b"\x1b[?1049l")
    assert not tracker.alternate
    tracker.feed(b"\x1b[?1;1049h")  # several modes in one sequence
    assert tracker.app_cursor and tracker.alternate


def test_mode_tracker_sees_a_sequence_split_across_reads() -> None:
    tracker = k.ModeTracker()
    tracker.feed(b"x" * 1000 + b"\x1b[")
    tracker.feed(b"?1")
    assert not tracker.app_cursor
    tracker.feed(b"h more text")
    assert tracker.app_cursor
    # A sequence seen once is not applied twice from the carried bytes.
    tracker.feed(b"\x1b[?1l")
    tracker.feed(b"plain")
    assert not tracker.app_cursor
