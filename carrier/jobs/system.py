"""Wiring: the job manager with its engines, built from a ``Config`` (what serve, the CLI and the
MCP door share)."""

from __future__ import annotations

from dataclasses import dataclass

from carrier.ansible.catalog import Catalog
from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl
from carrier.config import Config
from carrier.jobs.engines import AdhocEngine, ExecEngine, PlaybookEngine
from carrier.jobs.manager import Manager
from carrier.jobs.ptyengine import PtyEngine
from carrier.store import Store


@dataclass
class JobSystem:
    """The manager and the engine parts the doors also read (hosts, playbooks, ssh masters)."""

    manager: Manager
    inventory: Inventory
    catalog: Catalog
    ssh: SshControl
    pty: PtyEngine

    def close(self) -> None:
        self.manager.close()
        self.pty.close()  # control connections; tmux-backed jobs keep running for the next manager


def build_job_system(config: Config, store: Store) -> JobSystem:
    """A manager for ``config`` with the playbook, adhoc, exec and pty engines (not started yet)."""
    inventory = Inventory(config.inventory)
    catalog = Catalog(config.playbook_dirs)
    ssh = SshControl(config.state_dir)
    pty = PtyEngine(inventory, ssh)
    manager = Manager(
        store,
        config.state_dir,
        engines=[
            PlaybookEngine(inventory, ssh, catalog),
            AdhocEngine(inventory, ssh),
            ExecEngine(inventory, ssh),
            pty,
        ],
        max_jobs=config.limits.max_jobs,
        max_jobs_per_host=config.limits.max_jobs_per_host,
        output_max_bytes=config.limits.output_max_bytes,
    )
    return JobSystem(manager=manager, inventory=inventory, catalog=catalog, ssh=ssh, pty=pty)
