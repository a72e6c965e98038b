"""The exec fast path: one command on each host over its ControlPersist master, no Ansible.

Per host: make sure the master runs (``SshControl.ensure_master``), then ``ssh ... -- address
'<command>'`` as a mux client. The command is an argv quoted with ``shlex.join`` unless the caller
(policy) allows a shell. stdout is read from a pipe (a master that detaches points its stdout at
/dev/null), stderr goes to an unlinked temporary file (a master keeps the stderr it started with,
and a pipe held by it would never reach EOF). Both are capped: the head and the tail are kept, with
a clear mark of how much was dropped in between. Hosts with ``connection: local`` run locally.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import IO, Any

from carrier.ansible.errors import SshError
from carrier.ansible.inventory import HostConn
from carrier.ansible.ssh import SshControl, remote_command

DEFAULT_TIMEOUT = 300.0
DEFAULT_CAP = 65536
_READ = 65536


class CappedBuffer:
    """Keeps the first and the last ``limit // 2`` bytes of a stream and counts what is dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = max(int(limit), 64)
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        head_room = self.limit // 2 - len(self._head)
        if head_room > 0:
            self._head += data[:head_room]
            data = data[head_room:]
        if not data:
            return
        self._tail.append(bytes(data))
        self._tail_len += len(data)
        keep = self.limit - self.limit // 2
        while self._tail_len > keep:
            first = self._tail[0]
            excess = self._tail_len - keep
            if len(first) <= excess:
                self._tail.popleft()
                self._tail_len -= len(first)
                self.dropped += len(first)
            else:
                self._tail[0] = first[excess:]
                self._tail_len -= excess
                self.dropped += excess

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def text(self) -> str:
        head = bytes(self._head).decode("utf-8", "replace")
        tail = b"".join(self._tail).decode("utf-8", "replace")
        if not self.dropped:
            return head + tail
        return head + truncation_mark(self.dropped, self.limit) + tail


def truncation_mark(dropped: int, limit: int) -> str:
    """The line put where output was cut."""
    return f"\n[... carrier: output truncated, {dropped} bytes dropped (limit {limit} bytes) ...]\n"


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What one host gave back. ``status``: ok, failed (rc != 0), unreachable, timeout, cancelled."""

    host: str
    status: str
    rc: int | None
    stdout: str
    stderr: str
    truncated: bool
    duration: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_capped(fh: IO[bytes], limit: int) -> CappedBuffer:
    buf = CappedBuffer(limit)
    fh.seek(0)
    while chunk := fh.read(_READ):
        buf.feed(chunk)
    return buf


def _run(
    argv: list[str],
    *,
    host: str,
    timeout: float,
    cap: int,
    cancel: threading.Event | None,
    started: float,
) -> ExecResult:
    with tempfile.TemporaryFile(prefix="carrier-exec-") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
        assert proc.stdout is not None
        out = CappedBuffer(cap)
        fd = proc.stdout.fileno()
        deadline = started + timeout
        ended = ""
        try:
            while True:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    ended = "timeout"
                    break
                if cancel is not None and cancel.is_set():
                    ended = "cancelled"
                    break
                ready, _, _ = select.select([fd], [], [], min(wait, 0.2 if cancel is not None else wait))
                if not ready:
                    continue
                data = os.read(fd, _READ)
                if not data:
                    break
                out.feed(data)
            if ended:
                proc.kill()
            rc = proc.wait()
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errbuf = _read_capped(err, cap)
    duration = time.monotonic() - started
    stderr = errbuf.text()
    truncated = out.truncated or errbuf.truncated
    if ended == "timeout":
        stderr += f"\n[carrier: timed out after {timeout:g} s; the command was stopped]\n"
        return ExecResult(host, "timeout", None, out.text(), stderr, truncated, duration)
    if ended == "cancelled":
        stderr += "\n[carrier: cancelled; the command was stopped]\n"
        return ExecResult(host, "cancelled", None, out.text(), stderr, truncated, duration)
    status = "ok" if rc == 0 else "failed"
    return ExecResult(host, status, rc, out.text(), stderr, truncated, duration)


def exec_command(
    control: SshControl,
    host: HostConn,
    command: Sequence[str] | str,
    *,
    shell: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    cap: int = DEFAULT_CAP,
    cancel: threading.Event | None = None,
) -> ExecResult:
    """Run ``command`` on ``host``; never raises for a host problem (it is in the result)."""
    started = time.monotonic()
    text = remote_command(command, shell=shell)  # SshError for a bad command: the caller's mistake
    if host.connection == "local":
        argv = ["/bin/sh", "-c", text] if shell else list(command)
        try:
            return _run(argv, host=host.name, timeout=timeout, cap=cap, cancel=cancel, started=started)
        except OSError as exc:
            return ExecResult(host.name, "failed", 127, "", f"cannot run {argv[0]}: {exc.strerror}\n", False,
                              time.monotonic() - started)
    if host.connection != "ssh":
        return ExecResult(
            host.name, "unreachable", None, "",
            f"connection {host.connection!r} is not supported by exec: run the command module as adhoc\n",
            False, 0.0,
        )
    try:
        control.ensure_master(host)
    except SshError as exc:
        return ExecResult(host.name, "unreachable", None, "", f"{exc}\n", False, time.monotonic() - started)
    return _run(control.argv(host, text, flags=("-T",)), host=host.name, timeout=timeout, cap=cap,
                cancel=cancel, started=started)


def exec_on_hosts(
    control: SshControl,
    hosts: Sequence[HostConn],
    command: Sequence[str] | str,
    *,
    shell: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    cap: int = DEFAULT_CAP,
    cancel: threading.Event | None = None,
    parallel: int = 16,
    on_result: Callable[[ExecResult], None] | None = None,
) -> list[ExecResult]:
    """``exec_command`` on every host (``parallel`` at a time); results in the order of ``hosts``."""
    remote_command(command, shell=shell)  # refuse a bad command before anything starts

    def one(host: HostConn) -> ExecResult:
        result = exec_command(control, host, command, shell=shell, timeout=timeout, cap=cap, cancel=cancel)
        if on_result is not None:
            on_result(result)
        return result

    if len(hosts) == 1:
        return [one(hosts[0])]
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts))),
                            thread_name_prefix="carrier-exec") as pool:
        return list(pool.map(one, hosts))
