"""Raw output of tmux-backed PTY jobs (``pty.tmux_output: pipe``).

tmux control mode hands out a pane's bytes as ``%output`` lines with every byte below 32
octal-escaped, which costs the host's tmux server more CPU than the program's own output. With
``pipe``, tmux still runs the job (durability, ``capture-pane`` screens, ``send-keys`` input,
exit status), but the job's bytes take another way:

- ``tmux pipe-pane -O`` appends everything the pane prints to ``$HOME/.carrier-pty/<job>.out`` on the
  host (the directory 0700 and owned by the login user, the file 0600; the job id is checked
  before it is put into any path or command). It is set on the idle placeholder pane before the
  program is spawned (it survives ``respawn-pane``), so no byte of the program is missed.
- One ssh channel per job (``READER``) tails that file from a byte offset (GNU ``tail -c +N -f
  --pid``) and Carrier reads the raw bytes. The offset read so far is kept in the job's directory
  (``pipe.offset``), so a re-attach after a restart resumes at the exact byte: no loss, no repeat.
- The file does not grow without bound on the host's disk: what Carrier has read and kept is
  punched out (``fallocate --punch-hole``, sent on the reader's stdin every ``PUNCH_EVERY`` bytes);
  offsets stay valid, only the blocks are freed. A host whose file system or ``fallocate``
  cannot punch holes gets control mode for that job instead. A FIFO would need no space but loses
  whatever the program prints while no Carrier reads (a restart) and blocks tmux's pipe when
  nobody reads, so the file is the durable choice.
- When the job ends, Carrier removes the file (``cleanup_script``, run on the host by tmux).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from carrier.jobs.ptybase import PtyError, check_id
from carrier.jobs.ptyoutputs import DEFAULT_OUTPUT, OUTPUTS

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OUTPUT", "OUTPUTS", "PipeReader", "check_output"]

#: Pipe readers (ssh channels) per host at most; further jobs use control mode (sshd's MaxSessions
#: is 10 per connection by default, shared with the control channel, exec jobs and ansible).
MAX_PIPES_PER_HOST = 6
#: Read bytes are punched out of the host's file after this many more (and at the end).
PUNCH_EVERY = 32 << 20
HEADER_TIMEOUT = 20.0
OFFSET_FILE = "pipe.offset"
_HEADER = b"carrier-pipe "
_READ = 262144

#: ``sh -c READER carrier-pty <job> <offset>``: prepares the file (first line: ``carrier-pipe ok
#: <usable 0|1>``, 1 when hole punching and GNU tail work here, or ``carrier-pipe error <why>``),
#: waits for ``go`` on stdin (``drop`` removes the file), then becomes ``tail`` from byte
#: ``offset``; further stdin lines ``punch <n>`` free the first n bytes. tail ends once the pipe's
#: writer (``cat``, see ``pipe_command``) has ended and everything is sent; the channel then closes.
READER = (
    'd="$HOME/.carrier-pty"; f="$d/$1.out"; w="$d/$1.wpid"; umask 077; '
    'mkdir -p "$d" 2>/dev/null; '
    'if [ -h "$d" ] || [ ! -d "$d" ] || [ ! -O "$d" ] || ! chmod 700 "$d" 2>/dev/null; then '
    'echo "carrier-pipe error $d is not a directory of this user"; exit 4; fi; '
    'if [ -h "$f" ] || { [ -e "$f" ] && [ ! -O "$f" ]; }; then '
    'echo "carrier-pipe error $f is not a file of this user"; exit 4; fi; '
    'if [ "$2" != 0 ] && [ ! -f "$f" ]; then echo "carrier-pipe error $f is gone"; exit 4; fi; '
    '[ -e "$f" ] || : >"$f" || { echo "carrier-pipe error cannot create $f"; exit 4; }; '
    # Can this file system punch holes (asked of a probe file beside it, never of the output), and
    # is this a tail with --pid and -s (GNU coreutils)? Else the job uses control mode.
    'p=0; t="$d/$1.probe"; : >"$t" && command -v fallocate >/dev/null 2>&1 && '
    'fallocate -p -o 0 -l 4096 "$t" 2>/dev/null && '
    'tail -c +1 -s 0.2 --pid=$$ "$t" >/dev/null 2>&1 && p=1; rm -f "$t"; '
    'echo "carrier-pipe ok $p"; '
    'read -r go || exit 0; '
    'if [ "$go" != go ]; then rm -f "$f" "$w"; exit 0; fi; '
    'i=0; while [ ! -s "$w" ]; do i=$((i+1)); [ "$i" -le 300 ] || exit 5; sleep 0.05; done; '
    'exec 3<&0; '
    '{ while read -r c n <&3; do [ "$c" = punch ] && fallocate -p -o 0 -l "$n" "$f" 2>/dev/null; done; '
    'kill "$$" 2>/dev/null; } >/dev/null 2>&1 & '
    'exec tail -c "+$(($2 + 1))" -s 0.2 --pid="$(cat "$w")" -f "$f" 2>/dev/null'
)


def check_output(value: object) -> str:
    if value not in OUTPUTS:
        raise PtyError(f"tmux_output must be one of {', '.join(OUTPUTS)}, got {value!r}")
    return str(value)


def pipe_command(job_id: str) -> str:
    """The shell command tmux's ``pipe-pane -O`` runs: note its pid (for ``tail --pid``), append."""
    jid = check_id(job_id)
    return (f'umask 077; d="$HOME/.carrier-pty"; echo $$ >"$d/{jid}.wpid.tmp" && '
            f'mv -f "$d/{jid}.wpid.tmp" "$d/{jid}.wpid"; exec cat >>"$d/{jid}.out"')


def cleanup_script(job_id: str) -> str:
    """Removes a job's pipe files on the host (run when the job has ended)."""
    jid = check_id(job_id)
    return f'rm -f "$HOME/.carrier-pty/{jid}.out" "$HOME/.carrier-pty/{jid}.wpid"'


def reader_command(job_id: str, offset: int) -> str:
    jid = check_id(job_id)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise PtyError(f"pipe offset must be a whole number >= 0, got {offset!r}")
    return shlex.join(["sh", "-c", READER, "carrier-pty", jid, str(offset)])


@dataclass(frozen=True, slots=True)
class Header:
    ok: bool
    punch: bool
    detail: str


def parse_header(line: bytes) -> Header:
    """The reader's first line (``carrier-pipe ok 1`` / ``carrier-pipe error <why>``)."""
    text = line.decode("utf-8", "replace").strip()
    parts = text.split(" ", 2)
    if len(parts) >= 2 and parts[0] == "carrier-pipe":
        if parts[1] == "ok" and len(parts) == 3 and parts[2] in ("0", "1"):
            return Header(True, parts[2] == "1", "")
        if parts[1] == "error":
            return Header(False, False, parts[2] if len(parts) == 3 else "no detail")
    return Header(False, False, f"unexpected reply {text[:80]!r}")


# --------------------------------------------------------------------------- offsets


@dataclass(frozen=True, slots=True)
class PipeOffset:
    """``host``: bytes of the host's file taken into the log; ``log``: the log's end at that moment."""

    host: int
    log: int


_RECORD = 48


def format_offset(offset: PipeOffset) -> bytes:
    return f"{offset.host} {offset.log}".encode().ljust(_RECORD - 1) + b"\n"


def parse_offset(data: bytes) -> PipeOffset | None:
    parts = data.decode("ascii", "replace").split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return PipeOffset(int(parts[0]), int(parts[1]))


def resume_at(saved: PipeOffset | None, log_end: int) -> int:
    """Where the host's file is read from after a restart: the saved host offset plus whatever
    reached the log after it was saved (a crash between the two writes)."""
    if saved is None:
        return 0
    return saved.host + max(0, log_end - saved.log)


class OffsetFile:
    """``pipe.offset`` in the job's directory: one fixed-size record, rewritten in place."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / OFFSET_FILE
        self._fd: int | None = None

    def load(self) -> PipeOffset | None:
        try:
            return parse_offset(self.path.read_bytes())
        except OSError:
            return None

    def save(self, offset: PipeOffset) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.pwrite(self._fd, format_offset(offset), 0)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- the reader


class PipeReader:
    """One job's reader channel: ``open`` starts it and reads the header; ``go`` starts the
    stream (``sink(data)`` per chunk on a thread of its own, ``on_end()`` once it closes)."""

    def __init__(self, argv: list[str], *, name: str, stderr_path: Path | None = None) -> None:
        self.argv = argv
        self.name = name
        self.stderr_path = stderr_path
        self.header: Header | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._rest = b""
        self._thread: threading.Thread | None = None
        self._wlock = threading.Lock()
        self.ended = threading.Event()

    def open(self) -> Header:
        err = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err, bufsize=0, start_new_session=True)
        except OSError as exc:
            raise PtyError(f"{self.name}: cannot start the output reader: {exc.strerror}") from exc
        finally:
            if self.stderr_path:
                err.close()  # type: ignore[union-attr]
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + HEADER_TIMEOUT
        while True:
            # Lines before ours (a login banner) are skipped.
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(_HEADER):
                    self._rest = buf
                    self.header = parse_header(line)
                    if not self.header.ok:
                        self.close()
                    return self.header
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close()
                return Header(False, False, f"no answer within {HEADER_TIMEOUT:g} s")
            data = os.read(fd, 4096)
            if not data:
                self.close()
                return Header(False, False, "the reader ended before it was ready")
            buf += data

    def _write(self, line: str) -> bool:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return False
        with self._wlock:
            try:
                proc.stdin.write(line.encode("ascii") + b"\n")
                return True
            except (OSError, ValueError):
                return False

    def go(self, sink: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        self._write("go")
        self._thread = threading.Thread(target=self._loop, args=(sink, on_end), daemon=True,
                                        name=f"carrier-pipe-{self.name}")
        self._thread.start()

    def drop(self) -> None:
        """Not used after all: the reader removes the file and ends."""
        self._write("drop")
        self.close()

    def punch(self, upto: int) -> None:
        """Free the host's disk blocks of bytes ``[0, upto)`` (already read and kept)."""
        if upto > 0:
            self._write(f"punch {int(upto)}")

    def _loop(self, sink: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            if self._rest:
                rest, self._rest = self._rest, b""
                sink(rest)
            while True:
                try:
                    data = os.read(fd, _READ)
                except OSError:
                    break
                if not data:
                    break
                sink(data)
        except Exception:  # a broken sink must not leave the job waiting for an end
            log.warning("pty pipe reader failed", exc_info=True, extra={"reader": self.name})
        finally:
            self.ended.set()
            with contextlib.suppress(Exception):
                on_end()

    def wait_end(self, timeout: float) -> bool:
        return self.ended.wait(timeout)

    def close(self) -> None:
        """Stop reading (the host's file stays; a later reader resumes from the saved offset)."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5.0)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with contextlib.suppress(OSError, ValueError):
            if proc.stdout is not None:
                proc.stdout.close()
