"""Errors of the trust layer. Each carries a stable ``reason`` code (for replies, audit and tests)
and a one-line message that says what is wrong and what to do."""

from __future__ import annotations

from carrier.errors import CarrierError


class AuthError(CarrierError):
    """A trust decision said no, or a trust operation could not be done."""

    reason = "denied"

    def __init__(self, message: str, *, reason: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message, exit_code=exit_code)
        if reason is not None:
            self.reason = reason


class VerificationError(AuthError):
    """A signature is missing, bad, or not made by the expected key.

    Reasons: ``unsigned``, ``malformed``, ``bad_signature``, ``unknown_key``, ``wrong_key``,
    ``expired_key``, ``revoked_key``, ``multiple_signatures``, ``stale``, ``future``, ``replay``,
    ``not_enrolled``, ``gpg``.
    """

    reason = "bad_signature"


class KeyDiscoveryError(AuthError):
    """No acceptable key for an address: none found, wrong UID, expired, revoked, or a lookup failed.

    Reasons: ``not_found``, ``no_matching_uid``, ``expired_key``, ``revoked_key``, ``ambiguous``,
    ``unusable``, ``lookup_failed``, ``bad_key_data``.
    """

    reason = "not_found"


class EnrollmentError(AuthError):
    """An enrollment step cannot be taken (unknown request, wrong state, stale, not an admin...)."""

    reason = "enrollment"


class TokenError(AuthError):
    """A bearer token is unknown, expired or revoked (never says which to the client)."""

    reason = "bad_token"


class RateLimited(AuthError):
    """Too many requests: ``retry_after`` seconds until the next one is allowed."""

    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
