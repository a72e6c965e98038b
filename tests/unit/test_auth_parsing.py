"""The pure parts of the trust layer: what counts as signed, gpg's status verdicts, key listings,
the admin decision grammar, nonces, WKD names, IP gates."""

from __future__ import annotations

import ipaddress

import pytest

from carrier.auth.enrollment import find_nonce, parse_decision, unquoted_lines
from carrier.auth.errors import EnrollmentError, KeyDiscoveryError, VerificationError
from carrier.auth.keyring import normalize_fingerprint, parse_colons, uid_address
from carrier.auth.keyserver import check_address, choose_key, vks_url, wkd_hash, wkd_url, zbase32
from carrier.auth.netgate import NetGate, bearer_token
from carrier.auth.pgp import canonical_crlf, judge, parse_clearsigned, signature_digest, split_multipart
from carrier.auth.ratelimit import address_key, enroll_keys

FPR = "1B1B6BE6ED14EF8BB63311B8FA2D975331FFC5B9"
SUB = "FB628391CE164777FC0C80ACB28FD3C75184ACDB"
OTHER = "2F7862B8F74F3738EE0D1D58D907FEB690517E71"
SIG = b"-----BEGIN PGP SIGNATURE-----\n\niHUEARYIAB0WIQ\n=abcd\n-----END PGP SIGNATURE-----"


# --------------------------------------------------------------------------- clear-signed parsing


def clearsigned(body: bytes, *, head: bytes = b"Hash: SHA256\n\n") -> bytes:
    return b"-----BEGIN PGP SIGNED MESSAGE-----\n" + head + body + b"\n" + SIG + b"\n"


def test_clearsigned_text_is_dash_unescaped_and_trailing_space_trimmed() -> None:
    block = parse_clearsigned(clearsigned(b"run ping on web  \n- -not a header\n- From me"))
    assert block.lines == (b"run ping on web", b"-not a header", b"From me")
    assert block.signed_data == b"run ping on web\r\n-not a header\r\nFrom me"
    canon = block.canonical()
    assert b"\r\n- -not a header\r\n" in canon and canon.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----\r\n")
    assert canon.count(b"-----BEGIN PGP SIGNATURE-----") == 1


def test_text_outside_the_armor_is_dropped_from_what_gpg_sees() -> None:
    data = b"exec web rm -rf /\n" + clearsigned(b"status") + b"exec db1 reboot\n"
    block = parse_clearsigned(data)
    assert block.lines == (b"status",)
    assert b"rm -rf" not in block.canonical() and b"reboot" not in block.canonical()


def test_two_signed_blocks_are_refused() -> None:
    with pytest.raises(VerificationError) as err:
        parse_clearsigned(clearsigned(b"status") + clearsigned(b"exec web rm -rf /"))
    assert err.value.reason == "multiple_signatures"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"just text\n", "unsigned"),
        (clearsigned(b"x", head=b"Hash: SHA256\nComment: evil\n\n"), "malformed"),
        (clearsigned(b"-----BEGIN PGP SIGNATURE-----x\nrun"), "malformed"),
        (clearsigned(b"--- unescaped"), "malformed"),
        (b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nno signature\n", "malformed"),
        (b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nx\n-----BEGIN PGP SIGNATURE-----\nabc\n",
         "malformed"),
    ],
)
def test_clearsigned_problems(data: bytes, reason: str) -> None:
    with pytest.raises(VerificationError) as err:
        parse_clearsigned(data)
    assert err.value.reason == reason


# --------------------------------------------------------------------------- multipart slicing


def test_split_multipart_keeps_exact_bytes_and_gives_the_crlf_to_the_delimiter() -> None:
    body = (b"preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nrun x  \r\n\r\n--b1 \r\n"
            b"Content-Type: application/pgp-signature\r\n\r\nSIG\r\n--b1--\r\nepilogue")
    parts = split_multipart(body, "b1")
    assert parts == [b"Content-Type: text/plain\r\n\r\nrun x  \r\n",
                     b"Content-Type: application/pgp-signature\r\n\r\nSIG"]


def test_split_multipart_needs_a_closing_delimiter_and_a_valid_boundary() -> None:
    with pytest.raises(VerificationError, match="no closing boundary"):
        split_multipart(b"--b1\r\nx\r\n--b1\r\ny\r\n", "b1")
    with pytest.raises(VerificationError, match="boundary is not valid"):
        split_multipart(b"", "x" * 71)


def test_boundary_text_inside_a_line_is_not_a_delimiter() -> None:
    parts = split_multipart(b"--b1\r\nsee --b1 here\r\n--b1--", "b1")
    assert parts == [b"see --b1 here"]


def test_canonical_crlf() -> None:
    assert canonical_crlf(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\rd\r\n"


# --------------------------------------------------------------------------- gpg status verdicts


def status(*lines: str) -> str:
    return "\n".join(f"[GNUPG:] {line}" for line in lines) + "\ngpg: some human text\n"


GOOD = ("NEWSIG", "KEY_CONSIDERED x 0", "SIG_ID abc 2026-11-22 1795316359",
        "GOODSIG FA2D975331FFC5B9 Ops <ops@x>")
VALID = f"VALIDSIG {FPR} x 1 0 4 0 22 8 00 {FPR}"


def test_good_signature_by_a_subkey_maps_to_the_primary() -> None:
    out = status(*GOOD, f"VALIDSIG {SUB} 2026-11-22 1795316359 0 4 0 22 8 00 {FPR}")
    good = judge(out, 0, FPR)
    assert (good.fingerprint, good.signing_key, good.signed_at) == (FPR, SUB, 1795316359.0)


def test_iso_signature_times_are_read() -> None:
    out = status(*GOOD, f"VALIDSIG {FPR} 2026-11-22 20261122T025919 0 4 0 22 8 00 {FPR}")
    assert judge(out, 0, FPR).signed_at == 1795316359.0


@pytest.mark.parametrize(
    ("lines", "rc", "reason"),
    [
        ((), 2, "unsigned"),
        (("NODATA 1",), 2, "unsigned"),
        ((*GOOD, f"VALIDSIG {OTHER} 2026-11-22 1795316359 0 4 0 22 8 00 {OTHER}"), 0, "wrong_key"),
        (("NEWSIG", "ERRSIG FA2D975331FFC5B9 22 8 00 1795316359 9 " + FPR, "NO_PUBKEY FA2D975331FFC5B9"), 2,
         "unknown_key"),
        (("NEWSIG", "BADSIG FA2D975331FFC5B9 Ops"), 1, "bad_signature"),
        (("NEWSIG", "EXPKEYSIG FA2D975331FFC5B9 Ops", VALID), 0, "expired_key"),
        (("NEWSIG", "REVKEYSIG FA2D975331FFC5B9 Ops", VALID), 0, "revoked_key"),
        ((*GOOD, VALID, "NEWSIG", "GOODSIG X Y"), 0, "multiple_signatures"),
        ((*GOOD, VALID, "ERROR proc_pkt.plaintext 89_BAD_DATA"), 2,
         "malformed"),
        (("NEWSIG", "GOODSIG X Y"), 0, "bad_signature"),
    ],
)
def test_bad_verdicts(lines: tuple[str, ...], rc: int, reason: str) -> None:
    with pytest.raises(VerificationError) as err:
        judge(status(*lines), rc, FPR)
    assert err.value.reason == reason


def test_replay_digest_covers_signer_time_and_bytes() -> None:
    base = signature_digest(FPR, 100.0, b"run x")
    assert len(base) == 64
    assert signature_digest(FPR, 100.9, b"run x") == base  # whole seconds: what the signature holds
    assert signature_digest(OTHER, 100.0, b"run x") != base
    assert signature_digest(FPR, 101.0, b"run x") != base
    assert signature_digest(FPR, 100.0, b"run y") != base


# --------------------------------------------------------------------------- key listings and choice


LISTING = f"""\
pub:-:255:22:FA2D975331FFC5B9:1795316666:::-:::scESC:::::ed25519:::0:
fpr:::::::::{FPR}:
uid:-::::1795316666::AB::Ops Person <Ops@Example.test>::::::::::0:
uid:r::::1795316666::CD::Old <old@example.test>::::::::::0:
uid:-::::1795316666::EF::Odd \\x3a name <odd@example.test>::::::::::0:
sub:-:255:18:B28FD3C75184ACDB:1795316666::::::e:::::cv25519::
fpr:::::::::{SUB}:
pub:e:255:22:5383326E53ABF052:1577836800:1577923200::-:::sc:::::ed25519:::0:
fpr:::::::::{OTHER}:
uid:e::::1577836800::D6::Ops <ops@example.test>::::::::::0:
"""


def test_parse_colons() -> None:
    keys = parse_colons(LISTING)
    assert [k.fingerprint for k in keys] == [FPR, OTHER]
    ops, old = keys
    assert ops.subkeys == (SUB,) and ops.capabilities == "ESC" and ops.can_sign and ops.can_encrypt
    assert [u.email for u in ops.uids] == ["ops@example.test", "old@example.test", "odd@example.test"]
    assert ops.uids[2].text == "Odd : name <odd@example.test>"
    assert ops.has_address("OPS@example.test") and not ops.has_address("old@example.test")
    assert old.expired(1795316666.0) and not old.can_sign and old.expires == 1577923200.0


def test_choose_key_accepts_only_the_exact_live_address() -> None:
    keys = parse_colons(LISTING)
    assert choose_key(keys, "ops@example.test", 1795316700.0).fingerprint == FPR
    with pytest.raises(KeyDiscoveryError) as err:
        choose_key(keys, "op@example.test", 1795316700.0)
    assert err.value.reason == "no_matching_uid"
    with pytest.raises(KeyDiscoveryError) as err:
        choose_key(keys, "old@example.test", 1795316700.0)
    assert err.value.reason == "no_matching_uid"  # that uid is revoked
    with pytest.raises(KeyDiscoveryError) as err:
        choose_key(keys[1:], "ops@example.test", 1795316700.0)
    assert err.value.reason == "expired_key"
    with pytest.raises(KeyDiscoveryError) as err:
        choose_key([], "ops@example.test", 1795316700.0)
    assert err.value.reason == "bad_key_data"


def test_uid_address() -> None:
    assert uid_address("A B <a@b.example>") == "a@b.example"
    assert uid_address("a@b.example") == "a@b.example"
    assert uid_address("<evil@x> ops@example.test") is None
    assert uid_address("Ops (ops@example.test)") is None


def test_normalize_fingerprint() -> None:
    assert normalize_fingerprint(FPR.lower()[:20] + " " + FPR[20:]) == FPR
    with pytest.raises(Exception, match="not a key fingerprint"):
        normalize_fingerprint("ABCD")


# --------------------------------------------------------------------------- WKD and VKS names


def test_wkd_names() -> None:
    assert zbase32(b"") == "" and len(zbase32(bytes(20))) == 32
    assert wkd_hash("Joe.Doe") == "iy9q119eutrkn8s1mk4r39qejnbu3n5q"  # the example in the WKD draft
    assert wkd_url("Joe.Doe@Example.ORG") == (
        "https://example.org/.well-known/openpgpkey/hu/iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe")
    assert wkd_url("ops@example.test", "http://127.0.0.1:9/").startswith(
        "http://127.0.0.1:9/.well-known/openpgpkey/hu/")
    assert vks_url("http://ks:1/", "Ops+x@example.test") == "http://ks:1/vks/v1/by-email/ops%2Bx%40example.test"


@pytest.mark.parametrize("bad", ["ops@evil.test/../x", "ops@", "a b@example.test", "ops@example.test?x=1",
                                 "ops@[127.0.0.1]", "x@-bad.example"])
def test_lookup_addresses_cannot_change_a_url(bad: str) -> None:
    with pytest.raises(KeyDiscoveryError):
        check_address(bad)


# --------------------------------------------------------------------------- admin grammar, nonces


def test_decision_grammar() -> None:
    d = parse_decision("Hi,\n\napprove r-abcdefghijk2 as operator\n\nthanks")
    assert (d.verb, d.request_id, d.role) == ("approve", "r-abcdefghijk2", "operator")
    d = parse_decision("DENY r-abcdefghijk2")
    assert (d.verb, d.role) == ("deny", None)


def test_quoted_approve_inside_a_deny_does_not_count() -> None:
    text = "deny r-abcdefghijk2\n\nOn Monday Carrier wrote:\n> approve r-abcdefghijk2 as admin\n>> APPROVE"
    assert parse_decision(text).verb == "deny"


def test_only_quoted_or_embedded_approve_is_no_decision() -> None:
    for text in ("> approve r-abcdefghijk2", "I do not approve r-abcdefghijk2 at all", "APPROVE",
                 "ok\n-- \napprove r-abcdefghijk2"):
        with pytest.raises(EnrollmentError, match="no decision found"):
            parse_decision(text)


def test_two_different_decisions_are_refused() -> None:
    with pytest.raises(EnrollmentError, match="more than one decision"):
        parse_decision("approve r-abcdefghijk2\ndeny r-abcdefghijk2")
    with pytest.raises(EnrollmentError, match="takes no role"):
        parse_decision("deny r-abcdefghijk2 as admin")
    assert parse_decision("approve r-abcdefghijk2\napprove r-abcdefghijk2").verb == "approve"


def test_nonce_is_read_from_unquoted_lines_only() -> None:
    nonce = "0123456789abcdef0123456789abcdef"
    assert find_nonce(f"confirm {nonce}\n> confirm {'f' * 32}") == nonce
    assert find_nonce(f"> confirm {nonce}") is None
    assert find_nonce(f"confirm {nonce} {'e' * 32}") is None
    assert find_nonce(f"confirm {nonce}0") is None
    assert unquoted_lines("a\n > b\nc\n--\nd") == ["a", "c"]


# --------------------------------------------------------------------------- IP gates


def nets(*items: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(i) for i in items)


def test_netgate_deny_first_then_allow() -> None:
    gate = NetGate(allow=nets("10.0.0.0/8", "2001:db8::/32"), deny=nets("10.6.6.6/32"))
    assert gate.check("10.1.2.3").allowed
    assert not gate.check("10.6.6.6").allowed
    assert not gate.check("192.0.2.1").allowed
    assert gate.check("2001:db8::1").allowed
    assert gate.check("::ffff:10.1.2.3").allowed  # IPv4-mapped is the IPv4 address
    assert not gate.check("::ffff:10.6.6.6").allowed
    assert not gate.check("not-an-ip").allowed
    assert NetGate().check("203.0.113.9").allowed


def test_bearer_header_and_rate_keys() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None
    assert bearer_token("Bearer ") is None
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "addr:2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == "addr:10.0.0.1"
    # Enrollment: one bucket per address and one per domain, whatever the case.
    assert enroll_keys(" Ghost@Example.TEST") == ("enroll:ghost@example.test", "enroll-domain:example.test")
    assert enroll_keys("a@x.test")[1] == enroll_keys("b@X.test")[1]
