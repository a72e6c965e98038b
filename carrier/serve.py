"""`carrier serve`: load the configuration, open the store, check each mail account, run until
signalled. The email and MCP doors attach here as they land."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from carrier.config import Config, load_config, resolve_config_path
from carrier.errors import CarrierError
from carrier.log import setup_logging
from carrier.mail.connect import imap_connect, smtp_connect
from carrier.store import Store

log = logging.getLogger("carrier.serve")


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


def serve_forever(config_path: Path | None, *, stop: threading.Event | None = None) -> None:
    """Start Carrier and block until SIGTERM/SIGINT (or ``stop`` is set)."""
    config = load_config(resolve_config_path(config_path, os.environ), os.environ)
    setup_logging(config.logging.level, secrets=config.secrets())
    store = Store.open(config.state_dir)
    stop = stop or threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    try:
        log.info("store ready", extra={"path": str(store.path), "state_dir": str(config.state_dir)})
        problems = check_accounts(config)
        log.info("carrier ready", extra={
            "config": str(config.path), "accounts": [a.name for a in config.accounts],
            "inventory": str(config.inventory), "account_problems": len(problems),
        })
        stop.wait()
    finally:
        store.close()
        log.info("stopped")
