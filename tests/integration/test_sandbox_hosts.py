"""The sandbox orchestrator with real servers: sshd hosts, GnuPG homes, carrier.yml, inventory, up/down.

The module fixture runs `Sandbox.up()` exactly as `carrier sandbox up` does (offset 200); tests that
need a sandbox of their own (down, port clash) use other offsets so nothing collides.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from carrier.errors import SandboxError
from carrier.sandbox import procs
from carrier.sandbox.gpg import GpgHomes
from carrier.sandbox.layout import HOSTS, IDENTITIES, LOGIN_USER, address
from carrier.sandbox.manager import ENV_IDENTITIES, Sandbox
from carrier.sandbox.sshd import SshHosts

pytestmark = pytest.mark.sandbox

#: This file's own sandboxes sit beside the session's (at CARRIER_TEST_PORT_OFFSET): at that offset
#: plus these amounts (chosen so that no port of one sandbox meets a port of another).
BASE = int(os.environ.get("CARRIER_TEST_PORT_OFFSET", "0"))
OFFSET = BASE + 200


def _new_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="carrier-sbx-", dir="/var/tmp"))


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.fail("sandbox tests need root: the sandbox runs sshd and dovecot (CI runs as root)")
    sandbox = Sandbox(_new_root(), port_offset=OFFSET)
    try:
        sandbox.up()
        yield sandbox
    finally:
        sandbox.destroy()


def ssh(box: Sandbox, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", "-F", str(box.layout.ssh_config), *args],
        capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )


def yaml_load(path: Path) -> object:
    return YAML(typ="safe").load(path.read_text())


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (zombies have an empty one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry.name), cmdline))
    return found


# --- ssh hosts ---


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_each_host_runs_a_command_with_no_noise(box: Sandbox, host: str) -> None:
    done = ssh(box, host, "echo $((6*7))")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"42\n", b"")


def test_each_host_has_its_own_host_key(box: Sandbox) -> None:
    port = box.layout.ports.ssh
    scanned = {}
    for name, addr in HOSTS.items():
        out = subprocess.run(
            ["ssh-keyscan", "-t", "ed25519", "-p", str(port), addr],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        keys = [line.split()[1:3] for line in out.splitlines() if line and not line.startswith("#")]
        assert len(keys) == 1, out
        scanned[name] = " ".join(keys[0])
    assert len(set(scanned.values())) == len(HOSTS)

    known = {}
    for line in box.layout.known_hosts.read_text().splitlines():
        patterns, key_type, key = line.split()
        for pattern in patterns.split(","):
            known[pattern] = f"{key_type} {key}"
    for name, addr in HOSTS.items():
        assert known[f"[{addr}]:{port}"] == scanned[name]
        assert known[f"[{name}]:{port}"] == scanned[name]


def test_pty_sessions_are_allowed(box: Sandbox) -> None:
    done = ssh(box, "-tt", "-q", "-e", "none", "web1", "tty")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"/dev/pts/"), done.stdout


def test_unknown_host_key_is_refused(box: Sandbox, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    done = ssh(box, "-o", f"UserKnownHostsFile={empty}", "web1", "true")
    assert done.returncode == 255
    assert b"Host key verification failed" in done.stderr
    assert empty.read_text() == ""  # StrictHostKeyChecking=yes: nothing learned either


def test_password_login_is_refused(box: Sandbox) -> None:
    done = ssh(box, "-o", "PubkeyAuthentication=no",
               "-o", "PreferredAuthentications=password,keyboard-interactive", "web1", "true")
    assert done.returncode == 255
    # The server offers public keys only.
    assert b"Permission denied (publickey)" in done.stderr


def test_root_login_is_refused_even_with_the_sandbox_key(box: Sandbox) -> None:
    done = ssh(box, "-l", "root", "db1", "true")
    assert done.returncode == 255
    assert b"Permission denied" in done.stderr
    log = box.layout.log_file("sshd-db1").read_text()
    assert "User root from 127.0.0.1 not allowed" in log


def test_login_user_exists_with_a_quiet_shell(box: Sandbox) -> None:
    account = pwd.getpwnam(LOGIN_USER)
    assert account.pw_shell == "/bin/sh"
    assert Path(account.pw_dir).is_dir()


# --- up is idempotent and repairs ---


def test_up_again_starts_nothing_then_restarts_only_the_dead_host(box: Sandbox) -> None:
    before = box.status()
    assert before.all_running
    again = box.up()
    assert again.started == []
    assert [c.pids for c in again.components] == [c.pids for c in before.components]

    victim = box.layout.pid_file("sshd-web2")
    pid = int(victim.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while procs.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs.pid_alive(pid)
    assert not box.status().all_running

    repaired = box.up()
    assert repaired.started == ["sshd"]
    old = {k: v for c in before.components for k, v in c.pids.items()}
    new = {k: v for c in repaired.components for k, v in c.pids.items()}
    assert new["sshd-web2"] not in (None, pid)
    assert {k: v for k, v in new.items() if k != "sshd-web2"} == {
        k: v for k, v in old.items() if k != "sshd-web2"
    }
    assert ssh(box, "web2", "echo ok").stdout == b"ok\n"


def test_status_lists_every_component(box: Sandbox) -> None:
    report = box.status()
    assert report.root == box.layout.root
    assert [c.name for c in report.components] == ["oauth", "dovecot", "smtp", "keyserver", "sshd"]
    assert report.all_running
    sshd = report.components[-1]
    assert set(sshd.pids) == {f"sshd-{h}" for h in HOSTS}
    assert all(isinstance(pid, int) for pid in sshd.pids.values())
    assert ("127.0.0.11", 2222 + OFFSET, "sshd web1") in sshd.ports
    assert "dovecot" in report.render()


# --- env, carrier.yml, inventory ---


def test_env_lines_evaluate_to_the_sandbox_values(box: Sandbox) -> None:
    lines = box.env_lines()
    assert all(line.startswith("export ") for line in lines)
    names = ["CARRIER_CONFIG", "CARRIER_SANDBOX_DIR"]
    for identity in ENV_IDENTITIES:
        upper = identity.upper()
        names += [f"CARRIER_SANDBOX_{upper}_PASSWORD", f"CARRIER_SANDBOX_{upper}_GNUPGHOME"]
    script = "\n".join(lines) + "\n" + "".join(f'printf "%s\\n" "${name}"\n' for name in names)
    out = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    values = dict(zip(names, out, strict=True))
    layout = box.layout
    assert values["CARRIER_CONFIG"] == str(layout.config_file)
    assert values["CARRIER_SANDBOX_DIR"] == str(layout.root)
    for identity in ENV_IDENTITIES:
        password = layout.password_file(identity).read_text().strip()
        assert len(password) >= 16
        assert values[f"CARRIER_SANDBOX_{identity.upper()}_PASSWORD"] == password
        assert values[f"CARRIER_SANDBOX_{identity.upper()}_GNUPGHOME"] == str(layout.gnupg_home(identity))


def test_secrets_have_private_modes(box: Sandbox) -> None:
    assert box.layout.secrets_dir.stat().st_mode & 0o777 == 0o700
    for identity in IDENTITIES:
        assert box.layout.password_file(identity).stat().st_mode & 0o777 == 0o600
    assert box.layout.ssh_client_key.stat().st_mode & 0o777 == 0o600
    assert box.layout.gnupg_home("carrier").stat().st_mode & 0o777 == 0o700


def test_carrier_yml_is_private_and_names_the_right_keys(box: Sandbox) -> None:
    path = box.layout.config_file
    assert path.stat().st_mode & 0o777 == 0o600
    config = yaml_load(path)
    assert isinstance(config, dict)
    gpg = GpgHomes(box.layout)
    assert config["admins"] == [{"email": address("admin"), "fingerprint": gpg.fingerprint("admin")}]
    assert config["users"] == [
        {"email": address("ops"), "fingerprint": gpg.fingerprint("ops"), "role": "operator"}
    ]
    enrolled = {entry["email"] for entry in config["admins"] + config["users"]}
    assert address("newbie") not in enrolled
    account = config["accounts"][0]
    assert account["imap"]["port"] == box.layout.ports.imaps
    assert account["smtp"]["port"] == box.layout.ports.submission
    assert Path(account["password_file"]).read_text().strip()
    assert Path(account["imap"]["ca_file"]).exists()
    assert config["keyserver"]["url"] == f"http://127.0.0.1:{box.layout.ports.keyserver}"
    assert config["gnupg_home"] == str(box.layout.gnupg_home("carrier"))


def test_carrier_yml_passes_carriers_own_check(box: Sandbox) -> None:
    from carrier.config import check_config

    assert check_config(box.layout.config_file, {}) == []


def test_inventory_lists_three_hosts(box: Sandbox) -> None:
    inventory = yaml_load(box.layout.inventory_dir / "hosts.yml")
    assert isinstance(inventory, dict)
    hosts = {
        name: hostvars
        for group in inventory["all"]["children"].values()
        for name, hostvars in group["hosts"].items()
    }
    assert set(hosts) == set(HOSTS)
    for name, hostvars in hosts.items():
        assert hostvars["ansible_host"] == HOSTS[name]
        assert hostvars["ansible_port"] == box.layout.ports.ssh
        assert hostvars["ansible_user"] == LOGIN_USER
    group_vars = yaml_load(box.layout.inventory_dir / "group_vars" / "all.yml")
    assert isinstance(group_vars, dict)
    assert group_vars["ansible_pipelining"] is True
    assert "StrictHostKeyChecking=yes" in group_vars["ansible_ssh_extra_args"]


def test_ansible_reaches_every_host_with_host_key_checking(box: Sandbox, tmp_path: Path) -> None:
    ansible = Path(sys.executable).with_name("ansible")
    assert ansible.exists(), "ansible-core is a dependency: its `ansible` command must be in the venv"
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_NOCOLOR": "1",
    }
    done = subprocess.run(
        [str(ansible), "-i", str(box.layout.inventory_dir), "all", "-m", "ping", "-o"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(HOSTS)


# --- gpg ---


def _gpg(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_ops_signs_and_carrier_verifies_only_after_importing_the_key(box: Sandbox, tmp_path: Path) -> None:
    layout = box.layout
    signed = _gpg(layout.gnupg_home("ops"), "--clearsign", stdin="run uptime on web\n")
    assert signed.returncode == 0, signed.stderr
    assert "BEGIN PGP SIGNED MESSAGE" in signed.stdout

    # Work on a copy: the real carrier home must stay without the operators' keys.
    home = tmp_path / "g"  # short: the agent socket goes in here
    shutil.copytree(layout.gnupg_home("carrier"), home, ignore=shutil.ignore_patterns("S.*"))
    try:
        unknown = _gpg(home, "--verify", stdin=signed.stdout)
        assert unknown.returncode != 0  # carrier does not know ops yet

        keyfile = layout.keyserver_dir / f"{address('ops')}.asc"
        assert _gpg(home, "--import", str(keyfile)).returncode == 0
        verified = _gpg(home, "--status-fd", "1", "--verify", stdin=signed.stdout)
        assert verified.returncode == 0, verified.stderr
        assert f"VALIDSIG {GpgHomes(layout).fingerprint('ops')}" in verified.stdout
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)

    listed = _gpg(layout.gnupg_home("carrier"), "--with-colons", "--list-keys")
    assert address("ops") not in listed.stdout


def test_identities_hold_carriers_public_key(box: Sandbox) -> None:
    carrier_fpr = GpgHomes(box.layout).fingerprint("carrier")
    for identity in ("ops", "admin", "newbie"):
        listed = _gpg(box.layout.gnupg_home(identity), "--with-colons", "--list-keys", carrier_fpr)
        assert listed.returncode == 0, listed.stderr
        secret = _gpg(box.layout.gnupg_home(identity), "--list-secret-keys", carrier_fpr)
        assert secret.returncode != 0  # only the public half


def test_keyserver_files_hold_each_identitys_key(box: Sandbox, tmp_path: Path) -> None:
    gpg = GpgHomes(box.layout)
    for identity in ("ops", "admin", "newbie", "carrier"):
        keyfile = box.layout.keyserver_dir / f"{address(identity)}.asc"
        shown = _gpg(tmp_path, "--with-colons", "--import-options", "show-only", "--import", str(keyfile))
        assert shown.returncode == 0, shown.stderr
        assert f"fpr:::::::::{gpg.fingerprint(identity)}:" in shown.stdout
        assert f"<{address(identity)}>" in shown.stdout
        assert "sec:" not in shown.stdout


def test_keys_are_stable_across_up(box: Sandbox) -> None:
    gpg = GpgHomes(box.layout)
    before = {identity: gpg.fingerprint(identity) for identity in IDENTITIES}
    host_key = (box.layout.ssh_dir / "web1" / "ssh_host_ed25519_key.pub").read_text()
    box.up()
    assert {identity: gpg.fingerprint(identity) for identity in IDENTITIES} == before
    assert (box.layout.ssh_dir / "web1" / "ssh_host_ed25519_key.pub").read_text() == host_key


# --- failures ---


def test_port_in_use_names_the_port_and_the_fix() -> None:
    offset = BASE + 600
    port = 2222 + offset
    root = _new_root()
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.11", port))
        blocker.listen()
        sandbox = Sandbox(root, port_offset=offset)
        try:
            with pytest.raises(SandboxError) as err:
                sandbox.up()
            assert f"127.0.0.11:{port}" in str(err.value)
            assert "port-offset" in str(err.value)
            assert not sandbox.status().components[0].running
        finally:
            sandbox.destroy()


def test_a_failed_start_stops_what_that_up_started(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_start(self: SshHosts) -> None:
        raise SandboxError("sshd broke on purpose")

    monkeypatch.setattr(SshHosts, "start", broken_start)
    root = _new_root()
    sandbox = Sandbox(root, port_offset=BASE + 700)
    try:
        with pytest.raises(SandboxError, match="on purpose"):
            sandbox.up()
        report = sandbox.status()
        assert [c.name for c in report.components if c.running] == []
        assert all(procs.port_is_free(h, p) for c in report.components for h, p, _ in c.ports)
    finally:
        sandbox.destroy()


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARRIER_SANDBOX_PATH", "/nonexistent")
    root = Path("/var/tmp") / f"carrier-sbx-missing-{os.getpid()}"
    with pytest.raises(SandboxError, match="apt-get install"):
        Sandbox(root, port_offset=BASE + 650).up()
    assert not root.exists()  # checked before anything is written


def test_non_root_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxError, match="must run as root"):
        Sandbox(tmp_path / "sbx").up()


def test_env_without_a_sandbox_says_to_run_up(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="carrier sandbox up"):
        Sandbox(tmp_path).env_lines()


# --- down ---


def test_down_stops_everything_and_is_idempotent() -> None:
    root = _new_root()
    sandbox = Sandbox(root, port_offset=BASE + 500)
    try:
        sandbox.up()
        pids = [pid for c in sandbox.status().components for pid in c.pids.values()]
        assert all(isinstance(pid, int) for pid in pids)
        ports = [port for c in sandbox.status().components for port in c.ports]
        # Start a gpg-agent on purpose, so down has one to stop.
        assert _gpg(sandbox.layout.gnupg_home("ops"), "--clearsign", stdin="x\n").returncode == 0
        assert processes_mentioning(str(sandbox.layout.gnupg_home("ops")))

        # A client's ControlMaster keeps a session sshd alive after its listener is gone.
        mux = Path(tempfile.gettempdir()) / f"carrier-mux-{os.getpid()}"
        cfg = str(sandbox.layout.ssh_config)
        subprocess.run(["ssh", "-F", cfg, "-M", "-S", str(mux), "-o", "ControlPersist=60", "-fN", "web1"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=20, check=True)
        check = subprocess.run(["ssh", "-F", cfg, "-S", str(mux), "-O", "check", "web1"],
                               capture_output=True, text=True, timeout=20, check=True)
        master = int(check.stderr.split("pid=")[1].split(")")[0])
        assert procs.pid_alive(master)

        # A running sandbox cannot silently move to other ports.
        with pytest.raises(SandboxError, match=f"port offset {BASE + 500}"):
            Sandbox(root, port_offset=BASE + 550).up()

        stopped = sandbox.down()
        assert sorted(stopped) == ["dovecot", "keyserver", "oauth", "smtp", "sshd"]
        assert not any(procs.pid_alive(pid) for pid in pids if pid is not None)
        assert all(procs.port_is_free(host, port) for host, port, _ in ports)
        deadline = time.monotonic() + 5
        while processes_mentioning(str(root)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(root)) == []  # no sshd, dovecot, smtp, agent left
        deadline = time.monotonic() + 5
        while procs.pid_alive(master) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.pid_alive(master)  # its server side was stopped too
        assert not sandbox.status().all_running

        assert sandbox.down() == []
        assert sandbox.layout.config_file.exists()  # files are kept for the next up
    finally:
        sandbox.destroy()
    assert not root.exists()
