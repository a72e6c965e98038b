"""Schedules: a catalogued playbook run on a cron expression, as its owner, by ``carrier serve``.

Two parts, both in the operations layer:

- :class:`ScheduleOps`: ``add`` / ``list`` / ``remove``, each decided as the policy action
  ``schedule`` with one audit row (``add`` decides the run it schedules too: the role must be allowed
  to run that playbook on those hosts now).
- :class:`Scheduler`: the loop ``carrier serve`` runs. Each check, per schedule, in one store
  transaction: the slots since ``checked_at`` are found with croniter; the newest one, if it is at
  most ``GRACE_SECONDS`` old, is claimed by inserting its ``(schedule, slot)`` row; older ones are
  **missed** (Carrier was not running) and are reported — logged, and mailed to the owner when the
  owner has an address — never run. A slot is therefore run at most once, across restarts and across
  two ``serve`` processes on one store; a slot is lost only when Carrier is down for longer than the
  grace, and then it is reported. A fired slot runs **as its owner, through the same policy**: the
  owner's identity is looked up again (a revoked enrollment stops the schedule), the ``schedule``
  action and the playbook run are decided again, and a refusal is audited and reported.

Cron expressions are croniter's: five fields (minute hour day month weekday), an optional sixth for
seconds, or ``@hourly``/``@daily``/...; times are UTC.
"""

from __future__ import annotations

import datetime as _dt
import logging
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from croniter import CroniterError, croniter

from carrier.ansible.catalog import check_playbook_name, validate_extra_vars
from carrier.auth.policy import Decision, Identity, Request
from carrier.errors import CarrierError
from carrier.formats import FormatError, check_schedule_name
from carrier.jobs.manager import JobView
from carrier.ops.errors import OpsError
from carrier.ops.identity import local_role
from carrier.ops.service import Ops, Planned
from carrier.store import schedules as sql
from carrier.store.schedules import ScheduleRecord, ScheduleRun
from carrier.store.schema import SCHEDULE_NOTIFY

log = logging.getLogger("carrier.schedules")

#: A slot found later than this after its time (Carrier was down) is reported missed, not run.
GRACE_SECONDS = 60.0
#: Seconds between checks of ``carrier serve``'s scheduler (a six-field cron can fire every second).
TICK_SECONDS = 1.0
#: Missed slots counted per report (a long downtime of a per-second schedule says "at least").
MAX_COUNTED = 10_000
MAX_CRON_LENGTH = 200


# --------------------------------------------------------------------------- cron (pure)


def check_cron(expr: object) -> str:
    """``expr`` if croniter understands it as 5 or 6 fields or an ``@`` alias, else FormatError."""
    if not isinstance(expr, str) or not expr.strip():
        raise FormatError("the cron expression is empty: e.g. \"0 3 * * *\" (03:00 UTC every day)")
    text = " ".join(expr.split())
    if len(text) > MAX_CRON_LENGTH:
        raise FormatError(f"the cron expression is longer than {MAX_CRON_LENGTH} characters")
    fields = text.split(" ")
    if not text.startswith("@") and len(fields) not in (5, 6):
        raise FormatError(f"invalid cron expression {text[:60]!r}: expected 5 fields (minute hour day "
                          "month weekday), or 6 with seconds last, e.g. \"0 3 * * *\"")
    try:
        croniter(text, 0.0).get_next(float)
    except (CroniterError, ValueError, KeyError) as exc:
        raise FormatError(f"invalid cron expression {text[:60]!r}: {exc}") from None
    return text


def next_slot(cron: str, after: float) -> float:
    """The first slot of ``cron`` strictly after ``after`` (epoch seconds, UTC)."""
    return float(croniter(cron, after).get_next(float))


def slots_between(cron: str, after: float, until: float, *, cap: int = MAX_COUNTED) -> list[float]:
    """Slots in ``(after, until]``, oldest first, at most ``cap`` (then the newest one is last)."""
    it = croniter(cron, after)
    out: list[float] = []
    while True:
        slot = float(it.get_next(float))
        if slot > until:
            break
        out.append(slot)
        if len(out) > cap:
            # Keep the count bounded; the newest slot still decides whether one fires.
            newest = float(croniter(cron, until + 0.000001).get_prev(float))
            out = [*out[: cap - 1], newest]
            break
    return out


@dataclass(frozen=True, slots=True)
class Due:
    """What a check finds: the slot to fire (if any) and the missed ones (first, last, count)."""

    fire: float | None
    missed: tuple[float, float, int] | None


def due(cron: str, checked_at: float, now: float, *, grace: float = GRACE_SECONDS) -> Due:
    """The slots since ``checked_at``: the newest fires when at most ``grace`` old; the rest are missed."""
    slots = slots_between(cron, checked_at, now)
    if not slots:
        return Due(None, None)
    fire: float | None = slots[-1]
    missed = slots[:-1]
    if now - slots[-1] > grace:
        missed, fire = slots, None
    return Due(fire, (missed[0], missed[-1], len(missed)) if missed else None)


# --------------------------------------------------------------------------- add / list / remove


def identity_now(ops: Ops, owner: str, door: str, directory: Any = None) -> Identity | None:
    """Who ``owner`` is now: the local user (``mcp.stdio_role``, a local admin, as its doors act), or
    the enrolled identity of a mail address (carrier.yml users and admins, approved enrollments);
    None when the owner is not enrolled (any more)."""
    if owner.startswith("local:"):
        return Identity(name=owner, role=local_role(ops.config), door=door, admin=True, local=True)
    directory = directory or getattr(ops.trust, "directory", None)
    if directory is None:
        return None
    found: Identity | None = directory.identity(owner, door=door)
    return found


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """A schedule as the doors show it."""

    record: ScheduleRecord
    next_at: float
    recent: tuple[ScheduleRun, ...]

    def to_dict(self) -> dict[str, Any]:
        r = self.record
        return {"name": r.name, "owner": r.owner, "door": r.door, "playbook": r.playbook, "limit": r.limit,
                "extra_vars": dict(r.extra_vars), "cron": r.cron, "notify": r.notify,
                "created_at": r.created_at, "next_at": self.next_at,
                "recent": [{"slot": run.slot, "state": run.state, "job_id": run.job_id,
                            "reason": run.reason, "missed": run.missed_count} for run in self.recent]}

    def added_text(self) -> str:
        """What a door answers when this schedule was added."""
        r = self.record
        return (f"schedule {r.name} added: {r.playbook} on {r.limit or '(default limit)'} at {r.cron!r}; "
                f"next run {_when(self.next_at)}")

    def line(self) -> str:
        """One line of a schedule listing: name, cron, what, owner, next and last slot."""
        r = self.record
        last = self.recent[0] if self.recent else None
        shown = ("never ran" if last is None
                 else f"{last.state} {_when(last.slot)} {last.job_id or ''}".rstrip())
        return (f"{r.name:<20} {r.cron!r:<18} {r.playbook} on {r.limit or '(default)'}  owner {r.owner}  "
                f"notify {r.notify}  next {_when(self.next_at)}  last {shown}")


class ScheduleOps:
    """The schedule operations of one :class:`Ops` (decided, audited, stored)."""

    def __init__(self, ops: Ops) -> None:
        self.ops = ops

    def plan_add(self, who: Identity, name: str, playbook: str, *, cron: str, limit: str | None = None,
                 extra_vars: Mapping[str, Any] | None = None, notify: str = "failure",
                 tool: str | None = None) -> Planned[ScheduleView]:
        """Decide storing a schedule of ``playbook`` on ``limit`` owned by ``who`` (decided like running
        it now); ``run()`` stores it. Refusals are raised (and audited) here, before anything is kept."""
        ops = self.ops
        request = Request("schedule", playbook=str(playbook)[:100], tool=tool)
        try:
            check_schedule_name(name)
            cron = check_cron(cron)
            if notify not in SCHEDULE_NOTIFY:
                raise FormatError(f"notify must be one of {', '.join(SCHEDULE_NOTIFY)}, "
                                  f"not {str(notify)[:20]!r}")
            stem = check_playbook_name(playbook)
        except (FormatError, CarrierError) as exc:
            raise ops.refuse(who, request, str(exc)) from None
        info = ops.jobs.catalog.get(stem)
        if info is None:
            raise ops.refuse(who, request, f"no playbook named {stem!r}: `playbooks` lists the ones "
                             "you may run")
        try:
            validate_extra_vars(info, extra_vars)
        except CarrierError as exc:
            raise ops.refuse(who, request, str(exc)) from None
        if identity_now(ops, who.name, who.door) is None:
            # A schedule runs as its owner's enrolled identity at every firing: a token's owner who is
            # not enrolled would only ever be refused.
            raise ops.refuse(who, request, f"{who.name} is not enrolled: a schedule runs as its owner's "
                             "enrolled identity, so only an enrolled user (or the local user) can own one")
        if sql.get_schedule(ops.store, name) is not None:
            raise ops.refuse(who, request, f"a schedule named {name!r} exists: remove it first, or pick "
                             "another name")
        pattern = limit or info.default_limit or "all"
        hosts = ops._hosts(who, request, pattern)
        decided = Request("schedule", hosts, playbook=info.name, tool=tool, admin_only=info.admin_only,
                          controller=info.controller)
        decision = ops.decide(who, decided)

        def run(_: Any) -> ScheduleView:
            record = sql.add_schedule(ops.store, name=name, owner=who.name, door=who.door,
                                      playbook=info.name, limit=limit, extra_vars=dict(extra_vars or {}),
                                      cron=cron, notify=notify)
            if record is None:
                raise OpsError(f"a schedule named {name!r} exists: remove it first, or pick another name")
            ops.audit.record(who.name, who.door, "schedule:add", target=name, outcome="added",
                             detail={"playbook": info.name, "limit": pattern, "cron": cron, "notify": notify})
            return self._view(record)

        return Planned(decided, decision, run)

    def add(self, who: Identity, name: str, playbook: str, *, cron: str, limit: str | None = None,
            extra_vars: Mapping[str, Any] | None = None, notify: str = "failure",
            tool: str | None = None) -> ScheduleView:
        """Store a schedule of ``playbook`` on ``limit`` owned by ``who`` (decided like running it now)."""
        return self.plan_add(who, name, playbook, cron=cron, limit=limit, extra_vars=extra_vars,
                             notify=notify, tool=tool).run()

    def plan_list(self, who: Identity, *, tool: str | None = None) -> Planned[list[ScheduleView]]:
        """Decide listing the caller's schedules (an admin's: everyone's)."""
        request = Request("schedule", tool=tool)
        decision = self.ops.decide(who, request)

        def run(_: Any) -> list[ScheduleView]:
            records = sql.list_schedules(self.ops.store, None if who.admin else who.name)
            return [self._view(r) for r in records]

        return Planned(request, decision, run)

    def list(self, who: Identity, *, tool: str | None = None) -> list[ScheduleView]:
        """The caller's schedules (an admin's: everyone's), with each one's next slot and last runs."""
        return self.plan_list(who, tool=tool).run()

    def plan_remove(self, who: Identity, name: str, *, tool: str | None = None) -> Planned[bool]:
        """Decide deleting a schedule (one's own; an admin: anyone's); refused when there is none."""
        ops = self.ops
        request = Request("schedule", tool=tool)
        try:
            check_schedule_name(name)
        except FormatError as exc:
            raise ops.refuse(who, request, str(exc)) from None
        record = sql.get_schedule(ops.store, name)
        if record is None:
            raise ops.refuse(who, request, f"no schedule named {name!r}: `schedule list` shows them")
        decided = Request("schedule", tool=tool, job_owner=record.owner)
        decision = ops.decide(who, decided)

        def run(_: Any) -> bool:
            done = sql.remove_schedule(ops.store, name)
            ops.audit.record(who.name, who.door, "schedule:remove", target=name,
                             outcome="removed" if done else "unchanged", detail={"owner": record.owner})
            return done

        return Planned(decided, decision, run)

    def remove(self, who: Identity, name: str, *, tool: str | None = None) -> bool:
        """Delete a schedule (one's own; an admin: anyone's). OpsError when there is none."""
        return self.plan_remove(who, name, tool=tool).run()

    def _view(self, record: ScheduleRecord) -> ScheduleView:
        return ScheduleView(record, next_slot(record.cron, max(record.checked_at, self.ops.store.clock())),
                            tuple(sql.runs(self.ops.store, record.name, limit=5)))


# --------------------------------------------------------------------------- the scheduler


class ScheduleMail(Protocol):
    """How the scheduler reaches an owner by mail (``carrier serve`` gives one built on the email door)."""

    def result(self, to: str, schedule: str, slot: float, view: JobView) -> None:
        """Queue the result mail of a scheduled job (called inside the store transaction that marks it)."""

    def notice(self, to: str, subject: str, text: str, key: str) -> None:
        """Queue a short notice (missed or refused slots) (inside the marking transaction)."""


def owner_address(owner: str) -> str | None:
    """The owner's mail address, or None (the local user has none)."""
    return owner if "@" in owner and not owner.startswith("local:") else None


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Scheduler:
    """Fires due schedules as their owners; ``run(stop)`` loops until ``stop`` is set."""

    def __init__(self, ops: Ops, *, directory: Any = None, mail: ScheduleMail | None = None,
                 node: str | None = None, grace: float = GRACE_SECONDS, tick: float = TICK_SECONDS) -> None:
        self.ops = ops
        #: Who an owner is now (``carrier.auth.directory.Directory``): None means the trust layer's.
        self.directory = directory
        self.mail = mail
        self.node = node or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.grace = grace
        self.tick = tick
        self.wake = threading.Event()

    # ----------------------------------------------------------------- the owner, now

    def owner_identity(self, record: ScheduleRecord) -> Identity | None:
        """The identity the schedule's owner has now (None: no longer enrolled)."""
        return identity_now(self.ops, record.owner, record.door, self.directory)

    # ----------------------------------------------------------------- one check

    def check(self) -> int:
        """Handle every schedule's due slots once; return how many jobs were started."""
        started = 0
        store = self.ops.store
        for record in sql.list_schedules(store):
            now = store.clock()
            found = due(record.cron, record.checked_at, now, grace=self.grace)
            if found.fire is None and found.missed is None:
                continue
            claimed = sql.claim_due(store, record.name, checked_from=record.checked_at, checked_to=now,
                                    fire=found.fire, missed=found.missed, claimed_by=self.node)
            if claimed.missed is not None:
                self._report_missed(record, claimed.missed)
            if claimed.fire is not None and self._fire(record, claimed.fire):
                started += 1
        self._notify_ended()
        return started

    def _fire(self, record: ScheduleRecord, slot: float) -> bool:
        ops, tool = self.ops, f"schedule:{record.name}"
        who = self.owner_identity(record)
        if who is None:
            reason = f"the owner {record.owner} is no longer enrolled"
            ops.audit.decision(Identity(name=record.owner, role="(none)", door=record.door),
                               Request("schedule", playbook=record.playbook, tool=tool),
                               Decision(False, reason))
            self._refused(record, slot, reason, mail=False)
            return False
        try:
            ops.decide(who, Request("schedule", tool=tool, job_owner=record.owner))
            planned = ops.plan_playbook(who, record.playbook, limit=record.limit,
                                        extra_vars=record.extra_vars, tool=tool)
            view = planned.run(lambda job: sql.mark_started(ops.store, record.name, slot, job.id))
        except CarrierError as exc:  # Denied and bad input were audited by Ops; engine errors say why
            self._refused(record, slot, str(exc), mail=True)
            return False
        log.info("schedule fired", extra={"schedule": record.name, "slot": _when(slot), "job": view.id,
                                          "owner": record.owner})
        return True

    def _refused(self, record: ScheduleRecord, slot: float, reason: str, *, mail: bool) -> None:
        store = self.ops.store
        sql.mark_refused(store, record.name, slot, reason)
        log.warning("schedule refused", extra={"schedule": record.name, "slot": _when(slot), "reason": reason,
                                               "owner": record.owner})
        to = owner_address(record.owner)
        if not mail or to is None or record.notify == "never" or self.mail is None:
            return
        with store.transaction():
            if sql.take_notification(store, record.name, slot):
                self.mail.notice(to, f"Carrier schedule {record.name}: refused",
                                 f"Schedule {record.name} did not run at {_when(slot)}:\n{reason}\n",
                                 f"refused.{record.name}.{int(slot)}")

    def _report_missed(self, record: ScheduleRecord, run: ScheduleRun) -> None:
        first = run.first_missed if run.first_missed is not None else run.slot
        count = f"at least {run.missed_count}" if run.missed_count >= MAX_COUNTED else str(run.missed_count)
        text = (f"Schedule {record.name} ({record.cron}, playbook {record.playbook}) missed {count} "
                f"slot(s) from {_when(first)} to {_when(run.slot)}: Carrier was not running then. "
                "Missed slots are reported, not run.")
        log.warning("schedule slots missed", extra={"schedule": record.name, "count": run.missed_count,
                                                    "first": _when(first), "last": _when(run.slot),
                                                    "owner": record.owner})
        store = self.ops.store
        to = owner_address(record.owner)
        if to is None or self.mail is None:
            return
        with store.transaction():
            if sql.take_notification(store, record.name, run.slot):
                self.mail.notice(to, f"Carrier schedule {record.name}: missed runs", text + "\n",
                                 f"missed.{record.name}.{int(run.slot)}")

    def _notify_ended(self) -> None:
        """Mail the owner each ended job's result (always, or only when it did not succeed)."""
        store, manager = self.ops.store, self.ops.jobs.manager
        for run in sql.started_unnotified(store):
            if run.job_id is None:
                continue
            try:
                view = manager.get(run.job_id)
            except CarrierError:
                sql.take_notification(store, run.schedule, run.slot)
                continue
            if not view.done:
                continue
            record = sql.get_schedule(store, run.schedule)
            to = owner_address(view.owner)
            wanted = record is not None and (record.notify == "always"
                                             or (record.notify == "failure" and view.status != "succeeded"))
            with store.transaction():
                if sql.take_notification(store, run.schedule, run.slot) and wanted and to and self.mail:
                    self.mail.result(to, run.schedule, run.slot, view)
            log.info("scheduled job ended", extra={"schedule": run.schedule, "job": view.id,
                                                   "status": view.status, "mailed": bool(wanted and to)})

    # ----------------------------------------------------------------- the loop

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                self.check()
            except Exception:  # keep scheduling whatever one schedule does
                log.exception("scheduler error")
            self.wake.wait(self.tick)
