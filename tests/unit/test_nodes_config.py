"""``execution_nodes:``: what carrier.yml accepts, and the checks against the inventory."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from carrier.ansible.inventory import Inventory
from carrier.config import ExecutionNode, check_config, load_config
from carrier.errors import ConfigError
from carrier.nodes.pool import NodePool

BASE = """\
inventory: hosts.yml
accounts:
  - name: carrier
    address: carrier@example.test
    password_file: carrier.pass
    imap: {host: imap.example.test}
    smtp: {host: smtp.example.test}
"""
INVENTORY = """\
all:
  children:
    web: {hosts: {web1: {ansible_host: 10.0.0.1}, web2: {ansible_host: 10.0.0.2}}}
    db: {hosts: {db1: {ansible_host: 10.0.0.3}}}
    exec: {hosts: {exec1: {ansible_host: 10.0.0.9, ansible_user: runner}}}
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    (tmp_path / "carrier.pass").write_text("pw\n")
    os.chmod(tmp_path / "carrier.pass", 0o600)
    return tmp_path


def _config(site: Path, nodes: str) -> Path:
    path = site / "carrier.yml"
    path.write_text(BASE + textwrap.dedent(nodes))
    os.chmod(path, 0o600)
    return path


def test_nodes_are_read_with_defaults(site: Path) -> None:
    config = load_config(_config(site, """\
        execution_nodes:
          - {name: exec1, target: exec1, groups: [web]}
          - {name: far, target: "runner@far.example.test:2200", groups: [db], capacity: 2,
             ansible_runner: /opt/runner/bin/ansible-runner, work_dir: /var/tmp/carrier}
        """), {"HOME": str(site)})
    assert config.execution_nodes == (
        ExecutionNode("exec1", "exec1", ("web",)),
        ExecutionNode("far", "runner@far.example.test:2200", ("db",), 2, "/opt/runner/bin/ansible-runner",
                      "/var/tmp/carrier"),
    )
    assert load_config(_config(site, ""), {"HOME": str(site)}).execution_nodes == ()


@pytest.mark.parametrize(("entry", "expected"), [
    ("{name: n1, target: exec1, groups: [web], capacity: 0}",
     "execution_nodes[0].capacity (line 9): 0 is not a number of jobs (1-1000)"),
    ("{name: n1, target: exec1, groups: [web], capacity: lots}",
     "execution_nodes[0].capacity (line 9): 'lots' is not a number of jobs (1-1000)"),
    ("{name: n1, target: '-oProxyCommand=sh', groups: [web]}",
     "execution_nodes[0].target (line 9): '-oProxyCommand=sh' is not a node target: name an inventory "
     "host or write user@host (optionally user@host:port)"),
    ("{name: n1, target: 'a b@c', groups: [web]}",
     "execution_nodes[0].target (line 9): 'a b@c' is not a node target: name an inventory host or write "
     "user@host (optionally user@host:port)"),
    ("{name: n1, target: 'r@h:70000', groups: [web]}",
     "execution_nodes[0].target (line 9): 'r@h:70000' is not a node target: name an inventory host or "
     "write user@host (optionally user@host:port)"),
    ("{name: n1, target: exec1, groups: []}",
     "execution_nodes[0].groups (line 9): a node must serve at least one inventory group"),
    ("{name: n1, target: exec1}",
     "execution_nodes[0].groups (line 9): missing (required): the inventory groups whose hosts this "
     "node runs plays for"),
    ("{name: n1, target: exec1, groups: [web], work_dir: tmp}",
     "execution_nodes[0].work_dir (line 9): 'tmp' is not a work directory: an absolute path of at most "
     "40 characters (letters, digits, _ . - /), short enough for ssh control sockets"),
    ("{name: n1, target: exec1, groups: [web], ansible_runner: 'runner; rm -rf /'}",
     "execution_nodes[0].ansible_runner (line 9): 'runner; rm -rf /' is not a command: give a bare "
     "name (ansible-runner) or an absolute path (/opt/runner/bin/ansible-runner)"),
])
def test_bad_node_entries_are_named(site: Path, entry: str, expected: str) -> None:
    assert check_config(_config(site, f"execution_nodes:\n  - {entry}\n"), {"HOME": str(site)}) == [expected]


def test_duplicate_node_names_are_refused(site: Path) -> None:
    path = _config(site, """\
        execution_nodes:
          - {name: n1, target: exec1, groups: [web]}
          - {name: n1, target: exec1, groups: [db]}
        """)
    assert check_config(path, {"HOME": str(site)}) == [
        "execution_nodes[1] (line 10): duplicate node name 'n1' (also execution_nodes[0]): "
        "names must be unique"
    ]


def test_groups_and_targets_are_checked_against_the_inventory(site: Path) -> None:
    inventory = Inventory(site / "hosts.yml")
    with pytest.raises(ConfigError, match=r"execution_nodes\[0\] \(n1\)\.groups: no inventory group 'webz' "
                                          r"\(groups: db, exec, web\)"):
        NodePool.build([ExecutionNode("n1", "exec1", ("webz",))], inventory)
    with pytest.raises(ConfigError, match=r"execution_nodes\[1\] \(n2\)\.target: 'nohost' is not an "
                                          "inventory host: name one, or write user@host"):
        NodePool.build([ExecutionNode("n1", "exec1", ("web",)), ExecutionNode("n2", "nohost", ("db",))],
                       inventory)


def test_a_job_goes_to_the_node_serving_all_its_hosts(site: Path) -> None:
    pool = NodePool.build([ExecutionNode("n1", "exec1", ("web",)),
                           ExecutionNode("n2", "runner@10.0.0.8:2200", ("db", "web"), capacity=3)],
                          Inventory(site / "hosts.yml"))
    assert pool.nodes[0].conn.address == "10.0.0.9" and pool.nodes[0].conn.user == "runner"
    assert (pool.nodes[1].conn.address, pool.nodes[1].conn.port, pool.nodes[1].target) == \
        ("10.0.0.8", 2200, "runner@10.0.0.8:2200")
    assert pool.node_for(["web1", "web2"]).name == "n1"  # type: ignore[union-attr]
    assert pool.node_for(["web1", "db1"]).name == "n2"  # type: ignore[union-attr]
    assert pool.node_for(["exec1"]) is None  # no node serves it: it runs on the controller
    assert pool.node_for(["web1", "db1"]).name == "n2"  # type: ignore[union-attr]  # the only one, again
    assert pool.capacities() == {"n1": 4, "n2": 3}
    assert pool.nodes[0].remote_base("j-abc") == "/tmp/carrier-j-abc"


def test_nodes_serving_the_same_hosts_take_turns(site: Path) -> None:
    pool = NodePool.build([ExecutionNode("a", "exec1", ("web",)), ExecutionNode("b", "exec1", ("web", "db")),
                           ExecutionNode("c", "exec1", ("web",))], Inventory(site / "hosts.yml"))
    placed = [pool.node_for(["web1"]) for _ in range(7)]
    assert [n.name for n in placed if n is not None] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [pool.node_for(["db1"]).name for _ in range(3)] == ["b", "b", "b"]  # type: ignore[union-attr]


def test_the_least_busy_node_for_its_capacity_gets_the_job(site: Path) -> None:
    running: dict[str, list[str]] = {"a": ["j-1", "j-2"], "b": [], "c": ["j-3"]}
    pool = NodePool.build([ExecutionNode("a", "exec1", ("web",), capacity=2),
                           ExecutionNode("b", "exec1", ("web",), capacity=1),
                           ExecutionNode("c", "exec1", ("web",), capacity=4)],
                          Inventory(site / "hosts.yml"), running=lambda: running)
    assert pool.node_for(["web1"]).name == "b"  # type: ignore[union-attr]  # idle
    running["b"] = ["j-4"]  # now a 2/2 = 1.0, b 1/1 = 1.0, c 1/4
    assert pool.node_for(["web1"]).name == "c"  # type: ignore[union-attr]
    running["c"] = ["j-3", "j-5", "j-6", "j-7"]  # all full: equally busy ones take turns
    assert {pool.node_for(["web1"]).name for _ in range(3)} == {"a", "b", "c"}  # type: ignore[union-attr]
