"""OpenSSH with ControlPersist: the one place that builds ssh options, and the masters' lifecycle.

``ssh_options`` is the single source of the multiplexing options. ansible-runner runs get it as
``ANSIBLE_SSH_ARGS`` (``ansible_ssh_args``), the exec fast path and PTY jobs through
``connection_argv``, which lays out the rest of the command line in the order Ansible's ssh plugin
uses, so both end up with the same ``%C`` hash and share one master per host.

Masters: ``SshControl.ensure_master`` starts one (``ssh -f -N``) under a per-host lock (a thread
lock plus an ``flock`` for other processes) when none answers on the control socket; a master that
died is simply started again on next use. A daemonised master keeps the stderr it was started
with, so that is always a log file, never a pipe (a pipe would keep the caller's read open until
the master exits). ``check``/``disconnect``/``close_all`` wrap ``ssh -O check|exit``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shlex
import socket
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from carrier.ansible.errors import SshError
from carrier.ansible.inventory import HostConn, Inventory

log = logging.getLogger(__name__)

#: Seconds a master stays after its last session.
CONTROL_PERSIST = 600
SERVER_ALIVE_INTERVAL = 15
SERVER_ALIVE_COUNT = 3
#: sun_path holds 108 bytes with the NUL; ssh binds "<ControlPath>.<16 random chars>" first.
_SUN_PATH_MAX = 107
_CONTROL_NAME_LEN = 40  # %C is a sha1 in hex
_BIND_SUFFIX_LEN = 17
MASTER_START_TIMEOUT = 30.0


# --------------------------------------------------------------------------- directories


def runtime_dir(state_dir: Path) -> Path:
    """Carrier's runtime directory (sockets, locks, master logs): ``<state_dir>/run``."""
    return Path(state_dir) / "run"


def _fits(directory: Path) -> bool:
    return len(os.fsencode(str(directory))) + 1 + _CONTROL_NAME_LEN + _BIND_SUFFIX_LEN <= _SUN_PATH_MAX


def control_dir(state_dir: Path) -> Path:
    """Where control sockets live: ``<state_dir>/run/cm``, or, when that path is too long for a unix
    socket, ``/tmp/carrier-cm-<uid>-<hash of state_dir>`` (same owner and mode checks)."""
    preferred = runtime_dir(state_dir) / "cm"
    if _fits(preferred):
        return preferred
    digest = hashlib.sha256(os.fsencode(str(Path(state_dir).resolve()))).hexdigest()[:12]
    return Path("/tmp") / f"carrier-cm-{os.getuid()}-{digest}"  # noqa: S108 (checked: ours, 0700)


def _private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check that an existing one is ours and private."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise SshError(f"cannot create {path}: {exc.strerror}: check the state directory") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SshError(f"{path} is not a directory owned by uid {os.getuid()}: remove it and retry")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


# --------------------------------------------------------------------------- options and argv


def ssh_options(control_path_dir: Path, *, persist: int = CONTROL_PERSIST) -> list[str]:
    """The multiplexing options every Carrier ssh uses (ansible-runner, exec, PTY jobs).

    ``BatchMode=yes``: Carrier never answers a prompt; log-ins use keys or an agent.
    """
    return [
        "-o", "ControlMaster=auto",
        "-o", f"ControlPersist={int(persist)}",
        "-o", f"ControlPath={control_path_dir}/%C",
        "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
        "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT}",
        "-o", "BatchMode=yes",
    ]


def ansible_ssh_args(control_path_dir: Path, *, persist: int = CONTROL_PERSIST) -> str:
    """``ssh_options`` as the ``ANSIBLE_SSH_ARGS`` string (replaces Ansible's own defaults)."""
    return shlex.join(ssh_options(control_path_dir, persist=persist))


def ansible_ssh_env(control_path_dir: Path, *, persist: int = CONTROL_PERSIST) -> dict[str, str]:
    """The environment that gives ansible-playbook Carrier's ssh options.

    ``ANSIBLE_SSH_CONTROL_PATH[_DIR]`` cover hosts whose inventory sets its own ``ansible_ssh_args``
    (with ControlPersist but no ControlPath): Ansible then adds this ControlPath, the same one
    ``connection_argv`` adds, so such hosts share one master too.
    """
    return {
        "ANSIBLE_SSH_ARGS": ansible_ssh_args(control_path_dir, persist=persist),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_path_dir),
        "ANSIBLE_SSH_CONTROL_PATH": "%(directory)s/%%C",
    }


def connection_argv(
    host: HostConn, control_path_dir: Path, *, ssh: str = "ssh", persist: int = CONTROL_PERSIST
) -> list[str]:
    """``ssh`` and the options for ``host``, in the order Ansible's ssh plugin writes them.

    The caller appends its own flags, then ``--``, ``host.address`` and the remote command, so
    nothing from the inventory or a request can be read as an ssh option.
    """
    if host.connection != "ssh":
        raise SshError(f"host {host.name} uses connection {host.connection!r}, not ssh")
    argv = [ssh]
    argv += shlex.split(host.ssh_args) if host.ssh_args else ssh_options(control_path_dir, persist=persist)
    if host.port is not None:
        argv += ["-o", f"Port={host.port}"]
    if host.private_key:
        argv += ["-o", f'IdentityFile="{host.private_key}"']
    argv += [
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "PreferredAuthentications=gssapi-with-mic,gssapi-keyex,hostbased,publickey",
        "-o", "PasswordAuthentication=no",
    ]
    if host.user:
        argv += ["-o", f'User="{host.user}"']
    argv += ["-o", f"ConnectTimeout={host.timeout}"]
    argv += shlex.split(host.common_args) if host.common_args else []
    argv += shlex.split(host.extra_args) if host.extra_args else []
    # Like Ansible: ControlPersist without a ControlPath gets one (ours: ansible_env points
    # Ansible's control_path at the same place), so both paths share the host's master.
    lowered = " ".join(argv).lower()
    if "controlpersist" in lowered and "controlpath" not in lowered:
        argv += ["-o", f"ControlPath={control_path_dir}/%C"]
    return argv


def _quote_always(word: str) -> str:
    """``word`` in single quotes even when ``shlex.quote`` would leave it bare (``FOO=1``, ``time``)."""
    return "'" + word.replace("'", "'\"'\"'") + "'"


def remote_command(command: Sequence[str] | str, *, shell: bool) -> str:
    """The string ssh sends to the remote login shell.

    Without ``shell`` the command is an argv, quoted with ``shlex.join`` so the remote shell gives
    the program exactly those arguments (no expansion, no ``;``, ``|`` or ``$()``). The program comes
    after ``exec`` and always in quotes: the remote shell runs one program found on PATH, never a
    builtin (``eval``, ``trap``, ``source``), a keyword (``coproc``, ``time``) or an assignment
    (``PATH=/x sh``). A first word starting with ``-`` is refused in both modes (the remote shell
    would read it as its own option). With ``shell`` (a policy decision made by the caller) a string
    goes as it is.
    """
    if shell:
        text = command if isinstance(command, str) else shlex.join(command)
        if not text.strip():
            raise SshError("the command is empty")
        if "\0" in text:
            raise SshError("the command contains a NUL character")
        if text.lstrip().startswith("-"):
            raise SshError("the command starts with '-': name the program first")
        return text
    if isinstance(command, str):
        raise SshError("a command without shell must be a list of arguments (argv), not a string")
    args = list(command)
    if not args or not args[0]:
        raise SshError("the command is empty: give the program to run")
    if any(not isinstance(a, str) or "\0" in a for a in args):
        raise SshError("command arguments must be strings without NUL characters")
    if args[0].startswith("-"):
        raise SshError(f"the command starts with {args[0]!r}: name the program first, not an option")
    return " ".join(["exec", _quote_always(args[0]), *(shlex.quote(a) for a in args[1:])])


def host_command(
    host: HostConn, control_path_dir: Path, command: str, *, flags: Sequence[str] = (), ssh: str = "ssh"
) -> list[str]:
    """The full argv running ``command`` (from ``remote_command``) on ``host``."""
    return [*connection_argv(host, control_path_dir, ssh=ssh), *flags, "--", host.address, command]


# --------------------------------------------------------------------------- masters


@dataclass(frozen=True, slots=True)
class MasterInfo:
    """One host's ControlMaster as ``ssh -O check`` sees it."""

    host: str
    control_path: str
    running: bool
    pid: int | None
    detail: str


def _master_env() -> dict[str, str]:
    """Our environment without a run's mark (``carrier.ansible.runner.RUN_MARK_ENV``), for a master:
    it serves every job on its host, so the end of the run whose worker started it (an execution
    node run starts its node's master in the worker) must not stop it with the run's stragglers."""
    from carrier.ansible.runner import RUN_MARK_ENV

    return {name: value for name, value in os.environ.items() if name != RUN_MARK_ENV}


def _socket_alive(path: str) -> bool | None:
    """True when a master accepts on ``path``, False when the socket is stale, None when absent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(path)
        return True
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
            return False
        return None
    finally:
        sock.close()


class SshControl:
    """ControlMasters for one Carrier state directory. Thread-safe; safe across processes."""

    def __init__(self, state_dir: Path, *, persist: int = CONTROL_PERSIST, ssh: str = "ssh") -> None:
        self.state_dir = Path(state_dir)
        self.persist = persist
        self.ssh = ssh
        run = _private_dir(runtime_dir(self.state_dir))
        self.control_dir = _private_dir(control_dir(self.state_dir))
        self.log_dir = _private_dir(run / "ssh-log")
        self.lock_dir = _private_dir(run / "locks")
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._paths: dict[tuple[str, ...], str] = {}
        #: Masters this object started, per host (the benchmark checks none is started twice).
        self.started: Counter[str] = Counter()

    # ----------------------------------------------------------------- argv

    def argv(self, host: HostConn, command: str, *, flags: Sequence[str] = ()) -> list[str]:
        return host_command(host, self.control_dir, command, flags=flags, ssh=self.ssh)

    def ansible_ssh_args(self) -> str:
        return ansible_ssh_args(self.control_dir, persist=self.persist)

    def ansible_env(self) -> dict[str, str]:
        return ansible_ssh_env(self.control_dir, persist=self.persist)

    def _base(self, host: HostConn) -> list[str]:
        return connection_argv(host, self.control_dir, ssh=self.ssh, persist=self.persist)

    def control_path(self, host: HostConn) -> str | None:
        """The socket path ssh uses for ``host`` (``%C`` expanded by ``ssh -G``); None without mux."""
        key = (*self._base(host), host.address)
        with self._lock:
            cached = self._paths.get(key)
        if cached is not None:
            return cached or None
        done = subprocess.run(
            [*self._base(host), "-G", "--", host.address],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, check=False,
        )
        if done.returncode != 0:
            raise SshError(f"host {host.name}: ssh rejects its options: {_tail(done.stderr)}")
        path = ""
        for line in done.stdout.splitlines():
            name, _, value = line.partition(" ")
            if name == "controlpath" and value != "none":
                path = value
        with self._lock:
            self._paths[key] = path
        return path or None

    # ----------------------------------------------------------------- master lifecycle

    def _host_lock(self, path: str) -> threading.Lock:
        with self._lock:
            return self._host_locks.setdefault(path, threading.Lock())

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        name = hashlib.sha256(path.encode()).hexdigest()[:20] + ".lock"
        with self._host_lock(path):
            fd = os.open(self.lock_dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def master_alive(self, host: HostConn) -> bool:
        path = self.control_path(host)
        return bool(path) and _socket_alive(path or "") is True

    def log_file(self, host: HostConn) -> Path:
        return self.log_dir / f"{host.name}.log"

    def ensure_master(self, host: HostConn) -> bool:
        """Start ``host``'s master unless one answers; True when this call started it.

        Raises SshError (with ssh's own words) when the host cannot be reached or refuses us.
        """
        path = self.control_path(host)
        if not path:
            return False  # the inventory turned multiplexing off for this host
        if _socket_alive(path) is True:
            return False
        with self._locked(path):
            state = _socket_alive(path)
            if state is True:
                return False  # another thread or process started it while we waited
            if state is False:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # a stale socket makes ssh disable multiplexing
            logfile = self.log_file(host)
            with open(logfile, "ab") as err:
                offset = err.tell()
                try:
                    done = subprocess.run(
                        [*self._base(host), "-f", "-N", "--", host.address],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                        timeout=MASTER_START_TIMEOUT, check=False, env=_master_env(),
                    )
                except subprocess.TimeoutExpired as exc:
                    raise SshError(
                        f"{host.name}: ssh did not connect within {MASTER_START_TIMEOUT:g} s"
                    ) from exc
            if done.returncode != 0:
                raise SshError(f"{host.name}: {self._log_since(logfile, offset) or 'ssh failed'}")
            self.started[host.name] += 1
            log.info("ssh master started", extra={"host": host.name})
            return True

    @staticmethod
    def _log_since(logfile: Path, offset: int) -> str:
        try:
            with open(logfile, "rb") as fh:
                fh.seek(offset)
                text = fh.read(8192).decode("utf-8", "replace")
        except OSError:
            return ""
        return _tail(text)

    def check(self, host: HostConn) -> MasterInfo:
        """``ssh -O check`` for ``host``."""
        path = self.control_path(host) or ""
        if not path:
            return MasterInfo(host.name, "", False, None, "multiplexing is off for this host")
        done = subprocess.run(
            [*self._base(host), "-O", "check", "--", host.address],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, check=False,
        )
        text = (done.stderr or done.stdout).strip()
        pid = None
        if done.returncode == 0 and "pid=" in text:
            with contextlib.suppress(ValueError):
                pid = int(text.split("pid=", 1)[1].rstrip(")").split(")")[0])
        return MasterInfo(host.name, path, done.returncode == 0, pid, _tail(text))

    def disconnect(self, host: HostConn) -> bool:
        """``ssh -O exit`` for ``host``; True when a master was running."""
        path = self.control_path(host)
        if not path or _socket_alive(path) is not True:
            return False
        done = subprocess.run(
            [*self._base(host), "-O", "exit", "--", host.address],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, check=False,
        )
        deadline = time.monotonic() + 5
        while _socket_alive(path) is True and time.monotonic() < deadline:
            time.sleep(0.02)  # the master answers, then exits and removes its socket
        return done.returncode == 0

    def sockets(self) -> list[Path]:
        """Every control socket in the control directory."""
        try:
            return sorted(p for p in self.control_dir.iterdir() if p.is_socket())
        except OSError:
            return []

    def discard(self) -> None:
        """``close_all`` and remove the control directory when it is the short one under /tmp
        (the state directory, with everything else, is the caller's to keep or delete)."""
        self.close_all()
        fallback = self.control_dir.parent == Path("/tmp")  # noqa: S108 (control_dir's short fallback)
        if fallback and self.control_dir.name.startswith("carrier-cm-"):
            with contextlib.suppress(OSError):
                self.control_dir.rmdir()

    def close_all(self) -> int:
        """``ssh -O exit`` every master under the control directory; return how many answered."""
        closed = 0
        for sock in self.sockets():
            if _socket_alive(str(sock)) is not True:
                with contextlib.suppress(OSError):
                    sock.unlink()
                continue
            done = subprocess.run(
                [self.ssh, "-o", f"ControlPath={sock}", "-O", "exit", "carrier-master"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False,
            )
            closed += done.returncode == 0
        # The masters remove their sockets as they exit, just after answering.
        deadline = time.monotonic() + 5
        while self.sockets() and time.monotonic() < deadline:
            time.sleep(0.02)
        return closed


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


# --------------------------------------------------------------------------- per inventory host


def ssh_list(control: SshControl, inventory: Inventory, pattern: str = "all") -> list[MasterInfo]:
    """``ssh -O check`` for every ssh host ``pattern`` selects."""
    out = []
    for name in inventory.resolve(pattern):
        conn = inventory.conn(name)
        if conn.connection == "ssh":
            out.append(control.check(conn))
    return out


def ssh_disconnect(control: SshControl, inventory: Inventory, host: str) -> bool:
    """Close ``host``'s master (``ssh -O exit``); True when one was running."""
    names = inventory.resolve(host)
    if names != [host]:
        raise SshError(f"{host!r} is not a single inventory host: name one host to disconnect")
    conn = inventory.conn(host)
    if conn.connection != "ssh":
        return False
    return control.disconnect(conn)
