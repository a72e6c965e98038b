"""Bearer tokens for the MCP HTTP door: random 256-bit, shown once, stored as sha256 only.

A presented token is looked up by its digest (an index lookup: no comparison loop over stored
tokens that could leak timing), and the digest found is compared with ``hmac.compare_digest``.
Every failure gives the client the same answer; the reason (unknown, expired, revoked) goes to
the audit trail only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from carrier.auth.errors import TokenError
from carrier.auth.policy import Identity, check_scopes
from carrier.formats import TOKEN_RE
from carrier.store import Store, TokenRecord, check_token_id

TOKEN_BYTES = 32  # 256 bits
#: What ``secrets.token_urlsafe(32)`` produces: 43 characters of the URL-safe alphabet (one place:
#: ``carrier remote`` checks a token's form with the same pattern before sending it).
_TOKEN_RE = TOKEN_RE
INVALID = "invalid, expired or revoked token"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just made: ``token`` is the only copy and is shown once; ``record`` is what is kept."""

    token: str
    record: TokenRecord


class Tokens:
    """Issue, check, list and revoke MCP bearer tokens."""

    def __init__(
        self, store: Store, *, roles: Collection[str], default_ttl: int, max_ttl: int
    ) -> None:
        self.store = store
        self.roles = roles
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl

    def issue(
        self, owner: str, role: str, *, scopes: Sequence[str] = (), ttl: int | None = None
    ) -> IssuedToken:
        """A new token for ``owner`` with ``role`` narrowed by ``scopes``, valid ``ttl`` seconds."""
        if not owner:
            raise TokenError("a token needs an owner", reason="bad_request")
        if role not in self.roles:
            raise TokenError(f"role {role!r} is not defined: roles are {', '.join(sorted(self.roles))}",
                             reason="bad_request")
        unknown = check_scopes(scopes)
        if unknown:
            raise TokenError(f"unknown scope(s) {', '.join(unknown)}: use tools:run|jobs|mail|* or "
                             "hosts:<pattern>", reason="bad_request")
        lifetime = self.default_ttl if ttl is None else ttl
        if lifetime <= 0 or lifetime > self.max_ttl:
            raise TokenError(f"a token lifetime must be 1 to {self.max_ttl} seconds (auth.token_max_ttl), "
                             f"not {lifetime}", reason="bad_request")
        token = new_token()
        record = self.store.add_token(token_hash(token), owner=owner, role=role, scopes=list(scopes),
                                      expires_at=self.store.clock() + lifetime)
        return IssuedToken(token, record)

    def check(self, token: str | None) -> TokenRecord:
        """The live token record for ``token``; TokenError (same message for every cause) otherwise.

        Records the use (last_used_at).
        """
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise TokenError(INVALID, reason="malformed")
        digest = token_hash(token)
        record = self.store.find_token(digest)
        if record is None or not hmac.compare_digest(record.token_hash, digest):
            raise TokenError(INVALID, reason="unknown")
        if record.revoked_at is not None:
            raise TokenError(INVALID, reason="revoked")
        if record.expires_at is not None and record.expires_at <= self.store.clock():
            raise TokenError(INVALID, reason="expired")
        self.store.touch_token(record.id)
        return record

    def identity(self, token: str | None) -> Identity:
        """The identity acting through ``token`` (role and scopes from the token)."""
        record = self.check(token)
        return Identity(name=record.owner, role=record.role, door="mcp", scopes=record.scopes,
                        token_id=record.id)

    def revoke(self, token_id: str) -> bool:
        check_token_id(token_id)
        return self.store.revoke_token(token_id)

    def revoke_owner(self, owner: str) -> int:
        return self.store.revoke_tokens_of(owner)

    def list_tokens(self, owner: str | None = None) -> list[TokenRecord]:
        return self.store.list_tokens(owner)
