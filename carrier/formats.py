"""The one place for the formats of what comes from outside: ids, host patterns, playbook, variable,
tag and key names. The mail grammar, the MCP argument checks, the CLI, the store and the engines all
use these, so a value one layer accepts is never refused (or, worse, accepted) by another.

Pure: no I/O, no imports from the rest of Carrier.
"""

from __future__ import annotations

import re

#: Ids are a prefix, ``-`` and 12 lowercase base32 characters (60 random bits).
ID_BODY = "[a-z2-7]{12}"
JOB_ID_RE = re.compile(rf"j-{ID_BODY}")
ENROLLMENT_ID_RE = re.compile(rf"r-{ID_BODY}")
TOKEN_ID_RE = re.compile(rf"t-{ID_BODY}")
#: An example job id for messages and help texts (well-formed, so it can be copied and edited).
JOB_ID_EXAMPLE = "j-abcdefgh2345"

#: Host patterns: names, groups, globs, ``,`` ``:`` ``&`` ``!`` (no regex ``~``, no ``@file``).
MAX_PATTERN_LENGTH = 512
PATTERN_CHARS_RE = re.compile(r"[A-Za-z0-9_.*?\[\]:&!,-]+")

#: A playbook is named by its file name without ``.yml``/``.yaml``.
PLAYBOOK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
PLAYBOOK_EXTENSIONS = (".yml", ".yaml")
#: Extra-var names (as Ansible variables), tag names, named keys.
VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
FINGERPRINT_RE = re.compile(r"[0-9A-Fa-f]{40}")
ROLE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SCHEDULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class FormatError(ValueError):
    """A value from outside does not have the form it must have (the message says which)."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_id(value: object, pattern: re.Pattern[str], what: str, prefix: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise FormatError(f"invalid {what} {_shown(value)}: expected {prefix}- and 12 characters a-z or 2-7")
    return value


def check_job_id(value: object) -> str:
    """``value`` if it is a well-formed job id, else FormatError (never reaches SQL or a path)."""
    return _check_id(value, JOB_ID_RE, "job id", "j")


def check_enrollment_id(value: object) -> str:
    return _check_id(value, ENROLLMENT_ID_RE, "enrollment request id", "r")


def check_token_id(value: object) -> str:
    return _check_id(value, TOKEN_ID_RE, "token id", "t")


def check_schedule_name(value: object) -> str:
    """``value`` if it is a well-formed schedule name (letters, digits, ``_.-``; at most 64)."""
    if not isinstance(value, str) or SCHEDULE_NAME_RE.fullmatch(value) is None:
        raise FormatError(f"invalid schedule name {_shown(value)}: use letters, digits, _ . - "
                          "(at most 64, starting with a letter or digit)")
    return value


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def pattern_problem(pattern: object) -> str | None:
    """Why ``pattern`` is not a safe host pattern, or None (the engines add their own hints)."""
    if not isinstance(pattern, str) or not pattern.strip():
        return "the host pattern is empty: name a host, a group, or `all`"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"the host pattern is longer than {MAX_PATTERN_LENGTH} characters"
    if PATTERN_CHARS_RE.fullmatch(pattern) is None:
        bad = sorted({c for c in pattern if PATTERN_CHARS_RE.fullmatch(c) is None})
        return f"the host pattern {pattern[:60]!r} contains {' '.join(repr(c) for c in bad[:5])}"
    if pattern.startswith("-"):
        return f"the host pattern {pattern[:60]!r} starts with '-'"
    return None


def playbook_stem(name: object) -> str | None:
    """The bare playbook name (``ping`` for ``ping.yml``), or None when ``name`` is not one."""
    if not isinstance(name, str):
        return None
    bare = name
    for ext in PLAYBOOK_EXTENSIONS:
        if bare.endswith(ext):
            bare = bare[: -len(ext)]
            break
    if PLAYBOOK_NAME_RE.fullmatch(bare) is None or bare.endswith(".meta"):
        return None
    return bare


#: Characters some reader takes as the end of a line (CR, LF, VT, FF, FS, GS, RS, NEL, LINE and
#: PARAGRAPH SEPARATOR: what ``str.splitlines`` splits on) or of a string (NUL). None of them may be
#: inside a mail header, an HTTP header or a token, whether written as is or produced by decoding.
LINE_BREAK_CHARS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00")


def line_break_in(value: str) -> str | None:
    """The first line-break or NUL character of ``value`` named as ``U+000D``, or None."""
    for char in value:
        if char in LINE_BREAK_CHARS:
            return f"U+{ord(char):04X}"
    return None


#: A Carrier bearer token: what ``secrets.token_urlsafe(32)`` makes, 43 characters of the URL-safe
#: base64 alphabet (carrier/auth/tokens.py issues them).
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def token_problem(value: str) -> str | None:
    """Why ``value`` is not a well-formed bearer token, or None. Never quotes the value: it is a secret."""
    if TOKEN_RE.fullmatch(value):
        return None
    if line_break_in(value):
        return "it contains a line break or NUL (CR, LF, ...): copy the token alone, on one line"
    if any(c.isspace() for c in value):
        return "it contains spaces or tabs: copy the token alone"
    if any(not ("A" <= c <= "Z" or "a" <= c <= "z" or "0" <= c <= "9" or c in "_-") for c in value):
        return "it contains characters other than A-Z a-z 0-9 _ -"
    return f"it is {len(value)} characters long, a Carrier token has 43"
