"""Who the local doors act as: the CLI and stdio MCP are the local user's own doors."""

from __future__ import annotations

import getpass
import os

from carrier.auth.policy import Identity
from carrier.config import Config


def local_user() -> str:
    """The login name of this process's user (its uid when it has no name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def local_role(config: Config) -> str:
    """``mcp.stdio_role``, else ``operator`` when defined, else the first role by name."""
    if config.mcp.stdio_role:
        return config.mcp.stdio_role
    return "operator" if "operator" in config.roles else sorted(config.roles)[0]


def local_identity(config: Config, door: str = "mcp") -> Identity:
    """The local user (``local:<user>``) through ``door`` (``mcp`` for stdio, ``cli``).

    Whoever can start ``carrier`` can read carrier.yml and the state directory, so the local user
    is trusted as a local admin (every job, enrollment and token decision); the role still bounds
    what runs on hosts, and every decision is audited like any other door's.
    """
    return Identity(name=f"local:{local_user()}", role=local_role(config), door=door, admin=True,
                    local=True)
