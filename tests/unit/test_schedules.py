"""Schedules without servers: cron parsing and next slots (croniter), which slots a check fires or
reports missed, the store's (schedule, slot) claim, and the policy's ``schedule`` action."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from clock_support import FakeClock

from carrier.auth.policy import SCOPE_OF_ACTION, HostRef, Identity, Request, decide
from carrier.config import Role
from carrier.formats import FormatError, check_schedule_name
from carrier.ops.schedules import GRACE_SECONDS, check_cron, due, next_slot, owner_address, slots_between
from carrier.store import Store
from carrier.store import schedules as sql

# 2023-11-14 22:13:20 UTC
T0 = 1_700_000_000.0
DAY = 86_400.0




@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)




# --------------------------------------------------------------------------- cron


def test_next_slot_of_a_daily_cron_is_the_next_0300_utc() -> None:
    first = next_slot("0 3 * * *", T0)
    assert first == 1_700_017_200.0  # 2023-11-15 03:00:00 UTC
    assert next_slot("0 3 * * *", first) == first + DAY  # strictly after: the same slot never twice


def test_a_sixth_field_is_seconds_and_aliases_work() -> None:
    assert next_slot("* * * * * */5", T0) == T0 + 5
    assert next_slot("* * * * * */5", T0 + 1) == T0 + 5
    assert next_slot("@hourly", T0) == 1_700_002_800.0  # 23:00 UTC


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("", "empty"),
        ("0 3 * *", "expected 5 fields"),
        ("0 3 * * * * 2030", "expected 5 fields"),
        ("61 * * * *", "out of range"),
        ("0 25 * * *", "out of range"),
        ("every day", "expected 5 fields"),
        ("a b c d e", "invalid cron expression"),
    ],
)
def test_bad_cron_expressions_are_refused_with_a_reason(expr: str, says: str) -> None:
    with pytest.raises(FormatError, match=says):
        check_cron(expr)


def test_good_cron_expressions_are_normalised() -> None:
    assert check_cron("  0  3 * * 1-5 ") == "0 3 * * 1-5"
    assert check_cron("@daily") == "@daily"


def test_schedule_names() -> None:
    assert check_schedule_name("nightly-ping.web_1") == "nightly-ping.web_1"
    for bad in ("", "-x", "a b", "x" * 65, "a/b", None):
        with pytest.raises(FormatError, match="schedule name"):
            check_schedule_name(bad)


# --------------------------------------------------------------------------- which slots a check handles


def test_slots_between_is_half_open() -> None:
    assert slots_between("* * * * * */5", T0, T0 + 15) == [T0 + 5, T0 + 10, T0 + 15]
    assert slots_between("* * * * * */5", T0, T0 + 4) == []


def test_the_newest_slot_fires_and_older_ones_are_missed() -> None:
    assert due("* * * * * */5", T0, T0 + 3) == due("* * * * * */5", T0, T0 + 4)
    assert due("* * * * * */5", T0, T0 + 4).fire is None
    on_time = due("* * * * * */5", T0, T0 + 6)
    assert on_time.fire == T0 + 5 and on_time.missed is None
    # Down from T0 to T0+21: 5, 10, 15 were missed (reported), 20 is 1 s old and fires.
    after = due("* * * * * */5", T0, T0 + 21)
    assert after.fire == T0 + 20 and after.missed == (T0 + 5, T0 + 15, 3)


def test_after_a_long_downtime_nothing_runs_and_everything_is_reported() -> None:
    later = due("0 3 * * *", T0, T0 + 3 * DAY)
    assert later.fire is None
    assert later.missed is not None and later.missed[2] == 3
    # The newest slot is older than the grace: missed too, not run late.
    slot = next_slot("0 3 * * *", T0)
    assert due("0 3 * * *", T0, slot + GRACE_SECONDS + 1).fire is None
    assert due("0 3 * * *", T0, slot + GRACE_SECONDS - 1).fire == slot


def test_a_huge_backlog_is_counted_up_to_a_cap() -> None:
    slots = slots_between("* * * * * *", T0, T0 + 50, cap=10)
    assert len(slots) == 10 and slots[-1] == T0 + 50


def test_owner_address() -> None:
    assert owner_address("ops@example.test") == "ops@example.test"
    assert owner_address("local:root") is None


# --------------------------------------------------------------------------- the claim in the store


def _add(store: Store, name: str = "nightly") -> sql.ScheduleRecord:
    record = sql.add_schedule(store, name=name, owner="local:root", door="cli", playbook="ping", limit="web1",
                              extra_vars={}, cron="* * * * * */5", notify="failure")
    assert record is not None
    return record


def test_a_name_is_taken_once(store: Store) -> None:
    _add(store)
    assert sql.add_schedule(store, name="nightly", owner="x@y.test", door="mail", playbook="ping", limit=None,
                            extra_vars={}, cron="@daily", notify="never") is None
    assert [r.owner for r in sql.list_schedules(store)] == ["local:root"]
    assert sql.remove_schedule(store, "nightly") and not sql.remove_schedule(store, "nightly")


def test_a_slot_is_claimed_once(store: Store) -> None:
    _add(store)
    assert sql.claim_slot(store, "nightly", T0 + 5, "a")
    assert not sql.claim_slot(store, "nightly", T0 + 5, "b")
    assert sql.claim_slot(store, "nightly", T0 + 10, "b")
    assert [(r.slot, r.claimed_by) for r in sql.runs(store, "nightly")] == [(T0 + 10, "b"), (T0 + 5, "a")]


def test_two_processes_checking_at_once_fire_a_slot_once(tmp_path: Path, clock: FakeClock,
                                                         store_url: str | None) -> None:
    """Two Stores on one file (two `carrier serve` processes): both saw the same checked_at, both try
    to claim the same due slot; exactly one wins it and the missed report is written once."""
    stores = [Store.open(tmp_path / "state", clock=clock, url=store_url) for _ in range(2)]
    try:
        record = _add(stores[0])
        clock.now = T0 + 21
        found = due(record.cron, record.checked_at, clock.now)
        won: list[sql.Claimed] = []
        barrier = threading.Barrier(2)

        def check(store: Store) -> None:
            barrier.wait()
            won.append(sql.claim_due(store, "nightly", checked_from=record.checked_at, checked_to=clock.now,
                                     fire=found.fire, missed=found.missed, claimed_by=str(id(store))))

        threads = [threading.Thread(target=check, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(c.fire is not None for c in won) == [False, True]
        assert sorted(c.missed is not None for c in won) == [False, True]
        rows = sql.runs(stores[1], "nightly")
        assert [(r.slot, r.state, r.missed_count) for r in rows] == [
            (T0 + 20, "claimed", 0), (T0 + 15, "missed", 3)]
        # A restart reads the moved checked_at: nothing is due again.
        again = sql.get_schedule(stores[1], "nightly")
        assert again is not None and again.checked_at == T0 + 21
        assert due(again.cron, again.checked_at, clock.now) == due(again.cron, T0 + 21, T0 + 21)
        assert due(again.cron, again.checked_at, clock.now).fire is None
    finally:
        for s in stores:
            s.close()


def test_a_stale_check_wins_nothing_even_for_a_new_slot(store: Store, clock: FakeClock) -> None:
    record = _add(store)
    clock.now = T0 + 6
    assert sql.claim_due(store, "nightly", checked_from=record.checked_at, checked_to=clock.now, fire=T0 + 5,
                         missed=None, claimed_by="a").fire == T0 + 5
    # A process that read checked_at before that move: its compare-and-set fails.
    late = sql.claim_due(store, "nightly", checked_from=record.checked_at, checked_to=T0 + 11, fire=T0 + 10,
                         missed=None, claimed_by="b")
    assert late.fire is None and late.missed is None


def test_a_notification_is_taken_once(store: Store) -> None:
    _add(store)
    assert sql.claim_slot(store, "nightly", T0 + 5, "a")
    sql.mark_started(store, "nightly", T0 + 5, "j-aaaaaaaaaaaa")
    assert [r.job_id for r in sql.started_unnotified(store)] == ["j-aaaaaaaaaaaa"]
    assert sql.take_notification(store, "nightly", T0 + 5)
    assert not sql.take_notification(store, "nightly", T0 + 5)
    assert sql.started_unnotified(store) == []


# --------------------------------------------------------------------------- the policy action

ROLES = {
    "admin": Role(playbooks=("*",), exec=True),
    "operator": Role(playbooks=("*",), hosts="web*", exec=True),
    "scheduler": Role(playbooks=("ping",), hosts="web*", schedules=True),
}
WEB1 = HostRef("web1", ("web",))
DB1 = HostRef("db1", ("db",))


def _who(role: str, **kw: object) -> Identity:
    return Identity(name=str(kw.pop("name", "ops@example.test")), role=role, door="mail", **kw)  # type: ignore[arg-type]


def test_schedules_are_for_admins_by_default() -> None:
    assert decide(_who("admin", admin=True), Request("schedule"), ROLES).allowed
    no = decide(_who("operator"), Request("schedule"), ROLES)
    assert not no.allowed and "may not use schedules" in no.reason


def test_a_role_with_schedules_manages_its_own_and_runs_only_what_it_may() -> None:
    me = _who("scheduler")
    assert decide(me, Request("schedule", (WEB1,), playbook="ping"), ROLES).allowed
    facts = decide(me, Request("schedule", (WEB1,), playbook="facts"), ROLES)
    assert "may not run playbook facts" in facts.reason
    assert "may not target db1" in decide(me, Request("schedule", (DB1,), playbook="ping"), ROLES).reason
    assert decide(me, Request("schedule", job_owner="ops@example.test"), ROLES).allowed
    assert "someone else" in decide(me, Request("schedule", job_owner="x@example.test"), ROLES).reason
    admin = _who("admin", admin=True)
    assert decide(admin, Request("schedule", job_owner="x@example.test"), ROLES).allowed


def test_a_schedule_is_a_run_tool_for_tokens() -> None:
    assert SCOPE_OF_ACTION["schedule"] == "run"
    jobs_only = _who("scheduler", scopes=("tools:jobs",))
    assert "does not include run tools" in decide(jobs_only, Request("schedule"), ROLES).reason
    assert decide(_who("scheduler", scopes=("tools:run",)), Request("schedule"), ROLES).allowed
