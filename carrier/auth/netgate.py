"""IP allow/deny lists for the HTTP door, and the one function that lets a request in.

The lists only narrow: an address on the allow list still needs a valid token. ``HttpGuard``
is the order every HTTP request goes through: network gate, per-address rate limit, token,
per-token and per-identity rate limits. There is no path that skips the token.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from carrier.auth.errors import AuthError
from carrier.auth.policy import Decision, Identity
from carrier.auth.ratelimit import RateLimiter, address_key, identity_key, token_key
from carrier.auth.tokens import Tokens
from carrier.config import IPNetwork


def parse_peer(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer address (IPv4-mapped IPv6 becomes IPv4), or None when it is not an IP address."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class NetGate:
    allow: Sequence[IPNetwork] = ()
    deny: Sequence[IPNetwork] = ()

    def check(self, address: str) -> Decision:
        """Deny list first, then (when there is one) the allow list. Not an authentication."""
        ip = parse_peer(address)
        if ip is None:
            return Decision(False, f"{address!r} is not an IP address")
        for net in self.deny:
            if ip.version == net.version and ip in net:
                return Decision(False, f"{ip} is in the deny list ({net})")
        if self.allow:
            for net in self.allow:
                if ip.version == net.version and ip in net:
                    return Decision(True, f"{ip} is in the allow list ({net})")
            return Decision(False, f"{ip} is not in the allow list")
        return Decision(True, "no allow list")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class HttpGuard:
    """Admits an HTTP request: gate, address rate limit, token, token/identity rate limits."""

    def __init__(self, gate: NetGate, tokens: Tokens, limiter: RateLimiter) -> None:
        self.gate = gate
        self.tokens = tokens
        self.limiter = limiter

    def admit(self, peer: str, authorization: str | None) -> Identity:
        """The identity behind the request; AuthError (403 gate, 401 token), RateLimited (429)."""
        verdict = self.gate.check(peer)
        if not verdict.allowed:
            raise AuthError(f"address not allowed: {verdict.reason}", reason="ip_denied")
        # Counted before the token check: guessing tokens costs budget too.
        self.limiter.check(address_key(peer))
        identity = self.tokens.identity(bearer_token(authorization))
        self.limiter.check(token_key(identity.token_id or ""), identity_key(identity.name))
        return identity
