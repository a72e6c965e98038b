"""OpenPGP for mail: verify PGP/MIME (RFC 3156) and inline clear-signed commands, sign and encrypt replies.

Verification is always bound to an expected primary-key fingerprint (the one enrolled for the
From address, or an admin's): a good signature by any other key, even one in the keyring, fails.
What counts as signed is decided here, not by gpg:

- PGP/MIME: the first part of ``multipart/signed``, sliced from the raw message bytes exactly as
  received and canonicalised to CRLF (RFC 3156 section 5), is what gpg verifies; the command text
  is the first ``text/plain`` inside that part.
- Inline: exactly one ``BEGIN PGP SIGNED MESSAGE`` block. It is parsed here (armor headers,
  dash-escaping, trailing whitespace) and rebuilt canonically before gpg sees it, so gpg verifies
  precisely the text returned. Text outside the armor never counts; a second block is refused
  (gpg itself would verify the first block and ignore the rest).

The result names the primary fingerprint (gpg reports the signing subkey in some fields), the
signature time, the exact signed text, and a digest for replay protection that covers the signer,
the signature time and the signed bytes (not the signature's encoding, which can be changed
without the key).
"""

from __future__ import annotations

import calendar
import email.policy
import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from typing import Literal

from carrier.auth.errors import AuthError, VerificationError
from carrier.auth.keyring import Keyring, normalize_fingerprint, status_lines

Form = Literal["pgp-mime", "inline"]

BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
BEGIN_SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"
END_SIGNATURE = b"-----END PGP SIGNATURE-----"
#: OpenPGP hash algorithm ids -> RFC 3156 micalg names.
MICALG = {2: "pgp-sha1", 8: "pgp-sha256", 9: "pgp-sha384", 10: "pgp-sha512", 11: "pgp-sha224"}
_HASH_HEADER_RE = re.compile(rb"Hash: ?[A-Za-z0-9-]+(?: ?, ?[A-Za-z0-9-]+)*")
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_VERIFY_ARGS = ["--no-autostart"]  # verifying needs no agent: never start one for it


@dataclass(frozen=True, slots=True)
class VerifiedSignature:
    """A good signature by the expected key, and exactly what it covers."""

    fingerprint: str  # primary key fingerprint
    signing_key: str  # fingerprint of the (sub)key that made the signature
    signed_at: float  # signature creation time, seconds since the epoch
    text: str  # the signed command text, line ends as "\n"
    signed_data: bytes  # the canonical bytes the signature covers
    digest: str  # sha256 hex over signer, time and signed bytes: the replay key
    form: Form
    #: PGP/MIME: the signed MIME entity (CRLF), e.g. to read a key attached inside it.
    signed_entity: bytes | None = None
    #: The mail came encrypted (RFC 3156 multipart/encrypted) and was decrypted with Carrier's key.
    encrypted: bool = False


# --------------------------------------------------------------------------- gpg's verdict


def signature_digest(fingerprint: str, signed_at: float, signed_data: bytes) -> str:
    """The replay key of a signature: who signed, when, and what (see the module docstring)."""
    h = hashlib.sha256(b"carrier-signature/1\0")
    h.update(fingerprint.encode("ascii") + b"\0" + str(int(signed_at)).encode("ascii") + b"\0")
    h.update(signed_data)
    return h.hexdigest()


def _sig_time(field: str) -> float:
    if field.isdigit():
        return float(field)
    match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})", field)
    if match:
        y, mo, d, h, mi, s = (int(g) for g in match.groups())
        return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))
    raise VerificationError(f"gpg gave an unreadable signature time {field!r}", reason="gpg")


@dataclass(frozen=True, slots=True)
class _Good:
    fingerprint: str
    signing_key: str
    signed_at: float


def judge(stderr: str | None, returncode: int | None, expected: str) -> _Good:
    """gpg's status output of one ``--verify`` -> the good signature by ``expected``, or why not."""
    statuses = status_lines(stderr)
    kinds = [k for k, _ in statuses]
    count = kinds.count("NEWSIG")
    if count == 0:
        raise VerificationError("no OpenPGP signature found: sign the mail (PGP/MIME or clear-signed)",
                                reason="unsigned")
    if count > 1:
        raise VerificationError("more than one signature: sign with one key only",
                                reason="multiple_signatures")
    if "REVKEYSIG" in kinds:
        raise VerificationError("the signing key is revoked", reason="revoked_key")
    if "EXPKEYSIG" in kinds:
        raise VerificationError("the signing key has expired", reason="expired_key")
    if "EXPSIG" in kinds:
        raise VerificationError("the signature has expired", reason="bad_signature")
    if "BADSIG" in kinds:
        raise VerificationError("bad signature: the text is not what was signed", reason="bad_signature")
    if "ERRSIG" in kinds:
        if "NO_PUBKEY" in kinds:
            raise VerificationError("signed by a key Carrier does not know", reason="unknown_key")
        raise VerificationError("gpg could not check the signature (unsupported algorithm?)",
                                reason="bad_signature")
    valid = [rest for k, rest in statuses if k == "VALIDSIG"]
    if kinds.count("GOODSIG") != 1 or len(valid) != 1:
        raise VerificationError("gpg did not report one good signature", reason="bad_signature")
    if returncode != 0:
        raise VerificationError("gpg reported an error after the signature: malformed input",
                                reason="malformed")
    parts = valid[0].split()
    if len(parts) < 3:
        raise VerificationError("gpg gave an unreadable VALIDSIG line", reason="gpg")
    signing_key = parts[0].upper()
    primary = parts[9].upper() if len(parts) >= 10 else signing_key
    if primary != expected:
        raise VerificationError(
            f"signed by key {primary}, not by the expected key {expected}", reason="wrong_key"
        )
    return _Good(primary, signing_key, _sig_time(parts[2]))


def verify_detached(keyring: Keyring, data: bytes, signature: bytes, expected: str) -> _Good:
    """A detached signature over ``data`` (bytes as given) by the key ``expected``."""
    expected = normalize_fingerprint(expected)
    with keyring.temp_file(signature, ".sig") as sig_path:
        result = keyring.gpg.verify_data(str(sig_path), data, extra_args=_VERIFY_ARGS)
    return judge(result.stderr, result.returncode, expected)


# --------------------------------------------------------------------------- inline clear-signed


@dataclass(frozen=True, slots=True)
class ClearSigned:
    """A parsed clear-signed block: what is signed and the canonical form gpg is given."""

    lines: tuple[bytes, ...]  # dash-unescaped, trailing whitespace removed
    hash_headers: tuple[bytes, ...]
    signature: tuple[bytes, ...]  # the armored signature lines, BEGIN to END

    @property
    def signed_data(self) -> bytes:
        """RFC 4880 section 7.1: lines joined with CRLF, without the last line ending."""
        return b"\r\n".join(self.lines)

    def canonical(self) -> bytes:
        escaped = [b"- " + line if line.startswith(b"-") else line for line in self.lines]
        out = [BEGIN_SIGNED, *self.hash_headers, b"", *escaped, *self.signature]
        return b"\r\n".join(out) + b"\r\n"


def _trim(line: bytes) -> bytes:
    return line.rstrip(b" \t\r")


def parse_clearsigned(data: bytes) -> ClearSigned:
    """Parse the one clear-signed block in ``data``; VerificationError when absent, doubled or malformed."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    starts = [i for i, line in enumerate(lines) if _trim(line) == BEGIN_SIGNED]
    if not starts:
        raise VerificationError("no OpenPGP signature found: sign the mail (PGP/MIME or clear-signed)",
                                reason="unsigned")
    if len(starts) > 1:
        raise VerificationError("more than one signed block: send one clear-signed block per mail",
                                reason="multiple_signatures")
    i = starts[0] + 1
    headers: list[bytes] = []
    while i < len(lines) and _trim(lines[i]):
        header = _trim(lines[i])
        if not _HASH_HEADER_RE.fullmatch(header):
            raise VerificationError("unexpected armor header in the signed block", reason="malformed")
        headers.append(header)
        i += 1
    if i >= len(lines):
        raise VerificationError("the signed block ends before its text", reason="malformed")
    i += 1  # the empty line after the armor headers
    text: list[bytes] = []
    while i < len(lines) and _trim(lines[i]) != BEGIN_SIGNATURE:
        line = lines[i]
        if line.startswith(b"- "):
            line = line[2:]
        elif line.startswith(b"-"):
            raise VerificationError("a line starting with '-' is not dash-escaped in the signed text",
                                    reason="malformed")
        text.append(_trim(line))
        i += 1
    if i >= len(lines):
        raise VerificationError("the signed block has no signature", reason="malformed")
    start = i
    while i < len(lines) and _trim(lines[i]) != END_SIGNATURE:
        i += 1
    if i >= len(lines):
        raise VerificationError("the signature armor is not closed", reason="malformed")
    signature = tuple(_trim(line) for line in lines[start : i + 1])
    return ClearSigned(tuple(text), tuple(headers), signature)


def verify_clearsigned(
    keyring: Keyring, data: bytes, expected: str, *, charset: str = "utf-8"
) -> VerifiedSignature:
    """The one clear-signed block in ``data`` (transfer-decoded bytes), signed by ``expected``."""
    expected = normalize_fingerprint(expected)
    block = parse_clearsigned(data)
    result = keyring.gpg.verify(block.canonical(), extra_args=_VERIFY_ARGS)
    good = judge(result.stderr, result.returncode, expected)
    try:
        text = b"\n".join(block.lines).decode(charset)
    except (LookupError, UnicodeDecodeError):
        raise VerificationError(f"the signed text is not valid {charset}", reason="malformed") from None
    signed = block.signed_data
    return VerifiedSignature(good.fingerprint, good.signing_key, good.signed_at, text, signed,
                             signature_digest(good.fingerprint, good.signed_at, signed), "inline")


# --------------------------------------------------------------------------- PGP/MIME


def canonical_crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (a stored message often has bare LF); a lone CR is kept."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def _split_head(raw: bytes) -> tuple[bytes, bytes]:
    """(header block including its blank line, body) of a CRLF message."""
    if raw.startswith(b"\r\n"):
        return b"\r\n", raw[2:]
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw, b""
    return raw[: end + 4], raw[end + 4 :]


def _headers(head: bytes) -> Message:
    return BytesHeaderParser(policy=email.policy.default).parsebytes(head)


def split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body (CRLF), sliced exactly: RFC 2046's CRLF before a delimiter
    belongs to the delimiter. VerificationError when there is no closing delimiter."""
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise VerificationError("the multipart boundary is not valid (RFC 2046)", reason="malformed")
    delim = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary.encode("ascii")) + rb"(--)?[ \t]*(?:\r\n|\Z)")
    parts: list[bytes] = []
    start: int | None = None
    for match in delim.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            return parts
        start = match.end()
    raise VerificationError("the multipart body has no closing boundary", reason="malformed")


def _first_text(entity: Message) -> Message | None:
    """The first text/plain part that is not an attachment."""
    for part in entity.walk():
        if part.get_content_type() == "text/plain" and part.get_content_disposition() != "attachment":
            return part
    return None


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = data.decode(charset)
    except (LookupError, UnicodeDecodeError):
        raise VerificationError(f"the signed text is not valid {charset}", reason="malformed") from None
    return text.replace("\r\n", "\n")


def _verify_pgp_mime(keyring: Keyring, head: Message, body: bytes, expected: str) -> VerifiedSignature:
    protocol = str(head.get_param("protocol", "") or "").lower()
    if protocol != "application/pgp-signature":
        raise VerificationError(f"multipart/signed with protocol {protocol or 'none'}: only "
                                "application/pgp-signature (PGP/MIME) is accepted", reason="unsigned")
    boundary = head.get_boundary()
    if not boundary:
        raise VerificationError("multipart/signed without a boundary", reason="malformed")
    parts = split_multipart(body, boundary)
    if len(parts) != 2:
        raise VerificationError(f"multipart/signed must have 2 parts, this one has {len(parts)}",
                                reason="malformed")
    signed, sig_part = parts
    sig_msg = BytesParser(policy=email.policy.default).parsebytes(sig_part)
    if sig_msg.get_content_type() != "application/pgp-signature":
        raise VerificationError("the second part of multipart/signed is not application/pgp-signature",
                                reason="malformed")
    payload = sig_msg.get_payload(decode=True)
    signature = payload if isinstance(payload, bytes) else b""
    if b"-----BEGIN PGP SIGNATURE-----" not in signature:
        raise VerificationError("the signature part holds no armored signature", reason="malformed")
    return _signed_entity(verify_detached(keyring, signed, signature, expected), signed)


def _signed_entity(good: _Good, entity_bytes: bytes, *, encrypted: bool = False) -> VerifiedSignature:
    """The verdict for a signature over a whole MIME entity (PGP/MIME, or signed and encrypted in one
    OpenPGP message): the command is the entity's first text part."""
    entity = BytesParser(policy=email.policy.default).parsebytes(entity_bytes)
    part = _first_text(entity)
    text = _decoded_text(part) if part is not None else ""
    return VerifiedSignature(good.fingerprint, good.signing_key, good.signed_at, text, entity_bytes,
                             signature_digest(good.fingerprint, good.signed_at, entity_bytes), "pgp-mime",
                             entity_bytes, encrypted=encrypted)


def signature_form(raw: bytes) -> Form | None:
    """How ``raw`` claims to be signed (nothing verified): PGP/MIME, inline, or None (unsigned)."""
    head_bytes, _ = _split_head(canonical_crlf(raw))
    head = _headers(head_bytes)
    if head.get_content_type() == "multipart/signed":
        return "pgp-mime"
    message = BytesParser(policy=email.policy.default).parsebytes(canonical_crlf(raw))
    part = _first_text(message)
    if part is None:
        return None
    payload = part.get_payload(decode=True)
    return "inline" if isinstance(payload, bytes) and BEGIN_SIGNED in payload else None


def verify_mail(keyring: Keyring, raw: bytes, expected: str) -> VerifiedSignature:
    """Verify a whole received message (raw bytes) against the ``expected`` primary fingerprint.

    PGP/MIME is tried when the top-level type is multipart/signed, otherwise an inline clear-signed
    block in the first text/plain part. A ``multipart/encrypted`` mail (RFC 3156) is decrypted with
    Carrier's key first and what it holds is verified the same way: encryption never stands in for
    a signature. Raises VerificationError (``.reason`` says why).
    """
    expected = normalize_fingerprint(expected)
    return _verify_entity(keyring, canonical_crlf(raw), expected, outer=True)


def _verify_entity(keyring: Keyring, canon: bytes, expected: str, *, outer: bool) -> VerifiedSignature:
    head_bytes, body = _split_head(canon)
    head = _headers(head_bytes)
    ctype = head.get_content_type()
    if ctype == "multipart/signed":
        return _verify_pgp_mime(keyring, head, body, expected)
    if ctype == "multipart/encrypted":
        if not outer:
            raise VerificationError("an encrypted mail inside an encrypted mail is not read: encrypt once",
                                    reason="malformed")
        return _verify_encrypted(keyring, head, body, expected)
    message = BytesParser(policy=email.policy.default).parsebytes(canon)
    part = _first_text(message)
    if part is None:
        raise VerificationError("no text/plain part: send the command as plain text, signed",
                                reason="unsigned")
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    return verify_clearsigned(keyring, data, expected, charset=part.get_content_charset() or "utf-8")


_UNDECRYPTABLE = ("Carrier could not decrypt this mail: encrypt it to Carrier's own key (the one its "
                  "replies are signed with) as PGP/MIME, or send the command signed only")


def encrypted_payload(head: Message, body: bytes) -> bytes:
    """The armored OpenPGP message of an RFC 3156 ``multipart/encrypted`` body (nothing decrypted)."""
    protocol = str(head.get_param("protocol", "") or "").lower()
    if protocol != "application/pgp-encrypted":
        raise VerificationError(f"multipart/encrypted with protocol {protocol or 'none'}: only "
                                "application/pgp-encrypted (PGP/MIME) is read", reason="undecryptable")
    boundary = head.get_boundary()
    if not boundary:
        raise VerificationError("multipart/encrypted without a boundary", reason="malformed")
    parts = split_multipart(body, boundary)
    if len(parts) != 2:
        raise VerificationError(f"multipart/encrypted must have 2 parts, this one has {len(parts)}",
                                reason="malformed")
    control = BytesParser(policy=email.policy.default).parsebytes(parts[0])
    if control.get_content_type() != "application/pgp-encrypted":
        raise VerificationError("the first part of multipart/encrypted is not application/pgp-encrypted",
                                reason="malformed")
    sealed = BytesParser(policy=email.policy.default).parsebytes(parts[1])
    if sealed.get_content_type() != "application/octet-stream":
        raise VerificationError("the second part of multipart/encrypted is not application/octet-stream",
                                reason="malformed")
    payload = sealed.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    if b"-----BEGIN PGP MESSAGE-----" not in data:
        raise VerificationError("the encrypted part holds no armored OpenPGP message: " + _UNDECRYPTABLE,
                                reason="undecryptable")
    return data


def _verify_encrypted(keyring: Keyring, head: Message, body: bytes, expected: str) -> VerifiedSignature:
    """Decrypt with Carrier's key, then verify as an unencrypted mail: either the decrypted entity
    is signed (RFC 3156 section 6.1, PGP/MIME or clear-signed inside) or the OpenPGP message was
    signed and encrypted in one (section 6.2); an encrypted mail without a signature is unsigned."""
    armored = encrypted_payload(head, body)
    result = keyring.gpg.decrypt(armored)
    kinds = [k for k, _ in status_lines(result.stderr)]
    data = bytes(result.data or b"")
    if "DECRYPTION_OKAY" not in kinds or "DECRYPTION_FAILED" in kinds or not data:
        raise VerificationError(_UNDECRYPTABLE, reason="undecryptable")
    inner = canonical_crlf(data)
    if "NEWSIG" in kinds:  # signed and encrypted in one OpenPGP message (section 6.2)
        return _signed_entity(judge(result.stderr, result.returncode, expected), inner, encrypted=True)
    try:
        signature = _verify_entity(keyring, inner, expected, outer=False)
    except VerificationError as exc:
        if exc.reason == "unsigned":
            raise VerificationError("the mail is encrypted but not signed: Carrier runs only commands "
                                    "signed with your enrolled key; sign and encrypt it",
                                    reason="unsigned") from None
        raise
    return replace(signature, encrypted=True)


# --------------------------------------------------------------------------- outgoing mail


def text_part(text: str, subtype: str = "plain") -> EmailMessage:
    """A 7-bit-safe text part (quoted-printable UTF-8), ready to be signed or encrypted."""
    part = EmailMessage(policy=email.policy.SMTP)
    part.set_content(text, subtype=subtype, charset="utf-8", cte="quoted-printable")
    del part["MIME-Version"]  # belongs to the message, not to a part
    return part


def entity_bytes(part: Message) -> bytes:
    """A MIME entity as canonical CRLF bytes; refused unless 7-bit (8-bit breaks signatures in transit)."""
    data = canonical_crlf(part.as_bytes(policy=email.policy.SMTP))
    if not data.isascii():
        raise AuthError("a signed or encrypted part must be 7-bit: use quoted-printable or base64 "
                        "(carrier.auth.pgp.text_part)", reason="malformed")
    return data


def _boundary(*contents: bytes) -> str:
    while True:
        boundary = "=_carrier_" + secrets.token_hex(12)
        if not any(boundary.encode() in c for c in contents):
            return boundary


def _head_bytes(headers: Sequence[tuple[str, str]], content_type: str) -> bytes:
    head = EmailMessage(policy=email.policy.SMTP)
    for name, value in headers:
        if name.lower() in ("content-type", "mime-version", "content-transfer-encoding"):
            raise ValueError(f"header {name} is set by carrier.auth.pgp, do not pass it")
        head[name] = value
    head["MIME-Version"] = "1.0"
    head["Content-Type"] = content_type
    # Folded header by header: generating the message would also write an (empty) multipart body.
    policy = email.policy.SMTP
    return b"".join(policy.fold_binary(name, value) for name, value in head.items()) + b"\r\n"


def _armor_lines(armor: bytes) -> bytes:
    return b"\r\n".join(armor.replace(b"\r\n", b"\n").strip(b"\n").split(b"\n"))


def sign_entity(keyring: Keyring, entity: bytes, signer: str) -> tuple[bytes, str]:
    """(armored detached signature, micalg) over ``entity`` by the secret key ``signer``."""
    signer = normalize_fingerprint(signer)
    result = keyring.gpg.sign(entity, keyid=signer, detach=True, clearsign=False,
                              extra_args=["--no-include-key-block"])
    data = bytes(result.data or b"")
    if not data or b"BEGIN PGP SIGNATURE" not in data:
        raise AuthError(f"gpg could not sign with key {signer}: is its secret key in {keyring.home}?",
                        reason="gpg")
    micalg = MICALG.get(int(result.hash_algo or 0))
    if micalg is None:
        raise AuthError(f"gpg signed with an unexpected hash algorithm {result.hash_algo}", reason="gpg")
    return data, micalg


def signed_message(
    keyring: Keyring, body: Message, headers: Sequence[tuple[str, str]], signer: str
) -> bytes:
    """A complete RFC 3156 ``multipart/signed`` message: ``headers`` + ``body`` signed by ``signer``.

    Returns raw CRLF bytes (for the outbox). ``headers`` are the envelope headers (From, To,
    Subject, Date, Message-ID, In-Reply-To, References); the MIME headers are set here.
    """
    entity = entity_bytes(body)
    signature, micalg = sign_entity(keyring, entity, signer)
    boundary = _boundary(entity, signature)
    b = boundary.encode("ascii")
    parts = [
        b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)",
        b"--" + b,
        entity + b"\r\n--" + b,  # the CRLF before a delimiter belongs to the delimiter
        b'Content-Type: application/pgp-signature; name="signature.asc"',
        b"Content-Description: OpenPGP digital signature",
        b'Content-Disposition: attachment; filename="signature.asc"',
        b"",
        _armor_lines(signature),
        b"--" + b + b"--",
        b"",
    ]
    ctype = (f'multipart/signed; micalg="{micalg}"; protocol="application/pgp-signature"; '
             f'boundary="{boundary}"')
    return _head_bytes(headers, ctype) + b"\r\n".join(parts)


def encrypted_message(
    keyring: Keyring,
    body: Message,
    headers: Sequence[tuple[str, str]],
    recipient: str,
    *,
    signer: str | None = None,
) -> bytes:
    """A complete RFC 3156 ``multipart/encrypted`` message to the key ``recipient`` (signed inside
    by ``signer`` when given, RFC 3156 section 6.2). Refused when the key cannot encrypt."""
    recipient = normalize_fingerprint(recipient)
    info = keyring.key(recipient)
    if info is None:
        raise AuthError(f"no key {recipient} in Carrier's keyring to encrypt to", reason="unknown_key")
    if info.revoked or info.expired(time.time()) or not info.can_encrypt:
        raise AuthError(f"key {recipient} cannot be used for encryption (revoked, expired or no "
                        "encryption subkey): the user must publish a key with an encryption subkey",
                        reason="unusable")
    entity = entity_bytes(body)
    kwargs: dict[str, object] = {"armor": True, "always_trust": True}
    if signer is not None:
        kwargs["sign"] = normalize_fingerprint(signer)
    result = keyring.gpg.encrypt(entity, [recipient], extra_args=["--no-include-key-block"], **kwargs)
    data = bytes(result.data or b"")
    if not result.ok or b"BEGIN PGP MESSAGE" not in data:
        raise AuthError(f"gpg could not encrypt to {recipient}: {result.status}", reason="gpg")
    boundary = _boundary(data)
    b = boundary.encode("ascii")
    parts = [
        b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)",
        b"--" + b,
        b"Content-Type: application/pgp-encrypted",
        b"Content-Description: PGP/MIME version identification",
        b"",
        b"Version: 1",
        b"",
        b"--" + b,
        b'Content-Type: application/octet-stream; name="encrypted.asc"',
        b"Content-Description: OpenPGP encrypted message",
        b'Content-Disposition: inline; filename="encrypted.asc"',
        b"",
        _armor_lines(data),
        b"--" + b + b"--",
        b"",
    ]
    ctype = f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{boundary}"'
    return _head_bytes(headers, ctype) + b"\r\n".join(parts)
