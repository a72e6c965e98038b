"""The sandbox PostgreSQL cluster (`carrier sandbox up --with-postgres`): Debian's ``postgresql``
binaries, a cluster in ``<sandbox>/postgres``, listening on the loopback only, stopped by pid.

PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres`` user the
Debian package creates; as any other user it belongs to that user. ``initdb`` makes the
``carrier`` role (password in the sandbox's secrets, scram-sha-256 over TCP) and the ``carrier``
database; ``url()`` is what carrier.yml's ``store.url`` gets.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.layout import LOOPBACK, Layout

PG_ROOT = Path("/usr/lib/postgresql")
ROLE = "carrier"
DATABASE = "carrier"
#: Connections allowed: every thread of two or three `carrier serve` instances has its own.
MAX_CONNECTIONS = 300


def pg_bin(name: str) -> str:
    """``/usr/lib/postgresql/<newest>/bin/<name>``; SandboxError naming the package when missing."""
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / name).exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not versions:
        raise SandboxError(
            f"PostgreSQL's {name} is missing (looked in {PG_ROOT}/*/bin): "
            "apt-get install postgresql (or run `make deps`)"
        )
    return str(versions[-1] / name)


class Postgres:
    """One cluster under ``root/postgres`` on ``LOOPBACK:port`` (a sandbox component)."""

    name = "postgres"

    def __init__(self, layout: Layout, *, base: Path | None = None) -> None:
        self.layout = layout
        self.base = base or layout.root / "postgres"
        self.data = self.base / "data"
        self.sockets = self.base / "run"
        self.log_file = layout.log_file(self.name)
        self.password_file = layout.secrets_dir / "postgres.password"

    @property
    def port(self) -> int:
        return self.layout.ports.postgres

    @property
    def enabled(self) -> bool:
        """Whether this sandbox was brought up with PostgreSQL (its cluster exists)."""
        return (self.data / "PG_VERSION").exists()

    def url(self, *, with_password: bool = True) -> str:
        """The database URL (carrier.yml gets it without the password, plus ``password_file``)."""
        login = f"{ROLE}:{quote(self._password(), safe='')}" if with_password else ROLE
        return f"postgresql://{login}@{LOOPBACK}:{self.port}/{DATABASE}"

    def ports(self) -> list[tuple[str, int, str]]:
        return [(LOOPBACK, self.port, "PostgreSQL")]

    # --- who runs it ---

    def _owner(self) -> tuple[int, int]:
        if os.geteuid() != 0:
            return os.getuid(), os.getgid()
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise SandboxError(
                "there is no postgres user (PostgreSQL refuses to run as root): apt-get install postgresql"
            ) from exc
        return entry.pw_uid, entry.pw_gid

    def _run(self, argv: list[str], what: str, timeout: float = 120.0) -> None:
        uid, gid = self._owner()
        kwargs: dict[str, object] = {}
        if os.geteuid() == 0:
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, cwd=self.base, **kwargs)  # type: ignore[call-overload]
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise SandboxError(f"{what} failed (exit {done.returncode}): {tail}; see {self.log_file}")

    def _password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise SandboxError(f"no PostgreSQL password in {self.password_file}: run `carrier sandbox up "
                               "--with-postgres`") from exc

    # --- component ---

    def prepare(self) -> None:
        """Create the cluster once (initdb), with the carrier role and database."""
        if self.enabled:
            return
        import secrets

        uid, gid = self._owner()
        self.layout.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(18) + "\n")
            self.password_file.chmod(0o600)
        for directory in (self.base, self.sockets):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(directory, uid, gid)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        pwfile = self.base / "initdb.pw"
        pwfile.write_text(self._password() + "\n")
        os.chown(pwfile, uid, gid)
        pwfile.chmod(0o600)
        try:
            self._run([pg_bin("initdb"), "-D", str(self.data), "-U", ROLE, f"--pwfile={pwfile}",
                       "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
                       "--locale=C.UTF-8", "--no-sync"], "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        # Loopback only, sockets in the sandbox, no fsync-free shortcuts.
        with open(self.data / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
            conf.write(f"listen_addresses = '{LOOPBACK}'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.sockets}'\nmax_connections = {MAX_CONNECTIONS}\n")
        self.start()
        try:
            self._psql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        finally:
            self.stop()

    def _psql(self, sql: str) -> None:
        import psycopg

        url = f"postgresql://{ROLE}:{quote(self._password(), safe='')}@{LOOPBACK}:{self.port}/postgres"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.encode())  # a fixed statement of this module

    def start(self) -> None:
        if self.running():
            return
        procs.ensure_ports_free(self.ports())
        # The port may have changed since initdb (a new --port-offset).
        self._set_port()
        uid, gid = self._owner()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.touch(mode=0o600)
        os.chown(self.log_file, uid, gid)  # pg_ctl, running as the cluster's owner, appends to it
        self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log_file), "-w", "-t", "60",
                   "start"], "pg_ctl start")
        procs.wait_for_port(LOOPBACK, self.port, what="PostgreSQL", log_file=self.log_file)

    def _set_port(self) -> None:
        conf = self.data / "postgresql.auto.conf"
        lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("port = ")]
        conf.write_text("\n".join([*lines, f"port = {self.port}"]) + "\n")

    def _pid(self) -> int | None:
        """The postmaster's pid from its pid file, if that process runs."""
        return procs.read_pid(self.data / "postmaster.pid")

    def stop(self) -> None:
        """Fast shutdown by pid (SIGINT: open sessions are ended), SIGKILL if it hangs."""
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and procs.pid_alive(pid):
            time.sleep(0.05)
        if procs.pid_alive(pid):
            procs.stop_pid(pid)

    def running(self) -> bool:
        return self._pid() is not None

    def pids(self) -> dict[str, int | None]:
        return {self.name: self._pid()}
