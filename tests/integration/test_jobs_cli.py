"""The job commands (`run`, `exec`, `jobs`, `job show|output|kill`, `hosts`, `playbooks`) against the
sandbox, through click as a user runs them: output, exit status 0/2, JUnit report, bad input."""

from __future__ import annotations

import json
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from ansible_support import BUNDLED, short_tmpdir, until, write_config, write_inventory, write_playbooks
from click.testing import CliRunner, Result

from carrier.ansible.ssh import SshControl
from carrier.jobs.cli import COMMANDS, job_group
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox


@click.group()
def carrier() -> None:
    """Stands in for carrier.cli.main, which registers the same commands."""


for _command in COMMANDS:
    carrier.add_command(_command)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    root = short_tmpdir("cjc-")
    yield root
    SshControl(root / "state").close_all()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def config(sandbox: Sandbox, workdir: Path) -> Path:
    inventory = write_inventory(sandbox, workdir / "inventory")
    playbooks = write_playbooks(workdir / "playbooks")
    return write_config(sandbox, workdir / "carrier.yml", state=workdir / "state", inventory=inventory,
                        playbook_dirs=[playbooks, BUNDLED])


def _with_role(config: Path, role: str) -> Path:
    """The same configuration (same state), the local user acting with ``role``."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(config.read_text())
    data["mcp"]["stdio_role"] = role
    path = config.with_name(f"carrier-{role}.yml")
    with open(path, "w") as fh:
        yaml.dump(data, fh)
    path.chmod(0o600)
    return path


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(carrier, [args[0], "--config", str(config), *args[1:]], catch_exceptions=False)


def cli_job(config: Path, sub: str, *args: str) -> Result:
    return CliRunner().invoke(carrier, ["job", sub, "--config", str(config), *args], catch_exceptions=False)


def test_run_wait_prints_progress_and_exits_0(config: Path) -> None:
    result = cli(config, "run", "ping", "--limit", "web", "--wait")
    assert result.exit_code == 0, result.output
    assert "ok: [web1]" in result.output and "ok: [web2]" in result.output
    assert "== succeeded: succeeded: web1 ok=1 changed=0; web2 ok=1 changed=0" in result.output


def test_run_failure_exits_2_and_writes_junit(config: Path, workdir: Path) -> None:
    report = workdir / "report.xml"
    result = cli(config, "run", "fail", "-l", "web", "--junit", str(report))
    assert result.exit_code == 2, result.output
    assert "== failed: task failed: 'Fail on web2' on web2: non-zero return code" in result.output
    root = ET.fromstring(report.read_text().split("\n", 1)[1])  # noqa: S314 (written by this test)
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("2", "1", "1")
    failure = root.find("testcase[@classname='web2']/failure")
    assert failure is not None and failure.get("message") == "non-zero return code"


def test_run_with_extra_vars_check_and_json(config: Path) -> None:
    result = cli(config, "run", "disk_usage", "-l", "db1", "-e", "path=/", "-e", "warn_percent=100",
                 "--check", "--wait", "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.output[result.output.index('{\n  "id"'):])
    assert view["status"] == "succeeded" and view["spec"]["check"] is True
    assert view["spec"]["extra_vars"] == {"path": "/", "warn_percent": 100}


def test_run_without_wait_returns_once_started(config: Path) -> None:
    result = cli(config, "run", "slow", "-l", "web1", "-e", "seconds=1")
    assert result.exit_code == 0, result.output
    job_id = result.output.split()[0]
    assert job_id.startswith("j-") and "carrier job output" in result.output
    # Nobody supervises it now (no serve): `job output --follow` takes it over and sees it end.
    follow = cli_job(config, "output", job_id, "--follow")
    assert follow.exit_code == 0, follow.output
    assert "== succeeded: succeeded: web1 ok=2 changed=2" in follow.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "../../etc/passwd"], "invalid playbook name '../../etc/passwd'"),
        (["run", "ping", "-l", "web1;id"], "the host pattern 'web1;id' contains ';'"),
        (["run", "ping", "-e", "ansible_ssh_common_args=-oProxyCommand=id"],
         "unknown extra var 'ansible_ssh_common_args' for playbook ping"),
        (["run", "slow", "-e", "seconds={{ 7 }}"], "extra var seconds must be a whole number"),
        (["exec", "web;id", "--", "true"], "contains ';'"),
        (["exec", "nosuch", "--", "true"], "unknown host or group 'nosuch'"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(config: Path, args: list[str], message: str) -> None:
    result = cli(config, *args)
    assert result.exit_code == 1
    assert result.output.startswith("carrier: error: ") and message in result.output
    assert result.output.count("\n") == 1


def test_missing_playbook_is_refused_before_any_job(config: Path) -> None:
    before = cli(config, "jobs", "--json").output
    result = cli(config, "run", "nope", "--wait")
    assert result.exit_code == 1  # the same answer as by mail and MCP: a clear error, no job
    assert "no playbook named 'nope'" in result.output
    assert cli(config, "jobs", "--json").output == before


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "j-../../../x", "x"])
def test_job_ids_are_checked(config: Path, job_id: str) -> None:
    for sub in ("show", "output", "kill"):
        result = cli_job(config, sub, job_id)
        assert result.exit_code == 1
        assert "invalid job id" in result.output


def test_exec_prints_each_host_and_exits_by_result(config: Path) -> None:
    # sh is a shell: the operator (no shell) may not run it, even as an argv; the admin role may.
    refused = cli(config, "exec", "web", "--", "sh", "-c", "echo hi from $(id -un)")
    assert refused.exit_code == 1
    assert "not allowed: role operator has no shell: sh is a shell (needs shell: true)" in refused.output
    admin = _with_role(config, "admin")
    ok = cli(admin, "exec", "web", "--", "sh", "-c", "echo hi from $(id -un)")
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("hi from carrier-sbx") == 2
    assert "== web1: ok (rc 0)" in ok.output and "== web2: ok (rc 0)" in ok.output
    literal = cli(config, "exec", "db1", "--", "echo", "$(id)", ";", "ls")
    assert "$(id) ; ls" in literal.output  # an argv, not a shell line
    failed = cli(admin, "exec", "db1", "--", "sh", "-c", "echo bad >&2; exit 4")
    assert failed.exit_code == 2
    assert "== db1: failed (rc 4)" in failed.output and "-- stderr:\nbad" in failed.output
    # The CLI is decided by the policy too: the local user's role (mcp.stdio_role, default
    # operator) has no shell, so --shell is refused; a role with a shell may.
    refused = cli(config, "exec", "--shell", "db1", "--", "echo $((2+2)) | tr 4 x")
    assert refused.exit_code == 1 and "not allowed: role operator may not use a shell" in refused.output
    shell = cli(_with_role(config, "admin"), "exec", "--shell", "db1", "--", "echo $((2+2)) | tr 4 x")
    assert shell.exit_code == 0 and "\nx\n" in shell.output
    data = json.loads(cli(config, "exec", "--json", "web1", "--", "uname", "-s").output)
    assert data["job"]["status"] == "succeeded" and data["results"][0]["stdout"] == "Linux\n"


def test_jobs_show_output_and_kill(config: Path) -> None:
    started = cli(config, "run", "slow", "-l", "db1", "-e", "seconds=120")
    job_id = started.output.split()[0]
    listed = cli(config, "jobs", "--status", "running")
    assert job_id in listed.output and "slow" not in listed.output.splitlines()[0]
    killer: dict[str, Result] = {}
    thread = threading.Thread(target=lambda: killer.setdefault("r", cli_job(config, "kill", job_id)))
    thread.start()
    thread.join(120)
    assert killer["r"].exit_code == 0, killer["r"].output
    assert f"{job_id} cancelled: cancelled by local:" in killer["r"].output
    show = cli_job(config, "show", job_id)
    assert "status   cancelled (cancelled)" in show.output and "hosts    db1" in show.output
    out = cli_job(config, "output", job_id, "--cursor", "2")
    assert "next cursor:" in out.output
    as_json = json.loads(cli_job(config, "output", job_id, "--json").output)
    seqs = [e["seq"] for e in as_json["events"]]
    assert seqs == list(range(1, as_json["next_cursor"] + 1))
    listed_json = json.loads(cli(config, "jobs", "--json", "-n", "3").output)
    assert listed_json[0]["id"] in (job_id, listed_json[0]["id"])
    assert {v["status"] for v in listed_json} <= {"succeeded", "failed", "cancelled", "running", "queued"}


def test_hosts_and_playbooks(config: Path) -> None:
    hosts = cli(config, "hosts", "web")
    assert hosts.exit_code == 0
    assert hosts.output.splitlines() == ["web1                     web", "web2                     web"]
    books = cli(config, "playbooks")
    assert "service_restart (admin): Restart a service" in books.output
    assert "    lines: int [default 50] how many lines" in books.output
    data = json.loads(cli(config, "playbooks", "--json").output)
    assert {"ping", "facts", "fail", "slow"} <= {p["name"] for p in data}


def test_job_group_can_be_extended() -> None:
    @job_group.command("hello")
    def hello() -> None:
        click.echo("extended")

    try:
        result = CliRunner().invoke(carrier, ["job", "hello"])
        assert result.output == "extended\n"
    finally:
        job_group.commands.pop("hello")


def test_wait_after_kill_is_quick_to_report(config: Path) -> None:
    """A queued-then-killed job never runs (kill on a job that has not started)."""
    result = cli(config, "run", "slow", "-l", "web2", "-e", "seconds=30")
    job_id = result.output.split()[0]
    killed = cli_job(config, "kill", job_id)
    assert killed.exit_code == 0
    until(lambda: "cancelled" in cli_job(config, "show", job_id).output, timeout=60, what="cancelled")
    time.sleep(0)
