"""Command authentication for mail: the enrolled key of the From address, fresh, never seen before.

1. The From header names exactly one address; that address must be enrolled (or an admin).
2. The mail is signed (PGP/MIME or inline) by exactly the fingerprint enrolled for that address:
   a valid signature by anyone else, a forged From included, fails.
3. The signature time lies within ``auth.signature_max_age`` before the time the mail was first
   seen (and at most ``auth.clock_skew`` after it).
4. The signature's digest (signer, time, signed bytes) was never seen with another mail: a
   replayed mail, re-wrapped or not, runs nothing. The same mail may be checked again (a
   resumed run after a crash), identified by its ``message_key``.
"""

from __future__ import annotations

import email.policy
from collections.abc import Callable
from dataclasses import dataclass
from email.headerregistry import Address
from email.parser import BytesHeaderParser

from carrier.auth.directory import Directory
from carrier.auth.errors import KeyDiscoveryError, VerificationError
from carrier.auth.keyring import Keyring, normalize_address
from carrier.auth.keyserver import KeyFinder
from carrier.auth.pgp import VerifiedSignature, verify_mail
from carrier.auth.policy import Identity
from carrier.store import Store
from carrier.store.auth import forget_signatures, remember_signature


@dataclass(frozen=True, slots=True)
class Authenticated:
    identity: Identity
    signature: VerifiedSignature


def sender_of(raw: bytes) -> str:
    """The one address in the From header (lower-cased); VerificationError for none, several, or groups."""
    head = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
    values = head.get_all("From") or []
    if len(values) != 1:
        raise VerificationError(f"the mail has {len(values)} From headers: exactly one is needed",
                                reason="malformed")
    try:
        addresses: tuple[Address, ...] = tuple(values[0].addresses)
    except (AttributeError, ValueError):
        addresses = ()
    if len(addresses) != 1 or not addresses[0].addr_spec or "@" not in addresses[0].addr_spec:
        raise VerificationError("the From header must name exactly one address", reason="malformed")
    return normalize_address(addresses[0].addr_spec)


class MailAuthenticator:
    def __init__(
        self,
        keyring: Keyring,
        store: Store,
        directory: Directory,
        *,
        finder: KeyFinder | None = None,
        max_age: float = 900.0,
        skew: float = 300.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.keyring = keyring
        self.store = store
        self.directory = directory
        self.finder = finder
        self.max_age = max_age
        self.skew = skew
        self.clock = clock or store.clock

    def verify_as(
        self,
        raw: bytes,
        *,
        address: str,
        fingerprint: str,
        message_key: str,
        received_at: float | None = None,
    ) -> VerifiedSignature:
        """Signed by ``fingerprint``, fresh and not a replay (steps 2-4 of the module docstring)."""
        if self.finder is not None and self.keyring.key(fingerprint) is None:
            try:
                self.finder.ensure(address, fingerprint)
            except KeyDiscoveryError as exc:
                raise VerificationError(f"the key {fingerprint} of {address} is not available: {exc}",
                                        reason="unknown_key") from None
        signature = verify_mail(self.keyring, raw, fingerprint)
        seen = self.clock() if received_at is None else received_at
        if signature.signed_at < seen - self.max_age:
            age = int(seen - signature.signed_at)
            raise VerificationError(f"the signature is {age} s old (more than {int(self.max_age)} s): "
                                    "sign the command again", reason="stale")
        if signature.signed_at > seen + self.skew:
            raise VerificationError("the signature time lies in the future: check the signer's clock",
                                    reason="future")
        if not remember_signature(self.store, signature.digest, fingerprint=signature.fingerprint,
                                  message_key=message_key, signed_at=signature.signed_at):
            raise VerificationError("this signature was already used: a replayed mail runs nothing",
                                    reason="replay")
        return signature

    def authenticate(
        self, raw: bytes, *, message_key: str, received_at: float | None = None
    ) -> Authenticated:
        """Steps 1-4: the identity of the sender and what they signed; VerificationError otherwise."""
        address = sender_of(raw)
        identity = self.directory.identity(address, door="mail")
        if identity is None or identity.fingerprint is None:
            raise VerificationError(f"{address} is not enrolled: send `enroll` first", reason="not_enrolled")
        signature = self.verify_as(raw, address=address, fingerprint=identity.fingerprint,
                                   message_key=message_key, received_at=received_at)
        return Authenticated(identity, signature)

    def forget_old(self) -> int:
        """Drop replay digests too old to pass the freshness check anyway."""
        return forget_signatures(self.store, self.clock() - self.max_age - self.skew - 86400)
