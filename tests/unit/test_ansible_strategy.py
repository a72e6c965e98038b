"""The Ansible strategy of a run: the setting, the catalog override, the fallbacks to linear, the
environment that selects it, and a bad value as a clear error (carrier.yml and the catalog)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from carrier.ansible.catalog import Catalog
from carrier.ansible.errors import EngineError, PlaybookError
from carrier.ansible.inventory import Inventory
from carrier.ansible.runner import ansible_env
from carrier.ansible.ssh import SshControl
from carrier.ansible.strategy import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    check_strategy,
    effective_strategy,
    mitogen_strategy_dir,
    strategy_env,
)
from carrier.config import ExecutionNode, check_config, load_config
from carrier.jobs.engines import AdhocEngine, PlaybookEngine
from carrier.nodes.pool import NodePool

CONFIG = """\
inventory: inventory
accounts:
  - name: carrier
    address: carrier@example.test
    password_file: carrier.pass
    imap: {host: imap.example.test}
    smtp: {host: smtp.example.test}
"""
PLAY = "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    write(tmp_path / "inventory" / "hosts.yml", "all: {hosts: {web1: {}}}\n", 0o644)
    write(tmp_path / "carrier.pass", "s3cret-mail\n")
    return tmp_path


# --------------------------------------------------------------------------- choosing


def test_the_default_is_mitogen() -> None:
    assert DEFAULT_STRATEGY == "mitogen" and STRATEGIES == ("mitogen", "linear", "free")
    assert effective_strategy(DEFAULT_STRATEGY) == "mitogen"


@pytest.mark.parametrize(
    ("setting", "playbook", "expected"),
    [("mitogen", None, "mitogen"), ("mitogen", "linear", "linear"), ("linear", "mitogen", "mitogen"),
     ("linear", None, "linear"), ("free", None, "free"), ("mitogen", "free", "free")],
)
def test_the_catalog_wins_over_the_setting(setting: str, playbook: str | None, expected: str) -> None:
    assert effective_strategy(setting, playbook) == expected


def test_a_become_password_or_a_python_less_module_falls_back_to_linear() -> None:
    assert effective_strategy("mitogen", needs_become_password=True) == "linear"
    assert effective_strategy("linear", "mitogen", needs_become_password=True) == "linear"
    assert effective_strategy("mitogen", module="raw") == "linear"
    assert effective_strategy("mitogen", module="command") == "mitogen"
    assert effective_strategy("free", needs_become_password=True, module="raw") == "free"


def test_a_run_on_an_execution_node_falls_back_to_linear() -> None:
    # The node's own ansible-runner (Debian's) runs the play there: it has no Mitogen.
    assert effective_strategy("mitogen", on_node=True) == "linear"
    assert effective_strategy("linear", "mitogen", on_node=True) == "linear"
    assert effective_strategy("free", on_node=True) == "free"


@pytest.mark.parametrize("value", ["fast", "", "mitogen_linear", 3, None])
def test_a_bad_strategy_says_which_are_accepted(value: object) -> None:
    with pytest.raises(EngineError, match="must be one of mitogen, linear, free"):
        check_strategy(value)


# --------------------------------------------------------------------------- the environment


def test_mitogen_points_ansible_at_the_installed_plugin() -> None:
    env = strategy_env("mitogen")
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear"
    assert Path(env["ANSIBLE_STRATEGY_PLUGINS"]) == mitogen_strategy_dir()
    assert (mitogen_strategy_dir() / "mitogen_linear.py").is_file()
    assert strategy_env("linear") == {"ANSIBLE_STRATEGY": "linear"}
    assert strategy_env("free") == {"ANSIBLE_STRATEGY": "free"}


def test_the_run_environment_keeps_carriers_ssh_options_and_hides_the_plugin_warning() -> None:
    ssh_env = {"ANSIBLE_SSH_ARGS": "-o ControlPath=/x/%C", "ANSIBLE_SSH_CONTROL_PATH_DIR": "/x"}
    env = ansible_env(ssh_env=ssh_env, local_temp=Path("/tmp/t"), forks=3, parent={}, strategy="mitogen")
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear" and env["ANSIBLE_SSH_ARGS"] == "-o ControlPath=/x/%C"
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    # ansible-core's "third-party strategy plugins are deprecated" is a deprecation warning.
    assert env["ANSIBLE_DEPRECATION_WARNINGS"] == "False"
    linear = ansible_env(ssh_env=ssh_env, local_temp=Path("/tmp/t"), forks=3, parent={}, strategy="linear")
    assert linear["ANSIBLE_STRATEGY"] == "linear" and "ANSIBLE_STRATEGY_PLUGINS" not in linear


# --------------------------------------------------------------------------- carrier.yml and the catalog


def test_the_setting_is_read_from_carrier_yml(site: Path) -> None:
    config = load_config(write(site / "carrier.yml", CONFIG + "ansible: {strategy: linear}\n"), {})
    assert config.ansible.strategy == "linear"
    assert load_config(write(site / "carrier.yml", CONFIG), {}).ansible.strategy == "mitogen"


@pytest.mark.parametrize(
    ("section", "message"),
    [("ansible: {strategy: fast}\n",
      "ansible.strategy (line 8): 'fast' is not one of: mitogen, linear, free"),
     ("ansible: {strategie: linear}\n", "ansible.strategie (line 8): unknown key")],
)
def test_a_bad_setting_is_a_clear_config_error(site: Path, section: str, message: str) -> None:
    problems = check_config(write(site / "carrier.yml", CONFIG + section), {})
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_the_catalog_reads_a_playbooks_strategy(tmp_path: Path) -> None:
    write(tmp_path / "ping.yml", PLAY, 0o644)
    write(tmp_path / "ping.meta.yml", "strategy: Linear\n", 0o644)
    write(tmp_path / "plain.yml", PLAY, 0o644)
    catalog = Catalog([tmp_path])
    info = catalog.get("ping")
    assert info is not None and info.strategy == "linear" and info.to_dict()["strategy"] == "linear"
    plain = catalog.get("plain")
    assert plain is not None and plain.strategy is None


def test_a_bad_strategy_in_the_catalog_names_the_file(tmp_path: Path) -> None:
    write(tmp_path / "ping.yml", PLAY, 0o644)
    write(tmp_path / "ping.meta.yml", "strategy: turbo\n", 0o644)
    with pytest.raises(PlaybookError, match="strategy must be one of mitogen, linear, free") as err:
        Catalog([tmp_path]).get("ping")
    assert "ping.meta.yml" in str(err.value) and "fix the catalog file" in str(err.value)


def test_a_refused_host_key_reads_the_same_under_mitogen() -> None:
    from carrier.ansible.runner import RunResult, judge

    mitogen = ("Task failed: Host key checking is enabled, and SSH reported an unrecognized or "
               "mismatching host key.")
    events = [("ansible.runner_on_unreachable", {"host": "stranger", "res": {"msg": mitogen}})]
    verdict = judge(RunResult("failed", 4), events)
    assert (verdict.status, verdict.reason) == ("failed", "unreachable")
    assert verdict.message.startswith("unreachable: stranger (Host key verification failed")


def _unreachable(msg: str) -> str:
    from carrier.ansible.runner import RunResult, judge

    events = [("ansible.runner_on_unreachable", {"host": "ghost", "res": {"msg": msg}})]
    return judge(RunResult("failed", 4), events).message


def test_mitogens_other_ssh_failures_read_clearly() -> None:
    unknown = ("SSH requested permission to accept unknown host key, but check_host_keys=ignore. This is "
               "likely due to ssh_args=  conflicting with check_host_keys=. Please correct your "
               "configuration.")
    assert _unreachable(unknown).startswith("unreachable: ghost (Host key verification failed")
    assert _unreachable("Task failed: SSH authentication is incorrect") == (
        "unreachable: ghost (Permission denied: the host refused ssh's key or user (ssh authentication "
        "failed))")
    # Mitogen's "EOF on stream" carries up to 100 lines of ssh's output: the last one says why.
    banner = "\n".join(f"banner line {i}" for i in range(40))
    eof = (f"Task failed: EOF on stream; last 100 lines received:\n{banner}\n"
           "ssh: connect to host 127.0.0.14 port 4312: Connection refused\n")
    assert _unreachable(eof) == ("unreachable: ghost (Task failed: the ssh connection ended: ssh: connect to "
                                 "host 127.0.0.14 port 4312: Connection refused)")
    assert _unreachable("Task failed: EOF on stream; last 100 lines received:\n") == (
        "unreachable: ghost (Task failed: the ssh connection ended: ssh printed nothing)")
    # Ansible's own wording is left as it is.
    plain = 'Data could not be sent to remote host "127.0.0.14": ssh: connect to host: Connection refused'
    assert _unreachable(plain) == f"unreachable: ghost ({plain})"


# --------------------------------------------------------------------------- what the engines queue

NODE_INVENTORY = """\
all:
  children:
    web: {hosts: {web1: {ansible_host: 10.0.0.1}}}
    db: {hosts: {db1: {ansible_host: 10.0.0.3}}}
    exec: {hosts: {exec1: {ansible_host: 10.0.0.9}}}
"""


@pytest.fixture
def engines(tmp_path: Path) -> tuple[PlaybookEngine, AdhocEngine]:
    inventory = Inventory(write(tmp_path / "hosts.yml", NODE_INVENTORY))
    write(tmp_path / "books" / "play.yml", PLAY)
    write(tmp_path / "books" / "pinned.yml", PLAY)
    write(tmp_path / "books" / "pinned.meta.yml", "strategy: mitogen\n")
    nodes = NodePool.build([ExecutionNode("n1", "exec1", ("web",))], inventory)
    ssh = SshControl(tmp_path / "state")
    return (PlaybookEngine(inventory, ssh, Catalog([tmp_path / "books"]), nodes=nodes, strategy="mitogen"),
            AdhocEngine(inventory, ssh, nodes=nodes, strategy="mitogen"))


def test_a_job_for_a_node_is_queued_linear(engines: tuple[PlaybookEngine, AdhocEngine]) -> None:
    playbook, adhoc = engines
    on_node = playbook.prepare({"playbook": "play", "limit": "web1"}).spec
    assert (on_node["node"], on_node["strategy"]) == ("n1", "linear")
    # Even a playbook whose catalog entry asks for Mitogen: the node cannot run it.
    assert playbook.prepare({"playbook": "pinned", "limit": "web1"}).spec["strategy"] == "linear"
    assert adhoc.prepare({"module": "ping", "pattern": "web1"}).spec["strategy"] == "linear"
    here = playbook.prepare({"playbook": "play", "limit": "db1"}).spec
    assert "node" not in here and here["strategy"] == "mitogen"


def test_a_job_with_a_become_secret_is_queued_linear(engines: tuple[PlaybookEngine, AdhocEngine]) -> None:
    playbook, adhoc = engines
    spec = playbook.prepare({"playbook": "pinned", "limit": "db1", "become_secret": "db_sudo"}).spec
    assert (spec["become_secret"], spec["strategy"]) == ("db_sudo", "linear")
    spec = adhoc.prepare({"module": "ping", "pattern": "db1", "become_secret": "db_sudo"}).spec
    assert spec["strategy"] == "linear"
    assert adhoc.prepare({"module": "ping", "pattern": "db1"}).spec["strategy"] == "mitogen"
