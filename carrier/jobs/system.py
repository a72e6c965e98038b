"""Wiring: the job manager with its engines, built from a ``Config`` (what serve, the CLI and the
MCP door share)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carrier import secretstore
from carrier.ansible.catalog import Catalog
from carrier.ansible.inventory import Inventory
from carrier.ansible.ssh import SshControl
from carrier.ansible.strategy import DEFAULT_STRATEGY
from carrier.ansible.zygote import DEFAULT_WORKER
from carrier.config import Config, ExecutionNode
from carrier.jobs.engines import AdhocEngine, ExecEngine, PlaybookEngine
from carrier.jobs.manager import Engine, Manager
from carrier.jobs.ptyengine import PtyEngine
from carrier.jobs.ptyoutputs import DEFAULT_OUTPUT
from carrier.nodes.pool import NodePool
from carrier.store import Store, jobruns


@dataclass
class JobSystem:
    """The manager and the engine parts the doors also read (hosts, playbooks, ssh masters)."""

    manager: Manager
    inventory: Inventory
    catalog: Catalog
    ssh: SshControl
    pty: PtyEngine
    nodes: NodePool

    def close(self, timeout: float = 30.0) -> None:
        """Hand the runs back (``Manager.close``, within ``timeout``) and close the pty connections."""
        self.manager.close(timeout)
        self.pty.close()  # control connections; tmux-backed jobs keep running for the next manager


def assemble_job_system(store: Store, state_dir: Path, inventory_path: Path,
                        playbook_dirs: Sequence[Path], *, secrets: Callable[[str], str] | None = None,
                        execution_nodes: Sequence[ExecutionNode] = (), strategy: str = DEFAULT_STRATEGY,
                        worker: str = DEFAULT_WORKER, tmux_output: str = DEFAULT_OUTPUT,
                        **manager_options: Any) -> JobSystem:
    """The one place the engines are put together: playbook, adhoc, exec and pty, sharing one
    inventory, one set of ssh masters and the execution nodes (ConfigError for a node the inventory
    cannot back). ``strategy`` is ``ansible.strategy``, ``worker`` ``ansible.worker``,
    ``tmux_output`` ``pty.tmux_output``;
    ``manager_options`` go to ``Manager`` (limits, poll)."""
    inventory = Inventory(inventory_path)
    catalog = Catalog(playbook_dirs)
    ssh = SshControl(state_dir)
    # Placement among nodes looks at what runs on each, store-wide.
    nodes = NodePool.build(execution_nodes, inventory,
                           running=functools.partial(jobruns.running_on_nodes, store))
    pty = PtyEngine(inventory, ssh, secrets=secrets, tmux_output=tmux_output)
    engines: list[Engine] = [PlaybookEngine(inventory, ssh, catalog, secrets=secrets, nodes=nodes,
                                            strategy=strategy, worker=worker),
                             AdhocEngine(inventory, ssh, secrets=secrets, nodes=nodes, strategy=strategy,
                                         worker=worker),
                             ExecEngine(inventory, ssh), pty]
    manager = Manager(store, state_dir, engines=engines, node_capacity=nodes.capacities(), **manager_options)
    return JobSystem(manager=manager, inventory=inventory, catalog=catalog, ssh=ssh, pty=pty, nodes=nodes)


def build_job_system(config: Config, store: Store) -> JobSystem:
    """A job system for ``config`` (not started yet)."""
    return assemble_job_system(
        store, config.state_dir, config.inventory, config.playbook_dirs,
        secrets=functools.partial(secretstore.lookup, config),
        strategy=config.ansible.strategy,
        tmux_output=config.pty.tmux_output,
        worker=config.ansible.worker,
        max_jobs=config.limits.max_jobs,
        max_jobs_per_host=config.limits.max_jobs_per_host,
        output_max_bytes=config.limits.output_max_bytes,
        execution_nodes=config.execution_nodes,
    )
