"""Interoperability: the official MCP Inspector CLI (Node, pinned) lists and calls Carrier's tools over
stdio and over HTTPS with a bearer token; without the token it is refused.

The Inspector is installed from the npm registry into a cache directory on first use
(``npm install @modelcontextprotocol/inspector@INSPECTOR_VERSION``); node and npm must be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp_http_support import issue, load, running_door, write_door_config

from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

INSPECTOR_VERSION = "2.12.0"
CACHE = Path(os.environ.get("CARRIER_INSPECTOR_DIR", f"/var/tmp/carrier-inspector-{INSPECTOR_VERSION}"))
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inspector() -> Path:
    binary = CACHE / "node_modules" / ".bin" / "mcp-inspector"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("the Inspector test needs node and npm (apt-get install nodejs npm)")
    CACHE.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error",
         f"@modelcontextprotocol/inspector@{INSPECTOR_VERSION}"],
        cwd=CACHE, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0 and binary.exists(), done.stderr
    return binary


def run_cli(binary: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), "--cli", *args], capture_output=True, text=True, timeout=180,
                          check=False, cwd=REPO, env={**os.environ, **(env or {})})


def as_json(out: str) -> Any:
    return json.loads(out[out.index("{"):])


def test_inspector_over_stdio(sandbox: Sandbox, inspector: Path, tmp_path: Path) -> None:
    config = write_door_config(sandbox, tmp_path, port_shift=9)
    # The Inspector takes --config for itself: the server gets its config through the environment.
    server = ["-e", f"CARRIER_CONFIG={config}", "--cwd", str(REPO), sys.executable, "-m", "carrier.mcp.cli"]
    listed = run_cli(inspector, *server, "--method", "tools/list")
    assert listed.returncode == 0, listed.stderr
    names = {t["name"] for t in as_json(listed.stdout)["tools"]}
    assert {"ssh_exec", "job_list", "playbook_run", "mail_inbox_list"} <= names
    called = run_cli(inspector, *server, "--method", "tools/call", "--tool-name", "inventory_hosts",
                     "--tool-arg", "pattern=db")
    assert called.returncode == 0, called.stderr
    result = as_json(called.stdout)
    assert result["structuredContent"]["hosts"][0]["name"] == "db1"


def test_inspector_over_https_with_token(sandbox: Sandbox, inspector: Path, tmp_path: Path) -> None:
    config = load(write_door_config(sandbox, tmp_path, port_shift=10))
    token, _ = issue(config, "inspector@example.test", "operator")
    env = {"NODE_EXTRA_CA_CERTS": str(sandbox.layout.tls_cert)}
    with running_door(config) as door:
        common = [door.url, "--transport", "http"]
        listed = run_cli(inspector, *common, "--header", f"Authorization: Bearer {token}",
                         "--method", "tools/list", env=env)
        assert listed.returncode == 0, listed.stderr + listed.stdout
        assert "ssh_exec" in {t["name"] for t in as_json(listed.stdout)["tools"]}
        called = run_cli(inspector, *common, "--header", f"Authorization: Bearer {token}",
                         "--method", "tools/call", "--tool-name", "ssh_exec",
                         "--tool-arg", "host_or_pattern=web1", "--tool-arg", "command=echo interop-ok",
                         env=env)
        assert called.returncode == 0, called.stderr + called.stdout
        result = as_json(called.stdout)
        assert not result.get("isError"), result
        assert result["structuredContent"]["hosts"][0]["stdout"].strip() == "interop-ok"
        # Without the token the server answers 401 + WWW-Authenticate: the Inspector asks for auth.
        refused = run_cli(inspector, *common, "--stored-auth-only", "--method", "tools/list", env=env)
        assert refused.returncode != 0
        assert '"auth_required"' in refused.stderr, refused.stderr + refused.stdout
