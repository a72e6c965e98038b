"""Whether a reply to a user goes out encrypted: their ``encrypt`` setting (``settings encrypt
on|off|auto``, kept in the store) and, for ``auto``, whether their own mail came encrypted
(Autocrypt-style). Encrypting needs a usable encryption subkey; without one the reply is signed
only (``settings encrypt on`` is refused up front for such a key)."""

from __future__ import annotations

from carrier.auth.keyring import Keyring


def key_can_encrypt(keyring: Keyring, fingerprint: str | None, now: float) -> bool:
    """Whether ``fingerprint`` is in the keyring with a live encryption subkey."""
    info = keyring.key(fingerprint) if fingerprint else None
    return info is not None and info.can_encrypt and not info.revoked and not info.expired(now)


def wants_encryption(mode: str, incoming_encrypted: bool) -> bool:
    """``always``: yes; ``never``: no; ``auto``: when the mail being answered was encrypted."""
    return mode == "always" or (mode == "auto" and incoming_encrypted)


def reply_key(
    keyring: Keyring, fingerprint: str | None, mode: str, incoming_encrypted: bool, now: float
) -> str | None:
    """The key to encrypt a reply to, or None for a signed-only reply."""
    if not wants_encryption(mode, incoming_encrypted):
        return None
    return fingerprint if key_can_encrypt(keyring, fingerprint, now) else None
