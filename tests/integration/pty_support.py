"""Helpers shared by the PTY tests: a local host, zombie counting, waiting."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from carrier.ansible.inventory import HostConn

LOCAL = HostConn(name="localhost", connection="local", address="localhost", port=None, user=None,
                 private_key=None, ssh_args=None, common_args="", extra_args="", timeout=10)


def zombie_children() -> list[int]:
    """Pids of this process's children that exited and were never reaped."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] == "Z":
            found.append(int(entry))
    return found


def until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def kill_tmux_server(socket: str, argv_prefix: list[str] | None = None) -> None:
    """Stop a test's tmux server (locally, or through ``argv_prefix`` such as an ssh command)."""
    # tmux 3.3 leaves the socket file behind: remove it too.
    command = f'tmux -L {socket} kill-server; rm -f "${{TMUX_TMPDIR:-/tmp}}/tmux-$(id -u)/{socket}"'
    argv = [*argv_prefix, command] if argv_prefix else ["/bin/sh", "-c", command]
    subprocess.run(argv, capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL)
