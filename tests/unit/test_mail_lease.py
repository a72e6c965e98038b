"""Mail leases (carrier.mail.lease, carrier.store.gateway) on both store dialects: short, renewed
while their mail is processed, and taken over once they run out."""

from __future__ import annotations

import threading

from clock_support import FakeClock

from carrier.mail.lease import MAIL_LEASE_RENEW, MAIL_LEASE_TTL, Renewer, owner_alive
from carrier.store import Store
from carrier.store import gateway as sql

#: Owners on another machine (another boot id): judged by their lease alone, never by pid.
REMOTE_A = "4242|another-boot-id/100|aaaaaaaaaaaa"
REMOTE_B = "4343|yet-another-boot-id/200|bbbbbbbbbbbb"


def test_the_lease_is_short_and_renewed_well_within_it() -> None:
    assert MAIL_LEASE_TTL <= 60
    assert MAIL_LEASE_RENEW * 3 <= MAIL_LEASE_TTL  # two renewals may fail before it runs out


def test_a_renewed_lease_is_kept_and_a_lapsed_one_taken_over(store: Store, clock: FakeClock) -> None:
    assert owner_alive(REMOTE_A)  # another machine's owner: this process cannot tell, so its lease rules
    assert sql.acquire_lease(store, "carrier", "uid:1:1", REMOTE_A, MAIL_LEASE_TTL)
    assert not sql.acquire_lease(store, "carrier", "uid:1:1", REMOTE_B, MAIL_LEASE_TTL)
    # A keeps renewing: B never gets it, however long the mail takes.
    for _ in range(10):
        clock.now += MAIL_LEASE_RENEW
        assert sql.renew_lease(store, "carrier", "uid:1:1", REMOTE_A, MAIL_LEASE_TTL)
        assert not sql.acquire_lease(store, "carrier", "uid:1:1", REMOTE_B, MAIL_LEASE_TTL)
    # A stops renewing (killed): once the lease has run out, B takes the mail.
    clock.now += MAIL_LEASE_TTL
    assert sql.acquire_lease(store, "carrier", "uid:1:1", REMOTE_B, MAIL_LEASE_TTL)
    assert sql.lease_owner(store, "carrier", "uid:1:1") == REMOTE_B
    # A, back from a long pause, learns that the lease is no longer its own.
    assert not sql.renew_lease(store, "carrier", "uid:1:1", REMOTE_A, MAIL_LEASE_TTL)
    assert sql.lease_owner(store, "carrier", "uid:1:1") == REMOTE_B


def test_renewing_a_released_lease_says_so(store: Store) -> None:
    assert sql.acquire_lease(store, "carrier", "uid:1:2", REMOTE_A, MAIL_LEASE_TTL)
    sql.release_lease(store, "carrier", "uid:1:2", REMOTE_A)
    assert not sql.renew_lease(store, "carrier", "uid:1:2", REMOTE_A, MAIL_LEASE_TTL)


def test_the_renewer_renews_until_its_block_ends() -> None:
    calls: list[float] = []
    three = threading.Event()

    def renew() -> bool:
        calls.append(0.0)
        if len(calls) >= 3:
            three.set()
        return True

    with Renewer(renew, 0.01) as renewer:
        assert three.wait(10)
    done = len(calls)
    assert renewer.renewals == done >= 3 and not renewer.lost
    threading.Event().wait(0.1)
    assert len(calls) == done  # nothing after the block


def test_the_renewer_stops_once_the_lease_is_lost_and_survives_a_failing_store() -> None:
    results: list[object] = [RuntimeError("store away"), True, False]
    gone = threading.Event()

    def renew() -> bool:
        result = results.pop(0) if results else True
        if isinstance(result, Exception):
            raise result
        if result is False:
            gone.set()
        return bool(result)

    with Renewer(renew, 0.01) as renewer:
        assert gone.wait(10)
    assert renewer.lost and renewer.renewals == 1 and results == []
