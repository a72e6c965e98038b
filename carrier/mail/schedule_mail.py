"""Schedule mails through the email door: a scheduled job's result (the same text + HTML recap as a
mailed job's result mail) and short notices of missed or refused slots, signed by Carrier and queued
in the outbox. ``carrier serve`` gives one to the scheduler (:mod:`carrier.ops.schedules`)."""

from __future__ import annotations

from carrier.config import MailAccount
from carrier.jobs.manager import JobView
from carrier.mail import replies
from carrier.mail.compose import sender_domain
from carrier.mail.crypto import ReplyCrypto
from carrier.mail.door import MailDoor
from carrier.mail.replies import Section, Thread


class DoorScheduleMail:
    """:class:`carrier.ops.schedules.ScheduleMail` over a :class:`MailDoor` and its outbox."""

    def __init__(self, door: MailDoor) -> None:
        self.door = door

    def _account(self) -> MailAccount:
        accounts = [a for a in self.door.config.accounts if a.commands] or list(self.door.config.accounts)
        return accounts[0]

    def _crypto(self, to: str) -> ReplyCrypto:
        """The owner's ``encrypt`` setting: ``always`` encrypts (or withholds) a schedule's mails."""
        who = self.door.trust.directory.identity(to)
        return self.door.reply_crypto(to, who.fingerprint if who is not None else None, False)

    def _queue(self, to: str, subject: str, body: replies.ReplyBody, key: str, how: ReplyCrypto) -> None:
        account = self._account()
        message_id = f"<{key}@{sender_domain(account.address)}>"
        msg_id, raw = self.door._mail(account, Thread(to, subject, None, ()), body, message_id=message_id,
                                      encrypt_to=how.key)
        self.door.store.outbox_put(account.name, msg_id, [to], raw)
        self.door.outbox.wake.set()

    def result(self, to: str, schedule: str, slot: float, view: JobView) -> None:
        events, _ = self.door.jobs.manager.output(view.id, 0, 10_000)
        how = self._crypto(to)
        body = self.door.job_mail_body(how, view, replies.render_result(
            view, events, body_limit=self.door.config.mail.body_limit))
        self._queue(to, f"Carrier schedule {schedule}: {view.status} ({view.id})", body,
                    f"schedule.{schedule}.{int(slot)}.{view.id}", how=how)

    def notice(self, to: str, subject: str, text: str, key: str) -> None:
        how = self._crypto(to)
        shown = Section("", "denied", how.withheld) if how.withheld else Section("", "ok", text)
        self._queue(to, subject, replies.render_sections([shown]), f"schedule.{key}", how)
