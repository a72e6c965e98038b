"""ssh options and argv: one builder for every path, Ansible's order, ``--`` before the host, argv
quoting that a real shell gives back unchanged, and a ControlPath that fits a unix socket."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from carrier.ansible.errors import SshError
from carrier.ansible.inventory import HostConn
from carrier.ansible.runner import ansible_env
from carrier.ansible.ssh import (
    SshControl,
    ansible_ssh_args,
    ansible_ssh_env,
    connection_argv,
    control_dir,
    host_command,
    remote_command,
    ssh_options,
)


def conn(**kw: object) -> HostConn:
    base: dict[str, object] = dict(
        name="web1", connection="ssh", address="10.0.0.1", port=2222, user="deploy",
        private_key="/keys/id", ssh_args=None, common_args="-o StrictHostKeyChecking=yes",
        extra_args="-o UserKnownHostsFile=/kh", timeout=10,
    )
    base.update(kw)
    return HostConn(**base)  # type: ignore[arg-type]


def opts(argv: list[str]) -> dict[str, str]:
    """``-o Name=value`` pairs, first one winning (as ssh reads them)."""
    found: dict[str, str] = {}
    for flag, value in itertools.pairwise(argv):
        if flag == "-o":
            name, _, val = value.partition("=")
            found.setdefault(name, val)
    return found


def test_ssh_options_hold_the_multiplexing_settings(tmp_path: Path) -> None:
    got = opts(ssh_options(tmp_path / "cm", persist=123))
    assert got == {
        "ControlMaster": "auto", "ControlPersist": "123", "ControlPath": f"{tmp_path}/cm/%C",
        "ServerAliveInterval": "15", "ServerAliveCountMax": "3", "BatchMode": "yes",
    }


def test_ansible_gets_the_same_options_as_a_string(tmp_path: Path) -> None:
    text = ansible_ssh_args(tmp_path / "with space")
    assert shlex.split(text) == ssh_options(tmp_path / "with space")
    env = ansible_ssh_env(tmp_path)
    assert env["ANSIBLE_SSH_ARGS"] == ansible_ssh_args(tmp_path)
    assert env["ANSIBLE_SSH_CONTROL_PATH_DIR"] == str(tmp_path)
    assert env["ANSIBLE_SSH_CONTROL_PATH"] % {"directory": "D"} == "D/%C"


def test_connection_argv_follows_ansibles_order_and_starts_with_our_options(tmp_path: Path) -> None:
    argv = connection_argv(conn(), tmp_path)
    assert argv[0] == "ssh"
    assert argv[1:13] == ssh_options(tmp_path)  # first: ssh keeps the first value of an option
    got = opts(argv)
    assert got["Port"] == "2222"
    assert got["IdentityFile"] == '"/keys/id"'
    assert got["User"] == '"deploy"'
    assert got["PasswordAuthentication"] == "no"
    assert got["ConnectTimeout"] == "10"
    assert argv[-4:] == ["-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/kh"]


def test_the_host_comes_after_double_dash(tmp_path: Path) -> None:
    argv = host_command(conn(address="web1"), tmp_path, "uptime", flags=("-T",))
    assert argv[-4:] == ["-T", "--", "web1", "uptime"]


def test_a_hosts_own_ssh_args_replace_ours_but_keep_our_control_path(tmp_path: Path) -> None:
    argv = connection_argv(conn(ssh_args="-C -o ControlMaster=auto -o ControlPersist=60s"), tmp_path)
    got = opts(argv)
    assert got["ControlPersist"] == "60s"
    assert "BatchMode" not in got
    assert got["ControlPath"] == f"{tmp_path}/%C"
    plain = connection_argv(conn(ssh_args="-C"), tmp_path)
    assert "ControlPath" not in opts(plain)  # no ControlPersist: no multiplexing, as in Ansible


def test_only_ssh_hosts_get_an_ssh_argv(tmp_path: Path) -> None:
    with pytest.raises(SshError, match="connection 'local'"):
        connection_argv(conn(connection="local"), tmp_path)


# --------------------------------------------------------------------------- remote command


def _probe(directory: Path) -> str:
    """A program that prints the arguments it received as JSON."""
    probe = directory / "probe"
    probe.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    probe.chmod(0o755)
    return str(probe)


@pytest.mark.parametrize(
    "argv",
    [
        ["echo", "a;b", "$(id)", "`id`", "x|y", "a&&b"],
        ["printf", "%s\\n", "it's", '"quoted"', "new\nline", "*", "~root"],
        ["ls", "-l", "--", "-rf /"],
    ],
)
def test_argv_reaches_the_program_unchanged_through_a_real_shell(argv: list[str], tmp_path: Path) -> None:
    # The remote login shell runs `sh -c "<text>"`; here the words go to a probe program that
    # prints what it received.
    text = remote_command([_probe(tmp_path), *argv], shell=False)
    out = subprocess.run(["sh", "-c", text], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == argv
    assert shlex.split(text)[2:] == argv


@pytest.mark.parametrize(
    "program",
    ["coproc", "time", "eval", "trap", "FOO=1", "if", "!", "{"],
)
def test_the_first_word_is_always_one_program_on_path(program: str, tmp_path: Path) -> None:
    """Keywords (``coproc``, ``time``), builtins (``eval``, ``trap``) and assignments (``FOO=1``)
    as the first word would make the remote shell run a second program: the argv runs the program
    of that name from PATH instead (here: a probe, so it can say it was called)."""
    (tmp_path / "bin").mkdir()
    named = tmp_path / "bin" / program
    named.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(['ran', *sys.argv[1:]]))\n")
    named.chmod(0o755)
    marker = tmp_path / "pwned"
    argv = [program, "touch", str(marker)]
    text = remote_command(argv, shell=False)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", text], capture_output=True, text=True, env=env, check=False)
    assert json.loads(done.stdout) == ["ran", "touch", str(marker)], done
    assert not marker.exists()


@pytest.mark.parametrize(("command", "shell"), [(["-c", "id"], False), (["-rf", "/"], False),
                                                ("  -c id", True)])
def test_a_first_word_that_is_an_option_is_refused(command: list[str] | str, shell: bool) -> None:
    with pytest.raises(SshError, match="name the program first"):
        remote_command(command, shell=shell)


def test_argv_has_no_shell_features(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = remote_command(["echo", f"x; touch {marker}"], shell=False)
    out = subprocess.run(["sh", "-c", text], capture_output=True, text=True, check=True).stdout
    assert out == f"x; touch {marker}\n"
    assert not marker.exists()


def test_shell_mode_passes_the_string_as_it_is() -> None:
    assert remote_command("echo $((1+2)) | tr 3 x", shell=True) == "echo $((1+2)) | tr 3 x"  # noqa: S604
    assert remote_command(["echo", "a b"], shell=True) == "echo 'a b'"  # noqa: S604


@pytest.mark.parametrize(
    ("command", "shell", "message"),
    [
        ([], False, "empty"),
        ([""], False, "empty"),
        ("uptime", False, "must be a list of arguments"),
        (["echo", "a\0b"], False, "NUL"),
        ("  ", True, "empty"),
        ("echo \0", True, "NUL"),
    ],
)
def test_bad_commands_are_refused(command: list[str] | str, shell: bool, message: str) -> None:
    with pytest.raises(SshError, match=message):
        remote_command(command, shell=shell)


# --------------------------------------------------------------------------- control dir


def test_control_dir_is_under_the_state_dir_when_it_fits(tmp_path: Path) -> None:
    state = Path("/var/tmp/cs")
    assert control_dir(state) == state / "run" / "cm"


def test_control_dir_moves_to_a_short_path_when_the_socket_would_not_fit(tmp_path: Path) -> None:
    state = tmp_path / ("x" * 80)
    chosen = control_dir(state)
    assert chosen.parent == Path("/tmp")
    assert not chosen.exists()  # naming it creates nothing
    assert chosen.name.startswith(f"carrier-cm-{os.getuid()}-")
    assert chosen == control_dir(state)  # stable for the same state dir
    assert control_dir(tmp_path / ("y" * 80)) != chosen
    # A socket path built from it fits sun_path with ssh's temporary suffix.
    assert len(f"{chosen}/{'a' * 40}.{'b' * 16}") < 108


def test_ssh_control_makes_private_directories(tmp_path: Path) -> None:
    state = tmp_path / "state"
    control = SshControl(state)
    for path in (control.control_dir, control.log_dir, control.lock_dir):
        assert path.is_dir()
        assert path.stat().st_mode & 0o777 == 0o700
    assert control.sockets() == []
    assert control.close_all() == 0
    control.discard()
    assert not control.control_dir.exists() or control.control_dir.parent != Path("/tmp")


def test_a_control_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    state = tmp_path / ("z" * 80)
    target = control_dir(state)
    target.mkdir(mode=0o700)
    try:
        os.chown(target, 65534, 65534)
        with pytest.raises(SshError, match="not a directory owned by uid"):
            SshControl(state)
    finally:
        os.rmdir(target)


# --------------------------------------------------------------------------- ansible environment


def test_ansible_env_is_clean_and_keeps_host_key_checking_on(tmp_path: Path) -> None:
    parent = {"HOME": "/root", "EMAIL_PASS": "hunter2-secret", "LLM_API_KEY": "sk-123456",
              "SSH_AUTH_SOCK": "/run/agent.sock", "AWS_SECRET_ACCESS_KEY": "abc123456", "PATH": "/evil"}
    env = ansible_env(ssh_env=ansible_ssh_env(tmp_path), local_temp=tmp_path / "t", forks=7, parent=parent)
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    assert env["ANSIBLE_PIPELINING"] == "True"
    assert env["ANSIBLE_FORKS"] == "7"
    assert env["ANSIBLE_SSH_ARGS"] == ansible_ssh_args(tmp_path)
    assert env["HOME"] == "/root" and env["SSH_AUTH_SOCK"] == "/run/agent.sock"
    assert "/evil" not in env["PATH"]
    assert env["PYTHONWARNINGS"] == "ignore"  # the controller's own Python warnings stay out of job output
    joined = repr(env)
    for secret in ("hunter2-secret", "sk-123456", "abc123456"):
        assert secret not in joined
