"""carrier.auth.policy: one pure decision for every door, with a reason."""

from __future__ import annotations

import pytest

from carrier.auth.policy import (
    ACTIONS,
    METACHARACTERS,
    SCOPE_OF_ACTION,
    HostRef,
    Identity,
    Policy,
    Request,
    check_scopes,
    decide,
    host_in_pattern,
    metacharacter,
    tool_group,
)
from carrier.config import Role

WEB1 = HostRef("web1", ("web",))
WEB2 = HostRef("web2", ("web",))
DB1 = HostRef("db1", ("db",))

ROLES = {
    "operator": Role(playbooks=("*",), hosts="all", exec=True, shell=False, pty=True, modules=("ping",)),
    "deployer": Role(playbooks=("deploy_*", "restart_nginx"), hosts="web", exec=True),
    "viewer": Role(),
    "admin": Role(playbooks=("*",), exec=True, shell=True, pty=True, modules=("*",),  # noqa: S604
                  mail=("mail_*",)),
    "reader": Role(mail=("mail_inbox_*", "mail_folder_list")),
    "nodb": Role(exec=True, hosts="all:!db"),
    "local": Role(playbooks=("*",), exec=True, pty=True, modules=("ping",), local=True),
}
HERE = HostRef("here", ("lab",), local=True)


def who(role: str, **kw: object) -> Identity:
    return Identity(name=str(kw.pop("name", "ops@example.test")), role=role, door="mail", **kw)  # type: ignore[arg-type]


def ok(identity: Identity, request: Request, *, strict: bool = False) -> bool:
    return decide(identity, request, ROLES, strict_commands=strict).allowed


def reason(identity: Identity, request: Request, *, strict: bool = False) -> str:
    d = decide(identity, request, ROLES, strict_commands=strict)
    assert not d.allowed, d
    return d.reason


# --------------------------------------------------------------------------- host patterns


@pytest.mark.parametrize(
    ("host", "pattern", "expected"),
    [
        (WEB1, "all", True),
        (WEB1, "*", True),
        (WEB1, "web", True),
        (DB1, "web", False),
        (WEB1, "web1", True),
        (WEB2, "web1", False),
        (WEB1, "web*", True),
        (DB1, "web:db", True),
        (DB1, "web,db", True),
        (DB1, "all:!db", False),
        (WEB1, "all:!db", True),
        (WEB1, "web:&db", False),
        (WEB1, "!web1", False),
        (WEB2, "!web1", True),
        (WEB1, "", False),
        (HostRef("web10"), "web1", False),
    ],
)
def test_host_patterns(host: HostRef, pattern: str, expected: bool) -> None:
    assert host_in_pattern(host, pattern) is expected


# --------------------------------------------------------------------------- playbooks, exec, pty


def test_playbook_globs_and_extension() -> None:
    assert ok(who("deployer"), Request("playbook", (WEB1,), playbook="deploy_app"))
    assert ok(who("deployer"), Request("playbook", (WEB1,), playbook="restart_nginx.yml"))
    assert "may not run playbook wipe_db" in reason(who("deployer"), Request("playbook", (WEB1,),
                                                                              playbook="wipe_db"))


def test_hosts_outside_the_role_are_named() -> None:
    r = reason(who("deployer"), Request("playbook", (WEB1, DB1), playbook="deploy_app"))
    assert r == "role deployer may not target db1"
    assert "db1" in reason(who("nodb"), Request("exec", (DB1,), command="uptime"))
    assert ok(who("nodb"), Request("exec", (WEB2,), command="uptime"))


def test_no_resolved_host_is_a_denial() -> None:
    denied = reason(who("operator"), Request("exec", (), command="uptime"))
    assert denied == "no target host matched the pattern"


@pytest.mark.parametrize("action", ["exec", "pty", "adhoc", "playbook"])
def test_the_controller_is_a_target_only_for_a_local_role(action: str) -> None:
    request = Request(action, (WEB1, HERE), command="uptime", module="ping", playbook="ping")  # type: ignore[arg-type]
    for role in ("operator", "admin"):
        assert "may not target the Carrier controller (here): that needs `local: true`" in reason(
            who(role, admin=role == "admin"), request)
    assert ok(who("local"), request)
    assert ok(who("operator"), Request(action, (WEB1,), command="uptime", module="ping",  # type: ignore[arg-type]
                                       playbook="ping"))


def test_a_controller_playbook_needs_a_local_role() -> None:
    request = Request("playbook", (WEB1,), playbook="collect", controller=True)
    assert "runs tasks on the Carrier controller" in reason(who("operator"), request)
    assert "needs `local: true`" in reason(who("admin", admin=True), request)
    assert ok(who("local"), request)


def test_no_default_role_is_local() -> None:
    from carrier.config import _default_roles

    assert not any(role.local for role in _default_roles().values())
    assert not Role().local


def test_viewer_may_not_exec_pty_or_run() -> None:
    assert "may not run commands" in reason(who("viewer"), Request("exec", (WEB1,), command="uptime"))
    assert "terminal jobs" in reason(who("viewer"), Request("pty", (WEB1,), command="top"))
    assert "playbook" in reason(who("viewer"), Request("playbook", (WEB1,), playbook="x"))


def test_shell_needs_the_shell_flag() -> None:
    with_shell = Request("exec", (WEB1,), command="ls | wc", shell=True)  # noqa: S604
    assert "may not use a shell" in reason(who("operator"), with_shell)
    assert ok(who("admin"), with_shell)


@pytest.mark.parametrize("meta", METACHARACTERS)
def test_strict_filter_refuses_each_metacharacter(meta: str) -> None:
    command = f"uptime {meta} id"
    expected = "NUL byte" if meta == "\x00" else "has no shell"
    assert expected in reason(who("operator"), Request("exec", (WEB1,), command=command), strict=True)


def test_strict_filter_includes_ampersand_and_applies_to_pty() -> None:
    assert metacharacter("sleep 1 & id") == "&"
    assert "'&'" in reason(who("operator"), Request("pty", (WEB1,), command="top & id"), strict=True)
    # Without the filter the same command is left to the no-shell runner; with shell it is allowed.
    assert ok(who("operator"), Request("exec", (WEB1,), command="echo a;b"))
    assert ok(who("admin"), Request("exec", (WEB1,), command="echo a;b"), strict=True)
    assert ok(who("operator"), Request("exec", (WEB1,), command="uptime -p"), strict=True)


def test_nul_and_empty_commands_are_refused() -> None:
    assert "NUL" in reason(who("admin"), Request("exec", (WEB1,), command="ls\x00rm"))
    assert reason(who("admin"), Request("exec", (WEB1,), command="  ")) == "no command given"


# --------------------------------------------------------------------------- modules, mail, jobs, admin


def test_adhoc_modules() -> None:
    assert ok(who("operator"), Request("adhoc", (WEB1,), module="ping"))
    assert "module setup" in reason(who("operator"), Request("adhoc", (WEB1,), module="setup"))
    # command-running modules need exec/shell whatever the module globs say
    assert "has no shell" in reason(who("operator"), Request("adhoc", (WEB1,), module="shell"))
    assert ok(who("admin"), Request("adhoc", (WEB1,), module="ansible.builtin.shell"))


def test_command_module_needs_exec() -> None:
    roles = {"mods": Role(modules=("*",))}
    d = decide(Identity("x", "mods", "cli"), Request("adhoc", (WEB1,), module="command"), roles)
    assert not d.allowed and "may not run commands" in d.reason


def test_mail_tools_by_glob() -> None:
    assert ok(who("reader"), Request("mail", tool="mail_inbox_list"))
    assert ok(who("reader"), Request("mail", tool="mail_folder_list"))
    assert "mail_send" in reason(who("reader"), Request("mail", tool="mail_send"))
    denied = reason(who("operator"), Request("mail", tool="mail_inbox_list"))
    assert "operator may not use mail_inbox_list" in denied
    assert "may not use mail tools" in reason(who("admin"), Request("mail"))


def test_a_read_only_account_takes_only_the_reading_mail_tools() -> None:
    from carrier.auth.policy import MAIL_READ_TOOLS

    local = Identity("me", "admin", "cli", local=True)
    for tool in ("mail_send", "mail_delete", "mail_folder_create", "mail_flags", "mail_move"):
        request = Request("mail", tool=tool, account="ro", read_only_account=True)
        assert "account ro is read_only: true" in reason(who("admin"), request)
        assert "read_only" in reason(local, request)  # the local user too: it is the account's setting
        assert ok(who("admin"), Request("mail", tool=tool, account="rw"))
    for tool in MAIL_READ_TOOLS:
        assert ok(who("admin"), Request("mail", tool=tool, account="ro", read_only_account=True))


def test_jobs_of_others_are_refused_unless_admin() -> None:
    assert ok(who("viewer"), Request("job_read", job_owner="ops@example.test"))
    assert "someone else" in reason(who("operator"), Request("job_control", job_owner="dev@example.test"))
    assert ok(who("operator", admin=True), Request("job_control", job_owner="dev@example.test"))
    assert "owner is unknown" in reason(who("operator"), Request("job_read"))


def test_admin_actions_need_an_admin() -> None:
    assert reason(who("admin"), Request("admin")) == "only an admin may do this"
    assert ok(who("viewer", admin=True), Request("admin"))


def test_every_enrolled_identity_may_change_its_own_settings() -> None:
    for role in ("viewer", "operator", "admin"):
        assert ok(who(role), Request("settings"))
    assert reason(who("ghost"), Request("settings")) == "role 'ghost' is not defined"
    token = who("operator", scopes=("tools:*",), token_id="t-aaaaaaaaaaaa")
    assert reason(token, Request("settings")) == "settings is not available with a token"


def test_undefined_role_and_unknown_action() -> None:
    assert reason(who("ghost"), Request("inventory")) == "role 'ghost' is not defined"
    assert "unknown action" in reason(who("admin"), Request("format_disk"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- token scopes


def test_scopes_narrow_tools_and_hosts() -> None:
    token = who("operator", scopes=("tools:run", "hosts:web"), token_id="t-aaaaaaaaaaaa")
    assert ok(token, Request("pty", (WEB1,), command="top", tool="job_start"))
    assert ok(token, Request("exec", (WEB1,), command="uptime", tool="ssh_exec"))
    assert "jobs tools" in reason(token, Request("job_read", job_owner="ops@example.test"))
    denied = reason(token, Request("pty", (DB1,), command="top", tool="job_start"))
    assert "scope does not cover db1" in denied


def test_scopes_never_grant_beyond_the_role() -> None:
    token = who("viewer", scopes=("tools:*", "hosts:all"), token_id="t-aaaaaaaaaaaa")
    assert "may not run commands" in reason(token, Request("exec", (WEB1,), command="id", tool="ssh_exec"))


def test_token_cannot_do_admin_or_mint_tokens_and_unknown_scopes_deny() -> None:
    token = who("admin", admin=True, scopes=(), token_id="t-aaaaaaaaaaaa")
    assert "not available with a token" in reason(token, Request("admin"))
    assert "not available with a token" in reason(token, Request("token"))
    weird = who("admin", scopes=("root",), token_id="t-aaaaaaaaaaaa")
    assert "does not understand: root" in reason(weird, Request("inventory"))
    assert check_scopes(["tools:mail", "hosts:web:!db", "tools:x", "bad"]) == ["tools:x", "bad"]


def test_tool_groups() -> None:
    """The scope follows the action, not the tool's name: whatever runs a command is `run`."""
    assert tool_group(Request("mail", tool="mail_send")) == "mail"
    assert tool_group(Request("pty", tool="job_start")) == "run"  # a terminal job runs a command
    assert tool_group(Request("pty_input", tool="job_input")) == "run"  # so does typing into one
    assert tool_group(Request("exec", tool="ssh_exec")) == "run"
    assert tool_group(Request("playbook")) == "run"
    assert tool_group(Request("job_read")) == "jobs"
    assert tool_group(Request("job_list", tool="job_list")) == "jobs"
    assert tool_group(Request("admin")) is None and tool_group(Request("token")) is None
    assert set(SCOPE_OF_ACTION) == set(ACTIONS)  # every action has its scope written down


def test_jobs_scope_cannot_start_a_terminal_and_mail_scope_cannot_list_jobs() -> None:
    jobs_token = who("operator", scopes=("tools:jobs",), token_id="t-aaaaaaaaaaaa")
    assert "does not include run" in reason(jobs_token, Request("pty", (WEB1,), command="top"))
    mail_token = who("operator", scopes=("tools:mail",), token_id="t-aaaaaaaaaaaa")
    assert "does not include jobs" in reason(mail_token, Request("job_list"))


def test_admin_only_playbooks_and_listing_rules() -> None:
    book = Request("playbook", (WEB1,), playbook="service_restart", admin_only=True)
    assert "for admins only" in reason(who("operator"), book)
    assert "only an admin" in reason(who("operator"), Request("job_list", job_owner="someone@else"))
    assert ok(who("operator"), Request("job_list"))


def test_policy_object_uses_the_config_switch() -> None:
    strict = Policy(ROLES, strict_commands=True)
    loose = Policy(ROLES)
    request = Request("exec", (WEB1,), command="id; id")
    assert not strict.decide(who("operator"), request) and loose.decide(who("operator"), request)
