"""The email door's command grammar: pure functions from the signed text to commands (no I/O).

One command per line of the signed body. Quoted lines (``>``) and everything after a ``-- ``
signature line are ignored (``carrier.auth.enrollment.unquoted_lines``), blank lines too. Verbs
are case-insensitive; arguments keep their case. A line that is not understood becomes a
``CommandError`` that says what was wrong and shows an example; the lines that were understood
still run, in order. More than ``max_commands`` command lines make the whole mail an error
(nothing runs): a pasted log or a mail bomb must not start a thousand jobs.

    run <playbook> [on <pattern>] [check] [diff] [tags a,b] [key=value ...]
    exec <pattern> <command ...>
    status <job> | output <job> [tail N] | kill <job> | jobs
    job start <host> <command ...> | job input <job> [keys k1,k2] [text ...] | job screen <job>
    job input <job> secret <name>   (types a named secret + Enter; ``text secret ...`` types the word)
    hosts [pattern] | playbooks | help
    enroll | confirm <code>
    approve <request> [as <role>] | deny <request> | revoke <fingerprint>
    approve <job> | deny <job> [reason ...]
    token [ttl]
    schedule add <name> <playbook> [on <pattern>] cron "<m h dom mon dow>" [notify failure|always|never]
        [key=value ...]
    schedule list | schedule remove <name>
    settings | settings encrypt on|off|auto
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from carrier.auth.enrollment import unquoted_lines
from carrier.config import SECRET_NAME
from carrier.formats import FINGERPRINT_RE as _FPR_RE
from carrier.formats import JOB_ID_EXAMPLE as _JOB
from carrier.formats import KEY_NAME_RE as _KEY_RE
from carrier.formats import (
    ROLE_NAME_RE,
    FormatError,
    check_schedule_name,
    is_job_id,
    pattern_problem,
    playbook_stem,
)
from carrier.formats import TAG_RE as _TAG_RE
from carrier.formats import VAR_NAME_RE as _VAR_RE

DEFAULT_MAX_COMMANDS = 20
MAX_LINE = 2000
_REQUEST_RE = re.compile(r"r-[a-z2-7]{12}", re.IGNORECASE)
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_CODE_RE = re.compile(r"[A-Za-z0-9]{6,32}")

#: One example per verb, shown with an error and in ``help``.
EXAMPLES: dict[str, str] = {
    "run": "run ping on web1",
    "exec": "exec web1 uptime",
    "status": f"status {_JOB}",
    "output": f"output {_JOB} tail 50",
    "kill": f"kill {_JOB}",
    "jobs": "jobs",
    "job": "job start web1 top",
    "job start": "job start web1 top",
    "job input": f"job input {_JOB} keys Down,Enter",
    "job screen": f"job screen {_JOB}",
    "hosts": "hosts web",
    "playbooks": "playbooks",
    "help": "help",
    "enroll": "enroll",
    "confirm": "confirm 0123456789abcdef0123456789abcdef",
    "approve": "approve r-abcdefghijkl as operator",
    "deny": "deny r-abcdefghijkl",
    "revoke": "revoke 0123456789ABCDEF0123456789ABCDEF01234567",
    "token": "token 86400",
    "schedule": 'schedule add nightly ping on web cron "0 3 * * *"',
    "schedule add": 'schedule add nightly ping on web cron "0 3 * * *" notify failure',
    "schedule list": "schedule list",
    "schedule remove": "schedule remove nightly",
    "settings": "settings encrypt on",
}
#: ``settings encrypt`` words -> the stored mode (``carrier.store.schema.ENCRYPT_MODES``).
ENCRYPT_WORDS = {"on": "always", "always": "always", "off": "never", "never": "never", "auto": "auto"}
GRAMMAR = __doc__.split("\n\n")[2].strip("\n") if __doc__ else ""


@dataclass(frozen=True, slots=True)
class Command:
    """One understood line. ``verb`` is the canonical verb (``job start`` for the PTY verbs)."""

    verb: str
    line: str
    lineno: int
    playbook: str | None = None
    pattern: str | None = None
    job: str | None = None
    argv: tuple[str, ...] = ()
    check: bool = False
    diff: bool = False
    tags: tuple[str, ...] = ()
    extra_vars: tuple[tuple[str, str], ...] = ()
    tail: int | None = None
    keys: tuple[str, ...] = ()
    text: str | None = None
    request: str | None = None
    role: str | None = None
    fingerprint: str | None = None
    code: str | None = None
    ttl: int | None = None
    #: job input: the name of a secret to type (never its value).
    secret: str | None = None
    #: schedule add/remove: the schedule's name; add: its cron expression and when to mail.
    schedule: str | None = None
    cron: str | None = None
    notify: str | None = None
    #: ``settings encrypt <mode>``: the mode (always, never, auto); None shows the settings.
    encrypt: str | None = None


@dataclass(frozen=True, slots=True)
class CommandError:
    """A line that was not understood: what was wrong, and an example of a good one."""

    line: str
    lineno: int
    message: str
    example: str


@dataclass(frozen=True, slots=True)
class ParseResult:
    commands: tuple[Command, ...] = ()
    errors: tuple[CommandError, ...] = ()
    #: Set when the mail had more command lines than allowed: then nothing runs.
    too_many: int | None = None
    entries: tuple[Command | CommandError, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.entries and self.too_many is None


class _Bad(Exception):
    def __init__(self, message: str, example: str) -> None:
        super().__init__(message)
        self.example = example


def _bad(verb: str, message: str) -> _Bad:
    return _Bad(message, EXAMPLES.get(verb, EXAMPLES["help"]))


def _job_id(verb: str, value: str | None) -> str:
    if value is None:
        raise _bad(verb, f"`{verb}` needs a job id")
    if not is_job_id(value):
        raise _bad(verb, f"{value[:40]!r} is not a job id (job ids look like {_JOB})")
    return value


def _pattern(verb: str, value: str | None) -> str:
    if value is None:
        raise _bad(verb, f"`{verb}` needs a host or group")
    if pattern_problem(value) is not None:
        raise _bad(verb, f"{value[:40]!r} is not a host pattern (names, groups, globs, ! and &)")
    return value


def _split(verb: str, rest: str) -> list[str]:
    try:
        return shlex.split(rest, posix=True)
    except ValueError as exc:
        raise _bad(verb, f"cannot read the arguments ({exc}): close every quote") from None


def _no_more(verb: str, words: list[str]) -> None:
    if words:
        raise _bad(verb, f"`{verb}` takes no argument {words[0][:40]!r} here")


def _run(line: str, lineno: int, rest: str) -> Command:
    words = _split("run", rest)
    if not words:
        raise _bad("run", "`run` needs a playbook name")
    playbook = words.pop(0)
    stem = playbook_stem(playbook)
    if stem is None:
        raise _bad("run", f"{playbook[:40]!r} is not a playbook name (letters, digits, _ and -)")
    playbook = stem
    pattern: str | None = None
    check = diff = False
    tags: tuple[str, ...] = ()
    extra: dict[str, str] = {}
    while words:
        word = words.pop(0)
        low = word.lower()
        if "=" in word:
            name, _, value = word.partition("=")
            if not _VAR_RE.fullmatch(name):
                raise _bad("run", f"{name[:40]!r} is not a variable name (letters, digits, _)")
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise _bad("run", f"the value of {name} contains a control character")
            extra[name] = value
        elif low == "on":
            if pattern is not None:
                raise _bad("run", "`on` is given twice")
            pattern = _pattern("run", words.pop(0) if words else None)
        elif low == "check":
            check = True
        elif low == "diff":
            diff = True
        elif low == "tags":
            if not words:
                raise _bad("run", "`tags` needs a comma-separated list")
            tags = tuple(t for t in words.pop(0).split(",") if t)
            bad = [t for t in tags if not _TAG_RE.fullmatch(t)]
            if bad or not tags:
                raise _bad("run", f"{(bad or [''])[0][:40]!r} is not a tag name")
        else:
            raise _bad(
                "run",
                f"unexpected {word[:40]!r}: after the playbook come `on <hosts>`, `check`, "
                "`diff`, `tags a,b` and key=value",
            )
    return Command(
        "run",
        line,
        lineno,
        playbook=playbook,
        pattern=pattern,
        check=check,
        diff=diff,
        tags=tags,
        extra_vars=tuple(extra.items()),
    )


def _job_sub(line: str, lineno: int, rest: str) -> Command:
    sub, _, tail = rest.strip().partition(" ")
    sub = sub.lower()
    if sub == "start":
        host, _, command = tail.strip().partition(" ")
        if not host:
            raise _bad("job start", "`job start` needs a host and a command")
        host = _pattern("job start", host)
        argv = _split("job start", command)
        if not argv:
            raise _bad("job start", "`job start` needs a command to run")
        # ``text`` keeps the command as written: a role with a shell runs it as shell text.
        return Command("job start", line, lineno, pattern=host, argv=tuple(argv), text=command.strip())
    if sub == "screen":
        words = _split("job screen", tail)
        job = _job_id("job screen", words.pop(0) if words else None)
        _no_more("job screen", words)
        return Command("job screen", line, lineno, job=job)
    if sub == "input":
        first, _, after = tail.strip().partition(" ")
        job = _job_id("job input", first or None)
        keys: tuple[str, ...] = ()
        text = after.strip()
        head, _, remainder = text.partition(" ")
        if head.lower() == "secret":
            name = remainder.strip()
            if not SECRET_NAME.fullmatch(name):
                raise _bad("job input", f"{name[:40]!r} is not a secret name: `job input {_JOB} secret "
                           "web_sudo` types the secret called web_sudo")
            return Command("job input", line, lineno, job=job, secret=name)
        if head.lower() == "keys":
            spec, _, text = remainder.strip().partition(" ")
            keys = tuple(k for k in spec.split(",") if k)
            bad = [k for k in keys if not _KEY_RE.fullmatch(k)]
            if bad or not keys:
                raise _bad("job input", f"{(bad or [''])[0][:40]!r} is not a key name (Enter, Up, C-c...)")
            text = text.strip()
            head, _, remainder = text.partition(" ")
        if head.lower() == "text":
            text = remainder.strip()
        if not keys and not text:
            raise _bad("job input", "`job input` needs keys or text to send")
        return Command("job input", line, lineno, job=job, keys=keys, text=text or None)
    raise _bad("job", f"`job {sub[:20]}` is unknown: use `job start`, `job input` or `job screen`")


def _schedule_sub(line: str, lineno: int, rest: str) -> Command:
    sub, _, tail = rest.strip().partition(" ")
    sub = sub.lower()
    if sub == "list":
        _no_more("schedule list", _split("schedule list", tail))
        return Command("schedule list", line, lineno)
    if sub == "remove":
        words = _split("schedule remove", tail)
        name = _schedule_name("schedule remove", words.pop(0) if words else None)
        _no_more("schedule remove", words)
        return Command("schedule remove", line, lineno, schedule=name)
    if sub != "add":
        raise _bad("schedule", f"`schedule {sub[:20]}` is unknown: use `schedule add`, `schedule list` or "
                   "`schedule remove`")
    verb = "schedule add"
    words = _split(verb, tail)
    name = _schedule_name(verb, words.pop(0) if words else None)
    if not words:
        raise _bad(verb, "`schedule add` needs a playbook after the schedule's name")
    playbook = words.pop(0)
    stem = playbook_stem(playbook)
    if stem is None:
        raise _bad(verb, f"{playbook[:40]!r} is not a playbook name (letters, digits, _ and -)")
    pattern: str | None = None
    cron: str | None = None
    notify: str | None = None
    extra: dict[str, str] = {}
    while words:
        word = words.pop(0)
        low = word.lower()
        if low == "on" and pattern is None:
            pattern = _pattern(verb, words.pop(0) if words else None)
        elif low == "cron" and cron is None:
            if not words:
                raise _bad(verb, '`cron` needs a quoted expression, e.g. cron "0 3 * * *"')
            cron = words.pop(0)
        elif low == "notify" and notify is None:
            notify = (words.pop(0) if words else "").lower()
            if notify not in ("failure", "always", "never"):
                raise _bad(verb, "`notify` is failure, always or never")
        elif "=" in word:
            key, _, value = word.partition("=")
            if not _VAR_RE.fullmatch(key):
                raise _bad(verb, f"{key[:40]!r} is not a variable name (letters, digits, _)")
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise _bad(verb, f"the value of {key} contains a control character")
            extra[key] = value
        else:
            raise _bad(verb, f"unexpected {word[:40]!r}: after the playbook come `on <hosts>`, "
                       '`cron "<expression>"`, `notify failure|always|never` and key=value (each once)')
    if cron is None:
        raise _bad(verb, '`schedule add` needs `cron "<expression>"` (quoted), e.g. cron "0 3 * * *"')
    return Command(verb, line, lineno, schedule=name, playbook=stem, pattern=pattern, cron=cron,
                   notify=notify, extra_vars=tuple(extra.items()))


def _schedule_name(verb: str, value: str | None) -> str:
    if value is None:
        raise _bad(verb, f"`{verb}` needs a schedule name")
    try:
        return check_schedule_name(value)
    except FormatError as exc:
        raise _bad(verb, str(exc)) from None


def parse_line(line: str, lineno: int = 1) -> Command:
    """One command line; ``_Bad`` (internal) when it is not understood."""
    stripped = line.strip()
    verb_word, _, rest = stripped.partition(" ")
    verb = verb_word.lower().rstrip(":")
    rest = rest.strip()
    if verb == "run":
        return _run(stripped, lineno, rest)
    if verb == "exec":
        pattern, _, command = rest.partition(" ")
        pattern = _pattern("exec", pattern or None)
        argv = _split("exec", command)
        if not argv:
            raise _bad("exec", "`exec` needs a command after the hosts")
        return Command("exec", stripped, lineno, pattern=pattern, argv=tuple(argv))
    if verb in ("status", "kill"):
        words = _split(verb, rest)
        job = _job_id(verb, words.pop(0) if words else None)
        _no_more(verb, words)
        return Command(verb, stripped, lineno, job=job)
    if verb == "output":
        words = _split(verb, rest)
        job = _job_id(verb, words.pop(0) if words else None)
        tail: int | None = None
        if words and words[0].lower() == "tail":
            words.pop(0)
            value = words.pop(0) if words else ""
            if not value.isdigit() or not 1 <= int(value) <= 10_000:
                raise _bad(verb, "`tail` needs a number of lines from 1 to 10000")
            tail = int(value)
        _no_more(verb, words)
        return Command(verb, stripped, lineno, job=job, tail=tail)
    if verb in ("jobs", "playbooks", "help", "enroll"):
        _no_more(verb, _split(verb, rest))
        return Command(verb, stripped, lineno)
    if verb == "hosts":
        words = _split(verb, rest)
        host_pattern = _pattern(verb, words.pop(0)) if words else None
        _no_more(verb, words)
        return Command(verb, stripped, lineno, pattern=host_pattern)
    if verb == "job":
        return _job_sub(stripped, lineno, rest)
    if verb == "schedule":
        return _schedule_sub(stripped, lineno, rest)
    if verb == "confirm":
        words = _split(verb, rest)
        code = words.pop(0) if words else ""
        _no_more(verb, words)
        if not (_NONCE_RE.fullmatch(code.lower()) or _CODE_RE.fullmatch(code)):
            raise _bad(verb, "`confirm` needs the code from Carrier's mail")
        return Command(verb, stripped, lineno, code=code)
    if verb in ("approve", "deny"):
        words = _split(verb, rest)
        request = words.pop(0) if words else ""
        if is_job_id(request.lower()):  # a job waiting for approval; deny may say why
            reason = " ".join(words) if verb == "deny" else ""
            if verb == "approve":
                _no_more(verb, words)
            return Command(verb, stripped, lineno, job=request.lower(), text=reason[:500] or None)
        if not _REQUEST_RE.fullmatch(request):
            raise _bad(verb, f"`{verb}` needs an enrollment request id (r- and 12 letters) or a job id "
                       f"({_JOB})")
        role = None
        if verb == "approve" and words and words[0].lower() == "as":
            words.pop(0)
            role = words.pop(0) if words else ""
            if not ROLE_NAME_RE.fullmatch(role):
                raise _bad(verb, "`as` needs a role name")
        _no_more(verb, words)
        return Command(verb, stripped, lineno, request=request.lower(), role=role)
    if verb == "revoke":
        words = _split(verb, rest)
        fpr = "".join(words)
        if not _FPR_RE.fullmatch(fpr):
            raise _bad(verb, "`revoke` needs a key fingerprint of 40 hex digits")
        return Command(verb, stripped, lineno, fingerprint=fpr.upper())
    if verb == "token":
        words = _split(verb, rest)
        ttl = None
        if words:
            value = words.pop(0)
            if not value.isdigit() or int(value) < 60:
                raise _bad(verb, "the token lifetime is a number of seconds (60 or more)")
            ttl = int(value)
        _no_more(verb, words)
        return Command(verb, stripped, lineno, ttl=ttl)
    if verb == "settings":
        return _settings(stripped, lineno, rest)
    shown = verb_word[:40]
    raise _Bad(
        f"unknown command {shown!r}: commands are run, exec, status, output, kill, jobs, job, "
        "hosts, playbooks, help, enroll, token, schedule, settings (see `help`)",
        EXAMPLES["run"],
    )


def _settings(line: str, lineno: int, rest: str) -> Command:
    words = _split("settings", rest)
    if not words:
        return Command("settings", line, lineno)
    name = words.pop(0).lower()
    if name != "encrypt":
        raise _bad("settings", f"unknown setting {name[:40]!r}: the setting is `encrypt`")
    value = words.pop(0).lower() if words else ""
    mode = ENCRYPT_WORDS.get(value)
    if mode is None:
        raise _bad("settings", "`settings encrypt` needs on, off or auto (auto: encrypted replies to "
                   "encrypted mail)")
    _no_more("settings", words)
    return Command("settings", line, lineno, encrypt=mode)


def command_lines(text: str) -> list[tuple[int, str]]:
    """The lines that count, numbered from 1 within what counts (quotes, signature, blanks dropped)."""
    lines = [line for line in unquoted_lines(text) if line.strip()]
    return list(enumerate(lines, start=1))


def parse_commands(text: str, *, max_commands: int = DEFAULT_MAX_COMMANDS) -> ParseResult:
    """Every command line of ``text`` in order (see the module docstring)."""
    lines = command_lines(text)
    if len(lines) > max_commands:
        return ParseResult(too_many=len(lines))
    entries: list[Command | CommandError] = []
    for lineno, line in lines:
        shown = line.strip()
        if len(shown) > MAX_LINE:
            entries.append(
                CommandError(
                    shown[:80] + "...",
                    lineno,
                    f"the line is longer than {MAX_LINE} characters",
                    EXAMPLES["run"],
                )
            )
            continue
        try:
            entries.append(parse_line(shown, lineno))
        except _Bad as exc:
            entries.append(CommandError(shown[:200], lineno, str(exc), exc.example))
    return ParseResult(
        commands=tuple(e for e in entries if isinstance(e, Command)),
        errors=tuple(e for e in entries if isinstance(e, CommandError)),
        entries=tuple(entries),
    )


def first_verb(text: str) -> str | None:
    """The verb of the first counted line (for routing unsigned mail: ``enroll``/``confirm``)."""
    lines = command_lines(text)
    if not lines:
        return None
    return lines[0][1].strip().partition(" ")[0].lower().rstrip(":")


def is_free_text(text: str) -> bool:
    """Whether no counted line starts with a command verb (prose for the optional LLM, not a
    mistyped command: a mistyped command is answered with what was wrong)."""
    verbs = {name.split(" ", 1)[0] for name in EXAMPLES}
    for _, line in command_lines(text):
        word = line.strip().partition(" ")[0].lower().rstrip(":")
        if word in verbs:
            return False
    return True
