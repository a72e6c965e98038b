"""Pure parts of the sandbox orchestrator: env quoting, inventory and carrier.yml builders, sshd helpers."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from carrier.errors import SandboxError
from carrier.sandbox.gpg import _primary_fingerprint, user_id
from carrier.sandbox.layout import HOSTS, LOGIN_USER, MAX_EXEC_NODES, Layout, Ports, exec_node_hosts
from carrier.sandbox.manager import (
    ComponentStatus,
    Sandbox,
    SandboxReport,
    build_config,
    build_inventory,
    default_root,
    dump_yaml,
    env_values,
    export_lines,
)
from carrier.sandbox.sshd import ExecNodes, SshHosts, check_strict_path, config_value, known_hosts_pattern

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
FPRS = {"admin": "A" * 40, "ops": "B" * 40, "carrier": "C" * 40, "newbie": "D" * 40}


def layout(offset: int = 0) -> Layout:
    return Layout(Path("/var/tmp/sbx test"), Ports.with_offset(offset))


# --- env ---


def test_export_lines_survive_the_shell() -> None:
    nasty = {"A": "plain", "B": "with space", "C": "it's $HOME `x` \"q\"", "D": ""}
    lines = export_lines(nasty)
    assert lines[0] == "export A=plain"
    script = "\n".join(lines) + '\nprintf "%s|" "$A" "$B" "$C" "$D"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}).stdout
    assert out == "plain|with space|it's $HOME `x` \"q\"||"


def test_env_values_cover_every_identity() -> None:
    passwords = {"ops": "p1", "admin": "p2", "newbie": "p3", "carrier": "p4"}
    values = env_values(layout(), passwords)
    assert values["CARRIER_CONFIG"] == "/var/tmp/sbx test/carrier.yml"
    assert values["CARRIER_SANDBOX_DIR"] == "/var/tmp/sbx test"
    assert values["CARRIER_SANDBOX_NEWBIE_PASSWORD"] == "p3"
    assert values["CARRIER_SANDBOX_CARRIER_GNUPGHOME"] == "/var/tmp/sbx test/gnupg/carrier"
    assert len(values) == 2 + 2 * 4


def test_env_lines_need_a_sandbox(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="carrier sandbox up"):
        Sandbox(tmp_path).env_lines()


def test_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARRIER_SANDBOX_DIR", raising=False)
    assert default_root() == Path("/var/tmp/carrier-sandbox")
    monkeypatch.setenv("CARRIER_SANDBOX_DIR", "/srv/sbx")
    assert default_root() == Path("/srv/sbx")


# --- inventory ---


def test_inventory_groups_and_host_vars() -> None:
    hosts, group_vars = build_inventory(layout(100), "/usr/bin/python3")
    children = hosts["all"]["children"]
    assert set(children) == {"web", "db"}
    assert set(children["web"]["hosts"]) == {"web1", "web2"}
    db1 = children["db"]["hosts"]["db1"]
    assert db1 == {
        "ansible_host": HOSTS["db1"],
        "ansible_port": 2322,
        "ansible_user": LOGIN_USER,
        "ansible_ssh_private_key_file": "/var/tmp/sbx test/ssh/id_ed25519",
    }
    assert group_vars["ansible_pipelining"] is True
    # The path with a space is quoted: ansible splits these args with shlex.
    assert group_vars["ansible_ssh_extra_args"] == (
        "-o UserKnownHostsFile='/var/tmp/sbx test/ssh/known_hosts' -o StrictHostKeyChecking=yes"
    )


def test_inventory_yaml_round_trips() -> None:
    hosts, _ = build_inventory(layout(), "auto_silent")
    text = dump_yaml(hosts, "# header\n")
    assert text.startswith("# header\n")
    assert YAML(typ="safe").load(text) == hosts


# --- carrier.yml ---


def _docs_example() -> dict[str, Any]:
    block = re.search(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    assert block is not None
    data = YAML(typ="safe").load(block.group(1))
    assert isinstance(data, dict)
    return data


def _keys_documented(ours: Any, docs: Any, where: str) -> list[str]:
    """Paths of keys in ``ours`` that the documented example does not have."""
    if isinstance(ours, dict) and isinstance(docs, dict):
        missing = []
        for key, value in ours.items():
            if where == "roles":  # role names are free; their fields are the documented ones
                missing += _keys_documented(value, docs["operator"], f"roles.{key}")
            elif key not in docs:
                missing.append(f"{where}.{key}")
            else:
                missing += _keys_documented(value, docs[key], key if not where else f"{where}.{key}")
        return missing
    if isinstance(ours, list) and isinstance(docs, list) and docs and isinstance(docs[0], dict):
        return [m for item in ours for m in _keys_documented(item, docs[0], where + "[]")]
    return []


def test_config_uses_only_documented_keys() -> None:
    config = build_config(layout(), fingerprints=FPRS, playbook_dirs=[])
    assert _keys_documented(config, _docs_example(), "") == []


def test_config_values() -> None:
    config = build_config(layout(10), fingerprints=FPRS, playbook_dirs=[Path("/repo/playbooks")])
    assert config["playbook_dirs"] == ["/repo/playbooks"]
    account = config["accounts"][0]
    assert account["address"] == "carrier@example.test"
    assert account["imap"] == {"host": "127.0.0.1", "port": 11003, "tls": "implicit",
                               "ca_file": "/var/tmp/sbx test/tls/cert.pem"}
    assert account["smtp"]["tls"] == "starttls" and account["smtp"]["auth"] is True
    assert config["mcp"]["port"] == 18453
    assert config["admins"] == [{"email": "admin@example.test", "fingerprint": FPRS["admin"]}]
    assert config["users"] == [{"email": "ops@example.test", "fingerprint": FPRS["ops"], "role": "operator"}]
    assert config["roles"]["operator"]["shell"] is False
    assert config["roles"]["admin"]["shell"] is True
    assert config["keyserver"] == {"url": "http://127.0.0.1:10090"}
    assert "newbie" not in str(config)


# --- report ---


def test_report_all_running_and_render() -> None:
    up = ComponentStatus("sshd", True, {"sshd-web1": 10}, [("127.0.0.11", 2222, "sshd web1")])
    down = ComponentStatus("smtp", False, {"smtp": None}, [("127.0.0.1", 10025, "smtp mx")])
    report = SandboxReport(Path("/x"), [up, down], started=["sshd"])
    assert not report.all_running
    assert SandboxReport(Path("/x"), [up]).all_running
    text = report.render()
    assert "NOT all running" in text
    assert "sshd-web1=10" in text and "smtp=-" in text and "started" in text


# --- sshd / gpg helpers ---


def test_known_hosts_pattern() -> None:
    assert known_hosts_pattern("127.0.0.11", 2222) == "[127.0.0.11]:2222"
    assert known_hosts_pattern("web1", 22) == "web1"


def test_config_value_quotes_whitespace_and_refuses_quotes() -> None:
    assert config_value("/a/b") == "/a/b"
    assert config_value(Path("/a b/c")) == '"/a b/c"'
    with pytest.raises(SandboxError):
        config_value('/a"b')


def test_strict_path_allows_sticky_parents_only(tmp_path: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    base = tmp_path / "sbx"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    keys = base / "authorized_keys"
    keys.write_text("x")
    keys.chmod(0o644)
    # tmp_path is under /tmp (sticky, world-writable): accepted, as /var/tmp must be.
    assert Path("/tmp").stat().st_mode & 0o1002 == 0o1002
    check_strict_path(keys, uid, gid, "someone")

    base.chmod(0o775)
    with pytest.raises(SandboxError, match="writable by others"):
        check_strict_path(keys, uid, gid, "someone")
    base.chmod(0o755)
    keys.chmod(0o666)
    with pytest.raises(SandboxError, match="writable by others"):
        check_strict_path(keys, uid, gid, "someone")


def test_strict_path_needs_traversable_parents(tmp_path: Path) -> None:
    base = tmp_path / "private"
    base.mkdir()
    base.chmod(0o700)
    keys = base / "authorized_keys"
    keys.write_text("x")
    # Someone who is neither owner nor group cannot pass a 0700 directory.
    with pytest.raises(SandboxError, match=r"private is mode 0700: the someone user cannot reach"):
        check_strict_path(keys, 54321, 54321, "someone")


def test_primary_fingerprint_from_colons() -> None:
    colons = (
        "sec:u:255:22:AAAA:1:::::::scESC:::+:::ed25519:::0:\n"
        "fpr:::::::::0123456789ABCDEF0123456789ABCDEF01234567:\n"
        "grp:::::::::X:\n"
        "uid:u::::1::H::Ops <ops@example.test>::::::::::0:\n"
        "ssb:u:255:18:BBBB:1::::::e:::+:::cv25519::\n"
        "fpr:::::::::FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF:\n"
    )
    assert _primary_fingerprint(colons) == "0123456789ABCDEF0123456789ABCDEF01234567"
    assert _primary_fingerprint("") is None


def test_user_id() -> None:
    assert user_id("ops") == "Ops <ops@example.test>"


# --- execution nodes (--exec-nodes N) ---


def test_exec_nodes_get_addresses_from_21_up() -> None:
    assert exec_node_hosts(0) == {}
    assert exec_node_hosts(3) == {"exec1": "127.0.0.21", "exec2": "127.0.0.22", "exec3": "127.0.0.23"}
    assert exec_node_hosts(MAX_EXEC_NODES)[f"exec{MAX_EXEC_NODES}"] == "127.0.0.29"
    box = Layout(Path("/x"), exec_nodes=2)
    assert box.ssh_hosts == {**HOSTS, "exec1": "127.0.0.21", "exec2": "127.0.0.22"}
    assert Layout(Path("/x")).ssh_hosts == HOSTS


@pytest.mark.parametrize("bad", [-1, MAX_EXEC_NODES + 1, 300])
def test_a_bad_number_of_exec_nodes_is_refused_with_the_range(bad: int, tmp_path: Path) -> None:
    expected = (f"the number of execution nodes (--exec-nodes) must be a whole number from 0 to "
                f"{MAX_EXEC_NODES} (the nodes live on 127.0.0.21-127.0.0.29), not {bad}")
    with pytest.raises(SandboxError) as err:
        Sandbox(tmp_path, exec_nodes=bad)
    assert str(err.value) == expected
    with pytest.raises(SandboxError):
        Layout(tmp_path, exec_nodes=bad)
    assert not (tmp_path / "sandbox.json").exists()  # nothing written


def test_meta_records_ports_and_nodes_and_loads_them_back(tmp_path: Path) -> None:
    saved = Layout(tmp_path, Ports.with_offset(300), exec_nodes=2)
    saved.save_meta()
    assert json.loads(saved.meta_file.read_text()) == {"ports": asdict(saved.ports), "exec_nodes": 2}
    assert Layout.load(tmp_path) == saved
    # The sandbox keeps its nodes when `up` does not name them, and changes them when it does.
    assert Sandbox(tmp_path).layout.exec_nodes == 2
    assert Sandbox(tmp_path, exec_nodes=0).layout.exec_nodes == 2  # applied by up(), not before


def test_meta_written_before_nodes_existed_means_none(tmp_path: Path) -> None:
    ports = asdict(Ports.with_offset(100))
    del ports["postgres"]  # an older sandbox.json: no postgres port, no exec_nodes
    (tmp_path / "sandbox.json").write_text(json.dumps({"ports": ports}))
    loaded = Layout.load(tmp_path)
    assert loaded.exec_nodes == 0 and loaded.ports == Ports.with_offset(100)


@pytest.mark.parametrize(("text", "message"), [
    ('{"ports": {"ssh": 2222}, "exec_nodes": -3}', "sandbox.json: exec_nodes: the number of execution nodes"),
    ('{"ports": {"ssh": 2222}, "exec_nodes": "2"}', "not '2'"),
    ('{"ports": {"ssh": "2222"}}', "is not a sandbox record"),
    ('{"ports": {"ssh": 2222, "warp": 1}}', "unknown or non-numeric ports ['warp']"),
    ("[1, 2]", "is not a sandbox record"),
    ("{not json", "cannot read"),
])
def test_a_broken_meta_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "sandbox.json").write_text(text)
    with pytest.raises(SandboxError) as err:
        Layout.load(tmp_path)
    assert message in str(err.value)


def test_inventory_and_config_without_nodes_are_unchanged() -> None:
    hosts, _ = build_inventory(layout(), "auto_silent")
    assert set(hosts["all"]["children"]) == {"web", "db"}
    assert "execution_nodes" not in build_config(layout(), fingerprints=FPRS, playbook_dirs=[])


def test_nodes_are_inventory_hosts_of_their_own_group_and_serve_web_and_db() -> None:
    box = Layout(Path("/var/tmp/sbx"), Ports.with_offset(100), exec_nodes=2)
    hosts, _ = build_inventory(box, "auto_silent")
    children = hosts["all"]["children"]
    assert set(children) == {"web", "db", "nodes"}
    assert children["nodes"]["hosts"]["exec2"] == {
        "ansible_host": "127.0.0.22", "ansible_port": 2322, "ansible_user": LOGIN_USER,
        "ansible_ssh_private_key_file": "/var/tmp/sbx/ssh/id_ed25519",
    }
    assert set(children["web"]["hosts"]) == {"web1", "web2"}  # the inventory hosts stay as they were
    config = build_config(box, fingerprints=FPRS, playbook_dirs=[])
    assert config["execution_nodes"] == [
        {"name": f"exec{i}", "target": f"exec{i}", "groups": ["web", "db"],
         "ansible_runner": "/usr/bin/ansible-runner"} for i in (1, 2)
    ]
    assert _keys_documented(config, _docs_example(), "") == []


def test_node_component_lists_only_the_nodes_and_known_hosts_covers_all() -> None:
    box = Layout(Path("/var/tmp/sbx"), Ports.with_offset(100), exec_nodes=2)
    nodes, inventory_hosts = ExecNodes(box), SshHosts(box)
    assert nodes.name == "nodes" and list(nodes.hosts) == ["exec1", "exec2"]
    assert nodes.ports() == [("127.0.0.21", 2322, "sshd exec1"), ("127.0.0.22", 2322, "sshd exec2")]
    assert list(inventory_hosts.hosts) == list(HOSTS)
    assert list(inventory_hosts.every) == [*HOSTS, "exec1", "exec2"]  # known_hosts and ssh_config
    assert [c.name for c in Sandbox(Path("/var/tmp/none-here")).components()] == [
        "oauth", "dovecot", "smtp", "keyserver", "sshd"]
