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
import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from carrier.auth.enrollment import Outcome as EnrollOutcome
from carrier.auth.errors import AuthError, RateLimited, VerificationError
from carrier.auth.mailauth import sender_of
from carrier.auth.pgp import parse_clearsigned
from carrier.auth.policy import HostRef, Identity, Request
from carrier.auth.ratelimit import identity_key
from carrier.auth.service import Trust
from carrier.config import Config, MailAccount
from carrier.errors import CarrierError
from carrier.jobs.manager import JobView
from carrier.jobs.render import job_text, jobs_table
from carrier.jobs.system import JobSystem
from carrier.mail import lease, replies
from carrier.mail.commands import (
    GRAMMAR,
    Command,
    CommandError,
    first_verb,
    is_free_text,
    parse_commands,
)
from carrier.mail.compose import sender_domain
from carrier.mail.outbox import Outbox
from carrier.mail.parse import Headers, parse_headers, parse_message
from carrier.mail.replies import ReplyBody, Section, Thread
from carrier.store import Store
from carrier.store import gateway as sql

log = logging.getLogger(__name__)

LEASE_SECONDS = 300.0
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
}
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


@dataclass(frozen=True)
class _Step:
    account: MailAccount
    key: str
    idx: int
    reply: dict[str, Any]


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
    ) -> None:
        self.config = config
        self.store = store
        self.trust = trust
        self.jobs = jobs
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
            body = replies.render_sections(
                [Section("", "denied", _REFUSALS.get(exc.reason, _REFUSED_DEFAULT))]
            )
            msg_id, out = self._mail(account, thread, body)
            self._finish(account, key, ok=False, error=exc.reason, reply=(msg_id, out, sender))
            return f"refused: {exc.reason}"
        identity = auth.identity
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
            done = sql.steps_of(self.store, account.name, key)
            for idx, entry in enumerate(parsed.entries):
                if idx in done:
                    sections.append(Section.from_dict(done[idx].section))
                    continue
                sections.append(
                    self._step(account, key, idx, entry, identity, thread, raw, message_key, received_at)
                )
        body = replies.render_sections(sections, footer=f"{identity.name} ({identity.role})")
        msg_id, out = self._mail(account, thread, body)
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

    def _step(
        self,
        account: MailAccount,
        key: str,
        idx: int,
        entry: Command | CommandError,
        identity: Identity,
        thread: Thread,
        raw: bytes,
        message_key: str,
        received_at: float,
    ) -> Section:
        if isinstance(entry, CommandError):
            section = Section(entry.line, "error", entry.message, example=entry.example)
            sql.record_step(self.store, account.name, key, idx, section.to_dict())
            return section
        step = _Step(
            account, key, idx, {"account": account.name, "thread": thread.to_dict(), "owner": identity.name}
        )
        try:
            result = self._execute(entry, identity, raw, message_key, received_at, step)
        except CarrierError as exc:
            result = StepResult(Section(entry.line, "error", str(exc)))
        if not result.recorded:
            with self.store.transaction():
                for n, (to, subject, text, encrypt_to) in enumerate(result.notices):
                    self._queue_notice(account, to, subject, text, encrypt_to, f"{key_hash(key)}.{idx}.{n}")
                sql.record_step(self.store, account.name, key, idx, result.section.to_dict(), result.job_id)
        return result.section

    def _submit(
        self,
        step: _Step,
        identity: Identity,
        line: str,
        submit: Callable[[], JobView],
        text: Callable[[JobView], str],
    ) -> StepResult:
        """Submit a job, record the step and the owed result mail in one transaction."""
        with self.store.transaction():
            view = submit()
            section = Section(line, "accepted", text(view), job=view.id)
            sql.watch_job(self.store, view.id, step.account.name, step.key, step.reply)
            sql.record_step(self.store, step.account.name, step.key, step.idx, section.to_dict(), view.id)
        self.trust.audit.job(
            identity, view.id, "start", hosts=view.hosts, outcome="accepted", detail={"command": line[:200]}
        )
        return StepResult(section, view.id, recorded=True)

    def _hosts(self, pattern: str) -> tuple[HostRef, ...]:
        names = self.jobs.inventory.resolve(pattern)
        groups: dict[str, list[str]] = {}
        for group, members in self.jobs.inventory.groups().items():
            for member in members:
                groups.setdefault(member, []).append(group)
        return tuple(HostRef(n, tuple(groups.get(n, ()))) for n in names)

    def _decide(self, identity: Identity, request: Request) -> None:
        decision = self.trust.policy.decide(identity, request)
        self.trust.audit.decision(identity, request, decision)
        if not decision.allowed:
            raise AuthError(f"not allowed: {decision.reason}", reason="denied")

    def _job_for(self, identity: Identity, job_id: str, action: str) -> JobView:
        view = self.jobs.manager.get(job_id)
        self._decide(identity, Request(action, job_owner=view.owner))  # type: ignore[arg-type]
        return view

    def _playbooks_for(self, identity: Identity) -> list[str]:
        role = self.config.roles.get(identity.role)
        if role is None:
            return []
        out = []
        for info in self.jobs.catalog.list():
            if info.admin_only and not identity.admin:
                continue
            if any(
                fnmatch.fnmatchcase(info.name, g) or fnmatch.fnmatchcase(f"{info.name}.yml", g)
                for g in role.playbooks
            ):
                out.append(f"{info.name:<20} {info.description}")
        return out

    def _execute(
        self, cmd: Command, identity: Identity, raw: bytes, message_key: str, received_at: float, step: _Step
    ) -> StepResult:
        manager = self.jobs.manager
        verb = cmd.verb
        if verb == "run":
            assert cmd.playbook is not None
            info = self.jobs.catalog.get(cmd.playbook)
            if info is None:
                raise CarrierError(
                    f"no playbook named {cmd.playbook!r}: `playbooks` lists the ones you may run"
                )
            if info.admin_only and not identity.admin:
                raise AuthError(f"not allowed: playbook {info.name} is for admins only")
            pattern = cmd.pattern or info.default_limit or "all"
            hosts = self._hosts(pattern)
            self._decide(identity, Request("playbook", hosts, playbook=info.name))
            options: dict[str, Any] = {
                "limit": pattern,
                "extra_vars": dict(cmd.extra_vars),
                "check": cmd.check,
                "diff": cmd.diff,
            }
            if cmd.tags:
                options["tags"] = list(cmd.tags)
            names = ", ".join(h.name for h in hosts)
            name = info.name
            return self._submit(
                step,
                identity,
                cmd.line,
                lambda: manager.run_playbook(name, owner=identity.name, door="mail", **options),
                lambda v: (
                    f"accepted, job {v.id}: playbook {name} on {names}. The result follows in this thread."
                ),
            )
        if verb == "exec":
            assert cmd.pattern is not None
            hosts = self._hosts(cmd.pattern)
            self._decide(identity, Request("exec", hosts, command=" ".join(cmd.argv)))
            pattern, argv = cmd.pattern, list(cmd.argv)
            names = ", ".join(h.name for h in hosts)
            return self._submit(
                step,
                identity,
                cmd.line,
                lambda: manager.run_exec(pattern, argv, owner=identity.name, door="mail"),
                lambda v: f"accepted, job {v.id}: exec on {names}. The result follows.",
            )
        if verb == "status":
            assert cmd.job is not None
            view = self._job_for(identity, cmd.job, "job_read")
            return StepResult(
                Section(cmd.line, "ok", f"job {view.id} is {view.status}", block=job_text(view))
            )
        if verb == "output":
            assert cmd.job is not None
            view = self._job_for(identity, cmd.job, "job_read")
            events, _ = manager.output(view.id, 0, 10_000)
            lines = replies.job_log(events).splitlines()
            tail = cmd.tail or 200
            shown = "\n".join(lines[-tail:])[-self.config.mail.body_limit :]
            return StepResult(
                Section(
                    cmd.line,
                    "ok",
                    f"output of job {view.id} ({view.status}), last "
                    f"{min(tail, len(lines))} of {len(lines)} lines",
                    block=shown or "(none)",
                )
            )
        if verb == "kill":
            assert cmd.job is not None
            self._job_for(identity, cmd.job, "job_control")
            view = manager.kill(cmd.job, by=identity.name)
            return StepResult(Section(cmd.line, "ok", f"job {view.id}: cancel requested ({view.status})"))
        if verb == "jobs":
            self._decide(identity, Request("inventory"))
            views = manager.list_jobs(owner=None if identity.admin else identity.name, limit=20)
            return StepResult(
                Section(cmd.line, "ok", f"{len(views)} most recent job(s)", block=jobs_table(views))
            )
        if verb == "hosts":
            self._decide(identity, Request("inventory"))
            hosts = self._hosts(cmd.pattern or "all")
            block = "\n".join(
                f"{h.name:<16} {', '.join(g for g in h.groups if g not in ('all', 'ungrouped'))}"
                for h in hosts
            )
            return StepResult(Section(cmd.line, "ok", f"{len(hosts)} host(s)", block=block))
        if verb == "playbooks":
            self._decide(identity, Request("inventory"))
            books = self._playbooks_for(identity)
            return StepResult(
                Section(
                    cmd.line,
                    "ok",
                    f"{len(books)} playbook(s) you may run",
                    block="\n".join(books) or "(none)",
                )
            )
        if verb == "help":
            books = self._playbooks_for(identity)
            return StepResult(
                Section(
                    cmd.line,
                    "ok",
                    "One command per line of the signed text:",
                    block=GRAMMAR + "\n\nPlaybooks you may run:\n" + ("\n".join(books) or "(none)"),
                )
            )
        if verb in ("job start", "job input", "job screen"):
            return self._pty(cmd, identity, step)
        if verb == "token":
            issued = self.trust.issue_token_for(identity, ttl=cmd.ttl)
            text = (
                f"Your MCP bearer token (id {issued.record.id}, role {issued.record.role}):\n\n"
                f"{issued.token}\n\nKeep it secret. `carrier token revoke {issued.record.id}` ends it."
            )
            return StepResult(
                Section(
                    cmd.line,
                    "ok",
                    f"token {issued.record.id} issued: it was sent to you in a separate encrypted mail",
                ),
                notices=[(identity.name, "Your Carrier token", text, identity.fingerprint)],
            )
        if verb == "enroll":
            outcome = self.trust.enrollment.request(identity.name)
            return StepResult(Section(cmd.line, "ok", outcome.reply))
        if verb == "confirm":
            code = cmd.code or ""
            if len(code) == 32 and all(c in "0123456789abcdef" for c in code.lower()):
                outcome = self.trust.enrollment.respond(raw, message_key=message_key, received_at=received_at)
                return StepResult(
                    Section(cmd.line, "ok", outcome.reply),
                    notices=[(n.to, n.subject, n.text, None) for n in outcome.notices],
                )
            if self.proposer is None:
                raise CarrierError("no proposal is waiting for this code")
            proposal = self.proposer.take(identity, code)
            return self._confirmed(proposal, identity, raw, message_key, received_at, step)
        if verb in ("approve", "deny"):
            outcome = self.trust.enrollment.admin_mail(raw, message_key=message_key, received_at=received_at)
            return StepResult(
                Section(cmd.line, "ok", outcome.reply),
                notices=[(n.to, n.subject, n.text, None) for n in outcome.notices],
            )
        if verb == "revoke":
            self._decide(identity, Request("admin"))
            assert cmd.fingerprint is not None
            outcome = self.trust.enrollment.revoke(cmd.fingerprint, by=identity.name, door="mail")
            return StepResult(
                Section(cmd.line, "ok", outcome.reply),
                notices=[(n.to, n.subject, n.text, None) for n in outcome.notices],
            )
        raise CarrierError(f"`{verb}` is not handled by this Carrier")

    def llm_context(self, identity: Identity) -> str:
        """What the LLM is told besides the grammar: the playbooks this user may run (with their
        variables) and the inventory groups. No secrets, no host variables."""
        books = []
        for line in self._playbooks_for(identity):
            info = self.jobs.catalog.get(line.split(" ", 1)[0])
            names = sorted(info.vars) if info is not None else []
            extra = f" (variables: {', '.join(names)})" if names else ""
            books.append(f"- {line.strip()}{extra}")
        groups = self.jobs.inventory.groups()
        group_lines = [f"- {g}: {', '.join(h)}" for g, h in sorted(groups.items()) if g != "ungrouped"]
        return (
            "Playbooks this user may run:\n"
            + ("\n".join(books) or "(none)")
            + "\nInventory groups and their hosts:\n"
            + ("\n".join(group_lines) or "(none)")
        )

    def check_proposal(self, identity: Identity, cmd: Command) -> None:
        """Whether ``identity`` may run ``cmd`` now (catalog and policy; nothing is started).
        Raises CarrierError/AuthError with the reason."""
        if cmd.verb == "run":
            assert cmd.playbook is not None
            info = self.jobs.catalog.get(cmd.playbook)
            if info is None:
                raise CarrierError(f"no playbook named {cmd.playbook!r}")
            if info.admin_only and not identity.admin:
                raise AuthError(f"not allowed: playbook {info.name} is for admins only")
            hosts = self._hosts(cmd.pattern or info.default_limit or "all")
            self._decide(identity, Request("playbook", hosts, playbook=info.name))
        elif cmd.verb == "exec":
            assert cmd.pattern is not None
            hosts = self._hosts(cmd.pattern)
            self._decide(identity, Request("exec", hosts, command=" ".join(cmd.argv)))
        elif cmd.verb in ("status", "output"):
            assert cmd.job is not None
            self._job_for(identity, cmd.job, "job_read")
        elif cmd.verb in ("jobs", "hosts", "playbooks"):
            self._decide(identity, Request("inventory"))
        elif cmd.verb != "help":
            raise AuthError(f"`{cmd.verb}` is never proposed")

    def _confirmed(
        self,
        proposal: Command,
        identity: Identity,
        raw: bytes,
        message_key: str,
        received_at: float,
        step: _Step,
    ) -> StepResult:
        """A confirmed proposal runs like the command it is (the signed confirm mail authorises it)."""
        return self._execute(proposal, identity, raw, message_key, received_at, step)

    def _pty(self, cmd: Command, identity: Identity, step: _Step) -> StepResult:
        manager = self.jobs.manager
        if "pty" not in manager.engines:
            raise CarrierError(f"`{cmd.verb}` is not available: this Carrier runs no terminal (pty) jobs yet")
        if cmd.verb == "job start":
            assert cmd.pattern is not None
            hosts = self._hosts(cmd.pattern)
            self._decide(identity, Request("pty", hosts, command=" ".join(cmd.argv)))
            request = {"host": cmd.pattern, "command": list(cmd.argv)}
            host = cmd.pattern
            return self._submit(
                step,
                identity,
                cmd.line,
                lambda: manager.submit("pty", request, owner=identity.name, door="mail"),
                lambda v: (
                    f"accepted, terminal job {v.id} on {host}: send `job screen {v.id}` to see its screen"
                ),
            )
        assert cmd.job is not None
        self._job_for(identity, cmd.job, "job_control" if cmd.verb == "job input" else "job_read")
        screen_of: Callable[..., str] | None = getattr(manager.engines["pty"], "screen_text", None)
        send: Callable[..., None] | None = getattr(manager.engines["pty"], "send_input", None)
        if cmd.verb == "job input":
            if send is None:
                raise CarrierError("`job input` is not available with this pty engine")
            send(cmd.job, keys=list(cmd.keys), text=cmd.text)
            time.sleep(0.5)  # let the screen settle before it is shown
        screen = screen_of(cmd.job) if screen_of is not None else "(no screen available)"
        return StepResult(Section(cmd.line, "ok", f"screen of job {cmd.job}", block=screen))


def key_hash(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- result mails


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
                body = replies.render_result(view, events, body_limit=door.config.mail.body_limit)
                msg_id, raw = door._mail(account, thread, body, message_id=f"<result.{view.id}@{domain}>")
                with store.transaction():
                    store.outbox_put(account.name, msg_id, [thread.to], raw)
                    sql.job_mailed(store, view.id)
                queued += 1
            elif store.clock() - watched.progress_at >= self.progress_interval:
                n = watched.progress_count + 1
                events, _ = door.jobs.manager.output(view.id, 0, 10_000)
                body = replies.render_result(
                    view, events, body_limit=door.config.mail.body_limit, now=store.clock()
                )
                msg_id, raw = door._mail(
                    account, thread, body, message_id=f"<progress.{view.id}.{n}@{domain}>"
                )
                with store.transaction():
                    if sql.progress_sent(store, view.id, n):
                        store.outbox_put(account.name, msg_id, [thread.to], raw)
                        queued += 1
        if queued:
            door.outbox.wake.set()
        return queued

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                self.check()
            except Exception:  # keep notifying whatever one job does
                log.exception("result notifier error")
            self.wake.wait(self.poll)
