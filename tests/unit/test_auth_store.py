"""Trust-layer state in the real SQLite store: audit chain, tokens, rate limits, replay digests,
the local enrollment decisions and the directory of identities."""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carrier.auth.audit import Audit, AuditKey
from carrier.auth.directory import Directory
from carrier.auth.enrollment import Enrollment, nonce_hash
from carrier.auth.errors import RateLimited, TokenError
from carrier.auth.netgate import HttpGuard, NetGate
from carrier.auth.policy import HostRef, Identity, Request, decide
from carrier.auth.ratelimit import RateLimiter, address_key
from carrier.auth.tokens import Tokens, token_hash
from carrier.config import Config, load_config
from carrier.errors import CarrierError
from carrier.store import Store
from carrier.store.auth import read_audit_chain, remember_signature
from carrier.store.dialect import connect_pg

OPS = "89ABCDEF0123456789ABCDEF0123456789ABCDEF"
ADMIN = "0123456789ABCDEF0123456789ABCDEF01234567"
NEWBIE = "AAAABBBBCCCCDDDDEEEEFFFF0000111122223333"

AUDIT_KEY = AuditKey(b"unit-test audit key, 32 bytes..")


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path, clock: FakeClock, store_url: str | None) -> Iterator[Store]:
    s = Store.open(state_dir, clock=clock, url=store_url)
    yield s
    s.close()


@pytest.fixture
def config(tmp_path: Path, state_dir: Path) -> Config:
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv" / "hosts.yml").write_text("all: {hosts: {web1: {}}}\n")
    secret = tmp_path / "pass"
    secret.write_text("s3cret-mail\n")
    os.chmod(secret, 0o600)
    path = tmp_path / "carrier.yml"
    path.write_text(textwrap.dedent(f"""\
        state_dir: {state_dir}
        inventory: inv
        accounts:
          - {{name: carrier, address: carrier@example.test, password_file: pass,
             imap: {{host: 127.0.0.1}}, smtp: {{host: 127.0.0.1}}}}
        admins: [{{email: admin@example.test, fingerprint: "{ADMIN}"}}]
        users: [{{email: ops@example.test, fingerprint: "{OPS}", role: operator}}]
        admin_contacts: [boss@example.test]
        roles:
          operator: {{playbooks: ["*"], exec: true, pty: true}}
          admin: {{playbooks: ["*"], exec: true, shell: true, pty: true}}
          viewer: {{}}
        auth: {{token_ttl: 3600, token_max_ttl: 7200}}
        limits: {{rate_limit: 3, rate_limit_window: 30}}
        """))
    os.chmod(path, 0o600)
    return load_config(path, {"HOME": str(tmp_path)})


@contextlib.contextmanager
def raw(store: Store) -> Iterator[Any]:
    """A connection of its own to the store's database (an attacker with write access to it)."""
    if store.url is None:
        conn = sqlite3.connect(store.path, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()
        return
    pg = connect_pg(store.url, frozenset(), timeout=10)
    try:
        yield pg
    finally:
        pg.close()


# --------------------------------------------------------------------------- audit chain


def fill(audit: Audit, n: int = 5) -> None:
    for i in range(n):
        audit.record(f"user{i}@example.test", "mail", "decide:exec", target=f"web{i}", outcome="allowed",
                     detail={"command": f"uptime {i}", "hosts": ["web1"]})


def test_audit_chain_verifies_and_links_rows(store: Store) -> None:
    audit = Audit(store, AUDIT_KEY)
    fill(audit)
    report = audit.verify()
    assert report.ok and report.rows == 5
    rows, head = read_audit_chain(store)
    assert rows[0].prev_hash == "0" * 64
    assert all(b.prev_hash == a.row_hash for a, b in itertools.pairwise(rows))
    assert head is not None and (head.last_id, head.last_hash, head.row_count) == (5, rows[-1].row_hash, 5)
    assert rows[2].detail == {"command": "uptime 2", "hosts": ["web1"]}


def test_audit_empty_chain_is_ok(store: Store) -> None:
    assert Audit(store, AUDIT_KEY).verify().ok


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE audit SET outcome = 'denied' WHERE id = 3", "row 3: its content was changed"),
        ("UPDATE audit SET detail = '{\"command\":\"rm -rf /\"}' WHERE id = 2",
         "row 2: its content was changed"),
        ("UPDATE audit SET ts = ts + 1 WHERE id = 4", "row 4: its content was changed"),
        ("DELETE FROM audit WHERE id = 3", "row 4: the chain is broken"),
        ("DELETE FROM audit WHERE id = 5", "the newest row(s) are missing"),
        ("UPDATE audit SET row_hash = NULL WHERE id = 1", "row 1: not chained"),
        ("INSERT INTO audit (ts, actor, door, action, outcome) VALUES (1, 'x', 'cli', 'forged', 'ok')",
         "not chained"),
    ],
)
def test_audit_tampering_is_found(store: Store, state_dir: Path, sql: str, expected: str) -> None:
    audit = Audit(store, AUDIT_KEY)
    fill(audit)
    with raw(store) as conn:
        conn.execute(sql)
    report = audit.verify()
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems


def test_audit_recomputed_row_still_breaks_the_next_link(store: Store, state_dir: Path) -> None:
    audit = Audit(store, AUDIT_KEY)
    fill(audit)
    rows, _ = read_audit_chain(store)
    forged = rows[1].__class__(**{**{f: getattr(rows[1], f) for f in rows[1].__slots__}, "outcome": "denied"})
    new_hash = AUDIT_KEY.row_hash(forged.prev_hash or "", forged)  # even with the key
    with raw(store) as conn:
        conn.execute("UPDATE audit SET outcome = 'denied', row_hash = ? WHERE id = 2", (new_hash,))
    problems = audit.verify().problems
    assert problems == ["row 3: the chain is broken before it (a row was deleted, inserted or changed)"]


def test_audit_appends_from_threads_keep_one_chain(store: Store) -> None:
    audit = Audit(store, AUDIT_KEY)

    def work(n: int) -> None:
        for i in range(25):
            audit.record(f"t{n}", "system", "tick", detail={"i": i})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = audit.verify()
    assert report.ok and report.rows == 100


def test_audit_decision_row(store: Store) -> None:
    audit = Audit(store, AUDIT_KEY)
    who = Identity("ops@example.test", "operator", "mcp", token_id="t-aaaaaaaaaaaa")
    request = Request("exec", (HostRef("web1"),), command="uptime")
    row = audit.decision(who, request, decide(who, request, {}))
    assert (row.actor, row.door, row.action) == ("ops@example.test", "mcp", "decide:exec")
    assert row.outcome == "denied"
    assert row.detail == {"reason": "role 'operator' is not defined", "role": "operator", "hosts": ["web1"],
                          "command": "uptime", "token": "t-aaaaaaaaaaaa"}


# --------------------------------------------------------------------------- tokens


def tokens(store: Store) -> Tokens:
    return Tokens(store, roles={"operator", "viewer"}, default_ttl=3600, max_ttl=7200)


def test_token_is_random_shown_once_and_stored_as_hash(store: Store, state_dir: Path) -> None:
    t = tokens(store)
    issued = t.issue("ops@example.test", "operator", scopes=["tools:jobs", "hosts:web"])
    other = t.issue("ops@example.test", "operator")
    assert len(issued.token) == 43 and issued.token != other.token
    with raw(store) as conn:
        dump = "\n".join(str(r) for r in conn.execute("SELECT * FROM tokens"))
    assert issued.token not in dump and token_hash(issued.token) in dump
    identity = t.identity(issued.token)
    assert (identity.name, identity.role, identity.door) == ("ops@example.test", "operator", "mcp")
    assert identity.scopes == ("tools:jobs", "hosts:web") and identity.token_id == issued.record.id


def test_token_use_is_recorded(store: Store, clock: FakeClock) -> None:
    t = tokens(store)
    issued = t.issue("ops@example.test", "operator")
    clock.now += 10
    t.check(issued.token)
    found = store.find_token(token_hash(issued.token))
    assert found is not None and found.last_used_at == clock.now


@pytest.mark.parametrize("guess", ["", "x" * 43, "Bearer", "a" * 200, "../../etc/passwd", None])
def test_guessed_tokens_are_refused_alike(store: Store, guess: str | None) -> None:
    tokens(store).issue("ops@example.test", "operator")
    with pytest.raises(TokenError) as err:
        tokens(store).check(guess)
    assert str(err.value) == "invalid, expired or revoked token"


def test_expired_and_revoked_tokens_are_refused_with_the_same_message(store: Store, clock: FakeClock) -> None:
    t = tokens(store)
    old = t.issue("ops@example.test", "operator", ttl=60)
    gone = t.issue("ops@example.test", "operator")
    assert t.revoke(gone.record.id) and not t.revoke(gone.record.id)
    clock.now += 61
    for token, reason in ((old.token, "expired"), (gone.token, "revoked")):
        with pytest.raises(TokenError) as err:
            t.check(token)
        assert err.value.reason == reason and str(err.value) == "invalid, expired or revoked token"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "root"}, "role 'root' is not defined"),
        ({"scopes": ["everything"]}, "unknown scope"),
        ({"ttl": 7201}, "1 to 7200 seconds"),
        ({"ttl": 0}, "1 to 7200 seconds"),
    ],
)
def test_token_issue_checks(store: Store, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"role": "operator", **kwargs}
    with pytest.raises(TokenError, match=message):
        tokens(store).issue("ops@example.test", **args)  # type: ignore[arg-type]


def test_revoke_owner(store: Store) -> None:
    t = tokens(store)
    a = t.issue("ops@example.test", "operator")
    t.issue("ops@example.test", "viewer")
    keep = t.issue("dev@example.test", "viewer")
    assert t.revoke_owner("ops@example.test") == 2
    with pytest.raises(TokenError):
        t.check(a.token)
    assert t.check(keep.token).owner == "dev@example.test"


# --------------------------------------------------------------------------- rate limits


def test_bucket_empties_refills_and_survives_a_restart(state_dir: Path, clock: FakeClock,
                                                      store_url: str | None) -> None:
    store = Store.open(state_dir, clock=clock, url=store_url)
    limiter = RateLimiter(store, rate=3, window=30.0)
    for _ in range(3):
        limiter.check("id:ops")
    with pytest.raises(RateLimited) as err:
        limiter.check("id:ops")
    assert err.value.retry_after == pytest.approx(10.0)
    store.close()
    # A restart (new Store, new limiter) keeps the empty bucket.
    store = Store.open(state_dir, clock=clock, url=store_url)
    limiter = RateLimiter(store, rate=3, window=30.0)
    with pytest.raises(RateLimited):
        limiter.check("id:ops")
    limiter.check("id:other")  # buckets are per key
    clock.now += 10
    limiter.check("id:ops")  # one token back after window/rate seconds
    with pytest.raises(RateLimited):
        limiter.check("id:ops")
    clock.now += 3600
    assert limiter.take("id:ops").tokens == pytest.approx(2.0)  # capped at the capacity
    store.close()


def test_check_charges_every_bucket(store: Store) -> None:
    limiter = RateLimiter(store, rate=2, window=60.0)
    limiter.check("addr:a")
    limiter.check("addr:a")
    with pytest.raises(RateLimited):
        limiter.check("addr:a", "id:x")
    assert limiter.take("id:x").allowed  # id:x was charged although addr:a refused: 1 left
    assert limiter.take("id:x").allowed is False


def test_prune_forgets_idle_buckets(store: Store, clock: FakeClock) -> None:
    limiter = RateLimiter(store, rate=2, window=60.0)
    limiter.check("addr:a")
    clock.now += 121
    limiter.check("addr:b")
    assert limiter.prune() == 1


# --------------------------------------------------------------------------- HTTP guard


def test_http_guard_order_never_skips_the_token(store: Store, config: Config) -> None:
    t = Tokens(store, roles=set(config.roles), default_ttl=60, max_ttl=60)
    issued = t.issue("ops@example.test", "operator")
    import ipaddress

    gate = NetGate(allow=(ipaddress.ip_network("127.0.0.0/8"),))
    guard = HttpGuard(gate, t, RateLimiter(store, rate=3, window=30.0))
    assert guard.admit("127.0.0.1", f"Bearer {issued.token}").name == "ops@example.test"
    # an allowed address without a token is still refused
    with pytest.raises(TokenError):
        guard.admit("127.0.0.1", None)
    with pytest.raises(CarrierError, match="address not allowed"):
        guard.admit("192.0.2.7", f"Bearer {issued.token}")
    # the request without a token was charged to 127.0.0.1: the third request is the last one
    assert guard.admit("127.0.0.1", f"Bearer {issued.token}").token_id == issued.record.id
    with pytest.raises(RateLimited):
        guard.admit("127.0.0.1", f"Bearer {issued.token}")
    assert RateLimiter(store, rate=3, window=30.0).take(address_key("192.0.2.7")).tokens == 2.0


# --------------------------------------------------------------------------- replay digests


def test_signature_digest_is_single_use_per_mail(store: Store) -> None:
    digest = "ab" * 32
    assert remember_signature(store, digest, fingerprint=OPS, message_key="carrier:<m1@x>", signed_at=1.0)
    assert remember_signature(store, digest, fingerprint=OPS, message_key="carrier:<m1@x>", signed_at=1.0)
    assert not remember_signature(store, digest, fingerprint=OPS, message_key="carrier:<m2@x>", signed_at=1.0)


# --------------------------------------------------------------------------- enrollment (local decisions)


def verified_request(store: Store, email: str = "newbie@example.test", fpr: str = NEWBIE) -> str:
    return store.create_enrollment(email, fingerprint=fpr, state="verified").id


def local(config: Config, store: Store) -> Enrollment:
    return Enrollment(config, store, directory=Directory(config, store), audit=Audit(store, AUDIT_KEY))


def test_cli_approve_enrolls_with_the_default_or_named_role(config: Config, store: Store) -> None:
    enrollment = local(config, store)
    rid = verified_request(store)
    out = enrollment.approve(rid, by="cli:root", door="cli")
    assert out.status == "approved" and out.request is not None and out.request.role == "viewer"
    assert [n.to for n in out.notices] == ["newbie@example.test"]
    who = Directory(config, store).identity("NewBie@example.test")
    assert who is not None and (who.role, who.fingerprint, who.admin) == ("viewer", NEWBIE, False)
    # a second approve (or a deny) of the same request is answered, not applied
    again = enrollment.approve(rid, by="cli:root", door="cli", role="admin")
    assert again.status == "repeated" and "already approved (role viewer" in again.reply
    assert enrollment.deny(rid, by="cli:root", door="cli").status == "repeated"
    assert Audit(store, AUDIT_KEY).verify().ok


def test_approve_refuses_unknown_roles_and_unconfirmed_requests(config: Config, store: Store) -> None:
    enrollment = local(config, store)
    rid = verified_request(store)
    out = enrollment.approve(rid, by="cli:root", door="cli", role="root")
    assert out.status == "refused" and "role 'root' is not defined" in out.reply
    challenged = store.create_enrollment("x@example.test", fingerprint=NEWBIE, state="challenged",
                                         nonce_hash=nonce_hash("0" * 32), nonce_expires_at=1e12).id
    out = enrollment.approve(challenged, by="cli:root", door="cli")
    assert out.status == "repeated" and "not confirmed by the requester" in out.reply
    for bad in ("r-nope", "../../etc", "r-aaaaaaaaaaaa"):
        with pytest.raises(CarrierError):
            enrollment.approve(bad, by="cli:root", door="cli")


def test_deny_and_revoke(config: Config, store: Store) -> None:
    enrollment = local(config, store)
    rid = verified_request(store)
    assert enrollment.deny(rid, by="cli:root", door="cli").status == "denied"
    assert Directory(config, store).identity("newbie@example.test") is None
    other = verified_request(store, "dev@example.test", "B" * 40)
    enrollment.approve(other, by="cli:root", door="cli", role="operator")
    t = Tokens(store, roles=set(config.roles), default_ttl=60, max_ttl=60)
    issued = t.issue("dev@example.test", "operator")
    out = enrollment.revoke("b" * 40, by="cli:root", door="cli")
    assert out.status == "revoked" and "1 token(s) revoked" in out.reply
    assert Directory(config, store).identity("dev@example.test") is None
    with pytest.raises(TokenError):
        t.check(issued.token)
    assert enrollment.revoke("B" * 40, by="cli:root", door="cli").status == "repeated"
    assert enrollment.revoke("C" * 40, by="cli:root", door="cli").status == "unknown"
    assert enrollment.revoke("nonsense", by="cli:root", door="cli").status == "refused"


def test_revoking_a_configured_key_blocks_it(config: Config, store: Store) -> None:
    directory = Directory(config, store)
    assert directory.identity("ops@example.test") is not None
    out = local(config, store).revoke(OPS, by="cli:root", door="cli")
    assert out.status == "revoked"
    assert directory.identity("ops@example.test") is None
    # the admin key too: a revoked admin is no admin
    local(config, store).revoke(ADMIN, by="cli:root", door="cli")
    assert directory.admin("admin@example.test") is None and directory.identity("admin@example.test") is None


def test_directory_admins_by_fingerprint(config: Config, store: Store) -> None:
    directory = Directory(config, store)
    admin = directory.identity("Admin@Example.test")
    assert admin is not None and admin.admin and admin.role == "admin" and admin.fingerprint == ADMIN
    ops = directory.identity("ops@example.test")
    assert ops is not None and not ops.admin and ops.role == "operator"
    assert directory.identity("boss@example.test") is None  # admin_contacts grant nothing
    assert directory.is_admin_fingerprint(ADMIN.lower()) and not directory.is_admin_fingerprint(OPS)


def test_expire_stale_challenges(config: Config, store: Store, clock: FakeClock) -> None:
    enrollment = local(config, store)
    rid = store.create_enrollment("x@example.test", fingerprint=NEWBIE, state="challenged",
                                  nonce_hash=nonce_hash("0" * 32), nonce_expires_at=clock.now + 10).id
    assert enrollment.expire_stale() == 0
    clock.now += 11
    assert enrollment.expire_stale() == 1
    record = store.get_enrollment(rid)
    assert record is not None and record.state == "expired" and record.nonce_hash is None


def test_job_start_and_end_are_chained_audit_rows(store: Store) -> None:
    audit = Audit(store, AUDIT_KEY)
    who = Identity("ops@example.test", "operator", "mail", fingerprint=OPS)
    audit.job(who, "j-aaaaaaaaaaaa", "start", hosts=["web1", "web2"], detail={"kind": "exec"})
    audit.job(who, "j-aaaaaaaaaaaa", "end", hosts=["web1", "web2"], outcome="failed", detail={"rc": 2})
    rows = store.list_audit(actor="ops@example.test", limit=5)
    assert [(r.action, r.outcome) for r in rows] == [("job:end", "failed"), ("job:start", "ok")]
    assert rows[0].detail == {"hosts": ["web1", "web2"], "role": "operator", "rc": 2}
    assert audit.verify().ok
