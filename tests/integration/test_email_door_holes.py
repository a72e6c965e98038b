"""Holes in the email door found by an attacker's test (issue 18, items 3-5), each shown through a
real `carrier serve` on the sandbox: mail in over SMTP, replies read from the mailboxes."""

from __future__ import annotations

import email

import pytest
from auth_support import pgp_mime
from door_support import db_rows, identities, serving, text_of, wait_replies
from mail_support import deliver, simple_message, token

from carrier.sandbox.layout import address
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox


def test_a_forged_mail_cannot_claim_the_message_id_of_a_signed_one(sandbox: Sandbox) -> None:
    forged_tag, legit_tag = token("forged"), token("legit")
    with identities(sandbox) as people, serving(sandbox) as (serve, directory):
        serve.start()
        legit = pgp_mime(people["ops"], "exec web1 true\n", subject=legit_tag)
        message_id = email.message_from_bytes(legit)["Message-ID"]
        # The forgery arrives first, unsigned, with the signed mail's Message-ID.
        forged = simple_message(forged_tag, "exec web1 true\n", sender="ops", message_id=message_id)
        deliver(sandbox.layout, forged.as_bytes(), sender=address("ops"), to=[address("carrier")])
        [refusal] = wait_replies(sandbox, "ops", forged_tag, 1)
        assert "Carrier runs only commands signed with your enrolled key" in text_of(refusal)
        deliver(sandbox.layout, legit, sender=address("ops"), to=[address("carrier")])
        accepted, result = wait_replies(sandbox, "ops", legit_tag, 2)
        assert "accepted, job" in text_of(accepted), text_of(accepted)
        assert "succeeded" in text_of(result), text_of(result)
        # The same signed mail delivered again (another UID) is a replay: refused, runs nothing.
        deliver(sandbox.layout, legit, sender=address("ops"), to=[address("carrier")])
        replies = wait_replies(sandbox, "ops", legit_tag, 3, settle=2.0)
        assert len(replies) == 3
        assert "This signed command was already used" in text_of(replies[2]), text_of(replies[2])
        jobs = db_rows(directory / "state", "SELECT id FROM jobs")
        keys = [r[0] for r in db_rows(directory / "state", "SELECT message_id FROM messages ORDER BY id")]
    assert len(jobs) == 1
    assert len(keys) == 3 and all(k.startswith("uid:") for k in keys), keys
