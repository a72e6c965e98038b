"""SQL for schedules (``carrier.ops.schedules``), tables of schema migration 8.

- ``schedules``: one row per named schedule (owner, playbook, limit, vars, cron, notify) and
  ``checked_at``: every slot at or before it has been handled (claimed, refused or reported missed).
- ``schedule_runs``: one row per handled slot, keyed by ``(schedule, slot)``. Inserting that row is
  the claim: of two Carrier processes on one store (or one process before and after a restart) only
  the one whose insert succeeds fires the slot. A run of missed slots is one ``missed`` row at the
  last missed slot (with their count and the first), so a long downtime is one report.

Every read-modify-write runs in ``store.transaction()`` (``BEGIN IMMEDIATE``): atomic across threads
and processes. What a slot is and when it is due is decided in ``carrier.ops.schedules``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from carrier.store import schema
from carrier.store.db import Store


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    name: str
    owner: str
    door: str
    playbook: str
    limit: str | None
    extra_vars: dict[str, Any]
    cron: str
    notify: str
    created_at: float
    checked_at: float


@dataclass(frozen=True, slots=True)
class ScheduleRun:
    schedule: str
    slot: float
    state: str
    job_id: str | None
    claimed_by: str
    reason: str
    missed_count: int
    first_missed: float | None
    notified: bool
    created_at: float




def _schedule(row: Any) -> ScheduleRecord:
    return ScheduleRecord(row["name"], row["owner"], row["door"], row["playbook"], row["limit_pattern"],
                          json.loads(row["extra_vars"]), row["cron"], row["notify"], float(row["created_at"]),
                          float(row["checked_at"]))


def _run(row: Any) -> ScheduleRun:
    first = row["first_missed"]
    return ScheduleRun(row["schedule"], float(row["slot"]), row["state"], row["job_id"], row["claimed_by"],
                       row["reason"], int(row["missed_count"]), None if first is None else float(first),
                       bool(row["notified"]), float(row["created_at"]))


def add_schedule(store: Store, *, name: str, owner: str, door: str, playbook: str, limit: str | None,
                 extra_vars: Mapping[str, Any], cron: str, notify: str) -> ScheduleRecord | None:
    """Insert a schedule (its first slot is after now); None when the name is taken."""
    if door not in schema.DOORS:
        raise ValueError(f"invalid door {door!r}: expected one of {', '.join(schema.DOORS)}")
    if notify not in schema.SCHEDULE_NOTIFY:
        raise ValueError(f"invalid notify {notify!r}: expected one of {', '.join(schema.SCHEDULE_NOTIFY)}")
    with store.transaction() as conn:
        now = store.clock()
        cur = conn.execute(
            "INSERT INTO schedules (name, owner, door, playbook, limit_pattern, extra_vars, "
            "cron, notify, created_at, checked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (name, owner, door, playbook, limit, json.dumps(dict(extra_vars), sort_keys=True), cron, notify,
             now, now),
        )
        if cur.rowcount != 1:
            return None
    return get_schedule(store, name)


def get_schedule(store: Store, name: str) -> ScheduleRecord | None:
    row = store._conn().execute(
        "SELECT name, owner, door, playbook, limit_pattern, extra_vars, cron, notify, created_at, "
        "checked_at FROM schedules WHERE name = ?", (name,)).fetchone()
    return None if row is None else _schedule(row)


def list_schedules(store: Store, owner: str | None = None) -> list[ScheduleRecord]:
    """Schedules by name (only ``owner``'s when given)."""
    if owner is None:
        rows = store._conn().execute(
            "SELECT name, owner, door, playbook, limit_pattern, extra_vars, cron, notify, created_at, "
            "checked_at FROM schedules ORDER BY name").fetchall()
    else:
        rows = store._conn().execute(
            "SELECT name, owner, door, playbook, limit_pattern, extra_vars, cron, notify, created_at, "
            "checked_at FROM schedules WHERE owner = ? ORDER BY name", (owner,)).fetchall()
    return [_schedule(r) for r in rows]


def remove_schedule(store: Store, name: str) -> bool:
    """Delete a schedule and its slot rows; False when there was none (the audit keeps the history)."""
    with store.transaction() as conn:
        gone = conn.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount
        conn.execute("DELETE FROM schedule_runs WHERE schedule = ?", (name,))
    return gone == 1


_CLAIM = ("INSERT INTO schedule_runs (schedule, slot, state, job_id, claimed_by, reason, missed_count, "
          "first_missed, notified, created_at) VALUES (?, ?, 'claimed', NULL, ?, '', 0, NULL, 0, ?) "
          "ON CONFLICT (schedule, slot) DO NOTHING")
_RUNS = ("SELECT schedule, slot, state, job_id, claimed_by, reason, missed_count, first_missed, notified, "
         "created_at FROM schedule_runs ")


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one process won for a schedule in one check: the slot to fire, the missed run to report."""

    fire: float | None
    missed: ScheduleRun | None


def claim_due(store: Store, name: str, *, checked_to: float, fire: float | None,
              missed: tuple[float, float, int] | None, claimed_by: str,
              checked_from: float) -> Claimed:
    """Record the slots a check found (compare-and-set on ``checked_at``: a process that looked at a
    stale ``checked_at`` wins nothing) and claim them with unique rows.

    ``missed``: (first slot, last slot, count) of slots not to run; ``fire``: the slot to run.
    """
    with store.transaction() as conn:
        now = store.clock()
        moved = conn.execute("UPDATE schedules SET checked_at = ? WHERE name = ? AND checked_at = ?",
                             (checked_to, name, checked_from)).rowcount
        if moved != 1:
            return Claimed(None, None)
        missed_run = None
        if missed is not None:
            first, last, count = missed
            cur = conn.execute(
                "INSERT INTO schedule_runs (schedule, slot, state, job_id, claimed_by, reason, missed_count, "
                "first_missed, notified, created_at) VALUES (?, ?, 'missed', NULL, ?, '', ?, ?, 0, ?) "
                "ON CONFLICT (schedule, slot) DO NOTHING",
                (name, last, claimed_by, count, first, now))
            if cur.rowcount == 1:
                missed_run = get_run(store, name, last)
        won = None
        if fire is not None:
            cur = conn.execute(_CLAIM, (name, fire, claimed_by, now))
            won = fire if cur.rowcount == 1 else None
    return Claimed(won, missed_run)


def claim_slot(store: Store, name: str, slot: float, claimed_by: str) -> bool:
    """Claim one slot by inserting its row; False when someone already has (the uniqueness alone)."""
    with store.transaction() as conn:
        cur = conn.execute(_CLAIM, (name, slot, claimed_by, store.clock()))
    return cur.rowcount == 1


def mark_started(store: Store, name: str, slot: float, job_id: str) -> None:
    """The slot's job exists (called inside the transaction that creates the job)."""
    with store.transaction() as conn:
        conn.execute("UPDATE schedule_runs SET state = 'started', job_id = ? WHERE schedule = ? AND slot = ?",
                     (job_id, name, slot))


def mark_refused(store: Store, name: str, slot: float, reason: str) -> None:
    with store.transaction() as conn:
        conn.execute("UPDATE schedule_runs SET state = 'refused', reason = ? WHERE schedule = ? AND slot = ?",
                     (reason[:500], name, slot))


def _select_runs(store: Store, where: str, args: tuple[Any, ...]) -> list[ScheduleRun]:
    # ``where`` is one of this module's literals, never caller input.
    return [_run(r) for r in store._conn().execute(_RUNS + where, args).fetchall()]


def get_run(store: Store, name: str, slot: float) -> ScheduleRun | None:
    found = _select_runs(store, "WHERE schedule = ? AND slot = ?", (name, slot))
    return found[0] if found else None


def runs(store: Store, name: str | None = None, *, limit: int = 100) -> list[ScheduleRun]:
    """Slot rows newest first (of one schedule when ``name`` is given)."""
    if name is None:
        return _select_runs(store, "ORDER BY slot DESC LIMIT ?", (limit,))
    return _select_runs(store, "WHERE schedule = ? ORDER BY slot DESC LIMIT ?", (name, limit))


def started_unnotified(store: Store, limit: int = 100) -> list[ScheduleRun]:
    """Started slots whose job's end has not been handled yet (mailed or not, per notify)."""
    return _select_runs(store, "WHERE state = 'started' AND notified = 0 ORDER BY slot LIMIT ?", (limit,))


def take_notification(store: Store, name: str, slot: float) -> bool:
    """Compare-and-set ``notified``: True for the one caller that is to send the slot's mail.
    Call it inside the transaction that queues the mail, so the mail and the mark go together."""
    with store.transaction() as conn:
        cur = conn.execute("UPDATE schedule_runs SET notified = 1 WHERE schedule = ? AND slot = ? "
                           "AND notified = 0", (name, slot))
    return cur.rowcount == 1
