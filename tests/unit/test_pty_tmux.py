"""The tmux control-mode pieces that need no server: quoting, the octal command channel (checked
with the real /bin/sh printf the wrapper uses), reply parsing, and the PTY checks on input."""

from __future__ import annotations

import subprocess

import pytest

from carrier.jobs import pty, tmuxctl


@pytest.mark.parametrize(
    "text", ["ls -l", "echo 'it''s' \"$HOME\" `id` ; rm -rf / #", "é€ 中文\n\ttab", "%s %d \\n"])
def test_octal_roundtrip_through_sh_printf(text: str) -> None:
    # Exactly the bytes come back, including quotes, $, backslashes and % (no printf directives).
    done = subprocess.run(["/bin/sh", "-c", 'printf "$1"', "sh", tmuxctl.octal(text)],
                          capture_output=True, check=True)
    assert done.stdout == text.encode()
    assert set(tmuxctl.octal(text)) <= set("\\01234567")


def test_quote_for_tmux_parser() -> None:
    assert tmuxctl.quote("a b") == "'a b'"
    assert tmuxctl.quote("it's") == "'it'\\''s'"
    with pytest.raises(tmuxctl.TmuxError, match="control characters"):
        tmuxctl.quote("a\nb")


def test_socket_names_are_checked() -> None:
    assert "tmux -L carrier-x " in tmuxctl.bootstrap_command("carrier-x")
    with pytest.raises(tmuxctl.TmuxError, match="socket name"):
        tmuxctl.bootstrap_command("x; rm -rf /")


def test_parse_pane_info() -> None:
    info = tmuxctl.parse_pane_info("carrier:%3:@2:4242:1:7::80:24:")
    assert (info.pane, info.window, info.pid, info.dead) == ("%3", "@2", 4242, True)
    assert (info.status, info.signal) == (7, None)
    assert tmuxctl.parse_pane_info("carrier:%3:@2:1:1::9:80:24:").signal == 9
    assert tmuxctl.parse_pane_info("carrier:%3:@2:1:0:::80:24:130").ended == 130
    with pytest.raises(tmuxctl.TmuxError, match="unexpected reply"):
        tmuxctl.parse_pane_info("garbage")


def test_screen_rows_drops_a_stray_notification() -> None:
    rows = ["top - 10:00", "%window-renamed @1 top", "Tasks: 1"]
    assert tmuxctl.screen_rows(rows, 2) == ["top - 10:00", "Tasks: 1"]
    assert tmuxctl.screen_rows(["a  "], 3) == ["a", "", ""]


def test_status_from_shell_convention() -> None:
    assert pty.status_from_shell(0, via="exit").succeeded
    term = pty.status_from_shell(143, via="exit")
    assert (term.reason, term.signal, term.rc) == ("signal", 15, 143)
    assert "TERM" in term.message
    assert pty.status_from_shell(3, via="exit").code == 3


@pytest.mark.parametrize(("cols", "rows"), [(0, 40), (10000, 40), (80, 0), (80, 501), (9, 24), (True, 24)])
def test_size_bounds(cols: object, rows: object) -> None:
    with pytest.raises(pty.PtyError, match="must be a whole number from"):
        pty.check_size(cols, rows)


def test_spec_checks() -> None:
    with pytest.raises(pty.PtyError, match="invalid job id"):
        pty.PtySpec("../etc", "web1", ("ls",))
    with pytest.raises(pty.PtyError, match="TERM"):
        pty.PtySpec("j-aaaaaaaaaaaa", "web1", ("ls",), term="xterm; rm")
    with pytest.raises(pty.PtyError, match="list of arguments"):
        pty.PtySpec("j-aaaaaaaaaaaa", "web1", "ls; rm -rf /")
    with pytest.raises(pty.PtyError, match="mode must be"):
        pty.PtySpec("j-aaaaaaaaaaaa", "web1", ("ls",), mode="screen")
    spec = pty.PtySpec("j-aaaaaaaaaaaa", "web1", ("echo", "a b", "$x"))
    assert spec.text == "exec 'echo' 'a b' '$x'"


def test_signals() -> None:
    assert pty.check_signal("term") == ("TERM", 15)
    assert pty.check_signal("SIGINT")[0] == "INT"
    with pytest.raises(pty.PtyError, match="TERM, INT, KILL, HUP"):
        pty.check_signal("STOP")
