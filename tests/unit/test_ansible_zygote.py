"""The warm worker's checks without a zygote: the setting, the run directory a request may name,
the peer's uid on a real unix socket, and the key that keeps a zygote from serving changed code,
versions, environment or configuration files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from carrier.ansible.errors import EngineError
from carrier.ansible.zygote import (
    DEFAULT_WORKER,
    WORKERS,
    _connect,
    _sun_path,
    check_run_dir,
    check_worker,
    peer_uid,
    zygote_key,
)


def test_worker_setting_accepts_the_two_values_and_names_them_otherwise() -> None:
    assert DEFAULT_WORKER in WORKERS
    assert check_worker(" Warm ") == "warm"
    with pytest.raises(EngineError, match=r"ansible\.worker must be one of warm, cold, not 'hot'"):
        check_worker("hot")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    run_dir = tmp_path / "jobs" / "j-abcdefgh2345"
    run_dir.mkdir(parents=True, mode=0o700)
    (run_dir / "spec.json").write_text("{}")
    return tmp_path


def test_a_job_directory_of_the_state_directory_is_accepted(state: Path) -> None:
    run_dir = state / "jobs" / "j-abcdefgh2345"
    assert check_run_dir(state, str(run_dir.resolve())) == run_dir.resolve()


@pytest.mark.parametrize("value", ["/etc", "jobs/j-abcdefgh2345", "{state}/jobs/../jobs/j-abcdefgh2345",
                                   "{state}/jobs/j-ABCDEFGH2345", "{state}/other/j-abcdefgh2345",
                                   "{state}/jobs/j-abcdefgh2345\0x", 42, None])
def test_anything_else_is_refused(state: Path, value: object) -> None:
    if isinstance(value, str):
        value = value.replace("{state}", str(state.resolve()))
    with pytest.raises(ValueError, match="run_dir"):
        check_run_dir(state, value)


def test_a_job_directory_others_can_enter_or_without_a_spec_is_refused(state: Path) -> None:
    run_dir = (state / "jobs" / "j-abcdefgh2345").resolve()
    run_dir.chmod(0o755)
    with pytest.raises(ValueError, match="0700 directory of this user"):
        check_run_dir(state, str(run_dir))
    run_dir.chmod(0o700)
    (run_dir / "spec.json").unlink()
    (run_dir / "spec.json").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match=r"no spec\.json"):
        check_run_dir(state, str(run_dir))


def test_peer_uid_is_the_connecting_process_uid() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_uid(left) == os.getuid()


def test_a_socket_deeper_than_a_unix_address_allows_is_bound_and_reached(tmp_path: Path) -> None:
    # pytest's tmp_path under a CI clone's path made the zygote fail with "AF_UNIX path too long"
    deep = tmp_path.joinpath(*["d" * 40] * 4)
    deep.mkdir(parents=True)
    path = deep / ("k" * 24 + ".sock")
    assert len(str(path)) > 108
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        with _sun_path(path) as address:
            listener.bind(address)
        listener.listen(1)
        assert path.exists()
        client = _connect(path)
        assert client is not None
        with client, listener.accept()[0] as served:
            client.sendall(b"ping")
            assert served.recv(4) == b"ping"
    assert _connect(deep / "absent.sock") is None


def test_the_key_changes_with_environment_configuration_and_kind_not_per_run_values(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin", "ANSIBLE_STRATEGY": "linear", "ANSIBLE_LOCAL_TEMP": "/a",
           "CARRIER_RUN_DIR": "/x"}
    key = zygote_key(env, tmp_path, "playbook")
    per_run = {**env, "ANSIBLE_LOCAL_TEMP": "/b", "CARRIER_RUN_DIR": "/y"}
    assert zygote_key(per_run, tmp_path, "playbook") == key
    assert zygote_key({**env, "ANSIBLE_STRATEGY": "free"}, tmp_path, "playbook") != key
    assert zygote_key(env, tmp_path, "adhoc") != key
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    with_cfg = zygote_key(env, tmp_path, "playbook")
    assert with_cfg != key
    os.utime(tmp_path / "ansible.cfg", ns=(1, 1))
    assert zygote_key(env, tmp_path, "playbook") != with_cfg


def test_the_key_changes_with_the_versions_and_carriers_code(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from carrier.ansible import zygote

    env = {"PATH": "/usr/bin"}
    key = zygote_key(env, tmp_path, "playbook")
    versions = zygote._versions()
    monkeypatch.setattr(zygote, "_versions", lambda: {**versions, "ansible-core": "9.9.9"})
    assert zygote_key(env, tmp_path, "playbook") != key
    monkeypatch.undo()
    stamp = zygote._code_stamp()
    assert any(name == "ansible/zygote.py" for name, _, _ in stamp)  # Carrier's own files are in it
    monkeypatch.setattr(zygote, "_code_stamp", lambda: [*stamp[:-1], (stamp[-1][0], 1, 1)])
    assert zygote_key(env, tmp_path, "playbook") != key


_RUN = """
import os, sys, warnings
warnings.simplefilter("ignore")
if sys.argv[1] == "warm":  # as the warm worker: everything imported and warmed, then a fork per run
    from carrier.ansible import zygote
    zygote._preload()
pid = os.fork()
if pid == 0:
    from ansible.cli.playbook import PlaybookCLI
    os._exit(PlaybookCLI(["ansible-playbook", "-i", sys.argv[2], sys.argv[3]]).run())
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("strategy", ["linear", "mitogen_linear"])
def test_a_warm_run_passes_the_inventorys_ssh_options_to_ssh_as_a_cold_run_does(tmp_path: Path,
                                                                                strategy: str) -> None:
    """The bench found warm runs dropping the inventory's group_vars (there, ``ansible_ssh_extra_args``
    and its known_hosts file): hidden while a master carries the connection, fatal once ssh connects
    by itself. The option here is a ProxyCommand that leaves a mark: was ssh given it?"""
    import ansible_mitogen

    strategies = Path(str(ansible_mitogen.__file__)).parent / "plugins" / "strategy"
    marks = {}
    for mode in ("cold", "warm"):
        mark = tmp_path / f"{mode}.mark"
        inventory = tmp_path / mode  # the option in group_vars, read by the host_group_vars plugin
        (inventory / "group_vars").mkdir(parents=True)
        proxy = f"sh -c 'echo seen > {mark}; exit 1'"
        (inventory / "hosts.yml").write_text(
            "all:\n  hosts:\n    probe:\n      ansible_host: 127.0.0.1\n      ansible_port: 9\n")
        (inventory / "group_vars" / "all.yml").write_text(
            f"ansible_ssh_extra_args: \"-o ProxyCommand=\\\"{proxy}\\\"\"\n")
        play = tmp_path / "play.yml"
        play.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n")
        env = {**os.environ, "HOME": str(tmp_path), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
               "ANSIBLE_SSH_ARGS": "-o ControlMaster=no -o BatchMode=yes", "ANSIBLE_STRATEGY": strategy,
               "ANSIBLE_STRATEGY_PLUGINS": str(strategies),
               "ANSIBLE_SSH_RETRIES": "0", "ANSIBLE_TIMEOUT": "5"}
        subprocess.run([sys.executable, "-c", _RUN, mode, str(inventory), str(play)], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
        marks[mode] = mark.exists()
    assert marks == {"cold": True, "warm": True}
