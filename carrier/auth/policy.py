"""Who may do what: one pure function, ``decide(identity, request)``, used by every door.

Roles come from carrier.yml (playbook globs, a host pattern, ad-hoc modules, exec/shell/pty, MCP
mail tools). A bearer token narrows its owner's role further with scopes (``tools:<group>``,
``hosts:<pattern>``); a scope is never a grant. Hosts are decided on the resolved target list
(the jobs layer expands inventory patterns first), so a pattern cannot smuggle in a host; a host
that is the Carrier controller (``HostRef.local``) or a playbook that runs tasks there
(``Request.controller``) needs a role with ``local: true``.
No I/O here: everything needed is in the arguments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Literal, get_args

from carrier.config import Config, Role

Action = Literal[
    "playbook",  # run a playbook
    "adhoc",  # an ad-hoc Ansible module
    "exec",  # a command on hosts
    "pty",  # start an interactive terminal job
    "pty_input",  # type into a terminal job (that is running commands, so it needs pty)
    "ssh_control",  # close hosts' ssh masters (interrupts what runs there: needs exec there)
    "job_read",  # status/output/screen/wait of a job
    "job_control",  # kill/resize of a job
    "job_list",  # list jobs (one's own; an admin's: everyone's)
    "mail",  # an MCP mail tool
    "inventory",  # list hosts/playbooks/ssh masters (read-only)
    "token",  # ask for an MCP token
    "enroll",  # (re-)start one's own enrollment
    "admin",  # approve/deny/revoke enrollments, tokens of others
    "schedule",  # add/list/remove schedules; each firing of one, as its owner
]
ACTIONS: tuple[str, ...] = get_args(Action)
TOOL_GROUPS = ("run", "jobs", "mail")
#: Which token scope ``tools:<group>`` covers each action. Whatever runs a command on a host
#: (playbook, ad-hoc, exec, starting or typing into a terminal, closing masters) is ``run``;
#: watching and stopping jobs is ``jobs``; mail tools are ``mail``. ``token``/``admin``: never
#: through a token.
SCOPE_OF_ACTION: Mapping[str, str | None] = {
    "playbook": "run", "adhoc": "run", "exec": "run", "pty": "run", "pty_input": "run",
    "ssh_control": "run", "inventory": "run",
    "job_read": "jobs", "job_control": "jobs", "job_list": "jobs",
    "mail": "mail", "schedule": "run",
    "token": None, "enroll": None, "admin": None,
}
#: What the strict command filter refuses when a role has no shell (the previous system missed ``&``).
METACHARACTERS = (";", "&", "|", "`", "$(", "${", ">", "<", "\n", "\r", "\x00")
#: Ad-hoc modules that run arbitrary commands: they need exec (and shell for the shell-like ones).
COMMAND_MODULES = {"command": "exec", "shell": "shell", "raw": "shell", "script": "shell",
                   "ansible.builtin.command": "exec", "ansible.builtin.shell": "shell",
                   "ansible.builtin.raw": "shell", "ansible.builtin.script": "shell"}
_SCOPE_RE = re.compile(r"(tools):(run|jobs|mail|\*)|(hosts):(\S+)")


@dataclass(frozen=True, slots=True)
class Identity:
    """Someone authenticated by a door."""

    name: str  # mail address, token owner, or local user
    role: str
    door: str  # mail | mcp | cli
    fingerprint: str | None = None
    admin: bool = False
    #: Token scopes; None when not acting through a token (the role alone applies).
    scopes: tuple[str, ...] | None = None
    token_id: str | None = None
    #: The local user's own doors (CLI, stdio MCP): whoever can read carrier.yml and its secrets.
    local: bool = False


@dataclass(frozen=True, slots=True)
class HostRef:
    """A resolved target host and the inventory groups it is in."""

    name: str
    groups: tuple[str, ...] = ()
    #: The host is the Carrier controller (``Inventory.is_controller``): only a ``local`` role may target it.
    local: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    action: Action
    hosts: tuple[HostRef, ...] = ()
    playbook: str | None = None
    module: str | None = None
    command: str | None = None
    shell: bool = False  # the command is to run through a shell
    tool: str | None = None  # the MCP tool name, when the request comes through MCP
    job_owner: str | None = None  # for job_read / job_control / pty_input; job_list: the owner asked for
    admin_only: bool = False  # the catalog marks the playbook as admins' only
    #: The playbook runs tasks on the controller (catalog ``controller: true``): needs a ``local`` role.
    controller: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def _no(reason: str) -> Decision:
    return Decision(False, reason)


# --------------------------------------------------------------------------- pure helpers


def _items(pattern: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,:]", pattern) if p.strip()]


def _host_matches(host: HostRef, item: str) -> bool:
    if item in ("all", "*"):
        return True
    return fnmatchcase(host.name, item) or any(fnmatchcase(g, item) for g in host.groups)


def host_in_pattern(host: HostRef, pattern: str) -> bool:
    """Whether ``host`` is selected by an Ansible-like ``pattern`` (names, groups, globs; ``,``/``:``
    separated; ``!x`` excludes, ``&x`` requires). An empty pattern selects nothing."""
    items = _items(pattern)
    plus = [i for i in items if not i.startswith(("!", "&"))]
    required = [i[1:] for i in items if i.startswith("&")]
    excluded = [i[1:] for i in items if i.startswith("!")]
    if not items:
        return False
    selected = any(_host_matches(host, i) for i in plus) if plus else True
    return (
        selected
        and all(_host_matches(host, i) for i in required)
        and not any(_host_matches(host, i) for i in excluded)
    )


def metacharacter(command: str) -> str | None:
    """The first shell metacharacter in ``command`` (strict filter), or None."""
    for meta in METACHARACTERS:
        if meta in command:
            return meta
    return None


def _shown(meta: str) -> str:
    return {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL byte"}.get(meta, repr(meta))


def tool_group(request: Request) -> str | None:
    """The token scope group (``tools:<group>``) that covers a request (None: no token may)."""
    return SCOPE_OF_ACTION.get(request.action)


def check_scopes(scopes: Sequence[str]) -> list[str]:
    """The scopes that are not understood (empty when all are ``tools:<group>`` / ``hosts:<pattern>``)."""
    return [s for s in scopes if not _SCOPE_RE.fullmatch(s)]


def _playbook_allowed(name: str, globs: Sequence[str]) -> bool:
    stem = re.sub(r"\.ya?ml$", "", name)
    return any(fnmatchcase(name, g) or fnmatchcase(stem, g) for g in globs)


# --------------------------------------------------------------------------- the decision


def _hosts_problem(identity: Identity, role: Role, request: Request) -> str | None:
    if not request.hosts:
        return "no target host matched the pattern"
    outside = [h.name for h in request.hosts if not host_in_pattern(h, role.hosts)]
    if outside:
        return f"role {identity.role} may not target {', '.join(sorted(outside))}"
    local = [h.name for h in request.hosts if h.local]
    if local and not role.local:
        return (f"role {identity.role} may not target the Carrier controller ({', '.join(sorted(local))}): "
                "that needs `local: true` on the role")
    host_scopes = [s[len("hosts:"):] for s in identity.scopes or () if s.startswith("hosts:")]
    if host_scopes:
        beyond = [h.name for h in request.hosts if not any(host_in_pattern(h, p) for p in host_scopes)]
        if beyond:
            return f"the token's scope does not cover {', '.join(sorted(beyond))}"
    return None


def _command_problem(identity: Identity, role: Role, command: str | None, strict: bool) -> str | None:
    if command is None or not command.strip():
        return "no command given"
    if "\x00" in command:
        return "the command contains a NUL byte"
    if strict and not role.shell:
        meta = metacharacter(command)
        if meta is not None:
            return f"role {identity.role} has no shell: {_shown(meta)} is not allowed in a command"
    return None


def _first(problems: Sequence[str | None], granted: str) -> Decision:
    """Denied by the first problem found, else allowed (never ``or`` Decisions: a denial is falsy)."""
    for problem in problems:
        if problem is not None:
            return _no(problem)
    return Decision(True, granted)


def _scope_problem(identity: Identity, request: Request) -> str | None:
    if identity.scopes is None:
        return None
    unknown = check_scopes(identity.scopes)
    if unknown:
        return f"the token has scopes Carrier does not understand: {', '.join(unknown)}"
    group = tool_group(request)
    if group is None:
        return f"{request.action} is not available with a token"
    groups = {s.split(":", 1)[1] for s in identity.scopes if s.startswith("tools:")}
    if groups and "*" not in groups and group not in groups:
        return f"the token's scope does not include {group} tools"
    return None


def decide(
    identity: Identity, request: Request, roles: Mapping[str, Role], *, strict_commands: bool = False
) -> Decision:
    """May ``identity`` do ``request``? The answer carries a reason a person can read."""
    if request.action not in ACTIONS:
        return _no(f"unknown action {request.action!r}")
    role = roles.get(identity.role)
    if role is None:
        return _no(f"role {identity.role!r} is not defined")
    scope = _scope_problem(identity, request)
    if scope is not None:
        return _no(scope)
    action, name = request.action, identity.role
    if action == "admin":
        return Decision(True, "admin") if identity.admin else _no("only an admin may do this")
    if action in ("token", "inventory", "enroll"):
        return Decision(True, f"{action} is open to every enrolled identity")
    if action == "job_list":
        if identity.admin:
            return Decision(True, "admin: every owner's jobs")
        if request.job_owner in (None, identity.name):
            return Decision(True, "own jobs")
        return _no("only an admin may list someone else's jobs")
    if action in ("job_read", "job_control", "pty_input"):
        if action == "pty_input" and not role.pty:
            return _no(f"role {name} may not use terminal jobs")
        if request.job_owner is None:
            return _no("the job's owner is unknown")
        if request.job_owner == identity.name or identity.admin:
            return Decision(True, "own job" if request.job_owner == identity.name else "admin")
        return _no("the job belongs to someone else")
    if action == "schedule":
        # Admins, and roles with `schedules: true` for their own; a playbook named is the run the
        # schedule makes, decided like running it now (add, and again at every firing).
        if not (identity.admin or role.schedules):
            return _no(f"role {name} may not use schedules (admins may; or `schedules: true` on the role)")
        if request.job_owner not in (None, identity.name) and not identity.admin:
            return _no("the schedule belongs to someone else")
        if request.playbook is None:
            return Decision(True, "admin" if identity.admin else f"role {name} allows schedules")
        return decide(identity, replace(request, action="playbook"), roles, strict_commands=strict_commands)
    if action == "mail":
        tool = request.tool or ""
        if tool and identity.local:
            # The local user holds carrier.yml and the mail passwords: the mailbox is theirs anyway.
            return Decision(True, f"local user may use {tool}")
        if not tool or not any(fnmatchcase(tool, g) for g in role.mail):
            return _no(f"role {name} may not use {tool or 'mail tools'}")
        return Decision(True, f"role {name} allows {tool}")
    if action == "playbook":
        book = request.playbook or ""
        if not book or not _playbook_allowed(book, role.playbooks):
            return _no(f"role {name} may not run playbook {book or '(none)'}")
        if request.admin_only and not identity.admin:
            return _no(f"playbook {book} is for admins only")
        if request.controller and not role.local:
            return _no(f"playbook {book} runs tasks on the Carrier controller: role {name} "
                       "needs `local: true` to run it")
        return _first([_hosts_problem(identity, role, request)], f"role {name} allows {book}")
    if action == "adhoc":
        module = request.module or ""
        needs = COMMAND_MODULES.get(module)
        if needs == "shell" and not role.shell:
            return _no(f"role {name} has no shell: module {module} is not allowed")
        if needs == "exec" and not role.exec:
            return _no(f"role {name} may not run commands: module {module} is not allowed")
        if not module or not any(fnmatchcase(module, g) for g in role.modules):
            return _no(f"role {name} may not run module {module or '(none)'}")
        return _first([_hosts_problem(identity, role, request)], f"role {name} allows {module}")
    if action == "ssh_control":
        if not role.exec:
            return _no(f"role {name} may not run commands, so it may not close ssh masters")
        return _first([_hosts_problem(identity, role, request)], f"role {name} may close masters there")
    if action == "exec":
        if not role.exec:
            return _no(f"role {name} may not run commands")
        if request.shell and not role.shell:
            return _no(f"role {name} may not use a shell")
        return _first([_command_problem(identity, role, request.command, strict_commands),
                       _hosts_problem(identity, role, request)], f"role {name} allows exec")
    # pty: the command runs through the remote login shell, so the filter applies to it too.
    if not role.pty:
        return _no(f"role {name} may not start terminal jobs")
    return _first([_command_problem(identity, role, request.command, strict_commands),
                   _hosts_problem(identity, role, request)], f"role {name} allows pty jobs")


def may_run_playbook(identity: Identity, playbook: str, admin_only: bool,
                     roles: Mapping[str, Role]) -> bool:
    """Whether the playbook is one ``identity`` may run at all (hosts aside): for listings."""
    role = roles.get(identity.role)
    if role is None or (admin_only and not identity.admin):
        return False
    return _playbook_allowed(playbook, role.playbooks)


class Policy:
    """``decide`` bound to a configuration's roles and its strict-command setting."""

    def __init__(self, roles: Mapping[str, Role], *, strict_commands: bool = False) -> None:
        self.roles = roles
        self.strict_commands = strict_commands

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(config.roles, strict_commands=config.auth.strict_commands)

    def decide(self, identity: Identity, request: Request) -> Decision:
        return decide(identity, request, self.roles, strict_commands=self.strict_commands)

    def may_run_playbook(self, identity: Identity, playbook: str, admin_only: bool) -> bool:
        return may_run_playbook(identity, playbook, admin_only, self.roles)

    def role_of(self, identity: Identity) -> Role | None:
        """The role ``identity`` acts with (for engine options that follow from it, e.g. shell)."""
        return self.roles.get(identity.role)
