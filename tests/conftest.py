"""Shared fixtures. Integration tests use the real sandbox, started once per session by the same
code `carrier sandbox up` runs, so CI tests what a user runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from carrier.sandbox.manager import Sandbox


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end, stop by pid the warm Ansible workers of state dirs under this session's
    tmp_path (they would idle on for ``IDLE_EXIT``; sandbox ones end with their directory)."""
    yield
    from carrier.ansible.zygote import stop_zygotes

    base = tmp_path_factory.getbasetemp()
    for sock_dir in base.glob("**/run/zygote"):
        stop_zygotes(sock_dir.parent.parent)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """A running sandbox in a fresh directory under /var/tmp (the dovecot user must reach it).

    Ports are the defaults a user gets; set CARRIER_TEST_PORT_OFFSET to run the suite beside a
    sandbox you keep up for `make run`.
    """
    if os.geteuid() != 0:
        pytest.fail("integration tests need root: the sandbox runs sshd and dovecot (CI runs as root)")
    offset = int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
    root = Path(tempfile.mkdtemp(prefix="carrier-test-", dir="/var/tmp"))
    root.chmod(0o755)
    box = Sandbox(root, port_offset=offset)
    try:
        box.up()
        yield box
    finally:
        box.destroy()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- PostgreSQL


class PgCluster:
    """The session's PostgreSQL (the sandbox's own component); ``fresh_url()`` is an empty schema."""

    def __init__(self, component: Any) -> None:
        self.component = component
        self._count = 0

    def url(self) -> str:
        return str(self.component.url())

    def fresh_url(self) -> str:
        """A URL whose search_path is a new, empty schema: each test gets its own database state."""
        import secrets

        import psycopg

        self._count += 1
        schema = f"t{self._count}_{secrets.token_hex(4)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[arg-type]  # a generated name
        return f"{self.url()}?options=-csearch_path%3D{schema}"

    def fresh_store(self) -> tuple[str, dict[str, str]]:
        """A fresh schema: its URL (with the password, for the test's own reads) and the
        carrier.yml ``store:`` section for it (URL without the password, and the password file)."""
        url = self.fresh_url()
        plain = url.replace(f":{quote(self.component._password(), safe='')}@", "@", 1)
        return url, {"url": plain, "password_file": str(self.component.password_file)}


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A real PostgreSQL (Debian's binaries) started for the session on the sandbox's PostgreSQL
    port at CARRIER_TEST_PORT_OFFSET, in its own directory; stopped by pid at the end."""
    from carrier.sandbox.layout import Layout, Ports
    from carrier.sandbox.postgres import Postgres

    offset = int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
    root = Path(tempfile.mkdtemp(prefix="carrier-pg-", dir="/var/tmp"))
    root.chmod(0o755)
    component = Postgres(Layout(root, Ports.with_offset(offset)))
    try:
        component.prepare()
        component.start()
        yield PgCluster(component)
    finally:
        component.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A PostgreSQL store URL with a schema of its own (empty)."""
    return pg_cluster.fresh_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Run a store test on both dialects: None (the SQLite file) or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))
