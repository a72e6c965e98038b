"""PTY jobs on this machine (``localhost``): a real local PTY, and a real local tmux server. No
sandbox needed: keys in both cursor-key modes, resize and SIGWINCH, signals with exact statuses,
output cursors and UTF-8, waits, bad input, no zombies, and for tmux: the output of a program that
exits at once is complete (the drain handshake), and a new runner finds a job again by id."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pty_support import LOCAL, kill_tmux_server, until, zombie_children

from carrier.jobs.keys import UnknownKey
from carrier.jobs.pty import PtyError, PtyJob, PtyRunner, PtySpec

SOCKET = f"carrier-test-{os.getpid()}"
_ids = iter(f"j-pytest{n:06d}".replace("0", "a").replace("1", "b").replace("8", "c").replace("9", "d")
            for n in range(100000))


def new_id() -> str:
    return next(_ids)


@pytest.fixture()
def runner() -> Iterator[PtyRunner]:
    r = PtyRunner(None, tmux_socket=SOCKET, memory_bytes=64 * 1024, disk_bytes=256 * 1024)
    yield r
    r.close()


@pytest.fixture(scope="module", autouse=True)
def _tmux_cleanup() -> Iterator[None]:
    yield
    kill_tmux_server(SOCKET)


def start(runner: PtyRunner, tmp_path: Path, command: str | list[str], *, mode: str = "auto",
          cols: int = 80, rows: int = 24) -> PtyJob:
    job_id = new_id()
    shell = isinstance(command, str)
    spec = PtySpec(job_id, "localhost", command if shell else tuple(command), shell=shell, mode=mode,
                   cols=cols, rows=rows)
    return runner.start(spec, LOCAL, tmp_path / job_id)


READ_KEYS = textwrap.dedent("""
    import os, sys, termios, tty
    if sys.argv[1] == "app":
        sys.stdout.write("\\x1b[?1h\\x1b=")
    tty.setraw(0)  # before "ready": setraw flushes pending input
    sys.stdout.write("ready\\r\\n"); sys.stdout.flush()
    data = os.read(0, 64)
    sys.stdout.write("got:" + data.hex() + "\\r\\n"); sys.stdout.flush()
""")


@pytest.mark.parametrize(("mode", "expected"), [("app", "1b4f41"), ("normal", "1b5b41")])
def test_arrow_keys_follow_the_programs_cursor_key_mode(runner: PtyRunner, tmp_path: Path,
                                                         mode: str, expected: str) -> None:
    job = start(runner, tmp_path, [sys.executable, "-c", READ_KEYS, mode])
    assert job.wait("ready", timeout=10).reason == "match"
    job.input(keys=["up"])
    found = job.wait(r"got:[0-9a-f]+", timeout=10)
    assert found.match == f"got:{expected}"
    assert job.wait_exit(10) is not None and job.exit is not None and job.exit.succeeded


def test_text_keys_exit_status_and_output(runner: PtyRunner, tmp_path: Path) -> None:
    job = start(runner, tmp_path, "echo TERM=$TERM; stty size; read x; echo got:$x; exit 3")
    assert job.mode == "local"
    assert job.wait("24 80", timeout=10).where in ("output", "screen")
    cursor = job.input("héllo", ["enter"])
    found = job.wait("got:.*", timeout=10, since=cursor)
    assert found.match == "got:héllo"
    info = job.wait_exit(10)
    assert info is not None and (info.reason, info.code) == ("exited", 3)
    out = job.output(0)
    assert out.done
    text = out.text()
    assert "TERM=xterm-256color" in text and "24 80" in text and "got:héllo" in text
    screen = job.screen()
    assert "got:héllo" in screen.text and screen.source == "pyte"


def test_resize_reaches_the_program(runner: PtyRunner, tmp_path: Path) -> None:
    job = start(runner, tmp_path, "trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done")
    assert job.wait("ready", timeout=10).reason == "match"
    cursor = job.output(0).next_cursor
    job.resize(100, 30)
    assert job.wait(r"30 100", timeout=10, since=cursor).reason == "match"
    assert job.screen().cols == 100
    job.kill("KILL")
    job.wait_exit(10)


@pytest.mark.parametrize("signal", ["TERM", "INT", "HUP", "KILL"])
def test_kill_with_each_signal_is_recorded_exactly(runner: PtyRunner, tmp_path: Path, signal: str) -> None:
    job = start(runner, tmp_path, ["sleep", "300"])
    job.kill(signal)
    info = job.wait_exit(10)
    assert info is not None and info.reason == "signal"
    assert info.to_dict()["signal_name"] == signal


def test_output_chunks_never_split_a_character(runner: PtyRunner, tmp_path: Path) -> None:
    job = start(runner, tmp_path,
                "i=0; while [ $i -lt 300 ]; do printf 'é€中'; i=$((i+1)); done; echo; echo END")
    job.wait_exit(10)
    cursor, pieces = 0, []
    while True:
        chunk = job.output(cursor, 7)  # 7 bytes: lands inside characters all the time
        if not chunk.data:
            break
        pieces.append(chunk.data.decode("utf-8"))  # strict: raises on a split character
        cursor = chunk.next_cursor
    text = "".join(pieces)
    assert text.count("é€中") == 300 and text.rstrip().endswith("END")


def test_waits_say_why_they_returned(runner: PtyRunner, tmp_path: Path) -> None:
    job = start(runner, tmp_path, "echo hi; sleep 1; echo bye")
    assert job.wait("nothing-like-this", timeout=0.3).reason == "timeout"
    assert job.wait(idle_ms=200, since=job.log.end).reason == "idle"
    done = job.wait("never", timeout=10)
    assert done.reason == "exit" and done.exit is not None and done.exit.succeeded


def test_bad_input_is_refused_clearly(runner: PtyRunner, tmp_path: Path) -> None:
    job = start(runner, tmp_path, ["cat"])
    with pytest.raises(UnknownKey, match="unknown key 'upp'"):
        job.input(keys=["upp"])
    for cols, rows in ((0, 24), (10000, 24), (80, 1000)):
        with pytest.raises(PtyError, match="must be a whole number from"):
            job.resize(cols, rows)
    with pytest.raises(PtyError, match="not a valid regular expression"):
        job.wait("([", timeout=1)
    with pytest.raises(PtyError, match="nothing to send"):
        job.input()
    with pytest.raises(PtyError, match="signal must be one of"):
        job.kill("STOP")
    job.input(keys=["ctrl-d"])
    assert job.wait_exit(10) is not None
    with pytest.raises(PtyError, match=r"has ended.*input goes only to a running job"):
        job.input("more")
    with pytest.raises(PtyError, match="has ended"):
        job.resize(100, 30)


def test_no_zombies_after_many_jobs(runner: PtyRunner, tmp_path: Path) -> None:
    jobs = [start(runner, tmp_path, cmd) for cmd in (["true"], ["false"], ["sleep", "100"], "exit 7")]
    jobs[2].kill("KILL")
    for job in jobs:
        assert job.wait_exit(10) is not None
    until(lambda: not zombie_children(), 5, "children reaped")
    assert zombie_children() == []


def test_memory_stays_bounded_under_lots_of_output(runner: PtyRunner, tmp_path: Path) -> None:
    job = start(runner, tmp_path, "seq 1 400000")  # ~2.7 MB
    info = job.wait_exit(60)
    assert info is not None and info.succeeded
    assert job.log.end > 2_500_000
    assert len(job.log._ring) == 64 * 1024  # the ring never grows
    disk = sum(p.stat().st_size for p in (tmp_path / job.job_id / "output").iterdir())
    assert disk <= 256 * 1024 + job.log.segment_bytes
    tail = job.output(job.log.end - 20).text()
    assert tail.endswith("400000\r\n")
    first = job.output(0, 100)
    assert first.dropped > 0 and first.start == first.dropped
    assert "400000" in job.screen().text  # rendered from the newest bytes only


# --------------------------------------------------------------------------- local tmux


def test_tmux_output_is_complete_when_the_program_exits_at_once(runner: PtyRunner, tmp_path: Path) -> None:
    # tmux 3.3 drops a dead pane's unsent output: the wrapper's end marker makes us wait for it.
    job = start(runner, tmp_path, "seq 1 20000; exit 4", mode="tmux")
    assert job.mode == "tmux"
    info = job.wait_exit(30)
    assert info is not None and (info.reason, info.code) == ("exited", 4)
    data = job.output(0, 1 << 20).text()
    numbers = data.split()
    assert numbers[0] == "1" and numbers[-1] == "20000" and len(numbers) == 20000
    assert "carrier-exit" not in data  # the marker is not part of the output
    assert "20000" in job.screen().text


def test_tmux_output_ending_in_a_lone_escape_is_not_held_back(runner: PtyRunner, tmp_path: Path) -> None:
    # A trailing ESC could start the end marker: it is held back only for a moment.
    job = start(runner, tmp_path, "printf 'abc\\033'; exec sleep 30", mode="tmux")
    until(lambda: job.output(0).data == b"abc\x1b", 5, "the ESC in the output")
    job.kill("KILL")
    assert job.wait_exit(10) is not None


def test_tmux_job_keys_screen_resize_and_signals(runner: PtyRunner, tmp_path: Path) -> None:
    job = start(runner, tmp_path, [sys.executable, "-c", READ_KEYS, "app"], mode="tmux")
    assert job.wait("ready", timeout=10).reason == "match"
    job.input(keys=["up"])
    assert job.wait(r"got:[0-9a-f]+", timeout=10).match == "got:1b4f41"  # tmux followed the pane's mode
    assert job.wait_exit(10) is not None
    job2 = start(runner, tmp_path, "trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done",
                 mode="tmux")
    assert job2.wait("ready", timeout=10).reason == "match"
    job2.resize(100, 30)
    assert job2.wait("30 100", timeout=10).reason == "match"
    screen = job2.screen()
    assert (screen.cols, screen.lines, screen.source) == (100, 30, "tmux")
    job2.kill("KILL")
    info = job2.wait_exit(10)
    assert info is not None and info.reason == "signal" and info.signal == 9


def test_tmux_job_is_found_again_by_a_new_runner(tmp_path: Path) -> None:
    first = PtyRunner(None, tmux_socket=SOCKET)
    job = start(first, tmp_path, "while read l; do echo got:$l; done", mode="tmux")
    job.input("one", ["enter"])
    assert job.wait("got:one", timeout=10).reason == "match"
    job.detach()
    first.close()
    # A new runner (as after a Carrier restart) re-attaches by job id and keeps driving it.
    second = PtyRunner(None, tmux_socket=SOCKET)
    try:
        again = second.reattach(job.job_id, LOCAL, tmp_path / job.job_id)
        cursor = again.input("two", ["enter"])
        assert again.wait("got:two", timeout=10, since=cursor).reason == "match"
        assert "got:one" in again.screen().text
        again.input(keys=["ctrl-d"])
        info = again.wait_exit(10)
        assert info is not None and info.succeeded
        out = again.output(0).text()
        assert "got:one" in out and "got:two" in out
    finally:
        second.close()
    with pytest.raises(PtyError, match="ses"):
        PtyRunner(None, tmux_socket=SOCKET).reattach(job.job_id, LOCAL, tmp_path / job.job_id)


# --------------------------------------------------------------------------- auto_sudo


#: A stand-in for sudo's prompt loop: asks, reads without echo, says "Sorry" on a wrong answer.
FAKE_SUDO = textwrap.dedent("""
    import getpass, sys
    echo = "[sudo] password for carrier-sbx: is what sudo asks"
    print(echo, flush=True)  # the prompt's words mid-line: not a prompt, nothing is typed
    for attempt in range(3):
        got = getpass.getpass("[sudo] password for carrier-sbx: ")
        if got == sys.argv[1]:
            print("SUDO-OK", flush=True)
            sys.exit(0)
        print("Sorry, try again.", flush=True)
    print("3 incorrect password attempts", flush=True)
    sys.exit(1)
""")


@pytest.mark.parametrize("mode", ["plain", "tmux"])
def test_auto_sudo_answers_the_prompt_once_and_masks_it(runner: PtyRunner, tmp_path: Path, mode: str) -> None:
    secret = "s3cret-Pa55"
    job = start(runner, tmp_path, [sys.executable, "-c", FAKE_SUDO, secret], mode=mode)
    answers: list[int] = []
    job.auto_sudo(secret, answers.append)
    info = job.wait_exit(20)
    assert info is not None and info.succeeded, job.output(0).text()
    until(lambda: answers == [1], 5)
    assert "SUDO-OK" in job.output(0).text() and secret not in job.output(0).text()


@pytest.mark.parametrize("mode", ["plain", "tmux"])
def test_auto_sudo_types_a_wrong_secret_only_once(runner: PtyRunner, tmp_path: Path, mode: str) -> None:
    job = start(runner, tmp_path, [sys.executable, "-c", FAKE_SUDO, "the-right-one"], mode=mode)
    answers: list[int] = []
    job.auto_sudo("a-wrong-one", answers.append)
    # sudo asks again after "Sorry": the same secret is not typed twice, the prompt waits for a person.
    assert job.wait(r"Sorry, try again\.", timeout=20).reason == "match"
    until(lambda: job.output(0).text().count("password for carrier-sbx:") >= 3, 10, "the second prompt")
    time.sleep(0.5)  # room for a wrong second answer, which `answers` would then show
    job.input("the-right-one", ["enter"])
    info = job.wait_exit(20)
    assert info is not None and info.succeeded, job.output(0).text()
    assert answers == [1]
