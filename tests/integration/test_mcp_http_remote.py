"""`carrier remote ... run ping --wait --junit` against a real HTTPS door: exit codes, streamed
progress and the JUnit report; TLS by CA file and by pinned fingerprint (a wrong pin refuses);
`carrier cert` writes a pair the door serves with."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp_http_support import issue, load, running_door, write_door_config

from carrier.config import Config
from carrier.mcp.http import HttpDoor
from carrier.sandbox.manager import Sandbox
from carrier.tls import cert_fingerprint_sha256

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def door_config(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Config:
    return load(write_door_config(sandbox, tmp_path_factory.mktemp("mcp-remote"), port_shift=5))


@pytest.fixture(scope="module")
def door(door_config: Config) -> Iterator[HttpDoor]:
    with running_door(door_config) as running:
        yield running


def remote(url: str, token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI_TOKEN"}
    if token is not None:
        env["CI_TOKEN"] = token
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from carrier.mcp.cli import remote; remote()",
            "--url",
            url,
            "--token-env",
            "CI_TOKEN",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        check=False,
    )


def test_remote_run_ping_wait_junit(
    sandbox: Sandbox, door: HttpDoor, door_config: Config, tmp_path: Path
) -> None:
    token, _ = issue(door, "ci@example.test", "operator")
    report = tmp_path / "ping.xml"
    done = remote(
        door.url,
        token,
        "--ca-file",
        str(sandbox.layout.tls_cert),
        "run",
        "ping.yml",
        "--limit",
        "web",
        "--wait",
        "--junit",
        str(report),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "== job" in done.stdout and "== succeeded" in done.stdout
    suite = ET.parse(report).getroot()  # noqa: S314 (written by the test)
    assert suite.tag == "testsuite" and suite.get("failures") == "0" and suite.get("tests") == "2"
    assert sorted(c.get("name") or "" for c in suite.iter("testcase")) == ["web1", "web2"]


def test_remote_pinned_fingerprint(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    token, _ = issue(door, "ci@example.test", "operator")
    pin = cert_fingerprint_sha256(sandbox.layout.tls_cert)
    done = remote(door.url, token, "--pin-sha256", pin, "run", "ping", "--limit", "db1", "--wait")
    assert done.returncode == 0, done.stderr
    wrong = ":".join(["AB"] * 32)
    refused = remote(door.url, token, "--pin-sha256", wrong, "run", "ping", "--wait")
    assert refused.returncode == 1 and "not the pinned" in refused.stderr
    # Without a CA file or pin, the self-signed certificate is not trusted.
    untrusted = remote(door.url, token, "run", "ping", "--wait")
    assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_remote_errors_exit_1(sandbox: Sandbox, door: HttpDoor, door_config: Config) -> None:
    ca = str(sandbox.layout.tls_cert)
    no_token = remote(door.url, None, "--ca-file", ca, "run", "ping", "--wait")
    assert no_token.returncode == 1 and "CI_TOKEN is empty" in no_token.stderr
    bad = remote(door.url, "B" * 43, "--ca-file", ca, "run", "ping", "--wait")
    assert bad.returncode == 1 and "401" in bad.stderr
    token, _ = issue(door, "ci@example.test", "operator")
    missing = remote(door.url, token, "--ca-file", ca, "run", "no_such_book", "--wait")
    assert missing.returncode == 1 and "no playbook named 'no_such_book'" in missing.stderr


def test_remote_unreachable_host_exit_4(sandbox: Sandbox, tmp_path: Path) -> None:
    """A host whose sshd is not there: the recap marks it dark, the exit status is 4."""
    path = write_door_config(sandbox, tmp_path, port_shift=6)
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    hosts = (sandbox.layout.inventory_dir / "hosts.yml").read_text()
    (inventory / "hosts.yml").write_text(hosts)
    (inventory / "group_vars").mkdir()
    (inventory / "group_vars" / "all.yml").write_text(
        (sandbox.layout.inventory_dir / "group_vars" / "all.yml").read_text()
    )
    (inventory / "host_vars").mkdir()
    (inventory / "host_vars" / "db1.yml").write_text("ansible_port: 1\n")
    text = path.read_text().replace(str(sandbox.layout.inventory_dir), str(inventory))
    path.write_text(text)
    config = load(path)
    token, _ = issue(config, "ci@example.test", "operator")
    report = tmp_path / "r.xml"
    with running_door(config) as door:
        done = remote(
            door.url,
            token,
            "--ca-file",
            str(sandbox.layout.tls_cert),
            "run",
            "ping",
            "--limit",
            "web1,db1",
            "--junit",
            str(report),
        )
    assert done.returncode == 4, done.stderr + done.stdout
    cases = {c.get("name"): c for c in ET.parse(report).getroot().iter("testcase")}  # noqa: S314
    assert set(cases) == {"web1", "db1"}
    failure = cases["db1"].find("failure")
    assert failure is not None and failure.get("type") == "unreachable"
    assert cases["web1"].find("failure") is None


def test_cert_command_prints_fingerprint(sandbox: Sandbox, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    path = write_door_config(
        sandbox, tmp_path, port_shift=7, mcp={"tls_cert": str(cert), "tls_key": str(key)}
    )
    run = [sys.executable, "-c", "from carrier.mcp.cli import cert; cert()", "--config", str(path)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"SHA-256 fingerprint: {cert_fingerprint_sha256(cert)}" in done.stdout
    assert "--pin-sha256" in done.stdout and "CA-issued" in done.stdout
    assert key.stat().st_mode & 0o777 == 0o600
    again = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    config = load(path)
    token, _ = issue(config, "ci@example.test", "operator")
    with running_door(config) as door:
        done = remote(door.url, token, "--ca-file", str(cert), "run", "ping", "--limit", "web1", "--wait")
    assert done.returncode == 0, done.stderr


def test_carrier_mcp_http_command(sandbox: Sandbox, tmp_path: Path) -> None:
    """`carrier mcp --http` serves the HTTPS door until interrupted; `remote` runs a playbook through it."""
    import signal
    import socket
    import time

    path = write_door_config(sandbox, tmp_path, port_shift=11)
    config = load(path)
    token, _ = issue(config, "ci@example.test", "operator")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from carrier.mcp.cli import mcp; mcp()", "--config", str(path), "--http"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                socket.create_connection((config.mcp.bind_host, config.mcp.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "carrier mcp --http did not listen within 60 s"
                time.sleep(0.1)
        url = f"https://{config.mcp.bind_host}:{config.mcp.port}/mcp"
        done = remote(url, token, "--ca-file", str(sandbox.layout.tls_cert), "run", "ping", "--limit", "web2",
                      "--wait")
        assert done.returncode == 0, done.stderr
        assert "== succeeded" in done.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
