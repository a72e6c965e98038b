"""Enrollment: a persisted state machine from ``enroll`` to an enrolled key with a role.

    request ──► challenged ──(signed nonce)──► verified ──(admin's signed approve)──► approved
                    │                              └──(admin's signed deny)──► denied
                    └──(challenge_ttl passes)──► expired          approved ──(revoke)──► revoked

- ``request``: the sender's key is found (attached, WKD, keyserver) and checked; a random nonce
  is made, only its sha256 is stored, with an expiry (``auth.challenge_ttl``). While a request is
  open, another ``enroll`` gets the same answer ("a challenge is pending until ..."): a new
  challenge never silently replaces the old one.
- ``respond``: the reply must be signed by exactly the discovered key, fresh and not replayed, and
  carry the nonce; the nonce is used once (compare-and-set ``challenged`` -> ``verified``).
- ``admin_mail``: an approve/deny mail, signed by the key configured for that admin address; only
  ``approve <request> [as <role>]`` / ``deny <request>`` on a line that is not quoted (``>``) counts,
  and exactly one such line must be there.
- ``approve``/``deny``/``revoke`` are also called by ``carrier enroll`` for a local admin.

Every step returns an ``Outcome``: the reply to the mail that caused it and the notices to send to
others (admins, the user). Composing and sending those mails is the gateway's job. Every step is
audited.

No backscatter: an unsigned ``enroll`` (or ``confirm``) may carry anyone's address in From, so an
outcome that found no key for the address (none anywhere, a lookup failed, a key refused), a
malformed address, or a sender over the enrollment rate limit (``limits.enroll_per_address`` and
``enroll_per_domain`` per ``enroll_window``) has ``answer=False``: the door sends nothing and the
reason is logged and audited. A reply never carries lookup internals (servers, errno texts).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from carrier.auth.audit import Audit
from carrier.auth.directory import Directory
from carrier.auth.errors import AuthError, EnrollmentError, KeyDiscoveryError, VerificationError
from carrier.auth.keyring import normalize_address, normalize_fingerprint
from carrier.auth.keyserver import KeyFinder, check_address
from carrier.auth.mailauth import MailAuthenticator, sender_of
from carrier.auth.ratelimit import RateLimiter, enroll_keys
from carrier.config import Config
from carrier.store import KEEP, EnrollmentRecord, Store, check_enrollment_id

log = logging.getLogger(__name__)

NONCE_BYTES = 16  # 128 bits, written as 32 hex digits
_NONCE_RE = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
_DECISION_RE = re.compile(
    r"\s*(approve|deny)\s+(r-[a-z2-7]{12})(?:\s+as\s+([A-Za-z0-9_.-]+))?\s*[.!]?\s*", re.IGNORECASE
)
OPEN_STATES = ("requested", "challenged", "verified")


def nonce_hash(nonce: str) -> str:
    return hashlib.sha256(nonce.encode("ascii")).hexdigest()


def unquoted_lines(text: str) -> list[str]:
    """The lines a person wrote: not quoted (``>``), and nothing after a ``-- `` signature line."""
    out: list[str] = []
    for line in text.splitlines():
        if line.rstrip() == "--":
            break  # "-- " starts the signature block (trailing space is often stripped)
        if line.lstrip().startswith(">"):
            continue
        out.append(line)
    return out


@dataclass(frozen=True, slots=True)
class ParsedDecision:
    verb: str  # approve | deny
    request_id: str
    role: str | None


def parse_decision(text: str) -> ParsedDecision:
    """The one ``approve``/``deny`` line of an admin's mail; EnrollmentError when none or several."""
    found = []
    for line in unquoted_lines(text):
        match = _DECISION_RE.fullmatch(line)
        if match:
            verb, request_id, role = match.group(1).lower(), match.group(2).lower(), match.group(3)
            if verb == "deny" and role:
                raise EnrollmentError("`deny` takes no role: write `deny <request>`", reason="grammar")
            found.append(ParsedDecision(verb, request_id, role))
    if not found:
        raise EnrollmentError("no decision found: write `approve <request> [as <role>]` or "
                              "`deny <request>` on a line of its own (quoted lines do not count)",
                              reason="grammar")
    if len(set(found)) > 1:
        raise EnrollmentError("more than one decision in one mail: send one approve or deny per mail",
                              reason="grammar")
    return found[0]


def find_nonce(text: str) -> str | None:
    """The challenge nonce on the unquoted lines (None when there is none or more than one)."""
    nonces = {m.group(0) for line in unquoted_lines(text) for m in _NONCE_RE.finditer(line)}
    return nonces.pop() if len(nonces) == 1 else None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True, slots=True)
class Notice:
    """A mail to send to someone other than the sender of the mail being handled."""

    to: str
    subject: str
    text: str


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str
    reply: str
    request: EnrollmentRecord | None = None
    notices: tuple[Notice, ...] = ()
    #: Encrypt the reply to this key (the challenge: only the key's owner can read the nonce).
    encrypt_to: str | None = None
    #: Send ``reply`` to the sender at all (False: no key is known for the address, or it is over
    #: the enrollment rate limit; an answer would make Carrier a reflector).
    answer: bool = True


class Enrollment:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        directory: Directory,
        audit: Audit,
        finder: KeyFinder | None = None,
        mailauth: MailAuthenticator | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.finder = finder
        self.directory = directory
        self.mailauth = mailauth
        self.audit = audit
        self.clock = clock or store.clock
        self._limiters = RateLimiter.enroll_limiters(config, store)

    # ----------------------------------------------------------------- helpers

    def _mail_parts(self) -> tuple[KeyFinder, MailAuthenticator]:
        if self.finder is None or self.mailauth is None:
            raise EnrollmentError("enrollment by mail needs the keyring: build Enrollment with a finder "
                                  "and a mail authenticator", reason="setup")
        return self.finder, self.mailauth

    def _admin_addresses(self) -> list[str]:
        seen: list[str] = []
        for address in [a.email for a in self.config.admins] + list(self.config.admin_contacts):
            norm = normalize_address(address)
            if norm not in seen:
                seen.append(norm)
        return seen

    def _open(self, address: str) -> EnrollmentRecord | None:
        found = self.store.find_enrollments(email=address, state=OPEN_STATES, limit=1)
        return found[0] if found else None

    def _expire_if_stale(self, record: EnrollmentRecord) -> EnrollmentRecord:
        expires = record.nonce_expires_at
        if record.state == "challenged" and expires is not None and expires <= self.clock():
            self.store.update_enrollment(record.id, state="expired", expect=["challenged"], nonce_hash=None)
            self.audit.record(record.email, "system", "enroll:expire", target=record.id, outcome="expired")
            return self.store.get_enrollment(record.id) or record
        return record

    def _pending_answer(self, record: EnrollmentRecord) -> Outcome:
        if record.state == "verified":
            return Outcome("pending", f"Your enrollment request {record.id} is confirmed and waits for an "
                           "admin's decision. You will get a mail when it is decided.", record)
        until = _when(record.nonce_expires_at or record.created_at)
        return Outcome("pending", f"An enrollment challenge ({record.id}) was already sent to this address "
                       f"and is valid until {until}. Reply to that mail with its confirm line, signed "
                       "with your key. No new challenge is sent while it is valid.", record)

    def _get(self, request_id: str) -> EnrollmentRecord:
        try:
            check_enrollment_id(request_id)
        except ValueError as exc:
            raise EnrollmentError(str(exc), reason="unknown_request") from None
        record = self.store.get_enrollment(request_id)
        if record is None:
            raise EnrollmentError(f"no enrollment request {request_id}", reason="unknown_request")
        return record

    # ----------------------------------------------------------------- 1: enroll

    def _silent(self, address: str, door: str, status: str, reply: str, *, outcome: str | None = None,
                **detail: object) -> Outcome:
        """An outcome nobody is answered for: logged and audited with its reason instead."""
        audited = outcome or status
        log.info("enrollment request not answered", extra={"address": address, "outcome": audited, **detail})
        self.audit.record(address, door, "enroll:request", outcome=audited, detail=dict(detail))
        return Outcome(status, reply, answer=False)

    def _over_limit(self, address: str) -> float | None:
        """Seconds to wait when ``address`` or its domain used up its enrollment requests, else None
        (both buckets are charged either way)."""
        waits = [state.retry_after for limiter, key in zip(self._limiters, enroll_keys(address), strict=True)
                 if not (state := limiter.take(key)).allowed]
        return max(waits) if waits else None

    def request(self, address: str, *, attached: Sequence[bytes] = (), door: str = "mail") -> Outcome:
        """Start enrolling ``address``: find its key, send a challenge (or say why not)."""
        try:
            address = check_address(address)
        except KeyDiscoveryError as exc:
            return self._silent(address[:200], door, "refused", "That is not a plain mail address.",
                                reason=exc.reason)
        enrolled = self.directory.identity(address)
        if enrolled is not None:
            self.audit.record(address, door, "enroll:request", outcome="already_enrolled")
            return Outcome("already_enrolled", f"{address} is already enrolled (key {enrolled.fingerprint}, "
                           f"role {enrolled.role}). To change keys, ask an admin to revoke the old one "
                           "first.")
        current = self._open(address)
        if current is not None:
            current = self._expire_if_stale(current)
            if current.state in OPEN_STATES:
                self.audit.record(address, door, "enroll:request", target=current.id, outcome="pending")
                return self._pending_answer(current)
        # Charged only where a lookup (WKD, keyserver) and a challenge mail would follow.
        wait = self._over_limit(address)
        if wait is not None:
            return self._silent(address, door, "rate_limited", "Too many enrollment requests for this "
                                "address or its domain: try again later.", retry_after=round(wait))
        finder, _ = self._mail_parts()
        try:
            found = finder.find(address, attached, now=self.clock())
        except KeyDiscoveryError as exc:
            return self._silent(address, door, "no_key", f"Carrier found no usable OpenPGP key for "
                                f"{address}: attach your public key (application/pgp-keys) or publish it "
                                "(WKD or keys.openpgp.org), then send `enroll` again.", reason=exc.reason,
                                error=str(exc))
        if self.directory.revoked(found.fingerprint):
            return self._silent(address, door, "refused", f"The key {found.fingerprint} was revoked in "
                                "Carrier: enroll with a new key.", outcome="revoked_key",
                                fingerprint=found.fingerprint)
        nonce = secrets.token_hex(NONCE_BYTES)
        expires = self.clock() + self.config.auth.challenge_ttl
        with self.store.transaction():
            # Re-checked under the write lock: two enroll mails at once make one challenge.
            again = self._open(address)
            if again is not None:
                return self._pending_answer(again)
            record = self.store.create_enrollment(address, fingerprint=found.fingerprint, state="challenged",
                                                  nonce_hash=nonce_hash(nonce), nonce_expires_at=expires)
        self.audit.record(address, door, "enroll:request", target=record.id, outcome="challenged",
                          detail={"fingerprint": found.fingerprint, "source": found.source})
        reply = (
            f"Carrier received an enrollment request for {address} ({record.id}).\n"
            f"Key: {found.fingerprint} (found: {found.source})\n\n"
            "To confirm, reply with this line, signed with that key (PGP/MIME or clear-signed):\n\n"
            f"confirm {nonce}\n\n"
            f"The challenge can be used once, until {_when(expires)}. If you did not ask for this, "
            "ignore this mail."
        )
        return Outcome("challenged", reply, record, encrypt_to=found.fingerprint)

    # ----------------------------------------------------------------- 2: the signed nonce

    def respond(self, raw: bytes, *, message_key: str, received_at: float | None = None) -> Outcome:
        """The requester's signed reply to the challenge. VerificationError when the signature fails."""
        _, mailauth = self._mail_parts()
        address = sender_of(raw)
        found = self.store.find_enrollments(email=address, limit=1)
        if not found:  # no key is known for the address: an answer would be backscatter
            log.info("confirm without an enrollment not answered", extra={"address": address})
            return Outcome("unknown", "No enrollment is in progress for this address: send `enroll` first.",
                           answer=False)
        record = self._expire_if_stale(found[0])
        if record.state == "expired":
            return Outcome("stale", f"The challenge of request {record.id} has expired: send `enroll` again "
                           "for a new one.", record)
        if record.state == "verified":
            return Outcome("repeated", f"Request {record.id} is already confirmed; it waits for an admin.",
                           record)
        if record.state != "challenged":
            return Outcome("repeated", f"Request {record.id} is {record.state}: nothing to confirm.", record)
        assert record.fingerprint is not None and record.nonce_hash is not None
        try:
            signature = mailauth.verify_as(raw, address=address, fingerprint=record.fingerprint,
                                                message_key=message_key, received_at=received_at)
        except VerificationError as exc:
            self.audit.record(address, "mail", "enroll:confirm", target=record.id, outcome="bad_signature",
                              detail={"reason": exc.reason})
            raise
        nonce = find_nonce(signature.text)
        if nonce is None or not hmac.compare_digest(nonce_hash(nonce), record.nonce_hash):
            self.audit.record(address, "mail", "enroll:confirm", target=record.id, outcome="wrong_nonce")
            return Outcome("wrong_nonce", "The signed reply does not carry the current challenge: reply to "
                           "the challenge mail with its confirm line.", record)
        if not self.store.update_enrollment(record.id, state="verified", expect=["challenged"],
                                            nonce_hash=None, nonce_expires_at=None):
            return Outcome("repeated", f"Request {record.id} was already answered.", record)
        updated = self.store.get_enrollment(record.id) or record
        self.audit.record(address, "mail", "enroll:confirm", target=record.id, outcome="verified",
                          detail={"fingerprint": record.fingerprint})
        roles = ", ".join(sorted(self.config.roles))
        admin_text = (
            f"Enrollment request {record.id}\n"
            f"Address: {address}\n"
            f"Key: {record.fingerprint}\n"
            "The requester signed Carrier's challenge with this key.\n\n"
            "To decide, reply with ONE of these lines, signed with your admin key:\n\n"
            f"approve {record.id} as <role>\n"
            f"deny {record.id}\n\n"
            f"Roles: {roles}. Without `as <role>` the role is {self.config.auth.default_role}."
        )
        notices = tuple(Notice(to, f"Enrollment request {record.id} from {address}", admin_text)
                        for to in self._admin_addresses())
        return Outcome("verified", f"Thank you: request {record.id} is confirmed. An admin will decide; "
                       "you will get a mail then.", updated, notices)

    # ----------------------------------------------------------------- 3: an admin decides

    def admin_mail(self, raw: bytes, *, message_key: str, received_at: float | None = None) -> Outcome:
        """An admin's signed ``approve``/``deny`` mail. VerificationError when not from an admin's key."""
        _, mailauth = self._mail_parts()
        address = sender_of(raw)
        admin = self.directory.admin(address)
        if admin is None:
            self.audit.record(address, "mail", "enroll:decide", outcome="not_admin")
            raise VerificationError(f"{address} is not an admin", reason="not_admin")
        try:
            signature = mailauth.verify_as(raw, address=address, fingerprint=admin.fingerprint,
                                                message_key=message_key, received_at=received_at)
        except VerificationError as exc:
            self.audit.record(address, "mail", "enroll:decide", outcome="bad_signature",
                              detail={"reason": exc.reason})
            raise
        try:
            decision = parse_decision(signature.text)
        except EnrollmentError as exc:
            return Outcome("refused", str(exc))
        if decision.verb == "approve":
            return self.approve(decision.request_id, by=admin.fingerprint, door="mail", role=decision.role)
        return self.deny(decision.request_id, by=admin.fingerprint, door="mail")

    def _decided_answer(self, record: EnrollmentRecord) -> Outcome:
        if record.state == "approved":
            text = f"Request {record.id} is already approved (role {record.role}, by {record.decided_by})."
        elif record.state == "denied":
            text = f"Request {record.id} is already denied (by {record.decided_by})."
        elif record.state in ("requested", "challenged"):
            text = f"Request {record.id} is not confirmed by the requester yet: nothing to decide."
        else:
            text = f"Request {record.id} is {record.state}: nothing to decide."
        return Outcome("repeated", text, record)

    def approve(self, request_id: str, *, by: str, door: str, role: str | None = None) -> Outcome:
        """Enroll the requester of ``request_id`` with ``role`` (default ``auth.default_role``)."""
        record = self._get(request_id)
        if record.state != "verified":
            return self._decided_answer(record)
        chosen = role or self.config.auth.default_role
        if chosen not in self.config.roles:
            roles = ", ".join(sorted(self.config.roles))
            return Outcome("refused", f"role {chosen!r} is not defined: roles are {roles} "
                           f"(write `approve {record.id} as <role>`)", record)
        if record.fingerprint and self.directory.revoked(record.fingerprint):
            return Outcome("refused", f"the key {record.fingerprint} was revoked: the requester must enroll "
                           "a new key", record)
        if not self.store.update_enrollment(record.id, state="approved", expect=["verified"], role=chosen,
                                            decided_by=by):
            return self._decided_answer(self._get(request_id))
        updated = self._get(request_id)
        self.audit.record(by, door, "enroll:approve", target=record.id, outcome="approved",
                          detail={"email": record.email, "fingerprint": record.fingerprint, "role": chosen})
        user_text = (f"You are enrolled in Carrier as {record.email} with role {chosen}.\n"
                     f"Sign every command mail with your key {record.fingerprint}.")
        return Outcome("approved", f"Approved {record.id}: {record.email} is enrolled as {chosen}.", updated,
                       (Notice(record.email, "Carrier enrollment approved", user_text),))

    def deny(self, request_id: str, *, by: str, door: str) -> Outcome:
        record = self._get(request_id)
        if record.state not in ("verified", "challenged", "requested"):
            return self._decided_answer(record)
        if not self.store.update_enrollment(record.id, state="denied", expect=list(OPEN_STATES),
                                            decided_by=by, nonce_hash=None):
            return self._decided_answer(self._get(request_id))
        self.audit.record(by, door, "enroll:deny", target=record.id, outcome="denied",
                          detail={"email": record.email, "fingerprint": record.fingerprint})
        return Outcome("denied", f"Denied {record.id} ({record.email}).", self._get(request_id),
                       (Notice(record.email, "Carrier enrollment denied",
                               "Your enrollment request was denied by an admin."),))

    # ----------------------------------------------------------------- revocation

    def revoke(self, fingerprint: str, *, by: str, door: str) -> Outcome:
        """Revoke a key: its approved enrollments end, carrier.yml users with it are blocked, tokens die."""
        try:
            fpr = normalize_fingerprint(fingerprint)
        except AuthError as exc:
            return Outcome("refused", str(exc))
        if self.directory.revoked(fpr):
            return Outcome("repeated", f"key {fpr} is already revoked")
        owners = self.directory.owner_of(fpr)
        if not owners:
            return Outcome("unknown", f"no enrolled key {fpr}")
        with self.store.transaction():
            for record in self.store.find_enrollments(fingerprint=fpr, state="approved"):
                self.store.update_enrollment(record.id, state="revoked", expect=["approved"], decided_by=by,
                                             role=KEEP)
            if not self.directory.revoked(fpr):
                # A key from carrier.yml: a marker row blocks it until the file is changed.
                self.store.create_enrollment(owners[0], fingerprint=fpr, state="revoked")
            tokens = sum(self.store.revoke_tokens_of(owner) for owner in owners)
        self.audit.record(by, door, "enroll:revoke", target=fpr, outcome="revoked",
                          detail={"emails": owners, "tokens_revoked": tokens})
        notices = tuple(Notice(o, "Carrier key revoked", f"Your key {fpr} was revoked in Carrier by an "
                               "admin. Mail signed with it runs nothing.") for o in owners)
        return Outcome("revoked", f"Revoked {fpr} ({', '.join(owners)}); {tokens} token(s) revoked.",
                       None, notices)

    # ----------------------------------------------------------------- listing and upkeep

    def pending(self, states: Sequence[str] | None = None, *, limit: int = 100) -> list[EnrollmentRecord]:
        """Requests in ``states`` (default: all), newest first."""
        return self.store.find_enrollments(state=list(states) if states else None, limit=limit)

    def expire_stale(self) -> int:
        """Mark every challenge past its expiry as expired; return how many."""
        count = 0
        for record in self.store.find_enrollments(state="challenged", limit=10_000):
            if self._expire_if_stale(record).state == "expired":
                count += 1
        return count
