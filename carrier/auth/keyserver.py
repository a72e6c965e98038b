"""Find a sender's public key: attached to the mail, by WKD, or from a VKS keyserver.

A key found anywhere is only a candidate: it is accepted when one of its non-revoked user ids
carries exactly the sender's address, and the key is neither expired nor revoked and can sign.
Only then is it imported into Carrier's keyring (just that key, just that uid; see
``Keyring.import_key``). Network lookups have a timeout, a size cap, follow no redirect to
another scheme, and fail with a message that names the server.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Literal
from urllib.parse import quote, urlsplit

from carrier.auth.errors import KeyDiscoveryError
from carrier.auth.keyring import KeyInfo, Keyring, normalize_address, normalize_fingerprint

log = logging.getLogger(__name__)

Source = Literal["attachment", "wkd", "keyserver"]
MAX_KEY_BYTES = 1024 * 1024
#: Addresses a lookup is made for: nothing that can change a URL's path or host.
ADDRESS_RE = re.compile(r"[A-Za-z0-9._%+=-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")
_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"


@dataclass(frozen=True, slots=True)
class FoundKey:
    """A key accepted for an address, and where it came from."""

    fingerprint: str
    source: Source
    info: KeyInfo


def check_address(address: str) -> str:
    """``address`` lower-cased, or KeyDiscoveryError when it is not a plain mail address."""
    if not ADDRESS_RE.fullmatch(address.strip()):
        raise KeyDiscoveryError(f"{address!r} is not a plain mail address: no key lookup is made for it",
                                reason="not_found")
    return normalize_address(address)


# --------------------------------------------------------------------------- WKD (pure parts)


def zbase32(data: bytes) -> str:
    """z-base-32 (the WKD encoding): 5 bits per character, most significant first."""
    count = len(data) * 8
    chars = (count + 4) // 5
    bits = int.from_bytes(data, "big") << (chars * 5 - count)  # pad the last group with zeros
    return "".join(_ZBASE32[(bits >> (5 * (chars - 1 - i))) & 31] for i in range(chars))


def wkd_hash(local_part: str) -> str:
    """The WKD name of a local part: z-base-32 of SHA-1 of it in lower case (32 characters)."""
    return zbase32(hashlib.sha1(local_part.lower().encode("utf-8"), usedforsecurity=False).digest())


def wkd_url(address: str, base: str | None = None) -> str:
    """The WKD direct-method URL for ``address`` (``base`` replaces ``https://<domain>``)."""
    check_address(address)
    local, _, domain = address.strip().rpartition("@")
    domain = domain.lower()
    root = base.rstrip("/") if base else f"https://{domain}"
    return f"{root}/.well-known/openpgpkey/hu/{wkd_hash(local)}?l={quote(local, safe='')}"


def vks_url(base: str, address: str) -> str:
    """The VKS by-email URL (keys.openpgp.org's API) for ``address``."""
    return f"{base.rstrip('/')}/vks/v1/by-email/{quote(check_address(address), safe='')}"


# --------------------------------------------------------------------------- HTTP


class _SameSchemeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow at most a few redirects, and never from https to http or to another scheme."""

    max_redirections = 3

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        old, new = urlsplit(req.full_url).scheme, urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameSchemeRedirect)


def fetch_key(url: str, timeout: float, what: str) -> bytes | None:
    """GET ``url``: the body (capped), None on 404, KeyDiscoveryError on any other failure."""
    host = urlsplit(url).netloc
    if urlsplit(url).scheme not in ("http", "https"):
        raise KeyDiscoveryError(f"{what} URL {url} is not http(s)", reason="lookup_failed")
    headers = {"User-Agent": "carrier", "Accept": "application/pgp-keys"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (scheme checked above)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            data = bytes(response.read(MAX_KEY_BYTES + 1))
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            return None
        raise KeyDiscoveryError(f"{what} {host} answered HTTP {exc.code} for the key lookup: "
                                "try again later or check its URL", reason="lookup_failed") from None
    except TimeoutError:
        raise KeyDiscoveryError(f"{what} {host} did not answer within {timeout:g} s: try again later "
                                "or raise keyserver.timeout", reason="lookup_failed") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise KeyDiscoveryError(f"{what} {host} did not answer within {timeout:g} s: try again later "
                                    "or raise keyserver.timeout", reason="lookup_failed") from None
        raise KeyDiscoveryError(f"cannot reach {what} {host} ({reason}): check its URL and the network",
                                reason="lookup_failed") from None
    if len(data) > MAX_KEY_BYTES:
        raise KeyDiscoveryError(f"{what} {host} sent more than {MAX_KEY_BYTES} bytes for one key",
                                reason="bad_key_data")
    return data or None


# --------------------------------------------------------------------------- choosing a key


def attached_keys(message: Message) -> list[bytes]:
    """The contents of the ``application/pgp-keys`` parts of a mail."""
    found: list[bytes] = []
    for part in message.walk():
        if part.get_content_type() == "application/pgp-keys":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes) and payload:
                found.append(payload[: MAX_KEY_BYTES + 1])
    return found


def choose_key(keys: Sequence[KeyInfo], address: str, now: float) -> KeyInfo:
    """The one key acceptable for ``address`` among ``keys``, or KeyDiscoveryError saying why not."""
    address = normalize_address(address)
    if not keys:
        raise KeyDiscoveryError("the key data holds no OpenPGP public key", reason="bad_key_data")
    mentioning = [k for k in keys if any(u.email == address for u in k.uids)]
    if not mentioning:
        raise KeyDiscoveryError(f"no user id of the key carries the address {address}",
                                reason="no_matching_uid")
    live = [k for k in mentioning if not k.revoked]
    if not live:
        raise KeyDiscoveryError(f"the key for {address} is revoked: publish a new key", reason="revoked_key")
    current = [k for k in live if not k.expired(now)]
    if not current:
        raise KeyDiscoveryError(f"the key for {address} has expired: extend it or publish a new key",
                                reason="expired_key")
    usable = [k for k in current if k.has_address(address)]
    if not usable:
        raise KeyDiscoveryError(f"the user id with {address} is revoked on that key",
                                reason="no_matching_uid")
    signing = [k for k in usable if k.can_sign]
    if not signing:
        raise KeyDiscoveryError(f"the key for {address} cannot sign: it needs a usable signing key",
                                reason="unusable")
    if len(signing) > 1:
        raise KeyDiscoveryError(f"{len(signing)} different keys claim {address}: send just one",
                                reason="ambiguous")
    return signing[0]


class KeyFinder:
    """Looks for a sender's key in the order: attachment, WKD (if enabled), keyserver."""

    def __init__(
        self,
        keyring: Keyring,
        *,
        keyserver_url: str | None,
        timeout: float,
        wkd: bool = True,
        wkd_base: str | None = None,
    ) -> None:
        self.keyring = keyring
        self.keyserver_url = keyserver_url
        self.timeout = timeout
        self.wkd = wkd
        self.wkd_base = wkd_base

    def _candidates(self, address: str, attached: Sequence[bytes]) -> list[tuple[Source, str, bytes | None]]:
        out: list[tuple[Source, str, bytes | None]] = [("attachment", "", data) for data in attached]
        if self.wkd:
            out.append(("wkd", wkd_url(address, self.wkd_base), None))
        if self.keyserver_url:
            out.append(("keyserver", vks_url(self.keyserver_url, address), None))
        return out

    def ensure(self, address: str, fingerprint: str, attached: Sequence[bytes] = ()) -> KeyInfo:
        """The key ``fingerprint`` (configured for ``address``) in Carrier's keyring, fetched if absent.

        Only that exact key is taken from the sources, and only when it passes the same checks.
        """
        fpr = normalize_fingerprint(fingerprint)
        present = self.keyring.key(fpr)
        if present is not None:
            return present
        return self.find(address, attached, only=fpr).info

    def find(
        self,
        address: str,
        attached: Sequence[bytes] = (),
        *,
        now: float | None = None,
        only: str | None = None,
    ) -> FoundKey:
        """Find, check and import the key for ``address``; KeyDiscoveryError names the best reason.

        ``only``: accept just the key with this fingerprint (a configured user or admin).
        """
        given = address.strip()  # WKD's ?l= carries the local part as written
        address = check_address(address)
        now = time.time() if now is None else now
        problems: list[KeyDiscoveryError] = []
        for source, url, data in self._candidates(given, attached):
            try:
                if data is None:
                    what = "WKD server" if source == "wkd" else "keyserver"
                    data = fetch_key(url, self.timeout, what)
                    if data is None:
                        continue
                keys = self.keyring.inspect(data)
                if only is not None:
                    keys = [k for k in keys if k.fingerprint == only]
                    if not keys:
                        raise KeyDiscoveryError(f"the {source} key for {address} is not the configured "
                                                f"key {only}", reason="not_found")
                info = choose_key(keys, address, now)
                imported = self.keyring.import_key(data, info.fingerprint, address)
            except KeyDiscoveryError as refused:
                log.info("key candidate refused", extra={"address": address, "source": source,
                                                          "reason": refused.reason, "error": str(refused)})
                problems.append(refused)
                continue
            log.info("key found", extra={"address": address, "source": source,
                                         "fingerprint": imported.fingerprint})
            return FoundKey(imported.fingerprint, source, imported)
        # A key that was found but refused says more than a lookup that failed or found nothing.
        for problem in problems:
            if problem.reason != "lookup_failed":
                raise problem
        if problems:
            raise problems[0]
        raise KeyDiscoveryError(f"no OpenPGP key found for {address}: attach your public key "
                                "(application/pgp-keys) or publish it (WKD or keys.openpgp.org)",
                                reason="not_found")
