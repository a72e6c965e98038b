"""Rate limits: a token bucket per key (identity, token, source address), kept in the store.

A bucket holds up to ``limits.rate_limit`` requests and refills at ``rate_limit`` per
``rate_limit_window`` seconds. The state is in SQLite, so restarting Carrier does not give an
attacker a fresh budget, and several Carrier processes share it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from carrier.auth.errors import RateLimited
from carrier.config import Config
from carrier.store import Store
from carrier.store.auth import BucketState, prune_buckets, take_from_bucket


def identity_key(name: str) -> str:
    return f"id:{name.strip().casefold()}"


def enroll_keys(address: str) -> tuple[str, str]:
    """The enrollment buckets of ``address``: one for the address, one for its domain (a stranger
    rotating local parts of one domain still runs dry)."""
    norm = address.strip().casefold()
    return f"enroll:{norm}", f"enroll-domain:{norm.rpartition('@')[2]}"


def token_key(token_id: str) -> str:
    return f"token:{token_id}"


def address_key(address: str) -> str:
    """One bucket per IPv4 address, one per IPv6 /64 (a host gets a whole /64 to rotate through)."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return f"addr:{address.strip()}"
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return f"addr:{mapped}"
        return f"addr:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"addr:{ip}"


@dataclass(frozen=True, slots=True)
class RateLimiter:
    store: Store
    rate: int
    window: float

    @classmethod
    def from_config(cls, config: Config, store: Store) -> RateLimiter:
        return cls(store, config.limits.rate_limit, float(config.limits.rate_limit_window))

    def take(self, key: str, cost: float = 1.0) -> BucketState:
        return take_from_bucket(self.store, key, capacity=float(self.rate),
                                refill_per_second=self.rate / self.window, cost=cost)

    def check(self, *keys: str, cost: float = 1.0) -> None:
        """Take from every bucket in ``keys``; RateLimited (with the longest wait) if any is empty.

        Every bucket is charged even when an earlier one refuses: a client over one limit keeps
        paying on the others.
        """
        waits = [state.retry_after for state in (self.take(k, cost) for k in keys) if not state.allowed]
        if waits:
            wait = max(waits)
            raise RateLimited(f"too many requests: try again in {wait:.0f} s", retry_after=wait)

    @classmethod
    def enroll_limiters(cls, config: Config, store: Store) -> tuple[RateLimiter, RateLimiter]:
        """The per-address and per-domain limiters of ``enroll`` (``limits.enroll_*``)."""
        window = float(config.limits.enroll_window)
        return (cls(store, config.limits.enroll_per_address, window),
                cls(store, config.limits.enroll_per_domain, window))

    def prune(self) -> int:
        """Forget buckets idle long enough to be full again."""
        return prune_buckets(self.store, self.store.clock() - 2 * self.window)
