"""The `carrier` command as a user runs it: a real subprocess, against the real sandbox."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from carrier import __version__
from carrier.sandbox.manager import Sandbox


def carrier(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carrier", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def test_version() -> None:
    done = carrier("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"carrier, version {__version__}"


def _config(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    (tmp_path / "inventory").mkdir(exist_ok=True)
    (tmp_path / "inventory" / "hosts.yml").write_text("all: {hosts: {web1: {}}}\n")
    path = tmp_path / "carrier.yml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_check_loose_mode_names_the_chmod(tmp_path: Path) -> None:
    path = _config(tmp_path, "inventory: inventory\n", 0o644)
    done = carrier("check", "--config", str(path))
    assert done.returncode == 1
    assert f"chmod 600 {path}" in done.stderr
    assert done.stdout == ""


def test_check_lists_every_problem(tmp_path: Path) -> None:
    text = (
        "inventory: inventory\n"
        "bogus_key: 1\n"
        "mcp: {port: abc}\n"
        "accounts:\n"
        "  - {name: main, address: c@example.test, password: hunter22,\n"
        "     imap: {host: imap.example.test}, smtp: {host: smtp.example.test}}\n"
    )
    done = carrier("check", "--config", str(_config(tmp_path, text)))
    assert done.returncode == 1
    assert done.stderr.startswith(f"{tmp_path / 'carrier.yml'}: 4 problems\n")
    assert "bogus_key" in done.stderr and "mcp.port" in done.stderr
    assert "password_file" in done.stderr  # the inline password is refused, naming the fix
    assert "hunter22" not in done.stderr


def test_check_missing_file_is_one_line(tmp_path: Path) -> None:
    done = carrier("check", "--config", str(tmp_path / "nope.yml"))
    assert done.returncode == 1
    assert done.stderr.startswith("carrier: error:") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_check_sandbox_config_ok(sandbox: Sandbox) -> None:
    done = carrier("check", "--config", str(sandbox.layout.config_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ok")


def test_sandbox_status_and_env_commands(sandbox: Sandbox) -> None:
    root = str(sandbox.layout.root)
    status = carrier("sandbox", "status", "--dir", root)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("dovecot", "smtp", "keyserver", "sshd"):
        assert name in status.stdout
    env = carrier("sandbox", "env", "--dir", root)
    assert env.returncode == 0
    shown = subprocess.run(["bash", "-c", env.stdout + '\necho "$CARRIER_CONFIG|$CARRIER_SANDBOX_DIR"'],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shown == f"{sandbox.layout.config_file}|{sandbox.layout.root}"


def _serve(config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "carrier", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _until_ready(proc: subprocess.Popen[str], timeout: float = 60) -> list[dict[str, object]]:
    assert proc.stderr is not None
    lines: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(json.loads(line))  # every stderr line is one JSON object
        if lines[-1]["msg"] == "carrier ready":
            return lines
    pytest.fail(f"carrier serve never became ready: {lines}")


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    return _ended(proc)


def _ended(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """stdout and stderr once ``proc`` ended by itself, or a failure (and a kill: a `carrier serve`
    left running would answer the mail of every later test on this sandbox)."""
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        pytest.fail("carrier serve did not stop within 30 s of SIGTERM")
    assert proc.returncode == 0, err
    return out, err


def test_serve_stops_on_a_sigterm_delivered_to_any_of_its_threads(sandbox: Sandbox) -> None:
    """The kernel hands a process's signal to any thread; Python runs the handler on the main one.
    Each thread of `carrier serve` gets a SIGTERM of its own (tgkill), the main thread last of all."""
    proc = _serve(sandbox.layout.config_file)
    try:
        _until_ready(proc)
        tids = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
        assert len(tids) >= 3, tids  # listener, outbox, notifier, scheduler, jobs, http...
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.tgkill(proc.pid, tids[-1], signal.SIGTERM) == 0, ctypes.get_errno()
    finally:
        _, err = _ended(proc)
    assert "stopped" in err


def test_serve_runs_against_the_sandbox(sandbox: Sandbox) -> None:
    """The main job: starts, opens the store, logs in to IMAP and SMTP, stops on SIGTERM."""
    config = sandbox.layout.config_file
    password = sandbox.layout.password_file("carrier").read_text().strip()
    proc = _serve(config)
    try:
        lines = _until_ready(proc)
        # The MCP HTTP door is up with the sandbox certificate and refuses a call without a token.
        context = ssl.create_default_context(cafile=str(sandbox.layout.tls_cert))
        url = f"https://127.0.0.1:{18443 + sandbox.layout.ports.ssh - 2222}/mcp"
        request = urllib.request.Request(url, data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=10)  # noqa: S310 (https, fixed URL)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    finally:
        out, err = _stop(proc)
    messages = [line["msg"] for line in lines]
    assert "imap ok" in messages and "smtp ok" in messages
    assert "mcp http door ready" in messages
    ready = lines[-1]
    assert ready["account_problems"] == 0 and ready["accounts"] == ["carrier"]
    assert out == ""  # stdout belongs to the MCP stdio transport
    assert password not in err + json.dumps(lines)
    db = sandbox.layout.carrier_state_dir / "carrier.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert "stopped" in err


def test_serve_with_wrong_password_says_so_and_never_logs_it(sandbox: Sandbox) -> None:
    wrong = "not-the-password-4711"
    proc = _serve(sandbox.layout.config_file, env={"EMAIL_PASS": wrong})
    try:
        lines = _until_ready(proc)
    finally:
        _, err = _stop(proc)
    failures = [line for line in lines if line["msg"] == "mail account unusable"]
    assert failures and "login as carrier@example.test refused" in str(failures[0]["error"])
    assert lines[-1]["account_problems"] == 1
    assert wrong not in err and wrong not in json.dumps(lines)
