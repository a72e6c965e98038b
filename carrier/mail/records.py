"""The typed results of the mail layer: what the ``mail_*`` tools return, field names stable.

They are frozen pydantic models (not plain dataclasses) for one reason: the JSON key ``from`` is a
Python keyword, so the attribute is ``from_`` and the key an alias, and the MCP server derives each
tool's output schema from these models.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True)


class Address(BaseModel):
    """One mailbox: display name (may be empty) and address."""

    model_config = _FROZEN
    name: str = ""
    addr: str


class AttachmentInfo(BaseModel):
    """An attachment, described without its content; ``index`` is what mail_attachment_get takes."""

    model_config = _FROZEN
    index: int
    filename: str
    mime_type: str
    size: int = Field(description="size in bytes as stored (encoded); the decoded size is a little smaller")


class MessageSummary(BaseModel):
    """One line of a listing: enough to choose a message, nothing that needs its body."""

    model_config = _FROZEN
    uid: int
    message_id: str
    subject: str
    from_: list[Address] = Field(validation_alias="from", serialization_alias="from")
    to: list[Address]
    cc: list[Address] = Field(default_factory=list)
    date: str | None = Field(description="the Date header as ISO 8601, or None when missing/unreadable")
    flags: list[str]
    unread: bool
    size: int
    has_attachments: bool = False


class MessagePage(BaseModel):
    """A page of messages, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    model_config = _FROZEN
    account: str
    folder: str
    total: int = Field(description="messages matching the listing's filters, all pages together")
    messages: list[MessageSummary]
    next_cursor: str | None


class MessageContent(BaseModel):
    """One message read for a person or an agent. Everything in it was written by the sender."""

    model_config = _FROZEN
    account: str
    folder: str
    uid: int
    message_id: str
    subject: str
    from_: list[Address] = Field(validation_alias="from", serialization_alias="from")
    to: list[Address]
    cc: list[Address]
    reply_to: list[Address]
    date: str | None
    in_reply_to: str | None
    references: list[str]
    flags: list[str]
    size: int
    format: str
    body: str = Field(description="the requested window of the body (text, html or raw_eml)")
    body_chars: int = Field(description="length of the whole body in characters")
    offset: int
    truncated: bool = Field(description="true when the body goes on after this window (read on at offset)")
    attachments: list[AttachmentInfo]


class FolderInfo(BaseModel):
    model_config = _FROZEN
    name: str
    delimiter: str | None
    attributes: list[str]
    selectable: bool
    special_use: str | None = Field(default=None, description="RFC 6154 role such as \\Sent, if any")


class FolderList(BaseModel):
    model_config = _FROZEN
    account: str
    folders: list[FolderInfo]


class SearchResult(BaseModel):
    model_config = _FROZEN
    account: str
    folder: str
    criteria: str = Field(description="the IMAP SEARCH criteria that ran")
    total: int
    messages: list[MessageSummary]


class ThreadResult(BaseModel):
    model_config = _FROZEN
    account: str
    folder: str
    root_message_id: str
    messages: list[MessageSummary] = Field(description="oldest first")


class SendResult(BaseModel):
    model_config = _FROZEN
    account: str
    message_id: str
    sent_at: str = Field(description="UTC, ISO 8601")
    recipients: list[str]
    saved_to: str | None = Field(description="the folder the sent copy went to, or None if none was saved")
    warning: str | None = None


class MoveResult(BaseModel):
    model_config = _FROZEN
    account: str
    uid: int
    from_folder: str
    to_folder: str
    new_uid: int | None = Field(description="the message's UID in to_folder when the server says (UIDPLUS)")
    method: str = Field(description="MOVE, or COPY+EXPUNGE when the server lacks MOVE")


class MarkResult(BaseModel):
    model_config = _FROZEN
    account: str
    uid: int
    folder: str
    action: str
    flags: list[str] = Field(description="the flags after the change (empty when the message was moved)")
    moved_to: str | None = None
    new_uid: int | None = None


class AttachmentContent(BaseModel):
    model_config = _FROZEN
    account: str
    uid: int
    index: int
    filename: str
    mime_type: str
    size: int = Field(description="decoded size in bytes")
    content_base64: str | None = Field(description="the content, when save_to was not given")
    saved_to: str | None = Field(description="the absolute path written, when save_to was given")


class AccountInfo(BaseModel):
    """A configured mail account as the tools see it (never its credentials)."""

    model_config = _FROZEN
    name: str
    address: str
    display_name: str
    default: bool = Field(description="the account tools use when none is named")
    read_only: bool = Field(description="true: tools that send or change mail are refused")
    save_sent: bool = Field(description="a copy of sent mail goes to the Sent folder")


class AccountList(BaseModel):
    model_config = _FROZEN
    accounts: list[AccountInfo]


class DraftResult(BaseModel):
    model_config = _FROZEN
    account: str
    folder: str = Field(description="the Drafts folder it was saved to")
    uid: int | None = Field(description="its UID there (pass it to mail_draft_send), when the server says")
    message_id: str
    replaced_uid: int | None = Field(default=None, description="the earlier draft removed, if any")


class BatchResult(BaseModel):
    """What a tool that acts on several messages did to each."""

    model_config = _FROZEN
    account: str
    folder: str
    action: str
    uids: list[int] = Field(description="the messages acted on")
    moved_to: str | None = Field(default=None, description="the folder they went to, when moved")
    new_uids: dict[int, int | None] = Field(
        default_factory=dict, description="their UIDs in moved_to, when the server says (UIDPLUS)"
    )
    expunged: bool = Field(default=False, description="true: deleted for good")


class FlagsResult(BaseModel):
    model_config = _FROZEN
    account: str
    folder: str
    flags: dict[int, list[str]] = Field(description="each message's flags after the change, by UID")


class FolderResult(BaseModel):
    model_config = _FROZEN
    account: str
    action: str = Field(description="created, renamed or deleted")
    folder: str
    new_name: str | None = None
    messages_deleted: int = Field(default=0, description="messages that went with a forced delete")
