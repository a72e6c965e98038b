"""Who holds a TCP port: so "port in use" can name the process and say what to do (Linux ``/proc``)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

_LISTEN = "0A"


def port_taken(what: str, host: str, port: int, fix: str) -> str | None:
    """A message naming what holds ``host:port`` and what to do (``fix``), or None when it is free."""
    if not port_in_use(host, port):
        return None
    return f"{what} cannot listen on {host}:{port}: the port is in use by {describe_holder(port)}. {fix}"


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound now because something holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:  # another error (no such address...) is the server's to report
            return exc.errno == errno.EADDRINUSE
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as fh:
            next(fh, None)
            for line in fh:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _command_of(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:160] or "?"


def port_holders(port: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of each process listening on TCP ``port`` that this user can see."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    found: list[tuple[int, str]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in wanted:
                        found.append((int(entry.name), _command_of(int(entry.name))))
                        break
    return sorted(found)


def describe_holder(port: int) -> str:
    """What holds TCP ``port``, for a message: ``pid 123 (nginx: master process)``, or a hint."""
    holders = port_holders(port)
    if holders:
        return ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders[:3])
    return f"a process this user cannot see (`ss -ltnp 'sport = :{port}'` as root shows it)"
