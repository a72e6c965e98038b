"""Who holds a lease or a claim (a mail being processed, an outbox row being sent), and whether
that holder still runs: ``pid|start|random``, judged by the process's start identity so a reused
pid is not mistaken for the holder."""

from __future__ import annotations

import os
import uuid


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
