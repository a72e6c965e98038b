"""The trust layer wired from a configuration: one object the doors and the CLI build once.

Parts that need gpg (keyring, key finder, mail authentication) are made on first use, so
``carrier token list`` or ``carrier audit`` work without touching the GnuPG home.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

from carrier.auth.audit import Audit, open_audit
from carrier.auth.directory import Directory
from carrier.auth.enrollment import Enrollment
from carrier.auth.keyring import Keyring
from carrier.auth.keyserver import KeyFinder
from carrier.auth.mailauth import MailAuthenticator
from carrier.auth.netgate import HttpGuard, NetGate
from carrier.auth.policy import Policy
from carrier.auth.ratelimit import RateLimiter
from carrier.auth.tokens import Tokens
from carrier.config import Config
from carrier.store import Store


class Trust:
    def __init__(self, config: Config, store: Store, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock or store.clock

    @cached_property
    def keyring(self) -> Keyring:
        return Keyring.for_state_dir(self.config.gnupg_home, self.config.state_dir)

    @cached_property
    def finder(self) -> KeyFinder:
        ks = self.config.keyserver
        return KeyFinder(self.keyring, keyserver_url=ks.url, timeout=ks.timeout, wkd=ks.wkd,
                         wkd_base=ks.wkd_url)

    @cached_property
    def directory(self) -> Directory:
        return Directory(self.config, self.store)

    @cached_property
    def audit(self) -> Audit:
        """The keyed audit trail; its key (outside the state directory) is made at first start."""
        return open_audit(self.config, self.store)

    @cached_property
    def policy(self) -> Policy:
        return Policy.from_config(self.config)

    @cached_property
    def mailauth(self) -> MailAuthenticator:
        auth = self.config.auth
        return MailAuthenticator(self.keyring, self.store, self.directory, finder=self.finder,
                                 max_age=auth.signature_max_age, skew=auth.clock_skew, clock=self.clock)

    @cached_property
    def enrollment(self) -> Enrollment:
        """Full enrollment (by mail too): builds the keyring."""
        return Enrollment(self.config, self.store, directory=self.directory, audit=self.audit,
                          finder=self.finder, mailauth=self.mailauth, clock=self.clock)

    @cached_property
    def local_enrollment(self) -> Enrollment:
        """approve/deny/revoke/list only (the CLI): no keyring needed."""
        return Enrollment(self.config, self.store, directory=self.directory, audit=self.audit,
                          clock=self.clock)

    @cached_property
    def tokens(self) -> Tokens:
        auth = self.config.auth
        return Tokens(self.store, roles=set(self.config.roles), default_ttl=auth.token_ttl,
                      max_ttl=auth.token_max_ttl)

    @cached_property
    def limiter(self) -> RateLimiter:
        return RateLimiter.from_config(self.config, self.store)

    @cached_property
    def http_guard(self) -> HttpGuard:
        gate = NetGate(self.config.mcp.ip_allow, self.config.mcp.ip_deny)
        return HttpGuard(gate, self.tokens, self.limiter)
