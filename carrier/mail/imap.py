"""IMAP for Carrier: a per-account connection pool, input checks, and the protocol details the mail
tools need (BODYSTRUCTURE leaves, special-use folders, MOVE with a fallback, IDLE).

The rest of Carrier sees a quiet surface: it asks the pool to ``run`` a function with a logged-in
``IMAPClient`` and gets typed values or a :class:`MailError` that says what to do. The pool keeps
up to ``max_connections`` logged-in connections per account, checks one with NOOP when it has sat
idle, throws away any connection that failed at the socket or protocol level (so a server that went
away is reconnected to on the next call), and LOGs OUT on close. It is safe across threads: the MCP
server runs each sync tool in a worker thread.

Folder names are Python strings; imapclient encodes them as modified UTF-7 on the wire.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from imapclient import IMAPClient

from carrier.config import MailAccount
from carrier.errors import CarrierError
from carrier.mail.connect import DEFAULT_TIMEOUT, MailConnectError, imap_connect, reauth_due, reauth_in
from carrier.mail.mime import Leaf, normalize_mime_type, param_value
from carrier.mail.parse import decode_header_value

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_FOLDER_NAME = 1000
MAX_UID = 2**32 - 1
SPECIAL_USE_FLAGS = ("\\Sent", "\\Trash", "\\Archive", "\\Drafts", "\\Junk", "\\All", "\\Flagged")
_LITERAL = re.compile(r"\{\d+\+?\}")


class MailError(CarrierError):
    """A mail operation failed in a way the caller can act on."""


class MailInputError(MailError):
    """An argument is malformed (folder name, UID, search criteria, path, ...)."""


class MailNotFound(MailError):
    """The account, folder, message or attachment asked for does not exist."""


class MailConnectionLost(MailError):
    """The connection dropped during an operation that may have changed the mailbox."""


# ---------------------------------------------------------------------------------------------
# Input checks (everything from outside passes one of these before it reaches the wire)
# ---------------------------------------------------------------------------------------------


def check_folder(name: object, what: str = "folder") -> str:
    """A folder name: non-empty text without CR, LF or NUL (those would break the command line)."""
    if not isinstance(name, str) or not name.strip():
        raise MailInputError(f"{what} must be a folder name such as INBOX (see mail_folder_list)")
    if any(ch in name for ch in "\r\n\x00"):
        raise MailInputError(f"{what} {name!r} contains CR, LF or NUL: folder names cannot")
    if len(name) > MAX_FOLDER_NAME:
        raise MailInputError(f"{what} is longer than {MAX_FOLDER_NAME} characters")
    return name


def check_uid(value: object, what: str = "uid") -> int:
    """A message UID: a whole number from 1 to 2^32-1 (an int, or a string of digits only)."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,10}", value):
        number = int(value)
    if number is None or not 1 <= number <= MAX_UID:
        raise MailInputError(
            f"{what} must be a positive whole number (a UID from mail_inbox_list or mail_search), "
            f"got {value!r}"
        )
    return number


#: Characters a new folder name may not hold: LIST wildcards and IMAP quoting/literal syntax.
_FOLDER_SPECIALS = set('*%"\\{}')
#: The system flags a client may set (RFC 3501; \\Recent is the server's own).
SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
#: An IMAP keyword is an atom: no atom-specials ( ) { SP CTL % * " \\ ] (RFC 3501).
_KEYWORD = re.compile(r"[!#$&'+-Z^-z|~]{1,100}")
MAX_UIDS = 1000


def check_new_folder(name: object, what: str = "name") -> str:
    """A folder name to create or rename to: a folder name (check_folder) without leading or trailing
    spaces, LIST wildcards (* %), quotes, backslashes or braces, and not INBOX."""
    text = check_folder(name, what)
    if text != text.strip():
        raise MailInputError(f"{what} {text!r} starts or ends with spaces: remove them")
    bad = sorted(set(text) & _FOLDER_SPECIALS)
    if bad or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        shown = " ".join(bad) or "control characters"
        raise MailInputError(f"{what} {text!r} contains {shown}: folder names here cannot (IMAP wildcards "
                             "and quoting)")
    if text.upper() == "INBOX":
        raise MailInputError(f"{what} cannot be INBOX")
    return text


def check_keyword(value: object, what: str = "flag") -> str:
    """A flag to set or clear: one of :data:`SYSTEM_FLAGS` (any case) or a keyword atom such as
    ``$Label1`` or ``invoice`` (letters, digits and ! # $ & ' + - . / : ; < = > ? @ ^ _ ` | ~)."""
    if not isinstance(value, str) or not value:
        raise MailInputError(f"{what} must be a flag such as \\Seen or a keyword such as $Important")
    if value.startswith("\\"):
        for flag in SYSTEM_FLAGS:
            if value.lower() == flag.lower():
                return flag
        raise MailInputError(
            f"{what} {value!r} is not a flag a client can set: use one of {', '.join(SYSTEM_FLAGS)} "
            "or a keyword without a backslash"
        )
    if not _KEYWORD.fullmatch(value):
        raise MailInputError(
            f"{what} {value!r} is not an IMAP keyword: 1-100 ASCII letters, digits or ! # $ & ' + - . / : "
            "; < = > ? @ ^ _ ` | ~ (no spaces, quotes, parentheses, brackets, braces, * % or \\)"
        )
    return value


def check_uids(value: object, what: str = "uids") -> list[int]:
    """One UID or a list of 1-1000 UIDs (each as :func:`check_uid`), duplicates dropped, order kept."""
    items = value if isinstance(value, list | tuple) else [value]
    if not items:
        raise MailInputError(f"{what} is empty: give at least one UID")
    if len(items) > MAX_UIDS:
        raise MailInputError(f"{what} has {len(items)} UIDs: at most {MAX_UIDS} per call")
    return list(dict.fromkeys(check_uid(item, f"{what} entry") for item in items))


def check_search_query(query: str) -> str:
    """Raw IMAP SEARCH criteria: printable ASCII, no CR/LF/NUL, no ``{N}`` literals."""
    if any(ch in query for ch in "\r\n\x00"):
        raise MailInputError("search query contains CR, LF or NUL: give the criteria on one line")
    if _LITERAL.search(query):
        raise MailInputError(
            "search query contains an IMAP literal ({N}): literals are not accepted, "
            'quote strings instead (SUBJECT "two words")'
        )
    if not query.isascii():
        raise MailInputError("search query must be ASCII: for non-ASCII text use the from/to/subject filters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in query):
        raise MailInputError("search query contains control characters")
    return query


def tokenize_search(query: str) -> list[Any]:
    """Raw criteria as imapclient's nested list form: atoms as bytes, quoted strings unquoted (imapclient
    re-quotes them), parentheses as nested lists. Refuses unbalanced quotes or parentheses."""
    stack: list[list[Any]] = [[]]
    i = 0
    while i < len(query):
        ch = query[i]
        if ch.isspace():
            i += 1
        elif ch == "(":
            stack.append([])
            i += 1
        elif ch == ")":
            if len(stack) == 1:
                raise MailInputError("search query has an unmatched ')'")
            group = stack.pop()
            if not group:
                raise MailInputError("search query has empty parentheses")
            stack[-1].append(group)
            i += 1
        elif ch == '"':
            out: list[str] = []
            i += 1
            while i < len(query) and query[i] != '"':
                if query[i] == "\\" and i + 1 < len(query):
                    i += 1
                out.append(query[i])
                i += 1
            if i >= len(query):
                raise MailInputError("search query has an unterminated quoted string")
            stack[-1].append("".join(out))
            i += 1
        else:
            start = i
            while i < len(query) and not query[i].isspace() and query[i] not in '()"':
                i += 1
            stack[-1].append(query[start:i].encode("ascii"))
    if len(stack) != 1:
        raise MailInputError("search query has an unmatched '('")
    return stack[0]


# ---------------------------------------------------------------------------------------------
# Errors from imapclient / imaplib
# ---------------------------------------------------------------------------------------------


def is_connection_error(exc: BaseException) -> bool:
    """True when the connection itself is unusable (socket gone, protocol out of step)."""
    return isinstance(exc, imaplib.IMAP4.abort | OSError | EOFError)


def server_text(exc: BaseException) -> str:
    """The server's words from an imapclient error, one line, bounded."""
    text = str(exc)
    if text.startswith(("b'", 'b"')):
        text = text[2:-1]
    return " ".join(text.split())[:300] or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------


@dataclass
class _Conn:
    client: IMAPClient
    last_used: float


class ImapPool:
    """Logged-in connections for one account, reused across calls.

    ``noop_after``: a connection idle longer than this is checked with NOOP before use.
    ``wait``: how long a caller waits for a free connection when all ``max_connections`` are busy.
    """

    def __init__(
        self,
        account: MailAccount,
        *,
        max_connections: int = 4,
        noop_after: float = 5.0,
        wait: float = 60.0,
        timeout: float = DEFAULT_TIMEOUT,
        connect: Callable[..., IMAPClient] = imap_connect,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.account = account
        self.max_connections = max_connections
        self.noop_after = noop_after
        self.wait = wait
        self.timeout = timeout
        self._connect = connect
        self._idle: list[_Conn] = []
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()
        #: Counters for tests and logs: connections opened, and discarded after a failure.
        self.opened = 0
        self.discarded = 0

    # --- slots ---

    def _acquire(self) -> _Conn | None:
        deadline = time.monotonic() + self.wait
        with self._cond:
            while True:
                if self._closed:
                    raise MailError(f"the IMAP pool of account {self.account.name} is closed")
                if self._idle:
                    self._busy += 1
                    return self._idle.pop()
                if self._busy < self.max_connections:
                    self._busy += 1
                    return None  # a slot, no connection yet
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MailError(
                        f"all {self.max_connections} IMAP connections of account {self.account.name} "
                        "are busy: try again shortly"
                    )
                self._cond.wait(remaining)

    def _release(self, conn: _Conn | None) -> None:
        with self._cond:
            self._busy -= 1
            if conn is not None:
                if self._closed:
                    _logout(conn.client)
                else:
                    conn.last_used = time.monotonic()
                    self._idle.append(conn)
            self._cond.notify()

    def _open(self) -> _Conn:
        client = self._connect(self.account, timeout=self.timeout)
        with self._cond:
            self.opened += 1
        log.debug("imap connection opened", extra={"account": self.account.name})
        return _Conn(client, time.monotonic())

    def _discard(self, conn: _Conn) -> None:
        with self._cond:
            self.discarded += 1
        with contextlib.suppress(Exception):
            conn.client.shutdown()

    def _healthy(self, conn: _Conn, force: bool) -> bool:
        if reauth_due(conn.client):
            log.info("imap connection's access token is near expiry; logging in again",
                     extra={"account": self.account.name})
            return False
        if not force and time.monotonic() - conn.last_used < self.noop_after:
            return True
        try:
            conn.client.noop()
            return True
        except Exception as exc:  # any failure: the connection is not worth keeping
            log.info(
                "imap connection failed its NOOP check; reconnecting",
                extra={"account": self.account.name, "error": server_text(exc)},
            )
            return False

    @contextlib.contextmanager
    def connection(self, *, check: bool = False) -> Iterator[IMAPClient]:
        """A logged-in connection for the duration of the block; MailConnectError when none can be made.

        ``check`` NOOPs a reused connection however recently it was used (before a change, which is
        not retried, a connection the server has since closed must not be the one that fails).
        """
        conn = self._acquire()
        try:
            if conn is not None and not self._healthy(conn, check):
                self._discard(conn)
                conn = None
            if conn is None:
                conn = self._open()
        except BaseException:
            self._release(None)
            raise
        try:
            yield conn.client
        except (MailError, IMAPClient.Error) as exc:
            # A NO/BAD answer or our own refusal: the connection is fine, unless imaplib aborted.
            if is_connection_error(exc):
                self._discard(conn)
                conn = None
            raise
        except BaseException:
            self._discard(conn)
            conn = None
            raise
        finally:
            self._release(conn)

    def run(self, operation: Callable[[IMAPClient], T], *, what: str, retry: bool = True) -> T:
        """``operation(client)`` on a pooled connection.

        A connection failure is retried once on a fresh connection when ``retry`` (read-only work);
        otherwise it becomes :class:`MailConnectionLost`, which says the change may or may not have
        been made. Server refusals (NO/BAD) become :class:`MailError` with the server's text.
        """
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                with self.connection(check=not retry) as client:
                    return operation(client)
            except MailError:
                raise
            except IMAPClient.Error as exc:
                if not is_connection_error(exc):
                    raise MailError(f"{what}: the IMAP server refused: {server_text(exc)}") from None
                failure: BaseException = exc
            except (OSError, EOFError) as exc:
                failure = exc
            log.info(
                "imap connection lost",
                extra={
                    "account": self.account.name,
                    "what": what,
                    "attempt": attempt,
                    "error": server_text(failure),
                },
            )
            if attempt == attempts:
                if retry:
                    raise MailConnectError(
                        f"{what}: the IMAP connection for account {self.account.name} failed twice "
                        f"({server_text(failure)}): is the server up? try again"
                    ) from None
                raise MailConnectionLost(
                    f"{what}: the IMAP connection for account {self.account.name} dropped mid-operation "
                    f"({server_text(failure)}); it may or may not have been done: check, then retry"
                ) from None
        raise AssertionError("unreachable")

    @property
    def idle_count(self) -> int:
        with self._cond:
            return len(self._idle)

    def close(self) -> None:
        """LOGOUT every idle connection; busy ones log out when released. The pool refuses new work."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for conn in idle:
            _logout(conn.client)


def _logout(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Folder:
    name: str
    delimiter: str | None
    flags: tuple[str, ...]

    @property
    def selectable(self) -> bool:
        lowered = {f.lower() for f in self.flags}
        return "\\noselect" not in lowered and "\\nonexistent" not in lowered

    @property
    def special_use(self) -> str | None:
        lowered = {f.lower(): f for f in self.flags}
        for flag in SPECIAL_USE_FLAGS:
            if flag.lower() in lowered:
                return flag
        return None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def list_folders(client: IMAPClient) -> list[Folder]:
    folders = []
    for flags, delimiter, name in client.list_folders():
        folders.append(
            Folder(
                name=_text(name),
                delimiter=_text(delimiter) if delimiter is not None else None,
                flags=tuple(_text(f) for f in flags),
            )
        )
    return folders


def special_folder(client: IMAPClient, flag: str, configured: str | None) -> str | None:
    """The folder flagged ``flag`` (RFC 6154), else ``configured`` when it exists, else None."""
    folders = list_folders(client)
    for folder in folders:
        if folder.special_use == flag and folder.selectable:
            return folder.name
    if configured:
        for folder in folders:
            if folder.name == configured and folder.selectable:
                return folder.name
    return None


def save_sent_copy(client: IMAPClient, account: MailAccount, data: bytes, when: datetime) -> str | None:
    """APPEND ``data`` (a message Carrier sent) to the account's Sent folder, marked \\Seen: the folder
    with SPECIAL-USE \\Sent, else ``folders.sent`` when it exists. Returns the folder, None if none."""
    sent = special_folder(client, "\\Sent", account.folders.sent)
    if sent is not None:
        client.append(sent, data, flags=[b"\\Seen"], msg_time=when)
    return sent


#: Untagged responses that mean the selected mailbox changed (new mail, expunges).
_CHANGES = ("EXISTS", "EXPUNGE", "VANISHED")
_SELECTED = "_carrier_selected"


def select(client: IMAPClient, folder: str, *, readonly: bool) -> dict[bytes, Any]:
    """SELECT/EXAMINE ``folder``; MailNotFound with the server's words when it cannot be opened.

    A pooled connection that already has ``folder`` open (read-write serves reads too) is reused
    after a NOOP when no EXISTS/EXPUNGE arrived since: re-opening a 10,000-message mailbox costs
    Dovecot ~20 ms, the NOOP well under one. Any change means a fresh SELECT, so counts stay exact.
    """
    check_folder(folder)
    cached = getattr(client, _SELECTED, None)
    pending = client._imap.untagged_responses
    if cached is not None and cached[0] == folder and (readonly or not cached[1]):
        client.noop()
        if not any(pending.get(key) for key in _CHANGES):
            info: dict[bytes, Any] = cached[2]
            return info
    setattr(client, _SELECTED, None)
    try:
        info = client.select_folder(folder, readonly=readonly)
    except IMAPClient.Error as exc:
        if is_connection_error(exc):
            raise
        raise MailNotFound(
            f"cannot open folder {folder!r}: {server_text(exc)} (mail_folder_list shows the folders)"
        ) from None
    pending = client._imap.untagged_responses  # imaplib starts a new dict at each SELECT
    for key in _CHANGES:  # the SELECT's own EXISTS is in the info; only later ones signal a change
        pending.pop(key, None)
    setattr(client, _SELECTED, (folder, readonly, info))
    return info


def forget_selection(client: IMAPClient) -> None:
    """Leave the selected folder (UNSELECT, else EXAMINE INBOX; never CLOSE, which expunges) before a
    folder is renamed or deleted, so the cached selection of :func:`select` cannot go stale."""
    if getattr(client, _SELECTED, None) is None:
        return
    setattr(client, _SELECTED, None)
    if client.has_capability("UNSELECT"):
        client.unselect_folder()
    else:
        client.select_folder("INBOX", readonly=True)


def folder_exists(client: IMAPClient, folder: str) -> bool:
    return any(f.name == folder for f in list_folders(client))


# ---------------------------------------------------------------------------------------------
# BODYSTRUCTURE
# ---------------------------------------------------------------------------------------------


def _pairs(params: object) -> list[tuple[str, str]]:
    if not isinstance(params, tuple | list):
        return []
    flat = [_text(p) if p is not None else "" for p in params]
    return list(zip(flat[0::2], flat[1::2], strict=False))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _leaf(part: Sequence[Any], number: str) -> Leaf:
    main = _text(part[0]).lower() if part[0] is not None else "text"
    sub = _text(part[1]).lower() if len(part) > 1 and part[1] is not None else "plain"
    mime_type = normalize_mime_type(f"{main}/{sub}")
    type_params = _pairs(part[2] if len(part) > 2 else None)
    encoding = _text(part[5]).lower() if len(part) > 5 and part[5] is not None else "7bit"
    size = _int(part[6]) if len(part) > 6 else 0
    # The extension data starts later for text/* (line count) and message/rfc822 (envelope, body, lines).
    if main == "text":
        disposition_at = 9
    elif mime_type == "message/rfc822":
        disposition_at = 11
    else:
        disposition_at = 8
    disposition: str | None = None
    disposition_params: list[tuple[str, str]] = []
    raw_disposition = part[disposition_at] if len(part) > disposition_at else None
    if isinstance(raw_disposition, tuple | list) and raw_disposition:
        disposition = _text(raw_disposition[0]).lower() if raw_disposition[0] is not None else None
        disposition_params = _pairs(raw_disposition[1] if len(raw_disposition) > 1 else None)
    raw_name = param_value(disposition_params, "filename") or param_value(type_params, "name")
    filename = decode_header_value(raw_name) if raw_name else None
    return Leaf(
        number=number,
        mime_type=mime_type,
        charset=param_value(type_params, "charset"),
        encoding=encoding,
        disposition=disposition,
        filename=filename or None,
        size=size,
    )


def structure_leaves(structure: Any) -> list[Leaf]:
    """Leaf parts of a BODYSTRUCTURE, depth first, with IMAP part numbers (message/rfc822 is a leaf)."""
    out: list[Leaf] = []

    def walk(part: Any, number: str) -> None:
        if part and isinstance(part[0], list):  # multipart: children, then the subtype
            for index, child in enumerate(part[0], start=1):
                walk(child, f"{number}.{index}" if number else str(index))
            return
        out.append(_leaf(part, number or "1"))

    walk(structure, "")
    return out


# ---------------------------------------------------------------------------------------------
# Moving messages
# ---------------------------------------------------------------------------------------------

_COPYUID = re.compile(rb"(?:\[COPYUID )?\d+ ([0-9:,]+) ([0-9:,]+)\]?", re.IGNORECASE)


def _copyuid(texts: Sequence[object], uid: int) -> int | None:
    """The destination UID of ``uid`` from a COPYUID response code (RFC 4315), if the server sent one."""
    for text in texts:
        data = text if isinstance(text, bytes) else str(text).encode("utf-8", "replace")
        start = data.upper().find(b"[COPYUID ")
        match = _COPYUID.match(data, start) if start >= 0 else _COPYUID.fullmatch(data.strip())
        if match and match.group(1) == str(uid).encode():
            dest = match.group(2)
            return int(dest) if dest.isdigit() else None
    return None


def move_message(
    client: IMAPClient, uid: int, to_folder: str, *, use_move: bool = True
) -> tuple[int | None, str]:
    """Move ``uid`` from the selected folder: UID MOVE (RFC 6851), or COPY + \\Deleted + UID EXPUNGE.

    Returns the UID in the destination (when the server reports COPYUID) and the method used.
    """
    # imaplib files response codes under untagged_responses: COPYUID from a tagged OK (COPY), the
    # untagged OK carrying it (MOVE). Clear stale ones so an old code is never read as this one's.
    codes = client._imap.untagged_responses
    for key in ("COPYUID", "OK"):
        codes.pop(key, None)
    if use_move and client.has_capability("MOVE"):
        client.move([uid], to_folder)
        return _copyuid([*codes.pop("COPYUID", []), *codes.pop("OK", [])], uid), "MOVE"
    client.copy([uid], to_folder)
    new_uid = _copyuid([*codes.pop("COPYUID", []), *codes.pop("OK", [])], uid)
    client.add_flags([uid], [b"\\Deleted"], silent=True)
    if client.has_capability("UIDPLUS"):
        client.uid_expunge([uid])
    else:  # without UIDPLUS only a full EXPUNGE exists; \\Deleted messages are meant to go anyway
        client.expunge()
    return new_uid, "COPY+EXPUNGE"


def appended_uid(response: object) -> int | None:
    """The new message's UID from an APPEND answer's ``[APPENDUID validity uid]`` (RFC 4315)."""
    data = response if isinstance(response, bytes) else str(response).encode("utf-8", "replace")
    match = re.search(rb"\[APPENDUID \d+ (\d+)\]", data, re.IGNORECASE)
    return int(match.group(1)) if match else None


def move_messages(client: IMAPClient, uids: Sequence[int], to_folder: str) -> dict[int, int | None]:
    """Move ``uids`` of the selected folder in one command (UID MOVE, or COPY + \\Deleted + UID
    EXPUNGE); their UIDs in ``to_folder`` where the server reports COPYUID."""
    codes = client._imap.untagged_responses
    for key in ("COPYUID", "OK"):
        codes.pop(key, None)
    if client.has_capability("MOVE"):
        client.move(list(uids), to_folder)
    else:
        client.copy(list(uids), to_folder)
    texts = [*codes.pop("COPYUID", []), *codes.pop("OK", [])]
    if not client.has_capability("MOVE"):
        expunge_uids(client, uids)
    return {uid: _copyuid_set(texts, uid) for uid in uids}


def expunge_uids(client: IMAPClient, uids: Sequence[int]) -> None:
    """\\Deleted and UID EXPUNGE for exactly ``uids`` (MailError without UIDPLUS: a plain EXPUNGE would
    also remove other messages someone marked \\Deleted)."""
    if not client.has_capability("UIDPLUS"):
        raise MailError("the IMAP server has no UIDPLUS, so Carrier cannot expunge single messages safely")
    client.add_flags(list(uids), [b"\\Deleted"], silent=True)
    client.uid_expunge(list(uids))


def _uid_set(text: bytes) -> list[int]:
    out: list[int] = []
    for piece in text.split(b","):
        low, _, high = piece.partition(b":")
        if not low.isdigit() or (high and not high.isdigit()):
            return []
        start, end = int(low), int(high or low)
        out.extend(range(start, end + 1) if start <= end else range(start, end - 1, -1))
    return out


def _copyuid_set(texts: Sequence[object], uid: int) -> int | None:
    """The destination UID of ``uid`` from a COPYUID code whose sets may hold many UIDs."""
    for text in texts:
        data = text if isinstance(text, bytes) else str(text).encode("utf-8", "replace")
        start = data.upper().find(b"[COPYUID ")
        match = _COPYUID.match(data, start) if start >= 0 else _COPYUID.fullmatch(data.strip())
        if match:
            source, dest = _uid_set(match.group(1)), _uid_set(match.group(2))
            if uid in source and len(source) == len(dest):
                return dest[source.index(uid)]
    return None


# ---------------------------------------------------------------------------------------------
# IDLE (for the email gateway: a dedicated connection, never a pooled one)
# ---------------------------------------------------------------------------------------------


class IdleWatcher:
    """Waits for new mail in one folder with IMAP IDLE (RFC 2177) on its own connection.

    ``wait(timeout)`` returns True when the server reported a change (EXISTS/RECENT/EXPUNGE/FETCH)
    and False on timeout. IDLE is renewed before the 29-minute limit servers enforce. A dropped
    connection raises MailConnectError; the caller makes a new watcher. On an OAuth2 session,
    ``wait`` returns by the time its access token is near expiry; then ``reauth_due`` is true and the
    caller logs in again on a new connection (a provider may end a session whose token expired).
    """

    RENEW_AFTER = 25 * 60

    def __init__(
        self, account: MailAccount, folder: str = "INBOX", *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.account = account
        self.folder = check_folder(folder)
        self.client = imap_connect(account, timeout=timeout)
        try:
            if not self.client.has_capability("IDLE"):
                raise MailError(f"the IMAP server of account {account.name} has no IDLE: set idle: false")
            select(self.client, self.folder, readonly=True)
        except BaseException:
            _logout(self.client)
            raise

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                until_reauth = reauth_in(self.client)
                if until_reauth is not None:
                    remaining = min(remaining, until_reauth)
                if remaining <= 0:
                    return False
                self.client.idle()
                try:
                    responses = self.client.idle_check(timeout=min(remaining, self.RENEW_AFTER))
                finally:
                    done = self.client.idle_done()
                responses = list(responses) + list(done[1] if isinstance(done, tuple) else [])
                if any(_is_change(r) for r in responses):
                    return True
        except (IMAPClient.Error, OSError, EOFError) as exc:
            raise MailConnectError(
                f"IDLE on account {self.account.name} folder {self.folder!r} failed: {server_text(exc)}"
            ) from None

    @property
    def reauth_due(self) -> bool:
        """The session's access token is near expiry: make a new watcher."""
        return reauth_due(self.client)

    def close(self) -> None:
        _logout(self.client)

    def __enter__(self) -> IdleWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_change(response: object) -> bool:
    if not isinstance(response, tuple) or len(response) < 2:
        return False
    kind = response[1]
    return isinstance(kind, bytes) and kind.upper() in (b"EXISTS", b"RECENT", b"EXPUNGE", b"FETCH")
