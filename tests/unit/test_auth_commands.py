"""carrier.auth.policy: the command policy (issue 13 item 5). A role without ``shell`` runs no
shell, interpreter or launcher whatever its path or version; a ``commands:`` list names the only
programs a role may run; a first word that is an option never reaches the remote shell."""

from __future__ import annotations

from pathlib import Path

import pytest

from carrier.auth.policy import HostRef, Identity, Request, decide, program_kind, rule_matches
from carrier.config import Role, load_config
from carrier.errors import ConfigError

WEB1 = HostRef("web1", ("web",))
ALLOWLIST = (("systemctl", "status", "*"), ("/usr/bin/uptime",), ("journalctl", "-u", "nginx*"),
             ("date", ""), ("bash", "/opt/deploy.sh"))
ROLES = {
    "operator": Role(playbooks=("*",), exec=True, pty=True, modules=("ping", "command", "shell")),
    "admin": Role(exec=True, shell=True, pty=True, modules=("*",)),  # noqa: S604
    "webops": Role(exec=True, pty=True, modules=("command",), commands=ALLOWLIST),
    "deployer": Role(exec=True, shell=True, pty=True, modules=("*",), commands=ALLOWLIST),  # noqa: S604
}


def who(role: str) -> Identity:
    return Identity(name="ops@example.test", role=role, door="mail")


def exec_of(*argv: str) -> Request:
    import shlex

    return Request("exec", (WEB1,), command=shlex.join(argv))


def answer(role: str, request: Request) -> tuple[bool, str]:
    d = decide(who(role), request, ROLES)
    return d.allowed, d.reason


# --------------------------------------------------------------------------- interpreters


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (("sh", "-c", "touch /tmp/x"), "sh is a shell"),
        (("/bin/sh", "-c", "id"), "sh is a shell"),
        (("bash",), "bash is a shell"),
        (("/usr/bin/dash", "-c", "id"), "dash is a shell"),
        (("busybox", "sh"), "busybox is a shell"),
        (("python3", "-c", "import os; os.system('id')"), "python3 is an interpreter"),
        (("/usr/bin/python3.11", "-c", "1"), "python3.11 is an interpreter"),
        (("python",), "python is an interpreter"),
        (("perl5.36.0", "-e", "exec 'sh'"), "perl5.36.0 is an interpreter"),
        (("PERL", "-e", "1"), "PERL is an interpreter"),
        (("ruby", "-e", "1"), "ruby is an interpreter"),
        (("/usr/bin/awk", "BEGIN{system(\"id\")}"), "awk is an interpreter"),
        (("env", "sh"), "env is a launcher"),
        (("/usr/bin/env", "uptime"), "env is a launcher"),
        (("xargs", "-a", "/etc/passwd"), "xargs is a launcher"),
        (("timeout", "5", "sh"), "timeout is a launcher"),
        (("nohup", "id"), "nohup is a launcher"),
        (("sudo", "id"), "sudo is a launcher"),
        (("setsid", "id"), "setsid is a launcher"),
        (("find", "/", "-exec", "sh", "-c", "id", ";"), "find is a program runner with -exec"),
        (("find", "/tmp", "-okdir", "id", ";"), "find is a program runner with -exec"),
    ],
)
def test_a_role_without_shell_runs_no_interpreter(argv: tuple[str, ...], kind: str) -> None:
    allowed, why = answer("operator", exec_of(*argv))
    assert not allowed
    assert why.startswith("role operator has no shell: ") and kind in why
    assert why.endswith("(needs shell: true)")
    # The same rule for a terminal job and for the ad-hoc command module.
    assert not decide(who("operator"), Request("pty", (WEB1,), command=exec_of(*argv).command), ROLES)
    import shlex

    module = Request("adhoc", (WEB1,), module="command", command=shlex.join(argv))
    assert kind in answer("operator", module)[1]
    # A role with a shell may.
    assert answer("admin", exec_of(*argv))[0]


@pytest.mark.parametrize(
    "argv",
    [("uptime",), ("ls", "-l", "/etc"), ("find", "/var/log", "-name", "*.gz"), ("systemctl", "status"),
     ("shasum", "x"), ("envsubst",), ("pythonista-report",), ("echo", "sh", "-c", "id")],
)
def test_ordinary_programs_run_without_a_commands_list(argv: tuple[str, ...]) -> None:
    """The default (no ``commands:``): any program but the runners, so existing roles keep working."""
    assert answer("operator", exec_of(*argv)) == (True, "role operator allows exec")
    assert program_kind(argv) is None


def test_an_option_as_the_first_word_is_refused_for_every_role() -> None:
    for role in ("operator", "admin", "webops"):
        allowed, why = answer(role, exec_of("-rf", "/"))
        assert not allowed and "starts with '-rf'" in why and "name the program first" in why
    shell_text = Request("exec", (WEB1,), command="  -c 'touch /tmp/x'", shell=True)  # noqa: S604
    allowed, why = answer("admin", shell_text)
    assert not allowed and "starts with '-'" in why
    assert not answer("operator", Request("pty", (WEB1,), command="-i"))[0]


def test_a_terminal_job_asked_as_shell_text_needs_a_shell() -> None:
    text = Request("pty", (WEB1,), command="top; sh", shell=True)  # noqa: S604
    assert answer("operator", text) == (False, "role operator may not use a shell")
    assert answer("admin", text)[0]


# --------------------------------------------------------------------------- the allowlist


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (("systemctl", "status"), True),
        (("systemctl", "status", "nginx"), True),
        (("systemctl", "status", "nginx", "cron"), True),
        (("systemctl", "restart", "nginx"), False),
        (("systemctl",), False),
        (("/bin/systemctl", "status"), False),  # a bare name allows the bare name only
        (("/usr/bin/uptime",), True),
        (("/usr/bin/uptime", "-p"), True),  # no patterns: any arguments
        (("uptime",), False),  # an absolute path allows that path only
        (("journalctl", "-u", "nginx.service"), True),
        (("journalctl", "-u", "nginx", "-f"), False),
        (("journalctl", "-u", "sshd"), False),
        (("date",), True),
        (("date", "+%s"), False),  # "" : no arguments
        (("rm", "-rf", "/"), False),
    ],
)
def test_the_commands_list_with_patterns(argv: tuple[str, ...], allowed: bool) -> None:
    got, why = answer("webops", exec_of(*argv))
    assert got is allowed, why
    if not allowed:
        assert why.startswith("role webops may")


def test_refusals_say_what_the_list_allows() -> None:
    _, other = answer("webops", exec_of("rm", "-rf", "/"))
    assert other.startswith("role webops may not run rm: its commands: list allows systemctl status '*', "
                            "/usr/bin/uptime")
    _, args = answer("webops", exec_of("systemctl", "restart", "nginx"))
    assert args == ("role webops may run systemctl only as systemctl status '*' (its commands: list), "
                    "not with these arguments")


def test_an_interpreter_on_the_list_still_needs_shell() -> None:
    allowed, why = answer("webops", exec_of("bash", "/opt/deploy.sh"))
    assert not allowed and why == "role webops has no shell: bash is a shell (needs shell: true)"
    assert answer("deployer", exec_of("bash", "/opt/deploy.sh"))[0]
    assert not answer("deployer", exec_of("bash", "-c", "id"))[0]  # ... and only as listed


def test_shell_text_under_a_commands_list_is_one_plain_command() -> None:
    def shell(text: str) -> tuple[bool, str]:
        return answer("deployer", Request("exec", (WEB1,), command=text, shell=True))  # noqa: S604

    assert shell("systemctl status nginx")[0]
    for text, feature in (("systemctl status; sh", "';'"), ("systemctl status $(id)", "'$('"),
                          ("systemctl status `id`", "'`'"), ("/usr/bin/uptime $0", "'$'"),
                          ("systemctl status nginx | sh", "'|'"), ("date ''\nsh", "a newline")):
        allowed, why = shell(text)
        assert not allowed and why.endswith(f"{feature} is not allowed"), (text, why)
    assert not shell("sh -c id")[0]
    # A terminal job of a role with shell gets its command as shell text: the same check.
    assert not answer("deployer", Request("pty", (WEB1,), command="date ''; sh"))[0]
    assert answer("deployer", Request("pty", (WEB1,), command="systemctl status"))[0]


def test_rule_matching() -> None:
    assert rule_matches(("ls",), ["ls", "-la"]) and not rule_matches(("ls",), ["/bin/ls"])
    assert rule_matches(("ls", ""), ["ls"]) and not rule_matches(("ls", ""), ["ls", "x"])
    assert rule_matches(("cp", "*", "/srv/*"), ["cp", "a", "/srv/b"])
    assert not rule_matches(("cp", "*", "/srv/*"), ["cp", "a", "/etc/b"])
    assert rule_matches(("tail", "-n", "*"), ["tail", "-n"])


# --------------------------------------------------------------------------- ad-hoc command module


@pytest.mark.parametrize(
    ("role", "args", "allowed", "part"),
    [
        ("operator", "uptime", True, ""),
        ("operator", "chdir=/tmp creates=/x ls -l", True, ""),
        ("operator", "chdir=/tmp sh -c id", False, "sh is a shell"),
        ("operator", "removes=/x python3 -c 1", False, "python3 is an interpreter"),
        ("operator", "executable=/bin/sh uptime", False, "no shell: executable= on module command"),
        ("deployer", "executable=/bin/sh systemctl status", False, "has a commands: list: executable="),
        ("deployer", "systemctl status $0", False, "has a commands: list: module command expands"),
        ("admin", "executable=/bin/bash ls", True, ""),
        ("operator", "$SHELL -c id", False, "expands $variables"),
        ("operator", "ls ${HOME}", False, "expands $variables"),
        ("admin", "$SHELL -c id", True, ""),
        ("operator", '{"cmd": "sh -c id"}', False, "not as JSON"),
        ("operator", "-rf /", False, "starts with '-rf'"),
        ("webops", "chdir=/tmp systemctl status nginx", True, ""),
        ("webops", "rm -rf /", False, "may not run rm"),
        ("admin", "sh -c id", True, ""),
    ],
)
def test_the_command_module_has_the_same_rule(role: str, args: str, allowed: bool, part: str) -> None:
    got, why = answer(role, Request("adhoc", (WEB1,), module="command", command=args))
    assert got is allowed, why
    assert part in why


def test_shell_modules_under_a_commands_list() -> None:
    assert answer("deployer", Request("adhoc", (WEB1,), module="shell", command="systemctl status"))[0]
    assert not answer("deployer", Request("adhoc", (WEB1,), module="shell", command="date ''; id"))[0]
    allowed, why = answer("deployer", Request("adhoc", (WEB1,), module="script", command="/srv/x.sh"))
    assert not allowed and "runs a controller file" in why


# --------------------------------------------------------------------------- configuration


MINIMAL = """\
accounts:
  - name: carrier
    address: carrier@example.test
    password_env: PW
    imap: {host: 127.0.0.1, port: 993, tls: implicit}
    smtp: {host: 127.0.0.1, port: 465, tls: implicit}
"""


def _load(tmp_path: Path, roles: str) -> object:
    (tmp_path / "inventory").mkdir(exist_ok=True)
    (tmp_path / "inventory" / "hosts.yml").write_text("all: {hosts: {web1: {}}}\n")
    path = tmp_path / "carrier.yml"
    path.write_text("inventory: inventory\n" + MINIMAL + roles)
    path.chmod(0o600)
    return load_config(path, {"PW": "secret"})


def test_config_reads_the_commands_list(tmp_path: Path) -> None:
    config = _load(tmp_path, 'roles:\n  webops:\n    exec: true\n    commands:\n'
                             '      - systemctl status *\n      - /usr/bin/uptime\n      - date ""\n'
                             "      - \"journalctl -u 'nginx*'\"\n  plain: {exec: true}\n")
    roles = config.roles  # type: ignore[attr-defined]
    assert roles["webops"].commands == (("systemctl", "status", "*"), ("/usr/bin/uptime",), ("date", ""),
                                        ("journalctl", "-u", "nginx*"))
    assert roles["plain"].commands is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('"sys*ctl status"', "contains a glob character"),
        ("bin/uptime", "is a relative path"),
        ('"-rf"', "the first word is the program"),
        ("\"echo 'unclosed\"", "cannot split"),
        ("{program: ls}", "expected a command such as"),
        ('""', "expected a command such as"),
    ],
)
def test_config_refuses_bad_commands_entries(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"roles:\n  webops:\n    exec: true\n    commands: [{entry}]\n")
    problems = str(caught.value).split(": ", 1)[1]
    assert problems.startswith("roles.webops.commands[0]") and message in problems
