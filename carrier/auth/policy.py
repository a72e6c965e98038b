"""Who may do what: one pure function, ``decide(identity, request)``, used by every door.

Roles come from carrier.yml (playbook globs, a host pattern, ad-hoc modules, exec/shell/pty, MCP
mail tools). A bearer token narrows its owner's role further with scopes (``tools:<group>``,
``hosts:<pattern>``); a scope is never a grant. Hosts are decided on the resolved target list
(the jobs layer expands inventory patterns first), so a pattern cannot smuggle in a host; a host
that is the Carrier controller (``HostRef.local``) or a playbook that runs tasks there
(``Request.controller``) needs a role with ``local: true``.

Commands (exec, terminal jobs, the ad-hoc ``command`` module) are split here with ``shlex`` and
decided on their program: shells, interpreters and launchers (``COMMAND_RUNNERS``) need ``shell:
true``, whatever their path or version suffix; a role's ``commands:`` list, when it has one, names
the only programs (and argument patterns) it may run; a first word starting with ``-`` is refused
(the remote login shell would read it as its own option).
No I/O here: everything needed is in the arguments.
"""

from __future__ import annotations

import re
import shlex
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
    "approve",  # approve or deny a job that waits for approval (a signed mail of another person)
    "schedule",  # add/list/remove schedules; each firing of one, as its owner
    "settings",  # change one's own settings (reply encryption): a signed mail of that person
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
    "token": None, "enroll": None, "admin": None, "approve": None, "settings": None,
}
#: What the strict command filter refuses when a role has no shell (the previous system missed ``&``).
METACHARACTERS = (";", "&", "|", "`", "$(", "${", ">", "<", "\n", "\r", "\x00")
#: Ad-hoc modules that run arbitrary commands: they need exec (and shell for the shell-like ones).
COMMAND_MODULES = {"command": "exec", "shell": "shell", "raw": "shell", "script": "shell",
                   "ansible.builtin.command": "exec", "ansible.builtin.shell": "shell",
                   "ansible.builtin.raw": "shell", "ansible.builtin.script": "shell"}
#: Options Ansible's command module takes out of its free-form text (``chdir=/tmp uptime``).
COMMAND_MODULE_OPTIONS = ("chdir", "creates", "removes", "executable", "warn", "stdin",
                          "stdin_add_newline", "strip_empty_ends", "expand_argument_vars")

#: Programs that run code given in their arguments or input, or the program their arguments name:
#: a role without ``shell: true`` may not run them, even when its ``commands:`` list names them.
#: Globs, matched against the lower-cased base name (``/bin/sh``, ``/usr/bin/python3.11`` count).
#: Not a sandbox: programs with their own escapes (editors, pagers, git, tar, ssh, ...) are not
#: here; a role that must run nothing else gets a ``commands:`` list.
COMMAND_RUNNERS: Mapping[str, tuple[str, ...]] = {
    "a shell": ("sh", "ash", "bash", "bash[0-9]*", "rbash", "dash", "zsh", "zsh-*", "ksh", "ksh93",
                "mksh", "pdksh", "oksh", "yash", "posh", "csh", "tcsh", "fish", "elvish", "nu", "xonsh",
                "pwsh", "busybox", "toybox"),
    "an interpreter": ("python", "python[0-9]*", "pypy*", "perl", "perl[0-9]*", "ruby", "ruby[0-9]*",
                       "irb", "php", "php[0-9]*", "php-cgi*", "node", "nodejs", "deno", "bun", "lua",
                       "lua[0-9]*", "luajit", "tclsh", "tclsh[0-9]*", "wish", "wish[0-9]*", "expect",
                       "awk", "gawk", "mawk", "nawk", "rscript", "julia", "guile*", "gdb",
                       "jshell", "groovy", "scala", "erl", "escript", "racket", "sbcl", "ghci", "runghc"),
    "a launcher (it runs the program its arguments name)": (
        "env", "xargs", "nice", "nohup", "timeout", "setsid", "stdbuf", "ionice", "chrt", "taskset",
        "time", "flock", "chroot", "unshare", "nsenter", "runuser", "sudo", "sudoedit", "su", "doas",
        "pkexec", "sg", "newgrp", "script", "watch", "systemd-run", "at", "batch", "strace", "ltrace",
        "command", "exec", "eval", "builtin", "parallel", "run-parts", "start-stop-daemon", "capsh",
        "setpriv", "firejail", "bwrap", "proot", "fakeroot", "fakechroot", "valgrind", "perf"),
}
#: ``find`` runs programs with these actions: ``find`` with one of them needs ``shell: true``.
FIND_EXEC_ACTIONS = ("-exec", "-execdir", "-ok", "-okdir")
#: Shell text (a role with ``shell: true``) under a ``commands:`` list must be one plain command:
#: without these it cannot run a second program or substitute one.
SHELL_FEATURES = (*METACHARACTERS, "$", "(", ")")
#: The mail tools that only read the mailbox (the attachment tools also write into the download
#: directory): the only ones an account with ``read_only: true`` takes.
MAIL_READ_TOOLS = frozenset({
    "mail_accounts", "mail_folder_list", "mail_inbox_list", "mail_inbox_read", "mail_search",
    "mail_thread", "mail_attachment_get", "mail_attachment_save",
})
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
    #: approve: the role whose members may approve the job (catalog ``approval.by``).
    approval_by: str | None = None
    #: pty_input: the named secret to type (``job_input(secret=...)``); its name only, never a value.
    secret: str | None = None
    #: mail: the account the tool acts on, and whether carrier.yml makes it ``read_only``.
    account: str | None = None
    read_only_account: bool = False


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


def program_kind(argv: Sequence[str]) -> str | None:
    """What makes ``argv`` run other code (``"a shell"``, ``"an interpreter"``, ...), or None."""
    base = argv[0].rsplit("/", 1)[-1].lower()
    for kind, globs in COMMAND_RUNNERS.items():
        if any(fnmatchcase(base, g) for g in globs):
            return kind
    if base == "find" and any(a in FIND_EXEC_ACTIONS for a in argv[1:]):
        return "a program runner with -exec/-ok"
    return None


def rule_matches(rule: Sequence[str], argv: Sequence[str]) -> bool:
    """Whether ``argv`` is allowed by one ``commands:`` entry (``PROGRAM [PATTERN ...]``).

    The program matches literally (an absolute path only itself, a bare name only the bare name).
    No patterns: any arguments; one empty pattern (``uptime ""``): none. Otherwise each argument
    matches the pattern at its place (fnmatch), and a last pattern ``*`` takes any number of them.
    """
    program, patterns = rule[0], list(rule[1:])
    if argv[0] != program:
        return False
    args = list(argv[1:])
    if not patterns:
        return True
    if patterns == [""]:
        return not args
    if patterns[-1] == "*":
        head = patterns[:-1]
        return len(args) >= len(head) and all(fnmatchcase(a, p) for a, p in zip(args, head, strict=False))
    return len(args) == len(patterns) and all(fnmatchcase(a, p) for a, p in zip(args, patterns, strict=True))


def _rules_shown(rules: Sequence[Sequence[str]]) -> str:
    shown = [shlex.join(r) for r in rules[:6]]
    return ", ".join(shown) + (", ..." if len(rules) > 6 else "") if shown else "nothing"


def _argv_problem(name: str, role: Role, argv: Sequence[str], *, shell_text: str | None) -> str | None:
    """Why ``argv`` may not run for role ``name`` (``shell_text``: the text a shell will read)."""
    program = argv[0]
    if not program:
        return "the command names no program (its first word is empty)"
    if program.startswith("-"):
        return (f"the command starts with {program!r}: the remote shell would read it as its own option; "
                "name the program first")
    kind = program_kind(argv)
    if kind is not None and not role.shell:
        base = program.rsplit("/", 1)[-1]
        return f"role {name} has no shell: {base} is {kind} (needs shell: true)"
    if role.commands is None:
        return None
    if shell_text is not None:
        feature = next((f for f in SHELL_FEATURES if f in shell_text), None)
        if feature is not None:
            return (f"role {name} has a commands: list, so a command must be one plain program and its "
                    f"arguments: {_shown(feature)} is not allowed")
    if any(rule_matches(rule, argv) for rule in role.commands):
        return None
    same = [r for r in role.commands if r[0] == program]
    if same:
        return (f"role {name} may run {program} only as {_rules_shown(same)} "
                f"(its commands: list), not with these arguments")
    return f"role {name} may not run {program}: its commands: list allows {_rules_shown(role.commands)}"


def _split(command: str) -> list[str] | str:
    """``command`` split like a shell would, or the problem (a string) when it cannot be."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return f"cannot split the command: {exc}"
    return argv or "no command given"


def _command_problem(identity: Identity, role: Role, command: str | None, strict: bool,
                     *, shell_text: bool = False) -> str | None:
    """Why ``command`` (an argv joined by ``shlex.join``, or with ``shell_text`` the text a shell
    reads) may not run, or None."""
    if command is None or not command.strip():
        return "no command given"
    if "\x00" in command:
        return "the command contains a NUL byte"
    if strict and not role.shell:
        meta = metacharacter(command)
        if meta is not None:
            return f"role {identity.role} has no shell: {_shown(meta)} is not allowed in a command"
    if shell_text and command.lstrip().startswith("-"):
        return ("the command starts with '-': the remote shell would read it as its own option; "
                "name the program first")
    argv = _split(command)
    if isinstance(argv, str):
        # Shell text that shlex cannot split is still shell text: only a list needs the argv.
        return argv if not (shell_text and role.commands is None) else None
    return _argv_problem(identity.role, role, argv, shell_text=command if shell_text else None)


def _module_problem(identity: Identity, role: Role, module: str, args: str | None) -> str | None:
    """Why the ad-hoc command ``module`` with ``args`` may not run (the same rule as exec), or None."""
    name = identity.role
    needs = COMMAND_MODULES.get(module)
    if needs is None:
        return None
    text = (args or "").strip()
    if not text:
        return None  # nothing runs: the module itself says what it is missing
    if "\x00" in text:
        return "the command contains a NUL byte"
    if needs == "shell":
        if module.endswith("script") and role.commands is not None:
            return (f"role {name} has a commands: list: module {module} runs a controller file, which "
                    "the list cannot check")
        return _command_problem(identity, role, text, False, shell_text=True)
    if text.startswith("{"):
        return f"give module {module} its command as free-form text (program and arguments), not as JSON"
    words = _split(text)
    if isinstance(words, str):
        return words
    argv = [w for w in words if w.split("=", 1)[0] not in COMMAND_MODULE_OPTIONS or "=" not in w]
    if role.shell and role.commands is None:
        return _argv_problem(name, role, argv, shell_text=None) if argv else None
    why = f"role {name} has no shell" if not role.shell else f"role {name} has a commands: list"
    if any(w.startswith("executable=") for w in words):
        return (f"{why}: executable= on module {module} replaces the program it runs "
                f"{'(needs shell: true)' if not role.shell else '(the list cannot check it)'}")
    if any("$" in w for w in argv):
        # The module expands $VARIABLES itself (expand_argument_vars): `$SHELL -c id` would run a shell.
        return f"{why}: module {module} expands $variables in its arguments, so $ is not allowed"
    return _argv_problem(name, role, argv, shell_text=None) if argv else None


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
    if action == "approve":
        return _approval_decision(identity, request)
    if action in ("token", "inventory", "enroll", "settings"):
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
        if action == "pty_input" and request.secret is not None:
            problem = secret_problem(name, role, request.secret)
            if problem:
                return _no(problem)
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
        if request.read_only_account and tool not in MAIL_READ_TOOLS:
            return _no(f"account {request.account} is read_only: true in carrier.yml, and "
                       f"{tool or 'this tool'} sends or changes mail")
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
        return _first([_module_problem(identity, role, module, request.command),
                       _hosts_problem(identity, role, request)], f"role {name} allows {module}")
    if action == "ssh_control":
        if not role.exec:
            return _no(f"role {name} may not run commands, so it may not close ssh masters")
        return _first([_hosts_problem(identity, role, request)], f"role {name} may close masters there")
    if action == "exec":
        if not role.exec:
            return _no(f"role {name} may not run commands")
        if request.shell and not role.shell:
            return _no(f"role {name} may not use a shell")
        return _first([_command_problem(identity, role, request.command, strict_commands,
                                        shell_text=request.shell),
                       _hosts_problem(identity, role, request)], f"role {name} allows exec")
    # pty: the command runs through the remote login shell, so the filter applies to it too; a
    # role with shell gets its command there as shell text (carrier.ops.service.plan_pty_start).
    if not role.pty:
        return _no(f"role {name} may not start terminal jobs")
    if request.shell and not role.shell:
        return _no(f"role {name} may not use a shell")
    return _first([_command_problem(identity, role, request.command, strict_commands,
                                    shell_text=request.shell or role.shell),
                   _hosts_problem(identity, role, request)], f"role {name} allows pty jobs")


def secret_problem(name: str, role: Role, secret: str) -> str | None:
    """Why role ``name`` may not type the named secret, or None: it must list it (or become with it)."""
    if secret in role.secrets or secret == role.become_secret:
        return None
    usable = sorted({*role.secrets, *([role.become_secret] if role.become_secret else [])})
    return (f"role {name} may not use secret {secret!r} "
            f"(it may use: {', '.join(usable) or 'none'}; list it under the role's secrets:)")


def become_secret(role: Role | None) -> str | None:
    """The named secret a role's Ansible runs become with (sudo password), or None."""
    return role.become_secret if role is not None else None


def auto_sudo_secret(role: Role | None) -> str | None:
    """The secret a role's terminal jobs answer ``[sudo] password for`` with, or None (auto_sudo off)."""
    return role.become_secret if role is not None and role.auto_sudo else None


def _approval_decision(identity: Identity, request: Request) -> Decision:
    """Two-person rule: a signed mail of someone of the approving role who is not the requester."""
    by = request.approval_by
    if by is None:
        return _no("the job does not wait for an approval")
    if identity.door != "mail" or identity.fingerprint is None:
        return _no("an approval is a signed mail: reply `approve <job>` with your enrolled key")
    if request.job_owner is None or request.job_owner == identity.name:
        return _no("nobody approves their own request: another person of role " + by + " must")
    if identity.role != by and not (by == "admin" and identity.admin):
        return _no(f"only role {by} may approve this job")
    return Decision(True, f"role {by}, not the requester")


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
