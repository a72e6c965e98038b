"""Who holds a lease or a claim (a mail being processed, an outbox row being sent), and whether
that holder still runs: ``pid|start|random``, judged by the process's start identity so a reused
pid is not mistaken for the holder.

A mail lease is short (``MAIL_LEASE_TTL``) and renewed every ``MAIL_LEASE_RENEW`` seconds while
its mail is processed (``Renewer``): an instance on this machine that died is seen dead at once by
its pid, one on another machine sharing the PostgreSQL store once its lease has run out, so its
mail is taken over within ``MAIL_LEASE_TTL`` seconds however long a mail may take."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)

#: How long a mail lease lasts without renewal, and how often its holder renews it.
MAIL_LEASE_TTL = 30.0
MAIL_LEASE_RENEW = 5.0


def owner_token() -> str:
    """This process's owner name: pid, the process's start identity, and a random part."""
    from carrier.procid import process_start

    return f"{os.getpid()}|{process_start(os.getpid()) or 'unknown'}|{uuid.uuid4().hex[:12]}"


def owner_alive(owner: str) -> bool:
    """Whether the process named in ``owner`` still runs (on this machine: same start identity).
    An owner this process cannot judge (no start identity, or another machine's: a second Carrier
    instance on a shared PostgreSQL store) counts as alive: its claim runs out."""
    from carrier.procid import on_this_machine, process_start

    pid, _, rest = owner.partition("|")
    start = rest.rpartition("|")[0]
    if not pid.isdigit() or not start or start == "unknown" or not on_this_machine(start):
        return True
    return process_start(int(pid)) == start


class Renewer:
    """``with Renewer(renew):`` calls ``renew()`` every ``interval`` seconds in a thread of its own
    until the block ends. ``renew`` returns False once the lease is no longer ours (it ran out and
    another process took it): that is logged and renewing stops. A failing renewal (the store
    briefly unreachable) is logged and tried again at the next tick."""

    def __init__(
        self, renew: Callable[[], bool], interval: float = MAIL_LEASE_RENEW, *, what: str = ""
    ) -> None:
        self._renew = renew
        self._interval = interval
        self._what = what
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        #: How many renewals succeeded (for tests and logs).
        self.renewals = 0
        self.lost = False

    def __enter__(self) -> Renewer:
        self._thread = threading.Thread(target=self._run, name="carrier-lease-renew", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(self._interval + 30)

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            try:
                ok = self._renew()
            except Exception as exc:  # the store may be briefly unreachable: try at the next tick
                log.warning("lease renewal failed", extra={"lease": self._what, "error": str(exc)[:300]})
                continue
            if not ok:
                self.lost = True
                log.warning("lease lost: it ran out and another process holds it",
                            extra={"lease": self._what})
                return
            self.renewals += 1
