"""Process, port and binary helpers for the sandbox. Processes are stopped by pid, never by name."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from carrier.errors import SandboxError

if TYPE_CHECKING:
    from carrier.sandbox.layout import Layout

#: Debian package that provides each binary the sandbox runs.
PACKAGES: dict[str, str] = {
    "dovecot": "dovecot-imapd dovecot-lmtpd",
    "doveadm": "dovecot-core",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "gpg": "gnupg",
    "gpgconf": "gnupg",
    "swaks": "swaks",
    "tmux": "tmux",
    "useradd": "passwd",
    "usermod": "passwd",
    "chpasswd": "passwd",
    "visudo": "sudo",
}


def search_path() -> str:
    """Where sandbox binaries are looked up: ``$CARRIER_SANDBOX_PATH`` or ``$PATH`` plus the sbin dirs."""
    explicit = os.environ.get("CARRIER_SANDBOX_PATH")
    if explicit is not None:
        return explicit
    parts = os.environ.get("PATH", "").split(os.pathsep)
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if extra not in parts:
            parts.append(extra)
    return os.pathsep.join(p for p in parts if p)


def find_binary(name: str) -> str:
    """Absolute path of ``name`` or a SandboxError naming the Debian package to install."""
    path = search_path()
    found = shutil.which(name, path=path)
    if found is None:
        package = PACKAGES.get(name, name)
        raise SandboxError(
            f"{name} not found (searched {path}): install it with "
            f"`apt-get install {package}`"
        )
    return found


def port_is_free(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound now (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def ensure_ports_free(wanted: Sequence[tuple[str, int, str]]) -> None:
    """Raise one SandboxError listing every ``(host, port, what)`` that is already taken."""
    taken = [f"{host}:{port} ({what})" for host, port, what in wanted if not port_is_free(host, port)]
    if taken:
        raise SandboxError(
            "port in use: " + ", ".join(taken) + ": stop what listens there "
            "(`ss -ltnp` shows it) or start the sandbox with another --port-offset"
        )


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout: float = 15.0,
    alive: Callable[[], bool] | None = None,
    what: str = "service",
    log_file: Path | None = None,
) -> None:
    """Block until something accepts on ``host:port``; fail early if ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if alive is not None and not alive():
            break
        time.sleep(0.05)
    hint = f"; see {log_file}" if log_file else ""
    raise SandboxError(f"{what} did not start listening on {host}:{port}{hint}")


def pid_alive(pid: int) -> bool:
    """True for a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file`` if that process still runs, else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_pid(pid: int, *, timeout: float = 5.0) -> None:
    """SIGTERM ``pid``, wait up to ``timeout``, then SIGKILL. Reaps it if it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(40):
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)


def stop_pid_file(pid_file: Path, *, timeout: float = 5.0) -> bool:
    """Stop the process named by ``pid_file`` and remove the file. True if something was running."""
    pid = read_pid(pid_file)
    if pid is not None:
        stop_pid(pid, timeout=timeout)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return pid is not None


def spawn(
    argv: Sequence[str],
    *,
    log_file: Path,
    pid_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with stdio on ``log_file`` (never on our pipes).

    Daemons that fork keep the caller's stdout/stderr open, so both always go to the log
    file; stdin is /dev/null. When ``pid_file`` is given the child's pid is written there.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{proc.pid}\n")
    return proc


def run_checked(argv: Sequence[str], *, what: str, env: Mapping[str, str] | None = None,
                timeout: float = 60.0) -> str:
    """Run a short command; on failure raise SandboxError with its stderr (last lines)."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env=dict(env) if env is not None else None,
            timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{what} timed out after {timeout:.0f}s: {' '.join(argv)}") from exc
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise SandboxError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


def python_module(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run ``python -m module args...`` with this interpreter and this Carrier.

    PYTHONPATH gets the directory holding the ``carrier`` package first, so the child imports the
    same code even when Carrier is not installed (a checkout run with ``PYTHONPATH=.``).
    """
    # procs.py is carrier/sandbox/procs.py: two levels up holds the ``carrier`` package.
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", module, *args], env


def ensure_meta(layout: Layout) -> None:
    """Make ``sandbox.json`` record ``layout.ports``: server processes started with ``--root`` read it."""
    if not layout.meta_file.exists():
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.save_meta()
        return
    if type(layout).load(layout.root).ports != layout.ports:
        raise SandboxError(
            f"{layout.meta_file} records other ports than this sandbox uses: "
            "run `carrier sandbox down` and start it again"
        )


def child_pids(pid: int) -> list[int]:
    """Live direct children of ``pid``, from /proc (a daemon's per-connection workers, say)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            children.append(int(entry.name))
    return children


def searchable_by(st: os.stat_result, uid: int, gid: int) -> bool:
    """True when a directory with stat ``st`` can be searched (x bit) by ``uid``/``gid``."""
    mode = st.st_mode
    if st.st_uid == uid:
        return bool(mode & 0o100)
    if st.st_gid == gid:
        return bool(mode & 0o010)
    return bool(mode & 0o001)


def check_traversable(path: Path, *, uid: int, gid: int, user: str) -> None:
    """Raise SandboxError unless ``user`` can search every existing directory from / to ``path``.

    Directories not created yet are skipped: the sandbox makes them with usable modes.
    """
    current = path.resolve()
    for directory in [current, *current.parents]:
        try:
            st = directory.stat()
        except OSError:
            continue
        if not searchable_by(st, uid, gid):
            raise SandboxError(
                f"{directory} is mode {st.st_mode & 0o7777:04o}: the {user} user cannot reach {path}; "
                f"use a sandbox dir under /var/tmp (--dir or CARRIER_SANDBOX_DIR) or `chmod o+x {directory}`"
            )


class PidFileService:
    """A sandbox server that is one process we spawn and stop by its pid file.

    Subclasses set ``name`` and implement ``ports()`` (every ``(host, port, what)`` it listens on)
    and ``start()``, which calls :meth:`launch` with the command line.
    """

    name: str
    #: Seconds to wait after SIGTERM before SIGKILL.
    stop_timeout = 5.0

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.pid_file = layout.pid_file(self.name)
        self.log_file = layout.log_file(self.name)

    def ports(self) -> list[tuple[str, int, str]]:
        raise NotImplementedError

    def launch(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Spawn ``argv`` under our pid file and wait until every port accepts; stop it on failure."""
        proc = spawn(argv, log_file=self.log_file, pid_file=self.pid_file, env=env)
        try:
            for host, port, what in self.ports():
                wait_for_port(host, port, alive=lambda: proc.poll() is None, what=what,
                              log_file=self.log_file)
        except SandboxError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_pid_file(self.pid_file, timeout=self.stop_timeout)

    def running(self) -> bool:
        return read_pid(self.pid_file) is not None

    def pids(self) -> dict[str, int | None]:
        return {self.name: read_pid(self.pid_file)}


def daemon_layout(module: str, description: str, argv: Sequence[str] | None = None) -> Layout:
    """The start of a sandbox daemon's ``main``: parse ``--root``, log to stderr (spawn points it
    at the daemon's log file) and return that sandbox's layout."""
    import argparse
    import logging

    from carrier.sandbox.layout import Layout

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--root", type=Path, required=True, help="the sandbox directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Layout.load(args.root)
