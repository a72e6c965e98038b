"""The warm worker (``ansible.worker: warm``): a parent that has imported Ansible once and forks
one job child per run.

``python -m carrier.ansible.zygote STATE_DIR KEY`` is started by Carrier (``ensure``) in its own
session, like a cold worker, and outlives ``carrier serve``. It listens on a 0600 unix socket in
``STATE_DIR/run/zygote/``; a connection from another uid (``SO_PEERCRED``) or a request that does not
name a job run directory of this state directory is refused. For each request it forks a child
that ``setsid()``s, takes the run directory's ``worker.log`` as its output and runs
``carrier.ansible.worker.run`` there, with ``ansible-playbook``/``ansible`` run in-process in a
forked grandchild instead of a fresh interpreter (``carrier.ansible.worker``). The run's files
(spec, events, result, cancel, stdout) are the cold worker's, so Carrier tails, cancels and
re-attaches to it the same way; the child is not Carrier's nor depends on the zygote: killing
either leaves the run going.

Staleness: Ansible reads its configuration once, at import. A zygote therefore serves one
``KEY``: a digest of the versions (Python, ansible-core, ansible-runner, Mitogen), Carrier's code
(size and mtime of its files), the run's environment without the per-run variables and the
files Ansible would read its configuration from. Carrier computes the key of every run
(``zygote_key``) and uses the zygote of that key, starting one if there is none; a zygote whose
key is no longer current (code or versions changed) or that was idle for ``IDLE_EXIT`` seconds
removes its socket and exits. Inventories and playbooks are parsed per run, in the child.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from carrier.ansible.errors import EngineError

#: Environment variables that differ per run; every other one is part of the key.
PER_RUN_ENV = ("ANSIBLE_LOCAL_TEMP", "ANSIBLE_FORKS", "ANSIBLE_CACHE_PLUGIN_CONNECTION",
               "AWX_ISOLATED_DATA_DIR", "CARRIER_RUN_DIR")
#: A zygote with nothing to do for this long exits (the next run starts a new one).
IDLE_EXIT = 900.0
#: How often a zygote checks that its key is still current (seconds).
CHECK_EVERY = 2.0
#: Seconds Carrier waits for a new zygote to answer.
START_TIMEOUT = 60.0
MAX_REQUEST = 64 * 1024
#: A run's exit status that says it did not end by itself (``_SharedInterpreters.ended``).
LEFT_TASKS = 75
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_JOB_DIR_RE = re.compile(r"j-[a-z2-7]{12}")
_DISTRIBUTIONS = ("ansible-core", "ansible-runner", "mitogen")
KINDS = ("playbook", "adhoc")
#: ``ansible.worker`` in carrier.yml: ``warm`` (this module) or ``cold`` (a new interpreter per run).
WORKERS = ("warm", "cold")
#: Chosen by measurement (tests/bench/RESULTS.md) and by the integration tests passing with it.
DEFAULT_WORKER = "warm"


def check_worker(value: object) -> str:
    """``value`` as one of ``WORKERS``, or EngineError saying which are accepted."""
    if isinstance(value, str) and value.strip().lower() in WORKERS:
        return value.strip().lower()
    raise EngineError(f"ansible.worker must be one of {', '.join(WORKERS)}, not {str(value)[:40]!r}")


def zygote_dir(state_dir: Path) -> Path:
    return state_dir / "run" / "zygote"


def _code_stamp() -> list[tuple[str, int, int]]:
    root = Path(__file__).resolve().parents[1]
    stamp = []
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            st = path.stat()
            stamp.append((str(path.relative_to(root)), st.st_mtime_ns, st.st_size))
    return stamp


def _versions() -> dict[str, str]:
    found = {"python": f"{sys.executable} {sys.version}"}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def _config_files(env: Mapping[str, str], cwd: Path) -> list[tuple[str, int | None]]:
    """Every file Ansible may read its configuration from, with its mtime (None: absent)."""
    candidates = []
    if env.get("ANSIBLE_CONFIG"):
        configured = Path(os.path.expanduser(env["ANSIBLE_CONFIG"]))
        candidates.append(configured / "ansible.cfg" if configured.is_dir() else configured)
    candidates += [cwd / "ansible.cfg", Path(env.get("HOME", "~")).expanduser() / ".ansible.cfg",
                   Path("/etc/ansible/ansible.cfg")]
    out: list[tuple[str, int | None]] = []
    for path in candidates:
        try:
            out.append((str(path), path.stat().st_mtime_ns))
        except OSError:
            out.append((str(path), None))
    return out


def shared_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the per-run variables: what a zygote and its runs have in common."""
    return {k: v for k, v in env.items() if k not in PER_RUN_ENV}


def zygote_key(env: Mapping[str, str], cwd: Path, kind: str) -> str:
    """The key of the zygote that may run a ``kind`` run with ``env`` in ``cwd`` (see the module
    docstring)."""
    data = {"versions": _versions(), "code": _code_stamp(), "env": sorted(shared_env(env).items()),
            "config": _config_files(env, cwd), "kind": kind}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_cwd(state_dir: Path, kind: str, project_dir: str) -> Path:
    """Where ansible-runner runs a ``kind`` run (its configuration file may be there): a playbook's
    project directory; an ad-hoc run's own directory, which has none, so the zygote's own."""
    return Path(project_dir) if kind == "playbook" else zygote_dir(state_dir)


def socket_path(state_dir: Path, key: str) -> Path:
    return zygote_dir(state_dir) / f"{key[:24]}.sock"


def live_zygotes(state_dir: Path) -> list[int]:
    """The pids of the warm workers serving ``state_dir`` now (from their ``.pid`` files)."""
    from carrier.procid import process_start

    found = []
    for pid_file in sorted(zygote_dir(state_dir).glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            sock = pid_file.with_suffix(".sock")
            if process_start(pid) is not None and sock.exists() and _serves(pid, state_dir):
                found.append(pid)
    return found


def _serves(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` is a zygote of ``state_dir`` (not another process that took a stale pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"carrier.ansible.zygote" not in argv:
        return False
    served = argv[argv.index(b"carrier.ansible.zygote") + 1:][:1]
    return bool(served) and Path(os.fsdecode(served[0])).resolve() == state_dir.resolve()


def stop_zygotes(state_dir: Path) -> list[int]:
    """SIGTERM the warm workers of ``state_dir`` (``sandbox down``); runs they forked go on."""
    from carrier.sandbox.procs import stop_pid

    pids = live_zygotes(state_dir)
    for pid in pids:
        stop_pid(pid)
    return pids


# --------------------------------------------------------------------------- Carrier's side


# A unix socket address holds at most 107 bytes; state directories (a deep home, pytest's
# tmp_path) can be longer. Past that the socket is addressed through an O_PATH descriptor of its
# directory, /proc/self/fd/N/NAME, which the kernel resolves like any path.
_SUN_PATH_MAX = 100


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _connect(path: Path, timeout: float = 10.0) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _sun_path(path) as address:
            sock.connect(address)
    except OSError:
        sock.close()
        return None
    return sock


def _package_parent() -> str:
    return str(Path(__file__).resolve().parents[2])


def ensure(state_dir: Path, env: Mapping[str, str], cwd: Path, kind: str) -> Path:
    """The socket of a live zygote for ``kind`` runs with ``env`` in ``cwd``, started when there is
    none.

    EngineError (with the zygote's own log) when it cannot be started: the run fails, it never
    silently goes cold.
    """
    if kind not in KINDS:
        raise EngineError(f"the warm worker runs {' and '.join(KINDS)} jobs, not {kind!r}")
    zenv = shared_env(env)
    zenv["PYTHONPATH"] = _package_parent()
    key = zygote_key(zenv, cwd, kind)
    where = zygote_dir(state_dir)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    where.chmod(0o700)
    path = socket_path(state_dir, key)
    sock = _connect(path)
    if sock is not None:
        sock.close()
        return path
    with open(where / f"{key[:24]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per key, whatever the threads
        sock = _connect(path)
        if sock is not None:
            sock.close()
            return path
        log_path = where / f"{key[:24]}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "carrier.ansible.zygote", str(state_dir), kind, key],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=zenv, cwd=str(cwd),
                start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            exited = proc.poll() is not None  # before connecting: it exits once it listens
            sock = _connect(path)
            if sock is not None:
                sock.close()
                proc.wait()  # the starter forks the zygote and exits: nothing left to reap later
                return path
            if exited:
                break
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        tail = " ".join(log_path.read_text(errors="replace")[-600:].split())
        raise EngineError(f"the warm Ansible worker (ansible.worker: warm) did not start: {tail[-400:]} "
                          "(set ansible.worker: cold in carrier.yml to run without it)")


def submit(path: Path, run_dir: Path, become_password: str | None = None) -> int:
    """Ask the zygote at ``path`` to run ``run_dir``; the job child's pid (EngineError if refused)."""
    sock = _connect(path)
    if sock is None:
        raise EngineError("the warm Ansible worker is gone (its socket does not answer): the run was not "
                          "started")
    with sock:
        request = {"run_dir": str(run_dir), "become_password": become_password}
        sock.sendall(json.dumps(request).encode() + b"\n")
        del request
        reply = _read_line(sock)
    try:
        answer = json.loads(reply)
    except ValueError:
        answer = {}
    if not isinstance(answer, dict) or not isinstance(answer.get("pid"), int):
        why = answer.get("error") if isinstance(answer, dict) else None
        raise EngineError(f"the warm Ansible worker refused the run: {why or 'no answer'}")
    return int(answer["pid"])


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0]


# --------------------------------------------------------------------------- the zygote


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def check_run_dir(state_dir: Path, value: object) -> Path:
    """``value`` as a job run directory of ``state_dir`` that only this uid can enter (ValueError)."""
    if not isinstance(value, str) or "\0" in value or len(value) > 4096:
        raise ValueError("run_dir must be a path")
    path = Path(value)
    jobs = (state_dir / "jobs").resolve()
    if not path.is_absolute() or path.parent != jobs or not _JOB_DIR_RE.fullmatch(path.name):
        raise ValueError("run_dir is not a job directory of this state directory")
    st = path.lstat()
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError("run_dir is not a 0700 directory of this user")
    spec = (path / "spec.json").lstat()
    if not _stat.S_ISREG(spec.st_mode):
        raise ValueError("run_dir has no spec.json")
    return path


def _import_env(kind: str, where: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The environment ansible-runner gives a ``kind`` run of ``env`` (a throw-away probe of its
    own config), with this zygote's directories for the per-run variables: what Ansible is
    imported with."""
    import shutil
    import tempfile

    from ansible_runner.config.runner import RunnerConfig

    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=where))
    try:
        what: dict[str, str] = ({"playbook": "probe.yml"} if kind == "playbook"
                                else {"module": "ansible.builtin.ping", "host_pattern": "all"})
        config = RunnerConfig(private_data_dir=str(probe), ident="run", envvars=dict(env), quiet=True,
                              **what)
        config.prepare()
        out = {str(k): str(v) for k, v in config.env.items()}
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    local = where / "tmp"
    local.mkdir(mode=0o700, exist_ok=True)
    for name in ("ANSIBLE_LOCAL_TEMP", "ANSIBLE_CACHE_PLUGIN_CONNECTION", "AWX_ISOLATED_DATA_DIR"):
        out[name] = str(local)
    out.pop("CARRIER_RUN_DIR", None)
    return out


def _preload() -> None:
    """Import what every run needs: ansible-runner, the CLIs, executor, strategies, connections."""
    import ansible_runner  # noqa: F401

    # Not ansible-runner's awx_display callback: importing it patches Ansible's Display, and the
    # plugin loader loads it again (as another module) in the run, so Display would be patched twice.
    from ansible.cli import adhoc, playbook  # noqa: F401
    from ansible.executor import playbook_executor, task_executor, task_queue_manager  # noqa: F401
    from ansible.plugins.action import command, normal  # noqa: F401
    from ansible.plugins.connection import local, ssh  # noqa: F401
    from ansible.plugins.strategy import free, linear  # noqa: F401

    with contextlib.suppress(ImportError):  # Mitogen is optional (ansible.strategy: linear)
        import ansible_mitogen.strategy  # noqa: F401
    _warm_caches()


def _memo(function: Any) -> Any:
    """``function`` (pure: its result depends on its first argument only) remembered by that
    argument; each call gets its own copy, so no run sees another's changes."""
    import copy

    seen: dict[object, Any] = {}

    def remembered(data: Any, *args: Any) -> Any:
        if data not in seen:
            seen[data] = function(data, *args)
        return copy.deepcopy(seen[data])

    return remembered


def _warm_caches() -> None:
    """Work every run repeats on the same input, done once here (the input is part of the installed
    versions, so of the key): the YAML of ansible.builtin's routing (``ansible_builtin_runtime.yml``,
    through the parser hook Ansible provides for caching, ``_meta_yml_to_dict``), and Mitogen's
    minified sources it sends to each host (``mitogen.minify.minimize_source``, core's included).

    Not the plugins' documentation (their settings): parsing it here, through the plugin loaders,
    left their caches so that runs never loaded the vars plugins' settings and dropped the
    inventory's group_vars (tests/unit/test_ansible_zygote.py has the case)."""
    import ansible
    from ansible.utils.collection_loader import _collection_finder

    _collection_finder._meta_yml_to_dict = _memo(_collection_finder._meta_yml_to_dict)
    builtin = Path(ansible.__file__).parent / "config" / "ansible_builtin_runtime.yml"
    _collection_finder._meta_yml_to_dict(builtin.read_bytes(), ("ansible.builtin", "runtime.yml"))
    try:
        import ansible_mitogen
        import mitogen.master
        import mitogen.minify
        import mitogen.parent
    except ImportError:
        return
    mitogen.minify.minimize_source = _memo(mitogen.minify.minimize_source)
    mitogen.parent.get_core_source_partial()
    marker = mitogen.master.ModuleResponder.minify_safe_re
    for package in (mitogen, ansible_mitogen):
        for path in sorted(Path(str(package.__file__)).parent.rglob("*.py")):
            source = path.read_bytes()
            if marker.search(source):
                mitogen.minify.minimize_source(source)


#: Descriptors a multiplexer closes as it is forked (``_SharedInterpreters.start``): empty otherwise.
_CLOSE_IN_FORK: list[int] = []


def _close_in_fork() -> None:
    for fd in _CLOSE_IN_FORK:
        with contextlib.suppress(OSError):
            os.close(fd)
    _CLOSE_IN_FORK.clear()


os.register_at_fork(after_in_child=_close_in_fork)


class _SharedInterpreters:
    """Mitogen's connection multiplexers, started once by the zygote, so its runs reuse the Python
    interpreters Mitogen keeps on the hosts instead of each run starting one per host (that start
    is most of a short play's first task).

    One run at a time uses them (the *lane*): Mitogen serves the calls into one interpreter in
    order, so two runs sharing it would wait on each other's tasks. A run that starts while the
    lane is taken gets multiplexers of its own, as every run did before. A lane run that was
    cancelled, timed out or broke (a signal, or ``LEFT_TASKS``) may have left a task running there; they are
    stopped then, and so when a multiplexer dies, and the next run starts new ones. Connections
    are keyed by Mitogen on everything ssh and become are given (host, user, port, key, ssh
    options, become user), so a changed inventory connects anew."""

    def __init__(self) -> None:
        self.model: Any = None
        self.muxes: list[int] = []
        self.lane: int | None = None
        self.socket_dir: str | None = None

    def start(self, keep_out: tuple[socket.socket, ...] = ()) -> bool:
        """The multiplexers (started now if none run); False without Mitogen. ``keep_out``: the
        zygote's sockets, which they must not hold (a dead zygote's socket would still accept)."""
        if self.model is not None:
            return True
        try:
            import ansible_mitogen.process as process
        except ImportError:
            return False
        import tempfile

        # Their sockets in a directory of this user only (mkdtemp: 0700) with a short path; Mitogen
        # names them with tempfile.mktemp and binds before it sets 0600.
        self.socket_dir = tempfile.mkdtemp(prefix="carrier-mitogen-")
        before, tempfile.tempdir = tempfile.tempdir, self.socket_dir
        try:
            for sock in keep_out:
                _CLOSE_IN_FORK.append(sock.fileno())
            self.model = process.get_classic_worker_model()
        finally:
            tempfile.tempdir = before
            _CLOSE_IN_FORK.clear()
        import atexit

        # Its exit handler would shut them down under a lane run that outlives the zygote.
        atexit.unregister(self.model._on_process_exit)
        self.muxes = [mux.pid for mux in self.model._muxes]
        return True

    def for_child(self, keep_out: tuple[socket.socket, ...]) -> bool:
        """Before forking a run: whether it takes the lane (then the lane is its, by ``taken``)."""
        return self.lane is None and self.start(keep_out)

    def taken(self, pid: int) -> None:
        self.lane = pid

    def in_child(self, lane: bool) -> None:
        """In the forked run: off the lane, forget the zygote's multiplexers (the run starts its own
        at its strategy's start, as a cold run does)."""
        if lane or self.model is None:
            return
        import ansible_mitogen.process as process

        with contextlib.suppress(OSError):
            self.model.parent_sock.close()  # this copy would keep them alive after the zygote
        process._classic_worker_model = None

    def ended(self, pid: int, status: int) -> None:
        """A child was reaped: free the lane, and stop the interpreters if it was killed."""
        if pid == self.lane:
            self.lane = None
            if os.WIFSIGNALED(status) or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == LEFT_TASKS):
                self.stop()

    def check(self) -> None:
        """Stop (so the next lane run restarts) multiplexers of which one has exited."""
        for pid in self.muxes:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.stop()
            return

    def stop(self) -> None:
        if self.model is None:
            return
        import ansible_mitogen.process as process

        with contextlib.suppress(OSError):  # their end reads EOF: they shut down and exit
            self.model.parent_sock.shutdown(socket.SHUT_WR)
            self.model.parent_sock.close()
        deadline = time.monotonic() + 5.0
        for pid in self.muxes:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(pid, os.WNOHANG)[0] == 0:
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        break
                    time.sleep(0.02)
        process._classic_worker_model = None
        self.model, self.muxes = None, []
        if self.socket_dir is not None:
            import shutil

            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None


class Zygote:
    """The listening parent. Single-threaded: it only accepts, checks, forks and reaps."""

    def __init__(self, state_dir: Path, kind: str, key: str) -> None:
        self.state_dir = state_dir.resolve()
        self.kind = kind
        self.key = key
        self.path = socket_path(self.state_dir, key)
        self.cwd = Path.cwd()
        self.env = dict(os.environ)
        self.children: set[int] = set()
        self.last_used = time.monotonic()
        self.interpreters = _SharedInterpreters()

    def current(self) -> bool:
        """Whether this zygote's key is still the one Carrier computes (code and versions)."""
        try:
            return zygote_key(self.env, self.cwd, self.kind) == self.key and self.path.exists()
        except OSError:
            return False

    def serve(self) -> int:
        if zygote_key(self.env, self.cwd, self.kind) != self.key:
            print("carrier zygote: the key does not match this environment", file=sys.stderr, flush=True)
            return 2
        os.environ.clear()
        os.environ.update(_import_env(self.kind, self.path.parent, self.env))
        _preload()
        import carrier.ansible.worker as worker

        worker.prepare_warm()
        # What was imported and parsed lives as long as the zygote: out of the collector's sight,
        # so a run's forks (Ansible forks one per task and host) neither scan nor copy it.
        gc.collect()
        gc.freeze()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead zygote's socket (the starter holds the lock)
        old = os.umask(0o177)
        try:
            with _sun_path(self.path) as address:
                listener.bind(address)
        finally:
            os.umask(old)
        self.path.chmod(0o600)
        listener.listen(16)
        listener.settimeout(CHECK_EVERY)
        # Listening: the process Carrier started exits and the zygote goes on in a fork, so it is
        # no Carrier process's child (its exit, hours later, leaves no zombie in that Carrier).
        if os.fork() > 0:
            os._exit(0)
        inode = self.path.stat().st_ino
        pid_file = self.path.with_suffix(".pid")
        pid_file.write_text(f"{os.getpid()}\n")  # who serves this socket (its forks share its argv)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        self.interpreters.start((listener,))  # children of this process, not of the one that exited
        print(f"carrier zygote {os.getpid()}: ready on {self.path}", file=sys.stderr, flush=True)
        try:
            while True:
                self._reap()
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    idle = not self.children and time.monotonic() - self.last_used > IDLE_EXIT
                    if idle or not self.current() or self.path.stat().st_ino != inode:
                        print(f"carrier zygote {os.getpid()}: exiting (idle or stale)", file=sys.stderr,
                              flush=True)
                        return 0
                    continue
                with conn:
                    self._handle(conn, listener)
                self.last_used = time.monotonic()
        except FileNotFoundError:
            return 0
        finally:
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == inode:
                    self.path.unlink()
                    pid_file.unlink()
            listener.close()
            self._reap()
            if self.interpreters.lane is None:
                self.interpreters.stop()
            # else the lane's run goes on with them; they exit once it has (its copy of their
            # socket is the last one left)

    def _reap(self) -> None:
        for pid in list(self.children):
            status = 0
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.children.discard(pid)
            self.interpreters.ended(pid, status)
        self.interpreters.check()

    def _handle(self, conn: socket.socket, listener: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            if peer_uid(conn) != os.getuid():
                conn.sendall(b'{"error": "refused: not the owning user"}\n')
                return
            raw = _read_line(conn)
            if len(raw) > MAX_REQUEST:
                conn.sendall(b'{"error": "refused: request too long"}\n')
                return
            request = json.loads(raw)
            if not isinstance(request, dict) or set(request) - {"run_dir", "become_password"}:
                raise ValueError("a request names run_dir (and become_password) only")
            run_dir = check_run_dir(self.state_dir, request.get("run_dir"))
            password = request.get("become_password")
            if password is not None and not isinstance(password, str):
                raise ValueError("become_password must be a string")
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"error": f"refused: {exc}"}).encode() + b"\n")
            return
        for _ in range(10):  # the lane's run may have written its result and not yet exited
            self._reap()
            if self.interpreters.lane is None:
                break
            time.sleep(0.005)
        lane = self.interpreters.for_child((listener, conn))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the job child: never returns
            code = 1
            try:
                listener.close()
                conn.close()
                self.interpreters.in_child(lane)
                code = _child(run_dir, password)
            except BaseException:  # the run's log says why; the zygote is not affected
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        del password
        self.children.add(pid)
        if lane:
            self.interpreters.taken(pid)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _child(run_dir: Path, password: str | None) -> int:
    """In the forked child: a session and output of its own, the run's environment, then the run."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    fd = os.open(run_dir / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(run_dir)
    import carrier.ansible.worker as worker
    from carrier.ansible.runner import RUN_MARK_ENV, SPEC_FILE, RunSpec, read_result

    spec = RunSpec.from_json((run_dir / SPEC_FILE).read_text(encoding="utf-8"))
    os.environ.clear()  # what a cold worker gets (carrier.ansible.runner.start_worker)
    os.environ.update(spec.env)
    os.environ["PYTHONPATH"] = _package_parent()
    os.environ[RUN_MARK_ENV] = str(run_dir)

    code = worker.run(run_dir, warm=True, become_password=password)
    result = read_result(run_dir)
    if result is None or result.status not in ("successful", "failed"):
        return LEFT_TASKS  # cancelled, timed out or broken: a task may still run on the hosts
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[1] not in KINDS or not _KEY_RE.fullmatch(args[2]):
        print("usage: python -m carrier.ansible.zygote STATE_DIR playbook|adhoc KEY", file=sys.stderr)
        return 2
    return Zygote(Path(args[0]), args[1], args[2]).serve()


if __name__ == "__main__":
    sys.exit(main())
