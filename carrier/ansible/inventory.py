"""The inventory, read by ansible-core's own machinery (InventoryManager, DataLoader, VariableManager
and the ssh connection plugin's option resolution), so hosts, groups, patterns and connection
settings mean exactly what they mean to ``ansible-playbook``.

A host pattern from outside is checked (``check_pattern``) before it is used anywhere: only host
and group names, globs (``* ? [..]``) and the combinators ``, : & !`` are allowed. Regex patterns
(``~``) and ``@file`` limits (Ansible would read that file) are refused, as is anything that could
be taken for an option (a leading ``-``).

Only hosts the inventory really names are targets. Ansible invents an implicit ``localhost`` (with
``connection: local``) for ``localhost``, ``127.0.0.1`` and ``::1`` when the inventory lacks them:
``resolve`` refuses those names, so nothing reaches the controller by accident. A host the inventory
does name that *is* the controller (``connection: local``, or an address naming this machine) is a
target only when the caller says the policy allowed it (``targets(..., controller=True)``, the role's
``local: true``); ``is_controller`` tells which hosts those are.

Edits on disk are picked up without a restart: every call compares a cheap signature of the
inventory files (paths, mtimes, sizes) and reloads when it changed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carrier.ansible.controller import LOCAL_NAMES, names_controller
from carrier.ansible.errors import ControllerError, HostError, InventoryError, PatternError
from carrier.formats import pattern_problem

log = logging.getLogger(__name__)

_FORBIDDEN_HINT = (
    "use host and group names, the globs * ? [..] and , : & ! to combine them "
    "(regex ~ patterns and @file limits are not accepted)"
)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
#: Connection types the exec fast path and PTY jobs can drive themselves.
FAST_CONNECTIONS = ("ssh", "local")
_CONTROLLER_HINT = (
    "Carrier never runs a command on its own machine unless the inventory names the host "
    "and the role has `local: true` (see docs/trust.md)"
)


def check_pattern(pattern: object) -> str:
    """``pattern`` if it is a safe Ansible host pattern, else PatternError naming the bad part."""
    problem = pattern_problem(pattern)
    if problem is not None:
        hint = "" if problem.endswith(("`all`", "characters")) else f": {_FORBIDDEN_HINT}"
        raise PatternError(problem + hint)
    assert isinstance(pattern, str)
    return pattern


def check_address(value: str, host: str) -> str:
    """A host address (name, IPv4 or IPv6) that cannot be mistaken for an ssh option."""
    if _HOSTNAME_RE.fullmatch(value) or (":" in value and _IPV6_RE.fullmatch(value)):
        return value
    raise HostError(
        f"host {host}: ansible_host {value[:60]!r} is not a host name or IP address: fix the inventory"
    )


@dataclass(frozen=True, slots=True)
class HostConn:
    """How to reach one inventory host, as Ansible's ssh connection plugin resolves it."""

    name: str
    connection: str
    address: str
    port: int | None
    user: str | None
    private_key: str | None
    #: ``ansible_ssh_args`` when the inventory sets it (it replaces Carrier's ControlPersist options).
    ssh_args: str | None
    common_args: str
    extra_args: str
    timeout: int


@dataclass(frozen=True, slots=True)
class _Loaded:
    signature: tuple[tuple[str, int, int], ...]
    manager: Any  # ansible InventoryManager
    variables: Any  # ansible VariableManager
    loader: Any  # ansible DataLoader


def _signature(source: Path) -> tuple[tuple[str, int, int], ...]:
    """Paths, mtimes and sizes of every file the inventory source may read."""
    items: list[tuple[str, int, int]] = []
    try:
        if source.is_dir():
            for root, dirs, files in os.walk(source):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                st = os.stat(root)
                items.append((root, st.st_mtime_ns, 0))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    path = os.path.join(root, name)
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    items.append((path, st.st_mtime_ns, st.st_size))
        else:
            st = source.stat()
            items.append((str(source), st.st_mtime_ns, st.st_size))
            # group_vars/ and host_vars/ beside an inventory file count too.
            for sub in ("group_vars", "host_vars"):
                if (source.parent / sub).is_dir():
                    items.extend(_signature(source.parent / sub))
    except OSError as exc:
        problem = f"cannot read the inventory {source}: {exc.strerror}"
        raise InventoryError(f"{problem}: check `inventory:` in carrier.yml") from exc
    return tuple(items)


def _forget_vars_files() -> None:
    """Empty the group_vars/host_vars plugin's process-wide caches of found (and missing) files,
    so a file or directory added since the last load is seen."""
    from ansible.plugins.vars import host_group_vars

    for name in ("FOUND", "NAK", "CANONICAL_PATHS"):
        clear = getattr(getattr(host_group_vars, name, None), "clear", None)
        if callable(clear):
            clear()


def _plain(value: Any) -> Any:
    """Ansible 2.19 tags loaded values; give back plain str/int/bool."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    return value


class Inventory:
    """One inventory source (a file or a directory). Thread-safe; reloads when the files change."""

    def __init__(self, source: Path) -> None:
        self.source = Path(source)
        self._lock = threading.RLock()
        self._loaded: _Loaded | None = None
        self._conns: dict[str, HostConn] = {}

    # ----------------------------------------------------------------- loading

    def _current(self) -> _Loaded:
        """The loaded inventory, reloaded first when a file changed on disk."""
        if not self.source.exists():
            raise InventoryError(
                f"the inventory {self.source} does not exist: fix `inventory:` in carrier.yml"
            )
        signature = _signature(self.source)
        loaded = self._loaded
        if loaded is not None and loaded.signature == signature:
            return loaded
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.vars.manager import VariableManager

        _forget_vars_files()
        loader = DataLoader()
        try:
            manager = InventoryManager(loader=loader, sources=[str(self.source)])
        except Exception as exc:  # ansible raises its own error types for every parse problem
            raise InventoryError(f"cannot parse the inventory {self.source}: {exc}") from exc
        variables = VariableManager(loader=loader, inventory=manager)
        self._loaded = _Loaded(signature, manager, variables, loader)
        self._conns = {}
        if loaded is not None:
            log.info("inventory reloaded", extra={"inventory": str(self.source)})
        return self._loaded

    def reload(self) -> None:
        """Forget the loaded inventory (the next call reads the files again)."""
        with self._lock:
            self._loaded = None
            self._conns = {}

    # ----------------------------------------------------------------- queries

    def hosts(self) -> list[str]:
        """Every host, in inventory order."""
        with self._lock:
            return [h.name for h in self._current().manager.get_hosts("all")]

    def groups(self) -> dict[str, list[str]]:
        """Each group (``all`` and ``ungrouped`` included) with the hosts in it, sorted by name."""
        with self._lock:
            manager = self._current().manager
            return {
                name: sorted(h.name for h in group.get_hosts())
                for name, group in sorted(manager.groups.items())
            }

    def resolve(self, pattern: str) -> list[str]:
        """The hosts ``pattern`` selects, exactly as Ansible resolves it, in Ansible's order.

        Raises PatternError for a malformed pattern, for a name in it that is neither a host nor a
        group (a typo in ``all:!db1`` must not silently select db1), and when nothing is selected;
        ControllerError for a name only Ansible's implicit localhost answers (``localhost``,
        ``127.0.0.1``, ``::1`` not in the inventory). Hosts the inventory names are returned even when
        they are the controller: ``targets`` is what engines use.
        """
        check_pattern(pattern)
        from ansible.inventory.manager import split_host_pattern

        with self._lock:
            manager = self._current().manager
            for term in split_host_pattern(pattern):
                name = term.lstrip("&!")
                if name and not self._term_exists(manager, name):
                    if name.lower() in LOCAL_NAMES:
                        raise ControllerError(
                            f"{name!r} in pattern {pattern!r} is not in the inventory: it would be "
                            f"Ansible's implicit localhost, the Carrier controller itself. {_CONTROLLER_HINT}"
                        )
                    known = ", ".join(sorted(manager.groups)) or "none"
                    raise PatternError(
                        f"unknown host or group {name!r} in pattern {pattern!r} (groups: {known}): "
                        "check the name against `carrier hosts` or the inventory"
                    )
            found = manager.get_hosts(pattern)
            implicit = [h.name for h in found if getattr(h, "implicit", False)]
            if implicit:  # never expected after the check above; a guard should ansible change
                raise ControllerError(
                    f"the host pattern {pattern!r} selects Ansible's implicit {implicit[0]}, the Carrier "
                    f"controller. {_CONTROLLER_HINT}"
                )
            selected = [h.name for h in found]
        if not selected:
            raise PatternError(f"the host pattern {pattern!r} selects no host")
        return selected

    def targets(self, pattern: str, *, controller: bool = False) -> list[str]:
        """``resolve(pattern)`` for running something: ControllerError when a selected host is the
        controller (``is_controller``) and ``controller`` is False (the policy did not allow it)."""
        names = self.resolve(pattern)
        if not controller:
            local = [n for n in names if self.is_controller(n)]
            if local:
                raise ControllerError(
                    f"the host pattern {pattern!r} selects {', '.join(local[:5])}, the Carrier "
                    f"controller itself. {_CONTROLLER_HINT}"
                )
        return names

    def is_controller(self, host: str) -> bool:
        """Whether running on inventory ``host`` means running on this machine: its connection is
        ``local``, or its name or address names this machine (``carrier.ansible.controller``)."""
        if names_controller(host):
            return True
        try:
            conn = self.conn(host)
        except HostError:  # unusable settings: refused later by whoever connects; judged by name here
            return False
        return conn.connection == "local" or names_controller(conn.address)

    @staticmethod
    def _term_exists(manager: Any, name: str) -> bool:
        # Plain names are looked up among the hosts the inventory names (get_host would invent an
        # implicit localhost; get_hosts would print a warning for a typo).
        if not any(c in name for c in "*?["):
            return name in manager.groups or name in manager.hosts
        return bool(manager.get_hosts(name))

    def host_vars(self, host: str) -> dict[str, Any]:
        """Every variable Ansible gives ``host`` from the inventory (group_vars/host_vars included)."""
        with self._lock:
            loaded = self._current()
            found = loaded.manager.get_host(host)
            if found is None:
                raise PatternError(f"unknown host {host!r}: it is not in the inventory {self.source}")
            return dict(loaded.variables.get_vars(host=found, include_hostvars=False))

    def conn(self, host: str) -> HostConn:
        """``host``'s connection settings, resolved by Ansible's ssh plugin and checked for argv use."""
        with self._lock:
            self._current()
            cached = self._conns.get(host)
            if cached is not None:
                return cached
            conn = self._build_conn(host)
            self._conns[host] = conn
            return conn

    def _build_conn(self, host: str) -> HostConn:
        from ansible import constants as C
        from ansible.playbook.play_context import PlayContext
        from ansible.plugins.loader import connection_loader

        loaded = self._current()
        variables = self._templated(self.host_vars(host), loaded)
        connection = str(variables.get("ansible_connection") or C.DEFAULT_TRANSPORT)
        if connection in ("smart", "paramiko"):
            connection = "ssh"
        if connection == "local":
            return HostConn(
                name=host, connection="local", address="localhost", port=None, user=None,
                private_key=None, ssh_args=None, common_args="", extra_args="", timeout=10,
            )
        if connection != "ssh":
            return HostConn(
                name=host, connection=connection, address=host, port=None, user=None,
                private_key=None, ssh_args=None, common_args="", extra_args="", timeout=10,
            )
        plugin = connection_loader.get("ssh", PlayContext(), None)
        plugin.set_options(var_options=variables)

        def option(name: str) -> Any:
            return _plain(plugin.get_option(name))

        address = check_address(str(option("host") or host), host)
        port = option("port")
        if port is not None:
            try:
                port = int(port)
            except (TypeError, ValueError):
                port = -1
            if not 0 < port < 65536:
                raise HostError(f"host {host}: ansible_port {option('port')!r} is not a port number")
        user = option("remote_user")
        if user is not None:
            user = str(user)
            if _USER_RE.fullmatch(user) is None:
                raise HostError(f"host {host}: ansible_user {user[:40]!r} is not a valid login name")
        key = option("private_key_file")
        if key is not None:
            key = os.path.expanduser(str(key))
            if "\n" in key or '"' in key:
                raise HostError(f"host {host}: ansible_ssh_private_key_file holds a newline or a quote")
        own_args = variables.get("ansible_ssh_args")
        return HostConn(
            name=host,
            connection="ssh",
            address=address,
            port=port,
            user=user,
            private_key=key,
            ssh_args=str(own_args) if own_args else None,
            common_args=str(option("ssh_common_args") or ""),
            extra_args=str(option("ssh_extra_args") or ""),
            timeout=int(option("timeout") or 10),
        )

    @staticmethod
    def _templated(variables: Mapping[str, Any], loaded: _Loaded) -> dict[str, Any]:
        """Connection variables written as Jinja templates, rendered as Ansible would."""
        names = [k for k, v in variables.items()
                 if k.startswith("ansible_") and isinstance(v, str) and "{" in v]
        if not names:
            return dict(variables)
        from ansible.template import Templar

        templar = Templar(loader=loaded.loader, variables=dict(variables))
        out = dict(variables)
        for name in names:
            try:
                out[name] = templar.template(variables[name])
            except Exception as exc:  # a template error is the inventory author's to fix
                raise HostError(f"cannot render {name} ({exc}): fix the inventory") from exc
        return out
