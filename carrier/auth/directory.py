"""Who is enrolled: users and admins from carrier.yml, plus enrollments approved through the flow.

A user is a mail address bound to one key fingerprint and a role. A fingerprint revoked through
``revoke`` stays revoked (also for a user listed in carrier.yml): the person enrolls a new key.
Admins are configured by fingerprint; the address next to it only says where to write to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from carrier.auth.keyring import normalize_address
from carrier.auth.policy import Identity
from carrier.config import Admin, Config
from carrier.store import Store

#: The role an admin acts with when carrier.yml does not also list them as a user.
ADMIN_ROLE = "admin"


@dataclass(frozen=True, slots=True)
class Enrolled:
    email: str
    fingerprint: str
    role: str
    source: str  # "config" or the enrollment request id


class Directory:
    """Looks up identities; reads carrier.yml and the store, writes nothing."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._admin_fprs = frozenset(a.fingerprint for a in config.admins)

    def is_admin_fingerprint(self, fingerprint: str) -> bool:
        return fingerprint.upper() in self._admin_fprs

    def admin(self, address: str) -> Admin | None:
        """The admin entry whose address is ``address`` (its fingerprint is what counts)."""
        wanted = normalize_address(address)
        for admin in self.config.admins:
            if normalize_address(admin.email) == wanted and not self.revoked(admin.fingerprint):
                return admin
        return None

    def revoked(self, fingerprint: str) -> bool:
        return bool(self.store.find_enrollments(fingerprint=fingerprint.upper(), state="revoked", limit=1))

    def enrolled(self, address: str) -> Enrolled | None:
        """The live enrollment of ``address``: carrier.yml first, then the newest approved request."""
        wanted = normalize_address(address)
        for user in self.config.users:
            if normalize_address(user.email) == wanted:
                if self.revoked(user.fingerprint):
                    return None
                return Enrolled(wanted, user.fingerprint, user.role, "config")
        for record in self.store.find_enrollments(email=wanted, state="approved", limit=1):
            if record.fingerprint and record.role and not self.revoked(record.fingerprint):
                return Enrolled(wanted, record.fingerprint, record.role, record.id)
        return None

    def identity(self, address: str, door: str = "mail") -> Identity | None:
        """The identity mail from ``address`` acts as (users, then admins), or None."""
        enrolled = self.enrolled(address)
        if enrolled is not None:
            return Identity(name=enrolled.email, role=enrolled.role, door=door,
                            fingerprint=enrolled.fingerprint,
                            admin=self.is_admin_fingerprint(enrolled.fingerprint))
        admin = self.admin(address)
        if admin is not None:
            return Identity(name=normalize_address(admin.email), role=ADMIN_ROLE, door=door,
                            fingerprint=admin.fingerprint, admin=True)
        return None

    def owner_of(self, fingerprint: str) -> list[str]:
        """Addresses enrolled with ``fingerprint`` (carrier.yml users, approved requests, admins)."""
        fpr = fingerprint.upper()
        found = [normalize_address(u.email) for u in self.config.users if u.fingerprint == fpr]
        found += [normalize_address(a.email) for a in self.config.admins if a.fingerprint == fpr]
        found += [r.email for r in self.store.find_enrollments(fingerprint=fpr, state="approved")]
        return sorted(set(found))

    def with_role(self, role: str) -> list[str]:
        """Addresses of everyone enrolled now whose mail acts with ``role`` (admins: ``admin``)."""
        candidates = {normalize_address(u.email) for u in self.config.users}
        candidates |= {normalize_address(a.email) for a in self.config.admins}
        candidates |= {r.email for r in self.store.find_enrollments(state="approved", limit=1000)}
        found = []
        for address in sorted(candidates):
            who = self.identity(address)
            if who is not None and (who.role == role or (role == ADMIN_ROLE and who.admin)):
                found.append(address)
        return found
