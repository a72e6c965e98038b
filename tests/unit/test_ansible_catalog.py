"""The playbook catalog: names that cannot escape, metadata, extra vars refused unless declared and
well-typed, and the bundled playbooks (metadata valid, ansible-playbook --syntax-check clean)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from carrier.ansible.catalog import (
    Catalog,
    PlaybookInfo,
    VarSpec,
    check_playbook_name,
    parse_assignments,
    validate_extra_vars,
)
from carrier.ansible.controller import controller_uses
from carrier.ansible.errors import ExtraVarsError, PlaybookError

BUNDLED = Path(__file__).resolve().parents[2] / "playbooks"
PLAY = "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def pbdir(tmp_path: Path) -> Path:
    root = tmp_path / "playbooks"
    write(root / "deploy.yml", PLAY)
    write(
        root / "deploy.meta.yml",
        """\
        description: Deploy the app
        admin_only: true
        default_limit: web
        vars:
          version: {type: str, required: true, pattern: '^[0-9.]+$', description: release}
          workers: {type: int, default: 4, min: 1, max: 64}
          mode: {type: choice, choices: [rolling, all], default: rolling}
          dry: {type: bool, default: false}
          note: {type: str, default: hello, max_length: 10}
        """,
    )
    write(root / "plain.yaml", PLAY)
    return root


@pytest.fixture
def catalog(pbdir: Path) -> Catalog:
    return Catalog([pbdir])


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["ping", "ping.yml", "ping.yaml", "disk_usage", "a-b_c9"])
def test_plain_names_pass(name: str) -> None:
    assert check_playbook_name(name) == name.removesuffix(".yml").removesuffix(".yaml")


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "..", "sub/ping", "/abs/ping.yml", "ping;id", ".hidden", "x.meta", "", "a b", "-x"],
)
def test_path_like_names_are_refused(name: str) -> None:
    with pytest.raises(PlaybookError):
        check_playbook_name(name)


def test_traversal_never_reaches_the_file_system(catalog: Catalog, pbdir: Path) -> None:
    write(pbdir.parent / "secret.yml", PLAY)
    with pytest.raises(PlaybookError, match=r"no '/', no '\.\.'"):
        catalog.get("../secret")


def test_a_symlink_out_of_the_playbook_dir_is_refused(catalog: Catalog, pbdir: Path) -> None:
    outside = write(pbdir.parent / "outside.yml", PLAY)
    (pbdir / "sneaky.yml").symlink_to(outside)
    with pytest.raises(PlaybookError, match="outside"):
        catalog.get("sneaky")
    assert "sneaky" not in [p.name for p in catalog.list()]


def test_missing_playbook_is_none(catalog: Catalog) -> None:
    assert catalog.get("nope") is None


# --------------------------------------------------------------------------- metadata


def test_metadata_is_read(catalog: Catalog, pbdir: Path) -> None:
    info = catalog.get("deploy.yml")
    assert info is not None
    assert (info.name, info.path, info.directory) == ("deploy", pbdir / "deploy.yml", pbdir)
    assert info.description == "Deploy the app"
    assert info.admin_only is True and info.default_limit == "web"
    assert list(info.vars) == ["version", "workers", "mode", "dry", "note"]
    assert info.vars["version"].required and info.vars["workers"].default == 4
    assert info.to_dict()["vars"]["mode"] == {"type": "choice", "required": False, "default": "rolling",
                                              "choices": ["rolling", "all"]}


def test_list_shows_playbooks_not_sidecars(catalog: Catalog) -> None:
    assert [p.name for p in catalog.list()] == ["deploy", "plain"]
    plain = catalog.get("plain")
    assert plain is not None and plain.vars == {} and plain.description == ""


def test_metadata_changes_are_picked_up(catalog: Catalog, pbdir: Path) -> None:
    assert catalog.get("plain") is not None
    write(pbdir / "plain.meta.yml", "description: now described\n")
    info = catalog.get("plain")
    assert info is not None and info.description == "now described"


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ("nonsense: 1\n", "unknown keys nonsense"),
        ("vars: {x: {type: float}}\n", "type must be one of"),
        ("vars: {ansible_user: {type: str}}\n", "must be"),
        ("vars: {x: {type: choice}}\n", "needs choices"),
        ("vars: {x: {type: str, pattern: '['}}\n", "bad pattern"),
        ("vars: {x: {type: int, default: abc}}\n", "default"),
        ("default_limit: 'web;id'\n", "default_limit"),
        ("- a list\n", "expected a mapping"),
        ("vars: {x: {type: str, colour: red}}\n", "unknown keys colour"),
    ],
)
def test_bad_metadata_names_the_file_and_the_problem(pbdir: Path, meta: str, message: str) -> None:
    write(pbdir / "plain.meta.yml", meta)
    with pytest.raises(PlaybookError, match=message) as err:
        Catalog([pbdir]).get("plain")
    assert "plain.meta.yml" in str(err.value)


def test_first_directory_wins(tmp_path: Path, pbdir: Path) -> None:
    other = tmp_path / "other"
    write(other / "plain.yml", PLAY)
    write(other / "plain.meta.yml", "description: from other\n")
    info = Catalog([other, pbdir]).get("plain")
    assert info is not None and info.description == "from other"


# --------------------------------------------------------------------------- extra vars


def deploy(catalog: Catalog) -> PlaybookInfo:
    info = catalog.get("deploy")
    assert info is not None
    return info


def test_declared_vars_are_converted_and_defaults_filled(catalog: Catalog) -> None:
    got = validate_extra_vars(deploy(catalog), {"version": "1.2.3", "workers": "8", "dry": "yes"})
    assert got == {"version": "1.2.3", "workers": 8, "mode": "rolling", "dry": True, "note": "hello"}
    typed = validate_extra_vars(deploy(catalog), {"version": "2", "workers": 2, "dry": False, "mode": "all"})
    assert typed["workers"] == 2 and typed["dry"] is False and typed["mode"] == "all"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"version": "1", "colour": "red"}, "unknown extra var 'colour' for playbook deploy: allowed: dry"),
        ({"version": "1", "ansible_ssh_common_args": "-oProxyCommand=id"}, "unknown extra var"),
        ({}, "needs extra var version"),
        ({"version": "1; rm -rf /"}, "does not match"),
        ({"version": "{{ lookup('pipe', 'id') }}"}, "template delimiter"),
        ({"version": "1", "note": "{% raw %}"}, "template delimiter"),
        ({"version": "1", "note": "x\x1by"}, "control characters"),
        ({"version": "1", "note": "12345678901"}, "longer than 10"),
        ({"version": "1", "workers": "0"}, ">= 1"),
        ({"version": "1", "workers": "65"}, "<= 64"),
        ({"version": "1", "workers": "4.5"}, "whole number"),
        ({"version": "1", "workers": True}, "whole number"),
        ({"version": "1", "mode": "fast"}, "one of rolling, all"),
        ({"version": "1", "dry": "maybe"}, "true or false"),
        ({"version": ["1"]}, "must be text"),
    ],
)
def test_bad_extra_vars_are_refused(catalog: Catalog, given: dict[str, object], message: str) -> None:
    with pytest.raises(ExtraVarsError, match=message.replace("(", r"\(").replace("{", r"\{")):
        validate_extra_vars(deploy(catalog), given)


def test_a_playbook_without_metadata_takes_no_extra_vars(catalog: Catalog) -> None:
    plain = catalog.get("plain")
    assert plain is not None
    assert validate_extra_vars(plain, None) == {}
    with pytest.raises(ExtraVarsError, match="takes no extra vars"):
        validate_extra_vars(plain, {"x": "1"})


def test_assignments() -> None:
    assert parse_assignments(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(ExtraVarsError, match="not key=value"):
        parse_assignments(["novalue"])


def test_var_spec_dict_is_stable() -> None:
    spec = VarSpec(name="n", type="int", min=1, max=3, default=2, description="d")
    assert spec.to_dict() == {"type": "int", "required": False, "default": 2, "description": "d", "min": 1,
                              "max": 3}


# --------------------------------------------------------------------------- the bundled catalog


def test_bundled_catalog_has_the_promised_playbooks() -> None:
    catalog = Catalog([BUNDLED])
    names = [p.name for p in catalog.list()]
    assert names == ["disk_usage", "facts", "log_tail", "ping", "service_restart", "service_status",
                     "updates_check"]
    for info in catalog.list():
        assert info.description, info.name
        assert info.default_limit == "all"
    assert catalog.get("service_restart").admin_only is True  # type: ignore[union-attr]
    log_tail = catalog.get("log_tail")
    assert log_tail is not None
    with pytest.raises(ExtraVarsError, match="does not match"):
        validate_extra_vars(log_tail, {"file": "/var/log/../../etc/shadow"})
    with pytest.raises(ExtraVarsError, match="does not match"):
        validate_extra_vars(log_tail, {"file": "/etc/shadow"})
    assert validate_extra_vars(log_tail, {"file": "/var/log/dpkg.log"}) == {"file": "/var/log/dpkg.log",
                                                                            "lines": 50}
    service = catalog.get("service_status")
    assert service is not None
    with pytest.raises(ExtraVarsError, match="needs extra var service"):
        validate_extra_vars(service, {})


def test_bundled_playbooks_pass_ansible_syntax_check(tmp_path: Path) -> None:
    binary = Path(sys.executable).with_name("ansible-playbook")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "t"),
           "ANSIBLE_NOCOLOR": "1"}
    books = sorted(str(p) for p in BUNDLED.glob("*.yml") if not p.name.endswith(".meta.yml"))
    done = subprocess.run([str(binary), "-i", "localhost,", "--syntax-check", *books],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- the controller


@pytest.mark.parametrize(
    ("play", "found"),
    [
        ("- hosts: localhost\n  tasks: [{ansible.builtin.ping: }]\n",
         "hosts 'localhost' names the controller"),
        ("- hosts: web,127.0.0.1\n  tasks: []\n", "names the controller"),
        ("- hosts: ['::1']\n  tasks: []\n", "names the controller"),
        ("- hosts: all\n  connection: local\n  tasks: []\n", "connection: local"),
        ("- hosts: all\n  vars: {ansible_connection: local}\n  tasks: []\n", "ansible_connection: local"),
        ("- hosts: all\n  tasks:\n    - name: here\n      ansible.builtin.command: id\n"
         "      delegate_to: localhost\n", "task 'here': delegate_to 'localhost' is the controller"),
        ("- hosts: all\n  tasks:\n    - ansible.builtin.command: id\n      delegate_to: '{{ x }}'\n",
         "is a template Carrier cannot judge"),
        ("- hosts: all\n  tasks:\n    - block:\n        - local_action: ansible.builtin.command id\n",
         "local_action"),
        ("- hosts: all\n  tasks:\n    - ansible.builtin.debug: {msg: \"{{ lookup('pipe', 'id') }}\"}\n",
         "pipe/lines lookup"),
        ("- hosts: all\n  tasks:\n    - ansible.builtin.include_tasks: inner.yml\n",
         "delegate_to 'localhost'"),
        ("- hosts: all\n  tasks:\n    - ansible.builtin.import_tasks: '{{ f }}.yml'\n", "cannot follow"),
        ("- hosts: all\n  tasks:\n    - ansible.builtin.import_tasks: /etc/elsewhere.yml\n",
         "not a file beside the playbook"),
        ("- ansible.builtin.import_playbook: sneaky.yml\n", "sneaky.yml play 1: hosts 'localhost'"),
        ("- hosts: all\n  roles: [collect]\n", "connection: local"),
        ("- hosts: all\n  roles: [{role: elsewhere}]\n", "not a file beside the playbook"),
        ("- hosts: all\n  tasks:\n    - ansible.builtin.include_role: {name: collect}\n",
         "connection: local"),
    ],
)
def test_playbooks_that_touch_the_controller_are_found(tmp_path: Path, play: str, found: str) -> None:
    root = tmp_path / "playbooks"
    write(root / "inner.yml", "- ansible.builtin.command: id\n  delegate_to: localhost\n")
    write(root / "sneaky.yml", "- hosts: localhost\n  tasks: []\n")
    write(root / "roles" / "collect" / "tasks" / "main.yml",
          "- ansible.builtin.command: id\n  connection: local\n")
    write(root / "it.yml", play)
    uses = controller_uses(root / "it.yml")
    assert any(found in use for use in uses), uses


def test_playbooks_that_stay_on_their_hosts_have_no_controller_use(tmp_path: Path) -> None:
    root = tmp_path / "playbooks"
    write(root / "inner.yml", "- ansible.builtin.ping:\n")
    write(root / "it.yml", """\
        - hosts: web:&prod
          tasks:
            - ansible.builtin.command: id
              delegate_to: db1
            - ansible.builtin.include_tasks: inner.yml
            - ansible.builtin.debug: {msg: "{{ lookup('env', 'HOME') }}"}
        """)
    write(root / "broken.yml", "- hosts: all\n  tasks:\n    - ansible.builtin.ping:\n     foo: [\n")
    assert controller_uses(root / "it.yml") == ()
    assert controller_uses(root / "broken.yml") == ()  # ansible refuses it at run time
    for info in Catalog([BUNDLED]).list():
        assert controller_uses(info.path) == (), info.name
        assert info.controller is False


def test_the_controller_flag_is_read_from_the_metadata(pbdir: Path) -> None:
    write(pbdir / "plain.meta.yml", "controller: true\n")
    info = Catalog([pbdir]).get("plain")
    assert info is not None and info.controller is True and info.to_dict()["controller"] is True
    write(pbdir / "plain.meta.yml", "controller: maybe\n")
    with pytest.raises(PlaybookError, match="controller must be true or false"):
        Catalog([pbdir]).get("plain")
