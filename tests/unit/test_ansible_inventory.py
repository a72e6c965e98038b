"""Inventory through ansible-core: patterns checked then resolved as Ansible does, connection
settings, reload on change, and bad input refused before it reaches an argv."""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from carrier.ansible.errors import ControllerError, HostError, InventoryError, PatternError
from carrier.ansible.inventory import Inventory, check_address, check_pattern

HOSTS = """\
all:
  children:
    web:
      hosts:
        web1: {ansible_host: 10.0.0.1, ansible_port: 2201}
        web2: {ansible_host: 10.0.0.2}
    db:
      hosts:
        db1: {ansible_host: "{{ db_address }}", ansible_user: "{{ db_user }}"}
    prod:
      children:
        web:
        db:
    lab:
      hosts:
        lab1: {ansible_connection: local}
"""
GROUP_VARS = """\
ansible_user: deploy
ansible_ssh_private_key_file: /keys/id_ed25519
ansible_ssh_common_args: -o StrictHostKeyChecking=yes
db_address: 10.0.0.3
db_user: dba
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def inv_dir(tmp_path: Path) -> Path:
    root = tmp_path / "inventory"
    write(root / "hosts.yml", HOSTS)
    write(root / "group_vars" / "all.yml", GROUP_VARS)
    return root


@pytest.fixture
def inventory(inv_dir: Path) -> Inventory:
    return Inventory(inv_dir)


# --------------------------------------------------------------------------- patterns (pure)


@pytest.mark.parametrize("pattern", ["all", "web", "web1", "web:&prod", "all:!db1", "web*", "web[0]",
                                     "web1,db1", "db1:web2", "web[0:1]", "!db1"])
def test_good_patterns_pass_unchanged(pattern: str) -> None:
    assert check_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "shown"),
    [
        ("web1;rm -rf /", "';'"),
        ("web1 && id", "' '"),
        ("$(id)", "'$'"),
        ("`id`", "'`'"),
        ("web|db", "'|'"),
        ("web>x", "'>'"),
        ("web\nid", "'\\n'"),
        ("~web.*", "'~'"),
        ("@/etc/passwd", "'@'"),
        ("web'1", '"\'"'),
    ],
)
def test_shell_metacharacters_regex_and_file_limits_are_refused(pattern: str, shown: str) -> None:
    with pytest.raises(PatternError) as err:
        check_pattern(pattern)
    assert shown in str(err.value)
    assert "use host and group names" in str(err.value)


@pytest.mark.parametrize("pattern", ["", "   ", None, 42])
def test_empty_or_non_text_pattern_is_refused(pattern: object) -> None:
    with pytest.raises(PatternError, match="empty"):
        check_pattern(pattern)


def test_option_like_and_overlong_patterns_are_refused() -> None:
    with pytest.raises(PatternError, match="starts with '-'"):
        check_pattern("-web1")
    with pytest.raises(PatternError, match="longer than 512"):
        check_pattern("a" * 513)


@pytest.mark.parametrize("value", ["-oProxyCommand=x", "a b", "host;id", "", "x\ny", ".hidden"])
def test_addresses_that_could_be_options_are_refused(value: str) -> None:
    with pytest.raises(HostError, match="not a host name or IP address"):
        check_address(value, "h")


@pytest.mark.parametrize("value", ["web1", "web1.example.com", "10.0.0.1", "::1", "fe80::1%eth0", "a_b"])
def test_ordinary_addresses_pass(value: str) -> None:
    assert check_address(value, "h") == value


# --------------------------------------------------------------------------- resolution


def test_hosts_and_groups(inventory: Inventory) -> None:
    assert inventory.hosts() == ["web1", "web2", "db1", "lab1"]
    groups = inventory.groups()
    assert groups["web"] == ["web1", "web2"]
    assert groups["prod"] == ["db1", "web1", "web2"]
    assert groups["all"] == ["db1", "lab1", "web1", "web2"]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("all", ["web1", "web2", "db1", "lab1"]),
        ("web:&prod", ["web1", "web2"]),
        ("prod:!db1", ["web1", "web2"]),
        ("all:!prod", ["lab1"]),
        ("web[1]", ["web2"]),
        ("w*", ["web1", "web2"]),
        ("db1,web2", ["db1", "web2"]),
    ],
)
def test_resolve_like_ansible(inventory: Inventory, pattern: str, expected: list[str]) -> None:
    assert inventory.resolve(pattern) == expected


def test_unknown_names_anywhere_in_a_pattern_are_errors(inventory: Inventory) -> None:
    with pytest.raises(PatternError, match="unknown host or group 'nosuch'"):
        inventory.resolve("nosuch")
    # A typo in an exclusion must not quietly select the host it meant to exclude.
    with pytest.raises(PatternError, match="unknown host or group 'db2'"):
        inventory.resolve("all:!db2")
    with pytest.raises(PatternError, match="'zz\\*'"):
        inventory.resolve("web1,zz*")


@pytest.mark.parametrize("pattern", ["localhost", "127.0.0.1", "::1", "LocalHost", "all:localhost",
                                     "web1,127.0.0.1", "web:&localhost", "all:!localhost"])
def test_ansibles_implicit_localhost_is_never_selected(inventory: Inventory, pattern: str) -> None:
    # Ansible answers these with an invented localhost (connection local): the controller itself.
    with pytest.raises(ControllerError, match="implicit localhost"):
        inventory.resolve(pattern)
    with pytest.raises(ControllerError, match="implicit localhost"):
        inventory.targets(pattern, controller=True)


def test_the_machines_own_hostname_is_not_a_host_unless_the_inventory_names_it(inventory: Inventory) -> None:
    refused = "unknown host or group|implicit localhost"  # getfqdn() may say "localhost"
    for name in {socket.gethostname(), socket.getfqdn()}:
        with pytest.raises(PatternError, match=refused):
            inventory.resolve(name)
        with pytest.raises(PatternError, match=refused):
            inventory.targets(f"web1,{name}", controller=True)


def test_controller_hosts_named_by_the_inventory_need_the_policy(tmp_path: Path) -> None:
    hostname = socket.gethostname()
    inv = write(tmp_path / "hosts.yml", f"""\
        all:
          hosts:
            web1: {{ansible_host: 10.0.0.1}}
            localhost: {{ansible_connection: local}}
            here: {{ansible_connection: local}}
            loop: {{ansible_host: 127.0.0.1}}
            self: {{ansible_host: "{hostname}"}}
            {hostname}: {{}}
            sandbox: {{ansible_host: 127.0.0.11}}
        """)
    inventory = Inventory(inv)
    local = ["localhost", "here", "loop", "self", hostname]
    assert [h for h in inventory.hosts() if inventory.is_controller(h)] == local
    assert inventory.resolve("all") == ["web1", *local[:4], hostname, "sandbox"]
    for name in local:
        with pytest.raises(ControllerError, match=f"selects {name}, the Carrier controller itself"):
            inventory.targets(name)
        assert inventory.targets(name, controller=True) == [name]
    with pytest.raises(ControllerError, match="local: true"):
        inventory.targets("all")
    assert inventory.targets("web1,sandbox") == ["web1", "sandbox"]


def test_a_pattern_selecting_nothing_is_an_error(inventory: Inventory) -> None:
    with pytest.raises(PatternError, match="selects no host"):
        inventory.resolve("web:&db")


def test_bad_pattern_never_reaches_ansible(inventory: Inventory) -> None:
    with pytest.raises(PatternError, match="';'"):
        inventory.resolve("web1;id")


def test_missing_or_broken_inventory(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="does not exist"):
        Inventory(tmp_path / "nope").hosts()


# --------------------------------------------------------------------------- connection settings


def test_connection_settings_come_from_hosts_and_group_vars(inventory: Inventory) -> None:
    web1 = inventory.conn("web1")
    assert (web1.connection, web1.address, web1.port, web1.user) == ("ssh", "10.0.0.1", 2201, "deploy")
    assert web1.private_key == "/keys/id_ed25519"
    assert web1.common_args == "-o StrictHostKeyChecking=yes"
    assert web1.ssh_args is None
    assert inventory.conn("web2").port is None  # ssh's default applies


def test_templated_connection_vars_are_rendered(inventory: Inventory) -> None:
    db1 = inventory.conn("db1")
    assert (db1.address, db1.user) == ("10.0.0.3", "dba")


def test_local_connection(inventory: Inventory) -> None:
    assert inventory.conn("lab1").connection == "local"
    assert inventory.is_controller("lab1")
    assert not inventory.is_controller("web1")


def test_host_vars_include_group_vars(inventory: Inventory) -> None:
    variables = inventory.host_vars("web2")
    assert variables["db_user"] == "dba"
    assert variables["ansible_host"] == "10.0.0.2"
    with pytest.raises(PatternError, match="unknown host"):
        inventory.host_vars("ghost")


def test_option_injection_through_the_inventory_is_refused(inv_dir: Path) -> None:
    write(inv_dir / "host_vars" / "web2.yml", "ansible_host: -oProxyCommand=touch /tmp/pwned\n")
    with pytest.raises(HostError, match="web2: ansible_host '-oProxyCommand"):
        Inventory(inv_dir).conn("web2")


@pytest.mark.parametrize(
    ("line", "message"),
    [("ansible_user: 'root -o x'", "not a valid login name"), ("ansible_port: 99999", "not a port number")],
)
def test_bad_user_or_port_is_refused(inv_dir: Path, line: str, message: str) -> None:
    write(inv_dir / "host_vars" / "web1.yml", line + "\n")
    with pytest.raises(HostError, match=message):
        Inventory(inv_dir).conn("web1")


def test_edits_on_disk_are_picked_up_without_a_restart(inv_dir: Path, inventory: Inventory) -> None:
    assert inventory.resolve("db") == ["db1"]
    assert inventory.conn("web1").port == 2201
    hosts = inv_dir / "hosts.yml"
    text = hosts.read_text().replace("db1: {", "db2: {ansible_host: 10.0.0.4}\n        db1: {")
    text = text.replace("ansible_port: 2201", "ansible_port: 2202")
    hosts.write_text(text)
    # mtime granularity: make sure the change is visible even on a coarse clock
    future = time.time() + 2
    os.utime(hosts, (future, future))
    assert inventory.resolve("db") == ["db2", "db1"]
    assert inventory.conn("web1").port == 2202
    write(inv_dir / "group_vars" / "web.yml", "ansible_user: webadmin\n")
    assert inventory.conn("web1").user == "webadmin"


def test_an_ini_file_inventory_works_too(tmp_path: Path) -> None:
    ini = write(tmp_path / "hosts.ini", "[app]\napp1 ansible_host=192.0.2.1 ansible_user=ops\n")
    inventory = Inventory(ini)
    assert inventory.resolve("app") == ["app1"]
    conn = inventory.conn("app1")
    assert (conn.address, conn.user) == ("192.0.2.1", "ops")


def test_the_shipped_example_inventory_loads(inventory: Inventory) -> None:
    example = Inventory(Path(__file__).resolve().parents[2] / "inventory")
    assert example.resolve("prod:&web") == ["web1.example.com", "web2.example.com"]
    db = example.conn("db1.example.com")
    assert db.port == 2222 and db.user == "deploy"
    assert db.ssh_args is not None and "ControlPersist=600s" in db.ssh_args
    assert example.host_vars("web1.example.com")["ansible_pipelining"] is True
