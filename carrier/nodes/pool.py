"""The configured execution nodes, checked against the inventory, and which node serves a job."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from carrier.ansible.errors import InventoryError
from carrier.ansible.inventory import HostConn, Inventory, check_address
from carrier.config import ExecutionNode
from carrier.errors import ConfigError

_USER_AT_HOST = re.compile(r"(?P<user>[^@]+)@(?P<host>[^:]+)(?::(?P<port>\d+))?")
#: ConnectTimeout for a ``user@host`` node (an inventory host brings its own).
NODE_CONNECT_TIMEOUT = 10


@dataclass(frozen=True, slots=True)
class Node:
    """One execution node: its settings and how to reach it."""

    name: str
    conn: HostConn
    groups: tuple[str, ...]
    capacity: int
    ansible_runner: str
    work_dir: str

    @property
    def target(self) -> str:
        user = f"{self.conn.user}@" if self.conn.user else ""
        port = f":{self.conn.port}" if self.conn.port else ""
        return f"{user}{self.conn.address}{port}"

    def remote_base(self, job_id: str) -> str:
        """The run's directory on the node (``<work_dir>/carrier-<job id>``; the job id is checked)."""
        return f"{self.work_dir.rstrip('/')}/carrier-{job_id}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "conn": asdict(self.conn), "groups": list(self.groups),
                "capacity": self.capacity, "ansible_runner": self.ansible_runner, "work_dir": self.work_dir}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        return cls(name=str(data["name"]), conn=HostConn(**data["conn"]), groups=tuple(data["groups"]),
                   capacity=int(data["capacity"]), ansible_runner=str(data["ansible_runner"]),
                   work_dir=str(data["work_dir"]))


def _conn(index: int, node: ExecutionNode, inventory: Inventory) -> HostConn:
    where = f"execution_nodes[{index}] ({node.name}).target"
    match = _USER_AT_HOST.fullmatch(node.target)
    if match is None:
        if node.target not in inventory.hosts():
            raise ConfigError(f"{where}: {node.target!r} is not an inventory host: name one, or write "
                              "user@host")
        try:
            conn = inventory.conn(node.target)
        except InventoryError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if conn.connection != "ssh":
            raise ConfigError(f"{where}: inventory host {node.target} uses connection "
                              f"{conn.connection!r}; a node is reached over ssh")
        return conn
    try:
        address = check_address(match.group("host"), node.name)
    except InventoryError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    port = int(match.group("port")) if match.group("port") else None
    return HostConn(name=node.name, connection="ssh", address=address, port=port, user=match.group("user"),
                    private_key=None, ssh_args=None, common_args="", extra_args="",
                    timeout=NODE_CONNECT_TIMEOUT)


#: Node name -> the ids of the jobs running on it now (``carrier.store.jobruns.running_on_nodes``).
RunningOnNodes = Callable[[], Mapping[str, Sequence[str]]]


class NodePool:
    """The execution nodes of one Carrier (none: every job runs on the controller).

    ``running`` (optional) says what runs on each node now, store-wide (every Carrier process):
    among the nodes that could take a job, the least busy for its capacity gets it.
    """

    def __init__(self, nodes: Sequence[Node], inventory: Inventory,
                 running: RunningOnNodes | None = None) -> None:
        self.nodes = tuple(nodes)
        self.inventory = inventory
        self.running = running
        self._turns = itertools.count()  # next() is atomic: threads placing jobs share it

    @classmethod
    def build(cls, configured: Iterable[ExecutionNode], inventory: Inventory,
              running: RunningOnNodes | None = None) -> NodePool:
        """Nodes from ``execution_nodes:``; ConfigError for a group or host the inventory lacks."""
        nodes = []
        configured = tuple(configured)
        groups = inventory.groups() if configured else {}
        for index, item in enumerate(configured):
            for group in item.groups:
                if group not in groups:
                    known = ", ".join(g for g in groups if g not in ("all", "ungrouped")) or "none"
                    raise ConfigError(f"execution_nodes[{index}] ({item.name}).groups: no inventory "
                                      f"group {group!r} (groups: {known})")
            nodes.append(Node(item.name, _conn(index, item, inventory), item.groups, item.capacity,
                              item.ansible_runner, item.work_dir))
        return cls(nodes, inventory, running)

    def get(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def served(self, node: Node) -> set[str]:
        """The hosts in the node's groups now (the inventory may have changed)."""
        groups = self.inventory.groups()
        return {host for group in node.groups for host in groups.get(group, ())}

    def node_for(self, hosts: Sequence[str]) -> Node | None:
        """A node serving every one of ``hosts``; None runs the job on the controller.

        When several do: the one with the fewest running jobs for its capacity (when ``running``
        is known); among equally busy ones they take turns, in config order.
        """
        if not hosts or not self.nodes:
            return None
        wanted = set(hosts)
        able = [n for n in self.nodes if wanted <= self.served(n)]
        if len(able) <= 1:
            return able[0] if able else None
        turn = next(self._turns) % len(able)
        rotated = able[turn:] + able[:turn]
        if self.running is None:
            return rotated[0]
        busy = self.running()
        return min(rotated, key=lambda n: len(busy.get(n.name, ())) / n.capacity)  # min: first of ties

    def capacities(self) -> dict[str, int]:
        return {n.name: n.capacity for n in self.nodes}
