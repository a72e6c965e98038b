"""Shared fixtures. Integration tests use the real sandbox, started once per session by the same
code `carrier sandbox up` runs, so CI tests what a user runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from carrier.sandbox.manager import Sandbox


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
