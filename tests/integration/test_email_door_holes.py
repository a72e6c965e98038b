"""Holes in the email door found by an attacker's test (issue 18, items 3-5), each shown through a
real `carrier serve` on the sandbox: mail in over SMTP, replies read from the mailboxes."""

from __future__ import annotations

import contextlib
import email
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from auth_support import pgp_mime
from door_support import (
    db_rows,
    door_config,
    identities,
    send_signed,
    serving,
    store_key,
    text_of,
    wait_replies,
)
from mail_support import deliver, simple_message, token
from ruamel.yaml import YAML

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


def wait_errors(sandbox: Sandbox, state: Path, message_ids: list[str], timeout: float = 90) -> list[str]:
    """The recorded error of each mail, once Carrier has finished with all of them."""
    keys = [store_key(sandbox, m) for m in message_ids]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = dict(db_rows(state, "SELECT message_id, coalesce(error, state) FROM messages "
                                   "WHERE state IN ('done', 'failed')"))
        if all(k in rows for k in keys):
            return [str(rows[k]) for k in keys]
        time.sleep(0.1)
    raise AssertionError(f"not all of {message_ids} handled in {timeout} s")


def test_enroll_without_a_key_gets_no_reply_and_is_rate_limited(sandbox: Sandbox) -> None:
    limits = {"enroll_per_address": 2, "enroll_per_domain": 3, "enroll_window": 3600}
    tag = token("stranger")
    with serving(sandbox, limits=limits) as (serve, directory):
        serve.start()
        sent = []
        for n, who in enumerate(["ghost1", "ghost1", "ghost1", "ghost2"]):
            mail = simple_message(f"{tag} {n}", "enroll\n", sender=who)
            deliver(sandbox.layout, mail.as_bytes(), sender=address(who), to=[address("carrier")])
            sent.append(str(mail["Message-ID"]))
        errors = wait_errors(sandbox, directory / "state", sent)
        outbox = db_rows(directory / "state", "SELECT recipients, raw FROM outbox")
        lookups = [line for line in serve.lines if line.get("msg") == "key candidate refused"]
        unanswered = [line for line in serve.lines if line.get("msg") == "enrollment request not answered"]
    # No key anywhere (the sandbox keyserver has none; WKD for example.test does not resolve).
    assert errors == ["enroll: no_key", "enroll: no_key", "enroll: rate_limited", "enroll: rate_limited"]
    assert outbox == []  # nothing is sent to whatever address From named
    # The reason is logged for the operator (with the lookup's own words), never mailed.
    assert [(u["address"], u["outcome"]) for u in unanswered] == [
        ("ghost1@example.test", "no_key"), ("ghost1@example.test", "no_key"),
        ("ghost1@example.test", "rate_limited"), ("ghost2@example.test", "rate_limited")]
    assert unanswered[0]["reason"] in ("not_found", "lookup_failed")
    # Rate-limited requests make no lookup: WKD and the keyserver were asked for the first two only.
    assert {line["address"] for line in lookups} <= {"ghost1@example.test"}


@contextlib.contextmanager
def tarpit() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (an SMTP server that hangs)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def test_a_killed_senders_claim_is_taken_over_at_once_and_the_ack_goes_before_the_result(
    sandbox: Sandbox,
) -> None:
    tag = token("order")
    with identities(sandbox) as people, tarpit() as port, \
            serving(sandbox, account={"smtp": {"host": "127.0.0.1", "port": port, "tls": "none",
                                               "auth": False}}) as (serve, directory):
        state = directory / "state"
        serve.start()
        send_signed(sandbox, people["ops"], "exec web1 true\n", tag)
        # The reply and the result mail are queued; the sender hangs on SMTP holding a claim.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            rows = db_rows(state, "SELECT next_attempt_at - created_at FROM outbox WHERE state = 'pending'")
            if len(rows) == 2 and any(held > 100 for (held,) in rows):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no claimed outbox row: {rows}")
        serve.kill()
        # Back with a working SMTP server: the dead sender's claim must not hold the reply 300 s.
        door_config(sandbox, directory)
        serve.start()
        accepted, result = wait_replies(sandbox, "ops", tag, 2, timeout=60)
        taken = [ln for ln in serve.lines if ln.get("msg") == "outbox claim of a stopped sender taken over"]
    assert "accepted, job" in text_of(accepted), text_of(accepted)  # in mailbox order: the ack first
    assert "succeeded" in text_of(result), text_of(result)
    assert len(taken) == 1


NOT_STARTED = "mcp http door not started: the email door runs without it; trying again"


def test_a_taken_mcp_port_is_named_and_the_email_door_keeps_running(sandbox: Sandbox) -> None:
    tag = token("port")
    with identities(sandbox) as people, serving(sandbox) as (serve, _directory):
        mcp = YAML(typ="safe").load(serve.config.read_text())["mcp"]
        squatter = socket.create_server((mcp["bind_host"], int(mcp["port"])))
        try:
            serve.start()
            problem = serve.wait_log(NOT_STARTED)
            # The email door answers meanwhile.
            send_signed(sandbox, people["ops"], "jobs\n", tag)
            [reply] = wait_replies(sandbox, "ops", tag, 1)
        finally:
            squatter.close()
        # Once the port is free the MCP door comes up by itself.
        ready = serve.wait_log("mcp http door ready", timeout=60)
    error = str(problem["error"])
    where = f"{mcp['bind_host']}:{mcp['port']}"
    assert f"cannot listen on {where}: the port is in use by pid {os.getpid()} (" in error, error
    assert "mcp.port in carrier.yml (or MCP_PORT)" in error, error
    assert "recent job" in text_of(reply) or "no jobs" in text_of(reply).lower(), text_of(reply)
    assert ready["url"].endswith(f":{mcp['port']}/mcp")


def test_result_replies_carry_no_warnings_of_carriers_own_python(sandbox: Sandbox) -> None:
    tag = token("warn")
    with identities(sandbox) as people, serving(sandbox) as (serve, _directory):
        serve.start()
        send_signed(sandbox, people["ops"], "run ping on web1\n", tag)
        _accepted, result = wait_replies(sandbox, "ops", tag, 2)
    text = text_of(result)
    assert "succeeded" in text, text
    venv = str(Path(sys.executable).parent.parent)
    for leak in ("Warning:", "DeprecationWarning", "site-packages", venv):
        assert leak not in text, (leak, text)
