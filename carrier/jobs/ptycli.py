"""CLI for PTY jobs, for people: ``carrier job start|input|screen|attach``.

Each goes through the operations layer as the local user (decided and audited). The lead adds
them to the ``job`` group::

    from carrier.jobs import ptycli
    for command in ptycli.COMMANDS:
        job_group.add_command(command)

A tmux-backed job outlives the command that started it: ``start`` prints the first screen and
returns, and later commands find the job by id (taking over its supervision when no Carrier watches
it, or driving it through tmux when ``carrier serve`` does). A job without tmux lives only as long
as the process that runs it, so ``start`` stays with it (attached on a terminal, printing its output
otherwise).

``attach`` puts your terminal on the job: raw mode, its output as it comes, every key passed
through, the job resized to your terminal; the detach key (default Ctrl-]) leaves the job running.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from carrier.clikit import CliOps, open_ops
from carrier.clikit import config_option as _config_option
from carrier.clikit import friendly as _friendly
from carrier.errors import CarrierError
from carrier.jobs import keys as keymod
from carrier.jobs.cli import EXIT_FAILED, _json_option
from carrier.jobs.screen import ScreenView
from carrier.ops import DEFAULT_COLS, DEFAULT_ROWS, DEFAULT_TERM, MAX_COLS, MAX_ROWS, MIN_COLS, MIN_ROWS
from carrier.ops.service import Watch

SETTLE_MS = 300


@contextlib.contextmanager
def _doors(config_path: Path | None) -> Iterator[CliOps]:
    with open_ops(config_path) as cli:
        yield cli


def _print_screen(screen: ScreenView, *, as_json: bool, framed: bool = True) -> None:
    if as_json:
        click.echo(json.dumps(screen.to_dict(), indent=2))
    elif framed:
        click.echo(screen.framed())
    else:
        click.echo(screen.text)


def _settle(watch: Watch, since: int | None = None) -> None:
    """Wait until output pauses (the program has drawn), at most 5 s."""
    watch.pty_wait(idle_ms=SETTLE_MS, timeout=5.0, since=since)


# --------------------------------------------------------------------------- start


@click.command("start", context_settings={"ignore_unknown_options": True})
@_config_option
@click.option("--shell", is_flag=True, help="Give the command to the remote shell as one string.")
@click.option("--term", default=DEFAULT_TERM, show_default=True, help="TERM for the program.")
@click.option("--cols", type=click.IntRange(MIN_COLS, MAX_COLS), default=None,
              help=f"Columns (default: this terminal's, else {DEFAULT_COLS}).")
@click.option("--rows", type=click.IntRange(MIN_ROWS, MAX_ROWS), default=None,
              help=f"Rows (default: this terminal's, else {DEFAULT_ROWS}).")
@click.option("--mode", type=click.Choice(["auto", "tmux", "plain"]), default="auto", show_default=True,
              help="tmux: survives Carrier restarts; plain: ssh -tt only.")
@click.option("--attach", "attach_now", is_flag=True, help="Put this terminal on the job at once.")
@_json_option
@click.argument("host")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_friendly
def start_command(config_path: Path | None, shell: bool, term: str, cols: int | None, rows: int | None,
                  mode: str, attach_now: bool, as_json: bool, host: str, command: tuple[str, ...]) -> None:
    """Start COMMAND in a terminal on HOST: carrier job start web1 -- top."""
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("give the command after --: carrier job start HOST -- CMD [ARGS...]")
    size = shutil.get_terminal_size((DEFAULT_COLS, DEFAULT_ROWS)) if sys.stdout.isatty() else None
    cols = cols or (_clamp(size.columns, MIN_COLS, MAX_COLS) if size else DEFAULT_COLS)
    rows = rows or (_clamp(size.lines, MIN_ROWS, MAX_ROWS) if size else DEFAULT_ROWS)
    with _doors(config_path) as cli:
        cmd: list[str] | str = " ".join(argv) if shell else argv
        view = cli.ops.pty_start(cli.who, host, cmd, shell=shell, term=term, cols=cols, rows=rows, mode=mode)
        watch = cli.ops.own_watch(cli.who, view)
        live = None
        if not watch.get().done:
            with contextlib.suppress(CarrierError):  # queued: it has no terminal yet
                live = watch.handle()
        if live is None and watch.get().done:
            _follow_output(watch)  # it ended already: its output and how it ended
            return
        if live is None:
            click.echo(f"{view.id} {view.status}: {view.message or 'waiting for a free slot'}", err=True)
            return
        if attach_now or (live.mode != "tmux" and sys.stdin.isatty()):
            _attach(cli, view.id)
            return
        if live.mode != "tmux":
            # Without tmux the job lives as long as this process: follow it to its end.
            click.echo(f"== {view.id} on {host} (no tmux: it ends when this command does)", err=True)
            _follow_output(watch)
            return
        _settle(watch, since=0)
        if as_json:
            click.echo(json.dumps({"job": watch.get().to_dict(), "screen": watch.screen().to_dict()},
                                  indent=2, default=str))
            return
        click.echo(f"{view.id} running on {host} (tmux): drive it with `carrier job input {view.id} ...`, "
                   f"`carrier job attach {view.id}`")
        _print_screen(watch.screen(), as_json=False)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _follow_output(watch: Watch) -> None:
    cursor = 0
    out = sys.stdout.buffer
    while True:
        read = watch.pty_output(cursor)
        if read.data:
            out.write(read.data)
            out.flush()
            cursor = read.next_cursor
            continue
        if read.done:
            break
        watch.pty_wait(idle_ms=50, timeout=1.0, since=cursor)
    view = watch.wait(timeout=10)
    click.echo(f"\n{view.id} {view.message}", err=True)
    if view.status != "succeeded":
        sys.exit(EXIT_FAILED)


# --------------------------------------------------------------------------- input / screen


@click.command("input")
@_config_option
@click.option("--keys", "key_names", default="", help="Named keys after the text, e.g. up,up,enter.")
@click.option("--no-screen", is_flag=True, help="Do not print the screen afterwards.")
@_json_option
@click.argument("job_id")
@click.argument("text", required=False, default="")
@_friendly
def input_command(config_path: Path | None, key_names: str, no_screen: bool, as_json: bool, job_id: str,
                  text: str) -> None:
    """Type TEXT into JOB_ID, then press --keys; print the screen once it settles."""
    keys = keymod.keys(key_names) if key_names else []  # refuse a bad key name before anything runs
    with _doors(config_path) as cli:
        cursor = cli.ops.pty_input(cli.who, job_id, text, [k.name for k in keys])
        if no_screen:
            return
        watch = cli.ops.watch(cli.who, job_id)
        _settle(watch, since=cursor)
        _print_screen(watch.screen(), as_json=as_json)


@click.command("screen")
@_config_option
@click.option("--plain", is_flag=True, help="Rows only, without the frame.")
@_json_option
@click.argument("job_id")
@_friendly
def screen_command(config_path: Path | None, plain: bool, as_json: bool, job_id: str) -> None:
    """What JOB_ID's terminal shows now (its last screen, for a finished job)."""
    with _doors(config_path) as cli:
        _, screen = cli.ops.pty_screen(cli.who, job_id)
        _print_screen(screen, as_json=as_json, framed=not plain)


# --------------------------------------------------------------------------- attach


@click.command("attach")
@_config_option
@click.option("--detach-key", default="ctrl-]", show_default=True,
              help="The key that leaves the job running.")
@click.option("--no-resize", is_flag=True, help="Keep the job's size (do not follow this terminal's).")
@click.argument("job_id")
@_friendly
def attach_command(config_path: Path | None, detach_key: str, no_resize: bool, job_id: str) -> None:
    """Put this terminal on JOB_ID (raw mode; the detach key leaves the job running)."""
    key = keymod.key(detach_key)
    if len(key.normal) != 1:
        raise click.UsageError("the detach key must be a single-byte key such as ctrl-] or ctrl-q")
    with _doors(config_path) as cli:
        _attach(cli, job_id, detach=key.normal, resize=not no_resize)


def _attach(cli: CliOps, job_id: str, *, detach: bytes = b"\x1d", resize: bool = True) -> None:
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.buffer
    if not os.isatty(stdin):
        raise click.UsageError("attach needs a terminal on stdin (use `carrier job input` from scripts)")
    job = cli.ops.pty_handle(cli.who, job_id)
    watch = cli.ops.watch(cli.who, job_id)
    if job is None:
        view = watch.get()
        raise click.UsageError(f"job {job_id} has ended ({view.status}): `carrier job screen {job_id}` "
                               "shows its last screen")

    def follow_size(*_: Any) -> None:
        size = shutil.get_terminal_size()
        with contextlib.suppress(Exception):
            job.resize(_clamp(size.columns, MIN_COLS, MAX_COLS), _clamp(size.lines, MIN_ROWS, MAX_ROWS))

    saved = termios.tcgetattr(stdin)
    old_winch = signal.getsignal(signal.SIGWINCH)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    cursor = job.log.end
    try:
        tty.setraw(stdin)
        # Start from what the terminal shows now; a resize makes full-screen programs redraw.
        screen = job.screen()
        stdout.write(b"\x1b[H\x1b[2J" + "\r\n".join(screen.rows).encode("utf-8")
                     + f"\x1b[{screen.cursor_y + 1};{screen.cursor_x + 1}H".encode())
        stdout.flush()
        if resize:
            signal.signal(signal.SIGWINCH, follow_size)
            follow_size()
        while True:
            read = job.output(cursor)
            if read.data:
                stdout.write(read.data)
                stdout.flush()
                cursor = read.next_cursor
            elif read.done:
                break
            ready, _, _ = select.select([stdin], [], [], 0.02 if not read.data else 0)
            if not ready:
                continue
            data = os.read(stdin, 4096)
            if not data:
                break
            if detach in data:
                before = data.split(detach, 1)[0]
                if before:
                    job.input(decoder.decode(before))
                stdout.write(f"\r\n[detached from {job_id}; it keeps running]\r\n".encode())
                return
            job.input(decoder.decode(data))
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        stdout.flush()
    view = watch.wait(timeout=10)
    click.echo(f"\r\n[{job_id} {view.message}]", err=True)
    if view.status != "succeeded":
        sys.exit(EXIT_FAILED)


COMMANDS = (start_command, input_command, screen_command, attach_command)


@click.group("pty")
def pty_group() -> None:
    """The PTY commands as one group (tests and ``python -m carrier.jobs.ptycli``)."""


for _command in COMMANDS:
    pty_group.add_command(_command)

if __name__ == "__main__":
    pty_group()
