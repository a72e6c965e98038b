"""The email grammar (carrier.mail.commands): pure, no servers."""

from __future__ import annotations

import pytest

from carrier.mail.commands import GRAMMAR, Command, CommandError, first_verb, parse_commands, parse_line


def one(text: str) -> Command:
    result = parse_commands(text)
    assert not result.errors, result.errors
    assert len(result.commands) == 1
    return result.commands[0]


def test_run_with_every_option() -> None:
    cmd = one("RUN service_restart On web tags a,b check diff service=nginx 'msg=hello world'")
    assert cmd.verb == "run"
    assert cmd.playbook == "service_restart"
    assert cmd.pattern == "web"
    assert cmd.check and cmd.diff
    assert cmd.tags == ("a", "b")
    assert dict(cmd.extra_vars) == {"service": "nginx", "msg": "hello world"}


def test_verbs_are_case_insensitive_arguments_keep_case() -> None:
    assert one("Exec web1 ls -la /Tmp").argv == ("ls", "-la", "/Tmp")
    assert one("STATUS j-abcdefgh2345").job == "j-abcdefgh2345"
    assert one("output j-abcdefgh2345 TAIL 5").tail == 5
    assert one("hosts").pattern is None and one("hosts web").pattern == "web"


def test_quoted_lines_signature_and_blanks_ignored() -> None:
    text = "\n> run evil on all\nrun ping on web1\n\n  \njobs\n-- \nrun signature on all\n"
    result = parse_commands(text)
    assert [c.verb for c in result.commands] == ["run", "jobs"]
    assert result.commands[0].lineno == 1 and result.commands[1].lineno == 2


def test_several_commands_keep_their_order_with_errors_between() -> None:
    result = parse_commands("jobs\nfrobnicate now\nrun ping\n")
    assert [type(e).__name__ for e in result.entries] == ["Command", "CommandError", "Command"]
    error = result.errors[0]
    assert "unknown command 'frobnicate'" in error.message
    assert error.example == "run ping on web1"


@pytest.mark.parametrize(
    ("line", "fragment", "example"),
    [
        ("run", "needs a playbook", "run ping on web1"),
        ("run ../etc/passwd", "not a playbook name", "run ping on web1"),
        ("run ping on", "needs a host", "run ping on web1"),
        ("run ping on web1;reboot", "not a host pattern", "run ping on web1"),
        ("run ping bogus", "unexpected 'bogus'", "run ping on web1"),
        ("run ping 'unterminated", "close every quote", "run ping on web1"),
        ("run ping 9x=1", "not a variable name", "run ping on web1"),
        ("status 42", "not a job id", "status j-abcdefgh2345"),
        ("kill", "needs a job id", "kill j-abcdefgh2345"),
        ("output j-abcdefgh2345 tail many", "number of lines", "output j-abcdefgh2345 tail 50"),
        ("exec web1", "needs a command", "exec web1 uptime"),
        ("job dance j-abcdefgh2345", "job dance", "job start web1 top"),
        ("job input j-abcdefgh2345", "keys or text", "job input j-abcdefgh2345 keys Down,Enter"),
        ("approve someone", "request id", "approve r-abcdefghijkl as operator"),
        ("revoke ABC", "40 hex digits", "revoke 0123456789ABCDEF0123456789ABCDEF01234567"),
        ("token 5", "60 or more", "token 86400"),
        ("jobs all", "takes no argument", "jobs"),
    ],
)
def test_errors_say_what_and_show_an_example(line: str, fragment: str, example: str) -> None:
    result = parse_commands(line)
    assert not result.commands
    (error,) = result.errors
    assert isinstance(error, CommandError)
    assert fragment in error.message
    assert error.example == example
    # The example itself is valid grammar.
    assert parse_line(example).verb


def test_pty_verbs() -> None:
    start = one("job start web1 make menuconfig")
    assert (start.verb, start.pattern, start.argv) == ("job start", "web1", ("make", "menuconfig"))
    keys = one("job input j-abcdefgh2345 keys Down,Down,Enter")
    assert keys.keys == ("Down", "Down", "Enter") and keys.text is None
    text = one("job input j-abcdefgh2345 hello world")
    assert text.text == "hello world" and not text.keys
    both = one("job input j-abcdefgh2345 keys C-c text q")
    assert both.keys == ("C-c",) and both.text == "q"
    assert one("job screen j-abcdefgh2345").verb == "job screen"


def test_admin_and_enrollment_verbs() -> None:
    approve = one("Approve R-ABCDEFGHIJKL as operator")
    assert (approve.request, approve.role) == ("r-abcdefghijkl", "operator")
    assert one("deny r-abcdefghijkl").role is None
    fpr = "0123456789abcdef0123456789abcdef01234567"
    assert one(f"revoke {fpr}").fingerprint == fpr.upper()
    assert one("confirm 0123456789abcdef0123456789abcdef").code == "0123456789abcdef0123456789abcdef"
    assert one("token").ttl is None and one("token 3600").ttl == 3600


def test_too_many_commands_runs_nothing() -> None:
    result = parse_commands("jobs\n" * 1000, max_commands=20)
    assert result.too_many == 1000
    assert not result.commands and not result.errors
    assert len(parse_commands("jobs\n" * 20, max_commands=20).commands) == 20


def test_header_injection_cannot_reach_a_variable() -> None:
    # A CR inside a line splits it: the injected header becomes its own (unknown) line.
    result = parse_commands("run ping msg=a\rBcc: victim@example.test")
    assert result.commands[0].extra_vars == (("msg", "a"),)
    assert "unknown command 'Bcc:'" in result.errors[0].message
    result = parse_commands("run ping 'msg=a\x01b'")
    assert "control character" in result.errors[0].message


def test_first_verb_and_grammar() -> None:
    assert first_verb("> quoted\n\n Enroll please\n") == "enroll"
    assert first_verb("") is None
    assert "run <playbook>" in GRAMMAR and "job start" in GRAMMAR


def test_overlong_line_is_an_error() -> None:
    result = parse_commands("run ping " + "x" * 3000)
    assert "longer than" in result.errors[0].message


def test_free_text_is_prose_without_a_command_verb() -> None:
    from carrier.mail.commands import is_free_text

    assert is_free_text("please check that web1 is alive\nthanks")
    assert is_free_text("> run ping on web1\ncould you do that again?")  # quoted lines do not count
    assert not is_free_text("run pnig on web1")  # a mistyped command is answered, not guessed
    assert not is_free_text("hello\nJOBS")


def test_schedule_add_list_remove() -> None:
    cmd = one('schedule add nightly disk_usage on web cron "0 3 * * *" notify Always path=/var')
    assert (cmd.verb, cmd.schedule, cmd.playbook, cmd.pattern, cmd.cron, cmd.notify) == (
        "schedule add", "nightly", "disk_usage", "web", "0 3 * * *", "always")
    assert cmd.extra_vars == (("path", "/var"),)
    plain = one("Schedule add n1 ping cron @daily")
    assert (plain.pattern, plain.cron, plain.notify) == (None, "@daily", None)
    assert one("schedule list").verb == "schedule list"
    gone = one("schedule remove nightly")
    assert (gone.verb, gone.schedule) == ("schedule remove", "nightly")
    assert "schedule add <name> <playbook>" in GRAMMAR


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("schedule", "`schedule ` is unknown"),
        ("schedule purge", "`schedule purge` is unknown"),
        ("schedule add", "needs a schedule name"),
        ("schedule add -x ping cron @daily", "invalid schedule name"),
        ("schedule add n1", "needs a playbook"),
        ("schedule add n1 ../x cron @daily", "is not a playbook name"),
        ("schedule add n1 ping on web", "needs `cron \"<expression>\"`"),
        ("schedule add n1 ping cron", "`cron` needs a quoted expression"),
        ('schedule add n1 ping cron "@daily" notify sometimes', "`notify` is failure, always or never"),
        ('schedule add n1 ping cron "@daily" cron "@hourly"', "each once"),
        ('schedule add n1 ping cron "@daily" bad-name=1', "is not a variable name"),
        ("schedule remove", "needs a schedule name"),
        ("schedule remove a b", "takes no argument 'b'"),
        ("schedule list all", "takes no argument 'all'"),
    ],
)
def test_schedule_errors_say_what(line: str, fragment: str) -> None:
    (error,) = parse_commands(line).errors
    assert fragment in error.message, error.message
    assert error.example.startswith("schedule")
