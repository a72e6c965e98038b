"""Nothing runs on the Carrier controller through any door (issue 18, item 1): Ansible's implicit
localhost (``localhost``, ``127.0.0.1``, ``::1``, ``all:localhost``, ``web1,127.0.0.1``), an inventory
host with ``connection: local`` for a role without ``local: true``, and catalog playbooks that
delegate to the controller are refused by a signed mail through `carrier serve`, by an MCP client
session and by the `carrier` CLI process, each with a clear reason and no marker file made.

The markers live in a directory only root may write: the sandbox's ssh hosts log in as carrier-sbx,
so a marker there could only come from a command run on the controller as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from ansible_support import BUNDLED, short_tmpdir, write_inventory
from door_support import db_rows, identities, send_signed, serving, text_of, wait_replies
from mail_support import token
from mcp.client.client import Client
from mcp_http_support import error_of, load, write_door_config
from ruamel.yaml import YAML

from carrier.ansible.ssh import SshControl
from carrier.mcp.server import build_server
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

IMPLICIT = ["localhost", "127.0.0.1", "::1", "all:localhost", "web1,127.0.0.1"]
SNEAKY = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: On the controller
      ansible.builtin.file: {{path: "{marker}", state: touch}}
      delegate_to: localhost
"""
DECLARED = """\
- hosts: all
  gather_facts: false
  connection: local
  tasks:
    - name: On the controller
      ansible.builtin.file: {{path: "{marker}", state: touch}}
"""


@pytest.fixture(scope="module")
def workdir(sandbox: Sandbox) -> Iterator[Path]:
    root = short_tmpdir("cctl-")
    (root / "markers").mkdir(mode=0o700)
    inventory = write_inventory(sandbox, root / "inventory")
    yaml = YAML()
    hosts_file = inventory / "hosts.yml"
    data = yaml.load(hosts_file.read_text())
    data["all"]["children"]["lab"]["hosts"]["here"] = {"ansible_connection": "local"}
    with open(hosts_file, "w") as fh:
        yaml.dump(data, fh)
    books = root / "playbooks"
    books.mkdir()
    (books / "sneaky.yml").write_text(SNEAKY.format(marker=root / "markers" / "sneaky"))
    (books / "declared.yml").write_text(DECLARED.format(marker=root / "markers" / "declared"))
    (books / "declared.meta.yml").write_text("description: runs on the controller\ncontroller: true\n")
    yield root
    SshControl(root / "state").close_all()
    shutil.rmtree(root, ignore_errors=True)


def markers(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "markers").iterdir())


def settings(workdir: Path) -> dict[str, object]:
    return {"inventory": str(workdir / "inventory"),
            "playbook_dirs": [str(workdir / "playbooks"), str(BUNDLED)]}


def test_a_signed_mail_runs_nothing_on_the_controller(sandbox: Sandbox, workdir: Path) -> None:
    marker = workdir / "markers"
    lines = [f"exec {p} touch {marker}/mail-{i}" for i, p in enumerate([*IMPLICIT, "here"])]
    lines += [f"job start localhost touch {marker}/mail-pty", f"job start here touch {marker}/mail-pty2",
              "run sneaky on web1", "run declared on web1"]
    tag = token("ctl")
    with identities(sandbox) as people, serving(sandbox, **settings(workdir)) as (serve, directory):
        serve.start()
        send_signed(sandbox, people["ops"], "\n".join(lines) + "\n", subject=tag)
        [reply] = wait_replies(sandbox, "ops", tag, 1, settle=2.0)
        jobs = db_rows(directory / "state", "SELECT id, target FROM jobs")
    text = text_of(reply)
    for pattern in IMPLICIT:
        assert f"{pattern!r} is not in the inventory: it would be Ansible's implicit localhost" in text \
            or f"in pattern {pattern!r} is not in the inventory" in text, (pattern, text)
    assert ("selects here, the Carrier controller itself" in text
            or "may not target the Carrier controller (here)" in text), text
    assert "playbook sneaky runs tasks on the Carrier controller" in text, text
    assert "delegate_to 'localhost'" in text and "does not say `controller: true`" in text, text
    assert "playbook declared runs tasks on the Carrier controller" in text, text
    assert "only a role with `local: true` may run it" in text, text
    assert jobs == []
    assert markers(workdir) == []


def test_an_mcp_client_runs_nothing_on_the_controller(sandbox: Sandbox, workdir: Path) -> None:
    config = load(write_door_config(sandbox, workdir / "mcp", port_shift=9,
                                    extra={**settings(workdir), "state_dir": str(workdir / "state")}))
    server, context = build_server(config, modules=("carrier.mcp.tools_ops",))
    marker = workdir / "markers"

    async def session() -> list[str]:
        texts = []
        async with Client(server) as client:
            for i, pattern in enumerate([*IMPLICIT, "here"]):
                texts.append(error_of(await client.call_tool(
                    "ssh_exec", {"host_or_pattern": pattern, "command": f"touch {marker}/mcp-{i}"})))
            for host in ("localhost", "here"):
                texts.append(error_of(await client.call_tool(
                    "job_start", {"host": host, "command": f"touch {marker}/mcp-pty"})))
            for book in ("sneaky", "declared"):
                texts.append(error_of(await client.call_tool(
                    "playbook_run", {"playbook": book, "limit": "web1", "wait": True})))
        return texts

    try:
        texts = anyio.run(session)
    finally:
        context.close()
    implicit, here, ptys, books = texts[:5], texts[5], texts[6:8], texts[8:]
    assert all("implicit localhost, the Carrier controller itself" in t for t in implicit), implicit
    # `here` is in the inventory but is this machine: the policy refuses it to a role without local.
    assert "may not target the Carrier controller (here)" in here, here
    assert "implicit localhost" in ptys[0] and "may not target the Carrier controller (here)" in ptys[1], ptys
    assert "delegate_to 'localhost'" in books[0], books
    assert "only a role with `local: true` may run it" in books[1], books
    assert db_rows(workdir / "state", "SELECT id FROM jobs") == []
    assert markers(workdir) == []


def carrier_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carrier", args[0], "--config", str(config), *args[1:]],
                          capture_output=True, text=True, timeout=120, env={**os.environ}, check=False)


def test_the_cli_runs_nothing_on_the_controller(sandbox: Sandbox, workdir: Path) -> None:
    config = write_door_config(sandbox, workdir / "cli", port_shift=10,
                               extra={**settings(workdir), "state_dir": str(workdir / "state")})
    marker = workdir / "markers"
    for i, pattern in enumerate([*IMPLICIT, "here"]):
        done = carrier_cli(config, "exec", pattern, "--", "touch", f"{marker}/cli-{i}")
        assert done.returncode != 0, done
        assert "Carrier controller" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "carrier", "job", "start", "--config", str(config),
                           "localhost", "touch", f"{marker}/cli-pty"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "implicit localhost" in done.stderr, done
    for book, reason in (("sneaky", "delegate_to 'localhost'"), ("declared", "`local: true`")):
        done = carrier_cli(config, "run", book, "--limit", "web1", "--wait")
        assert done.returncode != 0 and reason in done.stderr, done
    assert db_rows(workdir / "state", "SELECT id FROM jobs") == []
    assert markers(workdir) == []
