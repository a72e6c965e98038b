"""The operations layer: what every door (mail, MCP, CLI) calls to decide, audit and run.

See :mod:`carrier.ops.service` and docs/architecture.md.
"""

# Input parsing the doors share with the engines (re-exported: doors import no engine module).
from carrier.ansible.catalog import parse_assignments
from carrier.jobs.pty import DEFAULT_COLS, DEFAULT_ROWS, DEFAULT_TERM, MAX_COLS, MAX_ROWS, MIN_COLS, MIN_ROWS
from carrier.ops.errors import Denied, OpsError
from carrier.ops.identity import local_identity
from carrier.ops.runtime import Services
from carrier.ops.service import JOB_KINDS, JOB_STATUSES, HostInfo, Ops, Planned

__all__ = [
    "DEFAULT_COLS", "DEFAULT_ROWS", "DEFAULT_TERM", "JOB_KINDS", "JOB_STATUSES", "MAX_COLS", "MAX_ROWS",
    "MIN_COLS", "MIN_ROWS", "Denied", "HostInfo", "Ops", "OpsError", "Planned", "Services",
    "local_identity", "parse_assignments",
]
