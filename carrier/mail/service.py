"""The mail operations behind the ten ``mail_*`` tools, one method each, over the IMAP pools and SMTP.

Arguments arrive from outside (an MCP client, later the email gateway): each is checked here before
it reaches the wire or the disk, and every failure is a :class:`~carrier.errors.CarrierError` with a
message that says what to do. Read-only work is retried once on a fresh connection when the
connection drops; changes are not (the error says to check and retry).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.policy import compat32
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any, Literal, TypeVar

from imapclient import IMAPClient
from pydantic import BaseModel, ConfigDict, Field

from carrier.config import Config, MailAccount
from carrier.errors import CarrierError
from carrier.mail import files, imap, smtp
from carrier.mail.compose import (
    POLICY,
    ComposeError,
    Draft,
    OutgoingAttachment,
    check_headers,
    check_message_id,
    compose,
    envelope_recipients,
    new_message_id,
    parse_recipients,
    reply_references,
    reply_subject,
    to_bytes,
    without,
)
from carrier.mail.htmltext import html_to_text
from carrier.mail.imap import ImapPool, MailError, MailInputError, MailNotFound
from carrier.mail.mime import Leaf, attachment_name, classify
from carrier.mail.parse import Headers, decode_transfer, headers_of, leaf_text
from carrier.mail.records import (
    AccountInfo,
    AccountList,
    Address,
    AttachmentContent,
    AttachmentInfo,
    BatchResult,
    DraftResult,
    FlagsResult,
    FolderInfo,
    FolderList,
    FolderResult,
    MarkResult,
    MessageContent,
    MessagePage,
    MessageSummary,
    MoveResult,
    SearchResult,
    SendResult,
    ThreadResult,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MESSAGE_BYTES = 20 * 1024 * 1024
#: Base64 in a tool result costs an agent's context; bigger attachments go to disk with save_to.
MAX_INLINE_ATTACHMENT = 5 * 1024 * 1024
MAX_SAVED_ATTACHMENT = MAX_MESSAGE_BYTES
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
DEFAULT_MAX_CHARS = 20_000
MAX_MAX_CHARS = 2_000_000
THREAD_ROUNDS = 3
THREAD_MAX_IDS = 100
SUMMARY_FIELDS = "FROM TO CC SUBJECT DATE MESSAGE-ID CONTENT-TYPE"
SUMMARY_ITEMS = ["UID", "FLAGS", "RFC822.SIZE", f"BODY.PEEK[HEADER.FIELDS ({SUMMARY_FIELDS})]"]
_CURSOR = re.compile(r"c1\.(\d{1,10})\.(\d{1,10})\.(\d{1,10})")

Format = Literal["text", "html", "raw_eml"]
MarkAction = Literal["read", "unread", "flagged", "unflagged", "trash", "archive"]


class AttachmentInput(BaseModel):
    """An attachment to send: ``content_base64`` with ``filename``, or ``path`` in the download directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    filename: str | None = Field(default=None, description="file name shown to the recipient")
    content_base64: str | None = Field(default=None, description="the content, base64-encoded")
    path: str | None = Field(
        default=None, description="a file in Carrier's download directory (mail.download_dir)"
    )
    mime_type: str | None = Field(
        default=None, description="e.g. application/pdf (guessed from the name if absent)"
    )


# ---------------------------------------------------------------------------------------------
# Small checks
# ---------------------------------------------------------------------------------------------


def _limit(value: int | None, default: int = DEFAULT_LIMIT) -> int:
    number = default if value is None else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_LIMIT:
        raise MailInputError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {value!r}")
    return number


def _day(value: str | None, what: str) -> date | None:
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        return date.fromisoformat(text[:10]) if len(text) >= 10 else date.fromisoformat(text)
    except ValueError:
        raise MailInputError(f"{what} must be a date as YYYY-MM-DD, got {value!r}") from None


def _one_line(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if any(ch in value for ch in "\r\n\x00"):
        raise MailInputError(f"{what} contains CR, LF or NUL: give it on one line")
    return value


def _quote(value: str) -> str:
    """An IMAP quoted string (ASCII, one line: the callers check)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flags(values: Iterable[object]) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def _flag_text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _addresses(addresses: Sequence[Address]) -> str:
    return ", ".join(formataddr((a.name, a.addr)) if a.name else a.addr for a in addresses)


def _header_block(data: dict[bytes, Any]) -> bytes:
    for key, value in data.items():
        if isinstance(key, bytes) and key.startswith(b"BODY[HEADER") and isinstance(value, bytes):
            return value
    return b""


def _summary(uid: int, data: dict[bytes, Any]) -> MessageSummary:
    message = email.message_from_bytes(_header_block(data), policy=compat32)
    headers = headers_of(message)
    flags = _flags(data.get(b"FLAGS", ()))
    content_type = str(message.get("Content-Type", "")).split(";", 1)[0].strip().lower()
    return MessageSummary(
        uid=uid,
        message_id=headers.message_id,
        subject=headers.subject,
        from_=headers.from_,
        to=headers.to,
        cc=headers.cc,
        date=headers.date,
        flags=flags,
        unread="\\Seen" not in flags,
        size=int(data.get(b"RFC822.SIZE") or 0),
        has_attachments=content_type == "multipart/mixed",
    )


def _fetch_summaries(client: IMAPClient, uids: Sequence[int]) -> list[MessageSummary]:
    """Summaries of ``uids`` (in that order); UIDs that vanished meanwhile are left out."""
    if not uids:
        return []
    fetched = client.fetch(list(uids), SUMMARY_ITEMS)
    return [_summary(uid, fetched[uid]) for uid in uids if uid in fetched]


def _message_exists(client: IMAPClient, uid: int, folder: str) -> dict[bytes, Any]:
    data = client.fetch([uid], ["UID", "FLAGS"]).get(uid)
    if not data:
        raise MailNotFound(f"no message with uid {uid} in folder {folder!r} (UIDs come from mail_inbox_list)")
    result: dict[bytes, Any] = data
    return result


def _read_parts(client: IMAPClient, uid: int, leaves: Sequence[Leaf], *, html_as_text: bool) -> str:
    """The decoded text of ``leaves`` (fetched in one command); HTML converted when ``html_as_text``."""
    if not leaves:
        return ""
    fetched = client.fetch([uid], [f"BODY.PEEK[{leaf.number}]" for leaf in leaves]).get(uid, {})
    chunks = [
        leaf_text(leaf, decode_transfer(fetched.get(f"BODY[{leaf.number}]".encode()) or b"", leaf.encoding))
        for leaf in leaves
    ]
    if leaves[0].mime_type == "text/html":
        html = "\n".join(chunks)
        return html_to_text(html) if html_as_text else html
    return "\n\n".join(chunks)


def _encode_cursor(validity: int, uid: int, seq: int) -> str:
    return f"c1.{validity}.{uid}.{seq}"


def _decode_cursor(cursor: str | None, validity: int) -> tuple[int, int] | None:
    if cursor is None or not cursor.strip():
        return None
    match = _CURSOR.fullmatch(cursor.strip())
    if not match:
        raise MailInputError("cursor is not one this server gave out: pass next_cursor back unchanged")
    if int(match.group(1)) != validity:
        raise MailInputError(
            "cursor belongs to an older state of this folder (UIDVALIDITY changed): "
            "list again without a cursor"
        )
    return int(match.group(2)), int(match.group(3))


def _seq_fetch(client: IMAPClient, seqs: list[int], items: list[str]) -> dict[int, dict[bytes, Any]]:
    """FETCH by sequence numbers (imapclient uses UIDs unless told otherwise)."""
    client.use_uid = False
    try:
        result: dict[int, dict[bytes, Any]] = client.fetch(seqs, items)
        return result
    finally:
        client.use_uid = True


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


class MailService:
    """The mail accounts of one configuration, with an IMAP pool each (made on first use)."""

    def __init__(
        self, config: Config, *, pool_factory: Callable[[MailAccount], ImapPool] | None = None
    ) -> None:
        self.config = config
        self._pool_factory = pool_factory or (lambda account: ImapPool(account))
        self._pools: dict[str, ImapPool] = {}
        self._lock = threading.Lock()

    # --- accounts, pools, files ---

    def account(self, name: str | None) -> MailAccount:
        if name is None or not name.strip():
            return self.config.default_account
        for account in self.config.accounts:
            if account.name == name.strip():
                return account
        known = ", ".join(a.name for a in self.config.accounts)
        raise MailNotFound(f"no mail account named {name!r}: the accounts are {known}")

    def pool(self, account: MailAccount) -> ImapPool:
        with self._lock:
            pool = self._pools.get(account.name)
            if pool is None:
                pool = self._pools[account.name] = self._pool_factory(account)
            return pool

    @property
    def download_dir(self) -> Path:
        return self.config.mail.download_dir or self.config.state_dir / "downloads"

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _run(
        self, account: MailAccount, what: str, op: Callable[[IMAPClient], T], *, retry: bool = True
    ) -> T:
        return self.pool(account).run(op, what=what, retry=retry)

    def _folder(self, account: MailAccount, folder: str | None, what: str = "folder") -> str:
        return imap.check_folder(folder if folder is not None else account.folders.inbox, what)

    # --- mail_folder_list ---

    def folder_list(self, account_name: str | None = None) -> FolderList:
        account = self.account(account_name)
        folders = self._run(account, "mail_folder_list", imap.list_folders)
        return FolderList(
            account=account.name,
            folders=[
                FolderInfo(
                    name=f.name,
                    delimiter=f.delimiter,
                    attributes=list(f.flags),
                    selectable=f.selectable,
                    special_use=f.special_use,
                )
                for f in folders
            ],
        )

    # --- mail_inbox_list ---

    def inbox_list(
        self,
        account_name: str | None = None,
        *,
        folder: str | None = None,
        since: str | None = None,
        unread_only: bool = False,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> MessagePage:
        account = self.account(account_name)
        name = self._folder(account, folder)
        count = _limit(limit)
        since_day = _day(since, "since")

        def op(client: IMAPClient) -> MessagePage:
            info = imap.select(client, name, readonly=True)
            exists = int(info.get(b"EXISTS", 0))
            validity = int(info.get(b"UIDVALIDITY", 0))
            position = _decode_cursor(cursor, validity)
            if not (unread_only or since_day):
                page = self._page_by_sequence(client, exists, validity, count, position)
                if page is not None:
                    messages, next_cursor = page
                    return MessagePage(
                        account=account.name,
                        folder=name,
                        total=exists,
                        messages=messages,
                        next_cursor=next_cursor,
                    )
            criteria: list[Any] = []
            if unread_only:
                criteria.append("UNSEEN")
            if since_day:
                criteria += ["SINCE", since_day]
            uids = sorted(client.search(criteria or ["ALL"]), reverse=True)
            below = [u for u in uids if position is None or u < position[0]]
            chosen = below[:count]
            more = len(below) > count
            return MessagePage(
                account=account.name,
                folder=name,
                total=len(uids),
                messages=_fetch_summaries(client, chosen),
                next_cursor=_encode_cursor(validity, chosen[-1], 0) if more and chosen else None,
            )

        return self._run(account, "mail_inbox_list", op)

    @staticmethod
    def _page_by_sequence(
        client: IMAPClient,
        exists: int,
        validity: int,
        count: int,
        position: tuple[int, int] | None,
    ) -> tuple[list[MessageSummary], str | None] | None:
        """Newest-first page by sequence numbers (no SEARCH); None when the cursor's hint went stale."""
        if exists == 0:
            return [], None
        if position is None:
            top = exists
        else:
            uid, seq = position
            if not 1 <= seq <= exists:
                return None
            probe = _seq_fetch(client, [seq], ["UID"]).get(seq, {})
            if probe.get(b"UID") != uid:
                return None  # messages were expunged above the hint: fall back to a UID search
            top = seq - 1
        if top < 1:
            return [], None
        low = max(1, top - count + 1)
        fetched = _seq_fetch(client, list(range(low, top + 1)), SUMMARY_ITEMS)
        messages = [
            _summary(int(fetched[seq][b"UID"]), fetched[seq])
            for seq in sorted(fetched, reverse=True)
            if b"UID" in fetched[seq]
        ]
        if low > 1 and messages:
            return messages, _encode_cursor(validity, messages[-1].uid, low)
        return messages, None

    # --- mail_inbox_read ---

    def inbox_read(
        self,
        account_name: str | None = None,
        *,
        uid: int | str,
        folder: str | None = None,
        format: Format = "text",
        max_chars: int | None = None,
        offset: int = 0,
    ) -> MessageContent:
        account = self.account(account_name)
        name = self._folder(account, folder)
        number = imap.check_uid(uid)
        if format not in ("text", "html", "raw_eml"):
            raise MailInputError(f"format must be text, html or raw_eml, got {format!r}")
        window = DEFAULT_MAX_CHARS if max_chars is None else max_chars
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_MAX_CHARS:
            raise MailInputError(f"max_chars must be from 1 to {MAX_MAX_CHARS}, got {max_chars!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise MailInputError(f"offset must be a whole number >= 0, got {offset!r}")

        def op(client: IMAPClient) -> MessageContent:
            imap.select(client, name, readonly=True)
            items = ["UID", "FLAGS", "RFC822.SIZE", "BODYSTRUCTURE", "BODY.PEEK[HEADER]"]
            data = client.fetch([number], items).get(number)
            if not data:
                raise MailNotFound(
                    f"no message with uid {number} in folder {name!r} "
                    "(UIDs come from mail_inbox_list or mail_search)"
                )
            size = int(data.get(b"RFC822.SIZE") or 0)
            if size > MAX_MESSAGE_BYTES:
                raise MailError(
                    f"message {number} is {size / 1048576:.1f} MB, over the "
                    f"{MAX_MESSAGE_BYTES // 1048576} MB reading cap: "
                    "fetch its attachments one by one with mail_attachment_get(save_to=...)"
                )
            headers = headers_of(email.message_from_bytes(_header_block(data), policy=compat32))
            layout = classify(imap.structure_leaves(data[b"BODYSTRUCTURE"]))
            delivered: str = format
            if format == "raw_eml":
                raw = client.fetch([number], ["BODY.PEEK[]"]).get(number, {}).get(b"BODY[]") or b""
                body = raw.decode("utf-8", "replace")
            else:
                want = layout.text if format == "text" else layout.html
                if not want:
                    want = layout.html if format == "text" else layout.text
                    delivered = "text"
                body = _read_parts(client, number, want, html_as_text=format == "text")
                if format == "text" and not body.strip() and layout.text and layout.html:
                    body = _read_parts(client, number, layout.html, html_as_text=True)  # empty text part
            return MessageContent(
                account=account.name,
                folder=name,
                uid=number,
                message_id=headers.message_id,
                subject=headers.subject,
                from_=headers.from_,
                to=headers.to,
                cc=headers.cc,
                reply_to=headers.reply_to,
                date=headers.date,
                in_reply_to=headers.in_reply_to,
                references=headers.references,
                flags=_flags(data.get(b"FLAGS", ())),
                size=size,
                format=delivered,
                body=body[offset : offset + window],
                body_chars=len(body),
                offset=offset,
                truncated=offset + window < len(body),
                attachments=[
                    AttachmentInfo(
                        index=i, filename=attachment_name(leaf), mime_type=leaf.mime_type, size=leaf.size
                    )
                    for i, leaf in enumerate(layout.attachments)
                ],
            )

        return self._run(account, "mail_inbox_read", op)

    # --- mail_attachment_get ---

    def attachment_get(
        self,
        account_name: str | None = None,
        *,
        uid: int | str,
        attachment_index: int,
        folder: str | None = None,
        save_to: str | None = None,
    ) -> AttachmentContent:
        account = self.account(account_name)
        name = self._folder(account, folder)
        number = imap.check_uid(uid)
        if (
            isinstance(attachment_index, bool)
            or not isinstance(attachment_index, int)
            or attachment_index < 0
        ):
            raise MailInputError(f"attachment_index must be a whole number >= 0, got {attachment_index!r}")
        target_dir = self.download_dir
        if save_to is not None:
            files.resolve_inside(target_dir, save_to if save_to.strip() else ".", "save_to")  # refuse early

        def op(client: IMAPClient) -> tuple[AttachmentInfo, str, bytes]:
            imap.select(client, name, readonly=True)
            data = client.fetch([number], ["UID", "BODYSTRUCTURE"]).get(number)
            if not data:
                raise MailNotFound(f"no message with uid {number} in folder {name!r}")
            attachments = classify(imap.structure_leaves(data[b"BODYSTRUCTURE"])).attachments
            if attachment_index >= len(attachments):
                have = f"0-{len(attachments) - 1}" if attachments else "none"
                raise MailInputError(
                    f"attachment_index {attachment_index} is out of range: message {number} has "
                    f"{len(attachments)} attachment(s) (indexes: {have}; see mail_inbox_read)"
                )
            leaf = attachments[attachment_index]
            cap = MAX_INLINE_ATTACHMENT if save_to is None else MAX_SAVED_ATTACHMENT
            estimate = leaf.size * 3 // 4 if leaf.encoding == "base64" else leaf.size
            if estimate > cap:
                raise MailError(self._too_big(leaf.size, cap, save_to is None))
            key = f"BODY[{leaf.number}]".encode()
            raw = client.fetch([number], [f"BODY.PEEK[{leaf.number}]"]).get(number, {}).get(key) or b""
            info = AttachmentInfo(
                index=attachment_index,
                filename=attachment_name(leaf),
                mime_type=leaf.mime_type,
                size=leaf.size,
            )
            return info, leaf.encoding, raw

        info, encoding, raw = self._run(account, "mail_attachment_get", op)
        content = decode_transfer(raw, encoding)
        cap = MAX_INLINE_ATTACHMENT if save_to is None else MAX_SAVED_ATTACHMENT
        if len(content) > cap:
            raise MailError(self._too_big(len(content), cap, save_to is None))
        saved: str | None = None
        if save_to is not None:
            path = files.target_file(target_dir, save_to, info.filename)
            files.write_new(path, content)
            saved = str(path)
        return AttachmentContent(
            account=account.name,
            uid=number,
            index=attachment_index,
            filename=info.filename,
            mime_type=info.mime_type,
            size=len(content),
            content_base64=None if save_to is not None else base64.b64encode(content).decode("ascii"),
            saved_to=saved,
        )

    @staticmethod
    def _too_big(size: int, cap: int, inline: bool) -> str:
        hint = ": pass save_to to write it to the download directory" if inline else ""
        return f"attachment is {size} bytes, over the {cap}-byte cap{hint}"

    # --- mail_search ---

    def search(
        self,
        account_name: str | None = None,
        *,
        query: str = "",
        folder: str | None = None,
        limit: int | None = None,
        from_: str | None = None,
        to: str | None = None,
        subject: str | None = None,
        since: str | None = None,
        before: str | None = None,
        unseen: bool | None = None,
    ) -> SearchResult:
        account = self.account(account_name)
        name = self._folder(account, folder)
        count = _limit(limit)
        query = imap.check_search_query(query.strip()) if query else ""
        pairs = [
            ("FROM", _one_line(from_, "from")),
            ("TO", _one_line(to, "to")),
            ("SUBJECT", _one_line(subject, "subject")),
        ]
        days = [("SINCE", _day(since, "since")), ("BEFORE", _day(before, "before"))]
        flag = [] if unseen is None else ["UNSEEN" if unseen else "SEEN"]
        filters = [(key, value) for key, value in pairs if value]
        charset: str | None = None
        criteria: str | list[Any]
        if all(value.isascii() for _, value in filters):
            if any(ord(c) < 32 for _, value in filters for c in value):
                raise MailInputError("search filters contain control characters")
            parts = [query] if query else []
            parts += [f"{key} {_quote(value)}" for key, value in filters]
            parts += [f"{key} {day.strftime('%d-%b-%Y')}" for key, day in days if day]
            parts += flag
            criteria = " ".join(parts) or "ALL"
            shown = criteria
        else:
            listed: list[Any] = imap.tokenize_search(query) if query else []
            for key, value in filters:
                listed += [key, value]
            for key, day in days:
                if day:
                    listed += [key, day]
            listed += flag
            criteria, charset = listed, "UTF-8"
            shown = " ".join(str(x) for x in listed)

        def op(client: IMAPClient) -> SearchResult:
            imap.select(client, name, readonly=True)
            try:
                uids = client.search(criteria, charset)
            except IMAPClient.Error as exc:
                if imap.is_connection_error(exc):
                    raise
                raise MailInputError(
                    f"the server refused the search criteria {shown!r}: {imap.server_text(exc)} "
                    '(IMAP SEARCH syntax, e.g. UNSEEN SUBJECT "report", or use the filters)'
                ) from None
            chosen = sorted(uids, reverse=True)[:count]
            return SearchResult(
                account=account.name,
                folder=name,
                criteria=shown,
                total=len(uids),
                messages=_fetch_summaries(client, chosen),
            )

        return self._run(account, "mail_search", op)

    # --- mail_thread ---

    def thread(
        self,
        account_name: str | None = None,
        *,
        message_id: str,
        folder: str | None = None,
        limit: int | None = None,
    ) -> ThreadResult:
        account = self.account(account_name)
        name = self._folder(account, folder)
        count = _limit(limit)
        try:
            seed_id = check_message_id(message_id, "message_id")
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None
        if not seed_id.isascii():
            raise MailInputError("message_id must be ASCII")

        def ids_of(client: IMAPClient, uids: Iterable[int]) -> dict[int, Headers]:
            wanted = list(uids)
            if not wanted:
                return {}
            got = client.fetch(wanted, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID REFERENCES IN-REPLY-TO)]"])
            return {
                uid: headers_of(email.message_from_bytes(_header_block(got[uid]), policy=compat32))
                for uid in wanted
                if uid in got
            }

        def related(client: IMAPClient, ids: Sequence[str]) -> set[int]:
            terms = [
                f"HEADER {field} {_quote(i)}"
                for i in ids
                for field in ("Message-ID", "References", "In-Reply-To")
            ]
            return set(client.search(_or_tree(terms)))

        def op(client: IMAPClient) -> ThreadResult:
            imap.select(client, name, readonly=True)
            seeds = client.search(f"HEADER Message-ID {_quote(seed_id)}")
            if not seeds:
                raise MailNotFound(f"no message with Message-ID {seed_id} in folder {name!r}")
            seed = ids_of(client, seeds[:1]).get(seeds[0])
            ancestors = list(seed.references) if seed else []
            if seed and seed.in_reply_to and seed.in_reply_to not in ancestors:
                ancestors.append(seed.in_reply_to)
            known = list(dict.fromkeys([*ancestors, seed_id]))[-THREAD_MAX_IDS:]
            found = set(seeds)
            frontier = known
            for _ in range(THREAD_ROUNDS):
                matches = related(client, frontier)
                new = matches - found
                found |= matches
                if not new or len(known) >= THREAD_MAX_IDS:
                    break
                fresh = [
                    h.message_id
                    for h in ids_of(client, sorted(new)).values()
                    if h.message_id and h.message_id not in known
                ]
                if not fresh:
                    break
                frontier = fresh[: THREAD_MAX_IDS - len(known)]
                known += frontier
            summaries = _fetch_summaries(client, sorted(found)[:MAX_LIMIT])
            summaries.sort(key=lambda s: (_sort_date(s.date), s.uid))
            root = ancestors[0] if ancestors else seed_id
            return ThreadResult(
                account=account.name, folder=name, root_message_id=root, messages=summaries[:count]
            )

        return self._run(account, "mail_thread", op)

    # --- mail_move / mail_mark ---

    def move(
        self,
        account_name: str | None = None,
        *,
        uid: int | str,
        to_folder: str,
        from_folder: str | None = None,
    ) -> MoveResult:
        account = self.account(account_name)
        source = self._folder(account, from_folder, "from_folder")
        target = imap.check_folder(to_folder, "to_folder")
        number = imap.check_uid(uid)
        if source == target:
            raise MailInputError(f"from_folder and to_folder are both {source!r}: nothing to move")

        def op(client: IMAPClient) -> MoveResult:
            if not imap.folder_exists(client, target):
                raise MailNotFound(
                    f"to_folder {target!r} does not exist (mail_folder_list shows the folders)"
                )
            imap.select(client, source, readonly=False)
            _message_exists(client, number, source)
            new_uid, method = imap.move_message(client, number, target)
            return MoveResult(
                account=account.name,
                uid=number,
                from_folder=source,
                to_folder=target,
                new_uid=new_uid,
                method=method,
            )

        return self._run(account, "mail_move", op, retry=False)

    def mark(
        self,
        account_name: str | None = None,
        *,
        uid: int | str,
        action: MarkAction,
        folder: str | None = None,
    ) -> MarkResult:
        account = self.account(account_name)
        name = self._folder(account, folder)
        number = imap.check_uid(uid)
        flag_changes = {
            "read": ("add", b"\\Seen"),
            "unread": ("remove", b"\\Seen"),
            "flagged": ("add", b"\\Flagged"),
            "unflagged": ("remove", b"\\Flagged"),
        }
        special = {
            "trash": ("\\Trash", account.folders.trash),
            "archive": ("\\Archive", account.folders.archive),
        }
        if action not in flag_changes and action not in special:
            raise MailInputError(
                f"action must be one of read, unread, flagged, unflagged, trash, archive; got {action!r}"
            )

        def op(client: IMAPClient) -> MarkResult:
            if action in special:
                flag, configured = special[action]
                target = imap.special_folder(client, flag, configured)
                if target is None:
                    raise MailNotFound(
                        f"account {account.name} has no {flag} folder: the server marks none with "
                        f"SPECIAL-USE and folders.{action} ({configured!r}) does not exist; "
                        f"create it or set folders.{action}"
                    )
                if target == name:
                    raise MailInputError(f"message {number} is already in {target!r}")
                imap.select(client, name, readonly=False)
                _message_exists(client, number, name)
                new_uid, _ = imap.move_message(client, number, target)
                return MarkResult(
                    account=account.name,
                    uid=number,
                    folder=name,
                    action=action,
                    flags=[],
                    moved_to=target,
                    new_uid=new_uid,
                )
            how, flag_bytes = flag_changes[action]
            imap.select(client, name, readonly=False)
            _message_exists(client, number, name)
            if how == "add":
                client.add_flags([number], [flag_bytes], silent=True)
            else:
                client.remove_flags([number], [flag_bytes], silent=True)
            flags = _message_exists(client, number, name).get(b"FLAGS", ())
            return MarkResult(
                account=account.name, uid=number, folder=name, action=action, flags=_flags(flags)
            )

        return self._run(account, "mail_mark", op, retry=False)

    # --- mail_send / mail_reply ---

    def _attachments(self, items: Sequence[AttachmentInput] | None) -> tuple[OutgoingAttachment, ...]:
        out: list[OutgoingAttachment] = []
        total = 0
        for position, item in enumerate(items or ()):
            what = f"attachments[{position}]"
            if (item.content_base64 is None) == (item.path is None):
                raise MailInputError(
                    f"{what}: give either content_base64 (with filename) or path, not both or neither"
                )
            if item.path is not None:
                stored_name, content = files.read_inside(self.download_dir, item.path, MAX_MESSAGE_BYTES)
                filename = item.filename or stored_name
            else:
                if not item.filename:
                    raise MailInputError(f"{what}: filename is required with content_base64")
                try:
                    content = base64.b64decode(item.content_base64 or "", validate=True)
                except (binascii.Error, ValueError):
                    raise MailInputError(f"{what}: content_base64 is not valid base64") from None
                filename = item.filename
            total += len(content)
            if total > MAX_MESSAGE_BYTES:
                raise MailInputError(
                    f"attachments add up to over {MAX_MESSAGE_BYTES} bytes: send fewer or smaller"
                )
            out.append(OutgoingAttachment(filename=filename, content=content, mime_type=item.mime_type or ""))
        return tuple(out)

    def _deliver(self, account: MailAccount, draft: Draft, what: str) -> SendResult:
        """Compose ``draft`` and send it (see :meth:`_send_message`)."""
        sent_at = datetime.now(UTC).replace(microsecond=0)
        try:
            message: EmailMessage = compose(draft, now=sent_at)
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None
        return self._send_message(account, message, envelope_recipients(draft), sent_at, what)

    def _send_message(
        self, account: MailAccount, message: EmailMessage, recipients: Sequence[str], sent_at: datetime,
        what: str,
    ) -> SendResult:
        """Send, then save a copy to Sent when the account's ``save_sent`` is on. The copy is made
        after the server took the message: a failed copy is a warning, never a second send."""
        data = to_bytes(message)
        if len(data) > MAX_MESSAGE_BYTES:
            raise MailInputError(
                f"the message would be {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte cap"
            )
        refused = smtp.send(account, message, recipients)
        warnings = [f"refused by the server: {addr} ({reply})" for addr, reply in refused.items()]
        saved: str | None = None
        if account.save_sent:
            try:
                saved = self._run(
                    account, f"{what} (saving to Sent)",
                    lambda client: imap.save_sent_copy(client, account, data, sent_at), retry=False,
                )
                if saved is None:
                    warnings.append(
                        f"sent, but no Sent folder found (no \\Sent SPECIAL-USE and no "
                        f"{account.folders.sent!r})"
                    )
            except CarrierError as exc:
                warnings.append(f"sent, but the copy was not saved to Sent: {exc}")
            if saved is None:
                log.warning("sent copy not saved", extra={"account": account.name, "what": what,
                                                          "warning": warnings[-1]})
        return SendResult(
            account=account.name,
            message_id=str(message["Message-ID"]),
            sent_at=sent_at.isoformat(),
            recipients=[r for r in recipients if r not in refused],
            saved_to=saved,
            warning="; ".join(warnings) or None,
        )

    def _sender(self, account: MailAccount) -> Address:
        return Address(name=account.display_name, addr=account.address)

    def send(
        self,
        account_name: str | None = None,
        *,
        to: str | Sequence[str],
        subject: str,
        body: str,
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        body_html: str | None = None,
        attachments: Sequence[AttachmentInput] | None = None,
        in_reply_to: str | None = None,
        references: str | Sequence[str] | None = None,
    ) -> SendResult:
        account = self.account(account_name)
        try:
            refs = references.split() if isinstance(references, str) else list(references or ())
            draft = Draft(
                sender=self._sender(account),
                to=parse_recipients(to, "to"),
                cc=parse_recipients(cc, "cc"),
                bcc=parse_recipients(bcc, "bcc"),
                subject=subject,
                body=body,
                body_html=body_html,
                attachments=self._attachments(attachments),
                in_reply_to=check_message_id(in_reply_to, "in_reply_to") if in_reply_to else None,
                references=tuple(check_message_id(r, "references") for r in refs),
            )
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None
        return self._deliver(account, draft, "mail_send")

    def _self_addresses(self, account: MailAccount) -> set[str]:
        mine = {account.address.lower()}
        if "@" in account.username:
            mine.add(account.username.lower())
        return mine

    def reply(
        self,
        account_name: str | None = None,
        *,
        uid: int | str,
        body: str,
        body_html: str | None = None,
        attachments: Sequence[AttachmentInput] | None = None,
        reply_all: bool = False,
        to_override: str | Sequence[str] | None = None,
        folder: str | None = None,
    ) -> SendResult:
        account = self.account(account_name)
        name = self._folder(account, folder)
        number = imap.check_uid(uid)
        try:
            override = parse_recipients(to_override, "to_override") if to_override else ()
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None
        outgoing = self._attachments(attachments)

        def fetch_original(client: IMAPClient) -> Headers:
            imap.select(client, name, readonly=False)  # read-write: the $Answered flag reuses it
            data = client.fetch([number], ["UID", "BODY.PEEK[HEADER]"]).get(number)
            if not data:
                raise MailNotFound(f"no message with uid {number} in folder {name!r}")
            return headers_of(email.message_from_bytes(_header_block(data), policy=compat32))

        original = self._run(account, "mail_reply", fetch_original)
        mine = self._self_addresses(account)
        if override:
            to: tuple[Address, ...] = override
        elif original.from_ and all(a.addr.lower() in mine for a in original.from_):
            # Our own message: answer its recipients.
            to = without(original.to, mine) or tuple(original.from_)
        else:
            answer = original.reply_to or original.from_
            to = without(answer, mine) or tuple(answer)
        cc: tuple[Address, ...] = ()
        if reply_all:
            cc = without([*original.to, *original.cc], mine | {a.addr.lower() for a in to})
        if not to and not cc:
            raise MailError(f"message {number} has no From or Reply-To to answer: pass to_override")
        refs = reply_references(original.references, original.in_reply_to, original.message_id)
        try:
            draft = Draft(
                sender=self._sender(account),
                to=to,
                cc=cc,
                subject=reply_subject(original.subject),
                body=body,
                body_html=body_html,
                attachments=outgoing,
                in_reply_to=original.message_id if _safe_id(original.message_id) else None,
                references=tuple(r for r in refs if _safe_id(r)),
            )
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None
        result = self._deliver(account, draft, "mail_reply")
        self._flag_original(account, name, number, b"\\Answered", "mail_reply")
        return result


    # --- mail_accounts ---

    def accounts(self) -> AccountList:
        default = self.config.default_account.name
        return AccountList(
            accounts=[
                AccountInfo(
                    name=a.name,
                    address=a.address,
                    display_name=a.display_name,
                    default=a.name == default,
                    read_only=a.read_only,
                    save_sent=a.save_sent,
                )
                for a in self.config.accounts
            ]
        )

    # --- shared by the batch tools ---

    def _special(self, client: IMAPClient, account: MailAccount, flag: str, key: str) -> str:
        configured = getattr(account.folders, key)
        target = imap.special_folder(client, flag, configured)
        if target is None:
            raise MailNotFound(
                f"account {account.name} has no {flag} folder: the server marks none with SPECIAL-USE "
                f"and folders.{key} ({configured!r}) does not exist; create it (mail_folder_create) "
                f"or set folders.{key}"
            )
        return target

    @staticmethod
    def _existing(client: IMAPClient, uids: Sequence[int], folder: str) -> list[int]:
        found = client.fetch(list(uids), ["UID"])
        missing = [u for u in uids if u not in found]
        if missing:
            raise MailNotFound(
                f"no message with uid {', '.join(map(str, missing))} in folder {folder!r} "
                "(UIDs come from mail_inbox_list or mail_search): nothing was changed"
            )
        return list(uids)

    def _move_batch(
        self, account: MailAccount, uids: object, folder: str | None, flag: str, key: str, action: str
    ) -> BatchResult:
        name = self._folder(account, folder)
        numbers = imap.check_uids(uids)

        def op(client: IMAPClient) -> BatchResult:
            target = self._special(client, account, flag, key)
            if target == name:
                raise MailInputError(f"the messages are already in {target!r}")
            imap.select(client, name, readonly=False)
            self._existing(client, numbers, name)
            moved = imap.move_messages(client, numbers, target)
            return BatchResult(account=account.name, folder=name, action=action, uids=numbers,
                               moved_to=target, new_uids=moved)

        return self._run(account, f"mail_{action}", op, retry=False)

    # --- mail_archive / mail_delete ---

    def archive(
        self, account_name: str | None = None, *, uids: object, folder: str | None = None
    ) -> BatchResult:
        account = self.account(account_name)
        return self._move_batch(account, uids, folder, "\\Archive", "archive", "archive")

    def delete(
        self,
        account_name: str | None = None,
        *,
        uids: object,
        folder: str | None = None,
        expunge: bool = False,
    ) -> BatchResult:
        """To Trash; ``expunge`` deletes for good. In Trash itself only ``expunge`` is accepted."""
        account = self.account(account_name)
        if not isinstance(expunge, bool):
            raise MailInputError(f"expunge must be true or false, got {expunge!r}")
        if not expunge:
            try:
                return self._move_batch(account, uids, folder, "\\Trash", "trash", "delete")
            except MailInputError as exc:
                if "already in" not in str(exc):
                    raise
                raise MailInputError(
                    f"the messages are already in the Trash folder ({self._folder(account, folder)!r}): "
                    "deleting them there is for good, so pass expunge: true to do it"
                ) from None
        name = self._folder(account, folder)
        numbers = imap.check_uids(uids)

        def op(client: IMAPClient) -> BatchResult:
            imap.select(client, name, readonly=False)
            self._existing(client, numbers, name)
            imap.expunge_uids(client, numbers)
            return BatchResult(
                account=account.name, folder=name, action="delete", uids=numbers, expunged=True
            )

        return self._run(account, "mail_delete", op, retry=False)

    # --- mail_flags ---

    def flags(
        self,
        account_name: str | None = None,
        *,
        uids: object,
        add: Sequence[str] | None = None,
        remove: Sequence[str] | None = None,
        folder: str | None = None,
    ) -> FlagsResult:
        account = self.account(account_name)
        name = self._folder(account, folder)
        numbers = imap.check_uids(uids)
        adding = [imap.check_keyword(f, "add entry") for f in (add or ())]
        removing = [imap.check_keyword(f, "remove entry") for f in (remove or ())]
        if not adding and not removing:
            raise MailInputError("give flags to add and/or remove, e.g. add: [$Important]")
        both = {f.lower() for f in adding} & {f.lower() for f in removing}
        if both:
            raise MailInputError(f"{', '.join(sorted(both))} is both added and removed: choose one")

        def op(client: IMAPClient) -> FlagsResult:
            info = imap.select(client, name, readonly=False)
            permanent = {_flag_text(f).lower() for f in info.get(b"PERMANENTFLAGS", ())}
            keywords = [f for f in adding if not f.startswith("\\")]
            if keywords and "\\*" not in permanent and not {k.lower() for k in keywords} <= permanent:
                raise MailError(
                    f"folder {name!r} does not accept new keywords (PERMANENTFLAGS has no \\*): "
                    f"{', '.join(keywords)} cannot be stored"
                )
            self._existing(client, numbers, name)
            if adding:
                client.add_flags(numbers, [f.encode("ascii") for f in adding], silent=True)
            if removing:
                client.remove_flags(numbers, [f.encode("ascii") for f in removing], silent=True)
            after = client.fetch(numbers, ["FLAGS"])
            return FlagsResult(
                account=account.name,
                folder=name,
                flags={u: _flags(after.get(u, {}).get(b"FLAGS", ())) for u in numbers},
            )

        return self._run(account, "mail_flags", op, retry=False)

    # --- mail_folder_create / _rename / _delete ---

    def folder_create(self, account_name: str | None = None, *, name: str) -> FolderResult:
        account = self.account(account_name)
        wanted = imap.check_new_folder(name, "name")

        def op(client: IMAPClient) -> FolderResult:
            if imap.folder_exists(client, wanted):
                raise MailInputError(f"folder {wanted!r} already exists")
            client.create_folder(wanted)
            with contextlib.suppress(IMAPClient.Error):
                client.subscribe_folder(wanted)
            return FolderResult(account=account.name, action="created", folder=wanted)

        return self._run(account, "mail_folder_create", op, retry=False)

    def folder_rename(self, account_name: str | None = None, *, name: str, new_name: str) -> FolderResult:
        account = self.account(account_name)
        old = imap.check_folder(name, "name")
        if old.upper() == "INBOX":
            raise MailInputError("INBOX cannot be renamed (IMAP would move its messages instead)")
        new = imap.check_new_folder(new_name, "new_name")

        def op(client: IMAPClient) -> FolderResult:
            names = {f.name for f in imap.list_folders(client)}
            if old not in names:
                raise MailNotFound(f"folder {old!r} does not exist (mail_folder_list shows the folders)")
            if new in names:
                raise MailInputError(f"folder {new!r} already exists: choose another new_name")
            imap.forget_selection(client)
            client.rename_folder(old, new)
            return FolderResult(account=account.name, action="renamed", folder=old, new_name=new)

        return self._run(account, "mail_folder_rename", op, retry=False)

    def folder_delete(
        self, account_name: str | None = None, *, name: str, force: bool = False
    ) -> FolderResult:
        account = self.account(account_name)
        target = imap.check_folder(name, "name")
        if target.upper() == "INBOX":
            raise MailInputError("INBOX cannot be deleted")
        if not isinstance(force, bool):
            raise MailInputError(f"force must be true or false, got {force!r}")

        def op(client: IMAPClient) -> FolderResult:
            folders = {f.name: f for f in imap.list_folders(client)}
            if target not in folders:
                raise MailNotFound(f"folder {target!r} does not exist (mail_folder_list shows the folders)")
            count = 0
            if folders[target].selectable:
                count = int(client.folder_status(target, ["MESSAGES"]).get(b"MESSAGES", 0))
            children = [n for n, f in folders.items() if f.delimiter and n.startswith(target + f.delimiter)]
            if (count or children) and not force:
                what = f"{count} message(s)" if count else f"subfolders ({', '.join(children[:5])})"
                raise MailInputError(
                    f"folder {target!r} is not empty ({what}): move them first, or pass force: true "
                    "to delete it with everything in it"
                )
            imap.forget_selection(client)
            client.delete_folder(target)
            return FolderResult(account=account.name, action="deleted", folder=target, messages_deleted=count)

        return self._run(account, "mail_folder_delete", op, retry=False)

    # --- mail_attachment_save ---

    def attachment_save(
        self,
        account_name: str | None = None,
        *,
        uid: int | str,
        attachment_index: int,
        folder: str | None = None,
        save_to: str | None = None,
    ) -> AttachmentContent:
        """mail_attachment_get that always writes the file (to the download directory by default)."""
        return self.attachment_get(
            account_name, uid=uid, attachment_index=attachment_index, folder=folder,
            save_to=save_to if save_to and save_to.strip() else ".",
        )

    # --- mail_forward ---

    def forward(
        self,
        account_name: str | None = None,
        *,
        uid: int | str,
        to: str | Sequence[str],
        body: str = "",
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        attachments: Sequence[AttachmentInput] | None = None,
        include_attachments: bool = True,
        folder: str | None = None,
    ) -> SendResult:
        """Forward a message inline: the note, the original's headers and text, its attachments."""
        account = self.account(account_name)
        name = self._folder(account, folder)
        number = imap.check_uid(uid)
        extra = self._attachments(attachments)
        try:
            recipients = (
                parse_recipients(to, "to"), parse_recipients(cc, "cc"), parse_recipients(bcc, "bcc")
            )
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None

        def op(client: IMAPClient) -> tuple[Headers, str, list[OutgoingAttachment]]:
            # Read-write (BODY.PEEK sets no flag): _flag_original then reuses this SELECT on the
            # pooled connection instead of opening the folder a second time (~20 ms on 10k mails).
            imap.select(client, name, readonly=False)
            items = ["UID", "RFC822.SIZE", "BODYSTRUCTURE", "BODY.PEEK[HEADER]"]
            data = client.fetch([number], items).get(number)
            if not data:
                raise MailNotFound(f"no message with uid {number} in folder {name!r} (see mail_inbox_list)")
            if int(data.get(b"RFC822.SIZE") or 0) > MAX_MESSAGE_BYTES:
                raise MailError(f"message {number} is over the {MAX_MESSAGE_BYTES} byte cap to forward")
            headers = headers_of(email.message_from_bytes(_header_block(data), policy=compat32))
            layout = classify(imap.structure_leaves(data[b"BODYSTRUCTURE"]))
            text = _read_parts(client, number, layout.text or layout.html, html_as_text=True)
            carried: list[OutgoingAttachment] = []
            if include_attachments and layout.attachments:
                wanted = [f"BODY.PEEK[{leaf.number}]" for leaf in layout.attachments]
                got = client.fetch([number], wanted).get(number, {})
                for leaf in layout.attachments:
                    raw = got.get(f"BODY[{leaf.number}]".encode()) or b""
                    carried.append(OutgoingAttachment(
                        filename=files.safe_filename(attachment_name(leaf)),
                        content=decode_transfer(raw, leaf.encoding), mime_type=leaf.mime_type,
                    ))
            return headers, text, carried

        original, text, carried = self._run(account, "mail_forward", op)
        quoted = "\n".join(
            [
                "---------- Forwarded message ----------",
                f"From: {_addresses(original.from_)}",
                f"Date: {original.date or ''}",
                f"Subject: {original.subject}",
                f"To: {_addresses(original.to)}",
                *([f"Cc: {_addresses(original.cc)}"] if original.cc else []),
                "",
                text,
            ]
        )
        subject = " ".join(original.subject.split())
        if not re.match(r"(?i)^\s*(fwd?|wg|tr)\s*:", subject):
            subject = f"Fwd: {subject}" if subject else "Fwd:"
        refs = reply_references(original.references, original.in_reply_to, original.message_id)
        total = sum(len(a.content) for a in (*carried, *extra))
        if total > MAX_MESSAGE_BYTES:
            raise MailInputError(f"the attachments add up to over {MAX_MESSAGE_BYTES} bytes: "
                                 "pass include_attachments: false or fewer extra attachments")
        try:
            draft = Draft(
                sender=self._sender(account),
                to=recipients[0],
                cc=recipients[1],
                bcc=recipients[2],
                subject=subject,
                body=(body.rstrip() + "\n\n" if body.strip() else "") + quoted,
                attachments=(*carried, *extra),
                references=tuple(r for r in refs if _safe_id(r)),
            )
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None
        result = self._deliver(account, draft, "mail_forward")
        self._flag_original(account, name, number, b"$Forwarded", "mail_forward")
        return result

    def _flag_original(self, account: MailAccount, folder: str, uid: int, flag: bytes, tool: str) -> None:
        """Flag the mail that was answered or forwarded; the mail already went out, so a failure is
        only logged (the flag is a nicety, never a reason to send again)."""

        def add(client: IMAPClient) -> None:
            imap.select(client, folder, readonly=False)
            client.add_flags([uid], [flag], silent=True)

        try:
            self._run(account, f"{tool} (flag {flag.decode()})", add, retry=False)
        except CarrierError as exc:
            log.info("could not flag the original mail", extra={"error": str(exc), "flag": flag.decode()})

    # --- mail_draft_save / mail_draft_send ---

    def draft_save(
        self,
        account_name: str | None = None,
        *,
        to: str | Sequence[str],
        subject: str,
        body: str,
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        body_html: str | None = None,
        attachments: Sequence[AttachmentInput] | None = None,
        replace_uid: int | str | None = None,
    ) -> DraftResult:
        """APPEND a composed message to Drafts (\\Draft, \\Seen); ``replace_uid`` removes the old draft."""
        account = self.account(account_name)
        old = imap.check_uid(replace_uid, "replace_uid") if replace_uid is not None else None
        try:
            draft = Draft(
                sender=self._sender(account),
                to=parse_recipients(to, "to"),
                cc=parse_recipients(cc, "cc"),
                bcc=parse_recipients(bcc, "bcc"),
                subject=subject,
                body=body,
                body_html=body_html,
                attachments=self._attachments(attachments),
            )
            message = compose(draft, now=datetime.now(UTC).replace(microsecond=0))
        except ComposeError as exc:
            raise MailInputError(str(exc)) from None
        data = to_bytes(message)
        if len(data) > MAX_MESSAGE_BYTES:
            raise MailInputError(
                f"the draft would be {len(data)} bytes, over the {MAX_MESSAGE_BYTES}-byte cap"
            )

        def op(client: IMAPClient) -> DraftResult:
            drafts = self._special(client, account, "\\Drafts", "drafts")
            if old is not None:
                imap.select(client, drafts, readonly=True)
                self._existing(client, [old], drafts)
            response = client.append(drafts, data, flags=[b"\\Draft", b"\\Seen"])
            if old is not None:
                imap.select(client, drafts, readonly=False)
                imap.expunge_uids(client, [old])
            return DraftResult(account=account.name, folder=drafts, uid=imap.appended_uid(response),
                               message_id=str(message["Message-ID"]), replaced_uid=old)

        return self._run(account, "mail_draft_save", op, retry=False)

    def draft_send(self, account_name: str | None = None, *, uid: int | str) -> SendResult:
        """Send a message saved in Drafts as it is there (Date renewed), then remove the draft."""
        account = self.account(account_name)
        number = imap.check_uid(uid)

        def fetch(client: IMAPClient) -> tuple[str, bytes]:
            drafts = self._special(client, account, "\\Drafts", "drafts")
            imap.select(client, drafts, readonly=True)
            data = client.fetch([number], ["RFC822.SIZE", "BODY.PEEK[]"]).get(number)
            if not data:
                raise MailNotFound(
                    f"no draft with uid {number} in {drafts!r} (mail_draft_save gives the uid; "
                    f"mail_inbox_list folder={drafts!r} lists them)"
                )
            if int(data.get(b"RFC822.SIZE") or 0) > MAX_MESSAGE_BYTES:
                raise MailError(f"draft {number} is over the {MAX_MESSAGE_BYTES}-byte cap")
            return drafts, data.get(b"BODY[]") or b""

        drafts, raw = self._run(account, "mail_draft_send", fetch)
        message = email.message_from_bytes(raw, _class=EmailMessage, policy=POLICY)
        assert isinstance(message, EmailMessage)
        try:
            recipients: list[str] = []
            for field in ("To", "Cc", "Bcc"):
                values = [str(v) for v in message.get_all(field, [])]
                recipients += [a.addr for a in parse_recipients(values, field.lower())]
            if not recipients:
                raise ComposeError(f"draft {number} has no To, Cc or Bcc: save it again with recipients")
            sent_at = datetime.now(UTC).replace(microsecond=0)
            del message["Date"]
            message["Date"] = format_datetime(sent_at, usegmt=True)
            if not message.get("Message-ID"):
                message["Message-ID"] = new_message_id(account.address)
            del message["From"]
            message["From"] = formataddr((account.display_name, account.address))
            check_headers(message)
        except (ComposeError, ValueError) as exc:
            raise MailInputError(f"draft {number} cannot be sent: {exc}") from None
        result = self._send_message(
            account, message, list(dict.fromkeys(recipients)), sent_at, "mail_draft_send"
        )

        def remove(client: IMAPClient) -> None:
            imap.select(client, drafts, readonly=False)
            imap.expunge_uids(client, [number])

        try:
            self._run(account, "mail_draft_send (removing the draft)", remove, retry=False)
        except CarrierError as exc:
            note = f"sent, but draft {number} is still in {drafts!r}: {exc}"
            warning = f"{result.warning}; {note}" if result.warning else note
            return result.model_copy(update={"warning": warning})
        return result

def _or_tree(terms: Sequence[str]) -> str:
    """``OR`` over ``terms`` as a balanced tree, so nesting stays shallow (log2 of the count)."""
    if len(terms) == 1:
        return terms[0]
    middle = len(terms) // 2
    return f"OR ({_or_tree(terms[:middle])}) ({_or_tree(terms[middle:])})"


def _safe_id(value: str) -> bool:
    try:
        check_message_id(value, "reference")
    except ComposeError:
        return False
    return True


def _sort_date(value: str | None) -> datetime:
    if value:
        try:
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.min.replace(tzinfo=UTC)
