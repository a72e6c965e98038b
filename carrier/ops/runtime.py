"""The parts an operations layer stands on, built on first use from a configuration: the store, the
trust layer, the job system and the :class:`~carrier.ops.service.Ops` over them.

``carrier serve`` builds one and gives it to every door, so one job manager runs every door's jobs;
``carrier mcp`` and the CLI build their own.
"""

from __future__ import annotations

import threading
from typing import Any

from carrier.auth.service import Trust
from carrier.config import Config
from carrier.jobs.system import JobSystem
from carrier.ops.service import Ops
from carrier.store import Store


class Services:
    """Store, trust, jobs and ops for one configuration (each made when first asked for, unless given)."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        trust: Trust | None = None,
        jobs: JobSystem | None = None,
        start_jobs: bool = True,
    ) -> None:
        self.config = config
        self._store, self._trust, self._jobs = store, trust, jobs
        self._ops: Ops | None = None
        self._start_jobs = start_jobs
        self._owned: list[Any] = []
        self._lock = threading.RLock()  # ops builds on store and trust, each behind the lock

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store.open(self.config.state_dir, url=self.config.store.dsn())
                self._owned.append(self._store)
            return self._store

    @property
    def trust(self) -> Trust:
        store = self.store
        with self._lock:
            if self._trust is None:
                self._trust = Trust(self.config, store)
            return self._trust

    @property
    def jobs(self) -> JobSystem:
        store = self.store
        with self._lock:
            if self._jobs is None:
                from carrier.jobs.system import build_job_system

                self._jobs = build_job_system(self.config, store)
                if self._start_jobs:
                    self._jobs.manager.start(adopt=False)
                self._owned.append(self._jobs)
            return self._jobs

    @property
    def ops(self) -> Ops:
        trust, store = self.trust, self.store
        with self._lock:
            if self._ops is None:
                # The job system is built when an operation first needs it (not for mail tools).
                self._ops = Ops(self.config, store, trust.policy, trust.audit, lambda: self.jobs,
                                trust=trust)
            return self._ops

    def close(self) -> None:
        with self._lock:
            owned, self._owned = self._owned, []
        for part in reversed(owned):  # jobs before the store they write to
            part.close()
