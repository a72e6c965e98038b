"""The deploy roles under Molecule: `molecule test` per scenario (destroy, syntax, create, converge,
idempotence, verify, destroy) against loopback sshd instances reached over real SSH.

The scenarios live in molecule/; what each checks on the host is in its verify.yml. Here we
check that the whole sequence passed, that the first converge changed the host and the second
changed nothing, and that destroy left nothing behind.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest

from carrier.sandbox.manager import Sandbox

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OFFSET = int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
PORT = 2222 + OFFSET
RECAP = re.compile(
    r"^(?P<host>carrier-\w+)\s+: ok=\d+\s+changed=(?P<changed>\d+)\s+unreachable=0\s+failed=0", re.M
)


def run_molecule(scenario: str, tmp_path: Path, extra_env: dict[str, str] | None = None) -> str:
    """`molecule test -s scenario` from the checkout; its whole output (also kept in tmp_path)."""
    env = dict(os.environ)
    env.update({
        # molecule runs ansible-playbook, ansible-config and friends from PATH.
        "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),
        # Its own state per run, so two runs with different port offsets never share it.
        "MOLECULE_EPHEMERAL_DIRECTORY": str(tmp_path / "molecule"),
        "CARRIER_TEST_PORT_OFFSET": str(OFFSET),
        "NO_COLOR": "1",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        **(extra_env or {}),
    })
    done = subprocess.run(
        [str(BIN / "molecule"), "test", "-s", scenario],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr
    (tmp_path / f"molecule-{scenario}.log").write_text(output)
    tail = "\n".join(output.splitlines()[-80:])
    assert done.returncode == 0, f"molecule test -s {scenario} failed:\n{tail}"
    return output


def check_sequence(output: str, scenario: str, host: str) -> None:
    for step in ("syntax", "create", "converge", "idempotence", "verify", "destroy"):
        assert f"{scenario} > {step}: Executed: Successful" in output, f"{step} did not pass"
    changed = [int(m["changed"]) for m in RECAP.finditer(output) if m["host"] == host]
    # converge, idempotence (the second converge), verify: in that order.
    assert len(changed) == 3, changed
    assert changed[0] > 0, "the first converge changed nothing: it did not deploy"
    assert changed[1] == 0, "the second converge changed something: the role is not idempotent"
    assert changed[2] == 0, "verify changed the host"


def assert_gone(user: str, paths: list[Path]) -> None:
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    left = [str(p) for p in paths if p.exists()]
    assert not left, f"destroy left {left}"


def test_carrier_server_role(sandbox: Sandbox, tmp_path: Path) -> None:
    """Carrier installed as a service; verify runs `carrier check` and `carrier serve` on the
    host, which logs in to the sandbox's IMAP and SMTP servers with the deployed password."""
    output = run_molecule("carrier_server", tmp_path, {"CARRIER_SANDBOX_DIR": str(sandbox.layout.root)})
    check_sequence(output, "carrier_server", "carrier-server")
    ident = f"server-{PORT}"
    assert_gone(f"cmol-{ident}", [
        Path(f"/run/carrier-molecule/sshd-{ident}"), Path(f"/opt/carrier-molecule/{ident}"),
        Path(f"/etc/carrier-molecule/{ident}"), Path(f"/var/lib/carrier-molecule/{ident}"),
        Path(f"/run/carrier-molecule/{ident}"),
        Path(f"/etc/systemd/system/carrier-molecule-{ident}.service"),
    ])


def test_carrier_target_role(tmp_path: Path) -> None:
    """A managed host prepared; verify logs in as the new user with Carrier's key (PTY, tmux,
    the one sudo command allowed, a forward refused)."""
    output = run_molecule("carrier_target", tmp_path)
    check_sequence(output, "carrier_target", "carrier-target")
    ident = f"target-{PORT}"
    assert_gone(f"cmol-{ident}", [
        Path(f"/run/carrier-molecule/sshd-{ident}"), Path(f"/home/cmol-{ident}"),
        Path(f"/etc/sudoers.d/cmol-{ident}"),
    ])


def run_role_locally(role: str, variables: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Apply ``role`` to localhost in check mode with ``variables`` (YAML lines under ``vars:``).

    Check mode: should a bad setting ever get past the role's checks, the run reports changes
    (the test fails) instead of making them on this machine.
    """
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        f"- hosts: localhost\n  connection: local\n  gather_facts: false\n"
        f"  vars:\n{variables}  roles: [{role}]\n"
    )
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(ROOT / "roles"), ANSIBLE_NOCOLOR="1",
               PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    argv = [str(BIN / "ansible-playbook"), "--check", "-i", "localhost,",
            "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


ACCOUNT = "    carrier_server_accounts: [{name: %s, address: c@x.test, imap: {host: i}, smtp: {host: s}}]\n"
KEY = "    carrier_target_authorized_keys: ['ssh-ed25519 AAAA x']\n"


@pytest.mark.parametrize(("variables", "expected"), [
    ("    carrier_server_accounts: []\n", "need at least one account"),
    ("    carrier_server_accounts: [{name: c, address: c@example.test, smtp: {host: s}}]\n",
     "missing required arguments: imap"),
    (ACCOUNT % "../x", "names of [a-z0-9_-]"),
    (ACCOUNT % "c" + "    carrier_server_state_dir: 'relative/state'\n", "absolute paths without"),
    (ACCOUNT % "c" + "    carrier_server_config_dir: '/etc/car rier'\n", "absolute paths without"),
    (ACCOUNT % "c" + "    carrier_server_tls: provided\n", "when carrier_server_tls is provided"),
    (ACCOUNT % "c" + "    carrier_server_signing_uid: Carrier\n", "an <address> in carrier_server_signing"),
])
def test_carrier_server_refuses_bad_settings(variables: str, expected: str, tmp_path: Path) -> None:
    done = run_role_locally("carrier_server", variables, tmp_path)
    assert done.returncode != 0
    assert expected in done.stdout + done.stderr
    assert "changed=0" in done.stdout


@pytest.mark.parametrize(("variables", "expected"), [
    ("    carrier_target_authorized_keys: []\n", "one public key per line"),
    # Two keys in one item (a newline inside): only the first line would get the options.
    ('    carrier_target_authorized_keys: ["ssh-ed25519 AAAA x\\nssh-rsa BBBB y"]\n',
     "one public key per line"),
    (KEY + "    carrier_target_sudo_commands: ['systemctl restart nginx']\n", "absolute paths with"),
    (KEY + "    carrier_target_sudo_commands: ['/usr/bin/id, /bin/sh']\n", "no commas"),
    (KEY + "    carrier_target_user: 'root; rm'\n", "a plain user name"),
])
def test_carrier_target_refuses_bad_settings(variables: str, expected: str, tmp_path: Path) -> None:
    done = run_role_locally("carrier_target", variables, tmp_path)
    assert done.returncode != 0
    assert expected in done.stdout + done.stderr
    assert "changed=0" in done.stdout
