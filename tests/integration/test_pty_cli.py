"""The PTY commands as people use them, each a separate process against the sandbox's carrier.yml:
start (tmux: returns, the job lives on), input with named keys, screen, attach in a real terminal
(keys pass through, the detach key leaves the job running), and a plain job followed to its end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[2]


def cli(sandbox: Sandbox, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carrier.jobs.ptycli", *args], env=_env(sandbox),
        capture_output=True, text=True, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL, check=False,
    )


def _env(sandbox: Sandbox) -> dict[str, str]:
    return {**os.environ, "CARRIER_CONFIG": str(_admin_config(sandbox))}


def _admin_config(sandbox: Sandbox) -> Path:
    """The sandbox carrier.yml (same state) with the local user acting as admin: these jobs run
    `sh -c`, which a role without shell may not (carrier.auth.policy)."""
    from mail_support import write_secret
    from ruamel.yaml import YAML

    from carrier.sandbox.manager import dump_yaml

    path = sandbox.layout.config_file.with_name("carrier-pty-admin.yml")
    if not path.exists():
        data = YAML(typ="safe").load(sandbox.layout.config_file.read_text())
        data["mcp"] = {**data["mcp"], "stdio_role": "admin"}
        write_secret(path, dump_yaml(data))
    return path


def test_start_input_screen_attach(sandbox: Sandbox) -> None:
    started = cli(sandbox, "start", "--cols", "60", "--rows", "12", "web1", "--",
                  "sh", "-c", "echo ready; while read l; do echo got:$l; done")
    assert started.returncode == 0, started.stderr
    match = re.search(r"(j-[a-z2-7]{12}) running on web1 \(tmux\)", started.stdout)
    assert match is not None, started.stdout
    job_id = match.group(1)
    assert "|ready" in started.stdout and started.stdout.count("+" + "-" * 60 + "+") == 2

    # A later process drives the job the first one started.
    typed = cli(sandbox, "input", job_id, "--keys", "enter", "hello")
    assert typed.returncode == 0, typed.stderr
    assert "|got:hello" in typed.stdout

    bad = cli(sandbox, "input", job_id, "--keys", "upp")
    assert bad.returncode == 1 and "unknown key 'upp'" in bad.stderr

    shown = cli(sandbox, "screen", "--plain", job_id)
    assert shown.returncode == 0 and shown.stdout.splitlines()[:3] == ["ready", "hello", "got:hello"]

    # attach in a real terminal: keys go through, Ctrl-] detaches, the job keeps running.
    child = pexpect.spawn(sys.executable, ["-m", "carrier.jobs.ptycli", "attach", job_id, "--no-resize"],
                          env=_env(sandbox), cwd=str(REPO), dimensions=(12, 60), timeout=30, encoding="utf-8")
    try:
        child.expect("got:hello")
        child.send("from attach\r")
        child.expect("got:from attach")
        child.send("\x1d")
        child.expect("detached from " + job_id)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    shown = cli(sandbox, "screen", "--json", job_id)
    assert shown.returncode == 0 and "got:from attach" in shown.stdout
    done = cli(sandbox, "input", "--no-screen", job_id, "--keys", "ctrl-d")
    assert done.returncode == 0, done.stderr
    ended = cli(sandbox, "input", job_id, "late")
    assert ended.returncode == 1 and "has ended" in ended.stderr


def test_plain_job_is_followed_to_its_end(sandbox: Sandbox) -> None:
    run = cli(sandbox, "start", "--mode", "plain", "web2", "--", "sh", "-c", "echo one; echo two; exit 3")
    assert run.returncode == 2
    assert "one\ntwo" in run.stdout
    assert "failed: exited with status 3" in run.stderr and "failed: failed" not in run.stderr


def test_unknown_job(sandbox: Sandbox) -> None:
    shown = cli(sandbox, "screen", "j-aaaaaaaaaaaa")
    assert shown.returncode != 0 and "no job j-aaaaaaaaaaaa" in shown.stderr
    shown = cli(sandbox, "screen", "not-a-job")
    assert shown.returncode != 0 and "invalid job id" in shown.stderr
