"""What ``carrier nodes`` and the ``nodes_list`` tool show: each node, its health, its running jobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from carrier.ansible.errors import SshError
from carrier.nodes.pool import Node, NodePool
from carrier.nodes.transport import NodeTransport


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    target: str
    groups: tuple[str, ...]
    capacity: int
    healthy: bool
    #: ``ansible-runner --version`` on the node, or why it could not be asked.
    detail: str
    running: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "groups": list(self.groups),
                "capacity": self.capacity, "healthy": self.healthy, "detail": self.detail,
                "running": list(self.running)}


def node_status(pool: NodePool, transport: NodeTransport,
                running: Mapping[str, Sequence[str]]) -> list[NodeStatus]:
    """Ask every node for its ``ansible-runner --version`` over its master, in parallel."""

    def one(node: Node) -> NodeStatus:
        try:
            healthy, detail = True, f"ansible-runner {transport.version(node)}"
        except SshError as exc:
            healthy, detail = False, str(exc)
        return NodeStatus(node.name, node.target, node.groups, node.capacity, healthy, detail,
                          tuple(running.get(node.name, ())))

    if not pool.nodes:
        return []
    with ThreadPoolExecutor(min(8, len(pool.nodes)), thread_name_prefix="carrier-node-health") as workers:
        return list(workers.map(one, pool.nodes))
