"""Which Ansible strategy a run uses, and the environment that selects it.

``ansible.strategy`` in carrier.yml is the engine's setting; a playbook's catalog metadata may name
its own (``strategy: linear``). ``mitogen`` is Mitogen for Ansible's ``mitogen_linear``: one Python
per host, kept for the whole run, instead of a fresh interpreter per task and host. Its connection
takes Ansible's ``ssh_args``/``ssh_common_args``/``ssh_extra_args``, so it goes through Carrier's
ControlPath masters with host key checking on (see ``carrier.ansible.ssh``).

``effective_strategy`` is the one place that picks the strategy of a run, including the runs that
fall back to ``linear`` (see its docstring for why). Nothing here imports Ansible or Mitogen.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from carrier.ansible.errors import EngineError

STRATEGIES = ("mitogen", "linear", "free")
#: Chosen by measurement (tests/bench/RESULTS.md) and by the integration tests passing with it.
DEFAULT_STRATEGY = "mitogen"
#: The Ansible strategy plugin each setting selects.
_PLUGIN = {"mitogen": "mitogen_linear", "linear": "linear", "free": "free"}
#: Ad-hoc modules meant for hosts without Python (Mitogen needs Python on the host for every task).
NO_PYTHON_MODULES = frozenset({"raw"})


def check_strategy(value: object, where: str = "strategy") -> str:
    """``value`` as one of ``STRATEGIES``, or EngineError saying which are accepted."""
    if isinstance(value, str) and value.strip().lower() in STRATEGIES:
        return value.strip().lower()
    raise EngineError(f"{where} must be one of {', '.join(STRATEGIES)}, not {str(value)[:40]!r}")


def effective_strategy(
    setting: str,
    playbook: str | None = None,
    *,
    needs_become_password: bool = False,
    module: str | None = None,
    on_node: bool = False,
) -> str:
    """The strategy a run uses: the playbook's catalog choice, else the engine's ``setting``.

    Falls back to ``linear`` from ``mitogen`` (whoever chose it) for:

    - runs on an execution node (``carrier.nodes``): the node's own ansible-runner runs the play,
      and a node has no Mitogen (Debian's ansible-runner, see docs/nodes.md);
    - runs that need a become password (a role's ``become_secret``, handed to Ansible through the
      ``--become-password-file`` FIFO, ``carrier.ansible.worker``): Mitogen hands it to sudo/su/doas
      through its own pty handling in its connection multiplexer, a path Carrier's tests do not
      cover and whose logging Carrier does not control, so the secret stays on Ansible's own path;
    - ad-hoc modules for hosts without Python (``raw``): under Mitogen every task needs Python on
      the host.
    """
    chosen = check_strategy(playbook, "the playbook's strategy") if playbook else check_strategy(setting)
    if chosen == "mitogen" and (on_node or needs_become_password or module in NO_PYTHON_MODULES):
        return "linear"
    return chosen


def usable_strategy(strategy: str) -> str:
    """``strategy``, once its plugins are known to be installed (EngineError before a job exists)."""
    strategy_env(strategy)
    return strategy


def mitogen_strategy_dir() -> Path:
    """The strategy plugin directory of the installed ``mitogen`` package (found, not imported)."""
    spec = importlib.util.find_spec("ansible_mitogen")
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    path = Path(locations[0]) / "plugins" / "strategy" if locations else None
    if path is None or not (path / "mitogen_linear.py").is_file():
        raise EngineError(
            "ansible.strategy is mitogen but the mitogen package is not installed: "
            "pip install 'mitogen>=0.3.25', or set ansible.strategy: linear in carrier.yml"
        )
    return path


def strategy_env(strategy: str) -> dict[str, str]:
    """The environment that makes ansible-playbook (and ``ansible``) use ``strategy`` by default.

    A play that names its own ``strategy:`` keeps it. Ansible's deprecation warning about
    third-party strategy plugins stays out of the output (``ANSIBLE_DEPRECATION_WARNINGS=False``
    in ``carrier.ansible.runner.ansible_env``).
    """
    env = {"ANSIBLE_STRATEGY": _PLUGIN[check_strategy(strategy)]}
    if strategy == "mitogen":
        env["ANSIBLE_STRATEGY_PLUGINS"] = str(mitogen_strategy_dir())
    return env
