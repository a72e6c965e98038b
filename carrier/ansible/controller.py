"""What counts as the Carrier controller (the machine ``carrier serve`` runs on), for hosts and for
playbooks.

A host is the controller when its connection is ``local`` or its name or address names this machine
(``controller_names``). A playbook touches the controller when a play targets such a name (a play's hosts are
also bounded by the run's ``--limit``, which holds inventory hosts only), uses ``connection: local``,
or a task uses ``delegate_to`` one of those names (or a template, which cannot
be judged before the run), ``local_action``, or a ``pipe``/``lines`` lookup (those run commands on the
controller). ``controller_uses`` finds these statically, following static ``import_playbook``,
``import_tasks``/``include_tasks`` and roles that live beside the playbook; what it cannot follow
counts as a use, so the catalog must say ``controller: true`` for it.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Names and addresses that always mean this machine (Ansible's implicit localhost answers the first
#: three). Loopback aliases such as the sandbox's 127.0.0.11 are not here: they are ssh hosts.
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain", "ip6-localhost",
                         "ip6-loopback", "0.0.0.0", "::"})  # noqa: S104 - names compared, not bound
_TASK_LISTS = ("tasks", "pre_tasks", "post_tasks", "handlers")
_BLOCK_LISTS = ("block", "rescue", "always")
_INCLUDE_TASKS = ("import_tasks", "include_tasks", "include")
_INCLUDE_ROLE = ("import_role", "include_role")
_CONTROLLER_LOOKUP_RE = re.compile(
    r"\b(?:lookup|query|q)\s*\(\s*['\"](?:ansible\.builtin\.)?(?:pipe|lines)['\"]"
)
_MAX_DEPTH = 10


@functools.cache
def controller_names() -> frozenset[str]:
    """Lower-cased names and addresses of this machine: ``LOCAL_NAMES``, its host name, FQDN and the
    addresses its host name resolves to (looked up once per process)."""
    names = set(LOCAL_NAMES)
    try:
        hostname = socket.gethostname()
        names.update({hostname, socket.getfqdn(), hostname.split(".", 1)[0]})
        names.update(str(info[4][0]) for info in socket.getaddrinfo(hostname, None))
    except OSError:  # an unresolvable own name: the fixed names still apply
        pass
    return frozenset(n.lower() for n in names if n)


def names_controller(value: str) -> bool:
    """Whether a host name or address names this machine."""
    return value.strip().lower() in controller_names()


def _templated(value: str) -> bool:
    return "{{" in value or "{%" in value


def _short(value: object) -> str:
    return str(value).strip()[:60]


def _bare(key: str) -> str:
    return key.removeprefix("ansible.builtin.").removeprefix("ansible.legacy.")


def _pattern_terms(value: Any) -> list[str]:
    from ansible.inventory.manager import split_host_pattern

    items = value if isinstance(value, list) else [value]
    terms: list[str] = []
    for item in items:
        if item is not None:  # split as Ansible does (an IPv6 address keeps its colons)
            terms.extend(str(t).lstrip("&!") for t in split_host_pattern(str(item)) if str(t).strip())
    return terms


class _Scan:
    """One walk over a playbook and what it pulls in; ``uses`` says where the controller is touched."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uses: list[str] = []
        self._seen: set[Path] = set()

    def _load(self, path: Path) -> Any:
        from ansible.parsing.dataloader import DataLoader

        try:
            return DataLoader().load_from_file(str(path), cache="none")
        except Exception:  # unparseable: ansible refuses the same file at run time
            return None

    def _file(self, base: Path, name: object, what: str, depth: int) -> Path | None:
        text = str(name or "")
        if not text or _templated(text):
            self.uses.append(f"{what} {_short(text)!r} is a template Carrier cannot follow")
            return None
        path = (base / text).resolve()
        if depth > _MAX_DEPTH or not path.is_file() or not path.is_relative_to(self.root.resolve()):
            self.uses.append(f"{what} {_short(text)!r} is not a file beside the playbook Carrier can check")
            return None
        return path

    def _text(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        if _CONTROLLER_LOOKUP_RE.search(text):
            self.uses.append(f"{path.name} uses a pipe/lines lookup (it runs on the controller)")

    def playbook(self, path: Path, depth: int = 0) -> None:
        if path in self._seen:
            return
        self._seen.add(path)
        self._text(path)
        plays = self._load(path)
        if not isinstance(plays, list):
            return
        for number, play in enumerate(plays, 1):
            if not isinstance(play, Mapping):
                continue
            where = f"{path.name} play {number}"
            if "import_playbook" in play or "ansible.builtin.import_playbook" in play:
                target = play.get("import_playbook", play.get("ansible.builtin.import_playbook"))
                found = self._file(path.parent, target, f"{where}: import_playbook", depth)
                if found is not None:
                    self.playbook(found, depth + 1)
                continue
            self._hosts(play.get("hosts"), where)
            self._settings(play, where)
            for section in _TASK_LISTS:
                self._tasks(play.get(section), path.parent, where, depth)
            for role in play.get("roles") or ():
                name = role.get("role", role.get("name")) if isinstance(role, Mapping) else role
                self._role(name, path.parent, f"{where} role", depth)

    def _hosts(self, value: Any, where: str) -> None:
        # A templated ``hosts`` is not flagged: the run's --limit (inventory hosts only, the
        # controller's only when allowed) bounds whatever it renders to.
        for term in _pattern_terms(value):
            if not _templated(term) and names_controller(term):
                self.uses.append(f"{where}: hosts {_short(value)!r} names the controller")

    def _settings(self, item: Mapping[str, Any], where: str) -> None:
        if str(item.get("connection", "")).strip() == "local":
            self.uses.append(f"{where}: connection: local")
        variables = item.get("vars")
        if isinstance(variables, Mapping) and str(variables.get("ansible_connection", "")).strip() == "local":
            self.uses.append(f"{where}: ansible_connection: local")
        delegate = item.get("delegate_to")
        if delegate is not None:
            text = str(delegate)
            if _templated(text):
                self.uses.append(f"{where}: delegate_to {_short(text)!r} is a template Carrier cannot judge")
            elif names_controller(text):
                self.uses.append(f"{where}: delegate_to {_short(text)!r} is the controller")

    def _tasks(self, tasks: Any, base: Path, where: str, depth: int) -> None:
        if not isinstance(tasks, list):
            return
        for task in tasks:
            if not isinstance(task, Mapping):
                continue
            label = f"{where} task {_short(task.get('name', '(unnamed)'))!r}"
            self._settings(task, label)
            keys = {_bare(str(k)): k for k in task}
            if "local_action" in keys:
                self.uses.append(f"{label}: local_action")
            for section in _BLOCK_LISTS:
                self._tasks(task.get(section), base, where, depth)
            for kind in _INCLUDE_TASKS:
                if kind in keys:
                    value = task[keys[kind]]
                    name = value.get("file") if isinstance(value, Mapping) else value
                    found = self._file(base, name, f"{label}: {kind}", depth)
                    if found is not None and found not in self._seen:
                        self._seen.add(found)
                        self._text(found)
                        self._tasks(self._load(found), found.parent, f"{where} ({found.name})", depth + 1)
            for kind in _INCLUDE_ROLE:
                if kind in keys:
                    value = task[keys[kind]]
                    name = value.get("name") if isinstance(value, Mapping) else value
                    self._role(name, base, f"{label}: {kind}", depth)

    def _role(self, name: object, base: Path, where: str, depth: int) -> None:
        role_dir = self._file(base / "roles", f"{name}/tasks/main.yml", where, depth)
        if role_dir is None:
            return
        directory = role_dir.parent.parent
        for sub in ("tasks", "handlers"):
            for path in sorted((directory / sub).glob("*.y*ml")):
                if path not in self._seen:
                    self._seen.add(path)
                    self._text(path)
                    self._tasks(self._load(path), path.parent, f"{where} {name} ({sub}/{path.name})",
                                depth + 1)


def controller_uses(playbook: Path, root: Path | None = None) -> tuple[str, ...]:
    """Where ``playbook`` (and what it statically pulls in from under ``root``, its directory by
    default) runs something on the controller; empty when nothing does."""
    scan = _Scan(root or playbook.parent)
    scan.playbook(playbook)
    return tuple(dict.fromkeys(scan.uses))

