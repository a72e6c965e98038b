"""The `mail:` settings reach the email door: progress mails at most one per
``mail.progress_interval`` while a mail-started job runs, and output longer than
``mail.body_limit`` goes along as an attachment (real store, gpg, job manager and sandbox hosts)."""

from __future__ import annotations

import time

from auth_support import pgp_mime
from door_support import identities, local_door, text_of
from mail_support import token

from carrier.mail.door import Notifier
from carrier.sandbox.manager import Sandbox


def test_progress_interval_and_body_limit_come_from_the_config(sandbox: Sandbox) -> None:
    mail = {"progress_interval": 1, "body_limit": 1000}
    with local_door(sandbox, mail=mail) as door, identities(sandbox) as people:
        notifier = Notifier(door.door)
        assert notifier.progress_interval == 1.0
        text = f"exec web1 sleep 4\nexec web1 seq 1 3000\n-- \n{token('sig')}\n"
        raw = pgp_mime(people["ops"], text, subject="settings")
        assert door.handle(raw) == "answered"
        (accepted,) = door.replies()
        ids = [
            line.split("accepted, job ")[1].split(":")[0]
            for line in text_of(accepted).splitlines()
            if "accepted, job " in line
        ]
        assert len(ids) == 2
        sleeper, seq = ids
        started = time.monotonic()
        while time.monotonic() - started < 120:
            notifier.check()
            results = [m for m in door.replies() if str(m["Message-ID"]).startswith("<result.")]
            if len(results) == 2:
                break
            time.sleep(0.2)
        replies = door.replies()
        by_id = {str(m["Message-ID"]): m for m in replies}
        view = door.jobs.manager.get(sleeper)
        assert view.done and view.started_at is not None and view.finished_at is not None
        progress = [k for k in by_id if k.startswith(f"<progress.{sleeper}.")]
        # At most one progress mail per interval of the job's life, and at least one for a 4 s job.
        assert 1 <= len(progress) <= int(view.finished_at - view.created_at) + 1, progress
        result = by_id[next(k for k in by_id if k.startswith(f"<result.{seq}@"))]
        attachments = [p for p in result.walk() if p.get_filename() == f"{seq}.log"]
        assert len(attachments) == 1
        log = attachments[0].get_content()
        assert "\n1\n" in f"\n{log}" and "3000" in log
        body = "\n".join(
            p.get_content()
            for p in result.walk()
            if p.get_content_type() == "text/plain" and p.get_filename() is None
        )
        assert "3000" in body and "\n1\n" not in body  # only the tail is in the body
        assert len(body) < 1000 + 2000  # the tail (≤ body_limit) plus the template's text
