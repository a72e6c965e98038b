"""`carrier serve`: load the configuration, open the store, check each mail account, then run the
job manager, the email door (one listener per account, the result notifier, the outbox sender)
until SIGTERM/SIGINT. Shutdown is clean: listeners stop, queued replies already stored stay in the
outbox for the next start, leases are released, detachable jobs keep running for the next start.

The MCP HTTP door runs beside the email door. When it cannot start (its port is taken: the error
names the process holding it), the email door keeps running and the HTTP door is tried again every
``HTTP_RETRY_SECONDS``: one broken door must not take the other down."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from carrier.config import Config, MailAccount, load_config, resolve_config_path
from carrier.errors import CarrierError
from carrier.log import setup_logging
from carrier.mail.connect import imap_connect, smtp_connect
from carrier.store import Store
from carrier.store import gateway as gateway_sql

log = logging.getLogger("carrier.serve")

#: Seconds between attempts to start an MCP HTTP door that could not start.
HTTP_RETRY_SECONDS = 15.0
#: How often the main thread wakes to run the Python signal handlers.
SIGNAL_CHECK_SECONDS = 0.5
#: Seconds the door threads (listeners, outbox, notifier, scheduler) get, together, to stop.
THREADS_STOP_SECONDS = 15.0
#: Seconds the job manager gets to hand its runs back (detachable runs go on regardless).
JOBS_STOP_SECONDS = 15.0


def check_accounts(config: Config) -> list[str]:
    """Log in to every account's IMAP and SMTP server; return one problem line per failure."""
    problems: list[str] = []
    for account in config.accounts:
        try:
            client = imap_connect(account, timeout=10)
            idle = b"IDLE" in client.capabilities()
            client.logout()
            log.info("imap ok", extra={"account": account.name, "idle": idle})
            smtp_connect(account, timeout=10).quit()
            log.info("smtp ok", extra={"account": account.name})
        except CarrierError as exc:
            log.error("mail account unusable", extra={"account": account.name, "error": str(exc)})
            problems.append(str(exc))
    return problems


def command_accounts(config: Config) -> list[MailAccount]:
    """The accounts whose mail is read as commands (``commands: true``; by default the first
    one only): only these get a listener, the others serve the MCP mail tools."""
    return [a for a in config.accounts if a.commands]


def serve_forever(config_path: Path | None, *, stop: threading.Event | None = None) -> None:
    """Start Carrier and block until SIGTERM/SIGINT (or ``stop`` is set)."""
    config = load_config(resolve_config_path(config_path, os.environ), os.environ)
    setup_logging(config.logging.level, secrets=config.secrets())
    store = Store.open(config.state_dir, url=config.store.dsn())
    stop = stop or threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    doors: _Doors | None = None
    try:
        log.info("store ready", extra={"path": str(store.path), "state_dir": str(config.state_dir)})
        problems = check_accounts(config)
        doors = _Doors.start(config, store, stop)
        log.info("carrier ready", extra={
            "config": str(config.path), "accounts": [a.name for a in config.accounts],
            "inventory": str(config.inventory), "account_problems": len(problems),
        })
        # Never an untimed wait: a SIGTERM the kernel hands to another thread only sets a flag the
        # main thread checks when it runs, and an untimed lock wait never runs (`carrier serve` then
        # ignored SIGTERM until a second one happened to land on the main thread).
        while not stop.wait(SIGNAL_CHECK_SECONDS):
            pass
    finally:
        if doors is not None:
            doors.close()
        store.close()
        log.info("stopped")


class _Doors:
    """The running parts of the email door and the job manager, stopped in reverse order."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.listeners: list[Any] = []
        self.inner_stop = threading.Event()
        self.jobs: Any = None
        self.door: Any = None
        self.trust: Any = None
        self.http: Any = None
        self.store: Store | None = None
        self._wake: tuple[threading.Event, ...] = ()
        self._http_lock = threading.Lock()
        self._closing = False

    @classmethod
    def start(cls, config: Config, store: Store, stop: threading.Event) -> _Doors:
        from carrier.auth.service import Trust
        from carrier.jobs.system import build_job_system
        from carrier.mail.door import MailDoor, Notifier
        from carrier.mail.gateway import Listener
        from carrier.mail.nl import proposer_for
        from carrier.mail.outbox import Outbox

        self = cls()
        self.store = store
        self.trust = Trust(config, store)
        self.jobs = build_job_system(config, store)
        self.jobs.manager.start(adopt=True)
        outbox = Outbox(config, store)
        proposer = proposer_for(config, store)
        self.door = MailDoor(config, store, self.trust, self.jobs, outbox, proposer=proposer)
        notifier = Notifier(self.door)
        for name, target in (("carrier-outbox", outbox.run), ("carrier-notifier", notifier.run)):
            thread = threading.Thread(target=target, args=(self.inner_stop,), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        for account in command_accounts(config):
            self.listeners.append(Listener(self.door, account, self.inner_stop).start())
        self._start_scheduler(config, store)
        self._wake = (outbox.wake, notifier.wake, *self._wake)
        if config.mcp.tls_cert is not None:
            self._start_http(config, store)
        else:
            log.warning("mcp http door off: no mcp.tls_cert configured (make one with `carrier cert`)")
        return self

    def _start_scheduler(self, config: Config, store: Store) -> None:
        """Run due schedules as their owners (carrier.ops.schedules), with the email door's mail."""
        from carrier.mail.schedule_mail import DoorScheduleMail
        from carrier.ops.runtime import Services
        from carrier.ops.schedules import Scheduler

        ops = Services(config, store=store, trust=self.trust, jobs=self.jobs).ops
        scheduler = Scheduler(ops, mail=DoorScheduleMail(self.door), node=self.door.owner)
        thread = threading.Thread(target=scheduler.run, args=(self.inner_stop,), name="carrier-scheduler",
                                  daemon=True)
        thread.start()
        self.threads.append(thread)
        self._wake = (scheduler.wake,)

    def _start_http(self, config: Config, store: Store) -> None:
        """Start the MCP HTTP door now, or keep trying in the background while the email door runs."""
        from carrier.mcp.http import HttpDoorError, start_http_door

        def attempt() -> str | None:
            try:
                # One job system and one trust layer for both doors: limits and audit are shared.
                door = start_http_door(config, store=store, trust=self.trust, jobs=self.jobs)
            except HttpDoorError as exc:
                return str(exc)
            with self._http_lock:
                if self._closing:
                    door.stop()
                    return None
                self.http = door
            log.info("mcp http door ready", extra={"url": door.url})
            return None

        problem = attempt()
        if problem is None:
            return
        log.error("mcp http door not started: the email door runs without it; trying again",
                  extra={"error": problem, "retry_every": HTTP_RETRY_SECONDS})

        def retry() -> None:
            while not self.inner_stop.wait(HTTP_RETRY_SECONDS):
                if attempt() is None:
                    return

        thread = threading.Thread(target=retry, name="carrier-mcp-http-retry", daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        """Stop every part within one bounded budget; a part that does not stop in time is logged
        with where it is stuck (daemon threads end with the process: nothing they hold is lost, as
        mail and job leases are taken over after a restart)."""
        took: dict[str, float] = {}

        def step(name: str, action: Any) -> None:
            began = time.monotonic()
            action()
            if time.monotonic() - began >= 1.0:
                took[name] = round(time.monotonic() - began, 1)

        with self._http_lock:
            self._closing = True
        if self.http is not None:
            step("mcp-http", self.http.stop)
        self.inner_stop.set()
        for event in self._wake:
            event.set()
        deadline = time.monotonic() + THREADS_STOP_SECONDS
        for listener in self.listeners:
            step(f"mail-{listener.account.name}", lambda li=listener: li.join(_left(deadline)))
        for thread in self.threads:
            step(thread.name, lambda t=thread: t.join(_left(deadline)))
        parts = [*(li.thread for li in self.listeners), *self.threads]
        for thread in [t for t in parts if t is not None and t.is_alive()]:
            log.warning("still busy at shutdown; leaving it to end with the process",
                        extra={"thread": thread.name, "at": _where(thread)})
        if self.jobs is not None:
            step("jobs", lambda: self.jobs.close(timeout=JOBS_STOP_SECONDS))
        if self.store is not None and self.door is not None:
            gateway_sql.release_leases_of(self.store, self.door.owner)
        if self.trust is not None and "keyring" in self.trust.__dict__:
            self.trust.keyring.stop_agent()
        if took:
            log.info("slow shutdown steps", extra={"seconds": took})


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _where(thread: threading.Thread) -> str:
    """The innermost few frames of ``thread`` (for a shutdown that does not finish)."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "(ended)"
    return " <- ".join(f"{f.name} ({Path(f.filename).name}:{f.lineno})"
                       for f in reversed(traceback.extract_stack(frame)[-6:]))
