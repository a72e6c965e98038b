"""Key discovery with real keys: attached keys, WKD (a local HTTP server run here), the sandbox's VKS
keyserver; what is accepted, what is refused, and what ends up in Carrier's keyring."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from auth_support import GpgUser, KeyFactory, World, gpg, make_world

from carrier.auth.errors import KeyDiscoveryError
from carrier.auth.keyserver import KeyFinder, attached_keys, wkd_hash
from carrier.sandbox.manager import Sandbox

pytestmark = pytest.mark.sandbox


@dataclass
class FakeWeb:
    """A loopback HTTP server answering from a table; it records the paths asked for."""

    routes: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        web = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                web.seen.append(self.path)
                status, body = web.routes.get(self.path.split("?")[0], (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def web() -> Iterator[FakeWeb]:
    server = FakeWeb()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kf() -> Iterator[KeyFactory]:
    factory = KeyFactory()
    yield factory
    factory.close()


@pytest.fixture
def world(sandbox: Sandbox) -> Iterator[World]:
    w = make_world(sandbox)
    yield w
    w.close()


def finder(world: World, *, keyserver: str | None = None, wkd: bool = False, wkd_url: str | None = None,
           timeout: float = 3.0) -> KeyFinder:
    return KeyFinder(world.trust.keyring, keyserver_url=keyserver, timeout=timeout, wkd=wkd, wkd_base=wkd_url)


def with_key(*keys: bytes) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "x@example.test"
    msg.set_content("enroll")
    for key in keys:
        msg.add_attachment(key, maintype="application", subtype="pgp-keys", filename="key.asc")
    return msg


def refused(call: object, reason: str) -> KeyDiscoveryError:
    with pytest.raises(KeyDiscoveryError) as err:
        call()  # type: ignore[operator]
    assert err.value.reason == reason, str(err.value)
    return err.value


# --------------------------------------------------------------------------- sources


def test_vks_keyserver_of_the_sandbox(world: World, sandbox: Sandbox) -> None:
    newbie = sandbox.gpg().fingerprint("newbie")
    found = finder(world, keyserver=world.config.keyserver.url).find("newbie@example.test")
    assert (found.fingerprint, found.source) == (newbie, "keyserver")
    key = world.trust.keyring.key(newbie)
    assert key is not None and [u.email for u in key.uids] == ["newbie@example.test"]


def test_attached_key(world: World, kf: KeyFactory) -> None:
    dora = kf.make("dora@example.test")
    keys = attached_keys(with_key(dora.public_key()))
    found = finder(world).find("dora@example.test", keys)
    assert (found.fingerprint, found.source) == (dora.fingerprint, "attachment")


def test_wkd_from_a_local_server(world: World, kf: KeyFactory, web: FakeWeb) -> None:
    erin = kf.make("Erin@example.test")
    binary = gpg(erin.home, "--export", erin.fingerprint)
    web.routes[f"/.well-known/openpgpkey/hu/{wkd_hash('erin')}"] = (200, binary)
    found = finder(world, wkd=True, wkd_url=web.url).find("Erin@example.test")
    assert (found.fingerprint, found.source) == (erin.fingerprint, "wkd")
    assert web.seen == [f"/.well-known/openpgpkey/hu/{wkd_hash('erin')}?l=Erin"]


def test_wkd_disabled_is_not_asked_and_the_keyserver_is(world: World, web: FakeWeb, sandbox: Sandbox) -> None:
    found = finder(world, keyserver=world.config.keyserver.url, wkd=False, wkd_url=web.url).find(
        "newbie@example.test")
    assert found.source == "keyserver" and web.seen == []


def test_wkd_miss_falls_back_to_the_keyserver(world: World, web: FakeWeb) -> None:
    found = finder(world, keyserver=world.config.keyserver.url, wkd=True, wkd_url=web.url).find(
        "newbie@example.test")
    assert found.source == "keyserver" and len(web.seen) == 1


def test_nothing_found_says_how_to_publish(world: World, web: FakeWeb) -> None:
    err = refused(lambda: finder(world, keyserver=web.url).find("nobody@example.test"), "not_found")
    assert "attach your public key" in str(err)
    assert web.seen == ["/vks/v1/by-email/nobody%40example.test"]


# --------------------------------------------------------------------------- refusals


def test_key_of_another_address_is_refused_and_not_imported(world: World, kf: KeyFactory) -> None:
    frank = kf.make("frank@example.test")
    keys = attached_keys(with_key(frank.public_key()))
    refused(lambda: finder(world).find("ops@example.test", keys), "no_matching_uid")
    assert world.trust.keyring.key(frank.fingerprint) is None


def test_lookalike_address_is_not_the_address(world: World, kf: KeyFactory) -> None:
    look = kf.make("xops@example.test", extra_uids=["Ops <ops@example.test.evil>"])
    refused(lambda: finder(world).find("ops@example.test", attached_keys(with_key(look.public_key()))),
            "no_matching_uid")


def test_expired_key_is_refused(world: World, kf: KeyFactory) -> None:
    old = kf.make("old2@example.test", expired=True)
    refused(lambda: finder(world).find(old.address, attached_keys(with_key(old.public_key()))), "expired_key")
    assert world.trust.keyring.key(old.fingerprint) is None


def test_revoked_key_is_refused(world: World, kf: KeyFactory) -> None:
    gone = kf.make("gone2@example.test", revoked=True)
    keys = attached_keys(with_key(gone.public_key()))
    refused(lambda: finder(world).find(gone.address, keys), "revoked_key")
    assert world.trust.keyring.key(gone.fingerprint) is None


def test_two_keys_claiming_one_address_are_ambiguous(world: World, kf: KeyFactory) -> None:
    a, b = kf.make("twin@example.test"), kf.make("twin@example.test")
    blob = a.public_key() + b.public_key()
    refused(lambda: finder(world).find("twin@example.test", attached_keys(with_key(blob))), "ambiguous")


def test_only_the_chosen_key_and_uid_are_imported(world: World, kf: KeyFactory) -> None:
    gina = kf.make("gina@example.test", extra_uids=["Gina Admin <admin@example.test>"])
    other = kf.make("hank@example.test")
    blob = gina.public_key() + other.public_key()
    found = finder(world).find("gina@example.test", attached_keys(with_key(blob)))
    key = world.trust.keyring.key(found.fingerprint)
    assert key is not None and [u.email for u in key.uids] == ["gina@example.test"]
    assert world.trust.keyring.key(other.fingerprint) is None


def test_a_refused_attachment_does_not_stop_a_good_keyserver_key(world: World, kf: KeyFactory,
                                                                  sandbox: Sandbox) -> None:
    wrong = kf.make("notnewbie@example.test")
    found = finder(world, keyserver=world.config.keyserver.url).find(
        "newbie@example.test", attached_keys(with_key(wrong.public_key())))
    assert found.source == "keyserver" and found.fingerprint == sandbox.gpg().fingerprint("newbie")


def test_garbage_key_data(world: World) -> None:
    refused(lambda: finder(world).find("ops@example.test", [b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nxx"]),
            "bad_key_data")


def test_ensure_takes_only_the_configured_fingerprint(world: World, sandbox: Sandbox, kf: KeyFactory,
                                                      web: FakeWeb) -> None:
    ops = sandbox.gpg().fingerprint("ops")
    if world.trust.keyring.key(ops) is not None:
        # An earlier `carrier serve` test may have imported it into the shared home this copies;
        # this test needs a keyring that has to look the key up.
        subprocess.run(["gpg", "--homedir", str(world.config.gnupg_home), "--batch", "--yes",
                        "--delete-keys", ops], check=True, capture_output=True)
    assert world.trust.keyring.key(ops) is None
    impostor = kf.make("ops@example.test")
    web.routes["/vks/v1/by-email/ops%40example.test"] = (200, impostor.public_key())
    refused(lambda: finder(world, keyserver=web.url).ensure("ops@example.test", ops), "not_found")
    assert world.trust.keyring.key(impostor.fingerprint) is None
    real = finder(world, keyserver=world.config.keyserver.url).ensure("ops@example.test", ops)
    assert real.fingerprint == ops


# --------------------------------------------------------------------------- lookup failures


def test_keyserver_error_status_is_clear(world: World, web: FakeWeb) -> None:
    web.routes["/vks/v1/by-email/ops%40example.test"] = (500, b"oops")
    err = refused(lambda: finder(world, keyserver=web.url).find("ops@example.test"), "lookup_failed")
    assert "answered HTTP 500" in str(err) and "127.0.0.1" in str(err)


def test_keyserver_unreachable_is_clear(world: World) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    err = refused(lambda: finder(world, keyserver=f"http://127.0.0.1:{port}").find("ops@example.test"),
                  "lookup_failed")
    assert "cannot reach keyserver" in str(err)


def test_keyserver_timeout_is_clear(world: World) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections in the kernel, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        err = refused(lambda: finder(world, keyserver=url, timeout=0.3).find("ops@example.test"),
                      "lookup_failed")
    assert "did not answer within 0.3 s" in str(err)


def test_user_refs(kf: KeyFactory) -> None:
    # the factory itself: keys really carry what the tests rely on
    user: GpgUser = kf.make("check@example.test", signing_subkey=True)
    listing = gpg(user.home, "--with-colons", "--list-keys", user.fingerprint).decode()
    assert listing.count("\nsub:") == 2 and "check@example.test" in listing
