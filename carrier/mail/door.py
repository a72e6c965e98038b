"""The email door's handler: one raw mail in, commands run through policy and the job manager,
replies queued in the outbox. Plain code with no IMAP (``carrier.mail.gateway`` feeds it).

Exactly-once, step by step (all state in the store):

1. ``claim_message`` records the mail before anything runs; a lease (``mail_leases``) makes sure
   only one Carrier process works on it; a crashed process's lease expires and another resumes.
2. Each command is a *step*: a job is submitted in the same transaction that records the step
   (and the job's "result mail owed" row), so after a crash a recorded step is never run again
   and an unrecorded one never ran.
3. The reply is queued in the outbox in the same transaction that marks the mail done.
4. ``Notifier`` queues one result mail per job (Message-ID derived from the job id, so queuing it
   twice is a no-op) and at most one progress mail per interval while it runs.

No backscatter: auto-replies, bounces and list mail are never answered; an unknown sender gets
an answer only to ``enroll``/``confirm``; the subject is never read for commands.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from carrier.auth.enrollment import Outcome as EnrollOutcome
from carrier.auth.errors import AuthError, RateLimited, VerificationError
from carrier.auth.mailauth import sender_of
from carrier.auth.pgp import parse_clearsigned
from carrier.auth.policy import Decision, Identity, Request
from carrier.auth.ratelimit import identity_key
from carrier.auth.service import Trust
from carrier.config import Config, MailAccount
from carrier.errors import CarrierError
from carrier.jobs.manager import JobView
from carrier.jobs.render import job_text, jobs_table
from carrier.jobs.system import JobSystem
from carrier.mail import crypto, lease, replies
from carrier.mail.commands import (
    EXAMPLES,
    GRAMMAR,
    Command,
    CommandError,
    ParseResult,
    first_verb,
    is_free_text,
    parse_commands,
)
from carrier.mail.compose import sender_domain
from carrier.mail.outbox import Outbox
from carrier.mail.parse import Headers, parse_headers, parse_message
from carrier.mail.replies import ReplyBody, Section, Thread
from carrier.ops import Denied, Ops, Planned
from carrier.ops.schedules import ScheduleOps
from carrier.store import Store, approvals
from carrier.store import gateway as sql
from carrier.store import settings as user_settings

log = logging.getLogger(__name__)

LEASE_SECONDS = lease.MAIL_LEASE_TTL
_AUTO_PRECEDENCE = ("bulk", "junk", "list", "auto_reply")
_ROBOT_LOCALS = ("mailer-daemon", "postmaster", "noreply", "no-reply")
#: Shown to an enrolled sender whose mail failed authentication (short and non-revealing).
_REFUSALS = {
    "unsigned": "Carrier runs only commands signed with your enrolled key: sign the mail (PGP/MIME or "
    "clear-signed) and send it again.",
    "stale": "The signature is too old: sign the command again and send it now.",
    "future": "The signature time lies in the future: check your computer's clock.",
    "replay": "This signed command was already used: sign it again to run it again.",
    "malformed": "Carrier could not read the signed text of this mail (broken MIME or an unknown "
    "charset): send the commands as plain text (UTF-8), signed.",
    "undecryptable": "Carrier could not decrypt this mail: encrypt it (PGP/MIME) to the key this reply "
    "is signed with, or send the command signed only.",
}
#: An encrypted mail without a signature inside (encryption never stands in for a signature).
_SEALED_UNSIGNED = ("This mail was encrypted but not signed, so nothing ran: Carrier runs only commands "
                    "signed with your enrolled key. Sign and encrypt it, and send it again.")
_REFUSED_DEFAULT = "Carrier could not accept the signature of this mail: sign it with your enrolled key."


def owner_token() -> str:
    """This process's lease owner name (``carrier.mail.lease.owner_token``)."""
    return lease.owner_token()


def owner_alive(owner: str) -> bool:
    """Whether the process named in a lease owner still runs (``carrier.mail.lease.owner_alive``)."""
    return lease.owner_alive(owner)


def robot_reason(raw_headers: Headers, head: Any, own_addresses: Sequence[str]) -> str | None:
    """Why a mail must never be answered (auto-reply, bounce, list, our own), or None."""
    auto = str(head.get("Auto-Submitted") or "").strip().lower()
    if auto and auto != "no":
        return "auto-submitted"
    if str(head.get("Precedence") or "").strip().lower() in _AUTO_PRECEDENCE:
        return "precedence"
    if head.get("List-Id") or head.get("List-Unsubscribe"):
        return "list"
    if str(head.get("Return-Path") or "").strip() == "<>":
        return "null sender"
    if str(head.get("X-Autoreply") or head.get("X-Autorespond") or "").strip():
        return "auto-reply"
    froms = raw_headers.from_
    if froms:
        addr = froms[0].addr.lower()
        if addr in own_addresses:
            return "own mail"
        if addr.partition("@")[0] in _ROBOT_LOCALS:
            return "robot sender"
    return None


@dataclass
class StepResult:
    section: Section
    job_id: str | None = None
    #: Extra mails to queue with the step: (to, subject, text, encrypt_to).
    notices: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    #: The step was already recorded (with its job, in the job's transaction).
    recorded: bool = False


class MailDoor:
    """Processes command mails for one configuration (all accounts)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        trust: Trust,
        jobs: JobSystem,
        outbox: Outbox,
        *,
        max_commands: int | None = None,
        proposer: Any | None = None,
        owner: str | None = None,
        ops: Ops | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.trust = trust
        #: Read by the result notifier only (job views and events of the jobs this door started).
        self.jobs = jobs
        #: Every command of a mail is one call here: decide, audit, run.
        self.ops = ops or Ops(config, store, trust.policy, trust.audit, jobs, trust=trust)
        self.outbox = outbox
        self.max_commands = config.mail.max_commands if max_commands is None else max_commands
        self.proposer = proposer
        self.owner = owner or owner_token()
        self._signer: str | None = None
        self._lock = threading.Lock()
        attach = getattr(proposer, "attach", None)
        if attach is not None:
            attach(self.llm_context, self.check_proposal)

    # ----------------------------------------------------------------- helpers

    def signer(self, account: MailAccount) -> str:
        with self._lock:
            if self._signer is None:
                fpr = self.trust.keyring.secret_fingerprint(account.address)
                if fpr is None:
                    raise AuthError(
                        f"no secret key for {account.address} in {self.config.gnupg_home}: "
                        "Carrier signs every reply",
                        reason="setup",
                    )
                self._signer = fpr
            return self._signer

    def reply_crypto(
        self, name: str, fingerprint: str | None, incoming_encrypted: bool
    ) -> crypto.ReplyCrypto:
        """How a reply to the user ``name`` goes out (their ``encrypt`` setting, their key)."""
        mode = user_settings.get_settings(self.store, name).encrypt
        how = crypto.reply_crypto(self.trust.keyring, fingerprint, mode, incoming_encrypted,
                                  self.store.clock())
        if how.withheld:
            log.warning("reply withheld: encryption wanted but the key cannot encrypt",
                        extra={"identity": name, "fingerprint": fingerprint or "", "encrypt": mode})
        return how

    @staticmethod
    def job_mail_body(how: crypto.ReplyCrypto, view: JobView, body: ReplyBody) -> ReplyBody:
        """A job's result or progress mail ``body``, or its withheld stand-in (:mod:`carrier.mail.crypto`)."""
        if how.withheld:
            return replies.render_sections(crypto.withheld_result(how.withheld, view))
        return body

    def _own(self) -> list[str]:
        return [a.address.lower() for a in self.config.accounts]

    def _mail(
        self,
        account: MailAccount,
        thread: Thread,
        body: ReplyBody,
        *,
        message_id: str | None = None,
        encrypt_to: str | None = None,
        subject: str | None = None,
    ) -> tuple[str, bytes]:
        return replies.build_reply(
            self.trust.keyring,
            self.signer(account),
            account,
            thread,
            body,
            message_id=message_id,
            encrypt_to=encrypt_to,
            subject=subject,
        )

    def _queue_notice(
        self, account: MailAccount, to: str, subject: str, text: str, encrypt_to: str | None, key: str
    ) -> None:
        body = replies.render_sections([Section("", "ok", text)])
        thread = Thread(to, subject, None, ())
        msg_id = f"<notice.{key}@{sender_domain(account.address)}>"
        msg_id, raw = self._mail(account, thread, body, message_id=msg_id, encrypt_to=encrypt_to)
        self.outbox.queue(account.name, msg_id, [to], raw)

    # ----------------------------------------------------------------- one mail

    def process(self, account: MailAccount, key: str, raw: bytes) -> str:
        """Handle one mail (``key``: its store key); return what happened (for logs and tests)."""
        self.store.claim_message(account.name, key)
        record = self.store.get_message(account.name, key)
        if record is None or record.state in ("done", "failed"):
            return "already"
        if not sql.acquire_lease(self.store, account.name, key, self.owner, LEASE_SECONDS):
            holder = sql.lease_owner(self.store, account.name, key)
            # A Carrier killed while holding it: its lease need not run out first.
            if (
                holder is None
                or owner_alive(holder)
                or not sql.take_over_lease(self.store, account.name, key, holder, self.owner, LEASE_SECONDS)
            ):
                return "busy"
        try:
            renew = functools.partial(sql.renew_lease, self.store, account.name, key, self.owner,
                                      LEASE_SECONDS)
            with lease.Renewer(renew, what=f"{account.name}:{key}"):
                return self._process(account, key, raw, record.received_at)
        finally:
            sql.release_lease(self.store, account.name, key, self.owner)

    def _finish(
        self,
        account: MailAccount,
        key: str,
        *,
        ok: bool,
        error: str | None = None,
        reply: tuple[str, bytes, str] | None = None,
    ) -> None:
        with self.store.transaction():
            if reply is not None:
                msg_id, raw, to = reply
                self.store.outbox_put(account.name, msg_id, [to], raw)
            self.store.finish_message(account.name, key, ok=ok, error=error)
        if reply is not None:
            self.outbox.wake.set()

    def drop(self, account: MailAccount, key: str, reason: str) -> str:
        """Record a mail as handled without any answer."""
        self.store.claim_message(account.name, key)
        self.store.finish_message(account.name, key, ok=False, error=reason)
        log.info("mail dropped", extra={"account": account.name, "key": key, "reason": reason})
        return f"dropped: {reason}"

    def _process(self, account: MailAccount, key: str, raw: bytes, received_at: float) -> str:
        import email
        from email.policy import compat32

        head = email.message_from_bytes(
            raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0] + b"\r\n\r\n", policy=compat32
        )
        headers = parse_headers(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        robot = robot_reason(headers, head, self._own())
        if robot is not None:
            self.store.finish_message(account.name, key, ok=False, error=robot)
            return f"dropped: {robot}"
        try:
            sender = sender_of(raw)
        except VerificationError:
            self.store.finish_message(account.name, key, ok=False, error="no usable From")
            return "dropped: no usable From"
        try:
            self.trust.limiter.check(identity_key(sender))
        except RateLimited:
            self.store.finish_message(account.name, key, ok=False, error="rate limited")
            return "dropped: rate limited"
        thread = replies.thread_of(headers, sender)
        message_key = f"{account.name}:{key}"
        try:
            auth = self.trust.mailauth.authenticate(raw, message_key=message_key, received_at=received_at)
        except VerificationError as exc:
            if exc.reason == "not_enrolled":
                return self._unenrolled(account, key, raw, sender, thread, message_key, received_at)
            log.info("mail refused", extra={"account": account.name, "sender": sender, "reason": exc.reason})
            sealed = head.get_content_type() == "multipart/encrypted"
            why = _SEALED_UNSIGNED if sealed and exc.reason == "unsigned" else _REFUSALS.get(
                exc.reason, _REFUSED_DEFAULT)
            body = replies.render_sections([Section("", "denied", why)])
            msg_id, out = self._mail(account, thread, body)
            self._finish(account, key, ok=False, error=exc.reason, reply=(msg_id, out, sender))
            return f"refused: {exc.reason}"
        identity = auth.identity
        encrypted = auth.signature.encrypted
        self.store.mark_message_processing(account.name, key)
        parsed = parse_commands(auth.signature.text, max_commands=self.max_commands)
        sections: list[Section] = []
        if parsed.too_many is not None:
            sections.append(
                Section(
                    "",
                    "error",
                    f"this mail has {parsed.too_many} command lines; at most "
                    f"{self.max_commands} are run per mail, so nothing ran. Send fewer.",
                    example="run ping on web1",
                )
            )
        elif parsed.empty or (
            self.proposer is not None and not parsed.commands and is_free_text(auth.signature.text)
        ):
            sections.append(self._free_text(account, key, identity, auth.signature.text))
        else:
            sections.extend(self._commands(account, key, parsed, identity, thread,
                                           _Signed(raw, message_key, received_at,
                                                   auth.signature.digest, encrypted)))
        # Read after the commands ran: the reply to `settings encrypt on` is encrypted already.
        how = self.reply_crypto(identity.name, identity.fingerprint, encrypted)
        if how.withheld:
            sections = crypto.withheld_sections(how.withheld, sections)
        body = replies.render_sections(sections, footer=f"{identity.name} ({identity.role})")
        msg_id, out = self._mail(account, thread, body, encrypt_to=how.key)
        self._finish(account, key, ok=True, reply=(msg_id, out, sender))
        return "answered"

    # ----------------------------------------------------------------- unenrolled senders

    def _unenrolled(
        self,
        account: MailAccount,
        key: str,
        raw: bytes,
        sender: str,
        thread: Thread,
        message_key: str,
        received_at: float,
    ) -> str:
        parsed = parse_message(raw)
        text = parsed.best_text()
        with contextlib.suppress(VerificationError):
            # A clear-signed reply is routed by its signed text (the armor line comes first);
            # respond() still verifies the signature.
            text = b"\n".join(parse_clearsigned(text.encode()).lines).decode(errors="replace")
        verb = first_verb(text)
        outcome: EnrollOutcome
        if verb == "enroll":
            keys = [
                parsed.attachment(i)
                for i, a in enumerate(parsed.attachments)
                if a.mime_type == "application/pgp-keys"
            ][:3]
            outcome = self.trust.enrollment.request(sender, attached=keys)
        elif verb == "confirm":
            try:
                outcome = self.trust.enrollment.respond(raw, message_key=message_key, received_at=received_at)
            except VerificationError as exc:
                self.store.finish_message(account.name, key, ok=False, error=f"confirm: {exc.reason}")
                return f"dropped: confirm {exc.reason}"
        else:
            # No backscatter: an unknown sender gets nothing.
            self.store.finish_message(account.name, key, ok=False, error="not enrolled")
            return "dropped: not enrolled"
        if not outcome.answer:
            # No key for the address, or over the enrollment limit: answering would reflect mail to
            # whatever From says (the reason is in the log and the audit).
            self.store.finish_message(account.name, key, ok=False, error=f"{verb}: {outcome.status}")
            return f"dropped: {verb} {outcome.status}"
        for n, notice in enumerate(outcome.notices):
            self._queue_notice(account, notice.to, notice.subject, notice.text, None, f"{key_hash(key)}.{n}")
        body = replies.render_sections([Section("", "ok", outcome.reply)])
        msg_id, out = self._mail(account, thread, body, encrypt_to=outcome.encrypt_to)
        self._finish(account, key, ok=True, reply=(msg_id, out, sender))
        return f"enrollment: {outcome.status}"

    # ----------------------------------------------------------------- commands

    def _free_text(self, account: MailAccount, key: str, identity: Identity, text: str) -> Section:
        if self.proposer is not None and text.strip():
            try:
                return self.proposer.propose(identity, text)  # type: ignore[no-any-return]
            except CarrierError as exc:
                return Section(
                    "",
                    "error",
                    f"the assistant could not propose a command: {exc}",
                    example="run ping on web1",
                )
        if not text.strip():
            # e.g. an HTML-only mail: commands are read from the signed text/plain part only.
            return Section(
                "",
                "error",
                "the signed part of this mail has no plain text (an HTML-only mail?): Carrier reads "
                "commands from text/plain only; send plain text, signed",
                example="run ping on web1",
            )
        return Section(
            "",
            "error",
            "no command found in the signed text: write one command per line (`help` lists them)",
            example="run ping on web1",
        )

    def _plan(self, cmd: Command, identity: Identity, signed: _Signed) -> _JobStep | _ReadStep:
        """Decide one understood line through the operations layer (nothing runs yet)."""
        handler = VERBS.get(cmd.verb)
        if handler is None:
            raise CarrierError(f"`{cmd.verb}` is not handled by this Carrier")
        return handler(self, cmd, identity, signed)

    def _run_step(self, account: MailAccount, key: str, idx: int, cmd: Command,
                  planned: _JobStep | _ReadStep, thread: Thread, identity: Identity,
                  signed: _Signed) -> Section:
        """Run one decided line and record it (with its job, in the job's own transaction)."""
        if isinstance(planned, _JobStep):
            reply = {"account": account.name, "thread": thread.to_dict(), "owner": identity.name,
                     "key": identity.fingerprint, "encrypted": signed.encrypted}
            holder: list[Section] = []

            def within(view: JobView) -> None:
                section = Section(cmd.line, "accepted", planned.text(view), job=view.id)
                holder.append(section)
                sql.watch_job(self.store, view.id, account.name, key, reply)
                sql.record_step(self.store, account.name, key, idx, section.to_dict(), view.id)

            try:
                view = planned.planned.run(within)
            except CarrierError as exc:
                section = Section(cmd.line, "error", str(exc))
                sql.record_step(self.store, account.name, key, idx, section.to_dict())
                return section
            section = holder[0]
            if planned.after is not None:
                block = planned.after(view)  # e.g. a terminal's first screen, once it settled
                if block:
                    section = replace(section, block=block)
            return section
        try:
            result = planned.planned.run()
        except CarrierError as exc:
            result = StepResult(Section(cmd.line, "error", str(exc)))
        with self.store.transaction():
            for n, (to, subject, text, encrypt_to) in enumerate(result.notices):
                self._queue_notice(account, to, subject, text, encrypt_to, f"{key_hash(key)}.{idx}.{n}")
            sql.record_step(self.store, account.name, key, idx, result.section.to_dict(), result.job_id)
        return result.section

    def _commands(self, account: MailAccount, key: str, parsed: ParseResult, identity: Identity,
                  thread: Thread, signed: _Signed) -> list[Section]:
        """A mail is one request: every line is decided first; if any is not understood or not
        allowed, nothing in the mail runs and the reply gives every line's reason."""
        done = sql.steps_of(self.store, account.name, key)
        plans: dict[int, _JobStep | _ReadStep] = {}
        sections: dict[int, Section] = {}
        for idx, entry in enumerate(parsed.entries):
            if idx in done:
                sections[idx] = Section.from_dict(done[idx].section)
            elif isinstance(entry, CommandError):
                sections[idx] = Section(entry.line, "error", entry.message, example=entry.example)
            else:
                try:
                    plans[idx] = self._plan(entry, identity, signed)
                except CarrierError as exc:
                    sections[idx] = Section(entry.line, "error" if not isinstance(exc, Denied) else "denied",
                                            str(exc), example=_example_for(entry, exc))
        refused = [i for i in sections if i not in done]
        if refused and not done:
            for idx, entry in enumerate(parsed.entries):
                if idx in plans:
                    sections[idx] = Section(entry.line, "skipped", "not run: this mail is one request, and "
                                            f"line {refused[0] + 1} was refused; fix it and send the whole "
                                            "mail again (signed anew)")
            return [sections[i] for i in range(len(parsed.entries))]
        for idx, entry in enumerate(parsed.entries):
            if idx in plans:
                assert isinstance(entry, Command)
                sections[idx] = self._run_step(account, key, idx, entry, plans[idx], thread, identity, signed)
        return [sections[i] for i in range(len(parsed.entries))]

    def _playbooks_for(self, identity: Identity) -> list[str]:
        return [f"{info.name:<20} {info.description}" for info in self.ops.playbooks(identity)]

    def llm_context(self, identity: Identity) -> str:
        """What the LLM is told besides the grammar: the playbooks this user may run (with their
        variables) and the inventory groups. No secrets, no host variables."""
        books = []
        for info in self.ops.playbooks(identity):
            names = sorted(info.vars)
            extra = f" (variables: {', '.join(names)})" if names else ""
            books.append(f"- {info.name:<20} {info.description}".rstrip() + extra)
        groups = self.ops.groups(identity)
        group_lines = [f"- {g}: {', '.join(h)}" for g, h in sorted(groups.items()) if g != "ungrouped"]
        return (
            "Playbooks this user may run:\n"
            + ("\n".join(books) or "(none)")
            + "\nInventory groups and their hosts:\n"
            + ("\n".join(group_lines) or "(none)")
        )

    def check_proposal(self, identity: Identity, cmd: Command) -> None:
        """Whether ``identity`` may run ``cmd`` now (decided and audited; nothing is started).
        Raises CarrierError with the reason."""
        if cmd.verb not in PROPOSABLE:
            raise AuthError(f"`{cmd.verb}` is never proposed")
        self._plan(cmd, identity, _Signed(b"", "", 0.0))


# --------------------------------------------------------------------------- the verbs


@dataclass(frozen=True)
class _Signed:
    """The signed mail a command came in (for verbs that verify it again: confirm)."""

    raw: bytes
    message_key: str
    received_at: float
    #: The verified signature's digest (signer, time, signed bytes): what an approval records.
    digest: str = ""
    #: The mail came encrypted (``encrypt: auto`` answers it, and its jobs' results, encrypted).
    encrypted: bool = False


@dataclass(frozen=True)
class _JobStep:
    """A decided line that starts a job (recorded in the job's transaction)."""

    planned: Planned[JobView]
    text: Callable[[JobView], str]
    #: A block to show once it started (a terminal's screen), or None.
    after: Callable[[JobView], str | None] | None = None


@dataclass(frozen=True)
class _ReadStep:
    planned: Planned[StepResult]


def _read(planned: Planned[Any], fn: Callable[[Any], StepResult]) -> _ReadStep:
    return _ReadStep(planned.then(fn))


def _now(result: StepResult) -> _ReadStep:
    """A line whose answer needs no decision (help)."""
    return _ReadStep(Planned(Request("inventory"), Decision(True, "no decision"), lambda _: result))


def _example_for(cmd: Command, exc: CarrierError) -> str | None:
    return None if isinstance(exc, Denied) else EXAMPLES.get(cmd.verb)


def _verb_run(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.playbook is not None
    planned = door.ops.plan_playbook(who, cmd.playbook, limit=cmd.pattern, extra_vars=dict(cmd.extra_vars),
                                     check=cmd.check, diff=cmd.diff, tags=cmd.tags)
    names = ", ".join(h.name for h in planned.request.hosts)
    book = planned.request.playbook
    def said(view: JobView) -> str:
        approval = view.approval
        if approval is not None and approval.get("state") == "pending":
            return (f"accepted, job {view.id}: playbook {book} on {names} waits for approval by "
                    f"{approval.get('needed')} person(s) of role {approval.get('by')} other than you; "
                    "they were asked by mail. The result follows in this thread.")
        return f"accepted, job {view.id}: playbook {book} on {names}. The result follows in this thread."

    return _JobStep(planned, said)


def _verb_exec(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.pattern is not None
    planned = door.ops.plan_exec(who, cmd.pattern, list(cmd.argv))
    names = ", ".join(h.name for h in planned.request.hosts)
    return _JobStep(planned, lambda v: f"accepted, job {v.id}: exec on {names}. The result follows.")


def _verb_status(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.job is not None
    return _read(door.ops.plan_job(who, cmd.job), lambda view: StepResult(
        Section(cmd.line, "ok", f"job {view.id} is {view.status}", block=job_text(view))))


def _verb_output(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.job is not None
    view, events, _ = door.ops.events(who, cmd.job, 0, 10_000)
    lines = replies.job_log(events).splitlines()
    tail = cmd.tail or 200
    shown = "\n".join(lines[-tail:])[-door.config.mail.body_limit:]
    text = f"output of job {view.id} ({view.status}), last {min(tail, len(lines))} of {len(lines)} lines"
    return _now(StepResult(Section(cmd.line, "ok", text, block=shown or "(none)")))


def _verb_kill(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.job is not None
    return _read(door.ops.plan_kill(who, cmd.job), lambda view: StepResult(
        Section(cmd.line, "ok", f"job {view.id}: cancel requested ({view.status})")))


def _verb_jobs(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    views = door.ops.list_jobs(who, limit=20)
    return _now(StepResult(Section(cmd.line, "ok", f"{len(views)} most recent job(s)",
                                   block=jobs_table(views))))


def _verb_hosts(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    hosts = door.ops.hosts(who, cmd.pattern or "all")
    block = "\n".join(f"{h.name:<16} {', '.join(h.groups)}" for h in hosts)
    return _now(StepResult(Section(cmd.line, "ok", f"{len(hosts)} host(s)", block=block)))


def _verb_playbooks(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    books = door._playbooks_for(who)
    return _now(StepResult(Section(cmd.line, "ok", f"{len(books)} playbook(s) you may run",
                                   block="\n".join(books) or "(none)")))


def _verb_help(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    books = door._playbooks_for(who)
    block = GRAMMAR + "\n\nPlaybooks you may run:\n" + ("\n".join(books) or "(none)")
    return _now(StepResult(Section(cmd.line, "ok", "One command per line of the signed text:", block=block)))


#: How long a terminal's output must pause before its screen is put in a reply (it has drawn).
SCREEN_SETTLE_MS = 400


def _verb_job_start(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.pattern is not None
    host = cmd.pattern
    planned = door.ops.plan_pty_start(who, host, cmd.text or list(cmd.argv))

    def after(view: JobView) -> str | None:
        try:
            return door.ops.own_watch(who, view).settled_screen(SCREEN_SETTLE_MS).framed()
        except CarrierError as exc:
            return f"(no screen yet: {exc})"

    return _JobStep(planned, lambda v: f"accepted, terminal job {v.id} on {host}: reply `job input {v.id} "
                                       f"keys ...` or `job screen {v.id}`; how it ends follows", after)


def _verb_job_input(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.job is not None
    job = cmd.job
    planned = door.ops.plan_pty_type(who, job, cmd.text or "", list(cmd.keys), secret=cmd.secret,
                                     settle_ms=SCREEN_SETTLE_MS)
    return _read(planned, lambda got: StepResult(Section(
        cmd.line, "ok", f"screen of job {job} after the input ({got[0].status})", block=got[1].framed())))


def _verb_job_screen(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.job is not None
    return _read(door.ops.plan_pty_screen(who, cmd.job, settle_ms=SCREEN_SETTLE_MS), lambda got: StepResult(
        Section(cmd.line, "ok", f"screen of job {got[0].id} ({got[0].status})", block=got[1].framed())))


def _verb_token(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    issued = door.ops.token_for_mail(who, ttl=cmd.ttl)
    text = (f"Your MCP bearer token (id {issued.record.id}, role {issued.record.role}):\n\n{issued.token}\n\n"
            f"Keep it secret. `carrier token revoke {issued.record.id}` ends it.")
    return _now(StepResult(
        Section(cmd.line, "ok",
                f"token {issued.record.id} issued: it was sent to you in a separate encrypted mail"),
        notices=[(who.name, "Your Carrier token", text, who.fingerprint)]))


_ENCRYPT_SHOWN = {
    "always": "every reply to you is encrypted to your key",
    "never": "replies to you are signed, not encrypted",
    "auto": "a reply to an encrypted mail is encrypted to your key; to a signed-only mail, signed only",
}


def _verb_settings(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    if cmd.encrypt is None:
        current = door.ops.settings(who)
        return _now(StepResult(Section(cmd.line, "ok", f"encrypt {current.encrypt}: "
                                       f"{_ENCRYPT_SHOWN[current.encrypt]}")))
    return _read(door.ops.plan_settings(who, encrypt=cmd.encrypt), lambda done: StepResult(Section(
        cmd.line, "ok", f"encrypt set to {done.encrypt}: {_ENCRYPT_SHOWN[done.encrypt]}")))


def _notices(outcome: EnrollOutcome) -> list[tuple[str, str, str, str | None]]:
    return [(n.to, n.subject, n.text, None) for n in outcome.notices]


def _verb_enroll(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    outcome = door.ops.enroll_again(who)
    return _now(StepResult(Section(cmd.line, "ok", outcome.reply)))


def _verb_confirm(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    code = cmd.code or ""
    if len(code) == 32 and all(c in "0123456789abcdef" for c in code.lower()):
        outcome = door.ops.confirm_enrollment(signed.raw, message_key=signed.message_key,
                                              received_at=signed.received_at)
        return _now(StepResult(Section(cmd.line, "ok", outcome.reply), notices=_notices(outcome)))
    if door.proposer is None:
        raise CarrierError("no proposal is waiting for this code")
    proposal: Command = door.proposer.take(who, code)
    if proposal.verb not in PROPOSABLE:
        raise AuthError(f"`{proposal.verb}` is never proposed")
    # A confirmed proposal runs like the command it is (the signed confirm mail authorises it).
    return door._plan(replace(proposal, line=cmd.line), who, signed)


def _vote(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _ReadStep:
    """``approve <job>`` / ``deny <job> [reason]``: a vote on a job that waits for approval."""
    assert cmd.job is not None
    planned = door.ops.plan_vote(who, cmd.job, cmd.verb, signature=signed.digest, reason=cmd.text or "")

    def said(view: JobView) -> StepResult:
        approval = view.approval or {}
        if cmd.verb == "deny":
            text = f"job {view.id} denied: it will not run ({view.status})"
        elif approval.get("state") == "approved":
            text = f"job {view.id} approved: it runs now; its requester gets the result"
        else:
            text = (f"job {view.id}: your approval is recorded ({approval.get('approvals')} of "
                    f"{approval.get('needed')}); it waits for more")
        return StepResult(Section(cmd.line, "ok", text, block=job_text(view)))

    return _read(planned, said)


def _verb_approve(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    if cmd.job is not None:
        return _vote(door, cmd, who, signed)
    assert cmd.request is not None
    outcome = door.ops.approve_enrollment(who, cmd.request, cmd.role)
    return _now(StepResult(Section(cmd.line, "ok", outcome.reply), notices=_notices(outcome)))


def _verb_deny(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    if cmd.job is not None:
        return _vote(door, cmd, who, signed)
    assert cmd.request is not None
    outcome = door.ops.deny_enrollment(who, cmd.request)
    return _now(StepResult(Section(cmd.line, "ok", outcome.reply), notices=_notices(outcome)))


def _verb_revoke(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.fingerprint is not None
    outcome = door.ops.revoke_key(who, cmd.fingerprint)
    return _now(StepResult(Section(cmd.line, "ok", outcome.reply), notices=_notices(outcome)))


def _verb_schedule_add(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.schedule is not None and cmd.playbook is not None and cmd.cron is not None
    planned = ScheduleOps(door.ops).plan_add(
        who, cmd.schedule, cmd.playbook, cron=cmd.cron, limit=cmd.pattern,
        extra_vars=dict(cmd.extra_vars), notify=cmd.notify or "failure")
    return _read(planned, lambda view: StepResult(Section(cmd.line, "ok", view.added_text())))


def _verb_schedule_list(door: MailDoor, cmd: Command, who: Identity, signed: _Signed) -> _JobStep | _ReadStep:
    return _read(ScheduleOps(door.ops).plan_list(who), lambda views: StepResult(Section(
        cmd.line, "ok", f"{len(views)} schedule(s)", block="\n".join(v.line() for v in views) or "(none)")))


def _verb_schedule_remove(door: MailDoor, cmd: Command, who: Identity,
                          signed: _Signed) -> _JobStep | _ReadStep:
    assert cmd.schedule is not None
    name = cmd.schedule
    return _read(ScheduleOps(door.ops).plan_remove(who, name), lambda done: StepResult(Section(
        cmd.line, "ok", f"schedule {name} removed" if done else f"schedule {name} was already gone")))


Verb = Callable[[MailDoor, Command, Identity, _Signed], "_JobStep | _ReadStep"]
#: Every verb of the grammar, each one call of the operations layer. A verb the grammar knows and
#: this table does not is a test failure (tests/integration/test_ops_matrix.py).
VERBS: dict[str, Verb] = {
    "run": _verb_run, "exec": _verb_exec, "status": _verb_status, "output": _verb_output,
    "kill": _verb_kill, "jobs": _verb_jobs, "hosts": _verb_hosts, "playbooks": _verb_playbooks,
    "help": _verb_help, "job start": _verb_job_start, "job input": _verb_job_input,
    "job screen": _verb_job_screen, "token": _verb_token, "enroll": _verb_enroll,
    "confirm": _verb_confirm, "approve": _verb_approve, "deny": _verb_deny, "revoke": _verb_revoke,
    "schedule add": _verb_schedule_add, "schedule list": _verb_schedule_list,
    "schedule remove": _verb_schedule_remove,
    "settings": _verb_settings,
}
#: What the optional LLM may propose (read-only verbs and runs; never admin or token verbs).
PROPOSABLE = ("run", "exec", "status", "output", "jobs", "hosts", "playbooks", "help")


def _last_screen(view: JobView) -> str | None:
    """A terminal job's last screen (kept in its summary when it ended), for its result mail."""
    screen = view.summary.get("screen") if view.kind == "pty" else None
    return screen if isinstance(screen, str) and screen.strip() else None


def key_hash(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- result mails


#: How long an approval request waits for its check-mode preview run to end.
PREVIEW_WAIT = 180.0


def _job_reply_crypto(door: MailDoor, reply: dict[str, Any]) -> crypto.ReplyCrypto:
    """How a mailed job's result and progress mails go out (rows from before reply encryption carry
    no key: their mails go signed only)."""
    key = reply.get("key")
    return door.reply_crypto(str(reply.get("owner", "")), key if isinstance(key, str) else None,
                             bool(reply.get("encrypted")))


class Notifier:
    """Queues the result mail of each job started by mail (and progress mails while it runs)."""

    def __init__(
        self, door: MailDoor, *, progress_interval: float | None = None, poll: float = 0.2
    ) -> None:
        self.door = door
        #: ``mail.progress_interval`` unless given.
        self.progress_interval = (
            door.config.mail.progress_interval if progress_interval is None else progress_interval
        )
        self.poll = poll
        self.wake = threading.Event()

    def check(self) -> int:
        """Queue the mails that are due now; return how many were queued."""
        door = self.door
        store = door.store
        queued = 0
        for watched in sql.watched_jobs(store):
            try:
                view = door.jobs.manager.get(watched.job_id)
            except CarrierError:
                sql.job_mailed(store, watched.job_id)
                continue
            account = door.config.account(watched.account)
            thread = Thread.from_dict(watched.reply["thread"])
            domain = sender_domain(account.address)
            if view.done:
                events, _ = door.jobs.manager.output(view.id, 0, 10_000)
                how = _job_reply_crypto(door, watched.reply)
                body = door.job_mail_body(how, view, replies.render_result(
                    view, events, body_limit=door.config.mail.body_limit, screen=_last_screen(view)))
                msg_id, raw = door._mail(account, thread, body, message_id=f"<result.{view.id}@{domain}>",
                                         encrypt_to=how.key)
                with store.transaction():
                    store.outbox_put(account.name, msg_id, [thread.to], raw)
                    sql.job_mailed(store, view.id)
                queued += 1
            elif store.clock() - watched.progress_at >= self.progress_interval:
                n = watched.progress_count + 1
                events, _ = door.jobs.manager.output(view.id, 0, 10_000)
                how = _job_reply_crypto(door, watched.reply)
                body = door.job_mail_body(how, view, replies.render_result(
                    view, events, body_limit=door.config.mail.body_limit, now=store.clock()))
                msg_id, raw = door._mail(
                    account, thread, body, message_id=f"<progress.{view.id}.{n}@{domain}>",
                    encrypt_to=how.key,
                )
                with store.transaction():
                    if sql.progress_sent(store, view.id, n):
                        store.outbox_put(account.name, msg_id, [thread.to], raw)
                        queued += 1
        queued += self.ask_approvers()
        if queued:
            door.outbox.wake.set()
        return queued

    def ask_approvers(self) -> int:
        """Mail the approvers of each job that newly waits for approval (once, whoever asked for the
        job: mail, MCP or CLI); return how many mails were queued."""
        door = self.door
        store = door.store
        if not door.config.accounts:
            return 0
        account = door.config.accounts[0]
        domain = sender_domain(account.address)
        queued = 0
        for held, addresses in door.ops.approval_requests():
            view = door.jobs.manager.get(held.job_id)
            preview = self._preview(held)
            if preview is None:
                continue  # its check-mode run is still going: ask once it has a recap
            until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(held.expires_at))
            subject = f"Approval needed: {held.summary} (job {held.job_id})"
            text = (f"{held.requester} asks to run {held.summary} (job {held.job_id}). It waits for "
                    f"{held.needed} approval(s) by role {held.by_role}, not the requester's, until {until}; "
                    f"then it is cancelled.\n\nTo approve, reply with a mail signed with your enrolled key "
                    f"whose text is\n\n    approve {held.job_id}\n\nTo refuse it:\n\n"
                    f"    deny {held.job_id} <reason>")
            sections = [Section("", "ok", text, block=job_text(view))]
            if preview:
                sections.append(Section("", "ok", "What it would change: the same run in check mode "
                                        "with --diff (nothing was changed)", block=preview))
            mails = []
            for to in addresses:
                # Each approver's own `settings encrypt`: what the run would change is as private as
                # a reply to them (an approver who is not replying to anything gets `auto` as plain).
                who = door.trust.directory.identity(to)
                how = door.reply_crypto(to, who.fingerprint if who else None, False)
                shown = sections if not how.withheld else [
                    Section("", "denied", how.withheld),
                    Section("", "ok", f"job {held.job_id} waits for {held.needed} approval(s) by role "
                            f"{held.by_role} until {until}: reply signed with `approve {held.job_id}` "
                            f"or `deny {held.job_id} <reason>`"),
                ]
                body = replies.render_sections(shown)
                msg_id = f"<approval.{held.job_id}.{key_hash(to)}@{domain}>"
                # A subject is never encrypted: it names the job only, not what it would run.
                private = how.key is not None or how.withheld is not None
                thread = Thread(to, f"Approval needed: job {held.job_id}" if private else subject, None, ())
                mails.append((to, *door._mail(account, thread, body, message_id=msg_id, encrypt_to=how.key)))
            with store.transaction():
                if not approvals.mark_notified(store, held.job_id):
                    continue  # another Carrier process asked them
                for to, msg_id, raw in mails:
                    store.outbox_put(account.name, msg_id, [to], raw)
            if not addresses:
                log.warning("nobody can approve job %s: no one enrolled has role %s other than the requester",
                            held.job_id, held.by_role, extra={"job": held.job_id})
            queued += len(mails)
        return queued

    def _preview(self, held: approvals.ApprovalRecord) -> str | None:
        """The preview run's recap and diff for the approval request; "" without a preview; None
        while it still runs (for at most ``PREVIEW_WAIT`` s, then the request goes without it)."""
        if held.preview_job is None:
            return ""
        manager = self.door.jobs.manager
        view = manager.get(held.preview_job)
        if not view.done:
            if self.door.store.clock() - held.created_at < PREVIEW_WAIT:
                return None
            return f"(the check-mode run {view.id} did not end within {PREVIEW_WAIT:.0f} s)"
        events, _ = manager.output(view.id, 0, 10_000)
        lines = replies.job_log(events).splitlines()
        return job_text(view) + "\n\n" + "\n".join(lines[-80:])

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                self.check()
            except Exception:  # keep notifying whatever one job does
                log.exception("result notifier error")
            self.wake.wait(self.poll)
