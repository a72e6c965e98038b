"""Whether a reply to a user goes out encrypted: their ``encrypt`` setting (``settings encrypt
on|off|auto``, kept in the store) and, for ``auto``, whether their own mail came encrypted
(Autocrypt-style).

When encryption is wanted but the user's key cannot encrypt (no encryption subkey, or it expired or
was revoked since), the reply is never sent in clear with its content: it goes signed only and says
so, with each command's status but none of its text or output (``withheld``). ``settings encrypt
on`` is refused up front for such a key; ``settings encrypt off`` brings plain replies back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from carrier.auth.keyring import Keyring
from carrier.jobs.manager import JobView
from carrier.mail.replies import Section


@dataclass(frozen=True, slots=True)
class ReplyCrypto:
    """How one reply goes out: encrypted to ``key``, signed only, or withheld (``withheld`` says why)."""

    key: str | None = None
    withheld: str | None = None


def key_can_encrypt(keyring: Keyring, fingerprint: str | None, now: float) -> bool:
    """Whether ``fingerprint`` is in the keyring with a live encryption subkey."""
    info = keyring.key(fingerprint) if fingerprint else None
    return info is not None and info.can_encrypt and not info.revoked and not info.expired(now)


def wants_encryption(mode: str, incoming_encrypted: bool) -> bool:
    """``always``: yes; ``never``: no; ``auto``: when the mail being answered was encrypted."""
    return mode == "always" or (mode == "auto" and incoming_encrypted)


def withheld_reason(mode: str) -> str:
    """What a withheld reply tells the user (no key material, no content)."""
    why = ("your setting is `encrypt always`" if mode == "always"
           else "your mail came encrypted (setting `encrypt auto`)")
    return (f"This reply is NOT encrypted and its content is withheld: {why}, but your key has no usable "
            "encryption subkey (none, expired or revoked). Only the status of each command is shown. "
            "Add an encryption subkey to your key (publish it and enroll it again), or send "
            "`settings encrypt off` to get signed-only replies.")


def reply_crypto(
    keyring: Keyring, fingerprint: str | None, mode: str, incoming_encrypted: bool, now: float
) -> ReplyCrypto:
    """How a reply to the user with key ``fingerprint`` and setting ``mode`` goes out."""
    if not wants_encryption(mode, incoming_encrypted):
        return ReplyCrypto()
    if key_can_encrypt(keyring, fingerprint, now):
        return ReplyCrypto(key=fingerprint)
    return ReplyCrypto(withheld=withheld_reason(mode))


_SHOWN = {"ok": "done", "accepted": "accepted", "error": "not understood", "denied": "refused"}


def withheld_sections(reason: str, sections: Sequence[Section]) -> list[Section]:
    """A withheld reply: ``reason``, then each command's number, status and job id (no line, no text)."""
    out = [Section("", "denied", reason)]
    for n, section in enumerate(sections, start=1):
        job = f" (job {section.job})" if section.job else ""
        out.append(Section("", "ok", f"command {n}: {_SHOWN.get(section.status, section.status)}{job}"))
    return out


def withheld_result(reason: str, view: JobView) -> list[Section]:
    """A withheld job result or progress mail: ``reason``, the job's id and status (no output)."""
    return [Section("", "denied", reason), Section("", "ok", f"job {view.id}: {view.status}")]
