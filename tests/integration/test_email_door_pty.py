"""Terminal (PTY) jobs driven by signed mail through `carrier serve`: `job start` shows the first
screen, `job input ... keys` moves through a `dialog --menu`, `job screen` shows what is there, the
exit status comes in the result mail, and `kill` stops a terminal job — the seed's "drive
`make menuconfig` from a phone", end to end on a real sandbox host."""

from __future__ import annotations

import re

import pytest
from door_support import html_of, identities, send_signed, serving, text_of, wait_replies
from mail_support import token

from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox

_JOB = re.compile(r"terminal job (j-[a-z2-7]{12}) on")


def _reply_with(sandbox: Sandbox, tag: str, count: int, needle: str, who: str = "ops") -> str:
    """The newest of the first ``count`` replies of the thread that contains ``needle``."""
    replies = wait_replies(sandbox, who, tag, count, timeout=120)
    texts = [text_of(r) for r in replies]
    found = [t for t in texts if needle in t]
    assert found, f"no reply with {needle!r} among {len(texts)}: {texts[-1][:2000]}"
    return found[-1]


def test_dialog_menu_driven_by_mail(sandbox: Sandbox) -> None:
    with serving(sandbox) as (serve, _directory), identities(sandbox) as people:
        serve.start()
        tag = token("ptymail")
        admin, ops = people["admin"], people["ops"]
        # The admin role has a shell, so the command is shell text: dialog writes the choice to a
        # file, and the shell prints it with dialog's exit status.
        choice = f"$HOME/.dialog-{tag}"
        send_signed(
            sandbox,
            admin,
            "job start web1 dialog --menu 'Pick a fruit' 14 40 4 a Apple b Banana "
            f'c Cherry d Date 2>{choice}; echo "rc=$? choice=$(cat {choice})"; rm -f {choice}',
            tag,
        )
        first = _reply_with(sandbox, tag, 1, "accepted, terminal job", "admin")
        match = _JOB.search(first)
        assert match, first
        job_id = match.group(1)
        # The accepted reply already shows the menu, as a fixed-width block (text and HTML).
        assert "Pick a fruit" in first and "Apple" in first and "Cherry" in first
        (accepted,) = wait_replies(sandbox, "admin", tag, 1)
        assert "<pre" in html_of(accepted) and "Pick a fruit" in html_of(accepted)

        send_signed(sandbox, admin, f"job screen {job_id}", f"Re: {tag}")
        shown = _reply_with(sandbox, tag, 2, f"screen of job {job_id}", "admin")
        assert "Banana" in shown and "running" in shown

        send_signed(sandbox, admin, f"job input {job_id} keys down,down", f"Re: {tag}")
        moved = _reply_with(sandbox, tag, 3, "after the input", "admin")
        assert "Pick a fruit" in moved
        send_signed(sandbox, admin, f"job input {job_id} keys enter", f"Re: {tag}")
        # Apple -> Banana -> Cherry, chosen: the screen shows the choice and dialog's status.
        typed = _reply_with(sandbox, tag, 4, f"screen of job {job_id} after the input (", "admin")
        result = _reply_with(sandbox, tag, 5, f"Job {job_id} succeeded", "admin")
        assert "status 0" in result, result
        assert "rc=0 choice=c" in typed or "rc=0 choice=c" in result, (typed, result)
        # The result mail shows the terminal's last screen: the choice and dialog's status.
        assert "rc=0 choice=c" in result, result

        # A terminal job can be stopped by mail too; its result says so.
        tag = token("ptykill")
        send_signed(sandbox, ops, "job start web2 top -d 1", tag)
        top = _reply_with(sandbox, tag, 1, "terminal job")
        top_match = _JOB.search(top)
        assert top_match, top
        top_id = top_match.group(1)
        assert "top -" in top or "Tasks:" in top
        send_signed(sandbox, ops, f"kill {top_id}", f"Re: {tag}")
        _reply_with(sandbox, tag, 2, f"job {top_id}: cancel requested")
        _reply_with(sandbox, tag, 3, f"Job {top_id} cancelled")
        assert serve.stop() == 0
