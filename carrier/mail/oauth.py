"""OAuth2 for mail accounts (``auth: oauth2``): provider presets, access tokens from the refresh
token, the SASL strings for XOAUTH2 / OAUTHBEARER, and the RFC 8628 device flow of
`carrier auth mail-login`.

The token exchange is plain OAuth2 over httpx2 (installed with mcp) rather than msal or google-auth:
the refresh grant (RFC 6749 section 6) and the device grant (RFC 8628) are two form POSTs that are
the same for Google, Microsoft and any other provider; msal covers Microsoft only and google-auth
Google only, each with its own token cache and HTTP stack, and neither helps with the custom
``token_url`` a self-hosted provider has.

Access tokens are cached in memory per account and renewed ``margin`` seconds before they expire
(a quarter of their lifetime, at most two minutes); a connection logged in with a token should be
re-authenticated by then (see ``renew_at``). Tokens never appear in errors or logs: every value
is registered with the log redaction as soon as it is read or received.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carrier.config import MailAccount, OAuth2Settings
from carrier.errors import CarrierError
from carrier.log import add_secret, redact

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
MAX_MARGIN = 120.0
_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"


class OAuthError(CarrierError):
    """Getting an access token failed; the message says what to do (and holds no token)."""


@dataclass(frozen=True)
class Endpoints:
    """Where one account gets its tokens, and what it asks for."""

    token_url: str
    device_url: str | None
    scope: str | None
    #: Send ``scope`` with a refresh (Microsoft wants it; Google refuses a changed one).
    scope_on_refresh: bool


def endpoints(settings: OAuth2Settings) -> Endpoints:
    """The provider preset's endpoints and scope, with the account's overrides applied."""
    if settings.provider == "google":
        preset = Endpoints("https://oauth2.googleapis.com/token", None, "https://mail.google.com/", False)
    elif settings.provider == "microsoft":
        base = _MICROSOFT.format(tenant=settings.tenant)
        preset = Endpoints(f"{base}/token", f"{base}/devicecode",
                           "https://outlook.office.com/IMAP.AccessAsUser.All "
                           "https://outlook.office.com/SMTP.Send offline_access", True)
    else:
        preset = Endpoints(settings.token_url or "", None, None, True)
    return Endpoints(
        token_url=settings.token_url or preset.token_url,
        device_url=settings.device_url or preset.device_url,
        scope=settings.scope or preset.scope,
        scope_on_refresh=preset.scope_on_refresh,
    )


def margin(lifetime: float) -> float:
    """How long before expiry a token is renewed (and a session using it re-authenticated)."""
    return min(MAX_MARGIN, lifetime / 4)


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    #: ``time.monotonic()`` at which the provider stops accepting it.
    expires_at: float
    lifetime: float

    @property
    def renew_at(self) -> float:
        """When to stop using it: get a new one, re-authenticate sessions that logged in with it."""
        return self.expires_at - margin(self.lifetime)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


def _settings(account: MailAccount) -> OAuth2Settings:
    if account.oauth2 is None:
        raise OAuthError(f"account {account.name} has no oauth2: section (set auth: oauth2 and oauth2:)")
    return account.oauth2


def _fix(account: MailAccount) -> str:
    return f"run `carrier auth mail-login {account.name}` to get a new refresh token"


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def _post(url: str, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """POST ``form``; ``(status, JSON object)``. OAuthError for network trouble or a non-JSON answer."""
    import httpx2

    try:
        response = httpx2.post(url, data=dict(form), timeout=HTTP_TIMEOUT,
                               headers={"Accept": "application/json"})
    except httpx2.HTTPError as exc:
        raise OAuthError(f"cannot reach the OAuth2 endpoint {_host(url)}: {redact(str(exc))[:200]}") from None
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise OAuthError(f"the OAuth2 endpoint {_host(url)} answered HTTP {response.status_code} "
                         "without a JSON object: check token_url / device_url")
    return response.status_code, data


def _error_text(data: Mapping[str, Any]) -> str:
    code = str(data.get("error", "unknown_error"))[:60]
    detail = " ".join(str(data.get("error_description", "")).split())[:200]
    text = f"{code}: {detail}" if detail else code
    return redact("".join(ch for ch in text if ch.isprintable()))


def _client_form(settings: OAuth2Settings) -> dict[str, str]:
    form = {"client_id": settings.client_id}
    secret = settings.client_secret()
    if secret:
        add_secret(secret)
        form["client_secret"] = secret
    return form


# --------------------------------------------------------------------------------------------
# Access tokens (refresh grant), cached per account
# --------------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, str], AccessToken] = {}
_LOCK = threading.Lock()


def _cache_key(account: MailAccount, refresh_token: str) -> tuple[str, str]:
    return account.name, hashlib.sha256(refresh_token.encode()).hexdigest()


def access_token(account: MailAccount, *, now: Callable[[], float] = time.monotonic) -> AccessToken:
    """A usable access token for ``account``: the cached one until its ``renew_at``, else a new one."""
    refresh_token = account.password()
    add_secret(refresh_token)
    key = _cache_key(account, refresh_token)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None and now() < cached.renew_at:
            return cached
        token = _refresh(account, refresh_token, now)
        _CACHE[key] = token
        return token


def forget(account: MailAccount) -> None:
    """Drop the cached token (the server refused it): the next ``access_token`` asks the provider."""
    with _LOCK:
        for key in [k for k in _CACHE if k[0] == account.name]:
            del _CACHE[key]


def _refresh(account: MailAccount, refresh_token: str, now: Callable[[], float]) -> AccessToken:
    settings = _settings(account)
    ends = endpoints(settings)
    form = {**_client_form(settings), "grant_type": "refresh_token", "refresh_token": refresh_token}
    if ends.scope and ends.scope_on_refresh:
        form["scope"] = ends.scope
    started = now()
    status, data = _post(ends.token_url, form)
    where = f"account {account.name}: the OAuth2 token endpoint {_host(ends.token_url)}"
    if status != 200 or "access_token" not in data:
        error = str(data.get("error", ""))
        if error == "invalid_grant":
            raise OAuthError(f"{where} refused the refresh token ({_error_text(data)}): it was revoked "
                             f"or has expired; {_fix(account)}")
        if error in ("invalid_client", "unauthorized_client"):
            raise OAuthError(f"{where} refused the client ({_error_text(data)}): check oauth2.client_id "
                             "and the client secret (client_secret_file / client_secret_env)")
        raise OAuthError(f"{where} answered HTTP {status} ({_error_text(data)})")
    value = data["access_token"]
    if not isinstance(value, str) or not value or not value.isprintable():
        raise OAuthError(f"{where} sent an unusable access_token")
    add_secret(value)
    kind = str(data.get("token_type", "Bearer"))
    if kind.lower() != "bearer":
        raise OAuthError(f"{where} sent a {kind[:20]!r} token, not a Bearer token")
    try:
        lifetime = float(data.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    lifetime = max(1.0, lifetime)
    rotated = data.get("refresh_token")
    if isinstance(rotated, str) and rotated and rotated != refresh_token:
        add_secret(rotated)
        _store_rotated(account, rotated)
    log.info("OAuth2 access token renewed", extra={"account": account.name, "expires_in": round(lifetime)})
    return AccessToken(value, started + lifetime, lifetime)


def _store_rotated(account: MailAccount, token: str) -> None:
    """A provider that rotates refresh tokens (Microsoft may) sent a new one: keep it."""
    if account.password_file is None:
        log.warning("the OAuth2 provider sent a new refresh token but the account reads its token from "
                    "an environment variable: update it, or the old one stops working when it expires",
                    extra={"account": account.name, "env": account.password_env})
        return
    save_refresh_token(account.password_file, token)
    log.info("OAuth2 refresh token rotated by the provider", extra={"account": account.name})


def save_refresh_token(path: Path, token: str) -> Path:
    """Write ``token`` to ``path`` (mode 0600, replaced atomically: never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# SASL initial responses
# --------------------------------------------------------------------------------------------


def sasl_response(account: MailAccount, token: str) -> str:
    """The XOAUTH2 or OAUTHBEARER (RFC 7628) initial client response for ``account``."""
    if _settings(account).mechanism == "oauthbearer":
        user = account.username.replace("=", "=3D").replace(",", "=2C")
        return f"n,a={user},\x01auth=Bearer {token}\x01\x01"
    return f"user={account.username}\x01auth=Bearer {token}\x01\x01"


def sasl_mechanism(account: MailAccount) -> str:
    return _settings(account).mechanism.upper()


# --------------------------------------------------------------------------------------------
# Device flow (RFC 8628)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCode:
    """What the user needs to approve Carrier at the provider, and what Carrier polls with."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def start_device_login(account: MailAccount) -> DeviceCode:
    """Ask the provider's device-authorization endpoint for a user code."""
    settings = _settings(account)
    ends = endpoints(settings)
    if ends.device_url is None:
        if settings.provider == "google":
            raise OAuthError(
                f"account {account.name}: Google does not offer the Gmail scope to the device flow: get "
                "the first refresh token with an installed-app (loopback) authorization, for example "
                "Google's `oauth2l fetch --scope https://mail.google.com/ --output_format refresh_token`, "
                f"and write it (mode 0600) to {account.password_file or 'the password_file'}; or set "
                "oauth2.device_url for a provider that has one")
        raise OAuthError(f"account {account.name}: set oauth2.device_url (the provider's device "
                         "authorization endpoint) to log in with `carrier auth mail-login`")
    form = _client_form(settings)
    if ends.scope:
        form["scope"] = ends.scope
    status, data = _post(ends.device_url, form)
    if status != 200 or not all(isinstance(data.get(k), str) for k in ("device_code", "user_code")):
        raise OAuthError(f"account {account.name}: the device authorization endpoint "
                         f"{_host(ends.device_url)} answered HTTP {status} ({_error_text(data)})")
    add_secret(data["device_code"])
    uri = data.get("verification_uri") or data.get("verification_url")  # Google says _url
    if not isinstance(uri, str) or not uri.isprintable():
        raise OAuthError(f"account {account.name}: the device endpoint sent no verification_uri")
    complete = data.get("verification_uri_complete")

    def number(key: str, default: float) -> float:
        try:
            return max(1.0, float(data.get(key, default)))
        except (TypeError, ValueError):
            return default

    return DeviceCode(
        device_code=data["device_code"],
        user_code="".join(ch for ch in data["user_code"] if ch.isprintable())[:40],
        verification_uri=uri,
        verification_uri_complete=complete if isinstance(complete, str) and complete.isprintable() else None,
        expires_in=number("expires_in", 900.0),
        interval=number("interval", 5.0),
    )


def finish_device_login(
    account: MailAccount,
    code: DeviceCode,
    *,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.monotonic,
) -> str:
    """Poll the token endpoint until the user approves (RFC 8628 section 3.5); the refresh token."""
    settings = _settings(account)
    ends = endpoints(settings)
    form = {**_client_form(settings), "grant_type": DEVICE_GRANT, "device_code": code.device_code}
    deadline = now() + code.expires_in
    interval = code.interval
    where = f"account {account.name}: the login at {_host(ends.token_url)}"
    while True:
        sleep(interval)
        status, data = _post(ends.token_url, form)
        if status == 200 and "access_token" in data:
            refresh_token = data.get("refresh_token")
            if not isinstance(refresh_token, str) or not refresh_token:
                scope = " (ask for offline_access)" if settings.provider == "microsoft" else ""
                raise OAuthError(f"{where} gave no refresh token{scope}: check oauth2.scope")
            add_secret(refresh_token)
            if isinstance(data["access_token"], str):
                add_secret(data["access_token"])
            return refresh_token
        error = str(data.get("error", ""))
        if error == "authorization_pending":
            pass
        elif error == "slow_down":
            interval += 5  # RFC 8628 section 3.5
        elif error == "access_denied":
            raise OAuthError(f"{where} was refused by the user: run it again and approve the request")
        elif error == "expired_token":
            raise OAuthError(f"{where} timed out (the code expired): run it again and approve sooner")
        else:
            raise OAuthError(f"{where} failed: HTTP {status} ({_error_text(data)})")
        if now() >= deadline:
            raise OAuthError(f"{where} timed out (the code expired): run it again and approve sooner")
